//! A port istiod renders as a TCP proxy (`tcp-*`): `inbound::serve` still serves the app over
//! HTTP, but reports what the sidecar's tcp_proxy chain reports: `istio_tcp_*` per connection
//! with `reporter="destination"`, byte counts equal to what crossed the connection, and no
//! request metrics.

use crate::support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_core::cluster::{Cluster, SanMatcher, ServiceMetadata, UpstreamTls};
use mesh_core::listener::{InboundPolicy, InboundProtocol};
use mesh_core::{CertStore, NodeIdentity, Snapshot, SnapshotCell, WorkloadCertificate};
use mesh_tower::tls;
use support::certs::TestCa;
use support::inbound::InboundServer as Server;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const TCP_PORT: u16 = 5432;
const HTTP_PORT: u16 = 9080;
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/ledger";

/// Answers with the length of the request body it read.
async fn app<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: http_body::Body,
{
    let read = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Ok(Response::new(Full::new(Bytes::from(format!(
        "read={read}"
    )))))
}

/// The client's side of the connection, counting what its HTTP client wrote and read.
struct Counted<T> {
    inner: T,
    written: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The inbound listener under test, serving `app`.
async fn start_server(
    cell: SnapshotCell,
    certs: CertStore,
    port: u16,
    node: NodeIdentity,
) -> Server {
    Server::start(
        tower::service_fn(app),
        cell,
        certs,
        support::inbound::config(port, None, node),
    )
    .await
}

fn node(pod: &str) -> NodeIdentity {
    let mut node = NodeIdentity::new(pod, "default", "10.1.2.3".parse().unwrap(), "ledger");
    node.labels.insert("app".into(), "ledger".into());
    node.labels.insert("version".into(), "v2".into());
    node
}

/// A snapshot where `TCP_PORT` is a TCP proxy port and every other port is sniffed (HTTP).
fn snapshot() -> SnapshotCell {
    let cell = SnapshotCell::new();
    let mut snapshot = Snapshot::default();
    for port in [TCP_PORT, HTTP_PORT] {
        let mut cluster = Cluster::eds(format!("inbound|{port}||"));
        cluster.service = Some(ServiceMetadata {
            host: "ledger.default.svc.cluster.local".into(),
            name: "ledger".into(),
            namespace: "default".into(),
        });
        snapshot
            .clusters
            .insert(cluster.name.clone(), Arc::new(cluster));
    }
    snapshot.inbound = Some(InboundPolicy {
        port_protocol: HashMap::from([(TCP_PORT, InboundProtocol::Tcp)]),
        ..InboundPolicy::default()
    });
    cell.publish(snapshot, true);
    cell
}

async fn tls_stream(
    addr: SocketAddr,
    client: WorkloadCertificate,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_stream_offering(addr, client, &[b"istio-http/1.1"]).await
}

/// An mTLS connection to the server offering the ALPN protocols `alpn`.
async fn tls_stream_offering(
    addr: SocketAddr,
    client: WorkloadCertificate,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let store = CertStore::new();
    store.set(client);
    let up = UpstreamTls {
        sni: "outbound_.5432_._.ledger.default.svc.cluster.local".into(),
        alpn: vec![],
        san_matchers: vec![SanMatcher::Exact(SERVER_ID.into())],
    };
    let config = tls::client_config(&store, &up, Some(alpn)).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(config).connect(tls::server_name(&up).unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

/// Sends `bodies` as POSTs over one kept-alive HTTP/1.1 connection, closes it and returns
/// the bytes the client wrote and read.
async fn exchange<IO>(io: IO, bodies: &[&str]) -> (u64, u64)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let written = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let io = Counted {
        inner: io,
        written: Arc::clone(&written),
        read: Arc::clone(&read),
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for body in bodies {
        let req = Request::post("/ledger")
            .header("host", "ledger.default.svc.cluster.local:5432")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        tokio::time::timeout(WAIT, send.ready())
            .await
            .expect("connection ready in time")
            .expect("connection still open");
        let resp = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .expect("response in time")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, format!("read={}", body.len()));
    }
    // Closing: the connection task ends and drops the stream.
    drop(send);
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("client connection closed in time")
        .unwrap()
        .unwrap();
    (
        written.load(Ordering::Relaxed),
        read.load(Ordering::Relaxed),
    )
}

/// Every exposition line of `name` mentioning all of `needles`.
fn lines(name: &str, needles: &[&str]) -> Vec<String> {
    let handle = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    handle
        .render()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) until the server reported the connection closed.
async fn wait_closed(needles: &[&str]) {
    tokio::time::timeout(WAIT, async {
        while lines("istio_tcp_connections_closed_total", needles).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the close was reported")
}

/// Istio's TCP label set (reporter="destination"), in emission order.
fn tcp_labels(workload: &str, source_principal: &str, source_ns: &str, mtls: bool) -> String {
    let destination_principal = if mtls { SERVER_ID } else { "unknown" };
    let policy = if mtls { "mutual_tls" } else { "none" };
    format!(
        "reporter=\"destination\",source_workload=\"unknown\",source_canonical_service=\"unknown\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"{source_ns}\",\
source_principal=\"{source_principal}\",source_app=\"unknown\",source_version=\"unknown\",\
source_cluster=\"unknown\",destination_workload=\"{workload}\",\
destination_workload_namespace=\"default\",destination_principal=\"{destination_principal}\",\
destination_app=\"ledger\",destination_version=\"v2\",\
destination_service=\"ledger.default.svc.cluster.local\",destination_canonical_service=\"ledger\",\
destination_canonical_revision=\"v2\",destination_service_name=\"ledger\",\
destination_service_namespace=\"default\",destination_cluster=\"Kubernetes\",\
request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"{policy}\""
    )
}

fn assert_tcp_families(labels: &str, needles: &[&str], written: u64, read: u64) {
    for (family, value) in [
        ("istio_tcp_connections_opened_total", 1),
        ("istio_tcp_connections_closed_total", 1),
        ("istio_tcp_received_bytes_total", written),
        ("istio_tcp_sent_bytes_total", read),
    ] {
        assert_eq!(
            lines(family, needles),
            vec![format!("{family}{{{labels}}} {value}")],
            "{family}"
        );
    }
}

/// mesh's recorder installed, a CA and the server's certificate.
fn setup() -> (TestCa, CertStore) {
    let _ = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    let ca = TestCa::new("cluster.local");
    let certs = CertStore::new();
    certs.set(ca.workload("default", "ledger"));
    (ca, certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_report_istio_tcp_metrics_per_connection() {
    let (ca, certs) = setup();
    let workload = "tcpledger-v2";
    let needle = format!("destination_workload=\"{workload}\"");
    let server = start_server(
        snapshot(),
        certs,
        TCP_PORT,
        node("tcpledger-v2-7f99c7d8b5-abcde"),
    )
    .await;

    // mTLS: three requests on one kept-alive connection, then close.
    let stream = tls_stream(server.addr, ca.workload("frontend", "teller")).await;
    let (written, read) = exchange(stream, &["credit 10", "debit 3", ""]).await;
    assert!(written > 0 && read > 0);
    let mtls = tcp_labels(
        workload,
        "spiffe://cluster.local/ns/frontend/sa/teller",
        "frontend",
        true,
    );
    let mtls_needles = [needle.as_str(), "connection_security_policy=\"mutual_tls\""];
    wait_closed(&mtls_needles).await;
    assert_tcp_families(&mtls, &mtls_needles, written, read);

    // Plaintext: its own series.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (plain_written, plain_read) = exchange(tcp, &["balance"]).await;
    let plain_needles = [needle.as_str(), "connection_security_policy=\"none\""];
    wait_closed(&plain_needles).await;
    let plain = tcp_labels(workload, "unknown", "unknown", false);
    assert_tcp_families(&plain, &plain_needles, plain_written, plain_read);
    // The mTLS series did not move.
    assert_tcp_families(&mtls, &mtls_needles, written, read);

    // No request metrics for the TCP port.
    for family in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_count",
        "istio_request_bytes_count",
        "istio_response_bytes_count",
    ] {
        assert_eq!(lines(family, &[&needle]), Vec::<String>::new(), "{family}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ports_keep_request_metrics_and_report_no_tcp_metrics() {
    let (_ca, certs) = setup();
    let needle = "destination_workload=\"httpledger-v2\"";
    let server = start_server(
        snapshot(),
        certs,
        HTTP_PORT,
        node("httpledger-v2-7f99c7d8b5-abcde"),
    )
    .await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    exchange(tcp, &["a", "b"]).await;
    server.shutdown().await;
    let requests = lines("istio_requests_total", &[needle]);
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].ends_with(" 2"), "{}", requests[0]);
    assert!(requests[0].contains("request_protocol=\"http\""));
    for family in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        assert_eq!(lines(family, &[needle]), Vec::<String>::new(), "{family}");
    }
}

/// A client that negotiates `istio-peer-exchange` on a TCP port and never sends its frame
/// does not hold up the drain: the server's wait for the frame ends with the shutdown (not
/// after `PEER_EXCHANGE_TIMEOUT`) and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_a_peer_exchange_waiting_for_a_silent_client() {
    use tokio::io::AsyncReadExt;
    let (ca, certs) = setup();
    let mut server = start_server(
        snapshot(),
        certs,
        TCP_PORT,
        node("silentledger-v2-7f99c7d8b5-abcde"),
    )
    .await;
    let mut stream = tls_stream_offering(
        server.addr,
        ca.workload("frontend", "teller"),
        &[b"istio-peer-exchange", b"istio"],
    )
    .await;
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"istio-peer-exchange"[..])
    );
    // The server's frame arrives: it is now waiting for ours, which never comes.
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("the server's frame in time")
        .expect("read");
    assert!(n > 0, "the server sent its frame");

    let _ = server.stop.take().unwrap().send(());
    // Well under PEER_EXCHANGE_TIMEOUT (10 s): the drain does not wait for the frame.
    let bound = mesh_tower::peer_exchange::PEER_EXCHANGE_TIMEOUT / 2;
    tokio::time::timeout(bound, &mut server.done)
        .await
        .expect("serve returned after shutdown without waiting for the peer's frame")
        .unwrap()
        .unwrap();
    // The server closed the connection: the client reads to its end (or a reset).
    let rest = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the connection was closed");
}
