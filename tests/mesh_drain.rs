//! Whole-library graceful drain, as pilot-agent does it (FACTS.md g): on SIGTERM or a loopback
//! `POST /drain` readiness turns 503 at once, the app port keeps accepting for
//! `terminationDrainDuration` (or, with `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, until the last
//! inbound connection closes), requests in flight complete, then serving ends.
//! `/quitquitquit` skips the drain period (Istio 1.26+). The SIGTERM cases run the meshed app
//! as a child process (this test binary re-run on [`drain_child`]) and signal it with `kill`.

use crate::support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::MeshModel;
use support::mesh::{Echo, Plane, WAIT, eventually, field, http_get, node, ready, status_get};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
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

/// `/quitquitquit` as pilot-agent handles it since Istio 1.26 (istio/istio#55424): readiness
/// fails and serving stops at once, without waiting out `terminationDrainDuration` (an hour
/// here); a request already in flight still completes, and the port then refuses connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_fails_readiness_and_stops_without_the_drain_period() {
    let (_plane, mesh, app, addr, serving) =
        draining_workload("details", Duration::from_secs(3600)).await;
    let slow = slow_request(&app, addr, "details").await;

    let agent = mesh.status_addr(StatusPort::Agent).unwrap();
    assert_eq!(post(agent, "/quitquitquit").await, (200, "OK".to_owned()));
    assert!(
        !mesh.is_ready(),
        "readiness still passes after /quitquitquit"
    );
    // 15021 has stopped with everything else, or (if it has not closed yet) answers 503.
    let readiness = mesh.status_addr(StatusPort::Readiness).unwrap();
    if let Ok((status, _)) = http_get(readiness, "localhost", "/healthz/ready").await {
        assert_eq!(status, 503);
    }

    completes(slow).await;
    stops_serving(serving, addr).await;
    assert_eq!(app.hits(), 1);
}

/// A loopback `POST /drain` (the native sidecar's preStop hook) runs the drain sequence:
/// 15021 answers 503 at once, a request already in flight completes with 200, a connection
/// made during the drain window is still served, and serving ends after the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_keeps_serving_through_the_drain_window_then_stops() {
    let (_plane, mesh, app, addr, serving) =
        draining_workload("productpage", Duration::from_secs(8)).await;
    let slow = slow_request(&app, addr, "productpage").await;

    let agent = mesh.status_addr(StatusPort::Agent).unwrap();
    assert_eq!(post(agent, "/drain").await, (200, "OK".to_owned()));
    assert_eq!(
        status_get(&mesh, StatusPort::Readiness, "/healthz/ready")
            .await
            .0,
        503
    );

    served_during_drain(addr, "productpage").await;
    completes(slow).await;
    assert!(
        !serving.is_finished(),
        "serving ended inside the drain window"
    );
    stops_serving(serving, addr).await;
    assert_eq!(app.hits(), 2);
}

/// SIGTERM to a meshed process: 15021 answers 503 at once, the request in flight when the
/// signal came completes, a connection made during `terminationDrainDuration` is served, and
/// the process exits cleanly once serving has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_meshed_process_then_it_exits() {
    let mut child = ChildMesh::spawn("period").await;
    assert_eq!(child.readiness().await, 200);
    let slow = tokio::spawn(http_get(child.app, "child", "/slow?ms=1500"));
    child.line("request /slow").await;

    child.kill_term();
    child.wait_not_ready().await;
    served_during_drain(child.app, "child").await;
    completes(slow).await;

    child.exits_cleanly("after the drain").await;
    assert!(TcpStream::connect(child.app).await.is_err());
}

/// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`: after SIGTERM the drain outlasts
/// `MINIMUM_DRAIN_DURATION` while a connection is open, and ends as soon as that last
/// connection closes — an hour before `terminationDrainDuration` would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_zero_active_connections_ends_the_drain_when_the_last_connection_closes() {
    let mut child = ChildMesh::spawn("exit-on-zero").await;
    let mut conn = TcpStream::connect(child.app).await.unwrap();
    conn.write_all(b"GET /one HTTP/1.1\r\nhost: child\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut conn).await;
    assert!(first.starts_with("http/1.1 200"), "{first}");

    child.kill_term();
    child.wait_not_ready().await;
    // Well past MINIMUM_DRAIN_DURATION (200ms) and the 1s check: the open connection holds
    // the drain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.process.try_wait().unwrap().is_none(),
        "exited with a connection still open"
    );

    // Still served on that connection; the server then closes it (connection: close).
    conn.write_all(b"GET /two HTTP/1.1\r\nhost: child\r\n\r\n")
        .await
        .unwrap();
    let second = read_response(&mut conn).await;
    assert!(second.starts_with("http/1.1 200"), "{second}");
    assert!(second.contains("connection: close"), "{second}");
    drop(conn);

    child.exits_cleanly("once no connection is open").await;
}

/// Marks the lines [`drain_child`] prints, and names the variable that turns it on.
const CHILD: &str = "MESH_DRAIN_CHILD";

/// The meshed process of the SIGTERM tests: does nothing unless [`CHILD`] is set (to `period`:
/// a 10s `terminationDrainDuration`; to `exit-on-zero`: an hour, with
/// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` and a 200ms `MINIMUM_DRAIN_DURATION`). Serves [`Echo`]
/// behind mesh with signal handling on, printing its addresses, each request's path as it
/// arrives, and `served` once serving has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the SIGTERM tests"]
async fn drain_child() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let plane = Plane::start(MeshModel::default()).await;
    let builder = plane.builder(node("child-0", "child")).handle_signals(true);
    let builder = match mode.as_str() {
        "exit-on-zero" => builder
            .termination_drain(Duration::from_secs(3600))
            .drain_on_zero_active_connections(true, Duration::from_millis(200)),
        _ => builder.termination_drain(Duration::from_secs(10)),
    };
    let mesh = builder.start().await.unwrap();
    ready(&mesh).await;
    let echo = Echo::new("child");
    let app = tower::service_fn(move |req: http::Request<mesh::Body>| {
        println!("{CHILD} request {}", req.uri().path());
        let mut svc = echo.service();
        tower::Service::call(&mut svc, req)
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!(
        "{CHILD} app={} ready={}",
        listener.local_addr().unwrap(),
        mesh.status_addr(StatusPort::Readiness).unwrap()
    );
    mesh.serve_on(listener, app).await.unwrap();
    println!("{CHILD} served");
}

/// [`drain_child`] running in a child process.
struct ChildMesh {
    process: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    app: SocketAddr,
    ready_addr: SocketAddr,
}

impl ChildMesh {
    /// Starts [`drain_child`] in `mode` and waits until it serves.
    async fn spawn(mode: &str) -> ChildMesh {
        let mut process = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "mesh_drain::drain_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD, mode)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the child test process");
        let stdout = process.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(ours) = line.strip_prefix(CHILD) {
                    let _ = tx.send(ours.trim().to_owned());
                }
            }
        });
        let mut child = ChildMesh {
            process,
            lines,
            app: ([127, 0, 0, 1], 0).into(),
            ready_addr: ([127, 0, 0, 1], 0).into(),
        };
        let started = child.line("app=").await;
        let addr = |key: &str| -> SocketAddr {
            started
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {started:?}"))
        };
        child.app = addr("app=");
        child.ready_addr = addr("ready=");
        child
    }

    /// Waits (bounded) for the child's next line starting with `prefix`, skipping others.
    async fn line(&mut self, prefix: &str) -> String {
        timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                if line.starts_with(prefix) {
                    return line;
                }
            }
            panic!("the child ended without printing {prefix:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("the child did not print {prefix:?} in time"))
    }

    /// `kill -TERM <pid>`.
    fn kill_term(&self) {
        let pid = self.process.id().expect("the child is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits (bounded) until the child's 15021 answers 503.
    async fn wait_not_ready(&self) {
        let r = self.ready_addr;
        eventually("15021 to answer 503", || async move {
            matches!(
                http_get(r, "localhost", "/healthz/ready").await,
                Ok((503, _))
            )
            .then_some(())
        })
        .await;
    }

    /// Waits (bounded) for the child to report that serving ended and to exit with success.
    async fn exits_cleanly(&mut self, when: &str) {
        self.line("served").await;
        let exit = timeout(WAIT, self.process.wait())
            .await
            .unwrap_or_else(|_| panic!("the process did not exit {when}"))
            .unwrap();
        assert!(exit.success(), "{exit}");
    }

    /// `/healthz/ready` on the child's 15021.
    async fn readiness(&self) -> u16 {
        http_get(self.ready_addr, "localhost", "/healthz/ready")
            .await
            .unwrap()
            .0
    }
}

/// Starts a `/slow` request to `addr` and waits until it has reached `app`.
async fn slow_request(
    app: &Echo,
    addr: SocketAddr,
    host: &'static str,
) -> tokio::task::JoinHandle<Result<(u16, String), String>> {
    let before = app.hits();
    let slow = tokio::spawn(http_get(addr, host, "/slow?ms=1500"));
    eventually("the slow request to reach the app", || async {
        (app.hits() > before).then_some(())
    })
    .await;
    slow
}

/// Asserts that the `/slow` request of [`slow_request`] (or the child's) completes with 200.
async fn completes(slow: tokio::task::JoinHandle<Result<(u16, String), String>>) {
    let (status, body) = timeout(WAIT, slow)
        .await
        .expect("bounded")
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!((status, field(&body, "path")), (200, "/slow"));
}

/// Asserts that a new connection to `addr` is served.
async fn served_during_drain(addr: SocketAddr, host: &str) {
    let (status, body) = http_get(addr, host, "/during").await.unwrap();
    assert_eq!(
        (status, field(&body, "path")),
        (200, "/during"),
        "a new connection during the drain window is served"
    );
}

/// Asserts that `serving` ends cleanly (bounded) and `addr` then refuses connections.
async fn stops_serving(
    serving: tokio::task::JoinHandle<Result<(), mesh::MeshError>>,
    addr: SocketAddr,
) {
    timeout(WAIT, serving)
        .await
        .expect("serve_on returns")
        .unwrap()
        .expect("serve_on ends cleanly");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "app port still open"
    );
}

/// A loopback `POST path` with an empty body: (status, body).
async fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, conn.read_to_end(&mut raw))
        .await
        .expect("bounded")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Reads one HTTP/1.1 response (headers and a content-length body) or up to EOF; lowercased.
async fn read_response(conn: &mut TcpStream) -> String {
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
