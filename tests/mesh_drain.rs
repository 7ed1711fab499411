//! Whole-library graceful drain, as pilot-agent does it on SIGTERM: readiness turns 503 at
//! once, a request in flight completes, and afterwards the app port accepts no new
//! connections.

mod support;

use std::time::Duration;

use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::MeshModel;
use support::mesh::{Echo, Plane, WAIT, eventually, field, http_get, node, ready, status_get};
use tokio::net::TcpStream;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_fails_readiness_finishes_in_flight_requests_then_stops_accepting() {
    let plane = Plane::start(MeshModel::default()).await;
    let mesh = plane
        .builder(node("ratings-0", "ratings"))
        .termination_drain(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    ready(&mesh).await;
    let app = Echo::new("ratings");
    let (addr, serving) = app.serve_meshed(&mesh).await;
    assert_eq!(
        status_get(&mesh, StatusPort::Readiness, "/healthz/ready")
            .await
            .0,
        200
    );
    // PERMISSIVE (the model's default): plaintext is served.
    let (status, body) = http_get(addr, "ratings", "/before").await.unwrap();
    assert_eq!((status, field(&body, "path")), (200, "/before"));

    // A slow request, in flight when the drain starts and still running after it ends.
    let slow = tokio::spawn(http_get(addr, "ratings", "/slow?ms=1500"));
    eventually("the slow request to reach the app", || async {
        (app.hits() == 2).then_some(())
    })
    .await;

    let draining = {
        let m = mesh.clone();
        tokio::spawn(async move { m.drain().await })
    };
    eventually("readiness to fail", || async {
        (!mesh.is_ready()).then_some(())
    })
    .await;
    for port in [StatusPort::Agent, StatusPort::Readiness] {
        let (status, _) = status_get(&mesh, port, "/healthz/ready").await;
        assert_eq!(status, 503, "{port:?} while draining");
    }

    timeout(WAIT, draining).await.expect("drain ends").unwrap();
    let (status, body) = timeout(WAIT, slow)
        .await
        .expect("bounded")
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&body, "path"), "/slow");

    // Serving has ended and the port is closed.
    timeout(WAIT, serving)
        .await
        .expect("serve_on returns after the drain")
        .unwrap()
        .expect("serve_on ends cleanly");
    let again = TcpStream::connect(addr).await;
    assert!(
        again.is_err(),
        "the app port still accepts connections after the drain"
    );
    assert_eq!(app.hits(), 2);
}
