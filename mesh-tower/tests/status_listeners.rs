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
    drains: Arc<AtomicUsize>,
}

async fn start(port: StatusPort, readiness: Readiness) -> Server {
    start_with(port, StatusContext::new(readiness)).await
}

/// Serves `ctx` with counting quit and drain hooks and mesh's metrics.
async fn start_with(port: StatusPort, mut ctx: StatusContext) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let quits = Arc::new(AtomicUsize::new(0));
    let q = quits.clone();
    let on_quit: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        q.fetch_add(1, Ordering::SeqCst);
    });
    let drains = Arc::new(AtomicUsize::new(0));
    let d = drains.clone();
    ctx.metrics = mesh_tower::telemetry::prometheus_handle();
    ctx.on_quit = Some(on_quit);
    ctx.on_drain = Some(Arc::new(move || {
        d.fetch_add(1, Ordering::SeqCst);
    }));
    let task = tokio::spawn(serve_status(listener, port, Arc::new(ctx), async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task,
        quits,
        drains,
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

#[tokio::test]
async fn drain_needs_post_and_runs_the_drain_hook_once_per_call() {
    bounded(async {
        let s = start(StatusPort::Agent, ready_readiness()).await;
        for method in [Method::GET, Method::PUT] {
            let a = call(s.addr, method, "/drain").await;
            assert_eq!(a.status, 405);
            assert_eq!(a.body, "Method Not Allowed\n");
        }
        assert_eq!(s.drains.load(Ordering::SeqCst), 0);
        let a = call(s.addr, Method::POST, "/drain").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "OK");
        assert_eq!(s.drains.load(Ordering::SeqCst), 1);
        // `/drain` never quits.
        assert_eq!(s.quits.load(Ordering::SeqCst), 0);
    })
    .await;
}

/// A synced snapshot with one NDS entry and the xDS versions istiod's responses carried.
fn debug_context() -> StatusContext {
    let mut table = mesh_core::name_table::NameTable::default();
    table.table.insert(
        "reviews.default.svc.cluster.local".into(),
        mesh_core::name_table::NameInfo {
            ips: vec!["10.96.0.7".parse().unwrap()],
            registry: "Kubernetes".into(),
            shortname: "reviews".into(),
            namespace: "default".into(),
            alt_hosts: Vec::new(),
        },
    );
    let lds = "type.googleapis.com/envoy.config.listener.v3.Listener";
    let nds = "type.googleapis.com/istio.networking.nds.v1.NameTable";
    let snapshot = Snapshot::new(
        7,
        [],
        [],
        [],
        [],
        Arc::new(table),
        Default::default(),
        [
            (lds.to_owned(), "2024-01-01T00:00:00Z/3".to_owned()),
            (nds.to_owned(), "n1".to_owned()),
        ]
        .into(),
    );
    let cell = SnapshotCell::new();
    cell.publish(snapshot, true);
    let mut ctx = StatusContext::new(Readiness::new(cell.clone(), None));
    ctx.snapshot = Some(cell);
    ctx
}

#[tokio::test]
async fn debug_ndsz_serves_the_name_table_and_404s_without_one() {
    bounded(async {
        let s = start_with(StatusPort::Agent, debug_context()).await;
        let a = call(s.addr, Method::GET, "/debug/ndsz").await;
        assert_eq!(a.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"table": {"reviews.default.svc.cluster.local": {
                "ips": ["10.96.0.7"], "registry": "Kubernetes",
                "shortname": "reviews", "namespace": "default",
            }}})
        );
        // No NDS table (DNS capture off): 404 with an empty object.
        let s = start(StatusPort::Agent, ready_readiness()).await;
        let a = call(s.addr, Method::GET, "/debug/ndsz").await;
        assert_eq!(a.status, 404);
        assert_eq!(a.body, "{}");
    })
    .await;
}

#[tokio::test]
async fn debug_syncz_reports_each_xds_type() {
    bounded(async {
        let s = start_with(StatusPort::Agent, debug_context()).await;
        let a = call(s.addr, Method::GET, "/debug/syncz").await;
        assert_eq!(a.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["synced"], true);
        assert_eq!(v["snapshot_version"], 7);
        let types = v["types"].as_array().unwrap();
        let of = |suffix: &str| {
            types
                .iter()
                .find(|t| t["type_url"].as_str().unwrap().ends_with(suffix))
                .unwrap_or_else(|| panic!("{suffix} in {v}"))
                .clone()
        };
        let lds = of("listener.v3.Listener");
        assert_eq!(lds["version"], "2024-01-01T00:00:00Z/3");
        assert_eq!(lds["acked"], true);
        assert_eq!(lds["resources"], 0);
        let nds = of("nds.v1.NameTable");
        assert_eq!(
            (nds["version"].as_str(), nds["resources"].as_u64()),
            (Some("n1"), Some(1))
        );
        // A type istiod never answered: no version, not acked.
        let cds = of("cluster.v3.Cluster");
        assert_eq!(cds["acked"], false);
        assert!(cds["version"].is_null(), "{cds}");
        // Without a snapshot source: 404.
        let s = start(StatusPort::Agent, ready_readiness()).await;
        assert_eq!(call(s.addr, Method::GET, "/debug/syncz").await.status, 404);
    })
    .await;
}
