//! The ADS client's connection and config state as metrics: connected state, updates
//! accepted/rejected per type, the last ACKed version per type. One test in this binary: it
//! installs the process-wide metrics recorder.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, CLUSTER, version_hash};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

/// Reads metrics from the Prometheus exposition text (the same text 15090 serves).
struct Seen {
    handle: PrometheusHandle,
}

impl Seen {
    fn value(&mut self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.handle.render();
        text.lines().find_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let (series, v) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let mut have: Vec<(String, String)> = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            have.sort();
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            want.sort();
            (have == want).then(|| v.parse().ok()).flatten()
        })
    }
}

async fn eventually(s: &mut Seen, what: &str, f: impl Fn(&mut Seen) -> bool) {
    let r = timeout(WAIT, async {
        while !f(s) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "timed out waiting for metric: {what}");
}

#[tokio::test]
async fn ads_metrics_connected_state_updates_and_acked_versions() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder already installed");
    let mut snap = Seen { handle };

    let svc = ServiceSpec::new("frontend", "default", "10.96.0.11".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new(
            "127.0.0.1:9091".parse::<SocketAddr>().unwrap(),
        ));
    let cp = ControlPlane::builder()
        .model(MeshModel::default().service(svc))
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let cell = SnapshotCell::new();
    let config = AdsConfig {
        address: cp.control_plane_address(None),
        node: NodeIdentity::new("c-1", "default", "127.0.0.1".parse().unwrap(), "c"),
        token_path: None,
        delta: true,
        headers: Vec::new(),
        initial_fetch_timeout: AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
    };
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    timeout(WAIT, cell.synced()).await.expect("never synced");

    eventually(&mut snap, "connected", |s| {
        s.value("envoy_control_plane_connected_state", &[]) == Some(1.0)
    })
    .await;
    for t in ["cds", "eds", "lds", "rds"] {
        let accepted = snap.value(
            "mesh_xds_updates_total",
            &[("type", t), ("result", "accepted")],
        );
        assert!(accepted.is_some_and(|v| v >= 1.0), "{t}: {accepted:?}");
    }
    let acked = cell.load().xds_versions[CLUSTER].clone();
    assert_eq!(
        snap.value("mesh_xds_acked_version", &[("type", "cds")]),
        Some(version_hash(&acked))
    );

    // A rejected CDS update counts as rejected and leaves the ACKed version alone.
    let bad = envoy_types::pb::envoy::config::cluster::v3::Cluster {
        name: "outbound|80||frontend.default.svc.cluster.local".into(),
        lb_policy: 99,
        ..Default::default()
    };
    cp.push_raw(
        CLUSTER,
        vec![(bad.name.clone(), mesh_xds::translate::to_any(&bad))],
    );
    timeout(WAIT, async {
        loop {
            if let Ok(XdsEvent::Nack { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await
    .expect("no NACK");
    eventually(&mut snap, "cds rejected", |s| {
        s.value(
            "mesh_xds_updates_total",
            &[("type", "cds"), ("result", "rejected")],
        )
        .is_some_and(|v| v >= 1.0)
    })
    .await;
    assert_eq!(
        snap.value("mesh_xds_acked_version", &[("type", "cds")]),
        Some(version_hash(&acked))
    );

    // The control plane goes away: disconnected.
    drop(cp);
    eventually(&mut snap, "disconnected", |s| {
        s.value("envoy_control_plane_connected_state", &[]) == Some(0.0)
    })
    .await;
    task.abort();
}
