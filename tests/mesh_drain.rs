//! Whole-library graceful drain, as pilot-agent does it on SIGTERM: readiness turns 503 at
//! once, a request in flight completes, and afterwards the app port accepts no new
//! connections.

use crate::support;

use std::time::Duration;

use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::MeshModel;
use support::mesh::{Echo, Plane, WAIT, eventually, field, http_get, node, ready, status_get};
use tokio::net::TcpStream;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_fails_readiness_finishes_in_flight_requests_then_stops_accepting() {
    let (_plane, mesh, app, addr, serving) =
        draining_workload("ratings", Duration::from_millis(300)).await;
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

    let draining = start_drain(&mesh).await;
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

/// During the drain period an HTTP/1.1 keep-alive connection is still served, but each
/// response carries `connection: close` and the server then closes it, as Envoy's connection
/// manager does while draining: callers move off the workload without a request ever racing
/// the close of an idle connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_period_answers_keep_alive_requests_with_connection_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (_plane, mesh, app, addr, _serving) =
        draining_workload("reviews", Duration::from_secs(3)).await;

    // One keep-alive connection, opened before the drain.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let request = b"GET /one HTTP/1.1\r\nhost: reviews\r\n\r\n";
    conn.write_all(request).await.unwrap();
    let before = read_response(&mut conn).await;
    assert!(before.starts_with("http/1.1 200"), "{before}");
    assert!(!before.contains("connection: close"), "{before}");

    let draining = start_drain(&mesh).await;

    // Still served on the same connection during the drain period, now with a close.
    conn.write_all(b"GET /two HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await
        .unwrap();
    let during = read_response(&mut conn).await;
    assert!(during.starts_with("http/1.1 200"), "{during}");
    assert!(during.contains("connection: close"), "{during}");
    let mut rest = [0u8; 64];
    let n = timeout(WAIT, conn.read(&mut rest))
        .await
        .expect("the server closes the connection after the response")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection still open after connection: close");
    assert_eq!(app.hits(), 2);
    draining.abort();
}

/// Reads one HTTP/1.1 response (headers and a content-length body) or up to EOF; lowercased.
async fn read_response(conn: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = timeout(WAIT, conn.read(&mut chunk))
            .await
            .expect("bounded")
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).to_ascii_lowercase()
}

/// A ready meshed workload `name` (PERMISSIVE) with `drain` as its termination drain period,
/// serving an [`Echo`] app: the control plane, the mesh, the app, its address and the serving
/// task.
async fn draining_workload(
    name: &str,
    drain: Duration,
) -> (
    Plane,
    mesh::Mesh,
    Echo,
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), mesh::MeshError>>,
) {
    let plane = Plane::start(MeshModel::default()).await;
    let mesh = plane
        .builder(node(&format!("{name}-0"), name))
        .termination_drain(drain)
        .start()
        .await
        .unwrap();
    ready(&mesh).await;
    let app = Echo::new(name);
    let (addr, serving) = app.serve_meshed(&mesh).await;
    (plane, mesh, app, addr, serving)
}

/// Starts `mesh`'s drain in a task and waits until readiness has turned.
async fn start_drain(mesh: &mesh::Mesh) -> tokio::task::JoinHandle<()> {
    let draining = {
        let m = mesh.clone();
        tokio::spawn(async move { m.drain().await })
    };
    eventually("readiness to fail", || async {
        (!mesh.is_ready()).then_some(())
    })
    .await;
    draining
}
