//! The ADS client against the testkit control plane over real gRPC on 127.0.0.1, delta and SotW.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderMap;
use mesh_core::snapshot::RouteDecision;
use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, CLUSTER};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use tokio::sync::broadcast;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn model() -> MeshModel {
    let backend = ServiceSpec::new("backend", "default", "10.96.0.10".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(
            EndpointSpec::new(addr("127.0.0.1:8081"))
                .label("version", "v1")
                .service_account("backend"),
        )
        .endpoint(
            EndpointSpec::new(addr("127.0.0.1:8082"))
                .label("version", "v2")
                .service_account("backend"),
        )
        .subset("v1", "version", "v1")
        .subset("v2", "version", "v2")
        .weighted(80, &[("v1", 90), ("v2", 10)]);
    let frontend = ServiceSpec::new("frontend", "default", "10.96.0.11".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new(addr("127.0.0.1:9091")));
    MeshModel::default().service(backend).service(frontend)
}

fn node() -> NodeIdentity {
    NodeIdentity::new(
        "client-7f99c7d8b5-abcde",
        "default",
        "127.0.0.1".parse().unwrap(),
        "client",
    )
}

fn start_client(cp: &ControlPlane, delta: bool) -> (SnapshotCell, tokio::task::JoinHandle<()>) {
    let cell = SnapshotCell::new();
    let config = AdsConfig {
        address: cp.control_plane_address(None),
        node: node(),
        token_path: None,
        delta,
        headers: vec![("x-test".into(), "1".into())],
        initial_fetch_timeout: AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
    };
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    (cell, task)
}

async fn wait_until(cell: &SnapshotCell, what: &str, f: impl Fn(&mesh_core::Snapshot) -> bool) {
    let mut rx = cell.subscribe();
    let r = timeout(WAIT, async {
        loop {
            if f(&cell.load()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "timed out waiting for: {what}");
}

async fn next_event(
    rx: &mut broadcast::Receiver<XdsEvent>,
    f: impl Fn(&XdsEvent) -> bool,
) -> XdsEvent {
    timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) if f(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("events closed: {e}"),
            }
        }
    })
    .await
    .expect("timed out waiting for a control plane event")
}

fn forward_cluster(s: &mesh_core::Snapshot, authority: &str) -> Option<String> {
    match s.route_outbound(authority, 80, "/", &HeaderMap::new()) {
        RouteDecision::Forward { cluster, .. } => Some(cluster.name.clone()),
        RouteDecision::Respond { .. } => None,
    }
}

async fn initial_sync(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let s = cell.load();
    assert_eq!(
        forward_cluster(&s, "frontend:80").as_deref(),
        Some("outbound|80||frontend.default.svc.cluster.local")
    );
    assert_eq!(
        forward_cluster(&s, "frontend.default.svc.cluster.local").as_deref(),
        Some("outbound|80||frontend.default.svc.cluster.local")
    );
    // The 90/10 split across subsets: a random draw per request, as Envoy's (more than four
    // standard deviations of room).
    let mut v1 = 0;
    for _ in 0..1000 {
        if forward_cluster(&s, "backend:80").as_deref()
            == Some("outbound|80|v1|backend.default.svc.cluster.local")
        {
            v1 += 1;
        }
    }
    assert!((860..=940).contains(&v1), "{v1} of 1000 to v1");
    let (c, eps) = s
        .cluster("outbound|80|v2|backend.default.svc.cluster.local")
        .unwrap();
    let tls = c.istio_tls.as_ref().expect("tlsMode-istio socket");
    assert_eq!(
        tls.sni,
        "outbound_.80_.v2_.backend.default.svc.cluster.local"
    );
    assert!(tls.accepts_peer(&["spiffe://cluster.local/ns/default/sa/backend"]));
    assert!(!tls.accepts_peer(&["spiffe://cluster.local/ns/default/sa/other"]));
    let eps = eps.unwrap();
    assert_eq!(eps.endpoints.len(), 1);
    assert_eq!(eps.endpoints[0].address, addr("127.0.0.1:8082"));
    assert_eq!(
        eps.endpoints[0].tls_mode,
        mesh_core::endpoint::EndpointTlsMode::Istio
    );
    assert!(
        s.name_table
            .table
            .contains_key("backend.default.svc.cluster.local")
    );
    assert_eq!(
        s.inbound.as_ref().unwrap().default_mode,
        mesh_core::listener::InboundTlsMode::Permissive
    );
    // Unknown host → allow_any → PassthroughCluster.
    assert_eq!(
        forward_cluster(&s, "example.com").as_deref(),
        Some("PassthroughCluster")
    );
    // The stream opened with our node and every type was ACKed.
    let opened = next_event(&mut events, |e| matches!(e, XdsEvent::StreamOpened { .. })).await;
    match opened {
        XdsEvent::StreamOpened {
            node_id, delta: d, ..
        } => {
            assert_eq!(node_id, node().node_id());
            assert_eq!(d, delta);
        }
        _ => unreachable!(),
    }
    task.abort();
}

#[tokio::test]
async fn ads_delta_initial_sync_routes_services() {
    initial_sync(true).await;
}

#[tokio::test]
async fn ads_sotw_initial_sync_routes_services() {
    initial_sync(false).await;
}

async fn update_and_removal(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    cp.update(|m| {
        m.services[1]
            .endpoints
            .push(EndpointSpec::new(addr("127.0.0.1:9092")))
    });
    wait_until(&cell, "new frontend endpoint", |s| {
        s.cluster("outbound|80||frontend.default.svc.cluster.local")
            .and_then(|(_, e)| e)
            .is_some_and(|e| {
                e.endpoints
                    .iter()
                    .any(|ep| ep.address == addr("127.0.0.1:9092"))
            })
    })
    .await;
    // Remove the frontend service: its cluster, endpoints and virtual host go.
    cp.update(|m| {
        m.services.remove(1);
    });
    wait_until(&cell, "frontend cluster removed", |s| {
        !s.clusters
            .contains_key("outbound|80||frontend.default.svc.cluster.local")
    })
    .await;
    let s = cell.load();
    assert!(
        !s.endpoints
            .contains_key("outbound|80||frontend.default.svc.cluster.local")
    );
    assert!(
        s.clusters
            .contains_key("outbound|80|v1|backend.default.svc.cluster.local")
    );
    assert_eq!(
        forward_cluster(&s, "frontend:80").as_deref(),
        Some("PassthroughCluster")
    );
    task.abort();
}

#[tokio::test]
async fn ads_delta_update_and_removal_reach_the_cell() {
    update_and_removal(true).await;
}

#[tokio::test]
async fn ads_sotw_update_and_removal_reach_the_cell() {
    update_and_removal(false).await;
}

async fn bad_resource_is_nacked(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let good = "outbound|80||frontend.default.svc.cluster.local";
    let before = cell.load().clusters[good].clone();
    // A cluster with garbage config replaces the good one, next to a new valid cluster change.
    let bad = envoy_types::pb::envoy::config::cluster::v3::Cluster {
        name: good.into(),
        lb_policy: 99,
        ..Default::default()
    };
    cp.push_raw(
        CLUSTER,
        vec![(good.into(), mesh_xds::translate::to_any(&bad))],
    );
    cp.update(|m| {
        m.services[0]
            .endpoints
            .push(EndpointSpec::new(addr("127.0.0.1:8083")).label("version", "v1"))
    });
    let nack = next_event(&mut events, |e| matches!(e, XdsEvent::Nack { .. })).await;
    match nack {
        XdsEvent::Nack {
            type_url, message, ..
        } => {
            assert_eq!(type_url, CLUSTER);
            assert!(message.contains(good), "{message}");
            assert!(message.contains("lb_policy"), "{message}");
        }
        _ => unreachable!(),
    }
    wait_until(&cell, "good update applied", |s| {
        s.cluster("outbound|80|v1|backend.default.svc.cluster.local")
            .and_then(|(_, e)| e)
            .is_some_and(|e| e.endpoints.len() == 2)
    })
    .await;
    // The rejected cluster keeps its last good config.
    assert_eq!(cell.load().clusters[good], before);
    task.abort();
}

#[tokio::test]
async fn ads_delta_bad_resource_is_nacked_and_old_config_serves() {
    bad_resource_is_nacked(true).await;
}

#[tokio::test]
async fn ads_sotw_bad_resource_is_nacked_and_old_config_serves() {
    bad_resource_is_nacked(false).await;
}

async fn reconnect(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    cp.cut_streams();
    next_event(&mut events, |e| matches!(e, XdsEvent::StreamClosed)).await;
    next_event(&mut events, |e| matches!(e, XdsEvent::StreamOpened { .. })).await;
    if delta {
        let sub = next_event(
            &mut events,
            |e| matches!(e, XdsEvent::Subscribed { type_url, .. } if type_url == CLUSTER),
        )
        .await;
        match sub {
            XdsEvent::Subscribed {
                initial_resource_versions,
                ..
            } => {
                assert!(
                    initial_resource_versions
                        .contains_key("outbound|80||frontend.default.svc.cluster.local"),
                    "{initial_resource_versions:?}"
                );
            }
            _ => unreachable!(),
        }
    }
    // Resumed: a change after the reconnect arrives.
    cp.update(|m| {
        m.services[1]
            .endpoints
            .push(EndpointSpec::new(addr("127.0.0.1:9093")))
    });
    wait_until(&cell, "update after reconnect", |s| {
        s.cluster("outbound|80||frontend.default.svc.cluster.local")
            .and_then(|(_, e)| e)
            .is_some_and(|e| {
                e.endpoints
                    .iter()
                    .any(|ep| ep.address == addr("127.0.0.1:9093"))
            })
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_reconnects_with_initial_resource_versions() {
    reconnect(true).await;
}

#[tokio::test]
async fn ads_sotw_reconnects_and_resumes() {
    reconnect(false).await;
}
