//! CPU cost of one Istio mTLS handshake as mesh makes it: mesh's client configuration
//! (SPIFFE SAN matcher, workload certificate, ALPN `istio-http/1.1`) against mesh's inbound
//! server configuration (client certificate required, chain checked against the roots, peer
//! SAN prefix `spiffe://cluster.local/`), ECDSA P-256 leaves as istiod issues them, TLS 1.3,
//! no resumption (mesh disables it). Both ends run in memory, so the figure is the handshake's
//! CPU work for client plus server, without sockets.

#![allow(missing_docs)] // criterion_group! generates undocumented items

#[path = "../tests/support/certs.rs"]
#[allow(dead_code)]
mod certs;

use std::sync::Arc;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use mesh_core::CertStore;
use mesh_core::cluster::{SanMatcher, UpstreamTls};
use mesh_tower::tls;

fn handshake(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    sni: &rustls_pki_types::ServerName<'static>,
) {
    let mut c = rustls::ClientConnection::new(Arc::clone(client), sni.clone()).expect("client");
    let mut s = rustls::ServerConnection::new(Arc::clone(server)).expect("server");
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client write");
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).expect("server read");
            s.process_new_packets().expect("server accepts the client");
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server write");
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).expect("client read");
            c.process_new_packets().expect("client accepts the server");
        }
    }
    panic!("handshake did not finish");
}

fn bench(c: &mut Criterion) {
    let ca = certs::TestCa::new("cluster.local");
    let client_store = CertStore::new();
    client_store.set(ca.workload("default", "sleep"));
    let server_store = CertStore::new();
    server_store.set(ca.workload("default", "httpbin"));
    let upstream = UpstreamTls {
        sni: "outbound_.8000_._.httpbin.default.svc.cluster.local".into(),
        alpn: vec!["istio-http/1.1".into()],
        san_matchers: vec![SanMatcher::Exact(
            "spiffe://cluster.local/ns/default/sa/httpbin".into(),
        )],
    };
    let client = tls::client_config(&client_store, &upstream, None).expect("client config");
    let peer_sans: tls::PeerSanSource =
        Arc::new(|| vec![SanMatcher::Prefix("spiffe://cluster.local/".into())]);
    let server = tls::server_config_with_peer_sans(&server_store, true, Some(peer_sans))
        .expect("server config");
    let sni = tls::server_name(&upstream).expect("sni");
    handshake(&client, &server, &sni);
    c.bench_function("mtls_handshake/istio_ecdsa_p256_tls13", |b| {
        b.iter(|| handshake(black_box(&client), black_box(&server), &sni))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
