//! The cluster's connection-pool settings (Istio's DestinationRule `connectionPool`):
//! `max_requests_per_connection` and the upstream idle timeout, counted on a real upstream's
//! accepted and closed connections.

use crate::support_outbound;

use std::time::Duration;

use mesh_core::cluster::{Cluster, ConnectionPool, UpstreamProtocol};
use mesh_core::endpoint::Endpoint;
use mesh_core::route::RouteAction;
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::outbound::Outbound;
use support_outbound::*;

const C: &str = "outbound|9080||pool.default.svc.cluster.local";

fn outbound(up: &Upstream, protocol: UpstreamProtocol, pool: ConnectionPool) -> Outbound {
    let mut c = Cluster::eds(C);
    c.protocol = protocol;
    c.connection_pool = pool;
    let cell = SnapshotCell::new();
    cell.publish(
        snapshot(
            1,
            9080,
            vec![vhost(
                "pool",
                &["pool", "pool:9080"],
                RouteAction::Cluster(C.into()),
                None,
            )],
            vec![(c, vec![Endpoint::new(up.addr)])],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    Outbound::new(cell, CertStore::new(), node())
}

/// A 200 response whose body is not read yet.
async fn get_head(out: &Outbound) -> http::Response<mesh_tower::outbound::OutboundBody> {
    let resp = out
        .request(
            http::Request::get("http://pool:9080/")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    resp
}

async fn get_ok(out: &Outbound) {
    let resp = get_head(out).await;
    // Read the body whole: an HTTP/1.1 connection goes back to the pool at its end.
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn max_requests_per_connection_opens_a_new_connection_after_the_limit() {
    bounded(async {
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            // No limit: six requests in a row share one connection.
            let up = upstream("a").await;
            let out = outbound(&up, protocol, ConnectionPool::default());
            for _ in 0..6 {
                get_ok(&out).await;
            }
            assert_eq!(up.connections(), 1, "{protocol:?} without a limit");

            // Two requests per connection: three connections, and the used-up ones close.
            let up = upstream("a").await;
            let pool = ConnectionPool {
                max_requests_per_connection: Some(2),
                ..ConnectionPool::default()
            };
            let out = outbound(&up, protocol, pool);
            for _ in 0..6 {
                get_ok(&out).await;
            }
            assert_eq!(up.requests(), 6);
            assert_eq!(up.connections(), 3, "{protocol:?} with a limit of 2");
            eventually(
                &format!("{protocol:?}: two used-up connections closed"),
                || up.closed() >= 2,
            )
            .await;
        }
    })
    .await;
}

#[tokio::test]
async fn idle_connection_closes_after_the_idle_timeout() {
    bounded(async {
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            let up = upstream("a").await;
            let pool = ConnectionPool {
                idle_timeout: Some(Duration::from_millis(300)),
                ..ConnectionPool::default()
            };
            let out = outbound(&up, protocol, pool);
            get_ok(&out).await;
            assert_eq!(up.connections(), 1);
            // mesh closes the idle connection; the upstream sees it end.
            eventually(&format!("{protocol:?}: idle connection closed"), || {
                up.closed() == 1
            })
            .await;
            // The next request opens a new one.
            get_ok(&out).await;
            assert_eq!(up.connections(), 2, "{protocol:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn busy_connection_is_not_closed_by_the_idle_timeout() {
    bounded(async {
        let up = upstream("a").await;
        let pool = ConnectionPool {
            idle_timeout: Some(Duration::from_millis(200)),
            ..ConnectionPool::default()
        };
        let out = outbound(&up, UpstreamProtocol::Http1, pool);
        // A response body held open for longer than the idle timeout: the connection has a
        // request in flight, so it stays.
        let _resp = get_head(&out).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(up.closed(), 0, "a connection in use was closed");
        assert_eq!(up.connections(), 1);
    })
    .await;
}
