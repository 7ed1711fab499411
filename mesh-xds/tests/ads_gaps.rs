//! ADS robustness against the testkit control plane over real gRPC (delta and SotW):
//! - a bad push in the middle of a flood is NACKed, naming the resource, even though the
//!   flood's ACKs are coalesced (a NACK is never merged away by a later ACK), and the request
//!   queue stays bounded (one NACK plus one other request per type);
//! - `initial_fetch_timeout` fires while the stream is down: a warming cluster is used
//!   without its endpoints on time, connected or not.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, CLUSTER, ENDPOINT};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use mesh_xds::translate::{from_any, to_any};
use tokio::sync::broadcast;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(60);
const FRONTEND: &str = "outbound|80||frontend.default.svc.cluster.local";
const REVIEWS: &str = "outbound|9080||reviews.default.svc.cluster.local";
/// CDS, EDS, LDS, RDS, NDS.
const XDS_TYPES: usize = 5;

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

fn client(
    cp: &ControlPlane,
    delta: bool,
    initial_fetch_timeout: Duration,
) -> (SnapshotCell, AdsClient) {
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
    let client = AdsClient::new(config, cell.clone());
    (cell, client)
}

fn set_address(cla: &mut ClusterLoadAssignment, host: &str, port: u16) {
    let ep = &mut cla.endpoints[0].lb_endpoints[0];
    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut ep.host_identifier else {
        panic!("testkit endpoints are addresses")
    };
    let Some(address::Address::SocketAddress(sa)) =
        e.address.as_mut().and_then(|x| x.address.as_mut())
    else {
        panic!("testkit endpoints are socket addresses")
    };
    sa.address = host.to_owned();
    sa.port_specifier = Some(socket_address::PortSpecifier::PortValue(u32::from(port)));
}

/// NACKs seen (type URL, message) and events lost to lag.
type Seen = (Vec<(String, String)>, u64);

/// Pushes `pushes` EDS versions of the frontend as fast as the control plane takes them, the
/// one at `bad_at` with a host name where an IP must be; the client must NACK that one by
/// name and end on the last good version with a bounded request queue.
async fn bad_push_in_a_flood(delta: bool) {
    const PUSHES: u16 = 300;
    let bad_at = PUSHES / 2;
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, client) = client(&cp, delta, AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT);
    let queue = client.request_queue();
    let task = tokio::spawn(client.run());
    timeout(WAIT, cell.synced()).await.expect("never synced");
    // Collect NACKs while the flood runs (the event channel holds 1024; we drain it).
    let mut events = cp.events();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let collector = tokio::spawn({
        let seen = seen.clone();
        async move {
            loop {
                let e = events.recv().await;
                let mut seen = seen.lock().unwrap();
                match e {
                    Ok(XdsEvent::Nack {
                        type_url, message, ..
                    }) => seen.0.push((type_url, message)),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => seen.1 += n,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let mut cla =
        from_any::<ClusterLoadAssignment>(&cp.resources_for("default")[ENDPOINT][FRONTEND])
            .unwrap();
    for i in 0..PUSHES {
        if i == bad_at {
            set_address(&mut cla, "not-an-ip.example", 80);
        } else {
            set_address(&mut cla, "127.0.1.1", 20000 + i);
        }
        cp.inject(
            ENDPOINT,
            vec![(FRONTEND.into(), to_any(&cla))],
            &format!("flood{i}"),
        );
    }
    let last = SocketAddr::from(([127, 0, 1, 1], 20000 + PUSHES - 1));
    let mut rx = cell.subscribe();
    let reached = timeout(WAIT, async {
        loop {
            let s = cell.load();
            let eps = s.cluster(FRONTEND).and_then(|(_, e)| e);
            if eps.is_some_and(|e| e.endpoints.iter().any(|ep| ep.address == last)) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(reached.is_ok(), "never reached the last good push");
    // The NACK leaves before the requests queued behind it; wait (bounded) until it arrived.
    let named = |m: &str| m.contains(FRONTEND) && m.contains("not-an-ip.example");
    let got = timeout(WAIT, async {
        loop {
            if seen
                .lock()
                .unwrap()
                .0
                .iter()
                .any(|(t, m)| t == ENDPOINT && named(m))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    task.abort();
    collector.abort();
    let (nacks, lagged) = seen.lock().unwrap().clone();
    assert!(
        got.is_ok(),
        "no NACK named the bad ClusterLoadAssignment ({lagged} events lost): {nacks:?}"
    );
    assert!(
        nacks.iter().all(|(t, _)| t == ENDPOINT),
        "only EDS was bad: {nacks:?}"
    );
    let eds_nacks = nacks.len();
    let high_water = queue.high_water();
    eprintln!(
        "{}: {PUSHES} pushes, {} NACK(s), queue high water {high_water}, {} merged",
        if delta { "delta" } else { "SotW" },
        eds_nacks,
        queue.merged()
    );
    assert!(
        high_water <= 2 * XDS_TYPES,
        "request queue held {high_water} requests (bound: a NACK and one request per type)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_delta_bad_push_in_a_flood_is_nacked_by_name() {
    bad_push_in_a_flood(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_sotw_bad_push_in_a_flood_is_nacked_by_name() {
    bad_push_in_a_flood(false).await;
}

/// A flood of good pushes alone never needs more than one pending request per type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_flood_of_2000_good_versions_holds_one_request_per_type() {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, client) = client(&cp, true, AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT);
    let queue = client.request_queue();
    let task = tokio::spawn(client.run());
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let mut cla =
        from_any::<ClusterLoadAssignment>(&cp.resources_for("default")[ENDPOINT][FRONTEND])
            .unwrap();
    const PUSHES: u16 = 2000;
    for i in 0..PUSHES {
        set_address(&mut cla, "127.0.2.1", 20000 + i);
        cp.inject(
            ENDPOINT,
            vec![(FRONTEND.into(), to_any(&cla))],
            &format!("good{i}"),
        );
    }
    let last = SocketAddr::from(([127, 0, 2, 1], 20000 + PUSHES - 1));
    let mut rx = cell.subscribe();
    let reached = timeout(WAIT, async {
        loop {
            let s = cell.load();
            let eps = s.cluster(FRONTEND).and_then(|(_, e)| e);
            if eps.is_some_and(|e| e.endpoints.iter().any(|ep| ep.address == last)) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(reached.is_ok(), "never reached the last push");
    assert!(
        queue.high_water() <= XDS_TYPES,
        "request queue held {} requests (bound: one per type)",
        queue.high_water()
    );
    task.abort();
}

/// A new cluster whose endpoints are held back starts warming; then istiod goes away. The
/// warming timer keeps running while the client is disconnected and retrying, so the cluster
/// is used (without endpoints) once `initial_fetch_timeout` expires.
async fn warming_times_out_while_disconnected(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let fetch_timeout = Duration::from_millis(1500);
    let (cell, client) = client(&cp, delta, fetch_timeout);
    let task = tokio::spawn(client.run());
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let mut events = cp.events();
    cp.hold_back(ENDPOINT, REVIEWS);
    cp.update(|m| {
        m.services.push(
            ServiceSpec::new("reviews", "default", "10.96.0.20".parse().unwrap())
                .port(9080, Protocol::Http)
                .endpoint(EndpointSpec::new(addr("127.0.0.1:9081"))),
        )
    });
    // Wait for the CDS response carrying the new cluster to be ACKed: it is held and warming.
    let sent = timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(XdsEvent::Sent {
                    type_url, names, ..
                }) if type_url == CLUSTER && names.iter().any(|n| n == REVIEWS) => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events closed: {e}"),
            }
        }
    })
    .await;
    assert!(sent.is_ok(), "the new cluster was never sent");
    timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(XdsEvent::Ack { type_url, .. }) if type_url == CLUSTER => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events closed: {e}"),
            }
        }
    })
    .await
    .expect("the new cluster was never ACKed");
    // istiod goes away for good: streams cut, port closed.
    drop(cp);
    assert!(
        cell.load().cluster(REVIEWS).is_none(),
        "the cluster was used before its timeout"
    );
    let mut rx = cell.subscribe();
    let used = timeout(WAIT, async {
        loop {
            if cell.load().cluster(REVIEWS).is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        used.is_ok(),
        "initial_fetch_timeout never fired while disconnected"
    );
    let s = cell.load();
    let (_, eps) = s.cluster(REVIEWS).unwrap();
    assert!(
        eps.is_none_or(|e| e.endpoints.is_empty()),
        "the cluster has endpoints it never received"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_delta_warming_times_out_while_disconnected() {
    warming_times_out_while_disconnected(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_sotw_warming_times_out_while_disconnected() {
    warming_times_out_while_disconnected(false).await;
}
