//! Whole-library test helpers: a testkit control plane with its CA, meshed workloads started
//! the way a user's app starts them (certificate from the CA through a token file, delta xDS,
//! status ports on free loopback ports), an echo app that reports what mesh told it, and
//! small HTTP/TLS clients for poking at ports from the outside.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{ControlPlane, MeshModel, XdsEvent};
use mesh::{Mesh, MeshBuilder, NodeIdentity, PeerIdentity, SpiffeId};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Namespace of every workload in these tests.
pub const NS: &str = "default";
/// Trust domain of the testkit CA.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);

static DIRS: AtomicU32 = AtomicU32::new(0);

/// `spiffe://cluster.local/ns/default/sa/<sa>`.
pub fn spiffe(sa: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, NS, sa)
}

/// A node for pod `<sa>-0` (or `pod`) on 127.0.0.1 in [`NS`].
pub fn node(pod: &str, sa: &str) -> NodeIdentity {
    let mut n = NodeIdentity::new(pod, NS, "127.0.0.1".parse().expect("ip"), sa);
    n.labels.insert("app".into(), sa.into());
    n.workload_name = sa.into();
    n
}

/// A fresh temporary directory (removed by the OS's tmp cleanup; names are unique per run).
pub fn temp_dir(what: &str) -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("mesh-it-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// The testkit control plane (ADS + Istio CA, plaintext gRPC on 127.0.0.1) and its CA.
pub struct Plane {
    /// The control plane.
    pub cp: ControlPlane,
    /// Its CA (shared with the control plane: `set_failing` affects it).
    pub ca: TestCa,
    /// Where token files go.
    pub dir: PathBuf,
}

impl Plane {
    /// Starts a control plane serving `model`, with a fresh CA for `cluster.local`.
    pub async fn start(model: MeshModel) -> Plane {
        Plane::start_with_ca(model, TestCa::new(TRUST_DOMAIN)).await
    }

    /// Starts a control plane serving `model` with `ca` as its CA.
    pub async fn start_with_ca(model: MeshModel, ca: TestCa) -> Plane {
        let cp = ControlPlane::builder()
            .ca(ca.clone())
            .model(model)
            .start()
            .await
            .expect("control plane starts");
        Plane {
            cp,
            ca,
            dir: temp_dir("plane"),
        }
    }

    /// Writes a projected-token-shaped file for `sa` in [`NS`] and returns its path.
    pub fn token_file(&self, pod: &str, sa: &str) -> PathBuf {
        let path = self.dir.join(format!("{pod}.token"));
        std::fs::write(&path, self.ca.token_for(NS, sa)).expect("write token");
        path
    }

    /// A builder for `node` as the quickstart starts workloads: xDS and CA at this plane
    /// (plaintext), the token file for the node's service account, listeners on 127.0.0.1,
    /// status ports on free ports.
    pub fn builder(&self, node: NodeIdentity) -> MeshBuilder {
        let addr = self.cp.addr().to_string();
        let token = self.token_file(&node.pod_name, &node.service_account);
        Mesh::builder(node)
            .discovery_address(addr.clone(), false, None)
            .ca_address(addr, false, None)
            .token_path(token)
            .bind_address("127.0.0.1".parse().expect("ip"))
            .status_ports(Some(0), Some(0), Some(0))
    }

    /// Starts a meshed workload `<sa>-0` with service account `sa` (not waiting for readiness).
    pub async fn mesh(&self, sa: &str) -> Mesh {
        self.builder(node(&format!("{sa}-0"), sa))
            .start()
            .await
            .expect("mesh starts")
    }

    /// Starts a meshed workload and waits (bounded) until it is ready.
    pub async fn ready_mesh(&self, sa: &str) -> Mesh {
        let m = self.mesh(sa).await;
        ready(&m).await;
        m
    }
}

/// Waits (bounded by [`WAIT`]) until `mesh` is ready.
pub async fn ready(mesh: &Mesh) {
    timeout(WAIT, mesh.ready())
        .await
        .expect("mesh ready (config + certificate) in time");
}

/// Polls `f` every 20 ms until it returns `Some`, for at most [`WAIT`]; panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let r = timeout(WAIT, async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match r {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Waits for the first control-plane event `pick` accepts.
pub async fn next_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<XdsEvent>,
    what: &str,
    mut pick: impl FnMut(&XdsEvent) -> Option<T>,
) -> T {
    let r = timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(v) = pick(&e) {
                        return v;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("control plane events ended: {e}"),
            }
        }
    })
    .await;
    match r {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for control plane event: {what}"),
    }
}

/// The echo app behind mesh: answers
/// `server=<name>\npeer=<SPIFFE ID or none>\nxfcc=<header>\npath=<path>\n`.
/// `/slow?ms=N` sleeps N ms first. Counts the requests it served.
#[derive(Clone)]
pub struct Echo {
    name: Arc<str>,
    hits: Arc<AtomicUsize>,
}

impl Echo {
    /// An echo app reporting `name`.
    pub fn new(name: &str) -> Echo {
        Echo {
            name: name.into(),
            hits: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Requests that reached the app.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The app as a tower service.
    pub fn service(&self) -> EchoService {
        EchoService(self.clone())
    }

    async fn answer<B>(self, req: Request<B>) -> Response<Full<Bytes>> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        if req.uri().path() == "/slow" {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.spiffe_id.as_ref().map(|s| s.to_string()))
            .unwrap_or_else(|| "none".into());
        let xfcc = req
            .headers()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Response::new(Full::new(Bytes::from(format!(
            "server={}\npeer={peer}\nxfcc={xfcc}\npath={}\n",
            self.name,
            req.uri().path()
        ))))
    }

    /// Serves the app behind `mesh` on a fresh 127.0.0.1 port; returns the address and the
    /// serving task (ends after the mesh drains).
    pub async fn serve_meshed(
        &self,
        mesh: &Mesh,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Result<(), mesh::MeshError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let m = mesh.clone();
        let svc = self.service();
        let task = tokio::spawn(async move { m.serve_on(listener, svc).await });
        (addr, task)
    }

    /// Serves the app without mesh (plain HTTP/1.1, e.g. behind an Envoy sidecar).
    pub async fn serve_plain(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let svc = this.service();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(stream),
                            hyper::service::service_fn(move |r| {
                                let mut s = svc.clone();
                                tower::Service::call(&mut s, r)
                            }),
                        )
                        .await;
                });
            }
        });
        addr
    }
}

/// [`Echo`] as a `tower::Service`.
#[derive(Clone)]
pub struct EchoService(Echo);

impl<B: Send + 'static> tower::Service<Request<B>> for EchoService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move { Ok(echo.answer(req).await) })
    }
}

/// The value of `key=` on its own line in an echo body.
pub fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or("")
}

/// A plain HTTP/1.1 GET (`Host: host`) to `addr`, bounded by [`WAIT`]: (status, body).
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    timeout(WAIT, async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()))
}

/// GET `path` on a pod-facing port of `mesh`; panics if the port is off or does not answer.
pub async fn status_get(
    mesh: &Mesh,
    port: mesh::parts::tower::status::StatusPort,
    path: &str,
) -> (u16, String) {
    let addr = mesh.status_addr(port).expect("status port is on");
    http_get(addr, "localhost", path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// Accepts any server certificate (its handshake signature is still checked): for clients that
/// test the server refusing or admitting *them*.
#[derive(Debug)]
pub struct AcceptAnyServer(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client certificate for [`tls_request`]: leaf DER and PKCS#8 key DER.
pub struct ClientCert {
    /// Leaf (and intermediates), DER.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 private key, DER.
    pub key: Vec<u8>,
}

/// Opens TLS to `addr` offering Istio's HTTP/1.1 ALPN (`istio-http/1.1`), with `cert` or no
/// client certificate, sends one GET and returns what came back: `Err` when the handshake,
/// the write or the read failed (a refusal), `Ok(text)` otherwise (possibly empty).
pub async fn tls_request(addr: SocketAddr, cert: Option<ClientCert>) -> Result<String, String> {
    let provider = Arc::new(ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                c.chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key)),
            )
            .map_err(|e| format!("client cert: {e}"))?,
    };
    config.alpn_protocols = vec![b"istio-http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    timeout(WAIT, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("outbound_.8080_._.server.default.svc.cluster.local")
            .map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        tls.read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()))
}

/// Asserts that a [`tls_request`] outcome is a refusal: no HTTP response came back.
pub fn assert_refused(outcome: &Result<String, String>, what: &str) {
    if let Ok(text) = outcome {
        assert!(
            !text.starts_with("HTTP/"),
            "{what}: the server answered instead of refusing: {text}"
        );
    }
}

/// One HTTP/1.1 request over Istio mTLS (ALPN `istio-http/1.1`, SNI `sni`) to `addr` with
/// `config`'s client identity: `head` is the request head without its final blank line
/// (`GET /x HTTP/1.1\r\nHost: h\r\n…`); `Content-Length: 0` and `Connection: close` are
/// added. Returns the status and the body, or why there was none.
pub async fn istio_mtls_request(
    config: rustls::ClientConfig,
    addr: SocketAddr,
    sni: &str,
    head: &str,
) -> Result<(u16, String), String> {
    let req = format!("{head}Content-Length: 0\r\nConnection: close\r\n\r\n");
    istio_mtls_raw(config, addr, sni, req.as_bytes()).await
}

/// Sends `raw` bytes over Istio mTLS (ALPN `istio-http/1.1`) and reads until the server
/// closes: (status, body) of the first HTTP/1.1 response.
pub async fn istio_mtls_raw(
    mut config: rustls::ClientConfig,
    addr: SocketAddr,
    sni: &str,
    raw: &[u8],
) -> Result<(u16, String), String> {
    config.alpn_protocols = vec![b"istio-http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    timeout(WAIT, async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(raw)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()))
}
