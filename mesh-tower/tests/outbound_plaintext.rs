//! The outbound path over plaintext: routing, load balancing, pooling, HTTP/2, Envoy's local
//! replies, snapshot updates and telemetry, against real hyper upstreams on 127.0.0.1.

use crate::support_outbound;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use mesh_core::cluster::{Cluster, ServiceMetadata, UpstreamProtocol};
use mesh_core::endpoint::{Endpoint, WorkloadMetadata};
use mesh_core::flags::ResponseFlag;
use mesh_core::route::RouteAction;
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::outbound::Outbound;
use support_outbound::*;

const A: &str = "outbound|9080||a.default.svc.cluster.local";
const B: &str = "outbound|9080||b.default.svc.cluster.local";

fn ep(u: &Upstream) -> Endpoint {
    Endpoint::new(u.addr)
}

fn outbound(cell: &SnapshotCell) -> Outbound {
    Outbound::new(cell.clone(), CertStore::new(), node())
}

fn two_host_snapshot(version: u64, a: Vec<Endpoint>, b: Vec<Endpoint>) -> mesh_core::Snapshot {
    two_host_snapshot_with(version, a, b, OutboundTrafficPolicy::RegistryOnly)
}

fn two_host_snapshot_with(
    version: u64,
    a: Vec<Endpoint>,
    b: Vec<Endpoint>,
    policy: OutboundTrafficPolicy,
) -> mesh_core::Snapshot {
    snapshot(
        version,
        9080,
        vec![
            vhost(
                "a:9080",
                &["a", "a:9080"],
                RouteAction::Cluster(A.into()),
                None,
            ),
            vhost(
                "b:9080",
                &["b", "b:9080"],
                RouteAction::Cluster(B.into()),
                None,
            ),
        ],
        vec![(Cluster::eds(A), a), (Cluster::eds(B), b)],
        policy,
    )
}

fn flag(resp: &http::Response<Bytes>) -> ResponseFlag {
    *resp
        .extensions()
        .get::<ResponseFlag>()
        .expect("flag in extensions")
}

#[tokio::test]
async fn routes_to_the_cluster_of_the_host_and_keeps_the_host_header() {
    bounded(async {
        let (ua, ub) = (upstream("A").await, upstream("B").await);
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&ua)], vec![ep(&ub)]), true);
        let out = outbound(&cell);

        let r = out.get("http://a:9080/x?y=1").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.body(), "A a:9080");
        assert_eq!(
            r.headers()["x-uri"],
            "/x?y=1",
            "HTTP/1.1 upstreams get origin-form"
        );
        assert_eq!(flag(&r), ResponseFlag::None);

        let r = out.get("http://b:9080/").await.unwrap();
        assert_eq!(r.body(), "B b:9080");

        // An explicit Host header wins over the URI and is sent as-is.
        let req = Request::get("http://a:9080/")
            .header("host", "b")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = out.request(req).await;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "B b");
    })
    .await;
}

#[tokio::test]
async fn round_robin_over_two_endpoints() {
    bounded(async {
        let (u1, u2) = (upstream("one").await, upstream("two").await);
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&u1), ep(&u2)], vec![]), true);
        let out = outbound(&cell);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = out.get("http://a:9080/").await.unwrap();
            seen.push(r.headers()["x-server"].to_str().unwrap().to_owned());
        }
        assert_ne!(seen[0], seen[1]);
        assert_eq!(seen[0], seen[2]);
        assert_eq!(seen[1], seen[3]);
        assert_eq!((u1.requests(), u2.requests()), (2, 2));
    })
    .await;
}

#[tokio::test]
async fn sequential_requests_reuse_one_http1_connection() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&u)], vec![]), true);
        let out = outbound(&cell);
        for i in 0..25 {
            let r = if i % 2 == 0 {
                out.get("http://a:9080/").await.unwrap()
            } else {
                out.post("http://a:9080/", Bytes::from_static(b"hello"))
                    .await
                    .unwrap()
            };
            assert_eq!(r.status(), 200);
            if i % 2 == 1 {
                assert_eq!(r.headers()["x-request-body-len"], "5");
            }
        }
        assert_eq!(u.requests(), 25);
        assert_eq!(u.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_open_more_connections_and_then_reuse_them() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&u)], vec![]), true);
        let out = outbound(&cell);
        for _ in 0..3 {
            let futs: Vec<_> = (0..4).map(|_| out.get("http://a:9080/")).collect();
            for r in futures_util::future::join_all(futs).await {
                assert_eq!(r.unwrap().status(), 200);
            }
        }
        assert_eq!(u.requests(), 12);
        assert!(u.connections() <= 4, "connections: {}", u.connections());
    })
    .await;
}

#[tokio::test]
async fn http2_upstream_shares_one_connection() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        let mut c = Cluster::eds(A);
        c.protocol = UpstreamProtocol::Http2;
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vhost(
                    "a",
                    &["a:9080"],
                    RouteAction::Cluster(A.into()),
                    None,
                )],
                vec![(c, vec![ep(&u)])],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = outbound(&cell);
        let futs: Vec<_> = (0..8).map(|_| out.get("http://a:9080/p")).collect();
        for r in futures_util::future::join_all(futs).await {
            let r = r.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-version"], "HTTP/2.0");
            assert_eq!(r.body(), "A a:9080", ":authority carries the host");
        }
        let r = out.get("http://a:9080/again").await.unwrap();
        assert_eq!(r.headers()["x-version"], "HTTP/2.0");
        assert_eq!(u.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn use_downstream_protocol_follows_the_request_version() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        let mut c = Cluster::eds(A);
        c.protocol = UpstreamProtocol::UseDownstream;
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vhost(
                    "a",
                    &["a:9080"],
                    RouteAction::Cluster(A.into()),
                    None,
                )],
                vec![(c, vec![ep(&u)])],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = outbound(&cell);
        let req = Request::get("http://a:9080/")
            .version(http::Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(out.request(req).await.headers()["x-version"], "HTTP/2.0");
        let r = out.get("http://a:9080/").await.unwrap();
        assert_eq!(r.headers()["x-version"], "HTTP/1.1");
    })
    .await;
}

#[tokio::test]
async fn no_route_is_404_nr_with_an_empty_body() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&u)], vec![]), true);
        let r = outbound(&cell).get("http://unknown:9080/").await.unwrap();
        assert_eq!(r.status(), 404);
        assert!(r.body().is_empty());
        assert_eq!(flag(&r), ResponseFlag::NoRouteFound);
        assert_eq!(u.requests(), 0);
    })
    .await;
}

#[tokio::test]
async fn missing_cluster_is_503_nc() {
    bounded(async {
        let cell = SnapshotCell::new();
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vhost(
                    "g",
                    &["ghost:9080"],
                    RouteAction::Cluster("outbound|9080||ghost".into()),
                    None,
                )],
                vec![],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let r = outbound(&cell).get("http://ghost:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.body().is_empty());
        assert_eq!(flag(&r), ResponseFlag::NoClusterFound);
    })
    .await;
}

#[tokio::test]
async fn no_endpoint_is_503_uh() {
    bounded(async {
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![], vec![]), true);
        let r = outbound(&cell).get("http://a:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.body(), "no healthy upstream");
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert_eq!(flag(&r), ResponseFlag::NoHealthyUpstream);
    })
    .await;
}

#[tokio::test]
async fn connection_refused_is_503_uf() {
    bounded(async {
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![Endpoint::new(closed)], vec![]), true);
        let r = outbound(&cell).get("http://a:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.body(),
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
        );
        assert_eq!(flag(&r), ResponseFlag::UpstreamConnectionFailure);
    })
    .await;
}

#[tokio::test]
async fn route_timeout_is_504_ut() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vhost(
                    "a",
                    &["a:9080"],
                    RouteAction::Cluster(A.into()),
                    Some(Duration::from_millis(200)),
                )],
                vec![(Cluster::eds(A), vec![ep(&u)])],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = outbound(&cell);
        let r = out.get("http://a:9080/slow").await.unwrap();
        assert_eq!(r.status(), 504);
        assert_eq!(r.body(), "upstream request timeout");
        assert_eq!(flag(&r), ResponseFlag::UpstreamRequestTimeout);
        // The timed-out connection is not reused; the next request still works.
        let r = out.get("http://a:9080/fast").await.unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn direct_response_and_redirect_come_from_the_route() {
    bounded(async {
        let cell = SnapshotCell::new();
        cell.publish(
            snapshot(
                1,
                9080,
                vec![
                    vhost(
                        "d",
                        &["d:9080"],
                        RouteAction::DirectResponse {
                            status: 418,
                            body: Some("teapot".into()),
                        },
                        None,
                    ),
                    vhost(
                        "r",
                        &["r:9080"],
                        RouteAction::Redirect(mesh_core::route::Redirect::to_host(
                            301,
                            Some("elsewhere".into()),
                        )),
                        None,
                    ),
                ],
                vec![],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = outbound(&cell);
        let r = out.get("http://d:9080/").await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.body().as_ref()),
            (418, &b"teapot"[..])
        );
        let r = out.get("http://r:9080/p").await.unwrap();
        assert_eq!(r.status(), 301);
        assert_eq!(r.headers()["location"], "http://elsewhere/p");
    })
    .await;
}

#[tokio::test]
async fn a_new_snapshot_is_used_by_the_next_request() {
    bounded(async {
        let (u1, u2) = (upstream("old").await, upstream("new").await);
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&u1)], vec![]), true);
        let out = outbound(&cell);
        assert_eq!(
            out.get("http://a:9080/").await.unwrap().headers()["x-server"],
            "old"
        );
        cell.publish(two_host_snapshot(2, vec![ep(&u2)], vec![]), true);
        assert_eq!(
            out.get("http://a:9080/").await.unwrap().headers()["x-server"],
            "new"
        );
        assert_eq!(u1.requests(), 1);
    })
    .await;
}

#[tokio::test]
async fn unknown_ports_pass_through_to_the_original_destination() {
    bounded(async {
        let u = upstream("direct").await;
        let cell = SnapshotCell::new();
        cell.publish(
            two_host_snapshot_with(1, vec![], vec![], OutboundTrafficPolicy::AllowAny),
            true,
        );
        let out = outbound(&cell);
        let r = out.get(format!("http://{}/", u.addr)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-server"], "direct");
        // Under REGISTRY_ONLY the unknown port is refused (BlackHoleCluster).
        cell.publish(two_host_snapshot(2, vec![], vec![]), true);
        let r = out.get(format!("http://{}/", u.addr)).await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(u.requests(), 1);
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    bounded(async {
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        cell.publish(two_host_snapshot(1, vec![ep(&u)], vec![]), true);
        let req = Request::get("http://a:9080/")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let r = outbound(&cell).request(req).await;
        assert_eq!(r.headers()["x-saw-hop"], "no");
    })
    .await;
}

#[tokio::test]
async fn requests_are_recorded_with_source_reporter_labels() {
    bounded(async {
        let handle = mesh_tower::telemetry::prometheus_handle().expect("recorder installed");
        let u = upstream("A").await;
        let cell = SnapshotCell::new();
        let mut c = Cluster::eds(A);
        c.service = Some(ServiceMetadata {
            host: "a.default.svc.cluster.local".into(),
            name: "a".into(),
            namespace: "default".into(),
        });
        let mut e = ep(&u);
        e.workload = WorkloadMetadata::parse("a-v1;default;a;v1;Kubernetes");
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vhost(
                    "a",
                    &["a:9080"],
                    RouteAction::Cluster(A.into()),
                    None,
                )],
                vec![(c, vec![e])],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = outbound(&cell);
        for _ in 0..3 {
            out.get("http://a:9080/").await.unwrap();
        }
        out.get("http://nowhere-telemetry:9080/").await.unwrap();
        let text = handle.render();
        let ok = text
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("destination_workload=\"a-v1\"")
                    && l.contains("response_code=\"200\"")
            })
            .unwrap_or_else(|| panic!("no series in:\n{text}"));
        for label in [
            "reporter=\"source\"",
            "source_workload=\"productpage-v1\"",
            "source_workload_namespace=\"default\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"",
            "destination_service=\"a.default.svc.cluster.local\"",
            "destination_service_name=\"a\"",
            "destination_canonical_service=\"a\"",
            "destination_canonical_revision=\"v1\"",
            "destination_principal=\"unknown\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"unknown\"",
            "request_protocol=\"http\"",
        ] {
            assert!(ok.contains(label), "{label} missing in {ok}");
        }
        assert!(ok.ends_with(" 3"), "{ok}");
        let nr = text
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("destination_service=\"nowhere-telemetry\"")
            })
            .unwrap_or_else(|| panic!("no NR series in:\n{text}"));
        assert!(
            nr.contains("response_flags=\"NR\"") && nr.contains("response_code=\"404\""),
            "{nr}"
        );
    })
    .await;
}

/// An h2c upstream that answers one request per connection and then closes it with GOAWAY.
async fn one_request_h2_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::sync::watch::Receiver<usize>,
    AbortOnDrop,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(0usize);
    let closed_tx = Arc::new(closed_tx);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
                let svc = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| {
                        let done = done_tx.clone();
                        async move {
                            let _ = done.try_send(());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from(format!("conn {n}"))),
                            ))
                        }
                    },
                );
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = done_rx.recv() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                closed.send_modify(|c| *c += 1);
            });
        }
    });
    (addr, connections, closed_rx, AbortOnDrop(task))
}

#[tokio::test]
async fn http2_connection_is_replaced_after_the_upstream_closes_it() {
    bounded(async {
        let (addr, connections, mut closed, _guard) = one_request_h2_upstream().await;
        let cell = SnapshotCell::new();
        let mut c = Cluster::eds(A);
        c.protocol = UpstreamProtocol::Http2;
        cell.publish(
            snapshot(
                1,
                9080,
                vec![vhost(
                    "a",
                    &["a:9080"],
                    RouteAction::Cluster(A.into()),
                    None,
                )],
                vec![(c, vec![Endpoint::new(addr)])],
                OutboundTrafficPolicy::RegistryOnly,
            ),
            true,
        );
        let out = outbound(&cell);
        let mut bodies = Vec::new();
        for i in 1..=3 {
            let r = out.get("http://a:9080/").await.unwrap();
            assert_eq!(r.status(), 200, "{:?}", r.body());
            bodies.push(r.body().clone());
            // The server has closed this connection; give the client's connection task a
            // moment to read the EOF before the next request.
            closed.wait_for(|c| *c >= i).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(bodies, vec!["conn 1", "conn 2", "conn 3"]);
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);
    })
    .await;
}
