//! A flood of 10 000 pushes over real gRPC (delta and SotW): the client ends on the latest
//! configuration, publishes far fewer snapshots than pushes, and its request queue never holds
//! more than one request per xDS type.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use mesh_core::{NodeIdentity, SnapshotCell};
use mesh_xds::ads::{AdsClient, AdsConfig, ENDPOINT};
use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use mesh_xds::translate::{from_any, to_any};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(120);
const FRONTEND: &str = "outbound|80||frontend.default.svc.cluster.local";
const PUSHES: u32 = 10_000;
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

fn endpoint_for(i: u32) -> SocketAddr {
    SocketAddr::from(([127, 0, (i / 250) as u8, (i % 250) as u8 + 1], 20000))
}

fn set_address(cla: &mut ClusterLoadAssignment, a: SocketAddr) {
    let ep = &mut cla.endpoints[0].lb_endpoints[0];
    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut ep.host_identifier else {
        panic!("testkit endpoints are addresses")
    };
    let Some(address::Address::SocketAddress(sa)) =
        e.address.as_mut().and_then(|x| x.address.as_mut())
    else {
        panic!("testkit endpoints are socket addresses")
    };
    sa.address = a.ip().to_string();
    sa.port_specifier = Some(socket_address::PortSpecifier::PortValue(u32::from(
        a.port(),
    )));
}

async fn flood(delta: bool) {
    let cp = ControlPlane::builder()
        .model(model())
        .start()
        .await
        .unwrap();
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
    let client = AdsClient::new(config, cell.clone());
    let queue = client.request_queue();
    let task = tokio::spawn(client.run());
    timeout(WAIT, cell.synced()).await.expect("never synced");
    let first = cell.load().version;
    // Count the responses the server actually sent during the flood.
    let mut events = cp.events();
    let counter = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut lost = 0u64;
        loop {
            match events.recv().await {
                Ok(XdsEvent::Sent { .. }) => sent += 1,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lost += n,
                Err(_) => return (sent, lost),
            }
        }
    });
    // The frontend's single endpoint moves on every push. Half the pushes are model updates
    // (which the control plane may coalesce, as istiod debounces); the other half are sent
    // as separate EDS responses, each one reaching the stream.
    let mut frontend_cla =
        from_any::<ClusterLoadAssignment>(&cp.resources_for("default")[ENDPOINT][FRONTEND])
            .unwrap();
    for i in 0..PUSHES {
        let a = endpoint_for(i);
        if i % 2 == 0 {
            cp.update(|m| m.services[1].endpoints = vec![EndpointSpec::new(a)]);
        } else {
            set_address(&mut frontend_cla, a);
            cp.inject(
                ENDPOINT,
                vec![(FRONTEND.into(), to_any(&frontend_cla))],
                &format!("flood{i}"),
            );
        }
        tokio::task::yield_now().await;
    }
    // The model ends where the flood did.
    let last = endpoint_for(PUSHES - 1);
    cp.update(|m| m.services[1].endpoints = vec![EndpointSpec::new(last)]);
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
    assert!(
        reached.is_ok(),
        "never reached the latest of {PUSHES} pushes"
    );
    let s = cell.load();
    let eps = s.cluster(FRONTEND).and_then(|(_, e)| e).unwrap();
    assert_eq!(eps.endpoints.len(), 1, "stale endpoints left behind");
    let snapshots = s.version - first;
    let high_water = queue.high_water();
    drop(cp);
    let (sent, lost) = timeout(WAIT, counter).await.unwrap().unwrap();
    eprintln!(
        "{} flood: {PUSHES} pushes, >= {sent} responses sent ({lost} events lost), {snapshots} snapshots, request queue high water {high_water}, {} requests merged",
        if delta { "delta" } else { "SotW" },
        queue.merged()
    );
    assert!(
        sent + lost >= u64::from(PUSHES) / 2,
        "the flood did not reach the stream: {sent} responses"
    );
    assert!(
        snapshots < u64::from(PUSHES) / 10,
        "{snapshots} snapshots for {PUSHES} pushes"
    );
    assert!(
        high_water <= XDS_TYPES,
        "request queue held {high_water} requests (bound: one per type)"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_delta_flood_of_10000_pushes_bounded_queue() {
    flood(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_sotw_flood_of_10000_pushes_bounded_queue() {
    flood(false).await;
}
