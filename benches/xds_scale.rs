//! xDS at scale, mesh against a real Envoy 1.40 in one run (issue 3 item 9, issue 7).
//!
//! The testkit control plane (in this process, one per client so their events never mix)
//! pushes N services (N = 100, 1 000, 10 000 by default; each its own port, so one listener
//! `0.0.0.0_<port>`, one route configuration, one EDS cluster with mTLS transport socket
//! matches, one ClusterLoadAssignment of 3 endpoints, as the testkit model renders istiod's
//! output) over delta ADS to
//!
//! * **mesh**: this binary re-executed in its `mesh` role, a `mesh::Mesh` pointed at the
//!   control plane with the testkit CA as its certificate source (token file), one tokio
//!   worker;
//! * **envoy**: Envoy 1.40 (`scripts/install-envoy.sh`), `--concurrency 1`, bootstrapped with
//!   `ads_config` (DELTA_GRPC) to the same kind of control plane; its SDS secrets come over
//!   ADS too.
//!
//! Each cell starts a fresh client on a baseline configuration (no services), reads its VmRSS,
//! pushes the N services and measures the time until every pushed Cluster,
//! ClusterLoadAssignment, Listener and RouteConfiguration was ACKed (testkit `XdsEvent::Sent` /
//! `Ack` by nonce), the client's CPU over that time, and its VmRSS after a settle. Repetitions
//! are interleaved (mesh/envoy order alternates), medians are printed with the mesh/Envoy ratios.
//! Route lookup at 10 vs 10 000 virtual hosts (one shared port) is timed in-process on the
//! snapshot mesh builds from the same renderer.
//!
//! `cargo bench --features mesh/testkit --bench xds_scale` (env: `NS` default
//! "100 1000 10000", `REPS` default 3, `TARGETS` default "mesh envoy", `SETTLE_MS` default
//! 1000). Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke test: N = 100
//! once, mesh only, asserting the ACKs and the snapshot's N clusters.
//! If Envoy is not installed the run says why and measures mesh only.

#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use support::{clk_tck, cpu_ticks, env, median, mesh_builder, rss_kib};

#[path = "../tests/support/envoy.rs"]
mod envoy;
#[path = "../mesh-xds/benches/support/scale.rs"]
mod scale;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mesh::parts::xds::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{ControlPlane, ResourceSet, XdsEvent};
use scale::Shape;

const ROLE_ENV: &str = "MESH_XDS_SCALE_ROLE";
const PUSH_TIMEOUT: Duration = Duration::from_secs(300);
const START_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// the meshed process
// ---------------------------------------------------------------------------------------

/// Starts mesh against the control plane, says `READY`, then one `SNAPSHOT version clusters
/// listeners routes endpoint_sets` line per publication.
async fn run_mesh() {
    let mesh = mesh_builder("scale", &env("XS_CP"), &env("XS_TOKEN"), None)
        .start()
        .await
        .expect("mesh start");
    tokio::time::timeout(START_TIMEOUT, mesh.ready())
        .await
        .expect("mesh ready");
    let cell = mesh.snapshot_cell().clone();
    let mut rx = cell.subscribe();
    let report = |tag: &str| {
        let s = cell.load();
        println!(
            "{tag} {} {} {} {} {}",
            s.version,
            s.clusters.len(),
            s.listeners.len(),
            s.route_configs.len(),
            s.endpoints.len()
        );
    };
    report("READY");
    // With XS_WRAP (profiling), exit cleanly once this many clusters are published, so the
    // profiler writes its report.
    let exit_at: Option<usize> = std::env::var("XS_EXIT_AT")
        .ok()
        .and_then(|v| v.parse().ok());
    while rx.changed().await.is_ok() {
        report("SNAPSHOT");
        if exit_at.is_some_and(|n| cell.load().clusters.len() >= n) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            std::process::exit(0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// measurement helpers
// ---------------------------------------------------------------------------------------

/// Names per type the client must ACK after the push: what differs from the baseline.
fn required(baseline: &ResourceSet, pushed: &ResourceSet) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        let before = baseline.get(t);
        let names: BTreeSet<String> = pushed
            .get(t)
            .map(|m| {
                m.iter()
                    .filter(|(n, a)| before.and_then(|b| b.get(*n)) != Some(*a))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        out.insert(t.to_owned(), names);
    }
    out
}

/// Waits until every required name was carried by a response the client ACKed; a NACK fails.
/// Returns how many requests the client sent and responses the control plane sent meanwhile.
async fn wait_acked(
    events: &mut tokio::sync::broadcast::Receiver<XdsEvent>,
    mut need: BTreeMap<String, BTreeSet<String>>,
) -> Result<(usize, usize), String> {
    let (mut requests, mut responses) = (0, 0);
    let deadline = tokio::time::Instant::now() + PUSH_TIMEOUT;
    let mut sent: HashMap<String, (String, Vec<String>)> = HashMap::new();
    while need.values().any(|s| !s.is_empty()) {
        let ev = match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                let left: Vec<String> = need
                    .iter()
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(t, s)| format!("{t}: {} left", s.len()))
                    .collect();
                return Err(format!("no ACK within {PUSH_TIMEOUT:?} ({left:?})"));
            }
            Ok(Err(e)) => return Err(format!("control plane events: {e}")),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            XdsEvent::Sent {
                type_url,
                nonce,
                names,
            } => {
                responses += 1;
                if need.contains_key(&type_url) {
                    sent.insert(nonce, (type_url, names));
                }
            }
            XdsEvent::Request { .. } => requests += 1,
            XdsEvent::Ack { nonce, .. } => {
                if let Some((t, names)) = sent.remove(&nonce)
                    && let Some(set) = need.get_mut(&t)
                {
                    for n in names {
                        set.remove(&n);
                    }
                }
            }
            XdsEvent::Nack {
                type_url, message, ..
            } => return Err(format!("NACK of {type_url}: {message}")),
            _ => {}
        }
    }
    Ok((requests, responses))
}

// ---------------------------------------------------------------------------------------
// clients
// ---------------------------------------------------------------------------------------

enum Client {
    Mesh {
        child: Child,
        lines: mpsc::Receiver<String>,
    },
    Envoy(envoy::EnvoyProcess),
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Client::Mesh { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Client {
    fn pid(&self) -> u32 {
        match self {
            Client::Mesh { child, .. } => child.id(),
            Client::Envoy(e) => e.pid(),
        }
    }

    fn start_mesh(cp: &ControlPlane, token: &std::path::Path) -> Client {
        let exe = std::env::current_exe().expect("current exe");
        // `XS_WRAP="valgrind --tool=massif --massif-out-file=/tmp/m.out"` profiles the
        // meshed process (its RSS and timings are then valgrind's, not mesh's).
        let wrap: Vec<String> = std::env::var("XS_WRAP")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        let mut cmd = match wrap.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd
            .env(ROLE_ENV, "mesh")
            .env("XS_CP", cp.addr().to_string())
            .env("XS_TOKEN", token)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mesh role");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let client = Client::Mesh { child, lines };
        client.wait_line("READY", |_| true, START_TIMEOUT);
        client
    }

    fn start_envoy(bin: &std::path::Path, cp: &ControlPlane) -> Client {
        // An Istio sidecar's bootstrap, with Istio's default stats inclusion list
        // (pilot/pkg/bootstrap): per-cluster and per-listener stats are not kept, as in a
        // real sidecar.
        let mut bootstrap = envoy::AdsBootstrap::sidecar("envoy-0", "default", cp.addr()).to_json();
        bootstrap["stats_config"] = envoy::istio_golden_stats_config();
        Client::Envoy(envoy::EnvoyProcess::start_with(bin, &bootstrap.to_string()))
    }

    /// The next line starting with `tag` that satisfies `ok` (earlier lines are dropped).
    fn wait_line(&self, tag: &str, ok: impl Fn(&[u64]) -> bool, within: Duration) -> Vec<u64> {
        let Client::Mesh { lines, .. } = self else {
            return Vec::new();
        };
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("mesh printed no {tag} line within {within:?}: {e}"));
            if let Some(rest) = line.strip_prefix(tag) {
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if ok(&v) {
                    return v;
                }
            }
        }
    }

    /// Envoy: waits until nothing warms and `clusters` clusters are active (bounded).
    fn wait_envoy_warm(&self, clusters: u64) -> bool {
        let Client::Envoy(e) = self else { return true };
        let end = Instant::now() + PUSH_TIMEOUT;
        while Instant::now() < end {
            let active = e.stat("cluster_manager.active_clusters").unwrap_or(0);
            let wc = e.stat("cluster_manager.warming_clusters").unwrap_or(1);
            let wl = e
                .stat("listener_manager.total_listeners_warming")
                .unwrap_or(1);
            if active >= clusters && wc == 0 && wl == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

// ---------------------------------------------------------------------------------------
// orchestrator
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    ack_s: f64,
    warm_s: f64,
    cpu_s: f64,
    /// CPU of this process (the control plane) over the push.
    cp_cpu_s: f64,
    requests: usize,
    responses: usize,
    rss0_kib: u64,
    rss1_kib: u64,
}

struct Ctx {
    ca: TestCa,
    token: std::path::PathBuf,
    baseline_mesh: ResourceSet,
    baseline_envoy: ResourceSet,
    secrets: (String, String, String),
    settle: Duration,
    hz: f64,
}

async fn measure(
    ctx: &Ctx,
    target: &str,
    envoy_bin: Option<&std::path::Path>,
    pushed: &ResourceSet,
    n: usize,
) -> Cell {
    let baseline = if target == "envoy" {
        &ctx.baseline_envoy
    } else {
        &ctx.baseline_mesh
    };
    let cp = ControlPlane::builder()
        .ca(ctx.ca.clone())
        .resources(baseline.clone())
        .start()
        .await
        .expect("control plane");
    let client = tokio::task::block_in_place(|| match envoy_bin {
        Some(bin) => Client::start_envoy(bin, &cp),
        None => Client::start_mesh(&cp, &ctx.token),
    });
    let pid = client.pid();
    let clusters = (n + 2) as u64;
    tokio::time::sleep(ctx.settle).await;
    let rss0 = rss_kib(pid);
    let cpu0 = cpu_ticks(pid);
    let mut events = cp.events();
    let need = required(baseline, pushed);
    let mut set = pushed.clone();
    if target == "envoy" {
        let (c, k, r) = &ctx.secrets;
        scale::add_secrets(&mut set, c, k, r);
    }
    let cp0 = cpu_ticks(std::process::id());
    let t0 = Instant::now();
    cp.set_resources(Some(set));
    let acked = wait_acked(&mut events, need).await;
    let ack = t0.elapsed();
    let cpu1 = cpu_ticks(pid);
    let cp1 = cpu_ticks(std::process::id());
    let (requests, responses) = acked.unwrap_or_else(|e| {
        let logs = match &client {
            Client::Envoy(e) => e.logs(),
            Client::Mesh { .. } => String::new(),
        };
        panic!(
            "{target} N={n}: {e}\n{}",
            &logs[logs.len().saturating_sub(4000)..]
        );
    });
    let warm_ok = tokio::task::block_in_place(|| match &client {
        Client::Envoy(_) => client.wait_envoy_warm(clusters),
        Client::Mesh { .. } => {
            // mesh publishes before it ACKs: the snapshot is already there.
            client.wait_line(
                "SNAPSHOT",
                |v| v.get(1) == Some(&clusters),
                Duration::from_secs(10),
            );
            true
        }
    });
    assert!(
        warm_ok,
        "{target} N={n}: configuration never finished warming"
    );
    let warm = t0.elapsed();
    tokio::time::sleep(ctx.settle).await;
    let rss1 = rss_kib(pid);
    drop(client);
    Cell {
        ack_s: ack.as_secs_f64(),
        warm_s: warm.as_secs_f64(),
        cpu_s: (cpu1 - cpu0) as f64 / ctx.hz,
        cp_cpu_s: (cp1 - cp0) as f64 / ctx.hz,
        requests,
        responses,
        rss0_kib: rss0,
        rss1_kib: rss1,
    }
}

/// Mean ns per `route_outbound` over `hosts`, repeated for about `budget`.
fn lookup_ns(
    snap: &mesh::parts::core::snapshot::Snapshot,
    hosts: &[String],
    budget: Duration,
) -> f64 {
    let headers = http::HeaderMap::new();
    let mut calls = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < budget {
        for h in hosts {
            let d = snap.route_outbound(h, 80, "/", &headers);
            std::hint::black_box(&d);
            calls += 1;
        }
    }
    t0.elapsed().as_nanos() as f64 / calls as f64
}

fn route_lookup_report() {
    println!(
        "\n== route lookup (in-process, Snapshot::route_outbound, one port with N virtual hosts) =="
    );
    let mut res = Vec::new();
    for n in [10usize, 10_000] {
        let set = scale::resources(n, Shape::SharedPort);
        let snap = scale::build_snapshot(&set, 1).expect("translate");
        // The same 10 services are looked up in both sizes.
        let hosts: Vec<String> = (0..10)
            .map(|i| format!("{}:80", scale::service_host(i * n / 10)))
            .collect();
        let ns = median(
            (0..3)
                .map(|_| lookup_ns(&snap, &hosts, Duration::from_millis(300)))
                .collect(),
        );
        println!("{n:>6} vhosts: {ns:>7.1} ns per lookup");
        res.push(ns);
    }
    println!("ratio 10000/10: {:.2}x (target <= 1.2x)", res[1] / res[0]);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    if std::env::var(ROLE_ENV).is_ok() {
        return rt.block_on(run_mesh());
    }
    let full = std::env::args().any(|a| a == "--bench");
    rt.block_on(orchestrate(full));
}

async fn orchestrate(full: bool) {
    let ns: Vec<usize> = if full {
        std::env::var("NS")
            .unwrap_or_else(|_| "100 1000 10000".into())
            .split_whitespace()
            .map(|v| v.parse().expect("NS"))
            .collect()
    } else {
        vec![100]
    };
    let reps: usize = if full {
        std::env::var("REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
    } else {
        1
    };
    let settle = Duration::from_millis(
        std::env::var("SETTLE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if full { 1000 } else { 100 }),
    );
    let mut targets: Vec<String> = if full {
        std::env::var("TARGETS")
            .unwrap_or_else(|_| "mesh envoy".into())
            .split_whitespace()
            .map(String::from)
            .collect()
    } else {
        println!(
            "xds_scale smoke (no --bench): N=100 once, mesh only; run `cargo bench --features mesh/testkit --bench xds_scale` for the figures"
        );
        vec!["mesh".into()]
    };
    let envoy_bin = if targets.iter().any(|t| t == "envoy") {
        let bin = envoy::envoy_binary();
        if bin.is_none() {
            println!(
                "Envoy 1.40 is not installed (scripts/install-envoy.sh, or ENVOY_BIN): measuring mesh only"
            );
            targets.retain(|t| t != "envoy");
        }
        bin
    } else {
        None
    };

    let work = std::env::temp_dir().join(format!("mesh-xds-scale-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let ca = TestCa::new("cluster.local");
    let token = work.join("scale.token");
    std::fs::write(&token, ca.token_for("default", "scale")).expect("token");
    let issued = ca.issue(
        &mesh::SpiffeId::new("cluster.local", "default", "envoy"),
        Duration::from_secs(86400),
    );
    let baseline_mesh = scale::resources(0, Shape::PortPerService);
    let mut baseline_envoy = baseline_mesh.clone();
    let secrets = (
        issued.chain_pem.clone(),
        issued.key_pem.clone(),
        ca.root_pem(),
    );
    scale::add_secrets(&mut baseline_envoy, &secrets.0, &secrets.1, &secrets.2);
    let ctx = Ctx {
        ca,
        token,
        baseline_mesh,
        baseline_envoy,
        secrets,
        settle,
        hz: clk_tck(),
    };
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "xds_scale: N {ns:?}, {reps} reps, targets {targets:?}, settle {settle:?}; load before: {}",
        load_before.trim()
    );

    let mut results: BTreeMap<(usize, String), Vec<Cell>> = BTreeMap::new();
    let mut wire: BTreeMap<usize, usize> = BTreeMap::new();
    for &n in &ns {
        let pushed = scale::resources(n, Shape::PortPerService);
        wire.insert(n, scale::wire_bytes(&pushed));
        for rep in 0..reps {
            for k in 0..targets.len() {
                let t = &targets[(k + rep) % targets.len()];
                let bin = if t == "envoy" {
                    envoy_bin.as_deref()
                } else {
                    None
                };
                let c = measure(&ctx, t, bin, &pushed, n).await;
                eprintln!(
                    "N={n:<6} {t:<6} rep{rep}: ACK {:>7.3}s warm {:>7.3}s cpu {:>6.2}s (control plane {:.2}s; {} requests, {} responses) RSS {:>7.1} -> {:>7.1} MiB",
                    c.ack_s,
                    c.warm_s,
                    c.cpu_s,
                    c.cp_cpu_s,
                    c.requests,
                    c.responses,
                    c.rss0_kib as f64 / 1024.0,
                    c.rss1_kib as f64 / 1024.0
                );
                results.entry((n, t.clone())).or_default().push(c);
            }
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let med = |n: usize, t: &str, f: &dyn Fn(&Cell) -> f64| {
        median(
            results
                .get(&(n, t.to_owned()))
                .map(|v| v.iter().map(f).collect())
                .unwrap_or_default(),
        )
    };
    let delta_kib = |c: &Cell| c.rss1_kib as f64 - c.rss0_kib as f64;
    println!(
        "\n== medians of {reps} (push -> ACK of every pushed CDS/EDS/LDS/RDS resource; RSS = VmRSS) =="
    );
    println!(
        "{:>6} {:<6} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>12} {:>9}",
        "N",
        "client",
        "ACK s",
        "warm s",
        "CPU s",
        "RSS0 MiB",
        "RSS1 MiB",
        "+MiB",
        "MiB/1000svc",
        "KiB/svc"
    );
    for &n in &ns {
        println!(
            "{n:>6} (wire: {:.2} MiB of resources)",
            wire[&n] as f64 / 1048576.0
        );
        for t in &targets {
            let d = med(n, t, &delta_kib);
            println!(
                "{:>6} {:<6} {:>9.3} {:>9.3} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>12.2} {:>9.2}",
                n,
                t,
                med(n, t, &|c| c.ack_s),
                med(n, t, &|c| c.warm_s),
                med(n, t, &|c| c.cpu_s),
                med(n, t, &|c| c.rss0_kib as f64) / 1024.0,
                med(n, t, &|c| c.rss1_kib as f64) / 1024.0,
                d / 1024.0,
                d / 1024.0 / n as f64 * 1000.0,
                d / n as f64
            );
        }
    }
    if targets.len() == 2 {
        println!(
            "\n== mesh / Envoy (ratios of medians; target at N=10000: <= 0.25 for time and memory) =="
        );
        println!(
            "{:>6} {:>9} {:>9} {:>9} {:>9}",
            "N", "ACK", "warm", "CPU", "+RSS"
        );
        for &n in &ns {
            let r = |f: &dyn Fn(&Cell) -> f64| med(n, "mesh", f) / med(n, "envoy", f);
            println!(
                "{:>6} {:>8.3}x {:>8.3}x {:>8.3}x {:>8.3}x",
                n,
                r(&|c| c.ack_s),
                r(&|c| c.warm_s),
                r(&|c| c.cpu_s),
                r(&delta_kib)
            );
        }
    }
    if let Some(&n) = ns.iter().max() {
        let per_k = med(n, "mesh", &delta_kib) / n as f64 * 1000.0;
        println!(
            "mesh config memory at N={n}: {per_k:.0} KiB per 1000 services ({:.2} KiB per service); issue 7 target <= 15 KiB per 1000 services",
            per_k / 1000.0
        );
    }
    println!(
        "load average before: {} after: {}",
        load_before.trim(),
        load_after.trim()
    );
    if full {
        route_lookup_report();
    } else {
        let c = &results[&(100, "mesh".to_owned())][0];
        assert!(c.ack_s > 0.0, "the push was ACKed");
        println!(
            "smoke ok: 100 services ACKed and published (102 clusters) in {:.3}s",
            c.ack_s
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}
