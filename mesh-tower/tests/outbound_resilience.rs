//! Load balancing, outlier detection and circuit breakers on the outbound path, against real
//! hyper upstreams on 127.0.0.1.

use crate::support_outbound;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use mesh_core::cluster::{Cluster, LbPolicy};
use mesh_core::endpoint::Endpoint;
use mesh_core::flags::ResponseFlag;
use mesh_core::outlier::OutlierDetection;
use mesh_core::retry::RetryPolicy;
use mesh_core::route::{HashPolicy, HashPolicyKind, Route, RouteAction, RouteMatch, VirtualHost};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::outbound::Outbound;
use support_outbound::*;

const C: &str = "outbound|9080||svc.default.svc.cluster.local";

fn publish(cell: &SnapshotCell, version: u64, route: Route, cluster: Cluster, eps: &[SocketAddr]) {
    let vh = VirtualHost {
        name: "svc:9080".into(),
        domains: vec!["svc".into(), "svc:9080".into()],
        routes: vec![route],
    };
    cell.publish(
        snapshot(
            version,
            9080,
            vec![vh],
            vec![(cluster, eps.iter().copied().map(Endpoint::new).collect())],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
}

/// Cluster `C` ejecting a host after two consecutive 5xx (any share of hosts).
fn ejecting_after_two_5xx() -> Cluster {
    Cluster {
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: 2,
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        }),
        ..Cluster::eds(C)
    }
}

/// Cluster `C` balanced by least request over 64 choices: with as many choices as draws,
/// the idle host is all but always among them.
fn least_request_of_64() -> Cluster {
    Cluster {
        lb_policy: LbPolicy::LeastRequest,
        lb_config: mesh_core::lb::LbConfig {
            choice_count: 64,
            ..Default::default()
        },
        ..Cluster::eds(C)
    }
}

fn route() -> Route {
    Route::new("default", RouteMatch::any(), RouteAction::Cluster(C.into()))
}

async fn get(out: &Outbound, path: &str, headers: &[(&str, &str)]) -> http::Response<bytes::Bytes> {
    let mut b = http::Request::get(format!("http://svc:9080{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = out
        .request(
            b.body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await;
    let (parts, body) = resp.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    http::Response::from_parts(parts, bytes)
}

fn flag(resp: &http::Response<bytes::Bytes>) -> ResponseFlag {
    *resp.extensions().get::<ResponseFlag>().expect("flag")
}

fn server(resp: &http::Response<bytes::Bytes>) -> String {
    String::from_utf8_lossy(resp.body())
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn ring_hash_and_maglev_keep_a_key_on_one_host() {
    bounded(async {
        let ups = [
            scripted("a", &[]).await,
            scripted("b", &[]).await,
            scripted("c", &[]).await,
        ];
        let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let cell = SnapshotCell::new();
            let mut r = route();
            r.hash_policy = vec![HashPolicy {
                kind: HashPolicyKind::Header(HeaderName::from_static("x-user")),
                terminal: false,
            }];
            let cluster = Cluster {
                lb_policy: policy,
                ..Cluster::eds(C)
            };
            publish(&cell, 1, r, cluster, &addrs);
            let out = Outbound::new(cell, CertStore::new(), node());
            let mut servers = std::collections::BTreeSet::new();
            for user in 0..30 {
                let u = format!("user-{user}");
                let first = server(&get(&out, "/", &[("x-user", &u)]).await);
                for _ in 0..3 {
                    assert_eq!(server(&get(&out, "/", &[("x-user", &u)]).await), first);
                }
                servers.insert(first);
            }
            // 30 keys over 3 hosts land on more than one.
            assert!(servers.len() > 1, "{policy:?}: {servers:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn weighted_round_robin_follows_endpoint_weights() {
    bounded(async {
        let (a, b) = (scripted("a", &[]).await, scripted("b", &[]).await);
        let cell = SnapshotCell::new();
        let vh = VirtualHost {
            name: "svc:9080".into(),
            domains: vec!["svc".into(), "svc:9080".into()],
            routes: vec![route()],
        };
        let eps = vec![
            Endpoint {
                weight: 3,
                ..Endpoint::new(a.addr)
            },
            Endpoint::new(b.addr),
        ];
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vh],
                vec![(Cluster::eds(C), eps)],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = Outbound::new(cell, CertStore::new(), node());
        for _ in 0..40 {
            assert_eq!(get(&out, "/", &[]).await.status(), 200);
        }
        assert_eq!((a.seen().len(), b.seen().len()), (30, 10));
    })
    .await;
}

#[tokio::test]
async fn consecutive_5xx_ejects_a_failing_host() {
    bounded(async {
        let bad = scripted("bad", &[Act::Status(500); 100]).await;
        let good = scripted("good", &[]).await;
        let cell = SnapshotCell::new();
        let cluster = ejecting_after_two_5xx();
        publish(&cell, 1, route(), cluster, &[bad.addr, good.addr]);
        let out = Outbound::new(cell, CertStore::new(), node());
        for _ in 0..4 {
            get(&out, "/", &[]).await;
        }
        assert_eq!(bad.seen().len(), 2);
        // Ejected for base_ejection_time (30s): everything goes to the good host now.
        for _ in 0..10 {
            let r = get(&out, "/", &[]).await;
            assert_eq!(server(&r), "good");
        }
        assert_eq!(bad.seen().len(), 2);
    })
    .await;
}

/// The value of sample `name{cluster_name="<cluster>"}` in mesh's recorder, once it is
/// `want` or after a bounded wait (the attempt's stats are recorded when it ends).
async fn outlier_stat(cluster: &str, name: &str, want: &str) -> Option<String> {
    let handle = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    let sample = format!("{name}{{cluster_name=\"{cluster}\"}} ");
    let read = || {
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(sample.as_str()).map(str::to_owned))
    };
    for _ in 0..50 {
        if read().as_deref() == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read()
}

/// Envoy's `ejections_detected_*` counts a reached threshold whether or not it is enforced,
/// and `ejections_overflow` an ejection `max_ejection_percent` refused (Envoy's
/// `DetectorImpl::ejectHost`); the deprecated `ejections_consecutive_5xx` counts detections
/// and `ejections_total` those not refused.
#[tokio::test]
async fn outlier_detections_are_counted_whether_enforced_or_refused() {
    mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    bounded(async {
        let bad = scripted("bad", &[Act::Status(500); 100]).await;
        let run = |cluster: &'static str, od: OutlierDetection| {
            let bad = bad.addr;
            async move {
                let cell = SnapshotCell::new();
                let route = Route::new(
                    "default",
                    RouteMatch::any(),
                    RouteAction::Cluster(cluster.into()),
                );
                let c = Cluster {
                    outlier_detection: Some(od),
                    ..Cluster::eds(cluster)
                };
                publish(&cell, 1, route, c, &[bad]);
                let out = Outbound::new(cell, CertStore::new(), node());
                for _ in 0..4 {
                    assert_eq!(get(&out, "/", &[]).await.status(), 500);
                }
            }
        };
        // enforcing_consecutive_5xx: 0 → two detections, no ejection: all 4 reach the host.
        let detect = "outbound|9080||detect.default.svc.cluster.local";
        run(
            detect,
            OutlierDetection {
                consecutive_5xx: 2,
                enforcing_consecutive_5xx: 0,
                max_ejection_percent: 100,
                ..OutlierDetection::default()
            },
        )
        .await;
        assert_eq!(bad.seen().len(), 4);
        let p = "envoy_cluster_outlier_detection_ejections_";
        for (stat, want) in [
            ("detected_consecutive_5xx", "2"),
            ("consecutive_5xx", "2"),
            ("total", "2"),
            ("enforced_consecutive_5xx", "0"),
            ("enforced_total", "0"),
            ("overflow", "0"),
            ("detected_consecutive_gateway_failure", "0"),
        ] {
            let got = outlier_stat(detect, &format!("{p}{stat}"), want).await;
            assert_eq!(got.as_deref(), Some(want), "{stat}");
        }
        assert_eq!(
            outlier_stat(detect, &format!("{p}active"), "0")
                .await
                .as_deref(),
            Some("0")
        );
        // One host, max_ejection_percent 10 (ejecting it would be 100 %): both detections
        // overflow, nothing is ejected.
        let overflow = "outbound|9080||overflow.default.svc.cluster.local";
        run(
            overflow,
            OutlierDetection {
                consecutive_5xx: 2,
                max_ejection_percent: 10,
                ..OutlierDetection::default()
            },
        )
        .await;
        assert_eq!(bad.seen().len(), 8);
        for (stat, want) in [
            ("detected_consecutive_5xx", "2"),
            ("overflow", "2"),
            ("total", "0"),
            ("enforced_total", "0"),
        ] {
            let got = outlier_stat(overflow, &format!("{p}{stat}"), want).await;
            assert_eq!(got.as_deref(), Some(want), "{stat}");
        }
    })
    .await;
}

/// With `split_external_local_origin_errors`, a host refusing connections is a local-origin
/// success-rate outlier (Envoy's `SUCCESS_RATE_LOCAL_ORIGIN`): ejected under that type, counted
/// in its own stats and in the deprecated `ejections_success_rate`, not in `ejections_total`.
#[tokio::test]
async fn local_origin_success_rate_ejects_a_refusing_host() {
    mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    bounded(async {
        let mut addrs = Vec::new();
        let mut good = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let u = scripted(name, &[]).await;
            addrs.push(u.addr);
            good.push(u);
        }
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        addrs.push(dead);
        let c = "outbound|9080||local-sr.default.svc.cluster.local";
        let cell = SnapshotCell::new();
        let cluster = Cluster {
            outlier_detection: Some(OutlierDetection {
                split_external_local_origin_errors: true,
                consecutive_local_origin_failure: 1000,
                consecutive_5xx: 1000,
                interval: Duration::from_millis(200),
                success_rate_request_volume: 3,
                max_ejection_percent: 100,
                ..OutlierDetection::default()
            }),
            ..Cluster::eds(c)
        };
        let r = Route::new("default", RouteMatch::any(), RouteAction::Cluster(c.into()));
        publish(&cell, 1, r, cluster, &addrs);
        let out = Outbound::new(cell, CertStore::new(), node());
        let mut refused = 0;
        for _ in 0..2000 {
            let resp = get(&out, "/", &[]).await;
            if resp.status() == 503 {
                assert_eq!(flag(&resp), ResponseFlag::UpstreamConnectionFailure);
                refused += 1;
            }
            let state = out.outlier_detection(c).expect("detector");
            if !state.ejected.is_empty() {
                assert_eq!(state.ejected, vec![dead]);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused >= 3, "the dead host was tried: {refused}");
        // Ejected for base_ejection_time (30 s): every request is answered now.
        for _ in 0..20 {
            assert_eq!(get(&out, "/", &[]).await.status(), 200);
        }
        let counts = out.outlier_detection(c).unwrap().counts;
        let t = mesh_core::outlier::EjectionType::SuccessRateLocalOrigin.index();
        assert_eq!((counts.detected[t], counts.enforced[t]), (1, 1));
        let p = "envoy_cluster_outlier_detection_ejections_";
        for (stat, want) in [
            ("enforced_local_origin_success_rate", "1"),
            ("detected_local_origin_success_rate", "1"),
            ("success_rate", "1"),
            ("enforced_success_rate", "0"),
            ("enforced_total", "1"),
            ("total", "0"),
            ("active", "1"),
        ] {
            let got = outlier_stat(c, &format!("{p}{stat}"), want).await;
            assert_eq!(got.as_deref(), Some(want), "{stat}");
        }
    })
    .await;
}

#[tokio::test]
async fn ejection_survives_an_endpoint_update() {
    bounded(async {
        let bad = scripted("bad", &[Act::Status(503); 100]).await;
        let good = scripted("good", &[]).await;
        let cell = SnapshotCell::new();
        let cluster = Cluster {
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: 1,
                max_ejection_percent: 100,
                ..OutlierDetection::default()
            }),
            ..Cluster::eds(C)
        };
        publish(&cell, 1, route(), cluster.clone(), &[bad.addr, good.addr]);
        let out = Outbound::new(cell.clone(), CertStore::new(), node());
        for _ in 0..2 {
            get(&out, "/", &[]).await;
        }
        assert_eq!(bad.seen().len(), 1);
        // A new snapshot with the same endpoints (a new endpoint set object) keeps the state.
        publish(&cell, 2, route(), cluster, &[bad.addr, good.addr]);
        for _ in 0..6 {
            assert_eq!(server(&get(&out, "/", &[]).await), "good");
        }
        assert_eq!(bad.seen().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn max_requests_overflow_answers_503_uo() {
    bounded(async {
        let up = scripted("u", &[Act::Slow]).await;
        let cell = SnapshotCell::new();
        let mut cluster = Cluster::eds(C);
        cluster.circuit_breakers.max_requests = 1;
        publish(&cell, 1, route(), cluster, &[up.addr]);
        let out = Outbound::new(cell, CertStore::new(), node());
        let slow = {
            let out = out.clone();
            tokio::spawn(async move { get(&out, "/slow", &[]).await })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while up.seen().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("slow request reached the upstream");
        let r = get(&out, "/", &[]).await;
        assert_eq!(r.status(), 503);
        assert_eq!(flag(&r), ResponseFlag::UpstreamOverflow);
        assert_eq!(
            r.body(),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
        assert_eq!(up.seen().len(), 1);
        slow.abort();
        let _ = slow.await;
        // The slot is released with the aborted request.
        let r = get(&out, "/", &[]).await;
        assert_eq!(r.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn max_retries_overflow_stops_retrying_without_urx() {
    bounded(async {
        let up = scripted("u", &[Act::Status(503); 3]).await;
        let cell = SnapshotCell::new();
        let mut cluster = Cluster::eds(C);
        cluster.circuit_breakers.max_retries = 0;
        let r = route().with_retry(Some(RetryPolicy::istio_default()));
        publish(&cell, 1, r, cluster, &[up.addr]);
        let out = Outbound::new(cell, CertStore::new(), node());
        let r = get(&out, "/", &[]).await;
        assert_eq!(r.status(), 503);
        // Envoy flags the upstream's 503 `UO` when the retry breaker refused the retry.
        assert_eq!(flag(&r), ResponseFlag::UpstreamOverflow);
        assert_eq!(up.seen().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn retry_budget_scales_with_the_active_requests() {
    bounded(async {
        // 50% of the active and pending requests, no floor.
        let mut cluster = Cluster::eds(C);
        cluster.circuit_breakers.retry_budget = Some(mesh_core::outlier::RetryBudget {
            budget_percent: mesh_core::lb::Real(50.0),
            min_retry_concurrency: 0,
        });
        let r = route().with_retry(Some(RetryPolicy::istio_default()));

        // Alone, the request's half a retry truncates to none: the 503 passes on with `UO`.
        let up = scripted("u", &[Act::Status(503); 3]).await;
        let cell = SnapshotCell::new();
        publish(&cell, 1, r.clone(), cluster.clone(), &[up.addr]);
        let out = Outbound::new(cell, CertStore::new(), node());
        let resp = get(&out, "/", &[]).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(flag(&resp), ResponseFlag::UpstreamOverflow);
        assert_eq!(up.seen().len(), 1);

        // With three more requests in flight (4 active: 2 retries allowed) it is retried.
        let up = scripted("u", &[Act::Slow, Act::Slow, Act::Slow, Act::Status(503)]).await;
        let cell = SnapshotCell::new();
        publish(&cell, 1, r, cluster, &[up.addr]);
        let out = Arc::new(Outbound::new(cell, CertStore::new(), node()));
        let mut parked = Vec::new();
        for _ in 0..3 {
            let out = out.clone();
            parked.push(tokio::spawn(async move { get(&out, "/slow", &[]).await }));
        }
        while up.seen().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let resp = get(&out, "/", &[]).await;
        assert_eq!(resp.status(), 200, "the 503 was retried");
        assert_eq!(up.seen().len(), 5);
        for p in parked {
            p.abort();
        }
    })
    .await;
}

#[tokio::test]
async fn least_request_counts_survive_snapshots() {
    bounded(async {
        let busy = scripted("busy", &[Act::Slow; 8]).await;
        let idle = scripted("idle", &[]).await;
        let cell = SnapshotCell::new();
        let cluster = least_request_of_64();
        publish(&cell, 1, route(), cluster.clone(), &[busy.addr, idle.addr]);
        let out = Arc::new(Outbound::new(cell.clone(), CertStore::new(), node()));
        // Park requests on the busy host until it holds some.
        let mut parked = Vec::new();
        while busy.seen().is_empty() {
            let out = out.clone();
            parked.push(tokio::spawn(async move { get(&out, "/slow", &[]).await }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        publish(&cell, 2, route(), cluster, &[busy.addr, idle.addr]);
        let before = busy.seen().len();
        for _ in 0..10 {
            assert_eq!(server(&get(&out, "/", &[]).await), "idle");
        }
        assert_eq!(busy.seen().len(), before);
        for p in parked {
            p.abort();
        }
    })
    .await;
}

/// Envoy's tcp_proxy reports each upstream connect to outlier detection (a refused connect is
/// `LocalOriginConnectFailed`, a 503 without `split_external_local_origin_errors`): a TCP
/// cluster's endpoint that refuses connections is ejected by `consecutive_5xx`, and later
/// connections go to the healthy endpoint.
#[tokio::test]
async fn tcp_connect_failures_eject_a_refusing_endpoint() {
    bounded(async {
        // A port nothing listens on.
        let refusing = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (good_addr, _good) = tcp_upstream().await;
        let cell = tcp_service(ejecting_after_two_5xx(), &[refusing, good_addr]);
        let out = Outbound::new(cell, CertStore::new(), node());
        let mut failures = 0;
        let mut open = Vec::new();
        for _ in 0..6 {
            match out.connect_tcp("10.96.0.9:5432").await {
                Ok(c) => {
                    assert_eq!(c.upstream_host(), good_addr);
                    open.push(c);
                }
                Err(e) => {
                    assert!(
                        matches!(e, mesh_tower::outbound::TcpConnectError::Connect { .. }),
                        "{e}"
                    );
                    failures += 1;
                }
            }
        }
        assert_eq!(failures, 2, "two refused connects eject the endpoint");
        let state = out.outlier_detection(C).expect("detector");
        assert_eq!(state.ejected, vec![refusing]);
        // Ejected for base_ejection_time (30 s): every connection goes to the healthy host.
        for _ in 0..10 {
            let c = out.connect_tcp("10.96.0.9:5432").await.expect("connect");
            assert_eq!(c.upstream_host(), good_addr);
        }
    })
    .await;
}

/// A snapshot cell with the TCP service `10.96.0.9:5432` (a `10.96.0.9_5432` tcp_proxy
/// listener) forwarding to `cluster` over `eps`.
fn tcp_service(cluster: Cluster, eps: &[SocketAddr]) -> SnapshotCell {
    use mesh_core::listener::{Listener, ListenerKind, OutboundProtocol};
    let s = snapshot(
        1,
        9080,
        vec![],
        vec![(cluster, eps.iter().copied().map(Endpoint::new).collect())],
        OutboundTrafficPolicy::RegistryOnly,
    );
    let tcp = Listener {
        name: "10.96.0.9_5432".into(),
        address: "10.96.0.9:5432".parse().unwrap(),
        kind: ListenerKind::Outbound(OutboundProtocol::Tcp { cluster: C.into() }),
    };
    let mut listeners = s.listeners.clone();
    listeners.insert(tcp.name.clone(), Arc::new(tcp));
    let s = mesh_core::Snapshot::new(
        1,
        listeners,
        s.route_configs.clone(),
        s.clusters.clone(),
        s.endpoints.clone(),
        Arc::default(),
        OutboundTrafficPolicy::RegistryOnly,
        Default::default(),
    );
    let cell = SnapshotCell::new();
    cell.publish(s, true);
    cell
}

/// A TCP upstream on 127.0.0.1 that accepts (a bounded number of) connections and holds them.
async fn tcp_upstream() -> (SocketAddr, AbortOnDrop) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..64 {
            let Ok((s, _)) = l.accept().await else { return };
            held.push(s);
        }
    });
    (addr, AbortOnDrop(task))
}

/// As in Envoy, whose TCP pool counts a tcp_proxy connection in the host's active requests
/// while it is open: least request sends new connections away from a host holding one.
#[tokio::test]
async fn tcp_connections_count_as_active_requests_for_least_request() {
    bounded(async {
        let (a, _a) = tcp_upstream().await;
        let (b, _b) = tcp_upstream().await;
        let cluster = least_request_of_64();
        let out = Outbound::new(tcp_service(cluster, &[a, b]), CertStore::new(), node());
        let held = out.connect_tcp("10.96.0.9:5432").await.expect("connect");
        let busy = held.upstream_host();
        let other = if busy == a { b } else { a };
        // Each of these closes before the next: the held connection keeps `busy` busier.
        for _ in 0..10 {
            let c = out.connect_tcp("10.96.0.9:5432").await.expect("connect");
            assert_eq!(c.upstream_host(), other);
        }
        drop(held);
        // Closed, the host is idle again: both hosts are picked.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            let c = out.connect_tcp("10.96.0.9:5432").await.expect("connect");
            seen.insert(c.upstream_host());
        }
        assert_eq!(
            seen.len(),
            2,
            "both hosts picked once the connection closed"
        );
    })
    .await;
}
