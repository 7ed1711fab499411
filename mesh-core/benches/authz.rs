//! Per-request cost of authorization: the HTTP RBAC chain istiod renders (one DENY filter and
//! one ALLOW filter) with 1 and 100 ALLOW rules, each rule a principal AND a method AND a path
//! prefix, on a request matched by the last rule (the worst case: every rule is tried, in name
//! order) and on a request no rule matches (denied). Also Istio's path normalization on a
//! path that needs it (`/a/./b/../c//d`) and on an already-normal path (the fast scan).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::BTreeMap;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use mesh_core::authz::{
    AuthzChain, AuthzFilter, AuthzRequest, DynamicMetadata, HeaderMatch, HeaderMatcher,
    PathNormalization, Permission, Policy, Principal, RbacAction, RbacFilter, RbacRules,
    StringMatcher, is_normalized, normalize_path,
};

fn rule(i: usize) -> Policy {
    Policy {
        permissions: vec![Permission::And(vec![
            Permission::Header(HeaderMatcher {
                name: ":method".into(),
                matcher: HeaderMatch::String(StringMatcher::Exact("GET".into(), false)),
                invert: false,
                treat_missing_as_empty: false,
            }),
            Permission::UrlPath(StringMatcher::Prefix(format!("/api/v{i}/"), false)),
        ])],
        principals: vec![Principal::And(vec![Principal::Authenticated(Some(
            StringMatcher::Exact(
                format!("spiffe://cluster.local/ns/default/sa/client-{i}"),
                false,
            ),
        ))])],
    }
}

fn chain(n: usize) -> AuthzChain {
    let allow: BTreeMap<String, Policy> = (0..n)
        .map(|i| (format!("ns[default]-policy[p{i:03}]-rule[0]"), rule(i)))
        .collect();
    let deny = BTreeMap::from([(
        "ns[default]-policy[deny-admin]-rule[0]".to_owned(),
        Policy {
            permissions: vec![Permission::UrlPath(StringMatcher::Prefix(
                "/admin".into(),
                false,
            ))],
            principals: vec![Principal::Any],
        },
    )]);
    let filter = |action, policies| {
        AuthzFilter::Rbac(RbacFilter {
            rules: Some(RbacRules { action, policies }),
            shadow_rules: None,
            shadow_rules_stat_prefix: "istio_dry_run_allow_".into(),
        })
    };
    AuthzChain {
        filters: vec![
            filter(RbacAction::Deny, deny),
            filter(RbacAction::Allow, allow),
        ],
    }
}

fn bench(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    headers.insert("x-request-id", HeaderValue::from_static("abc"));
    let mut group = c.benchmark_group("authz");
    for n in [1usize, 100] {
        let chain = chain(n);
        let last = n - 1;
        let principal = format!("spiffe://cluster.local/ns/default/sa/client-{last}");
        let path = format!("/api/v{last}/items?id=7");
        let req = AuthzRequest {
            headers: Some(&headers),
            method: "GET",
            path: &path,
            authority: "backend:8080",
            scheme: "https",
            source: Some("10.0.0.1:40000".parse().expect("addr")),
            destination: Some("10.0.0.2:8080".parse().expect("addr")),
            peer_principal: Some(&principal),
            peer_authenticated: true,
            ..Default::default()
        };
        group.bench_function(format!("allowed_by_last_of_{n}_rules"), |b| {
            b.iter(|| {
                let mut md = DynamicMetadata::default();
                black_box(chain.evaluate(black_box(&req), &mut md))
            })
        });
        let stranger = AuthzRequest {
            peer_principal: Some("spiffe://cluster.local/ns/default/sa/stranger"),
            ..req.clone()
        };
        group.bench_function(format!("denied_by_{n}_rules"), |b| {
            b.iter(|| {
                let mut md = DynamicMetadata::default();
                black_box(chain.evaluate(black_box(&stranger), &mut md))
            })
        });
    }
    group.bench_function("normalize_path_needed", |b| {
        b.iter(|| {
            black_box(normalize_path(
                black_box("/a/./b/../c//d?x=1"),
                PathNormalization::Base,
            ))
        })
    });
    group.bench_function("normalize_path_scan_only", |b| {
        b.iter(|| {
            black_box(is_normalized(
                black_box("/api/v7/items?id=7"),
                PathNormalization::Base,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
