//! Inbound telemetry over real sockets: Istio's peer metadata exchange (read and strip the
//! caller's headers, label `source_*` from them, answer with ours only when asked), request id
//! and trace context headers, and Envoy's listener / HTTP connection manager stats.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh_core::peer_metadata::{
    PEER_METADATA_HEADER, PEER_METADATA_ID_HEADER, PeerMetadata, PeerMetadataHeaders,
};
use mesh_core::{CertStore, NodeIdentity, SnapshotCell};
use mesh_tower::inbound::RequestBody;
use support::inbound::InboundServer;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// Echoes the request headers the app saw, one `name: value` per line.
async fn echo_headers(req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut body = String::new();
    for (k, v) in req.headers() {
        body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn node(pod: &str, app: &str, version: &str) -> NodeIdentity {
    let mut n = NodeIdentity::new(pod, "default", "10.1.2.3".parse().unwrap(), app);
    n.labels.insert("app".into(), app.into());
    n.labels.insert("version".into(), version.into());
    n.cluster_id = "server-cluster".into();
    n
}

async fn start(node: NodeIdentity, port: u16) -> InboundServer {
    let _ = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    InboundServer::start(
        tower::service_fn(echo_headers),
        SnapshotCell::new(),
        CertStore::new(),
        support::inbound::config(port, None, node),
    )
    .await
}

async fn get(addr: SocketAddr, headers: &[(&str, &str)]) -> (HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get("/").header("host", "reviews:9080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        WAIT,
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (headers, String::from_utf8(body.to_vec()).unwrap())
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
async fn peer_metadata_is_read_stripped_and_answered() {
    let server_node = node("pmratings-v1-7f99c7d8b5-abcde", "ratings", "v1");
    let server = start(server_node.clone(), 9181).await;
    let addr = server.addr;

    let mut client = node("pmproductpage-v1-6b746f74dc-9stvs", "productpage", "v1");
    client.cluster_id = "client-cluster".into();
    client.labels.insert(
        "service.istio.io/canonical-revision".into(),
        "version-1".into(),
    );
    let sent = PeerMetadataHeaders::for_node(&client);

    // Two requests on separate connections with the same metadata, one without.
    for _ in 0..2 {
        let (headers, seen) = get(
            addr,
            &[
                (PEER_METADATA_ID_HEADER, &sent.id),
                (PEER_METADATA_HEADER, &sent.metadata),
            ],
        )
        .await;
        assert!(
            !seen.contains("x-envoy-peer-metadata"),
            "stripped before the app: {seen}"
        );
        // Our own headers come back because the request carried the caller's.
        assert_eq!(headers[PEER_METADATA_ID_HEADER], server_node.node_id());
        let ours = PeerMetadata::decode_header(headers[PEER_METADATA_HEADER].as_bytes()).unwrap();
        assert_eq!(ours, PeerMetadata::from_node(&server_node));
        assert_eq!(ours.workload_labels().workload, "pmratings-v1");
    }
    let (headers, _) = get(addr, &[]).await;
    assert!(
        !headers.contains_key(PEER_METADATA_HEADER),
        "only when asked"
    );
    assert!(!headers.contains_key(PEER_METADATA_ID_HEADER));

    // Garbage metadata: the peer is unknown, the request is served, we still answer.
    let (headers, _) = get(
        addr,
        &[
            (PEER_METADATA_ID_HEADER, "x"),
            (PEER_METADATA_HEADER, "%%%"),
        ],
    )
    .await;
    assert!(headers.contains_key(PEER_METADATA_HEADER));

    let labelled = metric_lines(
        "istio_requests_total",
        &[
            r#"reporter="destination""#,
            r#"source_workload="pmproductpage-v1""#,
            r#"source_canonical_service="productpage""#,
            r#"source_canonical_revision="version-1""#,
            r#"source_workload_namespace="default""#,
            r#"source_principal="unknown""#,
            r#"source_app="productpage""#,
            r#"source_version="v1""#,
            r#"source_cluster="client-cluster""#,
            r#"destination_workload="pmratings-v1""#,
            r#"destination_cluster="server-cluster""#,
            r#"connection_security_policy="none""#,
        ],
    );
    assert_eq!(labelled.len(), 1, "{labelled:?}");
    assert!(labelled[0].ends_with(" 2"), "{}", labelled[0]);
    let unknown = metric_lines(
        "istio_requests_total",
        &[
            r#"source_workload="unknown""#,
            r#"destination_workload="pmratings-v1""#,
        ],
    );
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(unknown[0].ends_with(" 2"), "{}", unknown[0]);
}

#[tokio::test]
async fn request_id_and_trace_context_reach_the_app() {
    let server = start(node("trratings-v1-7f99c7d8b5-abcde", "ratings", "v1"), 9182).await;
    let addr = server.addr;
    let (_, seen) = get(addr, &[]).await;
    let id = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("a request id was created");
    assert_eq!(id.len(), 36);
    assert!(!seen.contains("traceparent"), "no trace is started: {seen}");

    let (_, seen) = get(
        addr,
        &[
            ("x-request-id", "caller-id"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert!(seen.contains("x-request-id: caller-id\n"), "{seen}");
    assert!(seen.contains("tracestate: congo=t61rcWkgMzE\n"), "{seen}");
    let tp = seen
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(tp.ends_with("-01"));
    assert!(!tp.contains("00f067aa0ba902b7"), "a new parent id: {tp}");
}

#[tokio::test]
async fn envoy_listener_and_http_stats_count_connections_and_requests() {
    let server = start(node("stratings-v1-7f99c7d8b5-abcde", "ratings", "v1"), 9183).await;
    let addr = server.addr;
    for _ in 0..3 {
        get(addr, &[]).await;
    }
    // Named as an Istio sidecar's Envoy names them (Istio's bootstrap stats tags).
    let prefix = r#"http_conn_manager_prefix="inbound_0.0.0.0_9183""#;
    let rq = metric_lines("envoy_http_downstream_rq_total", &[prefix]);
    assert_eq!(rq.len(), 1, "{rq:?}");
    assert!(rq[0].ends_with(" 3"), "{}", rq[0]);
    let xx = metric_lines(
        "envoy_http_downstream_rq",
        &[prefix, r#"response_code_class="2xx""#],
    );
    assert!(xx[0].ends_with(" 3"), "{xx:?}");
    let cx = metric_lines("envoy_http_downstream_cx_total", &[prefix]);
    assert!(cx[0].ends_with(" 3"), "{cx:?}");
    let listener = metric_lines(
        "envoy_listener_downstream_cx_total",
        &[r#"listener_address="0.0.0.0_15006""#],
    );
    assert_eq!(listener.len(), 1, "{listener:?}");
    server.shutdown().await;
}
