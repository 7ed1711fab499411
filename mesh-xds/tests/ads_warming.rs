//! Warming as Envoy does it, against the testkit control plane over real gRPC (delta and
//! SotW): a new or changed cluster is used only once its `ClusterLoadAssignment` arrives, a
//! listener only once its `RouteConfiguration` arrives, the previous version serves meanwhile,
//! and `initial_fetch_timeout` lets a resource whose dependency never comes be used without it.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener as PbListener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use http::HeaderMap;
use mesh_core::listener::{ListenerKind, OutboundProtocol};
use mesh_core::snapshot::RouteDecision;
use mesh_core::{NodeIdentity, Snapshot, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, CLUSTER, ENDPOINT, LISTENER, ROUTE};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use mesh_xds::translate::{from_any, to_any};
use tokio::sync::{broadcast, oneshot};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);
const BACKEND: &str = "outbound|80||backend.default.svc.cluster.local";
const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn model() -> MeshModel {
    let backend = ServiceSpec::new("backend", "default", "10.96.0.10".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new(addr("127.0.0.1:8081")));
    MeshModel::default().service(backend)
}

fn reviews() -> ServiceSpec {
    ServiceSpec::new("reviews", "default", "10.96.0.20".parse().unwrap())
        .port(9080, Protocol::Http)
        .endpoint(EndpointSpec::new(addr("127.0.0.1:9081")))
}

fn start_client(
    cp: &ControlPlane,
    delta: bool,
    initial_fetch_timeout: Duration,
) -> (SnapshotCell, tokio::task::JoinHandle<()>) {
    let cell = SnapshotCell::new();
    let mut config = AdsConfig::new(
        cp.control_plane_address(None),
        NodeIdentity::new(
            "client-7f99c7d8b5-abcde",
            "default",
            "127.0.0.1".parse().unwrap(),
            "client",
        ),
    );
    config.delta = delta;
    config.initial_fetch_timeout = initial_fetch_timeout;
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    (cell, task)
}

/// A control plane serving [`model`] and a client (Envoy's default `initial_fetch_timeout`)
/// that has synced with it.
async fn synced_client(delta: bool) -> (ControlPlane, SnapshotCell, tokio::task::JoinHandle<()>) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta, AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    (cp, cell, task)
}

async fn wait_until(cell: &SnapshotCell, what: &str, f: impl Fn(&Snapshot) -> bool) {
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

async fn next_event<T>(
    rx: &mut broadcast::Receiver<XdsEvent>,
    what: &str,
    f: impl Fn(&XdsEvent) -> Option<T>,
) -> T {
    timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if let Some(t) = f(&e) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("events closed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn nonce_number(n: &str) -> u64 {
    n.trim_start_matches('n').parse().unwrap_or(0)
}

/// Waits until the client has ACKed a response of `type_url` carrying `name`: by then that
/// response is applied and its snapshot published (the client publishes before it ACKs).
async fn acked_carrying(rx: &mut broadcast::Receiver<XdsEvent>, type_url: &str, name: &str) {
    let sent = next_event(
        rx,
        &format!("a {type_url} response with {name}"),
        |e| match e {
            XdsEvent::Sent {
                type_url: t,
                nonce,
                names,
            } if t == type_url && names.iter().any(|n| n == name) => Some(nonce_number(nonce)),
            _ => None,
        },
    )
    .await;
    next_event(rx, &format!("the ACK of {type_url} {name}"), |e| match e {
        XdsEvent::Request {
            type_url: t,
            response_nonce,
            nack: false,
        } if t == type_url && nonce_number(response_nonce) >= sent => Some(()),
        _ => None,
    })
    .await;
}

/// Checks `invariant` on every snapshot the cell announces until stopped; returns the
/// violations seen.
fn watch_invariant(
    cell: &SnapshotCell,
    invariant: impl Fn(&Snapshot) -> Option<String> + Send + 'static,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Vec<String>>) {
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let cell = cell.clone();
    let mut rx = cell.subscribe();
    let task = tokio::spawn(async move {
        let mut bad = Vec::new();
        loop {
            if let Some(v) = invariant(&cell.load()) {
                bad.push(v);
            }
            tokio::select! {
                c = rx.changed() => if c.is_err() { break },
                _ = &mut stop_rx => break,
            }
        }
        // The last state too.
        if let Some(v) = invariant(&cell.load()) {
            bad.push(v);
        }
        bad
    });
    (stop_tx, task)
}

async fn stop_watch(w: (oneshot::Sender<()>, tokio::task::JoinHandle<Vec<String>>), what: &str) {
    let _ = w.0.send(());
    let bad = timeout(WAIT, w.1).await.unwrap().unwrap();
    assert!(bad.is_empty(), "{what}: {bad:?}");
}

fn endpoints_of(s: &Snapshot, cluster: &str) -> Option<Vec<SocketAddr>> {
    s.cluster(cluster)
        .and_then(|(_, e)| e)
        .map(|e| e.endpoints.iter().map(|ep| ep.address).collect())
}

/// A cluster in the snapshot must have its endpoints.
fn cluster_has_endpoints(name: &'static str) -> impl Fn(&Snapshot) -> Option<String> {
    move |s| match s.cluster(name) {
        Some((_, None)) => Some(format!(
            "snapshot {} shows {name} without endpoints",
            s.version
        )),
        _ => None,
    }
}

/// Every HTTP listener's route configuration must be in the snapshot.
fn listeners_have_routes(s: &Snapshot) -> Option<String> {
    s.listeners.values().find_map(|l| match &l.kind {
        ListenerKind::Outbound(OutboundProtocol::Http { route_config })
            if !s.route_configs.contains_key(route_config) =>
        {
            Some(format!(
                "snapshot {} has listener {} without route configuration {route_config}",
                s.version, l.name
            ))
        }
        _ => None,
    })
}

fn route_to(s: &Snapshot, authority: &str, port: u16) -> RouteDecision {
    s.route_outbound(authority, port, "/", &HeaderMap::new())
}

// ------------------------------------------------------------------------- defaults

#[test]
fn initial_fetch_timeout_defaults_to_envoys_15s() {
    assert_eq!(
        AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
        Duration::from_secs(15)
    );
    let c = AdsConfig::new(
        mesh_core::config::ControlPlaneAddress {
            address: "127.0.0.1:15010".into(),
            tls: false,
            root_cert: None,
            server_name: None,
        },
        NodeIdentity::new("a-1", "default", "127.0.0.1".parse().unwrap(), "a"),
    );
    assert_eq!(c.initial_fetch_timeout, Duration::from_secs(15));
    assert!(c.delta, "istiod's default transport is delta");
}

// ------------------------------------------------------------------------- clusters

async fn new_cluster_waits_for_its_endpoints(delta: bool) {
    let (cp, cell, task) = synced_client(delta).await;
    let watch = watch_invariant(&cell, cluster_has_endpoints(REVIEWS));
    let mut events = cp.events();
    cp.hold_back(ENDPOINT, REVIEWS);
    cp.update(|m| m.services.push(reviews()));
    acked_carrying(&mut events, CLUSTER, REVIEWS).await;
    // Its route configuration and listener may arrive; the cluster itself must not be used.
    acked_carrying(&mut events, ROUTE, "9080").await;
    let s = cell.load();
    assert!(
        s.cluster(REVIEWS).is_none(),
        "a cluster was published before its endpoints"
    );
    assert_eq!(
        endpoints_of(&s, BACKEND),
        Some(vec![addr("127.0.0.1:8081")])
    );
    assert!(cell.is_synced());
    cp.release_held();
    wait_until(&cell, "the warmed cluster", |s| {
        endpoints_of(s, REVIEWS) == Some(vec![addr("127.0.0.1:9081")])
    })
    .await;
    stop_watch(watch, "new cluster").await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_new_cluster_waits_for_its_endpoints() {
    new_cluster_waits_for_its_endpoints(true).await;
}

#[tokio::test]
async fn ads_sotw_new_cluster_waits_for_its_endpoints() {
    new_cluster_waits_for_its_endpoints(false).await;
}

/// The backend cluster, now reading its endpoints from another EDS `service_name`.
fn backend_with_service_name(cp: &ControlPlane, service_name: &str) -> PbCluster {
    let set = cp.resources_for("default");
    let mut c: PbCluster = from_any(&set[CLUSTER][BACKEND]).unwrap();
    c.eds_cluster_config
        .as_mut()
        .expect("testkit clusters are EDS")
        .service_name = service_name.into();
    c
}

fn cla(name: &str, a: &str) -> ClusterLoadAssignment {
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, address, socket_address,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    let sa = addr(a);
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: sa.ip().to_string(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                u32::from(sa.port()),
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn changed_cluster_keeps_old_version_while_warming(delta: bool) {
    const NEW_EDS: &str = "backend-v2.eds";
    let (cp, cell, task) = synced_client(delta).await;
    let watch = watch_invariant(&cell, cluster_has_endpoints(BACKEND));
    let mut events = cp.events();
    cp.hold_back(ENDPOINT, NEW_EDS);
    cp.push_raw(
        ENDPOINT,
        vec![(NEW_EDS.into(), to_any(&cla(NEW_EDS, "127.0.0.1:8085")))],
    );
    cp.push_raw(
        CLUSTER,
        vec![(
            BACKEND.into(),
            to_any(&backend_with_service_name(&cp, NEW_EDS)),
        )],
    );
    acked_carrying(&mut events, CLUSTER, BACKEND).await;
    let s = cell.load();
    let (c, eps) = s.cluster(BACKEND).expect("the old version keeps serving");
    assert_eq!(c.eds_service_name(), Some(BACKEND));
    assert_eq!(
        eps.map(|e| e.endpoints.len()),
        Some(1),
        "old endpoints kept"
    );
    cp.release_held();
    wait_until(&cell, "the new version once its endpoints arrived", |s| {
        s.cluster(BACKEND)
            .is_some_and(|(c, _)| c.eds_service_name() == Some(NEW_EDS))
    })
    .await;
    assert_eq!(
        endpoints_of(&cell.load(), BACKEND),
        Some(vec![addr("127.0.0.1:8085")])
    );
    stop_watch(watch, "changed cluster").await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_changed_cluster_keeps_old_version_while_warming() {
    changed_cluster_keeps_old_version_while_warming(true).await;
}

#[tokio::test]
async fn ads_sotw_changed_cluster_keeps_old_version_while_warming() {
    changed_cluster_keeps_old_version_while_warming(false).await;
}

// ------------------------------------------------------------------------- listeners

async fn new_listener_waits_for_its_route_config(delta: bool) {
    let (cp, cell, task) = synced_client(delta).await;
    let watch = watch_invariant(&cell, listeners_have_routes);
    let mut events = cp.events();
    cp.hold_back(ROUTE, "9080");
    cp.update(|m| m.services.push(reviews()));
    acked_carrying(&mut events, LISTENER, "0.0.0.0_9080").await;
    let s = cell.load();
    assert!(
        !s.listeners.contains_key("0.0.0.0_9080") && s.outbound_port(9080).is_none(),
        "a listener was published before its route configuration"
    );
    // The rest of the configuration is untouched.
    assert!(matches!(
        route_to(&s, "backend.default.svc.cluster.local", 80),
        RouteDecision::Forward { .. }
    ));
    cp.release_held();
    wait_until(&cell, "the warmed listener", |s| {
        matches!(
            route_to(s, "reviews.default.svc.cluster.local:9080", 9080),
            RouteDecision::Forward { cluster, .. } if cluster.name == REVIEWS
        )
    })
    .await;
    stop_watch(watch, "new listener").await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_new_listener_waits_for_its_route_config() {
    new_listener_waits_for_its_route_config(true).await;
}

#[tokio::test]
async fn ads_sotw_new_listener_waits_for_its_route_config() {
    new_listener_waits_for_its_route_config(false).await;
}

/// The port-80 listener, now using RDS `route_config_name`.
fn listener_80_with_rds(cp: &ControlPlane, route_config_name: &str) -> PbListener {
    let set = cp.resources_for("default");
    let mut l: PbListener = from_any(&set[LISTENER]["0.0.0.0_80"]).unwrap();
    for chain in &mut l.filter_chains {
        for f in &mut chain.filters {
            if let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type
                && let Ok(mut hcm) = from_any::<HttpConnectionManager>(any)
            {
                hcm.route_specifier = match hcm.route_specifier {
                    Some(http_connection_manager::RouteSpecifier::Rds(mut rds)) => {
                        rds.route_config_name = route_config_name.into();
                        Some(http_connection_manager::RouteSpecifier::Rds(rds))
                    }
                    other => other,
                };
                *any = to_any(&hcm);
            }
        }
    }
    l
}

async fn changed_listener_keeps_old_route_config(delta: bool) {
    let (cp, cell, task) = synced_client(delta).await;
    let watch = watch_invariant(&cell, listeners_have_routes);
    let mut events = cp.events();
    let set = cp.resources_for("default");
    let mut rc: RouteConfiguration = from_any(&set[ROUTE]["80"]).unwrap();
    rc.name = "80-v2".into();
    cp.hold_back(ROUTE, "80-v2");
    cp.push_raw(ROUTE, vec![("80-v2".into(), to_any(&rc))]);
    cp.push_raw(
        LISTENER,
        vec![(
            "0.0.0.0_80".into(),
            to_any(&listener_80_with_rds(&cp, "80-v2")),
        )],
    );
    acked_carrying(&mut events, LISTENER, "0.0.0.0_80").await;
    let s = cell.load();
    assert!(
        matches!(
            s.outbound_port(80),
            Some(OutboundProtocol::Http { route_config }) if route_config == "80"
        ),
        "the old listener keeps serving until the new route configuration arrives"
    );
    assert!(matches!(
        route_to(&s, "backend.default.svc.cluster.local", 80),
        RouteDecision::Forward { .. }
    ));
    cp.release_held();
    wait_until(&cell, "the new listener version", |s| {
        matches!(
            s.outbound_port(80),
            Some(OutboundProtocol::Http { route_config }) if route_config == "80-v2"
        )
    })
    .await;
    assert!(matches!(
        route_to(&cell.load(), "backend.default.svc.cluster.local", 80),
        RouteDecision::Forward { .. }
    ));
    stop_watch(watch, "changed listener").await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_changed_listener_keeps_old_route_config_while_warming() {
    changed_listener_keeps_old_route_config(true).await;
}

#[tokio::test]
async fn ads_sotw_changed_listener_keeps_old_route_config_while_warming() {
    changed_listener_keeps_old_route_config(false).await;
}

// ------------------------------------------------------------------------- timeouts

async fn warming_times_out(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    // A short initial_fetch_timeout stands in for Envoy's 15 s.
    let (cell, task) = start_client(&cp, delta, Duration::from_millis(300));
    timeout(WAIT, cell.synced()).await.expect("never synced");
    cp.hold_back(ENDPOINT, REVIEWS);
    cp.hold_back(ROUTE, "9080");
    cp.update(|m| m.services.push(reviews()));
    // Neither dependency ever comes: after the timeout both are used without it.
    wait_until(&cell, "the cluster after initial_fetch_timeout", |s| {
        s.cluster(REVIEWS).is_some() && s.listeners.contains_key("0.0.0.0_9080")
    })
    .await;
    let s = cell.load();
    assert!(
        s.cluster(REVIEWS).is_some_and(|(_, e)| e.is_none()),
        "timed-out cluster has no endpoints"
    );
    assert!(!s.route_configs.contains_key("9080"));
    // No route configuration: Envoy's 404 NR.
    match route_to(&s, "reviews.default.svc.cluster.local:9080", 9080) {
        RouteDecision::Respond { status, .. } => assert_eq!(status, 404),
        other => panic!("expected a local 404, got {other:?}"),
    }
    // The dependencies arriving late fill them in.
    cp.release_held();
    wait_until(&cell, "late endpoints and routes", |s| {
        endpoints_of(s, REVIEWS) == Some(vec![addr("127.0.0.1:9081")])
            && matches!(
                route_to(s, "reviews.default.svc.cluster.local:9080", 9080),
                RouteDecision::Forward { cluster, .. } if cluster.name == REVIEWS
            )
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_warming_times_out_without_endpoints_or_routes() {
    warming_times_out(true).await;
}

#[tokio::test]
async fn ads_sotw_warming_times_out_without_endpoints_or_routes() {
    warming_times_out(false).await;
}

// ------------------------------------------------------------------------- readiness

async fn initial_sync_waits_for_warming(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    cp.hold_back(ENDPOINT, BACKEND);
    let (cell, task) = start_client(&cp, delta, AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT);
    acked_carrying(&mut events, CLUSTER, BACKEND).await;
    acked_carrying(&mut events, ROUTE, "80").await;
    assert!(!cell.is_synced(), "ready before the cluster warmed");
    assert!(cell.load().cluster(BACKEND).is_none());
    cp.release_held();
    timeout(WAIT, cell.synced())
        .await
        .expect("never synced after the endpoints came");
    assert_eq!(
        endpoints_of(&cell.load(), BACKEND),
        Some(vec![addr("127.0.0.1:8081")])
    );
    task.abort();
}

#[tokio::test]
async fn ads_delta_initial_sync_waits_for_warming() {
    initial_sync_waits_for_warming(true).await;
}

#[tokio::test]
async fn ads_sotw_initial_sync_waits_for_warming() {
    initial_sync_waits_for_warming(false).await;
}

// ------------------------------------------------------------------------- inline endpoints

/// `backend` turned into a non-EDS cluster of `t` whose endpoints are listed inline.
fn backend_inline(
    cp: &ControlPlane,
    t: envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType,
    inline: ClusterLoadAssignment,
) -> PbCluster {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::ClusterDiscoveryType;
    let set = cp.resources_for("default");
    let mut c: PbCluster = from_any(&set[CLUSTER][BACKEND]).unwrap();
    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(t as i32));
    c.eds_cluster_config = None;
    c.load_assignment = Some(inline);
    c
}

/// A STATIC cluster from CDS is used with the endpoints of its inline `load_assignment` (no EDS
/// to wait for); a STRICT_DNS cluster is ACKed with a hostname endpoint next to an IP literal,
/// both left to DNS (its targets, in order).
async fn inline_load_assignment_is_used(delta: bool) {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType;
    let (cp, cell, task) = synced_client(delta).await;
    let mut events = cp.events();
    // An inline CLA's own cluster_name does not matter (Envoy ignores it).
    let c = backend_inline(&cp, DiscoveryType::Static, cla("ignored", "127.0.0.1:7001"));
    cp.push_raw(CLUSTER, vec![(BACKEND.into(), to_any(&c))]);
    acked_carrying(&mut events, CLUSTER, BACKEND).await;
    wait_until(&cell, "the static cluster's endpoints", |s| {
        endpoints_of(s, BACKEND) == Some(vec![addr("127.0.0.1:7001")])
    })
    .await;
    let s = cell.load();
    let (cluster, _) = s.cluster(BACKEND).unwrap();
    assert_eq!(cluster.eds_service_name(), None);
    match route_to(&s, "backend.default.svc.cluster.local", 80) {
        RouteDecision::Forward { endpoints, .. } => assert_eq!(
            endpoints.map(|e| e.endpoints[0].address),
            Some(addr("127.0.0.1:7001"))
        ),
        other => panic!("not forwarded: {other:?}"),
    }
    // STRICT_DNS: a hostname endpoint next to an IP one; ACKed, both are DNS targets.
    let mut inline = cla(BACKEND, "127.0.0.1:7002");
    let mut host = inline.endpoints[0].lb_endpoints[0].clone();
    if let Some(
        envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e),
    ) = &mut host.host_identifier
        && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.address = "backend.example.com".into();
    }
    inline.endpoints[0].lb_endpoints.insert(0, host);
    let c = backend_inline(&cp, DiscoveryType::StrictDns, inline);
    cp.push_raw(CLUSTER, vec![(BACKEND.into(), to_any(&c))]);
    // ACKed (a NACK of that response never satisfies this wait).
    acked_carrying(&mut events, CLUSTER, BACKEND).await;
    wait_until(&cell, "the STRICT_DNS cluster's targets", |s| {
        s.cluster(BACKEND)
            .and_then(|(c, _)| c.dns().cloned())
            .is_some_and(|d| {
                d.targets
                    .iter()
                    .map(|t| (t.host.as_str(), t.port))
                    .eq([("backend.example.com", 7002), ("127.0.0.1", 7002)])
            })
    })
    .await;
    assert_eq!(endpoints_of(&cell.load(), BACKEND), None);
    task.abort();
}

#[tokio::test]
async fn ads_delta_inline_load_assignment_is_used() {
    inline_load_assignment_is_used(true).await;
}

#[tokio::test]
async fn ads_sotw_inline_load_assignment_is_used() {
    inline_load_assignment_is_used(false).await;
}
