//! `inbound::serve` with real sockets: TLS detection, mTLS modes, peer identity, HTTP/1.1 and
//! h2, graceful drain and Istio metrics.

use crate::support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::cluster::{Cluster, SanMatcher, ServiceMetadata, UpstreamTls};
use mesh_core::identity::PeerIdentity;
use mesh_core::listener::{InboundPolicy, InboundTlsMode};
use mesh_core::{CertStore, NodeIdentity, Snapshot, SnapshotCell, WorkloadCertificate};
use mesh_tower::inbound::{self, InboundConfig, RequestBody};
use mesh_tower::tls;
use support::certs::{LeafKind, TestCa, TrustAnything};
use support::inbound::InboundServer as Server;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(10);
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// Echoes what the app saw: the peer's SPIFFE ID (or `none`) and the HTTP version.
async fn app_handler(req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let peer = req
        .extensions()
        .get::<PeerIdentity>()
        .and_then(|p| p.spiffe_id.as_ref())
        .map(|id| id.to_string())
        .unwrap_or_else(|| "none".into());
    let body = format!("peer={peer} version={:?}", req.version());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn node(pod: &str) -> NodeIdentity {
    NodeIdentity::new(pod, "default", "10.1.2.3".parse().unwrap(), "reviews")
}

/// The inbound config of these tests: port 9080.
fn config(mode: Option<InboundTlsMode>, node: NodeIdentity) -> InboundConfig {
    support::inbound::config(9080, mode, node)
}

async fn start_default(ca: &TestCa, mode: Option<InboundTlsMode>) -> Server {
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    Server::start(
        tower::service_fn(app_handler),
        SnapshotCell::new(),
        certs,
        config(mode, node("reviews-v1-7f99c7d8b5-abcde")),
    )
    .await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

async fn tls_stream(
    addr: SocketAddr,
    client: WorkloadCertificate,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let store = CertStore::new();
    store.set(client);
    let up = UpstreamTls {
        sni: "outbound_.9080_._.reviews.default.svc.cluster.local".into(),
        alpn: vec![],
        san_matchers: vec![SanMatcher::Exact(SERVER_ID.into())],
    };
    let config = tls::client_config(&store, &up, Some(&[alpn])).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(&up).unwrap(), tcp)
        .await
}

/// Sends one GET over `io` and returns status and body.
async fn request<IO>(io: IO, proto: Proto, path: &str) -> hyper::Result<(StatusCode, String)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let req = Request::get(format!(
        "http://reviews.default.svc.cluster.local:9080{path}"
    ))
    .header("host", "reviews.default.svc.cluster.local:9080")
    .body(Empty::<Bytes>::new())
    .unwrap();
    let resp = match proto {
        Proto::H1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            send.send_request(req).await?
        }
        Proto::H2 => {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            send.send_request(req).await?
        }
    };
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A plaintext prior-knowledge h2 client connection (PERMISSIVE serves plaintext).
async fn h2c<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    hyper::client::conn::http2::Connection<TokioIo<TcpStream>, B, TokioExecutor>,
)
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap()
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("finished in time")
}

#[tokio::test]
async fn permissive_serves_plaintext_and_mtls_over_h1_and_h2() {
    let ca = TestCa::new("cluster.local");
    let server = start_default(&ca, None).await;
    for proto in [Proto::H1, Proto::H2] {
        let version = if proto == Proto::H1 {
            "HTTP/1.1"
        } else {
            "HTTP/2.0"
        };

        // Plaintext (h2 as prior-knowledge h2c): no identity.
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (status, body) = timed(request(tcp, proto, "/")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("peer=none version={version}"), "{proto:?}");

        // mTLS with Istio's ALPN and with the plain one.
        let alpns: [&[u8]; 2] = match proto {
            Proto::H1 => [b"istio-http/1.1", b"http/1.1"],
            Proto::H2 => [b"istio-h2", b"h2"],
        };
        for alpn in alpns {
            let stream = timed(tls_stream(
                server.addr,
                ca.workload("frontend", "productpage"),
                alpn,
            ))
            .await
            .expect("mTLS handshake");
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
            let (status, body) = timed(request(stream, proto, "/")).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                body,
                format!("peer=spiffe://cluster.local/ns/frontend/sa/productpage version={version}"),
                "{proto:?} {}",
                String::from_utf8_lossy(alpn)
            );
        }
    }
    server.shutdown().await;
}

/// Reads until EOF or error: `Ok(bytes)` when the server closed cleanly.
async fn read_to_close(mut tcp: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = timed(tcp.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn strict_closes_plaintext_connections_without_a_response() {
    let ca = TestCa::new("cluster.local");
    let server = start_default(&ca, Some(InboundTlsMode::Strict)).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(tcp).await.is_empty(), "no HTTP response");

    // mTLS still works in STRICT.
    let stream = timed(tls_stream(
        server.addr,
        ca.workload("default", "sleep"),
        b"h2",
    ))
    .await
    .unwrap();
    let (status, body) = timed(request(stream, Proto::H2, "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("sa/sleep"), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn strict_mode_comes_from_the_snapshot_per_port() {
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let cell = SnapshotCell::new();
    let mut snapshot = Snapshot::default();
    snapshot.inbound = Some(InboundPolicy {
        default_mode: InboundTlsMode::Permissive,
        per_port: HashMap::from([(9080, InboundTlsMode::Strict)]),
        ..InboundPolicy::default()
    });
    cell.publish(snapshot, true);
    let server = Server::start(
        tower::service_fn(app_handler),
        cell.clone(),
        certs,
        config(None, node("reviews-v1")),
    )
    .await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    assert!(timed(request(tcp, Proto::H1, "/")).await.is_err());

    // A new snapshot relaxes the port: the next connection sees it.
    let mut snapshot = Snapshot::default();
    snapshot.inbound = Some(InboundPolicy::default());
    cell.publish(snapshot, true);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (status, _) = timed(request(tcp, Proto::H1, "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn disable_closes_tls_connections_and_serves_plaintext() {
    let ca = TestCa::new("cluster.local");
    let server = start_default(&ca, Some(InboundTlsMode::Disable)).await;
    let refused = timed(async {
        match tls_stream(server.addr, ca.workload("default", "sleep"), b"http/1.1").await {
            Err(_) => true,
            Ok(stream) => request(stream, Proto::H1, "/").await.is_err(),
        }
    })
    .await;
    assert!(refused, "TLS must be refused in DISABLE");
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (status, body) = timed(request(tcp, Proto::H1, "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("peer=none"));
    server.shutdown().await;
}

#[tokio::test]
async fn clients_with_bad_certificates_are_refused() {
    let ca = TestCa::new("cluster.local");
    for mode in [InboundTlsMode::Strict, InboundTlsMode::Permissive] {
        let server = start_default(&ca, Some(mode)).await;
        for (name, cert) in [
            ("expired", ca.leaf("default", "sleep", LeafKind::Expired)),
            ("other root", ca.signed_by_other_root("default", "sleep")),
            ("self-signed", ca.self_signed("default", "sleep")),
        ] {
            let refused = timed(async {
                match tls_stream(server.addr, cert, b"http/1.1").await {
                    Err(_) => true,
                    Ok(stream) => request(stream, Proto::H1, "/").await.is_err(),
                }
            })
            .await;
            assert!(
                refused,
                "{mode:?}: {name} client certificate must be refused"
            );
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(Notify::new());
    let app = {
        let release = Arc::clone(&release);
        tower::service_fn(move |_req: Request<RequestBody>| {
            let started_tx = started_tx.clone();
            let release = Arc::clone(&release);
            async move {
                let _ = started_tx.send(());
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"slow done"))))
            }
        })
    };
    let server = Server::start(
        app,
        SnapshotCell::new(),
        certs,
        config(None, node("slow-v1")),
    )
    .await;
    let addr = server.addr;
    let in_flight = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        request(tcp, Proto::H1, "/slow").await
    });
    timed(started_rx.recv())
        .await
        .expect("request reached the app");

    let Server { stop, done, .. } = server;
    stop.unwrap().send(()).unwrap();
    // The listener closes: new connections are refused.
    let refused = timed(async {
        loop {
            match TcpStream::connect(addr).await {
                Err(_) => return true,
                Ok(tcp) => {
                    if read_to_close(tcp).await.is_empty() {
                        // Accepted just before the listener closed, then closed by the drain.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    return false;
                }
            }
        }
    })
    .await;
    assert!(refused);
    assert!(!done.is_finished(), "serve waits for the in-flight request");

    release.notify_one();
    let (status, body) = timed(in_flight)
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "slow done");
    timed(done).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_closes_idle_connections() {
    let ca = TestCa::new("cluster.local");
    let server = start_default(&ca, None).await;
    // One connection that never sends a byte, one idle keep-alive h2 connection.
    let silent = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = h2c(server.addr).await;
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get("http://x/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    server.shutdown().await;
    assert!(read_to_close(silent).await.is_empty());
    timed(conn)
        .await
        .unwrap()
        .expect("h2 connection closed by GOAWAY");
}

fn metric_lines(name: &str, must_contain: &[&str]) -> Vec<String> {
    let handle = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    handle
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| must_contain.iter().all(|m| l.contains(m)))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn istio_requests_total_is_recorded_with_reporter_destination() {
    let _ = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let mut node = node("metricsreviews-v3-7f99c7d8b5-abcde");
    node.labels.insert("app".into(), "reviews".into());
    node.labels.insert("version".into(), "v3".into());
    let cell = SnapshotCell::new();
    let mut snapshot = Snapshot::default();
    let mut cluster = Cluster::eds("inbound|9080||");
    cluster.service = Some(ServiceMetadata {
        host: "reviews.default.svc.cluster.local".into(),
        name: "reviews".into(),
        namespace: "default".into(),
    });
    snapshot
        .clusters
        .insert(cluster.name.clone(), Arc::new(cluster));
    cell.publish(snapshot, true);
    let server = Server::start(
        tower::service_fn(app_handler),
        cell,
        certs,
        config(None, node),
    )
    .await;

    // Two mTLS requests on one h2 connection, one plaintext HTTP/1.1 request.
    let stream = timed(tls_stream(
        server.addr,
        ca.workload("frontend", "productpage"),
        b"istio-h2",
    ))
    .await
    .unwrap();
    let io = TokioIo::new(stream);
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        let resp = timed(
            send.send_request(
                Request::get("http://reviews:9080/")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            ),
        )
        .await
        .unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    timed(request(tcp, Proto::H1, "/")).await.unwrap();
    server.shutdown().await;

    let ours = r#"destination_workload="metricsreviews-v3""#;
    let mtls = metric_lines(
        "istio_requests_total",
        &[
            ours,
            r#"reporter="destination""#,
            r#"source_principal="spiffe://cluster.local/ns/frontend/sa/productpage""#,
            r#"source_workload_namespace="frontend""#,
            r#"source_workload="unknown""#,
            r#"destination_principal="spiffe://cluster.local/ns/default/sa/reviews""#,
            r#"destination_app="reviews""#,
            r#"destination_version="v3""#,
            r#"destination_service="reviews.default.svc.cluster.local""#,
            r#"destination_service_name="reviews""#,
            r#"request_protocol="http""#,
            r#"response_code="200""#,
            r#"response_flags="-""#,
            r#"connection_security_policy="mutual_tls""#,
        ],
    );
    assert_eq!(mtls.len(), 1, "{mtls:?}");
    assert!(mtls[0].ends_with(" 2"), "{}", mtls[0]);

    let plain = metric_lines(
        "istio_requests_total",
        &[
            ours,
            r#"reporter="destination""#,
            r#"source_principal="unknown""#,
            r#"destination_principal="unknown""#,
            r#"connection_security_policy="none""#,
        ],
    );
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert!(plain[0].ends_with(" 1"), "{}", plain[0]);

    let durations = metric_lines("istio_request_duration_milliseconds_count", &[ours]);
    assert_eq!(durations.len(), 2, "{durations:?}");
    let response_bytes = metric_lines("istio_response_bytes_sum", &[ours, "mutual_tls"]);
    assert_eq!(response_bytes.len(), 1);
    // Two bodies of "peer=spiffe://cluster.local/ns/frontend/sa/productpage version=HTTP/2.0".
    let expected =
        2 * "peer=spiffe://cluster.local/ns/frontend/sa/productpage version=HTTP/2.0".len();
    assert!(
        response_bytes[0].ends_with(&format!(" {expected}")),
        "{}",
        response_bytes[0]
    );
}

#[tokio::test]
async fn grpc_status_from_trailers_is_recorded() {
    let _ = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let app = tower::service_fn(|_req: Request<RequestBody>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(http_body::Frame::trailers(trailers)),
        ]));
        let mut resp = Response::new(body);
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        Ok::<_, Infallible>(resp)
    });
    let server = Server::start(
        app,
        SnapshotCell::new(),
        certs,
        config(None, node("grpcmetrics-v1")),
    )
    .await;
    let (mut send, conn) = h2c(server.addr).await;
    tokio::spawn(conn);
    let resp = timed(
        send.send_request(
            Request::post("http://reviews:9080/pkg.Svc/Method")
                .header("content-type", "application/grpc")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "5");
    server.shutdown().await;
    let lines = metric_lines(
        "istio_requests_total",
        &[
            r#"destination_workload="grpcmetrics-v1""#,
            r#"request_protocol="grpc""#,
            r#"grpc_response_status="5""#,
            r#"response_code="200""#,
        ],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
}

async fn tls_without_client_cert(
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(TrustAnything))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("reviews.default.svc".try_into().unwrap(), tcp)
        .await
}

#[tokio::test]
async fn tls_without_client_certificate_is_served_in_permissive_only() {
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let server = Server::start(
        tower::service_fn(app_handler),
        SnapshotCell::new(),
        certs,
        config(None, node("tlsnocert-v1")),
    )
    .await;
    let stream = timed(tls_without_client_cert(server.addr)).await.unwrap();
    let (status, body) = timed(request(stream, Proto::H1, "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "peer=none version=HTTP/1.1");
    server.shutdown().await;
    // TLS without a client certificate is not mutual TLS, but the local SAN is known.
    let lines = metric_lines(
        "istio_requests_total",
        &[
            r#"destination_workload="tlsnocert-v1""#,
            r#"source_principal="unknown""#,
            r#"destination_principal="spiffe://cluster.local/ns/default/sa/reviews""#,
            r#"connection_security_policy="none""#,
        ],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");

    let server = start_default(&ca, Some(InboundTlsMode::Strict)).await;
    let refused = timed(async {
        match tls_without_client_cert(server.addr).await {
            Err(_) => true,
            Ok(stream) => request(stream, Proto::H1, "/").await.is_err(),
        }
    })
    .await;
    assert!(refused, "STRICT requires a client certificate");
    server.shutdown().await;
    assert!(
        !metric_lines(
            "mesh_tls_handshake_failures_total",
            &[r#"reason="no_client_certificate""#]
        )
        .is_empty()
    );
}

/// A PERMISSIVE server for `app` whose connections go idle after 300 ms.
async fn start_with_idle_timeout<S, B>(app: S, pod: &str) -> Server
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let mut config = config(None, node(pod));
    config.idle_timeout = Some(Duration::from_millis(300));
    Server::start(app, SnapshotCell::new(), certs, config).await
}

/// Sends one request on a new plaintext HTTP/1.1 keep-alive connection; returns the status and
/// a receiver that fires when the server closes the connection.
async fn one_request_then_watch(
    addr: SocketAddr,
    path: &str,
) -> (StatusCode, oneshot::Receiver<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let (closed, on_close) = oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = closed.send(());
    });
    let req = Request::get(path)
        .header("host", "reviews")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = timed(send.send_request(req)).await.unwrap();
    let status = resp.status();
    timed(resp.into_body().collect()).await.unwrap();
    // Keep the sender: dropping it would let the client close the connection itself.
    tokio::spawn(async move {
        let _keep = send;
        std::future::pending::<()>().await
    });
    (status, on_close)
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout_and_active_ones_stay() {
    let app = tower::service_fn(|req: Request<RequestBody>| async move {
        if req.uri().path() == "/slow" {
            // Active for four and a half idle timeouts.
            tokio::time::sleep(Duration::from_millis(1350)).await;
        }
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let server = start_with_idle_timeout(app, "idle-v1").await;

    // An idle keep-alive connection is closed by the server: not before a whole idle timeout
    // has passed since its request.
    let (status, mut closed) = one_request_then_watch(server.addr, "/").await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(closed.try_recv().is_err(), "closed before the idle timeout");
    timed(closed)
        .await
        .expect("the server closes an idle connection");

    // A request in progress for longer than the idle timeout keeps its connection: it is
    // answered, and the connection stays open after it until the next idle check (checks run
    // every 300 ms from the connection's start: the one at 1 500 ms closes it).
    let started = std::time::Instant::now();
    let (status, mut closed) = one_request_then_watch(server.addr, "/slow").await;
    assert_eq!(status, StatusCode::OK, "the active request was answered");
    assert!(started.elapsed() >= Duration::from_millis(1350));
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        closed.try_recv().is_err(),
        "the connection was marked idle while its request was active"
    );
    timed(closed)
        .await
        .expect("then the idle connection closes");
}

#[tokio::test]
async fn an_idle_h2_connection_is_sent_goaway_and_closed_after_the_idle_timeout() {
    let server = start_with_idle_timeout(tower::service_fn(app_handler), "idle-h2-v1").await;

    let (mut send, conn) = h2c(server.addr).await;
    let (closed, mut on_close) = oneshot::channel();
    tokio::spawn(async move {
        // A GOAWAY with no stream in flight ends the client connection cleanly.
        let _ = closed.send(conn.await.is_ok());
    });
    let req = Request::get("http://reviews/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = timed(send.send_request(req)).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = timed(resp.into_body().collect()).await.unwrap().to_bytes();
    assert!(body.starts_with(b"peer=none version=HTTP/2"), "{body:?}");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        on_close.try_recv().is_err(),
        "closed before the idle timeout"
    );
    let clean = timed(on_close)
        .await
        .expect("the server ends an idle h2 connection");
    assert!(
        clean,
        "the connection ended with an error instead of a GOAWAY"
    );
    assert!(
        send.is_closed(),
        "the client may not open new streams after the GOAWAY"
    );
}

#[tokio::test]
async fn header_read_timeout_closes_slow_clients() {
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "reviews"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = InboundConfig {
        port: 9080,
        mode: None,
        node: node("slowloris-v1"),
        header_read_timeout: Some(Duration::from_millis(200)),
        idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
        drain: None,
        ext_authz: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(inbound::serve(
        listener,
        tower::service_fn(app_handler),
        SnapshotCell::new(),
        certs,
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // Half a request line, then silence: hyper gives up on the headers and closes.
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: rev").await.unwrap();
    let mut out = Vec::new();
    let _ = timed(tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("200 OK"), "{text}");
    stop.send(()).unwrap();
    timed(done).await.unwrap().unwrap();
}
