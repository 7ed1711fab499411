//! Real TLS handshakes over 127.0.0.1 between mesh-tower's client and server configurations.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::cluster::{SanMatcher, UpstreamTls};
use mesh_core::identity::PeerIdentity;
use mesh_core::{CertStore, SpiffeId, WorkloadCertificate};
use mesh_tower::tls::{self, TlsError};
use rustls::CertificateError;
use support::certs::{LeafKind, TestCa, TrustAnything};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(10);

/// What the server saw on one accepted connection.
#[derive(Debug)]
struct ServerSeen {
    peer: Option<PeerIdentity>,
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    cipher: Option<rustls::CipherSuite>,
}

fn store_with(cert: WorkloadCertificate) -> CertStore {
    let store = CertStore::new();
    store.set(cert);
    store
}

fn upstream(matchers: Vec<SanMatcher>) -> UpstreamTls {
    UpstreamTls {
        sni: SNI.into(),
        alpn: vec!["istio-peer-exchange".into(), "istio".into()],
        san_matchers: matchers,
    }
}

fn exact(id: &str) -> Vec<SanMatcher> {
    vec![SanMatcher::Exact(id.into())]
}

/// Accepts connections forever; reports each handshake and echoes bytes on success.
async fn spawn_server(
    config: Arc<rustls::ServerConfig>,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Result<ServerSeen, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                    Ok(mut stream) => {
                        let (_, conn) = stream.get_ref();
                        let seen = ServerSeen {
                            peer: conn.peer_certificates().map(tls::peer_identity),
                            sni: conn.server_name().map(str::to_owned),
                            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                            cipher: conn.negotiated_cipher_suite().map(|s| s.suite()),
                        };
                        let _ = tx.send(Ok(seen));
                        let mut buf = [0u8; 64];
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if stream.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(
    config: Arc<rustls::ClientConfig>,
    tls: &UpstreamTls,
    addr: SocketAddr,
) -> std::io::Result<ClientStream> {
    let tcp = TcpStream::connect(addr).await?;
    let name = tls::server_name(tls).expect("Istio SNI is a valid server name");
    tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake finished in time")
}

/// Writes `msg` and reads the echo: proves the connection carries data both ways.
async fn round_trip(stream: &mut ClientStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    stream.flush().await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    Ok(buf)
}

async fn next_seen(
    rx: &mut mpsc::UnboundedReceiver<Result<ServerSeen, String>>,
) -> Result<ServerSeen, String> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("server reported the handshake in time")
        .expect("server alive")
}

fn cert_error(err: &std::io::Error) -> Option<CertificateError> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(e) => Some(e.clone()),
        _ => None,
    }
}

fn spiffe(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa)
}

#[tokio::test]
async fn mtls_works_and_both_sides_see_the_peer_spiffe_id() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews"));
    let client_store = store_with(ca.workload("default", "productpage"));
    let (addr, mut seen) = spawn_server(tls::server_config(&server_store, true).unwrap()).await;

    let up = upstream(exact("spiffe://cluster.local/ns/default/sa/reviews"));
    let alpn: &[&[u8]] = &[b"istio-http/1.1"];
    let config = tls::client_config(&client_store, &up, Some(alpn)).unwrap();
    let mut stream = connect(config, &up, addr).await.expect("mTLS handshake");
    assert_eq!(round_trip(&mut stream, b"ping").await.unwrap(), b"ping");

    let client_view = tls::peer_identity(stream.get_ref().1.peer_certificates().unwrap());
    assert_eq!(client_view.spiffe_id, Some(spiffe("default", "reviews")));
    assert_eq!(
        client_view.uri_sans[..],
        ["spiffe://cluster.local/ns/default/sa/reviews".to_owned()]
    );
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"istio-http/1.1"[..])
    );

    let server_view = next_seen(&mut seen).await.expect("server accepted");
    assert_eq!(
        server_view.peer.and_then(|p| p.spiffe_id),
        Some(spiffe("default", "productpage"))
    );
    // The Istio SNI with underscores went out verbatim.
    assert_eq!(server_view.sni.as_deref(), Some(SNI));
    assert_eq!(server_view.alpn.as_deref(), Some(&b"istio-http/1.1"[..]));
    // Envoy's (BoringSSL's) TLS 1.3 preference, not rustls's AES-256-first default.
    assert_eq!(
        server_view.cipher,
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
}

#[tokio::test]
async fn client_offers_the_clusters_alpn_without_override() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews"));
    let client_store = store_with(ca.workload("default", "productpage"));
    let (addr, mut seen) = spawn_server(tls::server_config(&server_store, true).unwrap()).await;
    let up = upstream(vec![]);
    let mut stream = connect(
        tls::client_config(&client_store, &up, None).unwrap(),
        &up,
        addr,
    )
    .await
    .unwrap();
    round_trip(&mut stream, b"x").await.unwrap();
    // The server does not speak istio-peer-exchange; it picks `istio`.
    assert_eq!(
        next_seen(&mut seen).await.unwrap().alpn.as_deref(),
        Some(&b"istio"[..])
    );
}

#[tokio::test]
async fn client_refuses_bad_server_certificates() {
    let ca = TestCa::new("cluster.local");
    let client_store = store_with(ca.workload("default", "productpage"));
    let cases: Vec<(&str, WorkloadCertificate, Vec<SanMatcher>, CertificateError)> = vec![
        (
            "expired",
            ca.leaf("default", "reviews", LeafKind::Expired),
            vec![],
            CertificateError::Expired,
        ),
        (
            "not yet valid",
            ca.leaf("default", "reviews", LeafKind::NotYetValid),
            vec![],
            CertificateError::NotValidYet,
        ),
        (
            "other root",
            ca.signed_by_other_root("default", "reviews"),
            vec![],
            CertificateError::UnknownIssuer,
        ),
        (
            "self-signed",
            ca.self_signed("default", "reviews"),
            vec![],
            CertificateError::UnknownIssuer,
        ),
        (
            "SAN mismatch",
            ca.workload("default", "ratings"),
            exact("spiffe://cluster.local/ns/default/sa/reviews"),
            CertificateError::NotValidForName,
        ),
        (
            "no serverAuth usage",
            ca.leaf("default", "reviews", LeafKind::NoServerAuth),
            vec![],
            CertificateError::InvalidPurpose,
        ),
    ];
    for (name, server_cert, matchers, expected) in cases {
        // The server does not ask for much: optional client auth.
        let server_store = store_with(server_cert);
        let (addr, _seen) = spawn_server(tls::server_config(&server_store, false).unwrap()).await;
        let up = upstream(matchers);
        let config = tls::client_config(&client_store, &up, None).unwrap();
        let err = connect(config, &up, addr)
            .await
            .expect_err(&format!("{name}: the client must refuse the server"));
        assert_eq!(cert_error(&err), Some(expected), "{name}: {err}");
    }
}

#[tokio::test]
async fn san_matchers_accept_a_matching_prefix() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews"));
    let client_store = store_with(ca.workload("default", "productpage"));
    let (addr, _seen) = spawn_server(tls::server_config(&server_store, true).unwrap()).await;
    let up = upstream(vec![
        SanMatcher::Exact("spiffe://cluster.local/ns/default/sa/other".into()),
        SanMatcher::Prefix("spiffe://cluster.local/ns/default/".into()),
    ]);
    let mut stream = connect(
        tls::client_config(&client_store, &up, None).unwrap(),
        &up,
        addr,
    )
    .await
    .expect("prefix matcher accepts");
    round_trip(&mut stream, b"ok").await.unwrap();
}

fn client_without_cert() -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(TrustAnything))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn server_requiring_client_certs_refuses_a_client_without_one() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews"));
    let (addr, mut seen) = spawn_server(tls::server_config(&server_store, true).unwrap()).await;
    let up = upstream(vec![]);
    // With TLS 1.3 the client may finish its side first; the refusal shows on first use.
    let refused = match connect(client_without_cert(), &up, addr).await {
        Err(_) => true,
        Ok(mut stream) => round_trip(&mut stream, b"ping").await.is_err(),
    };
    assert!(refused, "client without a certificate must be refused");
    let err = next_seen(&mut seen).await.expect_err("server refused");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test]
async fn permissive_server_accepts_a_client_without_cert_and_sees_no_identity() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews"));
    let (addr, mut seen) = spawn_server(tls::server_config(&server_store, false).unwrap()).await;
    let up = upstream(vec![]);
    let mut stream = connect(client_without_cert(), &up, addr).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"hi").await.unwrap(), b"hi");
    assert!(next_seen(&mut seen).await.unwrap().peer.is_none());
}

#[tokio::test]
async fn server_refuses_bad_client_certificates_even_when_optional() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews"));
    let cases = [
        (
            "expired",
            ca.leaf("default", "sleep", LeafKind::Expired),
            CertificateError::Expired,
        ),
        (
            "not yet valid",
            ca.leaf("default", "sleep", LeafKind::NotYetValid),
            CertificateError::NotValidYet,
        ),
        (
            "other root",
            ca.signed_by_other_root("default", "sleep"),
            CertificateError::UnknownIssuer,
        ),
        (
            "self-signed",
            ca.self_signed("default", "sleep"),
            CertificateError::UnknownIssuer,
        ),
        (
            "no clientAuth usage",
            ca.leaf("default", "sleep", LeafKind::NoClientAuth),
            CertificateError::InvalidPurpose,
        ),
        (
            "no URI SAN",
            ca.leaf("default", "sleep", LeafKind::NoUriSan),
            CertificateError::NotValidForName,
        ),
    ];
    for require in [true, false] {
        let (addr, mut seen) =
            spawn_server(tls::server_config(&server_store, require).unwrap()).await;
        for (name, client_cert, expected) in &cases {
            let client_store = store_with(client_cert.clone());
            let up = upstream(vec![]);
            let config = tls::client_config(&client_store, &up, None).unwrap();
            let refused = match connect(config, &up, addr).await {
                Err(_) => true,
                Ok(mut stream) => round_trip(&mut stream, b"ping").await.is_err(),
            };
            assert!(
                refused,
                "{name} (required={require}): client must be refused"
            );
            let err = next_seen(&mut seen)
                .await
                .expect_err("server refused the handshake");
            let want = rustls::Error::InvalidCertificate(expected.clone()).to_string();
            assert!(err.contains(&want), "{name}: got {err:?}, want {want:?}");
        }
    }
}

#[tokio::test]
async fn rotation_applies_to_new_handshakes_and_keeps_established_connections() {
    let ca = TestCa::new("cluster.local");
    let server_store = store_with(ca.workload("default", "reviews-v1"));
    let client_store = store_with(ca.workload("default", "productpage"));
    let (addr, mut seen) = spawn_server(tls::server_config(&server_store, true).unwrap()).await;
    let up = upstream(vec![]);
    let config = tls::client_config(&client_store, &up, None).unwrap();

    let mut first = connect(config.clone(), &up, addr).await.unwrap();
    round_trip(&mut first, b"one").await.unwrap();
    let id =
        |s: &ClientStream| tls::peer_identity(s.get_ref().1.peer_certificates().unwrap()).spiffe_id;
    assert_eq!(id(&first), Some(spiffe("default", "reviews-v1")));
    next_seen(&mut seen).await.unwrap();

    // Rotate both sides; the same configurations pick the new certificates up.
    server_store.set(ca.workload("default", "reviews-v2"));
    client_store.set(ca.workload("default", "productpage-v2"));

    let mut second = connect(config, &up, addr).await.unwrap();
    round_trip(&mut second, b"two").await.unwrap();
    assert_eq!(id(&second), Some(spiffe("default", "reviews-v2")));
    let server_view = next_seen(&mut seen).await.unwrap();
    assert_eq!(
        server_view.peer.and_then(|p| p.spiffe_id),
        Some(spiffe("default", "productpage-v2"))
    );

    // The connection made before the rotation still carries data.
    assert_eq!(round_trip(&mut first, b"still").await.unwrap(), b"still");
}

#[tokio::test]
async fn rotation_to_a_new_root_is_used_for_verification() {
    let old_ca = TestCa::new("cluster.local");
    let new_ca = TestCa::new("cluster.local");
    let server_store = store_with(new_ca.workload("default", "reviews"));
    let client_store = store_with(old_ca.workload("default", "productpage"));
    let (addr, _seen) = spawn_server(tls::server_config(&server_store, false).unwrap()).await;
    let up = upstream(vec![]);
    let config = tls::client_config(&client_store, &up, None).unwrap();
    let err = connect(config.clone(), &up, addr)
        .await
        .expect_err("old root");
    assert_eq!(cert_error(&err), Some(CertificateError::UnknownIssuer));

    client_store.set(new_ca.workload("default", "productpage"));
    connect(config, &up, addr)
        .await
        .expect("trusts the new root");
}

#[test]
fn client_config_needs_a_loaded_certificate() {
    let err = tls::client_config(&CertStore::new(), &upstream(vec![]), None).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate));
}

#[test]
fn istio_snis_are_valid_server_names() {
    for sni in [
        SNI,
        "outbound_.9080_.v1_.reviews.default.svc.cluster.local",
        "outbound_.443_._.httpbin.org",
    ] {
        let name = tls::server_name(&UpstreamTls {
            sni: sni.into(),
            alpn: vec![],
            san_matchers: vec![],
        })
        .unwrap();
        assert_eq!(name.to_str(), sni);
    }
    assert!(
        tls::server_name(&UpstreamTls {
            sni: "not a host name".into(),
            alpn: vec![],
            san_matchers: vec![],
        })
        .is_err()
    );
}

#[test]
fn peer_identity_of_garbage_is_empty() {
    let id = tls::peer_identity(&[rustls_pki_types::CertificateDer::from(vec![1u8, 2, 3])]);
    assert_eq!(id.spiffe_id, None);
    assert!(id.uri_sans.is_empty());
    assert_eq!(tls::peer_identity(&[]).uri_sans.len(), 0);
}

#[tokio::test]
async fn refusals_are_counted_in_envoy_and_mesh_metrics() {
    let handle = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder installed");
    let ca = TestCa::new("cluster.local");
    let client_store = store_with(ca.workload("default", "productpage"));
    let server_store = store_with(ca.workload("default", "ratings"));
    let (addr, _seen) = spawn_server(tls::server_config(&server_store, false).unwrap()).await;
    let up = upstream(exact("spiffe://cluster.local/ns/default/sa/reviews"));
    connect(
        tls::client_config(&client_store, &up, None).unwrap(),
        &up,
        addr,
    )
    .await
    .expect_err("SAN mismatch");
    let text = handle.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("envoy_cluster_ssl_fail_verify_san ") && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(
        text.contains(
            r#"mesh_tls_handshake_failures_total{side="outbound",reason="san_mismatch"}"#
        ),
        "{text}"
    );
}
