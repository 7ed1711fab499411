//! The layer and exporter against the test collector over real gRPC.

use std::time::Duration;

use mesh_otel::testkit::{SpanKind, TestCollector};
use mesh_otel::{OtlpConfig, REQUEST_SPAN_TARGET};
use tracing_subscriber::prelude::*;

fn request_span(trace_id: &str, span_id: &str, parent: Option<&str>, sampled: bool) {
    let span = tracing::info_span!(
        target: REQUEST_SPAN_TARGET,
        "inbound",
        otel.kind = "server",
        operation = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
        sampled = tracing::field::Empty,
        http.status_code = tracing::field::Empty,
        upstream_cluster = tracing::field::Empty,
    );
    span.record("trace_id", trace_id);
    span.record("span_id", span_id);
    if let Some(p) = parent {
        span.record("parent_span_id", p);
    }
    span.record("sampled", sampled);
    span.record("operation", "ratings:9080/ratings/0");
    span.record("upstream_cluster", "inbound|9080||");
    span.in_scope(|| tracing::info!("the application's event"));
    span.record("http.status_code", 503u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_request_spans_reach_the_collector_with_their_ids() {
    let collector = TestCollector::start().await.expect("collector");
    let mut config = OtlpConfig::new(collector.endpoint(), "ratings.default");
    config.resource_attributes = vec![("k8s.namespace.name".into(), "default".into())];
    let (layer, guard) = mesh_otel::layer(config).expect("exporter");
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        request_span(
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "1122334455667788",
            Some("00f067aa0ba902b7"),
            true,
        );
        request_span(
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "99aabbccddeeff00",
            None,
            false,
        );
        // Not a request span: not exported.
        tracing::info_span!("app_span", trace_id = "4bf92f3577b34da6a3ce929d0e0e4736")
            .in_scope(|| {});
    });
    tokio::time::timeout(Duration::from_secs(30), guard.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "only the sampled request span: {spans:?}");
    let s = &spans[0];
    assert_eq!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(s.span_id, "1122334455667788");
    assert_eq!(s.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(s.kind, SpanKind::Server);
    assert_eq!(s.name, "ratings:9080/ratings/0");
    assert_eq!(s.service_name, "ratings.default");
    assert_eq!(s.int_attribute("http.status_code"), Some(503));
    assert_eq!(s.str_attribute("upstream_cluster"), Some("inbound|9080||"));
    assert!(s.error, "a 503 is an error");
    assert!(s.end_unix_nano >= s.start_unix_nano && s.start_unix_nano > 0);
    let stats = guard.stats();
    assert_eq!((stats.queued, stats.exported, stats.dropped), (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    // A collector that accepts connections and never answers keeps the exporter busy.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = black_hole.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = black_hole.accept().await {
            conns.push(c);
        }
    });
    let mut config = OtlpConfig::new(format!("http://{addr}"), "ratings.default");
    config.max_queue_size = 1;
    config.max_export_batch_size = 1;
    config.export_timeout = Duration::from_secs(1);
    let (layer, guard) = mesh_otel::layer(config).expect("exporter");
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..5u64 {
            request_span(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                &format!("{:016x}", i + 1),
                None,
                true,
            );
        }
    });
    let stats = guard.stats();
    assert_eq!(stats.queued + stats.dropped, 5, "{stats:?}");
    assert!(
        stats.dropped >= 3,
        "queue of one, exporter busy with one: {stats:?}"
    );
    let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
    hold.abort();
}

#[test]
fn bad_configuration_is_an_error() {
    let mut config = OtlpConfig::new("http://127.0.0.1:4317", "x");
    config.max_queue_size = 0;
    let err = mesh_otel::layer::<tracing_subscriber::Registry>(config).unwrap_err();
    assert!(err.to_string().contains("max_queue_size"), "{err}");
    let err = mesh_otel::layer::<tracing_subscriber::Registry>(OtlpConfig::new("not a uri\n", "x"))
        .unwrap_err();
    assert!(err.to_string().contains("invalid OTLP endpoint"), "{err}");
    let err = mesh_otel::layer::<tracing_subscriber::Registry>(OtlpConfig::new(
        "https://collector.example:4317",
        "x",
    ))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("TLS to the collector is not supported"),
        "{err}"
    );
}
