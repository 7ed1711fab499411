//! Route lookup cost must not grow with the number of services: 10 vs 10 000 virtual hosts,
//! exact-authority hits, wildcard fallthrough, and a full `Snapshot::route_outbound`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use http::HeaderMap;
use mesh_core::cluster::Cluster;
use mesh_core::listener::{Listener, ListenerKind, OutboundProtocol};
use mesh_core::route::{Route, RouteAction, RouteConfig, RouteMatch, VirtualHost};
use mesh_core::snapshot::{OutboundTrafficPolicy, PASSTHROUGH_CLUSTER, Snapshot};

fn route_config(n: usize) -> RouteConfig {
    let mut vhs: Vec<VirtualHost> = (0..n)
        .map(|i| {
            let fqdn = format!("svc-{i}.ns-{}.svc.cluster.local", i % 50);
            VirtualHost {
                name: format!("{fqdn}:8080").into(),
                domains: vec![
                    format!("{fqdn}:8080"),
                    fqdn.clone(),
                    format!("svc-{i}.ns-{}", i % 50),
                    format!("svc-{i}.ns-{}:8080", i % 50),
                    format!("10.0.{}.{}", i / 250, i % 250),
                    format!("10.0.{}.{}:8080", i / 250, i % 250),
                ],
                routes: vec![Route::new(
                    "default",
                    RouteMatch::any(),
                    RouteAction::Cluster(format!("outbound|8080||{fqdn}")),
                )],
            }
        })
        .collect();
    vhs.push(VirtualHost {
        name: "allow_any".into(),
        domains: vec!["*".into()],
        routes: vec![Route::new(
            "allow_any",
            RouteMatch::any(),
            RouteAction::Cluster(PASSTHROUGH_CLUSTER.into()),
        )],
    });
    RouteConfig::new("8080", vhs).expect("valid route config")
}

fn bench_lookup(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 10_000] {
        let rc = route_config(n);
        let hit = format!("svc-{}.ns-{}.svc.cluster.local:8080", n / 2, (n / 2) % 50);
        g.bench_with_input(BenchmarkId::new("exact_hit", n), &rc, |b, rc| {
            b.iter(|| {
                rc.route(black_box(&hit), black_box("/api/v1"), &headers)
                    .is_some()
            })
        });
        g.bench_with_input(BenchmarkId::new("fallthrough_to_any", n), &rc, |b, rc| {
            b.iter(|| {
                rc.route(black_box("example.com"), black_box("/"), &headers)
                    .is_some()
            })
        });
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
        g.bench_with_input(
            BenchmarkId::new("snapshot_route_outbound", n),
            &snap,
            |b, s| {
                b.iter(|| s.route_outbound(black_box(&hit), 8080, black_box("/api/v1"), &headers))
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_lookup);
criterion_main!(benches);
