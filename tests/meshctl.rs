//! The `meshctl` binary: `check-config` over the real dumps, `control-plane` replaying a dump
//! to mesh's own ADS client (delta and SotW) and issuing certificates from its CA.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

fn meshctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
}

fn data(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/istio")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} not present", p.display());
        None
    }
}

#[test]
fn check_config_accepts_real_dumps_and_refuses_v2() {
    for (name, accepted) in [
        ("deathstarbench-geo-istio1.18_config_dump.json", 524),
        ("istioctl-authz_configdump.yaml", 29),
        ("istioctl-endpoint_configdump.json", 37),
        ("istioctl-proxyconfig_config_dump.json", 10),
    ] {
        let Some(p) = data(name) else { return };
        let out = meshctl().arg("check-config").arg(&p).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {text}");
        assert!(
            text.contains(&format!("total: {accepted} accepted, 0 rejected")),
            "{name}: {text}"
        );
    }
    let Some(p) = data("deathstarbench-geo-istio1.18_config_dump.json") else {
        return;
    };
    let out = meshctl()
        .args(["check-config", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["types"]["Listener"]["accepted"], 144);
    assert_eq!(v["types"]["Cluster"]["accepted"], 143);
    assert_eq!(v["rejected"], 0);
    assert!(
        v["types"]["Listener"]["ignored_extensions"]["type.googleapis.com/stats.PluginConfig"]
            .as_u64()
            .unwrap()
            > 0
    );

    let Some(p) = data("legacy-istio1.4_productpage-v1-c7765c886-v99jb.json") else {
        return;
    };
    let out = meshctl().arg("check-config").arg(&p).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("legacy xDS v2 resource envoy.api.v2.Listener"),
        "{text}"
    );
    assert!(text.contains("total: 0 accepted, 31 rejected"), "{text}");
}

#[test]
fn check_config_usage_and_load_errors_exit_2() {
    let out = meshctl().arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = meshctl()
        .args(["check-config", "/nonexistent/dump.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dump.json"));
    let out = meshctl().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Kills the control plane when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_control_plane(dump: &PathBuf, dir: &std::path::Path) -> (Running, String) {
    let mut child = meshctl()
        .args(["control-plane", "--listen", "127.0.0.1:0", "--config-dump"])
        .arg(dump)
        .arg("--root-cert-out")
        .arg(dir.join("root.pem"))
        .arg("--token-out")
        .arg(dir.join("token"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (running, addr)
}

async fn replay(addr: &str, delta: bool) -> std::sync::Arc<mesh_core::Snapshot> {
    let cell = SnapshotCell::new();
    let config = AdsConfig {
        address: mesh_core::config::ControlPlaneAddress {
            address: addr.to_owned(),
            tls: false,
            root_cert: None,
            server_name: None,
        },
        node: NodeIdentity::new(
            "geo-5c54dcd5bd-z5ghf",
            "hr2",
            "127.0.0.1".parse().unwrap(),
            "default",
        ),
        token_path: None,
        delta,
        headers: Vec::new(),
        initial_fetch_timeout: AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
    };
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    let mut rx = cell.subscribe();
    timeout(WAIT, async {
        while !cell.is_synced() {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("mesh never synced from the replayed dump");
    task.abort();
    cell.load()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_replays_a_dump_over_delta_and_sotw_with_a_ca() {
    let Some(p) = data("deathstarbench-geo-istio1.18_config_dump.json") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("meshctl-cp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_cp, addr) = start_control_plane(&p, &dir);
    for delta in [true, false] {
        let s = replay(&addr, delta).await;
        assert_eq!(s.clusters.len(), 138, "delta={delta}");
        assert_eq!(s.listeners.len(), 141, "delta={delta}");
        assert_eq!(s.route_configs.len(), 90, "delta={delta}");
        // Every EDS cluster's endpoints arrived (synced means so); the rate service resolves.
        let (c, eps) = s
            .cluster("outbound|8084||rate.hr2.svc.cluster.local")
            .expect("rate cluster");
        assert!(c.istio_tls.is_some());
        assert!(eps.is_some_and(|e| !e.endpoints.is_empty()));
    }
    // The CA on the same port issues a certificate for the token meshctl wrote.
    let root = dir.join("root.pem");
    let token = dir.join("token");
    assert!(
        std::fs::read_to_string(&root)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let ca = mesh_xds::ca::CaClient::connect(
        &mesh_core::config::ControlPlaneAddress {
            address: addr.clone(),
            tls: false,
            root_cert: None,
            server_name: None,
        },
        Some(token),
        "Kubernetes".into(),
        Vec::new(),
    )
    .await
    .unwrap();
    let id: mesh_core::SpiffeId = "spiffe://cluster.local/ns/hr2/sa/default".parse().unwrap();
    let csr = mesh_xds::ca::csr::generate_csr(&id).unwrap();
    let chain = timeout(
        WAIT,
        ca.create_certificate(&csr.csr_pem, Duration::from_secs(3600)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(chain.len() >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `meshctl control-plane --bind-loopback --strip-istio-proxy-extensions` replaying the
/// DeathStarBench dump to a real Envoy 1.40 (an upstream build: istio-proxy's own extensions
/// dropped), over delta and over SotW ADS, with `sds-grpc` pointed at meshctl too. Envoy holds
/// every cluster (active: EDS and SDS arrived), every route configuration and every listener
/// but `virtualInbound`, which it refuses for the reason the dump's own Envoy recorded (a Lua
/// filter without source code); meshctl saw ACKs for CDS, EDS, RDS and SDS and no other NACK.
#[test]
fn control_plane_replays_a_dump_to_a_real_envoy_over_delta_and_sotw() {
    use std::collections::BTreeSet;
    use std::sync::mpsc;

    use crate::support::envoy::{AdsBootstrap, EnvoyProcess, config_dump_names, envoy_binary};
    use mesh_xds::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
    use mesh_xds::dump::{ConfigDump, SECRET};

    let Some(p) = data("deathstarbench-geo-istio1.18_config_dump.json") else {
        return;
    };
    let Some(bin) = envoy_binary() else { return };
    let set = ConfigDump::load(&p).unwrap().xds_resources();
    let names = |t: &str| -> BTreeSet<String> {
        set.get(t)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let (clusters, routes) = (names(CLUSTER), names(ROUTE));
    let mut listeners = names(LISTENER);
    assert!(listeners.remove("virtualInbound"));
    assert_eq!(
        (clusters.len(), routes.len(), listeners.len()),
        (138, 90, 140)
    );

    let mut child = meshctl()
        .args([
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--bind-loopback",
            "--strip-istio-proxy-extensions",
            "--config-dump",
        ])
        .arg(&p)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _cp = Running(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(WAIT).expect("meshctl printed nothing");
    let addr: std::net::SocketAddr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .unwrap();

    for delta in [true, false] {
        while rx.try_recv().is_ok() {}
        let envoy = EnvoyProcess::start_with(
            &bin,
            &AdsBootstrap::sidecar("geo-5c54dcd5bd-z5ghf", "hr2", addr)
                .delta(delta)
                .to_yaml(),
        );
        let held = |e: &EnvoyProcess| {
            let d = e.config_dump(false);
            let set = |s, l, f| -> BTreeSet<String> {
                config_dump_names(&d, s, l, f).into_iter().collect()
            };
            (
                set("ClustersConfigDump", "dynamic_active_clusters", "cluster"),
                set("RoutesConfigDump", "dynamic_route_configs", "route_config"),
                set("ListenersConfigDump", "dynamic_listeners", "active_state"),
                d,
            )
        };
        let complete = envoy.wait_until(Duration::from_secs(90), |e| {
            let (c, r, _, _) = held(e);
            c.is_superset(&clusters) && r == routes
        });
        let (c, r, _, d) = held(&envoy);
        assert!(
            complete,
            "delta={delta}: Envoy never held the dump: clusters missing {:?}, routes missing {:?}\n{}",
            clusters.difference(&c).take(5).collect::<Vec<_>>(),
            routes.difference(&r).take(5).collect::<Vec<_>>(),
            envoy
                .logs()
                .lines()
                .filter(|l| !l.contains("Deprecated"))
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        // Listeners: every one but virtualInbound active (the name of an active listener is in
        // its `active_state.listener`).
        let active: BTreeSet<String> = d["configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["@type"]
                    .as_str()
                    .unwrap()
                    .ends_with(".ListenersConfigDump")
            })
            .flat_map(|s| {
                s["dynamic_listeners"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|l| {
                l["active_state"]["listener"]["name"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(active, listeners, "delta={delta}: active listeners");
        let refused = d.to_string();
        assert!(
            refused.contains("LuaValidationError.DefaultSourceCode"),
            "delta={delta}: virtualInbound's error_state names the Lua filter"
        );
        // Binding listeners are on loopback only.
        let vo = envoy
            .listener_address("virtualOutbound")
            .expect("virtualOutbound bound");
        assert!(vo.ip().is_loopback() && vo.port() != 0, "{vo}");

        // What meshctl saw: ACKs of every type, the only NACK the dump's own one.
        let (mut acked, mut nacks) = (BTreeSet::new(), Vec::new());
        let want: BTreeSet<&str> = [CLUSTER, ENDPOINT, ROUTE, SECRET].into();
        let deadline = std::time::Instant::now() + WAIT;
        while !want.iter().all(|t| acked.contains(*t)) && std::time::Instant::now() < deadline {
            let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if let Some(rest) = line.strip_prefix("ack ") {
                acked.insert(rest.split(' ').next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("nack ") {
                nacks.push(rest.to_owned());
            }
        }
        while let Ok(line) = rx.try_recv() {
            if let Some(rest) = line.strip_prefix("nack ") {
                nacks.push(rest.to_owned());
            }
        }
        for t in &want {
            assert!(
                acked.contains(*t),
                "delta={delta}: no ACK of {t} (acked {acked:?}, nacks {nacks:?})"
            );
        }
        assert!(
            !nacks.is_empty()
                && nacks.iter().all(|n| n.starts_with(LISTENER)
                    && n.contains("virtualInbound")
                    && n.contains("LuaValidationError")),
            "delta={delta}: unexpected NACKs {nacks:?}"
        );
    }
}

fn route_lines(args: &[&str]) -> Vec<serde_json::Value> {
    let out = meshctl().arg("route").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "meshctl route {args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn hand_made_dump() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/meshctl/routes_config_dump.json")
        .display()
        .to_string()
}

#[test]
fn route_explains_every_action_of_a_hand_made_rds_dump() {
    let dump = hand_made_dump();
    let dir = std::env::temp_dir().join(format!("meshctl-route-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let requests = dir.join("requests.jsonl");
    std::fs::write(
        &requests,
        [
            r#"{"authority":"shop.default.svc.cluster.local:8080","path":"/api/items?x=1","method":"POST","headers":[]}"#,
            r#"{"authority":"shop","path":"/old/page?q=2"}"#,
            r#"{"authority":"shop","path":"/blocked"}"#,
            r#"{"authority":"shop","path":"/split/a"}"#,
            r#"{"authority":"shop","path":"/anything","headers":[["x-canary","yes"]]}"#,
            r#"{"authority":"elsewhere.example","path":"/"}"#,
            r#"{"authority":"shop","path":"/nothing-matches"}"#,
            r#"{"authority":"shop","path":"/ghost"}"#,
            r#"{"authority":"shop","path":"/auto/x"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let lines = route_lines(&[
        "--config-dump",
        &dump,
        "--route-config",
        "8080",
        "--requests",
        requests.to_str().unwrap(),
    ]);
    assert_eq!(lines.len(), 9);
    let vh = "shop.default.svc.cluster.local:8080";

    // Cluster with prefix and host rewrites, timeout and retry policy.
    let api = &lines[0];
    assert_eq!(api["route_config"], "8080");
    assert_eq!(api["virtual_host"], vh);
    assert_eq!(api["route"], "api");
    assert_eq!(api["action"], "cluster");
    assert_eq!(
        api["cluster"],
        "outbound|8080||shop.default.svc.cluster.local"
    );
    assert_eq!(api["upstream_path"], "/v2/items?x=1");
    assert_eq!(api["upstream_authority"], "backend.internal");
    assert_eq!(api["timeout_ms"], 2500);
    assert_eq!(api["idle_timeout_ms"], 30_000);
    assert_eq!(api["retry"]["num_retries"], 3);
    assert_eq!(api["retry"]["per_try_timeout_ms"], 1000);
    assert_eq!(
        api["retry"]["retry_on"],
        serde_json::json!(["5xx", "connect-failure"])
    );
    assert!(api["status"].is_null());

    // Redirect: 302 with the prefix rewritten and the query kept.
    let old = &lines[1];
    assert_eq!(old["action"], "redirect");
    assert_eq!(old["route"], "old");
    assert_eq!(old["status"], 302);
    assert_eq!(old["location"], "http://new.example.com/new/page?q=2");
    assert!(old["cluster"].is_null());

    // Direct response.
    let blocked = &lines[2];
    assert_eq!(blocked["action"], "direct_response");
    assert_eq!(blocked["status"], 403);
    assert_eq!(blocked["body"], "nope");

    // Weighted clusters: the configured split.
    let split = &lines[3];
    assert_eq!(split["action"], "weighted_clusters");
    assert_eq!(
        split["weighted_clusters"],
        serde_json::json!([
            {"name": "outbound|8080|v1|shop.default.svc.cluster.local", "weight": 90},
            {"name": "outbound|8080|v2|shop.default.svc.cluster.local", "weight": 10},
        ])
    );
    assert_eq!(split["upstream_path"], "/split/a");
    assert_eq!(split["upstream_authority"], "shop");

    // A header matcher picks the canary route first; "0s" is no timeout.
    let canary = &lines[4];
    assert_eq!(canary["route"], "canary");
    assert_eq!(
        canary["cluster"],
        "outbound|8080|v2|shop.default.svc.cluster.local"
    );
    assert!(canary["timeout_ms"].is_null());
    assert!(canary["idle_timeout_ms"].is_null());

    // No virtual host, and a virtual host without a matching route: 404 NR.
    for l in &lines[5..7] {
        assert_eq!(l["action"], "no_route", "{l}");
        assert_eq!(l["status"], 404, "{l}");
        assert_eq!(l["response_flag"], "NR", "{l}");
        assert!(l["cluster"].is_null(), "{l}");
    }
    assert!(lines[5]["virtual_host"].is_null());

    // A route to a cluster the dump does not have: 503 NC, as the request path answers.
    let ghost = &lines[7];
    assert_eq!(ghost["action"], "cluster");
    assert_eq!(
        ghost["cluster"],
        "outbound|8080||ghost.default.svc.cluster.local"
    );
    assert_eq!(ghost["status"], 503);
    assert_eq!(ghost["response_flag"], "NC");

    // auto_host_rewrite: the Host depends on the endpoint chosen, and the dump has none.
    let auto = &lines[8];
    assert_eq!(auto["route"], "auto");
    assert!(auto["upstream_authority"].is_null(), "{auto}");
    let note = auto["upstream_authority_note"].as_str().unwrap();
    assert!(
        note.contains("auto_host_rewrite") && note.contains("no endpoints known"),
        "{note}"
    );

    // The single-request form gives the same answer as the file form.
    let single = route_lines(&[
        "--config-dump",
        &dump,
        "--route-config",
        "8080",
        "--authority",
        "shop",
        "--path",
        "/anything",
        "--method",
        "PUT",
        "--header",
        "X-Canary: yes",
    ]);
    assert_eq!(single.len(), 1);
    assert_eq!(single[0]["route"], "canary");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn route_explains_requests_against_a_real_istiod_dump() {
    let Some(p) = data("deathstarbench-geo-istio1.18_config_dump.json") else {
        return;
    };
    let dump = p.display().to_string();
    let lines = route_lines(&[
        "--config-dump",
        &dump,
        "--route-config",
        "9090",
        "--authority",
        "kiali.istio-system.svc.cluster.local:9090",
        "--path",
        "/kiali/api",
    ]);
    let l = &lines[0];
    assert_eq!(
        l["virtual_host"],
        "kiali.istio-system.svc.cluster.local:9090"
    );
    assert_eq!(l["route"], "default");
    assert_eq!(l["action"], "cluster");
    assert_eq!(
        l["cluster"],
        "outbound|9090||kiali.istio-system.svc.cluster.local"
    );
    // istiod's defaults: no route timeout, its default retry policy.
    assert!(l["timeout_ms"].is_null());
    assert_eq!(l["retry"]["num_retries"], 2);
    assert_eq!(
        l["retry"]["retriable_status_codes"],
        serde_json::json!([503])
    );
    assert_eq!(l["upstream_path"], "/kiali/api");

    // An authority istiod does not know on 15010 goes to allow_any's PassthroughCluster.
    let lines = route_lines(&[
        "--config-dump",
        &dump,
        "--route-config",
        "15010",
        "--authority",
        "unknown.example.com:15010",
        "--path",
        "/",
    ]);
    assert_eq!(lines[0]["virtual_host"], "allow_any");
    assert_eq!(lines[0]["cluster"], "PassthroughCluster");
}

#[test]
fn route_usage_errors_exit_2() {
    let dump = hand_made_dump();
    for args in [
        vec!["route", "--config-dump", dump.as_str()],
        vec!["route", "--config-dump", &dump, "--route-config", "8080"],
        vec![
            "route",
            "--config-dump",
            &dump,
            "--route-config",
            "no-such-config",
            "--authority",
            "shop",
        ],
        vec![
            "route",
            "--config-dump",
            &dump,
            "--route-config",
            "8080",
            "--authority",
            "shop",
            "--header",
            "no-colon",
        ],
    ] {
        let out = meshctl().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}
