//! The pod-facing status listeners over real sockets: 15020 (pilot-agent), 15021 (Envoy
//! readiness) and 15090 (Envoy Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_core::readiness::Readiness;
use mesh_core::{Snapshot, SnapshotCell};
use mesh_tower::status::{PROMETHEUS_CONTENT_TYPE, StatusContext, StatusPort, serve_status};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    quits: Arc<AtomicUsize>,
}

async fn start(port: StatusPort, readiness: Readiness) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let quits = Arc::new(AtomicUsize::new(0));
    let q = quits.clone();
    let on_quit: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        q.fetch_add(1, Ordering::SeqCst);
    });
    let mut ctx = StatusContext::new(readiness);
    ctx.metrics = mesh_tower::telemetry::prometheus_handle();
    ctx.on_quit = Some(on_quit);
    let task = tokio::spawn(serve_status(listener, port, Arc::new(ctx), async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
        quits,
    }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn call(addr: SocketAddr, method: Method, path: &str) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn ready_readiness() -> Readiness {
    let cell = SnapshotCell::new();
    cell.publish(Snapshot::default(), true);
    Readiness::new(cell, None)
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn agent_readiness_follows_config_and_draining() {
    bounded(async {
        let cell = SnapshotCell::new();
        let readiness = Readiness::new(cell.clone(), None);
        let s = start(StatusPort::Agent, readiness.clone()).await;
        let a = call(s.addr, Method::GET, "/healthz/ready").await;
        assert_eq!(a.status, 503);
        assert!(a.body.is_empty());
        cell.publish(Snapshot::default(), true);
        let a = call(s.addr, Method::GET, "/healthz/ready").await;
        assert_eq!(a.status, 200);
        assert!(a.body.is_empty());
        readiness.start_draining();
        assert_eq!(
            call(s.addr, Method::GET, "/healthz/ready").await.status,
            503
        );
    })
    .await;
}

#[tokio::test]
async fn agent_serves_prometheus_text_on_both_paths() {
    bounded(async {
        let s = start(StatusPort::Agent, ready_readiness()).await;
        metrics::counter!("mesh_status_test_total").increment(7);
        for path in ["/stats/prometheus", "/metrics"] {
            let a = call(s.addr, Method::GET, path).await;
            assert_eq!(a.status, 200, "{path}");
            assert_eq!(a.headers["content-type"], PROMETHEUS_CONTENT_TYPE);
            let text = String::from_utf8(a.body.to_vec()).unwrap();
            assert!(text.contains("mesh_status_test_total 7"), "{text}");
        }
        assert_eq!(
            call(s.addr, Method::POST, "/stats/prometheus").await.status,
            405
        );
    })
    .await;
}

#[tokio::test]
async fn quitquitquit_needs_post_from_loopback() {
    bounded(async {
        let s = start(StatusPort::Agent, ready_readiness()).await;
        let a = call(s.addr, Method::GET, "/quitquitquit").await;
        assert_eq!(a.status, 405);
        assert_eq!(a.body, "Method Not Allowed\n");
        assert_eq!(s.quits.load(Ordering::SeqCst), 0);
        let a = call(s.addr, Method::POST, "/quitquitquit").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "OK");
        assert_eq!(s.quits.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn agent_unknown_paths_are_go_404s() {
    bounded(async {
        let s = start(StatusPort::Agent, ready_readiness()).await;
        for path in ["/", "/healthz/ready/x", "/stats", "/drain/now"] {
            let a = call(s.addr, Method::GET, path).await;
            assert_eq!(a.status, 404, "{path}");
            assert_eq!(a.body, "404 page not found\n");
        }
    })
    .await;
}

#[tokio::test]
async fn readiness_port_only_serves_healthz_ready() {
    bounded(async {
        let cell = SnapshotCell::new();
        let s = start(StatusPort::Readiness, Readiness::new(cell.clone(), None)).await;
        assert_eq!(
            call(s.addr, Method::GET, "/healthz/ready").await.status,
            503
        );
        cell.publish(Snapshot::default(), true);
        for path in [
            "/healthz/ready",
            "/healthz/ready/anything",
            "/healthz/ready?x=1",
        ] {
            let a = call(s.addr, Method::GET, path).await;
            assert_eq!(a.status, 200, "{path}");
            assert!(a.body.is_empty());
        }
        for path in ["/stats/prometheus", "/quitquitquit", "/"] {
            let a = call(s.addr, Method::GET, path).await;
            assert_eq!(a.status, 404, "{path}");
            assert!(a.body.is_empty(), "Envoy's 404 has no body");
        }
        assert_eq!(
            call(s.addr, Method::POST, "/quitquitquit").await.status,
            404
        );
        assert_eq!(s.quits.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn prometheus_port_only_serves_stats_prometheus() {
    bounded(async {
        let s = start(StatusPort::Prometheus, ready_readiness()).await;
        metrics::counter!("envoy_mesh_status_prom_port_total").increment(3);
        metrics::counter!("app_only_on_15020_total").increment(1);
        let a = call(s.addr, Method::GET, "/stats/prometheus?usedonly").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["content-type"], PROMETHEUS_CONTENT_TYPE);
        let body = String::from_utf8_lossy(&a.body);
        assert!(
            body.contains("envoy_mesh_status_prom_port_total 3"),
            "{body}"
        );
        assert!(body.contains("envoy_server_live 1"), "{body}");
        // Envoy's port shows the proxy's families only, not the application's.
        assert!(!body.contains("app_only_on_15020_total"), "{body}");
        for path in ["/metrics", "/healthz/ready", "/"] {
            let a = call(s.addr, Method::GET, path).await;
            assert_eq!(a.status, 404, "{path}");
            assert!(a.body.is_empty());
        }
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_the_listener() {
    bounded(async {
        let mut s = start(StatusPort::Agent, ready_readiness()).await;
        assert_eq!(
            call(s.addr, Method::GET, "/healthz/ready").await.status,
            200
        );
        s.stop.take().unwrap().send(()).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), &mut s.task).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "serve_status returned {r:?}");
        assert!(TcpStream::connect(s.addr).await.is_err(), "listener closed");
    })
    .await;
}
