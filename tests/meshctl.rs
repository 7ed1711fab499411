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
