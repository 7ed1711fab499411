//! Retries and timeouts on the outbound path, against real hyper upstreams on 127.0.0.1 that
//! fail in scripted ways (503 then 200, resets, slow answers, dead endpoints).

use crate::support_outbound;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use mesh_core::cluster::Cluster;
use mesh_core::endpoint::Endpoint;
use mesh_core::flags::ResponseFlag;
use mesh_core::retry::{RetryOn, RetryPolicy};
use mesh_core::route::{Route, RouteAction, RouteMatch, VirtualHost};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::outbound::Outbound;
use support_outbound::*;
use tokio::net::TcpListener;

const C: &str = "outbound|9080||svc.default.svc.cluster.local";

/// A snapshot routing `svc:9080` to `C` with `route`, over `endpoints`.
fn snapshot_with(route: Route, endpoints: Vec<SocketAddr>) -> mesh_core::Snapshot {
    let vh = VirtualHost {
        name: "svc:9080".into(),
        domains: vec!["svc".into(), "svc:9080".into()],
        routes: vec![route],
    };
    snapshot(
        1,
        9080,
        vec![vh],
        vec![(
            Cluster::eds(C),
            endpoints.into_iter().map(Endpoint::new).collect(),
        )],
        OutboundTrafficPolicy::RegistryOnly,
    )
}

fn route(retry: Option<RetryPolicy>) -> Route {
    Route::new("default", RouteMatch::any(), RouteAction::Cluster(C.into())).with_retry(retry)
}

fn outbound(route: Route, endpoints: Vec<SocketAddr>) -> Outbound {
    let cell = SnapshotCell::new();
    cell.publish(snapshot_with(route, endpoints), true);
    Outbound::new(cell, CertStore::new(), node())
}

fn flag(resp: &http::Response<Bytes>) -> ResponseFlag {
    *resp.extensions().get::<ResponseFlag>().expect("flag")
}

/// A port nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

fn policy(on: RetryOn, num_retries: u32) -> RetryPolicy {
    RetryPolicy {
        retry_on: on,
        num_retries,
        ..RetryPolicy::default()
    }
}

#[tokio::test]
async fn a_503_is_retried_by_istios_default_policy_and_the_body_is_sent_again() {
    bounded(async {
        let up = scripted("u", &[Act::Status(503)]).await;
        let out = outbound(route(Some(RetryPolicy::istio_default())), vec![up.addr]);
        let r = out
            .post("http://svc:9080/x", Bytes::from_static(b"payload"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(flag(&r), ResponseFlag::None);
        let seen = up.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|s| s.body == "payload"));
        // Without include_request_attempt_count, no attempt header is sent.
        assert!(seen.iter().all(|s| s.attempt_count.is_none()));
    })
    .await;
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_by_the_connect_failure_retry() {
    bounded(async {
        let live = scripted("live", &[]).await;
        let dead = dead_addr().await;
        let out = outbound(
            route(Some(RetryPolicy::istio_default())),
            vec![dead, live.addr],
        );
        for _ in 0..6 {
            let r = out.get("http://svc:9080/").await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.body(), "live 200");
        }
        assert_eq!(live.seen().len(), 6);
        // Without a retry policy, half the requests fail with UF.
        let out = outbound(route(None), vec![dead, live.addr]);
        let mut uf = 0;
        for _ in 0..4 {
            let r = out.get("http://svc:9080/").await.unwrap();
            if r.status() == 503 {
                assert_eq!(flag(&r), ResponseFlag::UpstreamConnectionFailure);
                uf += 1;
            }
        }
        assert_eq!(uf, 2);
    })
    .await;
}

#[tokio::test]
async fn exhausted_retries_pass_the_last_response_on_with_urx() {
    bounded(async {
        let up = scripted("u", &[Act::Status(503); 5]).await;
        let out = outbound(route(Some(RetryPolicy::istio_default())), vec![up.addr]);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.body(), "u 503");
        assert_eq!(flag(&r), ResponseFlag::UpstreamRetryLimitExceeded);
        // num_retries 2: three attempts.
        assert_eq!(up.seen().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn conditions_outside_the_policy_are_not_retried() {
    bounded(async {
        let up = scripted("u", &[Act::Status(500), Act::Reset, Act::Grpc(13)]).await;
        let out = outbound(route(Some(RetryPolicy::istio_default())), vec![up.addr]);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!((r.status().as_u16(), flag(&r)), (500, ResponseFlag::None));
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(flag(&r), ResponseFlag::UpstreamConnectionTermination);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.headers()["grpc-status"], "13");
        assert_eq!(up.seen().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn grpc_unavailable_and_resets_are_retried_when_configured() {
    bounded(async {
        let up = scripted("u", &[Act::Grpc(14), Act::Reset, Act::Status(502)]).await;
        let on = RetryOn::GRPC_UNAVAILABLE | RetryOn::RESET | RetryOn::GATEWAY_ERROR;
        let out = outbound(route(Some(policy(on, 3))), vec![up.addr]);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("grpc-status").is_none());
        assert_eq!(up.seen().len(), 4);
    })
    .await;
}

#[tokio::test]
async fn per_try_timeout_retries_then_answers_504() {
    bounded(async {
        let up = scripted("u", &[Act::Slow, Act::Slow, Act::Slow]).await;
        let mut p = policy(RetryOn::HTTP_5XX, 1);
        p.per_try_timeout = Some(Duration::from_millis(200));
        let out = outbound(route(Some(p.clone())), vec![up.addr]);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.status(), 504);
        assert_eq!(r.body(), "upstream request timeout");
        assert_eq!(flag(&r).as_str(), "URX,UT");
        assert_eq!(up.seen().len(), 2);
        // A slow first try, then a fast one: the retry answers.
        let up = scripted("v", &[Act::Slow]).await;
        let out = outbound(route(Some(p)), vec![up.addr]);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.status(), 200);
    })
    .await;
}

#[tokio::test]
async fn the_route_timeout_bounds_all_attempts() {
    bounded(async {
        let up = scripted("u", &[Act::Slow; 4]).await;
        let mut p = policy(RetryOn::HTTP_5XX, 3);
        p.per_try_timeout = Some(Duration::from_secs(5));
        let r = route(Some(p)).with_timeout(Some(Duration::from_millis(300)));
        let out = outbound(r, vec![up.addr]);
        let r = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(r.status(), 504);
        assert_eq!(flag(&r), ResponseFlag::UpstreamRequestTimeout);
        assert_eq!(up.seen().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn bodies_over_the_buffer_limit_are_sent_once() {
    bounded(async {
        let up = scripted("u", &[Act::Status(503), Act::Status(503)]).await;
        let mut r = route(Some(RetryPolicy::istio_default()));
        r.per_request_buffer_limit_bytes = Some(4);
        let out = outbound(r, vec![up.addr]);
        let resp = out
            .post("http://svc:9080/", Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(flag(&resp), ResponseFlag::None);
        assert_eq!(up.seen().len(), 1);
        assert_eq!(up.seen()[0].body, "0123456789");
        // Within the limit, the same request is retried.
        let resp = out
            .post("http://svc:9080/", Bytes::from_static(b"0123"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(up.seen().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn attempt_count_headers_follow_the_virtual_host() {
    bounded(async {
        let up = scripted("u", &[Act::Status(503)]).await;
        let mut r = route(Some(RetryPolicy::istio_default()));
        r.include_request_attempt_count = true;
        r.include_attempt_count_in_response = true;
        let out = outbound(r, vec![up.addr]);
        let resp = out.get("http://svc:9080/").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-envoy-attempt-count"], "2");
        let counts: Vec<_> = up.seen().into_iter().map(|s| s.attempt_count).collect();
        assert_eq!(counts, vec![Some("1".into()), Some("2".into())]);
    })
    .await;
}

#[tokio::test]
async fn previous_hosts_moves_retries_to_another_host() {
    bounded(async {
        let a = scripted("a", &[Act::Status(503); 10]).await;
        let b = scripted("b", &[]).await;
        let out = outbound(
            route(Some(RetryPolicy::istio_default())),
            vec![a.addr, b.addr],
        );
        for _ in 0..4 {
            let r = out.get("http://svc:9080/").await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.body(), "b 200");
        }
        // The failing host was tried at most once per request.
        assert!(a.seen().len() <= 4);
    })
    .await;
}
