//! Nonces and odd responses, against the testkit control plane over real gRPC (delta and
//! SotW): the client's ACKs echo the latest nonce of each type; a response with a stale or an
//! empty nonce is applied and its nonce echoed as is; a response of a type the client did not
//! subscribe to is ignored without ACK, NACK or reconnect; a duplicate response changes
//! nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::{NodeIdentity, Snapshot, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use mesh_xds::translate::{from_any, to_any};
use tokio::sync::broadcast;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);
const BACKEND: &str = "outbound|80||backend.default.svc.cluster.local";
const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const V2_CLUSTER: &str = "type.googleapis.com/envoy.api.v2.Cluster";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn model() -> MeshModel {
    let backend = ServiceSpec::new("backend", "default", "10.96.0.10".parse().unwrap())
        .port(80, Protocol::Http)
        .endpoint(EndpointSpec::new(addr("127.0.0.1:8081")));
    MeshModel::default().service(backend)
}

fn start_client(cp: &ControlPlane, delta: bool) -> (SnapshotCell, tokio::task::JoinHandle<()>) {
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
    let task = tokio::spawn(AdsClient::new(config, cell.clone()).run());
    (cell, task)
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

/// Collects events until `f` returns `Some`; returns it and every event seen on the way.
async fn until_event<T>(
    rx: &mut broadcast::Receiver<XdsEvent>,
    what: &str,
    mut f: impl FnMut(&XdsEvent) -> Option<T>,
) -> (T, Vec<XdsEvent>) {
    let mut seen = Vec::new();
    let r = timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let r = f(&e);
                    seen.push(e);
                    if let Some(t) = r {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("{what}: {n} events lost; the check needs all of them")
                }
                Err(e) => panic!("events closed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    (r, seen)
}

fn is_request(e: &XdsEvent, t: &str, nonce: &str) -> bool {
    matches!(e, XdsEvent::Request { type_url, response_nonce, nack: false }
        if type_url == t && response_nonce == nonce)
}

fn stream_restarted(seen: &[XdsEvent]) -> bool {
    seen.iter()
        .any(|e| matches!(e, XdsEvent::StreamClosed | XdsEvent::StreamOpened { .. }))
}

/// The clusters the server serves now, as an injected CDS response would carry them.
fn current_clusters(cp: &ControlPlane) -> Vec<(String, Any)> {
    cp.resources_for("default")[CLUSTER]
        .iter()
        .map(|(n, a)| (n.clone(), a.clone()))
        .collect()
}

/// The same cluster objects: nothing was translated again.
/// Equal cluster configuration (the testkit may re-encode the same clusters).
fn equal_clusters(a: &Snapshot, b: &Snapshot) -> bool {
    a.clusters.len() == b.clusters.len()
        && a.clusters
            .iter()
            .all(|(k, v)| b.clusters.get(k).is_some_and(|w| v == w))
}

fn same_clusters(a: &Snapshot, b: &Snapshot) -> bool {
    a.clusters.len() == b.clusters.len()
        && a.clusters.iter().all(|(k, v)| {
            b.clusters
                .get(k)
                .is_some_and(|w| std::sync::Arc::ptr_eq(v, w))
        })
}

// ------------------------------------------------------------------------- latest nonce

async fn acks_echo_the_latest_nonce_per_type(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let mut events = cp.events();
    // Changes of every type (new services on new ports: CDS, EDS, LDS, RDS, NDS), pushed
    // while earlier ones are still in flight.
    for i in 0..20u16 {
        cp.update(|m| {
            m.services.push(
                ServiceSpec::new(
                    &format!("svc{i}"),
                    "default",
                    format!("10.96.1.{i}").parse().unwrap(),
                )
                .port(8000 + i, Protocol::Http)
                .endpoint(EndpointSpec::new(addr(&format!("127.0.0.1:{}", 30000 + i)))),
            )
        });
        tokio::task::yield_now().await;
    }
    let types: BTreeSet<&str> = [CLUSTER, ENDPOINT, LISTENER, ROUTE, NAME_TABLE].into();
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (_, seen) = until_event(&mut events, "ACKs of the latest nonces", |e| {
        match e {
            XdsEvent::Sent {
                type_url, nonce, ..
            } => sent
                .entry(type_url.clone())
                .or_default()
                .push(nonce.clone()),
            XdsEvent::Request {
                type_url,
                response_nonce,
                nack,
            } if !response_nonce.is_empty() => {
                assert!(!nack, "unexpected NACK of {type_url}");
                acked
                    .entry(type_url.clone())
                    .or_default()
                    .push(response_nonce.clone())
            }
            _ => {}
        }
        let done = types.iter().all(|t| {
            let last_sent = sent.get(*t).and_then(|v| v.last());
            last_sent.is_some() && acked.get(*t).and_then(|v| v.last()) == last_sent
        });
        done.then_some(())
    })
    .await;
    assert!(!stream_restarted(&seen));
    // Nonces are `n<counter>`; ones below the first recorded were sent before recording.
    let number = |n: &str| n.trim_start_matches('n').parse::<u64>().unwrap_or(u64::MAX);
    let first_recorded = sent.values().flatten().map(|n| number(n)).min().unwrap();
    for (t, nonces) in &acked {
        let order: Vec<usize> = nonces
            .iter()
            .filter(|n| number(n) >= first_recorded)
            .map(|n| {
                sent[t]
                    .iter()
                    .position(|s| s == n)
                    .unwrap_or_else(|| panic!("{t}: request echoing nonce {n}, never sent"))
            })
            .collect();
        // SotW subscription changes repeat the last nonce seen, so equal is fine.
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "{t}: ACK nonces not in sending order: {nonces:?} (sent {:?})",
            sent[t]
        );
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_delta_acks_echo_the_latest_nonce_per_type() {
    acks_echo_the_latest_nonce_per_type(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_sotw_acks_echo_the_latest_nonce_per_type() {
    acks_echo_the_latest_nonce_per_type(false).await;
}

// ------------------------------------------------------------------------- stale nonce

async fn stale_nonce_is_echoed(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let before = cell.load();
    let mut events = cp.events();
    // A response reusing a nonce the server sent long ago (the stream's first).
    cp.inject(CLUSTER, current_clusters(&cp), "n1");
    let (_, seen) = until_event(&mut events, "the echo of the stale nonce", |e| {
        is_request(e, CLUSTER, "n1").then_some(())
    })
    .await;
    assert!(!stream_restarted(&seen));
    assert!(
        equal_clusters(&before, &cell.load()),
        "same content, same clusters"
    );
    // The stream still works: a real push is applied and ACKed with its own nonce.
    cp.update(|m| {
        m.services[0]
            .endpoints
            .push(EndpointSpec::new(addr("127.0.0.1:8082")))
    });
    let (nonce, _) = until_event(&mut events, "the next EDS push", |e| match e {
        XdsEvent::Sent {
            type_url, nonce, ..
        } if type_url == ENDPOINT => Some(nonce.clone()),
        _ => None,
    })
    .await;
    let (_, seen) = until_event(&mut events, "its ACK", |e| {
        is_request(e, ENDPOINT, &nonce).then_some(())
    })
    .await;
    assert!(!stream_restarted(&seen));
    wait_until(&cell, "the push", |s| {
        s.cluster(BACKEND)
            .and_then(|(_, e)| e)
            .is_some_and(|e| e.endpoints.len() == 2)
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn ads_delta_stale_nonce_response_is_applied_and_echoed() {
    stale_nonce_is_echoed(true).await;
}

#[tokio::test]
async fn ads_sotw_stale_nonce_response_is_applied_and_echoed() {
    stale_nonce_is_echoed(false).await;
}

// ------------------------------------------------------------------------- empty nonce

async fn empty_nonce_is_applied_and_echoed(delta: bool) {
    const EXTRA: &str = "outbound|80||extra.default.svc.cluster.local";
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let mut events = cp.events();
    // One more cluster reading the backend's endpoints (so it warms at once), in a
    // response without a nonce.
    let mut extra: PbCluster = from_any(&cp.resources_for("default")[CLUSTER][BACKEND]).unwrap();
    extra.name = EXTRA.into();
    if let Some(eds) = extra.eds_cluster_config.as_mut() {
        eds.service_name = BACKEND.into();
    }
    let mut resources = current_clusters(&cp);
    resources.push((EXTRA.into(), to_any(&extra)));
    let mut seen_rx = cell.subscribe();
    let watch_cell = cell.clone();
    let seen_extra = tokio::spawn(async move {
        timeout(WAIT, async {
            loop {
                if watch_cell.load().clusters.contains_key(EXTRA) {
                    return true;
                }
                if seen_rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    });
    cp.inject(CLUSTER, resources, "");
    let (_, seen) = until_event(&mut events, "an ACK echoing the empty nonce", |e| {
        is_request(e, CLUSTER, "").then_some(())
    })
    .await;
    assert!(!stream_restarted(&seen));
    if delta {
        // Delta: nothing makes the server re-send CDS, so the injected cluster stays.
        assert!(cell.load().clusters.contains_key(EXTRA));
    } else {
        // SotW: a request without a nonce asks for the full set again, which takes the
        // injected cluster away; it was applied in between.
        assert!(
            timeout(WAIT, seen_extra).await.unwrap().unwrap(),
            "the empty-nonce response was never applied"
        );
        wait_until(&cell, "the server's full set back", |s| {
            !s.clusters.contains_key(EXTRA) && s.clusters.contains_key(BACKEND)
        })
        .await;
    }
    assert!(cell.is_synced());
    task.abort();
}

#[tokio::test]
async fn ads_delta_empty_nonce_response_is_applied_and_echoed() {
    empty_nonce_is_applied_and_echoed(true).await;
}

#[tokio::test]
async fn ads_sotw_empty_nonce_response_is_applied_and_echoed() {
    empty_nonce_is_applied_and_echoed(false).await;
}

// ------------------------------------------------------------------------- unsubscribed types

async fn unsubscribed_type_is_ignored(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let before = cell.load();
    let mut events = cp.events();
    let junk = Any {
        type_url: SECRET.into(),
        value: vec![0xff, 0x01, 0x02],
    };
    cp.inject(SECRET, vec![("default".into(), junk)], "s1");
    let v2 = Any {
        type_url: V2_CLUSTER.into(),
        value: Vec::new(),
    };
    cp.inject(V2_CLUSTER, vec![("legacy".into(), v2)], "s2");
    // A real push after them: the client must still be on the same stream and answer it.
    cp.update(|m| {
        m.services[0]
            .endpoints
            .push(EndpointSpec::new(addr("127.0.0.1:8082")))
    });
    let (nonce, _) = until_event(&mut events, "the EDS push", |e| match e {
        XdsEvent::Sent {
            type_url, nonce, ..
        } if type_url == ENDPOINT => Some(nonce.clone()),
        _ => None,
    })
    .await;
    let (_, seen) = until_event(&mut events, "its ACK", |e| {
        is_request(e, ENDPOINT, &nonce).then_some(())
    })
    .await;
    assert!(!stream_restarted(&seen), "the client reconnected");
    let answered: Vec<&XdsEvent> = seen
        .iter()
        .filter(|e| {
            matches!(e, XdsEvent::Request { type_url, response_nonce, .. }
                if type_url == SECRET || type_url == V2_CLUSTER
                    || response_nonce == "s1" || response_nonce == "s2")
        })
        .collect();
    assert!(
        answered.is_empty(),
        "responses of unsubscribed types were answered: {answered:?}"
    );
    wait_until(&cell, "the push", |s| {
        s.cluster(BACKEND)
            .and_then(|(_, e)| e)
            .is_some_and(|e| e.endpoints.len() == 2)
    })
    .await;
    assert!(equal_clusters(&before, &cell.load()));
    task.abort();
}

#[tokio::test]
async fn ads_delta_response_of_unsubscribed_type_is_ignored() {
    unsubscribed_type_is_ignored(true).await;
}

#[tokio::test]
async fn ads_sotw_response_of_unsubscribed_type_is_ignored() {
    unsubscribed_type_is_ignored(false).await;
}

// ------------------------------------------------------------------------- duplicates

async fn duplicate_response_is_idempotent(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
    let (cell, task) = start_client(&cp, delta);
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let before = cell.load();
    let mut events = cp.events();
    let copy = current_clusters(&cp);
    cp.inject(CLUSTER, copy.clone(), "dup1");
    until_event(&mut events, "ACK of the first copy", |e| {
        is_request(e, CLUSTER, "dup1").then_some(())
    })
    .await;
    let after_first = cell.load();
    cp.inject(CLUSTER, copy, "dup2");
    let (_, seen) = until_event(&mut events, "ACK of the second copy", |e| {
        is_request(e, CLUSTER, "dup2").then_some(())
    })
    .await;
    assert!(!stream_restarted(&seen));
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, XdsEvent::Request { nack: true, .. })),
        "a duplicate was NACKed"
    );
    let after_second = cell.load();
    assert_eq!(
        after_second.version, after_first.version,
        "a duplicate response published a new snapshot"
    );
    assert!(equal_clusters(&before, &after_first));
    assert!(same_clusters(&after_first, &after_second));
    task.abort();
}

#[tokio::test]
async fn ads_delta_duplicate_response_is_idempotent() {
    duplicate_response_is_idempotent(true).await;
}

#[tokio::test]
async fn ads_sotw_duplicate_response_is_idempotent() {
    duplicate_response_is_idempotent(false).await;
}
