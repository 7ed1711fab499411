//! The Envoy peer harness itself: two real Envoy 1.40 sidecars with Istio-shaped static
//! configuration carry a request app-client → outbound Envoy → mTLS → inbound Envoy → app,
//! and the inbound sidecar refuses a TLS client without a certificate.
//!
//! Skips (with the reason printed) when Envoy is not installed and `CI` is not set.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::ring;
use rustls_pki_types::ServerName;
use support::envoy::{
    EnvoyProcess, InboundMode, SidecarBootstrap, SidecarCerts, envoy_binary, free_port,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(15);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const SERVICE: &str = "server.default.svc.cluster.local";

/// A root and two SPIFFE leaves shaped like istiod's (empty subject, URI SAN, server+client auth).
struct Pki {
    client: SidecarCerts,
    server: SidecarCerts,
}

fn pki() -> Pki {
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.distinguished_name = DistinguishedName::new();
    root_params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let root_pem = root.pem();
    let issuer = Issuer::new(root_params, root_key);
    let leaf = |spiffe: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe.try_into().unwrap())];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        SidecarCerts {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            root_pem: root_pem.clone(),
        }
    };
    Pki {
        client: leaf(CLIENT_ID),
        server: leaf(SERVER_ID),
    }
}

/// The app behind the inbound sidecar: answers 200 with the XFCC header it received.
async fn start_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "path={}\nxfcc={xfcc}\n",
                        req.uri().path()
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
async fn http_get(port: u16, host: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// A TLS client with no certificate, offering Istio's HTTP/1.1 ALPN so that the inbound mTLS
/// chain is selected. Returns what it could read after sending a request.
async fn request_without_client_cert(port: u16) -> Result<String, String> {
    let provider = Arc::new(ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(support::mesh::AcceptAnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"istio-http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(format!("outbound_.8080_._.{SERVICE}")).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = format!("GET / HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw).await {
        Ok(_) => Ok(String::from_utf8_lossy(&raw).to_string()),
        Err(e) => Err(format!("read: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_crosses_two_envoy_sidecars_over_istio_mtls() {
    let Some(_) = envoy_binary() else { return };
    let pki = pki();
    let app = start_app().await;

    let inbound_port = free_port();
    let inbound = EnvoyProcess::start(
        &SidecarBootstrap::new("server-0", "default", pki.server.clone())
            .inbound(inbound_port, app.port(), InboundMode::Strict)
            .to_yaml(),
    );

    let outbound_port = free_port();
    let wrong_san_port = free_port();
    let inbound_addr: SocketAddr = ([127, 0, 0, 1], inbound_port).into();
    let outbound = EnvoyProcess::start(
        &SidecarBootstrap::new("client-0", "default", pki.client.clone())
            .outbound(outbound_port, 8080, SERVICE, inbound_addr, SERVER_ID)
            // Same peer, but expecting another identity: must fail verification.
            .outbound(
                wrong_san_port,
                8081,
                "impostor.default.svc.cluster.local",
                inbound_addr,
                CLIENT_ID,
            )
            .to_yaml(),
    );

    let (status, body) = timeout(WAIT, http_get(outbound_port, SERVICE, "/hello"))
        .await
        .unwrap();
    assert_eq!(
        status,
        200,
        "body: {body}\n--- outbound ---\n{}\n--- inbound ---\n{}",
        outbound.logs(),
        inbound.logs()
    );
    assert!(body.contains("path=/hello"), "{body}");
    // The app sees the caller's SPIFFE ID (and the inbound sidecar's own) in XFCC.
    assert!(body.contains(&format!("URI={CLIENT_ID}")), "{body}");
    assert!(body.contains(&format!("By={SERVER_ID}")), "{body}");

    // It really went over TLS to the inbound sidecar's mTLS chain.
    let cluster = format!("cluster.outbound|8080||{SERVICE}");
    assert!(outbound.wait_for_stat(&format!("{cluster}.ssl.handshake"), 1) >= 1);
    assert_eq!(
        outbound.wait_for_stat(&format!("{cluster}.upstream_rq_200"), 1),
        1
    );
    let inbound_cluster = format!("cluster.inbound|{}||", app.port());
    assert_eq!(
        inbound.wait_for_stat(&format!("{inbound_cluster}.upstream_rq_200"), 1),
        1
    );

    // Short names the outbound virtual host answers, as istiod generates them.
    let (status, _) = timeout(WAIT, http_get(outbound_port, "server.default:8080", "/"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Unknown host: REGISTRY_ONLY block_all.
    let (status, _) = timeout(WAIT, http_get(outbound_port, "elsewhere.example.com", "/"))
        .await
        .unwrap();
    assert_eq!(status, 502);

    // Expecting another SPIFFE ID than the peer presents: the upstream TLS fails (503 UF).
    let (status, body) = timeout(
        WAIT,
        http_get(wrong_san_port, "impostor.default.svc.cluster.local", "/"),
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "{body}");
    let impostor = "cluster.outbound|8081||impostor.default.svc.cluster.local";
    assert!(outbound.wait_for_stat(&format!("{impostor}.ssl.fail_verify_san"), 1) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_sidecar_refuses_a_tls_client_without_a_certificate() {
    let Some(_) = envoy_binary() else { return };
    let pki = pki();
    let app = start_app().await;
    let inbound_port = free_port();
    let inbound = EnvoyProcess::start(
        &SidecarBootstrap::new("server-0", "default", pki.server.clone())
            .inbound(inbound_port, app.port(), InboundMode::Strict)
            .to_yaml(),
    );
    let no_cert = format!("listener.127.0.0.1_{inbound_port}.ssl.fail_verify_no_cert");
    assert_eq!(inbound.stat(&no_cert), Some(0), "{}", inbound.logs());

    let outcome = timeout(WAIT, request_without_client_cert(inbound_port))
        .await
        .unwrap();
    if let Ok(text) = &outcome {
        assert!(
            !text.contains(" 200 "),
            "served without a client certificate: {text}"
        );
    }
    assert!(
        inbound.wait_for_stat(&no_cert, 1) >= 1,
        "outcome: {outcome:?}"
    );
    assert_eq!(
        inbound.stat(&format!(
            "cluster.inbound|{}||.upstream_rq_total",
            app.port()
        )),
        Some(0)
    );

    // Plaintext is not accepted in STRICT mode either.
    let mut s = TcpStream::connect(("127.0.0.1", inbound_port))
        .await
        .unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = timeout(WAIT, s.read_to_end(&mut raw)).await.unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains(" 200 "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_inbound_also_serves_plaintext() {
    let Some(_) = envoy_binary() else { return };
    let pki = pki();
    let app = start_app().await;
    let inbound_port = free_port();
    let _inbound = EnvoyProcess::start(
        &SidecarBootstrap::new("server-0", "default", pki.server.clone())
            .inbound(inbound_port, app.port(), InboundMode::Permissive)
            .to_yaml(),
    );
    let (status, body) = timeout(WAIT, http_get(inbound_port, SERVICE, "/plain"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // No client certificate, so nothing is appended to XFCC.
    assert!(body.contains("xfcc=\n"), "{body}");
}
