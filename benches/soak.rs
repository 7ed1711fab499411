//! Soak under churn (issue 7, "under load, nothing is lost"). A meshed client (this process,
//! `Mesh::http_client()`, 16 callers on keep-alive connections) calls a service whose three
//! replicas are meshed server processes (`Mesh::serve_on`, STRICT Istio mTLS), while
//!
//! * the testkit control plane pushes an endpoint change every 100 ms (the EDS membership
//!   rotates: all three replicas, then two of them, in turn);
//! * every workload certificate rotates about every 5 s (secret TTL 10 s, pilot-agent's 50 %
//!   grace ratio), on the client and on every replica, through the real CA protocol;
//! * one replica is restarted at 40 % of the run as Kubernetes restarts a pod: it leaves the
//!   endpoints (not ready), gets SIGTERM and drains gracefully, starts again on the same port,
//!   and rejoins the endpoints once its readiness port answers 200.
//!
//! It reports requests, failures (by status), certificate rotations seen by the CA, pushes,
//! and the RSS of the client and of a replica that is never restarted, sampled every 2 s,
//! with the least-squares slope (KiB/min) after the first fifth of the run.
//!
//! `cargo bench --bench soak` runs 300 s (`SOAK_SECS` to change it). Under `cargo test`
//! (no `--bench`) it runs a 6-second smoke of the same scenario and fails on any failed
//! request. Everything listens on 127.0.0.1; child processes are killed when it ends.

#![allow(missing_docs)]

#[path = "support/mod.rs"]
mod support;

use support::{env, free_port, mesh_builder, rss_kib, serve_meshed_hello};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};

const ROLE_ENV: &str = "MESH_SOAK_ROLE";
const SVC_HOST: &str = "upstream.default.svc.cluster.local";
/// pilot-agent rotates at 50 % of the lifetime counted from when the certificate was fetched:
/// a 10 s TTL rotates every workload certificate about every 5 s.
const SECRET_TTL: Duration = Duration::from_secs(10);
const CONCURRENCY: usize = 16;
const CHURN_EVERY: Duration = Duration::from_millis(100);
const RSS_EVERY: Duration = Duration::from_secs(2);

fn mesh_for(role: &str, cp: &str, token: &str, ready_port: u16) -> mesh::MeshBuilder {
    mesh_builder(role, cp, token, Some(ready_port)).secret_ttl(SECRET_TTL)
}

/// A replica: a meshed server on `MESH_SOAK_PORT` until SIGTERM drains it.
async fn run_replica() {
    let builder = mesh_for(
        "upstream",
        &env("MESH_SOAK_CP"),
        &env("MESH_SOAK_TOKEN"),
        env("MESH_SOAK_READY_PORT").parse().expect("port"),
    )
    .termination_drain(Duration::from_millis(500))
    .handle_signals(true);
    serve_meshed_hello(builder, env("MESH_SOAK_PORT").parse().expect("port")).await;
}

struct Replica {
    port: u16,
    ready_port: u16,
    child: Option<Child>,
    env: Vec<(&'static str, String)>,
}

impl Replica {
    fn spawn(port: u16, env: Vec<(&'static str, String)>) -> Replica {
        let ready_port = env
            .iter()
            .find(|(k, _)| *k == "MESH_SOAK_READY_PORT")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut r = Replica {
            port,
            ready_port,
            child: None,
            env,
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.env(ROLE_ENV, "replica")
            .env("MESH_SOAK_PORT", self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.child = Some(cmd.spawn().expect("spawn replica"));
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM, then wait (bounded) for the graceful drain to finish.
    fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Least-squares slope of `(seconds, KiB)` samples, in KiB per minute.
fn slope_kib_per_min(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in samples {
        num += (x - mx) * (*y as f64 - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 {
        return f64::NAN;
    }
    num / den * 60.0
}

/// Waits (bounded, 30 s) until a replica's 15021-style port answers `/healthz/ready` with 200.
async fn wait_ready(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = c
                .write_all(
                    b"GET /healthz/ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
                )
                .await;
            let mut buf = [0u8; 16];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await
                && buf[..n].starts_with(b"HTTP/1.1 200")
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replica on ready port {port} never became ready");
}

fn model(ports: &[u16], members: &[usize]) -> MeshModel {
    let mut svc = ServiceSpec::new("upstream", "default", "10.96.0.80".parse().expect("vip"))
        .port(80, Protocol::Http)
        // A VirtualService retrying resets too: a request caught on a replica that is
        // restarting is then covered by the retry policy, and must not fail.
        .retry_on(
            "reset,connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        );
    for &i in members {
        svc = svc.endpoint(
            EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], ports[i])))
                .service_account("upstream"),
        );
    }
    MeshModel::default().service(svc)
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    by_status: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.by_status.lock() {
            *m.entry(what).or_default() += 1;
        }
    }
}

async fn orchestrate(full: bool) {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 300 } else { 6 });
    let run = Duration::from_secs(secs);
    let work = std::env::temp_dir().join(format!("mesh-soak-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");

    let (ca, cp) = support::control_plane().await;
    let cp = Arc::new(cp);
    let cp_addr = cp.addr().to_string();
    let token = |sa: &str| {
        let p = work.join(format!("{sa}.token"));
        std::fs::write(&p, ca.token_for("default", sa)).expect("token");
        p.display().to_string()
    };
    let ports = [free_port(), free_port(), free_port()];
    cp.set_model(model(&ports, &[0, 1, 2]));
    let server_token = token("upstream");
    let mut replicas: Vec<Replica> = ports
        .iter()
        .map(|&p| {
            Replica::spawn(
                p,
                vec![
                    ("MESH_SOAK_CP", cp_addr.clone()),
                    ("MESH_SOAK_TOKEN", server_token.clone()),
                    ("MESH_SOAK_READY_PORT", free_port().to_string()),
                ],
            )
        })
        .collect();

    let client = mesh_for("client", &cp_addr, &token("client"), free_port())
        .start()
        .await
        .expect("client mesh");
    tokio::time::timeout(Duration::from_secs(30), client.ready())
        .await
        .expect("client mesh ready");
    let http = client.http_client();
    let uri: http::Uri = format!("http://{SVC_HOST}:80/").parse().expect("uri");

    // Wait until every replica answers through the mesh (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen_ok = 0;
    while seen_ok < 20 {
        assert!(Instant::now() < deadline, "replicas never became reachable");
        let resp = http
            .request(
                Request::get(uri.clone())
                    .body(http_body_util::Empty::<Bytes>::new())
                    .expect("req"),
            )
            .await;
        if resp.status().is_success() {
            seen_ok += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ca_requests_before = ca.requests().len();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..CONCURRENCY {
        let http = http.clone();
        let uri = uri.clone();
        let tally = Arc::clone(&tally);
        let stop = Arc::clone(&stop);
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get(uri.clone())
                    .body(http_body_util::Empty::<Bytes>::new())
                    .expect("req");
                let call = tokio::time::timeout(Duration::from_secs(10), async {
                    let resp = http.request(req).await;
                    let status = resp.status();
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                    (status, body)
                })
                .await;
                match call {
                    Ok((s, Ok(_))) if s.is_success() => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    // Local replies carry Envoy's body text, which names the failure.
                    Ok((s, body)) => tally.fail(format!(
                        "{} {}",
                        s.as_u16(),
                        body.map(|b| String::from_utf8_lossy(&b[..b.len().min(90)]).into_owned())
                            .unwrap_or_else(|e| format!("body error: {e}"))
                    )),
                    Err(_) => tally.fail("timeout".into()),
                }
            }
        }));
    }

    // Endpoint churn every 100 ms: all three, then each pair in turn.
    // Replica 2 while it restarts: not ready, so out of the endpoints, as Kubernetes takes a
    // terminating pod out of its Service's endpoints before and while it restarts.
    let not_ready = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&stop);
        let cp = Arc::clone(&cp);
        let not_ready = Arc::clone(&not_ready);
        tokio::spawn(async move {
            let sets: [&[usize]; 4] = [&[0, 1, 2], &[0, 1], &[1, 2], &[0, 2]];
            let mut pushes = 0u64;
            let mut tick = tokio::time::interval(CHURN_EVERY);
            let churn = std::env::var("SOAK_CHURN")
                .map(|v| v != "0")
                .unwrap_or(true);
            while churn && !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let down = not_ready.load(Ordering::Relaxed);
                let members: Vec<usize> = sets[pushes as usize % sets.len()]
                    .iter()
                    .copied()
                    .filter(|&i| !(down && i == 2))
                    .collect();
                cp.set_model(model(&ports, &members));
                pushes += 1;
            }
            cp.set_model(model(&ports, &[0, 1, 2]));
            pushes
        })
    };

    // RSS samples of the client (this process) and replica 0 (never restarted).
    let mut rss: Vec<(f64, u64, u64)> = Vec::new();
    // `SOAK_RESTART=0` / `SOAK_CHURN=0` turn the restart / the endpoint churn off, to tell
    // their effects apart.
    let flag = |k: &str| std::env::var(k).map(|v| v != "0").unwrap_or(true);
    let restart_at = if flag("SOAK_RESTART") {
        run.mul_f64(0.4)
    } else {
        Duration::MAX
    };
    let mut restarted = false;
    let me = std::process::id();
    let steady = replicas[0].pid();
    while started.elapsed() < run {
        let step = RSS_EVERY.min(run.saturating_sub(started.elapsed()));
        tokio::time::sleep(step.min(Duration::from_millis(250))).await;
        let t = started.elapsed();
        if !restarted && t >= restart_at {
            restarted = true;
            not_ready.store(true, Ordering::Relaxed);
            tokio::time::sleep(CHURN_EVERY * 3).await;
            let r = &mut replicas[2];
            tokio::task::block_in_place(|| r.stop_gracefully());
            r.start();
            wait_ready(r.ready_port).await;
            not_ready.store(false, Ordering::Relaxed);
        }
        if rss
            .last()
            .is_none_or(|s| t.as_secs_f64() - s.0 >= RSS_EVERY.as_secs_f64())
        {
            rss.push((t.as_secs_f64(), rss_kib(me), rss_kib(steady)));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        let _ = tokio::time::timeout(Duration::from_secs(15), c).await;
    }
    let pushes = churn.await.unwrap_or(0);
    let elapsed = started.elapsed().as_secs_f64();
    let rotations = ca.requests().len() - ca_requests_before;

    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let skip = rss.len() / 5;
    let client_series: Vec<(f64, u64)> = rss[skip..].iter().map(|s| (s.0, s.1)).collect();
    let replica_series: Vec<(f64, u64)> = rss[skip..].iter().map(|s| (s.0, s.2)).collect();
    let first = rss.get(skip).copied().unwrap_or_default();
    let last = rss.last().copied().unwrap_or_default();
    println!(
        "soak: {secs} s, {CONCURRENCY} callers, endpoint push every {CHURN_EVERY:?}, certificates every ~5 s, one replica restarted at {restart_at:?}"
    );
    println!(
        "requests ok {ok} ({:.0}/s), failed {failed}, by status {:?}",
        ok as f64 / elapsed,
        tally
            .by_status
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    );
    println!("endpoint pushes {pushes}; certificates issued by the CA during the run {rotations}");
    println!(
        "RSS client   {:>7} KiB → {:>7} KiB, slope {:+.1} KiB/min",
        first.1,
        last.1,
        slope_kib_per_min(&client_series)
    );
    println!(
        "RSS replica0 {:>7} KiB → {:>7} KiB, slope {:+.1} KiB/min",
        first.2,
        last.2,
        slope_kib_per_min(&replica_series)
    );
    drop(replicas);
    let _ = std::fs::remove_dir_all(&work);
    assert!(ok > 0, "no request succeeded");
    assert_eq!(failed, 0, "requests failed under churn");
    assert!(
        pushes > 0 || std::env::var("SOAK_CHURN").is_ok_and(|v| v == "0"),
        "no endpoint change was pushed"
    );
    if secs >= 20 {
        assert!(rotations > 0, "no certificate rotated during the run");
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if std::env::var(ROLE_ENV).is_ok() {
            1
        } else {
            2
        })
        .enable_all()
        .build()
        .expect("runtime");
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("replica") => rt.block_on(run_replica()),
        Ok(other) => panic!("unknown role {other}"),
        Err(_) => rt.block_on(orchestrate(full)),
    }
}
