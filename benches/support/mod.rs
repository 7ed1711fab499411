//! What the process-level benches share: reading a process's CPU and RSS from `/proc`,
//! medians, environment knobs, free loopback ports, and the testkit control plane with its CA.
//! Each bench includes this module with `#[path]`; not every bench uses every item.

#![allow(dead_code)]

use std::process::Command;

use mesh::parts::xds::testkit::ControlPlane;
use mesh::parts::xds::testkit::ca::TestCa;

/// The value of `k`, or a panic naming it (child roles get their settings this way).
pub fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

/// `k` parsed, or `default` when unset or unreadable.
pub fn env_or<T: std::str::FromStr>(k: &str, default: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU of `pid`, in clock ticks (`/proc/<pid>/stat` utime + stime).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state(0) … utime(11) stime(12).
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Resident memory of `pid` in KiB (`VmRSS`), 0 when the process is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A KiB field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`: private memory, `RssFile`: mapped
/// files such as the binary's text, shareable between processes), 0 when absent.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when unknown).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The median of `v` ignoring NaNs; NaN when nothing is left.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A free port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The testkit CA (trust domain `cluster.local`) and a control plane serving ADS and the CA.
pub async fn control_plane() -> (TestCa, ControlPlane) {
    let ca = TestCa::new("cluster.local");
    let cp = ControlPlane::builder()
        .ca(ca.clone())
        .start()
        .await
        .expect("control plane");
    (ca, cp)
}

/// The benches' application: answers every request `200 hello` (`text/plain`), behind mesh
/// (`mesh::Body`) or served plain (hyper's `Incoming`).
pub async fn hello<B>(
    _req: http::Request<B>,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
        b"hello",
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}

/// A meshed server process: binds 127.0.0.1:`port` first (so callers' connects queue while mesh
/// starts), starts `builder` with STRICT mTLS and serves [`hello`] until the mesh stops.
pub async fn serve_meshed_hello(builder: mesh::MeshBuilder, port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let mesh = builder
        .inbound_mode(mesh::InboundTlsMode::Strict)
        .start()
        .await
        .expect("mesh");
    mesh.serve_on(listener, tower::service_fn(hello))
        .await
        .expect("serve");
}

/// Serves `svc` over plain HTTP/1.1 or h2 on `listener` (the bare upstream app).
pub async fn serve_plain<S>(listener: tokio::net::TcpListener, svc: S)
where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

/// The benches' workload `<role>-0` in namespace `default` on 127.0.0.1, service account `role`.
pub fn node(role: &str) -> mesh::NodeIdentity {
    mesh::NodeIdentity::new(
        &format!("{role}-0"),
        "default",
        "127.0.0.1".parse().expect("ip"),
        role,
    )
}

/// A mesh for workload `<role>-0` (service account `role`) as the process-level benches
/// configure their meshed processes: the testkit control plane and CA at `cp`, the token file,
/// readiness on `ready_port` (none: no status listener), everything on 127.0.0.1.
pub fn mesh_builder(
    role: &str,
    cp: &str,
    token: &str,
    ready_port: Option<u16>,
) -> mesh::MeshBuilder {
    mesh::Mesh::builder(node(role))
        .discovery_address(cp.to_string(), false, None)
        .ca_address(cp.to_string(), false, None)
        .token_path(token)
        .bind_address("127.0.0.1".parse().expect("ip"))
        .status_ports(None, ready_port, None)
}

/// [`mesh_builder`] from the environment the sidecar_tax harness passes its roles:
/// `MESH_BENCH_CP`, `MESH_BENCH_TOKEN`, `MESH_BENCH_READY_PORT`.
pub fn mesh_for(role: &str) -> mesh::MeshBuilder {
    mesh_builder(
        role,
        &env("MESH_BENCH_CP"),
        &env("MESH_BENCH_TOKEN"),
        Some(env("MESH_BENCH_READY_PORT").parse().expect("port")),
    )
}

/// The server-side roles of the process-level benches, on `127.0.0.1:$MESH_BENCH_PORT`:
/// `upstream` (the bare app, plain hyper) and `mesh-server` (the same app behind mesh, STRICT
/// mTLS).
pub async fn run_app_role(role: &str) {
    let port: u16 = env("MESH_BENCH_PORT").parse().expect("port");
    match role {
        "upstream" => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind");
            serve_plain(listener, hyper::service::service_fn(hello)).await
        }
        "mesh-server" => serve_meshed_hello(mesh_for("upstream"), port).await,
        other => panic!("unknown role {other}"),
    }
}
