//! Route lookup cost must not grow with the number of services: 10 vs 10 000 virtual hosts,
//! exact-authority hits, wildcard fallthrough, hits on one of N `*suffix` wildcard domains,
//! and a full `Snapshot::route_outbound`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use http::HeaderMap;
use mesh_core::cluster::Cluster;
use mesh_core::listener::{Listener, ListenerKind, OutboundProtocol};
use mesh_core::route::{Route, RouteAction, RouteConfig, RouteMatch, VirtualHost};
use mesh_core::snapshot::{OutboundTrafficPolicy, PASSTHROUGH_CLUSTER, Snapshot};

/// A virtual host named `name` with `domains`, routing everything to `cluster`.
fn vhost(name: String, domains: Vec<String>, cluster: String) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains,
        routes: vec![Route::new(
            "default",
            RouteMatch::any(),
            RouteAction::Cluster(cluster),
        )],
    }
}

/// `vhs` and a last `*` virtual host to `PassthroughCluster`.
fn with_allow_any(mut vhs: Vec<VirtualHost>) -> RouteConfig {
    vhs.push(vhost(
        "allow_any".into(),
        vec!["*".into()],
        PASSTHROUGH_CLUSTER.into(),
    ));
    RouteConfig::new("8080", vhs).expect("valid route config")
}

/// `n` services with istiod's six domains each (FQDN, short name, VIP, with and without port).
fn route_config(n: usize) -> RouteConfig {
    with_allow_any(
        (0..n)
            .map(|i| {
                let fqdn = format!("svc-{i}.ns-{}.svc.cluster.local", i % 50);
                vhost(
                    format!("{fqdn}:8080"),
                    vec![
                        format!("{fqdn}:8080"),
                        fqdn.clone(),
                        format!("svc-{i}.ns-{}", i % 50),
                        format!("svc-{i}.ns-{}:8080", i % 50),
                        format!("10.0.{}.{}", i / 250, i % 250),
                        format!("10.0.{}.{}:8080", i / 250, i % 250),
                    ],
                    format!("outbound|8080||{fqdn}"),
                )
            })
            .collect(),
    )
}

/// `n` virtual hosts, each with one `*suffix` wildcard domain (suffixes of 4 distinct lengths
/// at n = 10 000, 1 at n = 10).
fn wildcard_route_config(n: usize) -> RouteConfig {
    with_allow_any(
        (0..n)
            .map(|i| {
                vhost(
                    format!("wild-{i}"),
                    vec![format!("*.tenant-{i}.example.com")],
                    format!("outbound|8080||tenant-{i}"),
                )
            })
            .collect(),
    )
}

/// Everything one `n` is measured on.
struct Fixture {
    n: usize,
    rc: RouteConfig,
    wild: RouteConfig,
    snap: Snapshot,
    hit: String,
}

fn fixture(n: usize) -> Fixture {
    let listener = Listener {
        name: "0.0.0.0_8080".into(),
        address: "0.0.0.0:8080".parse().expect("addr"),
        kind: ListenerKind::Outbound(OutboundProtocol::Http {
            route_config: "8080".into(),
        }),
    };
    let clusters: HashMap<String, Arc<Cluster>> = (0..n)
        .map(|i| {
            let name = format!("outbound|8080||svc-{i}.ns-{}.svc.cluster.local", i % 50);
            (name.clone(), Arc::new(Cluster::eds(name)))
        })
        .collect();
    let snap = Snapshot::new(
        1,
        HashMap::from([(listener.name.clone(), Arc::new(listener))]),
        HashMap::from([("8080".to_owned(), Arc::new(route_config(n)))]),
        clusters,
        HashMap::new(),
        Arc::default(),
        OutboundTrafficPolicy::AllowAny,
        BTreeMap::new(),
    );
    Fixture {
        n,
        rc: route_config(n),
        wild: wildcard_route_config(n),
        snap,
        hit: format!("svc-{}.ns-{}.svc.cluster.local:8080", n / 2, (n / 2) % 50),
    }
}

/// Each case runs at n = 10 and n = 10 000 back to back, so that load drifting on a shared
/// machine skews the ratio as little as possible.
fn bench_lookup(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let fixtures = [fixture(10), fixture(10_000)];
    let mut g = c.benchmark_group("route_lookup");
    for f in &fixtures {
        g.bench_with_input(BenchmarkId::new("exact_hit", f.n), f, |b, f| {
            b.iter(|| {
                f.rc.route(black_box(&f.hit), black_box("/api/v1"), &headers)
                    .is_some()
            })
        });
    }
    for f in &fixtures {
        g.bench_with_input(BenchmarkId::new("fallthrough_to_any", f.n), f, |b, f| {
            b.iter(|| {
                f.rc.route(black_box("example.com"), black_box("/"), &headers)
                    .is_some()
            })
        });
    }
    // The tenant's suffix is of the longest length at n = 10 000 (a 4-digit number); the
    // short one (tenant 7) is probed after every longer length missed.
    for (label, tenant) in [
        ("wildcard_suffix_hit", None),
        ("wildcard_suffix_hit_short", Some(7)),
    ] {
        for f in &fixtures {
            let host = format!("api.tenant-{}.example.com", tenant.unwrap_or(f.n / 2));
            g.bench_with_input(BenchmarkId::new(label, f.n), f, |b, f| {
                b.iter(|| {
                    f.wild
                        .route(black_box(&host), black_box("/"), &headers)
                        .is_some()
                })
            });
        }
    }
    for f in &fixtures {
        g.bench_with_input(
            BenchmarkId::new("wildcard_fallthrough_to_any", f.n),
            f,
            |b, f| {
                b.iter(|| {
                    f.wild
                        .route(black_box("example.org"), black_box("/"), &headers)
                        .is_some()
                })
            },
        );
    }
    for f in &fixtures {
        g.bench_with_input(
            BenchmarkId::new("snapshot_route_outbound", f.n),
            f,
            |b, f| {
                b.iter(|| {
                    f.snap
                        .route_outbound(black_box(&f.hit), 8080, black_box("/api/v1"), &headers)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_lookup);
criterion_main!(benches);
