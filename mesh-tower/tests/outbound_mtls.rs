//! The outbound path over Istio mTLS, against a real rustls server that requires a client
//! certificate chaining to the mesh root: SNI and ALPN as Envoy sends them, SAN checks, h2,
//! and certificate rotation for new connections.

use crate::support::certs;
use crate::support_outbound;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use certs::TestCa;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::cluster::{Cluster, SanMatcher, UpstreamProtocol, UpstreamTls};
use mesh_core::endpoint::{Endpoint, EndpointTlsMode};
use mesh_core::flags::ResponseFlag;
use mesh_core::route::RouteAction;
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell, WorkloadCertificate};
use mesh_tower::outbound::Outbound;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support_outbound::*;
use tokio::net::TcpListener;

const A: &str = "outbound|9080||a.default.svc.cluster.local";
const SNI: &str = "outbound_.9080_._.a.default.svc.cluster.local";
const A_ID: &str = "spiffe://cluster.local/ns/default/sa/a";

struct TlsUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

/// A rustls server presenting `cert`, requiring a client certificate from `ca`'s root.
async fn tls_upstream(ca: &TestCa, cert: &WorkloadCertificate) -> TlsUpstream {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.root_der())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            cert.chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.private_key.clone())),
        )
        .unwrap();
    // What an Envoy sidecar's inbound HTTP mTLS filter chain matches.
    config.alpn_protocols = vec![b"istio-h2".to_vec(), b"istio-http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (connections.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let (c, r) = (c.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (_, session) = tls.get_ref();
                let alpn =
                    String::from_utf8_lossy(session.alpn_protocol().unwrap_or(b"-")).into_owned();
                let sni = session.server_name().unwrap_or("-").to_owned();
                let client_cert = session
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| {
                        format!(
                            "{:x}",
                            c.len() + c.iter().map(|b| *b as usize).sum::<usize>()
                        )
                    })
                    .unwrap_or_default();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let resp = Response::builder()
                        .header("x-alpn", alpn.clone())
                        .header("x-sni", sni.clone())
                        .header("x-client-cert", client_cert.clone())
                        .header("x-version", format!("{:?}", req.version()))
                        .header(
                            "connection",
                            if req.uri().path() == "/close" {
                                "close"
                            } else {
                                "keep-alive"
                            },
                        )
                        .body(Full::new(Bytes::from_static(b"secure")))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsUpstream {
        addr,
        connections,
        requests,
        _task: AbortOnDrop(task),
    }
}

fn mtls_snapshot(addr: SocketAddr, san: &str, protocol: UpstreamProtocol) -> mesh_core::Snapshot {
    let mut c = Cluster::eds(A);
    c.protocol = protocol;
    c.istio_tls = Some(UpstreamTls {
        sni: SNI.into(),
        alpn: vec!["istio-peer-exchange".into(), "istio".into()],
        san_matchers: vec![SanMatcher::Exact(san.into())],
    });
    let mut e = Endpoint::new(addr);
    e.tls_mode = EndpointTlsMode::Istio;
    snapshot(
        1,
        9080,
        vec![vhost(
            "a",
            &["a:9080"],
            RouteAction::Cluster(A.into()),
            None,
        )],
        vec![(c, vec![e])],
        OutboundTrafficPolicy::RegistryOnly,
    )
}

fn client(ca: &TestCa, cell: &SnapshotCell) -> (Outbound, CertStore) {
    let store = CertStore::new();
    store.set(ca.workload("default", "bookinfo-productpage"));
    (Outbound::new(cell.clone(), store.clone(), node()), store)
}

#[tokio::test]
async fn mtls_with_matching_san_uses_istio_alpn_and_sni() {
    bounded(async {
        let handle = mesh_tower::telemetry::prometheus_handle().expect("recorder");
        let ca = TestCa::new("cluster.local");
        let up = tls_upstream(&ca, &ca.workload("default", "a")).await;
        let cell = SnapshotCell::new();
        cell.publish(mtls_snapshot(up.addr, A_ID, UpstreamProtocol::Http1), true);
        let (out, _) = client(&ca, &cell);
        for _ in 0..3 {
            let r = out.get("http://a:9080/").await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.body(), "secure");
            assert_eq!(r.headers()["x-alpn"], "istio-http/1.1");
            assert_eq!(r.headers()["x-sni"], SNI);
            assert_ne!(
                r.headers()["x-client-cert"],
                "",
                "client certificate presented"
            );
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
        let text = handle.render();
        assert!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains(&format!("destination_principal=\"{A_ID}\""))
                && l.contains("response_code=\"200\"")),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn mtls_h2_negotiates_istio_h2() {
    bounded(async {
        let ca = TestCa::new("cluster.local");
        let up = tls_upstream(&ca, &ca.workload("default", "a")).await;
        let cell = SnapshotCell::new();
        cell.publish(mtls_snapshot(up.addr, A_ID, UpstreamProtocol::Http2), true);
        let (out, _) = client(&ca, &cell);
        for _ in 0..3 {
            let r = out.get("http://a:9080/").await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-alpn"], "istio-h2");
            assert_eq!(r.headers()["x-version"], "HTTP/2.0");
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn san_mismatch_is_503_uf_with_envoys_tls_reason() {
    bounded(async {
        let ca = TestCa::new("cluster.local");
        let up = tls_upstream(&ca, &ca.workload("default", "a")).await;
        let cell = SnapshotCell::new();
        cell.publish(
            mtls_snapshot(up.addr, "spiffe://cluster.local/ns/default/sa/b", UpstreamProtocol::Http1),
            true,
        );
        let (out, _) = client(&ca, &cell);
        let r = out.get("http://a:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(*r.extensions().get::<ResponseFlag>().unwrap(), ResponseFlag::UpstreamConnectionFailure);
        let body = std::str::from_utf8(r.body()).unwrap();
        assert!(
            body.starts_with(
                "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: TLS_error:"
            ),
            "{body}"
        );
        assert!(body.contains("CERTIFICATE_VERIFY_FAILED"), "{body}");
        assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn server_from_another_root_is_503_uf() {
    bounded(async {
        let ca = TestCa::new("cluster.local");
        let up = tls_upstream(&ca, &ca.signed_by_other_root("default", "a")).await;
        let cell = SnapshotCell::new();
        cell.publish(mtls_snapshot(up.addr, A_ID, UpstreamProtocol::Http1), true);
        let (out, _) = client(&ca, &cell);
        let r = out.get("http://a:9080/").await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(std::str::from_utf8(r.body()).unwrap().contains("TLS_error"));
        assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn rotated_certificate_is_used_by_new_connections() {
    bounded(async {
        let ca = TestCa::new("cluster.local");
        let up = tls_upstream(&ca, &ca.workload("default", "a")).await;
        let cell = SnapshotCell::new();
        cell.publish(mtls_snapshot(up.addr, A_ID, UpstreamProtocol::Http1), true);
        let (out, store) = client(&ca, &cell);
        let first = out.get("http://a:9080/close").await.unwrap();
        let again = out.get("http://a:9080/close").await.unwrap();
        assert_eq!(
            first.headers()["x-client-cert"],
            again.headers()["x-client-cert"]
        );
        store.set(ca.workload("default", "bookinfo-productpage"));
        let rotated = out.get("http://a:9080/close").await.unwrap();
        assert_eq!(rotated.status(), 200);
        assert_ne!(
            first.headers()["x-client-cert"],
            rotated.headers()["x-client-cert"]
        );
        assert_eq!(up.connections.load(Ordering::SeqCst), 3);
    })
    .await;
}
