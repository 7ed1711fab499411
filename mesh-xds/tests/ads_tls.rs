//! The ADS client over TLS (root file + server name) with a Bearer token the control plane checks.

use std::time::Duration;

use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig};
use mesh_xds::testkit::ca::TestCa;
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use tokio::time::timeout;

#[tokio::test]
async fn ads_tls_with_root_cert_and_bearer_token() {
    let ca = TestCa::new("cluster.local");
    let svc = ServiceSpec::new("backend", "default", "10.96.0.10".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new("127.0.0.1:8081".parse().unwrap()));
    let cp = ControlPlane::builder()
        .tls(true)
        .ca(ca.clone())
        .require_token(true)
        .model(MeshModel::default().service(svc))
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let dir = std::env::temp_dir().join(format!("mesh-xds-ads-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, ca.token_for("default", "client")).unwrap();
    let cell = SnapshotCell::new();
    let config = AdsConfig {
        address: cp.control_plane_address(Some(root)),
        node: NodeIdentity::new(
            "client-1",
            "default",
            "127.0.0.1".parse().unwrap(),
            "client",
        ),
        token_path: Some(token),
        delta: true,
        headers: vec![],
        initial_fetch_timeout: AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
    };
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    timeout(Duration::from_secs(20), cell.synced())
        .await
        .expect("never synced over TLS");
    assert!(
        cell.load()
            .clusters
            .contains_key("outbound|80||backend.default.svc.cluster.local")
    );
    let opened = timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(XdsEvent::StreamOpened { authorization, .. }) = events.recv().await {
                return authorization;
            }
        }
    })
    .await
    .unwrap();
    assert!(opened.unwrap().starts_with("Bearer "));
    task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn ads_tls_without_token_never_syncs() {
    let ca = TestCa::new("cluster.local");
    let cp = ControlPlane::builder()
        .tls(true)
        .ca(ca.clone())
        .require_token(true)
        .start()
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("mesh-xds-ads-notoken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let mut events = cp.events();
    let cell = SnapshotCell::new();
    let config = AdsConfig {
        address: cp.control_plane_address(Some(root)),
        node: NodeIdentity::new(
            "client-1",
            "default",
            "127.0.0.1".parse().unwrap(),
            "client",
        ),
        token_path: None,
        delta: true,
        headers: vec![],
        initial_fetch_timeout: AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
    };
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    // Refused streams never open, so nothing is published.
    let r = timeout(Duration::from_millis(800), async {
        loop {
            if let Ok(XdsEvent::StreamOpened { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(r.is_err(), "a stream without a token must be refused");
    assert!(!cell.is_synced());
    task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
