//! Certificate sources in the runtime: a Mesh given file-mounted certificates
//! (`cert-chain.pem`, `key.pem`, `root-cert.pem`, as `FILE_MOUNTED_CERTS` / the workload
//! credentials directory provide them) serves STRICT mTLS with exactly that certificate,
//! becomes ready without any CA, and presents a rotated file on the next handshake.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh::parts::xds::testkit::MeshModel;
use mesh::parts::xds::testkit::ca::IssuedCert;
use mesh::{CertificateSource, InboundTlsMode};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::mesh::{Echo, Plane, WAIT, eventually, node, ready, spiffe, temp_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

fn write_certs(dir: &Path, cert: &IssuedCert, root_pem: &str) {
    // Write to temporary names and rename, as kubelet's atomic writer swaps the files.
    for (name, contents) in [
        ("cert-chain.pem", cert.chain_pem.as_str()),
        ("key.pem", cert.key_pem.as_str()),
        ("root-cert.pem", root_pem),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// One GET over mTLS as `client`; returns the status and the server's leaf certificate.
async fn get(addr: SocketAddr, client: &IssuedCert) -> Result<(u16, Vec<u8>), String> {
    let provider = Arc::new(ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(support::mesh::AcceptAnyServer(provider)))
        .with_client_auth_cert(
            vec![CertificateDer::from(client.leaf_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client.key_der.clone())),
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"istio-http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    timeout(WAIT, async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("backend").map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or("no server certificate")?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
        Ok((status, leaf))
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_mounted_certificates_serve_mtls_and_rotate() {
    let plane = Plane::start(MeshModel {
        peer_authentication: InboundTlsMode::Strict,
        ..Default::default()
    })
    .await;
    // Nothing may come from the CA: it fails every request.
    plane.ca.set_failing(true);
    let dir = temp_dir("mounted-certs");
    let hour = Duration::from_secs(3600);
    let first = plane.ca.issue(&spiffe("backend"), hour);
    write_certs(&dir, &first, &plane.ca.root_pem());

    let server = plane
        .builder(node("backend-0", "backend"))
        .certificate(CertificateSource::Files(dir.clone()))
        .start()
        .await
        .unwrap();
    ready(&server).await;
    assert_eq!(
        server.certificates().current().map(|c| c.chain[0].clone()),
        Some(first.leaf_der.clone())
    );
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    let client = plane.ca.issue(&spiffe("sleep"), hour);
    let (status, leaf) = get(addr, &client).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        leaf, first.leaf_der,
        "the server presents the mounted certificate"
    );

    // Rotate the files: the next handshake presents the new certificate.
    let second = plane.ca.issue(&spiffe("backend"), hour);
    assert_ne!(second.leaf_der, first.leaf_der);
    write_certs(&dir, &second, &plane.ca.root_pem());
    eventually("the rotated certificate is presented", || async {
        match get(addr, &client).await {
            Ok((200, leaf)) if leaf == second.leaf_der => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        plane.ca.requests().is_empty(),
        "a file-mounted source must not ask the CA"
    );
}
