//! Snapshot translation and publication at 100 / 1 000 / 10 000 services (issue 7 item 2):
//! decode every Envoy resource istiod would send (the testkit model's rendering, one port, one
//! route configuration, one cluster and 3 endpoints per service), translate it into mesh-core's
//! model, build the whole `Snapshot` and publish it through a `SnapshotCell` — what the ADS
//! client does with a full push, minus the gRPC transport (`benches/xds_scale.rs` in the root
//! package measures that end to end against Envoy).
//!
//! `cargo bench -p mesh-xds --bench translate`

#![allow(missing_docs)] // criterion_group! generates undocumented items

#[path = "support/scale.rs"]
mod scale;

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use mesh_core::snapshot::SnapshotCell;
use mesh_xds::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use mesh_xds::testkit::ResourceSet;
use mesh_xds::translate::{
    from_any, translate_cluster, translate_endpoint, translate_listener, translate_route,
};
use scale::Shape;

fn sizes() -> Vec<usize> {
    // Under `cargo test --all-targets` criterion runs each benchmark once: keep that quick.
    if std::env::args().any(|a| a == "--bench") {
        vec![100, 1000, 10_000]
    } else {
        vec![100]
    }
}

fn per_type(set: &ResourceSet, t: &str) -> usize {
    let items = &set[t];
    let mut n = 0;
    for any in items.values() {
        let ok = match t {
            CLUSTER => translate_cluster(&from_any::<PbCluster>(any).expect("decode")).is_ok(),
            ENDPOINT => {
                translate_endpoint(&from_any::<ClusterLoadAssignment>(any).expect("decode")).is_ok()
            }
            ROUTE => translate_route(&from_any::<RouteConfiguration>(any).expect("decode")).is_ok(),
            _ => translate_listener(&from_any::<PbListener>(any).expect("decode")).is_ok(),
        };
        n += usize::from(ok);
    }
    n
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate_publish");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for n in sizes() {
        let set = scale::resources(n, Shape::PortPerService);
        // The workload is what it claims to be, and mesh accepts all of it.
        let snap = scale::build_snapshot(&set, 1).expect("translate");
        assert_eq!(
            snap.clusters.len(),
            n + 2,
            "N clusters + Passthrough + BlackHole"
        );
        assert_eq!(snap.route_configs.len(), n);
        assert_eq!(snap.listeners.len(), n + 2);
        assert_eq!(
            snap.endpoints
                .values()
                .map(|e| e.endpoints.len())
                .sum::<usize>(),
            3 * n
        );
        g.throughput(Throughput::Elements(n as u64));
        let cell = SnapshotCell::new();
        let mut version = 1;
        g.bench_with_input(BenchmarkId::new("full_push", n), &set, |b, set| {
            b.iter(|| {
                version += 1;
                let s = scale::build_snapshot(set, version).expect("translate");
                cell.publish(s, true);
                black_box(cell.load().version)
            })
        });
        for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
            let short = t.rsplit('.').next().unwrap_or(t);
            g.bench_with_input(BenchmarkId::new(short, n), &set, |b, set| {
                b.iter(|| black_box(per_type(set, t)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
