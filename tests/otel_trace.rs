//! OTLP export of mesh's request spans (feature `otel`): a meshed client calls a meshed server
//! with the caller's W3C trace context; a test OTLP collector (the real `TraceService` over
//! gRPC) receives one client and one server span that join the caller's trace with exactly
//! the ids propagated in `traceparent`.

mod support;
#[path = "support/trace_app.rs"]
mod trace_app;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use mesh_otel::testkit::{ExportedSpan, SpanKind};
use support::mesh::{NS, Plane, WAIT, eventually, field};
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
/// The calling application's own span id.
const APP_SPAN: &str = "00f067aa0ba902b7";

fn one(spans: &[ExportedSpan], kind: SpanKind) -> &ExportedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.kind == kind).collect();
    assert_eq!(found.len(), 1, "one {kind:?} span in the trace: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_client_and_server_spans_join_the_callers_trace() {
    let (collector, guard) = trace_app::install_exporter("productpage.default", Some(100.0)).await;

    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("details").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serving = server.clone();
    tokio::spawn(async move {
        serving
            .serve_on(listener, tower::service_fn(trace_app::app))
            .await
    });
    plane.cp.set_model(
        MeshModel::default().service(
            ServiceSpec::new("details", NS, "10.96.0.40".parse().unwrap())
                .port(9080, Protocol::Http)
                .endpoint(EndpointSpec::new(addr).service_account("details")),
        ),
    );
    let client = plane.ready_mesh("productpage").await;
    let url = "http://details.default.svc.cluster.local:9080/details/0";
    eventually("a 200 from details", || async {
        let r = client.http_client().get(url).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    // The traced request: the application sends its own span as the parent.
    let req = Request::get(url)
        .header("traceparent", format!("00-{TRACE_ID}-{APP_SPAN}-01"))
        .header("x-request-id", "otel-trace-test-1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.http_client().request(req))
        .await
        .expect("response in time");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = std::str::from_utf8(&body).expect("utf-8").to_owned();
    let seen = field(&body, "traceparent").to_owned();
    assert_eq!(field(&body, "request_id"), "otel-trace-test-1", "kept");
    assert_eq!(
        field(&body, "span"),
        "inbound",
        "the handler runs in mesh's span"
    );
    assert_eq!(seen.len(), 55, "the app saw a traceparent: {body}");
    assert_eq!(&seen[..36], &format!("00-{TRACE_ID}-"), "same trace");
    assert!(seen.ends_with("-01"), "still sampled: {seen}");
    let server_span_id = &seen[36..52];

    tokio::time::timeout(WAIT, guard.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    let traced = collector.wait_for_trace(TRACE_ID, 2, WAIT).await;
    assert_eq!(traced.len(), 2, "{traced:#?}");
    let client_span = one(&traced, SpanKind::Client);
    let server_span = one(&traced, SpanKind::Server);

    // The client span is the child of the application's, the server's the child of the
    // client's, and the application behind mesh sees the server span as its parent.
    assert_eq!(client_span.parent_span_id.as_deref(), Some(APP_SPAN));
    assert_eq!(
        server_span.parent_span_id.as_deref(),
        Some(client_span.span_id.as_str())
    );
    assert_eq!(server_span.span_id, server_span_id);
    assert_ne!(client_span.span_id, APP_SPAN);

    for s in [client_span, server_span] {
        assert_eq!(s.str_attribute("http.status_code"), Some("200"), "{s:#?}");
        assert_eq!(s.str_attribute("http.method"), Some("GET"));
        assert_eq!(s.str_attribute("response_flags"), Some("-"));
        assert_eq!(
            s.str_attribute("guid:x-request-id"),
            Some("otel-trace-test-1")
        );
        assert_eq!(s.str_attribute("component"), Some("proxy"));
        assert_eq!(s.service_name, "productpage.default");
        assert!(!s.error);
    }
    assert_eq!(
        client_span.str_attribute("upstream_cluster"),
        Some("outbound|9080||details.default.svc.cluster.local")
    );
    assert_eq!(
        client_span.str_attribute("peer.principal"),
        Some("spiffe://cluster.local/ns/default/sa/details")
    );
    assert!(
        server_span
            .str_attribute("upstream_cluster")
            .is_some_and(|c| c.starts_with("inbound|")),
        "{server_span:#?}"
    );
    assert_eq!(
        server_span.str_attribute("peer.principal"),
        Some("spiffe://cluster.local/ns/default/sa/productpage")
    );
    // Envoy's operation names (no route decorator).
    assert_eq!(
        client_span.name,
        "egress details.default.svc.cluster.local:9080"
    );
    assert_eq!(
        server_span.name,
        "ingress details.default.svc.cluster.local:9080"
    );
    assert!(client_span.start_unix_nano <= server_span.start_unix_nano);

    // Requests without a context start sampled traces (100% here): the warm-up requests'.
    assert!(
        collector
            .spans()
            .iter()
            .any(|s| s.trace_id != TRACE_ID && s.parent_span_id.is_none()),
        "a trace started by mesh"
    );
    let stats = guard.stats();
    assert_eq!(stats.dropped, 0);
    assert!(stats.exported >= 2, "{stats:?}");
}
