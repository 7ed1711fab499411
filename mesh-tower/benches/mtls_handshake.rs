//! CPU cost of one Istio mTLS handshake as mesh makes it: mesh's client configuration
//! (SPIFFE SAN matcher, workload certificate, ALPN `istio-http/1.1`) against mesh's inbound
//! server configuration (client certificate required, chain checked against the roots, peer
//! SAN prefix `spiffe://cluster.local/`), ECDSA P-256 leaves as istiod issues them, TLS 1.3,
//! no resumption (mesh disables it). Both ends run in memory, so the figure is the handshake's
//! CPU work for client plus server, without sockets.
//!
//! `tls_record`: the record protection a meshed HTTP/1.1 request and its response cost on one
//! established connection (client seals the request head with Istio's headers, server opens
//! it, server seals the response, client opens it), with the suite mesh negotiates
//! (AES-128-GCM, Envoy's preference) and, for comparison, with a client that offers only
//! AES-256-GCM (rustls's own first choice); `plaintext_copy` copies the same bytes once each
//! way, the floor any transport pays.

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
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let mut c = rustls::ClientConnection::new(Arc::clone(client), sni.clone()).expect("client");
    let mut s = rustls::ServerConnection::new(Arc::clone(server)).expect("server");
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return (c, s);
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

    let (request, response) = meshed_http1_messages();
    let mut g = c.benchmark_group("tls_record");
    let mut wire = Vec::with_capacity(16 * 1024);
    let mut out = vec![0u8; 16 * 1024];
    let aes256 = aes256_only_client(&ca);
    for (name, client, suite) in [
        (
            "aes128gcm_mesh",
            &client,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            "aes256gcm",
            &aes256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        ),
    ] {
        let (cc, sc) = handshake(client, &server, &sni);
        let mut cc = rustls::Connection::Client(cc);
        let mut sc = rustls::Connection::Server(sc);
        assert_eq!(cc.negotiated_cipher_suite().map(|s| s.suite()), Some(suite));
        g.bench_function(format!("request_and_response/{name}"), |b| {
            b.iter(|| {
                transfer(&mut cc, &mut sc, &request, &mut wire, &mut out);
                transfer(&mut sc, &mut cc, &response, &mut wire, &mut out);
            })
        });
    }
    g.bench_function("request_and_response/plaintext_copy", |b| {
        b.iter(|| {
            wire.clear();
            wire.extend_from_slice(black_box(&request));
            out[..wire.len()].copy_from_slice(&wire);
            wire.clear();
            wire.extend_from_slice(black_box(&response));
            out[..wire.len()].copy_from_slice(&wire);
            black_box(&out);
        })
    });
    g.finish();
}

/// A meshed HTTP/1.1 GET and its response as they cross the wire between two sidecars: the
/// Istio headers (peer metadata both ways, `x-request-id`, `x-envoy-attempt-count`), with the
/// `x-envoy-peer-metadata` an Istio 1.24 sidecar really sent.
fn meshed_http1_messages() -> (Vec<u8>, Vec<u8>) {
    const ISTIO_1_24: &str = include_str!("../../testdata/istio/peer-metadata-istio1.24.txt");
    let field = |key: &str| {
        ISTIO_1_24
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .expect("field in testdata")
    };
    let (id, metadata) = (field("id"), field("metadata"));
    let request = format!(
        "GET /productpage HTTP/1.1\r\nhost: httpbin.default.svc.cluster.local:8000\r\n\
         user-agent: curl/8.5.0\r\naccept: */*\r\n\
         x-request-id: 4c1f6a4e-3f1d-4b6e-9a0a-6f6d2b9e5c1a\r\nx-envoy-attempt-count: 1\r\n\
         x-forwarded-proto: http\r\nx-envoy-peer-metadata-id: {id}\r\n\
         x-envoy-peer-metadata: {metadata}\r\n\r\n"
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\
         date: Mon, 07 Dec 2026 06:00:00 GMT\r\nx-envoy-upstream-service-time: 1\r\n\
         x-envoy-peer-metadata-id: {id}\r\nx-envoy-peer-metadata: {metadata}\r\n\r\nok"
    );
    (request.into_bytes(), response.into_bytes())
}

/// Seals `plaintext` on `from` into records, hands them to `to` and reads the plaintext back.
fn transfer(
    from: &mut rustls::Connection,
    to: &mut rustls::Connection,
    plaintext: &[u8],
    wire: &mut Vec<u8>,
    out: &mut [u8],
) {
    use std::io::{Read, Write};
    from.writer()
        .write_all(plaintext)
        .expect("buffer plaintext");
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).expect("seal");
    }
    let mut records = wire.as_slice();
    while !records.is_empty() {
        to.read_tls(&mut records).expect("read records");
        to.process_new_packets().expect("open");
    }
    let mut got = 0;
    while got < plaintext.len() {
        got += to.reader().read(&mut out[got..]).expect("plaintext");
    }
    assert_eq!(got, plaintext.len());
}

/// A client with the same workload certificate that offers only TLS 1.3 AES-256-GCM (and does
/// not check the server: only the record cost is compared).
fn aes256_only_client(ca: &certs::TestCa) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    let cert = ca.workload("default", "sleep");
    let chain = cert
        .chain
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.private_key.clone().into());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(certs::TrustAnything))
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    Arc::new(config)
}

criterion_group!(benches, bench);
criterion_main!(benches);
