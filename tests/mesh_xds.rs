//! Whole-library xDS behaviour: a meshed client fed by the testkit control plane keeps
//! serving its last good configuration when an update is NACKed, and reconnects and resumes
//! after its stream is cut.
//!
//! The backends are meshed workloads on a second control plane that shares the CA, so the
//! client's plane sees only the client's stream.

use crate::support;

use std::net::SocketAddr;

use mesh::Mesh;
use mesh::parts::xds::ads::CLUSTER;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent};
use support::mesh::{Echo, NS, Plane, eventually, field, next_event, spiffe};

const PORT: u16 = 9080;
const URL: &str = "http://backend.default.svc.cluster.local:9080/";
const CLUSTER_NAME: &str = "outbound|9080||backend.default.svc.cluster.local";

fn model(endpoints: &[SocketAddr]) -> MeshModel {
    let mut svc =
        ServiceSpec::new("backend", NS, "10.96.0.20".parse().unwrap()).port(PORT, Protocol::Http);
    for e in endpoints {
        svc = svc.endpoint(EndpointSpec::new(*e).service_account("backend"));
    }
    MeshModel::default().service(svc)
}

/// A meshed backend pod `name` (service account `backend`) on `infra`, serving the echo app.
async fn backend(infra: &Plane, name: &str) -> (Mesh, SocketAddr) {
    let mesh = infra
        .builder(support::mesh::node(&format!("{name}-0"), "backend"))
        .start()
        .await
        .expect("backend mesh starts");
    support::mesh::ready(&mesh).await;
    let (addr, _task) = Echo::new(name).serve_meshed(&mesh).await;
    (mesh, addr)
}

/// GET through the client; returns (status, the echo's `server=` field).
async fn call(client: &Mesh) -> (u16, String) {
    let resp = tokio::time::timeout(support::mesh::WAIT, client.http_client().get(URL))
        .await
        .expect("bounded")
        .expect("response");
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    if resp.status() == 200 {
        assert_eq!(
            field(&body, "peer"),
            spiffe("client").to_string(),
            "mTLS identity: {body}"
        );
    }
    (resp.status().as_u16(), field(&body, "server").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_cluster_leaves_the_old_config_serving() {
    let infra = Plane::start(MeshModel::default()).await;
    let (_a, a_addr) = backend(&infra, "backend-a").await;
    let plane = Plane::start_with_ca(model(&[a_addr]), infra.ca.clone()).await;
    let mut events = plane.cp.events();
    let client = plane.ready_mesh("client").await;
    assert_eq!(call(&client).await, (200, "backend-a".into()));
    let version_before = client.snapshot().xds_versions.get(CLUSTER).cloned();

    // The same cluster, now with lb_policy = 99 (no such policy): appending the field to the
    // encoded message overrides the generated value.
    let generated = plane.cp.model().generate(NS);
    let mut bad = generated[CLUSTER][CLUSTER_NAME].clone();
    bad.value.extend_from_slice(&[0x30, 99]);
    plane
        .cp
        .push_raw(CLUSTER, vec![(CLUSTER_NAME.to_owned(), bad)]);

    let message = next_event(&mut events, "NACK of the invalid cluster", |e| match e {
        XdsEvent::Nack {
            type_url, message, ..
        } if type_url == CLUSTER => Some(message.clone()),
        _ => None,
    })
    .await;
    assert!(
        message.contains(CLUSTER_NAME),
        "the NACK names the resource: {message}"
    );
    assert!(
        message.contains("lb_policy"),
        "the NACK names the field: {message}"
    );

    // The old configuration keeps serving, unchanged.
    for _ in 0..5 {
        assert_eq!(call(&client).await, (200, "backend-a".into()));
    }
    assert!(client.snapshot().cluster(CLUSTER_NAME).is_some());
    assert_eq!(
        client.snapshot().xds_versions.get(CLUSTER).cloned(),
        version_before
    );
    assert!(client.is_ready());

    // A valid update afterwards is taken: the stream was not wedged by the NACK.
    plane.cp.clear_raw();
    let (_b, b_addr) = backend(&infra, "backend-b").await;
    plane.cp.set_model(model(&[b_addr]));
    eventually("routing to backend-b after a valid update", || async {
        (call(&client).await == (200, "backend-b".into())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_reconnects_and_resumes() {
    let infra = Plane::start(MeshModel::default()).await;
    let (_a, a_addr) = backend(&infra, "backend-a").await;
    let (_b, b_addr) = backend(&infra, "backend-b").await;
    let plane = Plane::start_with_ca(model(&[a_addr]), infra.ca.clone()).await;
    let client = plane.ready_mesh("client").await;
    assert_eq!(call(&client).await, (200, "backend-a".into()));

    let mut events = plane.cp.events();
    plane.cp.cut_streams();
    next_event(&mut events, "the stream to close", |e| {
        matches!(e, XdsEvent::StreamClosed).then_some(())
    })
    .await;
    let node_id = next_event(&mut events, "the client to reconnect", |e| match e {
        XdsEvent::StreamOpened { node_id, delta, .. } => {
            assert!(*delta, "istiod's default is delta xDS");
            Some(node_id.clone())
        }
        _ => None,
    })
    .await;
    assert!(
        node_id.starts_with("sidecar~127.0.0.1~client-0.default~"),
        "{node_id}"
    );
    // Delta resumption: the new stream tells the server what the client already holds.
    let held = next_event(
        &mut events,
        "the cluster subscription on the new stream",
        |e| match e {
            XdsEvent::Subscribed {
                type_url,
                initial_resource_versions,
            } if type_url == CLUSTER => Some(initial_resource_versions.clone()),
            _ => None,
        },
    )
    .await;
    assert!(
        held.contains_key(CLUSTER_NAME),
        "initial_resource_versions: {held:?}"
    );

    // Traffic kept flowing on the last config, and an update reaches the new stream.
    assert_eq!(call(&client).await, (200, "backend-a".into()));
    plane.cp.set_model(model(&[b_addr]));
    eventually("routing to backend-b after the reconnect", || async {
        (call(&client).await == (200, "backend-b".into())).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(call(&client).await, (200, "backend-b".into()));
    }
}
