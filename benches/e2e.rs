//! End-to-end request cost, in one run, interleaved: a bare hyper client → hyper server, the
//! same through mesh on both sides in plaintext, and through mesh with Istio mTLS.
//!
//! `cargo bench --bench e2e` (env: `DUR_SECS` per cell, default 4; `REPS`, default 3;
//! `CONCURRENCY`, default "1 16"; `VARIANTS`, default all three). Prints p50/p99 latency and throughput per variant and the
//! ratios to bare, as medians over the repetitions. Everything listens on 127.0.0.1.
//!
//! Client, server and load generator share this process (and the machine's two cores), the
//! same way for every variant; the process-separated harness against Envoy sidecars is
//! issue 7's.

#[path = "support/mod.rs"]
mod support;

use support::{env_or, hello, median};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec};
use mesh::{CertificateSource, InboundTlsMode, Mesh};
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

type Call = Box<dyn FnMut() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send>;
type CallFactory = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Call> + Send>> + Send + Sync>;

#[derive(Clone, Copy, Debug)]
struct Stats {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    errors: u64,
}

/// The upstream app: plain hyper, HTTP/1.1 + h2c, as in ../shared/bench/upstream.
async fn start_bare_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(support::serve_plain(
        listener,
        hyper::service::service_fn(hello),
    ));
    addr
}

fn bare_client(addr: SocketAddr) -> CallFactory {
    Arc::new(move || {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let uri: http::Uri = format!("http://{addr}/").parse().expect("uri");
            let call: Call = Box::new(move || {
                let req = Request::get(uri.clone())
                    .header("host", "upstream")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let fut = send.send_request(req);
                Box::pin(async move {
                    match fut.await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            resp.into_body().collect().await.is_ok() && ok
                        }
                        Err(_) => false,
                    }
                })
            });
            call
        })
    })
}

fn mesh_client(mesh: Mesh, uri: http::Uri) -> CallFactory {
    Arc::new(move || {
        let mut client = mesh.http_client();
        let uri = uri.clone();
        Box::pin(async move {
            let call: Call = Box::new(move || {
                let req = Request::get(uri.clone())
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let fut = client.call(req);
                Box::pin(async move {
                    match fut.await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            resp.into_body().collect().await.is_ok() && ok
                        }
                        Err(_) => false,
                    }
                })
            });
            call
        })
    })
}

/// Closed loop: `concurrency` callers, each sending its next request when the previous
/// answered, for `dur` after a warm-up.
async fn run_load(factory: &CallFactory, concurrency: usize, dur: Duration) -> Stats {
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut call = factory().await;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = call().await;
                let t1 = Instant::now();
                if t0 >= start {
                    if ok {
                        lat.push((t1 - t0).as_nanos() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let q = |p: f64| {
        if all.is_empty() {
            f64::NAN
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0
        }
    };
    Stats {
        p50_us: q(0.50),
        p99_us: q(0.99),
        rps: all.len() as f64 / dur.as_secs_f64(),
        errors,
    }
}

/// A meshed workload serving the hello app; returns its Mesh and the port it serves on.
async fn meshed_server(
    cp: &ControlPlane,
    ca: &TestCa,
    name: &str,
    mode: InboundTlsMode,
) -> (Mesh, SocketAddr) {
    let node = support::node(name);
    let cert = ca.workload_certificate(&node.spiffe_id(), Duration::from_secs(3600));
    let mesh = Mesh::builder(node)
        .discovery_address(cp.addr().to_string(), false, None)
        .certificate(CertificateSource::Static(Box::new(cert)))
        .status_ports(None, None, None)
        .bind_address("127.0.0.1".parse().expect("ip"))
        .inbound_mode(mode)
        .start()
        .await
        .expect("mesh starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let m = mesh.clone();
    tokio::spawn(async move {
        let _ = m.serve_on(listener, tower::service_fn(hello)).await;
    });
    (mesh, addr)
}

async fn meshed_client(cp: &ControlPlane, ca: &TestCa) -> Mesh {
    let node = support::node("client");
    let cert = ca.workload_certificate(&node.spiffe_id(), Duration::from_secs(3600));
    let mesh = Mesh::builder(node)
        .discovery_address(cp.addr().to_string(), false, None)
        .certificate(CertificateSource::Static(Box::new(cert)))
        .status_ports(None, None, None)
        .start()
        .await
        .expect("mesh starts");
    tokio::time::timeout(Duration::from_secs(20), mesh.ready())
        .await
        .expect("client mesh ready");
    mesh
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async_main());
}

async fn async_main() {
    // Under `cargo test --all-targets` (no `--bench` argument) run a short smoke pass: the
    // harness must keep working, but the measurement belongs to `cargo bench`.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let dur = if smoke {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(env_or("DUR_SECS", 4))
    };
    let reps: usize = if smoke { 1 } else { env_or("REPS", 3) };
    let concurrencies: Vec<usize> = std::env::var("CONCURRENCY")
        .unwrap_or_else(|_| "1 16".into())
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();

    let (ca, cp) = support::control_plane().await;
    let bare_addr = start_bare_server().await;
    let (_plain_srv, plain_addr) =
        meshed_server(&cp, &ca, "upstream-plain", InboundTlsMode::Permissive).await;
    let (_mtls_srv, mtls_addr) =
        meshed_server(&cp, &ca, "upstream-mtls", InboundTlsMode::Strict).await;
    cp.set_model(
        MeshModel::default()
            .service(
                ServiceSpec::new(
                    "upstream-plain",
                    "default",
                    "10.96.0.20".parse().expect("vip"),
                )
                .port(80, Protocol::Http)
                .endpoint(
                    EndpointSpec::new(plain_addr)
                        .service_account("upstream-plain")
                        .plaintext(),
                ),
            )
            .service(
                ServiceSpec::new(
                    "upstream-mtls",
                    "default",
                    "10.96.0.21".parse().expect("vip"),
                )
                .port(80, Protocol::Http)
                .endpoint(EndpointSpec::new(mtls_addr).service_account("upstream-mtls")),
            ),
    );
    let client = meshed_client(&cp, &ca).await;

    let variants: Vec<(&str, CallFactory)> = vec![
        ("bare", bare_client(bare_addr)),
        (
            "mesh-plain",
            mesh_client(
                client.clone(),
                "http://upstream-plain.default.svc.cluster.local/"
                    .parse()
                    .expect("uri"),
            ),
        ),
        (
            "mesh-mtls",
            mesh_client(
                client.clone(),
                "http://upstream-mtls.default.svc.cluster.local/"
                    .parse()
                    .expect("uri"),
            ),
        ),
    ];
    // `VARIANTS="bare mesh-mtls"` runs a subset (e.g. one variant under callgrind).
    let variants: Vec<(&str, CallFactory)> = match std::env::var("VARIANTS") {
        Ok(only) => variants
            .into_iter()
            .filter(|(name, _)| only.split_whitespace().any(|o| o == *name))
            .collect(),
        Err(_) => variants,
    };
    println!(
        "e2e: {} reps x {}s per cell, interleaved; concurrency {:?}; machine: {} cores",
        reps,
        dur.as_secs(),
        concurrencies,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for &c in &concurrencies {
        let mut results: Vec<Vec<Stats>> = vec![Vec::new(); variants.len()];
        for rep in 0..reps {
            for k in 0..variants.len() {
                let i = (k + rep) % variants.len();
                let s = run_load(&variants[i].1, c, dur).await;
                results[i].push(s);
            }
        }
        println!("\nconcurrency {c} (keep-alive, HTTP/1.1 from the load generator)");
        println!(
            "{:<12} {:>10} {:>10} {:>12} {:>8} | {:>8} {:>8} {:>8}",
            "variant", "p50 us", "p99 us", "req/s", "errors", "p50 x", "p99 x", "rps x"
        );
        let med = |r: &Vec<Stats>, f: fn(&Stats) -> f64| median(r.iter().map(f).collect());
        let base = (
            med(&results[0], |s| s.p50_us),
            med(&results[0], |s| s.p99_us),
            med(&results[0], |s| s.rps),
        );
        for (i, (name, _)) in variants.iter().enumerate() {
            let r = &results[i];
            let (p50, p99, rps) = (
                med(r, |s| s.p50_us),
                med(r, |s| s.p99_us),
                med(r, |s| s.rps),
            );
            let errors: u64 = r.iter().map(|s| s.errors).sum();
            assert!(
                !smoke || (errors == 0 && rps > 0.0),
                "{name}: {errors} errors, {rps} req/s"
            );
            println!(
                "{:<12} {:>10.1} {:>10.1} {:>12.0} {:>8} | {:>7.2}x {:>7.2}x {:>7.2}x",
                name,
                p50,
                p99,
                rps,
                errors,
                p50 / base.0,
                p99 / base.1,
                rps / base.2
            );
        }
    }
}
