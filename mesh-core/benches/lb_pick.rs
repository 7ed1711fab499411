//! One load-balancer pick as the outbound request path makes it (`Balancer::pick` with the
//! thread's RNG; for ring hash and Maglev the hash is computed from an `x-key` header by the
//! route's `hash_policy` first), at 10 and 1 000 endpoints: every policy with equal weights,
//! with endpoint weights, and round robin / least request over localities and priorities.
//! No I/O. Route selection at 10 vs 10 000 virtual hosts is in `route_lookup.rs`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::cluster::LbPolicy;
use mesh_core::endpoint::{Endpoint, EndpointSet, HealthStatus, Locality};
use mesh_core::lb::{ActiveRequest, Balancer, HostState, LbConfig, PickContext};
use mesh_core::route::{HashPolicy, HashPolicyKind, RequestView, request_hash};

/// How the endpoints of a case are laid out.
#[derive(Clone, Copy)]
enum Layout {
    /// One priority, one locality, weight 1.
    Flat,
    /// Weights 1, 2, 3 in turn.
    Weighted,
    /// Three zones (weights 3, 2, 1) in each of two priorities; a quarter of P0 unhealthy, so
    /// P0 keeps 1.4 × 75% and the rest spills to P1.
    LocalityPriority,
}

fn endpoints(n: usize, layout: Layout) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let address = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080));
            let mut ep = Endpoint::new(address);
            match layout {
                Layout::Flat => {}
                Layout::Weighted => ep.weight = 1 + (i % 3) as u32,
                Layout::LocalityPriority => {
                    let zone = i % 3;
                    ep.locality = Locality {
                        region: "r".into(),
                        zone: format!("z{zone}"),
                        sub_zone: String::new(),
                    };
                    ep.locality_weight = Some(3 - zone as u32);
                    ep.priority = u32::from(i >= n / 2);
                    if ep.priority == 0 && i % 4 == 3 {
                        ep.health = HealthStatus::Unhealthy;
                    }
                }
            }
            ep
        })
        .collect()
}

fn balancer(policy: LbPolicy, n: usize, layout: Layout) -> Balancer {
    let set = EndpointSet::new(
        "outbound|8080||svc.ns.svc.cluster.local",
        endpoints(n, layout),
    );
    let config = LbConfig {
        locality_weighted: matches!(layout, Layout::LocalityPriority),
        ..LbConfig::default()
    };
    let ejected = Arc::new(AtomicUsize::new(0));
    let e = ejected.clone();
    Balancer::new(&set, policy, &config, ejected, move |ep| {
        Arc::new(HostState::new(ep.address, e.clone()))
    })
}

/// Requests in flight on every third host, so least request has something to compare.
fn busy(b: &Balancer) -> Vec<ActiveRequest> {
    b.hosts()
        .iter()
        .step_by(3)
        .flat_map(|h| (0..2).map(|_| h.start_request()))
        .collect()
}

fn lb_pick(c: &mut Criterion) {
    let cases: [(&str, LbPolicy, Layout); 11] = [
        ("round_robin", LbPolicy::RoundRobin, Layout::Flat),
        (
            "round_robin_weighted",
            LbPolicy::RoundRobin,
            Layout::Weighted,
        ),
        (
            "round_robin_locality_priority",
            LbPolicy::RoundRobin,
            Layout::LocalityPriority,
        ),
        ("least_request_p2c", LbPolicy::LeastRequest, Layout::Flat),
        (
            "least_request_weighted",
            LbPolicy::LeastRequest,
            Layout::Weighted,
        ),
        (
            "least_request_locality_priority",
            LbPolicy::LeastRequest,
            Layout::LocalityPriority,
        ),
        ("random", LbPolicy::Random, Layout::Flat),
        ("ring_hash_header", LbPolicy::RingHash, Layout::Flat),
        (
            "ring_hash_header_weighted",
            LbPolicy::RingHash,
            Layout::Weighted,
        ),
        ("maglev_header", LbPolicy::Maglev, Layout::Flat),
        ("maglev_header_weighted", LbPolicy::Maglev, Layout::Weighted),
    ];
    let policies = [HashPolicy {
        kind: HashPolicyKind::Header(HeaderName::from_static("x-key")),
        terminal: false,
    }];
    let requests: Vec<HeaderMap> = (0..256)
        .map(|k| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-key",
                HeaderValue::from_str(&format!("user-{k}")).unwrap(),
            );
            h
        })
        .collect();
    let mut group = c.benchmark_group("lb_pick");
    for n in [10usize, 1000] {
        for (name, policy, layout) in cases {
            let b = balancer(policy, n, layout);
            let _busy = busy(&b);
            let hashing = matches!(policy, LbPolicy::RingHash | LbPolicy::Maglev);
            let mut k = 0usize;
            group.bench_function(BenchmarkId::new(name, n), |bench| {
                bench.iter(|| {
                    k = (k + 1) & 255;
                    let hash = if hashing {
                        let req = RequestView::new("svc.ns", "/", &requests[k]);
                        request_hash(&policies, &req, None)
                    } else {
                        None
                    };
                    let ctx = PickContext {
                        hash,
                        ..PickContext::default()
                    };
                    black_box(b.pick(&ctx, &mut rand::rng()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, lb_pick);
criterion_main!(benches);
