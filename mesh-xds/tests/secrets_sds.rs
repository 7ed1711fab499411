//! The SDS client against a real SDS server on a Unix socket (the testkit one), with
//! certificates from the testkit CA.

use crate::secrets_support;

use std::time::Duration;

use mesh_core::{CertStore, SpiffeId};
use mesh_xds::secrets::testing::TestSdsServer;
use mesh_xds::secrets::{
    CertificateSource, SdsClient, SourceSignals, WORKLOAD_SDS_SOCKET, select_certificate_source,
};
use mesh_xds::testkit::ca::TestCa;
use secrets_support::{TempDir, eventually, wait_for};

const NODE: &str = "sidecar~10.0.0.1~reviews-v1-abc.prod~prod.svc.cluster.local";

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "prod", sa)
}

fn client(server: &TestSdsServer, store: &CertStore) -> SdsClient {
    SdsClient::new(server.socket(), NODE, store.clone())
        .with_backoff(Duration::from_millis(20), Duration::from_millis(100))
}

#[tokio::test]
async fn socket_at_the_workload_path_selects_sds_and_the_client_installs_default_and_rootca() {
    let dir = TempDir::new("sds");
    let socket = dir.path().join(WORKLOAD_SDS_SOCKET);
    let server = TestSdsServer::start(&socket).unwrap();
    let signals = SourceSignals::gather(dir.path(), &|_| None, "istiod.istio-system.svc:15012");
    assert_eq!(
        select_certificate_source(&signals),
        CertificateSource::Sds {
            socket: socket.clone()
        }
    );

    let ca = TestCa::new("cluster.local");
    let issued = ca.issue(&id("reviews"), Duration::from_secs(3600));
    server.set_secrets(
        issued.leaf_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        ca.root_pem().as_bytes(),
    );
    let store = CertStore::new();
    let task = tokio::spawn(client(&server, &store).run());
    let cert = wait_for(&store, "the SDS certificate", |_| true).await;
    assert_eq!(cert.identity, id("reviews"));
    assert_eq!(cert.chain, vec![issued.leaf_der.clone()]);
    assert_eq!(cert.roots, vec![ca.root_der()]);
    assert_eq!(cert.private_key, issued.key_der);

    // The subscription names both secrets and carries the node; the response is ACKed.
    eventually("an ACK", || server.requests().len() >= 2).await;
    let requests = server.requests();
    assert_eq!(requests[0].node_id, NODE);
    assert_eq!(requests[0].resource_names, vec!["default", "ROOTCA"]);
    assert_eq!(requests[0].response_nonce, "");
    assert_eq!(requests[1].version_info, "1");
    assert_eq!(requests[1].response_nonce, "nonce-1");
    assert_eq!(requests[1].error, None);
    task.abort();
}

#[tokio::test]
async fn rotation_and_trust_bundle_changes_are_pushed_to_the_store() {
    let dir = TempDir::new("sds");
    let server = TestSdsServer::start(&dir.path().join("sds.sock")).unwrap();
    let ca = TestCa::new("cluster.local");
    let first = ca.issue(&id("reviews"), Duration::from_secs(3600));
    server.set_secrets(
        first.leaf_pem.as_bytes(),
        first.key_pem.as_bytes(),
        ca.root_pem().as_bytes(),
    );
    let store = CertStore::new();
    let task = tokio::spawn(client(&server, &store).run());
    wait_for(&store, "the first certificate", |c| {
        c.chain[0] == first.leaf_der
    })
    .await;

    // A new `default` alone: new leaf, same roots.
    let second = ca.issue(&id("reviews"), Duration::from_secs(3600));
    server.set_default(second.leaf_pem.as_bytes(), second.key_pem.as_bytes());
    let cert = wait_for(&store, "the rotated leaf", |c| {
        c.chain[0] == second.leaf_der
    })
    .await;
    assert_eq!(cert.roots, vec![ca.root_der()]);

    // A new `ROOTCA` with an added root: both roots trusted, same leaf.
    let other = TestCa::new("cluster.local");
    server.set_roots(format!("{}{}", ca.root_pem(), other.root_pem()).as_bytes());
    let cert = wait_for(&store, "two roots", |c| c.roots.len() == 2).await;
    assert_eq!(cert.roots, vec![ca.root_der(), other.root_der()]);
    assert_eq!(cert.chain[0], second.leaf_der);

    // And the old root removed.
    server.set_roots(other.root_pem().as_bytes());
    let cert = wait_for(&store, "the old root removed", |c| c.roots.len() == 1).await;
    assert_eq!(cert.roots, vec![other.root_der()]);
    task.abort();
}

#[tokio::test]
async fn a_bad_secret_is_nacked_and_the_current_certificate_stays() {
    let dir = TempDir::new("sds");
    let server = TestSdsServer::start(&dir.path().join("sds.sock")).unwrap();
    let ca = TestCa::new("cluster.local");
    let good = ca.issue(&id("reviews"), Duration::from_secs(3600));
    server.set_secrets(
        good.leaf_pem.as_bytes(),
        good.key_pem.as_bytes(),
        ca.root_pem().as_bytes(),
    );
    let store = CertStore::new();
    let task = tokio::spawn(client(&server, &store).run());
    wait_for(&store, "the good certificate", |_| true).await;

    // A leaf with somebody else's key (a half-done rotation upstream).
    let other = ca.issue(&id("reviews"), Duration::from_secs(3600));
    server.set_default(good.leaf_pem.as_bytes(), other.key_pem.as_bytes());
    eventually("a NACK", || {
        server.requests().iter().any(|r| r.error.is_some())
    })
    .await;
    let nack = server
        .requests()
        .into_iter()
        .find(|r| r.error.is_some())
        .unwrap();
    assert_eq!(nack.response_nonce, "nonce-2");
    // A NACK carries the last accepted version.
    assert_eq!(nack.version_info, "1");
    assert!(
        nack.error
            .as_deref()
            .unwrap()
            .contains("does not belong to the leaf"),
        "{nack:?}"
    );
    assert_eq!(store.current().unwrap().chain[0], good.leaf_der);

    // A leaf without a SPIFFE identity is refused too.
    let (server_chain, server_key) = ca.server_identity(&["istiod.istio-system.svc"]);
    server.set_default(server_chain.as_bytes(), server_key.as_bytes());
    eventually("a second NACK", || {
        server
            .requests()
            .iter()
            .filter(|r| r.error.is_some())
            .count()
            >= 2
    })
    .await;
    assert_eq!(store.current().unwrap().chain[0], good.leaf_der);
    task.abort();
}

#[tokio::test]
async fn the_client_waits_for_the_socket_and_reconnects_after_a_server_restart() {
    let dir = TempDir::new("sds");
    let socket = dir.path().join("sds.sock");
    let store = CertStore::new();
    // No server yet: the client retries.
    let task = tokio::spawn(
        SdsClient::new(&socket, NODE, store.clone())
            .with_backoff(Duration::from_millis(20), Duration::from_millis(100))
            .run(),
    );
    let ca = TestCa::new("cluster.local");
    let first = ca.issue(&id("reviews"), Duration::from_secs(3600));
    let mut server = TestSdsServer::start(&socket).unwrap();
    server.set_secrets(
        first.leaf_pem.as_bytes(),
        first.key_pem.as_bytes(),
        ca.root_pem().as_bytes(),
    );
    wait_for(&store, "the first certificate", |c| {
        c.chain[0] == first.leaf_der
    })
    .await;

    server.stop();
    drop(server);
    // The store keeps the certificate while the server is away.
    assert_eq!(store.current().unwrap().chain[0], first.leaf_der);

    let second = ca.issue(&id("ratings"), Duration::from_secs(3600));
    let server = TestSdsServer::start(&socket).unwrap();
    server.set_secrets(
        second.leaf_pem.as_bytes(),
        second.key_pem.as_bytes(),
        ca.root_pem().as_bytes(),
    );
    let cert = wait_for(&store, "the certificate after restart", |c| {
        c.chain[0] == second.leaf_der
    })
    .await;
    assert_eq!(cert.identity, id("ratings"));
    task.abort();
}
