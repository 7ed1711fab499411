//! Trace joining with a real Envoy 1.40 sidecar running the `envoy.tracers.opentelemetry`
//! tracer: the application calls through Envoy's outbound listener (tracer on, 100%
//! sampling) into a mesh-served app; Envoy and mesh export to the same test OTLP collector.
//! Envoy's client span is the child of the application's span, mesh's server span the child
//! of Envoy's, all in the caller's trace, with Envoy's `x-request-id` kept. It also proves the
//! test collector decodes a real Envoy's OTLP export.
//!
//! Skips (with the reason printed) when Envoy is not installed and `CI` is not set.

mod support;
#[path = "support/trace_app.rs"]
mod trace_app;

use std::time::Duration;

use mesh::InboundTlsMode;
use mesh::parts::xds::testkit::MeshModel;
use mesh_otel::testkit::{ExportedSpan, SpanKind};
use serde_json::json;
use support::envoy::{EnvoyProcess, SidecarBootstrap, SidecarCerts, envoy_binary, free_port};
use support::mesh::{NS, Plane, WAIT, field, spiffe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVER_FQDN: &str = "server.default.svc.cluster.local";
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const APP_SPAN: &str = "b7ad6b7169203331";

/// One HTTP/1.1 request with a `traceparent` to `port`, read to the end: the body.
async fn get_with_traceparent(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!(
        "GET /traced HTTP/1.1\r\nhost: {SERVER_FQDN}:8080\r\ntraceparent: 00-{TRACE_ID}-{APP_SPAN}-01\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn with_service(spans: &[ExportedSpan], service: &str) -> ExportedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.service_name == service).collect();
    assert_eq!(found.len(), 1, "one span from {service}: {spans:#?}");
    found[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_client_span_parents_the_mesh_server_span() {
    let Some(_) = envoy_binary() else { return };
    let (collector, guard) = trace_app::install_exporter("server.default", None).await;

    let plane = Plane::start(MeshModel {
        peer_authentication: InboundTlsMode::Strict,
        ..Default::default()
    })
    .await;
    let server = plane.ready_mesh("server").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app_addr = listener.local_addr().expect("addr");
    let serving = server.clone();
    tokio::spawn(async move {
        serving
            .serve_on(listener, tower::service_fn(trace_app::app))
            .await
    });

    let issued = plane
        .ca
        .issue(&spiffe("envoy-client"), Duration::from_secs(3600));
    let certs = SidecarCerts {
        cert_chain_pem: issued.leaf_pem,
        key_pem: issued.key_pem,
        root_pem: plane.ca.root_pem(),
    };
    let outbound_port = free_port();
    let mut bootstrap = SidecarBootstrap::new("envoy-client-0", NS, certs)
        .outbound(
            outbound_port,
            8080,
            SERVER_FQDN,
            app_addr,
            &spiffe("server").to_string(),
        )
        .to_json();
    // The tracer Istio configures for an OpenTelemetry provider, exporting to the collector.
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["tracing"] = json!({
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel-collector"}, "timeout": "5s"},
                "service_name": "envoy-client.default",
            },
        },
    });
    let collector_addr = collector.addr();
    bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .expect("clusters")
        .push(json!({
            "name": "otel-collector",
            "type": "STATIC",
            "connect_timeout": "5s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {
                "cluster_name": "otel-collector",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": collector_addr.ip().to_string(),
                    "port_value": collector_addr.port(),
                }}}}]}],
            },
        }));
    // Export every span at once instead of batching five.
    bootstrap["layered_runtime"] = json!({"layers": [{"name": "static", "static_layer": {
        "tracing.opentelemetry.min_flush_spans": 1,
        "tracing.opentelemetry.flush_interval_ms": 200,
    }}]});
    let envoy = EnvoyProcess::start(&serde_json::to_string_pretty(&bootstrap).expect("json"));

    let body = get_with_traceparent(outbound_port).await;
    let seen = field(&body, "traceparent").to_owned();
    let request_id = field(&body, "request_id").to_owned();
    assert_eq!(seen.len(), 55, "{body}\n--- envoy ---\n{}", envoy.logs());
    assert_eq!(
        &seen[..36],
        &format!("00-{TRACE_ID}-"),
        "the caller's trace"
    );
    assert_eq!(
        request_id.len(),
        36,
        "Envoy generated an x-request-id: {body}"
    );

    tokio::time::timeout(WAIT, guard.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    let traced = collector.wait_for_trace(TRACE_ID, 2, WAIT).await;
    let envoy_span = with_service(&traced, "envoy-client.default");
    let mesh_span = with_service(&traced, "server.default");

    assert_eq!(
        envoy_span.parent_span_id.as_deref(),
        Some(APP_SPAN),
        "{envoy_span:#?}"
    );
    assert_eq!(
        mesh_span.parent_span_id.as_deref(),
        Some(envoy_span.span_id.as_str()),
        "mesh's server span is the child of Envoy's client span:\n{traced:#?}"
    );
    assert_eq!(
        mesh_span.span_id,
        &seen[36..52],
        "the app's parent is mesh's span"
    );
    assert_eq!(mesh_span.kind, SpanKind::Server);
    assert_eq!(
        mesh_span.str_attribute("guid:x-request-id"),
        Some(request_id.as_str())
    );
    // mesh names and tags its span as Envoy does.
    assert_eq!(mesh_span.name, format!("ingress {SERVER_FQDN}:8080"));
    assert_eq!(envoy_span.name, format!("egress {SERVER_FQDN}:8080"));
    for key in [
        "http.status_code",
        "http.method",
        "http.url",
        "http.protocol",
        "component",
        "upstream_cluster",
        "response_flags",
        "guid:x-request-id",
    ] {
        assert_eq!(
            mesh_span.str_attribute(key).is_some(),
            envoy_span.str_attribute(key).is_some(),
            "{key}: {mesh_span:#?}\n{envoy_span:#?}"
        );
    }
    assert_eq!(
        mesh_span.str_attribute("http.url"),
        envoy_span.str_attribute("http.url")
    );
    assert_eq!(
        mesh_span.str_attribute("peer.principal"),
        Some(spiffe("envoy-client").to_string().as_str())
    );
    // Envoy reports the request id as its `guid:x-request-id` tag.
    assert_eq!(
        envoy_span.str_attribute("guid:x-request-id"),
        Some(request_id.as_str()),
        "{envoy_span:#?}"
    );
    assert_eq!(envoy_span.str_attribute("http.status_code"), Some("200"));
}
