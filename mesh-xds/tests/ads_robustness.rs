//! The ADS client under the things istiod and networks do: restarts mid-push, streams cut
//! between a response and its ACK, one bad resource of each type among good ones in one
//! response (delta and SotW), floods of pushes, periodic stream closes (max connection age), and delta's rule that a
//! rejected resource is never reported as held.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost as PbVirtualHost, route,
    route_action, route_match,
};
use envoy_types::pb::google::protobuf::Any;
use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, CLUSTER, ENDPOINT, LISTENER, ROUTE};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use mesh_xds::translate::to_any;
use tokio::sync::broadcast;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);
const FRONTEND: &str = "outbound|80||frontend.default.svc.cluster.local";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn model() -> MeshModel {
    let backend = ServiceSpec::new("backend", "default", "10.96.0.10".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new(addr("127.0.0.1:8081")));
    let frontend = ServiceSpec::new("frontend", "default", "10.96.0.11".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new(addr("127.0.0.1:9091")));
    MeshModel::default().service(backend).service(frontend)
}

fn start_client(address: SocketAddr, delta: bool) -> (SnapshotCell, tokio::task::JoinHandle<()>) {
    let (cell, task, _) = start_client_with_queue(address, delta);
    (cell, task)
}

/// [`start_client`], also returning the client's request-queue statistics.
fn start_client_with_queue(
    address: SocketAddr,
    delta: bool,
) -> (
    SnapshotCell,
    tokio::task::JoinHandle<()>,
    mesh_xds::ads::RequestQueueStats,
) {
    let cell = SnapshotCell::new();
    let config = AdsConfig {
        address: mesh_core::config::ControlPlaneAddress {
            address: address.to_string(),
            tls: false,
            root_cert: None,
            server_name: None,
        },
        node: NodeIdentity::new(
            "client-7f99c7d8b5-abcde",
            "default",
            "127.0.0.1".parse().unwrap(),
            "client",
        ),
        token_path: None,
        delta,
        headers: Vec::new(),
        initial_fetch_timeout: AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
    };
    let client = AdsClient::new(config, cell.clone());
    let queue = client.request_queue();
    let task = tokio::spawn(client.run());
    (cell, task, queue)
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
    what: &str,
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
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn frontend_has(s: &mesh_core::Snapshot, a: &str) -> bool {
    s.cluster(FRONTEND)
        .and_then(|(_, e)| e)
        .is_some_and(|e| e.endpoints.iter().any(|ep| ep.address == addr(a)))
}

fn add_frontend_endpoint(m: &mut MeshModel, a: &str) {
    m.services[1].endpoints.push(EndpointSpec::new(addr(a)));
}

// ---------------------------------------------------------------- restarts and cuts

async fn server_restart_mid_push(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let at = cp.addr();
    let (cell, task) = start_client(at, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    // A push goes out and the server dies with it in flight.
    cp.update(|m| add_frontend_endpoint(m, "127.0.0.1:9092"));
    cp.cut_streams();
    drop(cp);
    // istiod comes back on the same address with a newer model.
    let mut newer = model();
    add_frontend_endpoint(&mut newer, "127.0.0.1:9092");
    add_frontend_endpoint(&mut newer, "127.0.0.1:9093");
    let cp2 = timeout(WAIT, async {
        loop {
            match ControlPlane::builder()
                .model(newer.clone())
                .listen(at)
                .start()
                .await
            {
                Ok(cp) => return cp,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("could not rebind the control plane's address");
    wait_until(&cell, "config of the restarted server", |s| {
        frontend_has(s, "127.0.0.1:9093") && frontend_has(s, "127.0.0.1:9092")
    })
    .await;
    assert!(cell.is_synced(), "readiness lost across the restart");
    drop(cp2);
    task.abort();
}

#[tokio::test]
async fn ads_delta_server_restart_mid_push() {
    server_restart_mid_push(true).await;
}

#[tokio::test]
async fn ads_sotw_server_restart_mid_push() {
    server_restart_mid_push(false).await;
}

async fn cut_between_response_and_ack(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(cp.addr(), delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let mut events = cp.events();
    // The push's responses are sent, then the stream is cut before the server reads the ACK.
    cp.cut_after_next_push();
    cp.update(|m| add_frontend_endpoint(m, "127.0.0.1:9092"));
    // On the old stream: the EDS response carrying the change goes out, then the stream
    // closes, and no request answering that response arrives in between.
    let mut pushed: Option<String> = None;
    timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(XdsEvent::Sent {
                    type_url,
                    nonce,
                    names,
                }) if type_url == ENDPOINT && names.iter().any(|n| n == FRONTEND) => {
                    pushed = Some(nonce)
                }
                Ok(XdsEvent::Request { response_nonce, .. })
                    if pushed.as_ref() == Some(&response_nonce) =>
                {
                    panic!("the response {response_nonce} was answered before the cut")
                }
                Ok(XdsEvent::StreamClosed) => return,
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("the stream was never cut");
    let pushed = pushed.expect("the stream closed before the push was sent");
    next_event(&mut events, "stream reopened", |e| {
        matches!(e, XdsEvent::StreamOpened { .. })
    })
    .await;
    // The config converges on the new stream: the pushed change is there (applied from the
    // cut response or re-sent), and the next push is ACKed on the new stream.
    wait_until(&cell, "the cut push applied", |s| {
        frontend_has(s, "127.0.0.1:9092")
    })
    .await;
    cp.update(|m| add_frontend_endpoint(m, "127.0.0.1:9093"));
    let ack = next_event(
        &mut events,
        "EDS ACK on the new stream",
        |e| matches!(e, XdsEvent::Ack { type_url, .. } if type_url == ENDPOINT),
    )
    .await;
    let XdsEvent::Ack { nonce, .. } = ack else {
        unreachable!()
    };
    assert_ne!(nonce, pushed, "the cut response was ACKed");
    wait_until(&cell, "push after the cut", |s| {
        frontend_has(s, "127.0.0.1:9091")
            && frontend_has(s, "127.0.0.1:9092")
            && frontend_has(s, "127.0.0.1:9093")
    })
    .await;
    assert!(cell.is_synced());
    task.abort();
}

#[tokio::test]
async fn ads_delta_stream_cut_between_response_and_ack() {
    cut_between_response_and_ack(true).await;
}

#[tokio::test]
async fn ads_sotw_stream_cut_between_response_and_ack() {
    cut_between_response_and_ack(false).await;
}

async fn periodic_stream_close_keeps_readiness(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let (cell, task) = start_client(cp.addr(), delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    // Record every published state from here on: readiness must never drop.
    let mut states = cell.subscribe();
    let watcher = tokio::spawn(async move {
        let mut lost = false;
        while states.changed().await.is_ok() {
            if !states.borrow().synced {
                lost = true;
            }
        }
        lost
    });
    // istiod's max connection age, compressed: close the stream five times.
    for i in 0..5u16 {
        cp.cut_streams();
        next_event(&mut events, "stream reopened", |e| {
            matches!(e, XdsEvent::StreamOpened { .. })
        })
        .await;
        let port = format!("127.0.0.1:{}", 9100 + i);
        cp.update(|m| add_frontend_endpoint(m, &port));
        wait_until(&cell, "push after reconnect", |s| frontend_has(s, &port)).await;
        assert!(cell.is_synced());
    }
    task.abort();
    drop(cell);
    let lost = timeout(WAIT, watcher).await.unwrap().unwrap();
    assert!(
        !lost,
        "a snapshot was published as not ready during a reconnect"
    );
}

#[tokio::test]
async fn ads_delta_periodic_stream_close_keeps_readiness() {
    periodic_stream_close_keeps_readiness(true).await;
}

#[tokio::test]
async fn ads_sotw_periodic_stream_close_keeps_readiness() {
    periodic_stream_close_keeps_readiness(false).await;
}

// ---------------------------------------------------------------- one bad resource per type

/// A resource of `type_url` that the client must reject, named `name`.
fn bad(type_url: &str, name: &str) -> Any {
    match type_url {
        CLUSTER => to_any(&PbCluster {
            name: name.into(),
            lb_policy: 99,
            ..Default::default()
        }),
        // A listener without an address.
        LISTENER => to_any(&PbListener {
            name: name.into(),
            ..Default::default()
        }),
        // A route config whose only route has a negative timeout.
        ROUTE => to_any(&RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![PbVirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            FRONTEND.into(),
                        )),
                        timeout: Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: -1,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        // An endpoint with a host name instead of an IP.
        _ => {
            let mut cla: ClusterLoadAssignment = serde_free_cla(name);
            cla.cluster_name = name.into();
            to_any(&cla)
        }
    }
}

fn serde_free_cla(name: &str) -> ClusterLoadAssignment {
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, address, socket_address,
    };
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "not-an-ip.example".into(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(80)),
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

const FRONTEND_81: &str = "outbound|81||frontend.default.svc.cluster.local";
const STATIC_GOOD: &str = "static-good";

/// The testkit's resource `name` of `type_url`, decoded.
fn served<M: prost::Message + prost::Name + Default>(
    cp: &ControlPlane,
    type_url: &str,
    name: &str,
) -> M {
    let set = cp.resources_for("default");
    mesh_xds::translate::from_any(&set[type_url][name]).unwrap()
}

/// A one-endpoint CLA for `name`.
fn one_endpoint_cla(name: &str, a: &str) -> ClusterLoadAssignment {
    let mut cla = serde_free_cla(name);
    let sa = addr(a);
    let ep = &mut cla.endpoints[0].lb_endpoints[0];
    if let Some(
        envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e),
    ) = &mut ep.host_identifier
        && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) =
            e.address.as_mut().and_then(|x| x.address.as_mut())
    {
        s.address = sa.ip().to_string();
        s.port_specifier = Some(
            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                u32::from(sa.port()),
            ),
        );
    }
    cla
}

/// The good resources sent in the same response as the bad one, per type.
fn good_changes(cp: &ControlPlane, type_url: &str) -> Vec<(String, Any)> {
    match type_url {
        CLUSTER => {
            // A changed cluster and a new STATIC one (usable at once: no EDS to wait for).
            let mut changed: PbCluster = served(cp, CLUSTER, FRONTEND);
            changed.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 7,
                nanos: 0,
            });
            let new = PbCluster {
                name: STATIC_GOOD.into(),
                cluster_discovery_type: Some(
                    envoy_types::pb::envoy::config::cluster::v3::cluster::ClusterDiscoveryType::Type(
                        envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType::Static
                            as i32,
                    ),
                ),
                load_assignment: Some(one_endpoint_cla(STATIC_GOOD, "127.0.0.1:7001")),
                ..Default::default()
            };
            vec![
                (FRONTEND.into(), to_any(&changed)),
                (STATIC_GOOD.into(), to_any(&new)),
            ]
        }
        ENDPOINT => {
            let mut frontend: ClusterLoadAssignment = served(cp, ENDPOINT, FRONTEND);
            frontend.endpoints.push(
                one_endpoint_cla(FRONTEND, "127.0.0.1:9092")
                    .endpoints
                    .remove(0),
            );
            vec![
                (FRONTEND.into(), to_any(&frontend)),
                (
                    FRONTEND_81.into(),
                    to_any(&one_endpoint_cla(FRONTEND_81, "127.0.0.1:9093")),
                ),
            ]
        }
        LISTENER => {
            // Two new listeners: copies of 0.0.0.0_81 on ports 82 and 83.
            let base: PbListener = served(cp, LISTENER, "0.0.0.0_81");
            [82u32, 83]
                .into_iter()
                .map(|port| {
                    let mut l = base.clone();
                    l.name = format!("0.0.0.0_{port}");
                    if let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
                        l.address.as_mut().and_then(|a| a.address.as_mut())
                    {
                        sa.port_specifier = Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port));
                    }
                    (l.name.clone(), to_any(&l))
                })
                .collect()
        }
        _ => {
            // Port 81's route configuration answers one more domain.
            let mut rc: RouteConfiguration = served(cp, ROUTE, "81");
            rc.virtual_hosts[0].domains.push("extra.example".into());
            vec![("81".into(), to_any(&rc))]
        }
    }
}

/// For each type: ONE response carries a bad replacement of an existing resource and good
/// changes to others of the same type. Only the bad one is rejected, the NACK of that very
/// response names it (and nothing else), it keeps its last good config, and the good changes
/// of the same response are applied.
async fn one_bad_among_good(delta: bool, type_url: &'static str) {
    let mut m = model();
    m.services[1].ports.push((81, Protocol::Http));
    let cp = ControlPlane::builder().model(m).start().await.unwrap();
    let (cell, task) = start_client(cp.addr(), delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let mut events = cp.events();
    let before = cell.load();
    let victim = match type_url {
        CLUSTER | ENDPOINT => "outbound|80||backend.default.svc.cluster.local",
        LISTENER => "0.0.0.0_80",
        _ => "80",
    };
    let good = good_changes(&cp, type_url);
    let good_names: Vec<String> = good.iter().map(|(n, _)| n.clone()).collect();
    let mut push = vec![(victim.to_owned(), bad(type_url, victim))];
    push.extend(good);
    cp.push_raw(type_url, push);
    // The one response that carried all of them ...
    let sent = next_event(&mut events, "the response", |e| {
        matches!(e, XdsEvent::Sent { type_url: t, names, .. }
            if t == type_url
                && names.iter().any(|n| n == victim)
                && good_names.iter().all(|g| names.contains(g)))
    })
    .await;
    let XdsEvent::Sent { nonce: sent, .. } = sent else {
        unreachable!()
    };
    // ... is NACKed, naming the bad resource only.
    let nack = next_event(
        &mut events,
        "NACK",
        |e| matches!(e, XdsEvent::Nack { type_url: t, .. } if t == type_url),
    )
    .await;
    let XdsEvent::Nack { message, nonce, .. } = nack else {
        unreachable!()
    };
    assert_eq!(nonce, sent, "{type_url}: the NACK answers another response");
    assert!(message.contains(victim), "{type_url}: {message}");
    assert_eq!(
        message.lines().count(),
        1,
        "{type_url}: only the bad resource is named: {message}"
    );
    for g in &good_names {
        assert!(
            !message.contains(&format!("{g:?}")),
            "{type_url}: good {g} named: {message}"
        );
    }
    // The good changes of that response are applied (no other push happens).
    let applied = |s: &mesh_core::Snapshot| match type_url {
        CLUSTER => {
            s.clusters
                .get(FRONTEND)
                .is_some_and(|c| c.connect_timeout == Duration::from_secs(7))
                && s.cluster(STATIC_GOOD)
                    .and_then(|(_, e)| e)
                    .is_some_and(|e| {
                        e.endpoints
                            .iter()
                            .any(|p| p.address == addr("127.0.0.1:7001"))
                    })
        }
        ENDPOINT => {
            frontend_has(s, "127.0.0.1:9092")
                && s.cluster(FRONTEND_81)
                    .and_then(|(_, e)| e)
                    .is_some_and(|e| {
                        e.endpoints
                            .iter()
                            .any(|p| p.address == addr("127.0.0.1:9093"))
                    })
        }
        LISTENER => {
            s.listeners.contains_key("0.0.0.0_82") && s.listeners.contains_key("0.0.0.0_83")
        }
        _ => matches!(
            s.route_outbound("extra.example", 81, "/", &http::HeaderMap::new()),
            mesh_core::snapshot::RouteDecision::Forward { cluster, .. } if cluster.name == FRONTEND_81
        ),
    };
    wait_until(&cell, "the good changes of the same response", applied).await;
    let now = cell.load();
    match type_url {
        CLUSTER => assert_eq!(now.clusters[victim], before.clusters[victim]),
        ENDPOINT => assert!(std::sync::Arc::ptr_eq(
            &now.endpoints[victim],
            &before.endpoints[victim]
        )),
        LISTENER => assert_eq!(now.listeners[victim], before.listeners[victim]),
        _ => assert!(std::sync::Arc::ptr_eq(
            &now.route_configs[victim],
            &before.route_configs[victim]
        )),
    }
    assert!(cell.is_synced());
    task.abort();
}

#[tokio::test]
async fn ads_delta_one_bad_cluster_among_good() {
    one_bad_among_good(true, CLUSTER).await;
}
#[tokio::test]
async fn ads_sotw_one_bad_cluster_among_good() {
    one_bad_among_good(false, CLUSTER).await;
}
#[tokio::test]
async fn ads_delta_one_bad_endpoint_among_good() {
    one_bad_among_good(true, ENDPOINT).await;
}
#[tokio::test]
async fn ads_sotw_one_bad_endpoint_among_good() {
    one_bad_among_good(false, ENDPOINT).await;
}
#[tokio::test]
async fn ads_delta_one_bad_listener_among_good() {
    one_bad_among_good(true, LISTENER).await;
}
#[tokio::test]
async fn ads_sotw_one_bad_listener_among_good() {
    one_bad_among_good(false, LISTENER).await;
}
#[tokio::test]
async fn ads_delta_one_bad_route_among_good() {
    one_bad_among_good(true, ROUTE).await;
}
#[tokio::test]
async fn ads_sotw_one_bad_route_among_good() {
    one_bad_among_good(false, ROUTE).await;
}

// ---------------------------------------------------------------- delta held set

#[tokio::test]
async fn ads_delta_rejected_resource_is_never_reported_held() {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let (cell, task) = start_client(cp.addr(), true);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    // A new bad cluster, and a bad update of an existing one.
    let new_bad = "outbound|99||nope.default.svc.cluster.local";
    let victim = "outbound|80||backend.default.svc.cluster.local";
    cp.push_raw(
        CLUSTER,
        vec![
            (new_bad.into(), bad(CLUSTER, new_bad)),
            (victim.into(), bad(CLUSTER, victim)),
        ],
    );
    next_event(
        &mut events,
        "NACK",
        |e| matches!(e, XdsEvent::Nack { type_url, .. } if type_url == CLUSTER),
    )
    .await;
    cp.cut_streams();
    let sub = next_event(
        &mut events,
        "CDS re-subscription",
        |e| matches!(e, XdsEvent::Subscribed { type_url, .. } if type_url == CLUSTER),
    )
    .await;
    let XdsEvent::Subscribed {
        initial_resource_versions,
        ..
    } = sub
    else {
        unreachable!()
    };
    assert!(
        !initial_resource_versions.contains_key(new_bad),
        "a rejected resource was reported as held: {initial_resource_versions:?}"
    );
    // The victim is held at its last good version, so the server sees a different version and
    // re-sends (and the client NACKs again) rather than believing the bad one was taken.
    assert!(initial_resource_versions.contains_key(victim));
    next_event(&mut events, "NACK after re-send", |e| {
        matches!(e, XdsEvent::Nack { type_url, message, .. } if type_url == CLUSTER && message.contains(new_bad))
    })
    .await;
    task.abort();
}

// ---------------------------------------------------------------- floods

/// CDS, EDS, LDS, RDS, NDS.
const XDS_TYPES: usize = 5;
const FLOOD: u16 = 1000;

async fn flood_is_coalesced(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task, queue) = start_client_with_queue(cp.addr(), delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let first = cell.load().version;
    let mut events = cp.events();
    let counter = tokio::spawn(async move {
        let (mut sent, mut lost) = (0u64, 0u64);
        loop {
            match events.recv().await {
                Ok(XdsEvent::Sent { .. }) => sent += 1,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => lost += n,
                Err(_) => return (sent, lost),
            }
        }
    });
    // The frontend's single endpoint moves port on every push: each push is an EDS response
    // of its own on the stream (the control plane does not debounce these), then the model
    // ends where the flood did.
    let last = format!("127.0.0.1:{}", 20000 + FLOOD - 1);
    for i in 0..FLOOD {
        let a = format!("127.0.0.1:{}", 20000 + i);
        cp.inject(
            ENDPOINT,
            vec![(FRONTEND.into(), to_any(&one_endpoint_cla(FRONTEND, &a)))],
            &format!("flood{i}"),
        );
        tokio::task::yield_now().await;
    }
    cp.update(|m| m.services[1].endpoints = vec![EndpointSpec::new(addr(&last))]);
    wait_until(&cell, "the latest of the pushes", |s| {
        frontend_has(s, &last)
    })
    .await;
    let s = cell.load();
    let eps = s.cluster(FRONTEND).and_then(|(_, e)| e).unwrap();
    assert_eq!(eps.endpoints.len(), 1, "stale endpoints left behind");
    let snapshots = s.version - first;
    let high_water = queue.high_water();
    drop(cp);
    let (sent, lost) = timeout(WAIT, counter).await.unwrap().unwrap();
    eprintln!(
        "{} flood: {FLOOD} pushes, >= {sent} responses ({lost} events lost), {snapshots} snapshots, request queue high water {high_water}",
        if delta { "delta" } else { "SotW" }
    );
    // The flood reached the stream; coalesced: at most one snapshot per ten pushes, and the
    // request queue never holds more than one request per type.
    assert!(
        sent + lost >= u64::from(FLOOD),
        "the flood did not reach the stream: {sent} responses"
    );
    assert!(
        snapshots < u64::from(FLOOD) / 10,
        "{snapshots} snapshots for {FLOOD} pushes"
    );
    assert!(
        high_water <= XDS_TYPES,
        "request queue held {high_water} requests (bound: one per type)"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_delta_flood_of_pushes_ends_at_latest() {
    flood_is_coalesced(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_sotw_flood_of_pushes_ends_at_latest() {
    flood_is_coalesced(false).await;
}

// ---------------------------------------------------------------- NDS

async fn nds_subscribed_and_published(delta: bool) {
    // The node asks for a full table (FACTS.md a.3).
    let n = mesh_xds::node::envoy_node(&NodeIdentity::new(
        "client-7f99c7d8b5-abcde",
        "default",
        "127.0.0.1".parse().unwrap(),
        "client",
    ));
    assert_eq!(
        mesh_xds::node::metadata_string(&n, "DNS_CAPTURE"),
        Some("true")
    );
    assert_eq!(
        mesh_xds::node::metadata_string(&n, "DNS_AUTO_ALLOCATE"),
        Some("true")
    );
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let (cell, task) = start_client(cp.addr(), delta);
    next_event(&mut events, "NDS subscription", |e| {
        matches!(e, XdsEvent::Subscribed { type_url, .. } if type_url == mesh_xds::ads::NAME_TABLE)
    })
    .await;
    timeout(WAIT, cell.synced()).await.expect("never synced");
    wait_until(&cell, "name table", |s| {
        s.name_table
            .table
            .get("frontend.default.svc.cluster.local")
            .is_some_and(|e| e.ips == vec!["10.96.0.11".parse::<std::net::IpAddr>().unwrap()])
    })
    .await;
    // A new service reaches the table; a removed one leaves it.
    cp.update(|m| {
        m.services.remove(0);
        m.services.push(
            ServiceSpec::new("ratings", "default", "10.96.0.12".parse().unwrap())
                .port(9080, Protocol::Http)
                .endpoint(EndpointSpec::new(addr("127.0.0.1:9080"))),
        );
    });
    wait_until(&cell, "name table update", |s| {
        s.name_table
            .table
            .contains_key("ratings.default.svc.cluster.local")
            && !s
                .name_table
                .table
                .contains_key("backend.default.svc.cluster.local")
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_nds_subscribed_and_published() {
    nds_subscribed_and_published(true).await;
}

#[tokio::test]
async fn ads_sotw_nds_subscribed_and_published() {
    nds_subscribed_and_published(false).await;
}
