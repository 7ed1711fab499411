//! Per-request cost of mesh's outbound telemetry: one GET through [`Outbound`] to a local
//! plaintext HTTP/1.1 upstream (pooled connection), with
//!
//! * `metrics_off`: no `metrics` recorder installed (every handle is a no-op);
//! * `metrics_on`: mesh's Prometheus recorder installed: `istio_requests_total` & co and the
//!   `envoy_cluster_*` stats recorded per request;
//! * `metrics_on_peer_metadata`: the endpoint is `tlsMode: istio` (the cluster has no TLS
//!   here, so only the exchange differs): mesh adds the two peer metadata headers to the
//!   request, and the upstream answers with its own, which mesh reads (cached decode),
//!   turns into `destination_*` labels and strips.
//!
//! and one GET through mesh's inbound listener (plaintext, kept-alive HTTP/1.1 connection)
//! to an app answering `ok`, with metrics off/on, with the client's peer metadata headers
//! (read, decoded once per connection, stripped, answered with mesh's own), and with access
//! logs on (a `tracing` subscriber enabling `mesh::access_log`, writing to a sink).
//!
//! `request_span/no_subscriber` is the cost of the per-request `tracing` span when no
//! subscriber listens; `*_request_spans` run the request with a subscriber that records
//! mesh's request spans (as the OTLP exporter's layer does).
//!
//! The `*_off` runs come first because a global recorder cannot be uninstalled.

#![allow(missing_docs)]

#[path = "../tests/support_outbound/mod.rs"]
#[allow(unused_imports)]
mod support_outbound;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::cluster::Cluster;
use mesh_core::endpoint::{Endpoint, EndpointTlsMode};
use mesh_core::peer_metadata::PeerMetadataHeaders;
use mesh_core::route::RouteAction;
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, NodeIdentity, SnapshotCell};
use mesh_tower::inbound::{self, InboundConfig};
use mesh_tower::outbound::Outbound;
use support_outbound::{node, snapshot, vhost};
use tokio::net::TcpListener;

const CLUSTER: &str = "outbound|9080||ratings.default.svc.cluster.local";

/// An upstream answering `ok`, with its peer metadata headers when the request had them.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut server_node = NodeIdentity::new(
        "ratings-v1-0",
        "default",
        "127.0.0.1".parse().expect("ip"),
        "ratings",
    );
    server_node.workload_name = "ratings-v1".into();
    let own = PeerMetadataHeaders::for_node(&server_node);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let own = own.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let own = own.clone();
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if req.headers().contains_key("x-envoy-peer-metadata") {
                            let h = r.headers_mut();
                            h.insert("x-envoy-peer-metadata-id", own.id.parse().expect("header"));
                            h.insert(
                                "x-envoy-peer-metadata",
                                own.metadata.parse().expect("header"),
                            );
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn outbound(rt: &tokio::runtime::Runtime, tls_mode: EndpointTlsMode) -> Outbound {
    let addr = rt.block_on(upstream());
    let mut ep = Endpoint::new(addr);
    ep.tls_mode = tls_mode;
    let cell = SnapshotCell::new();
    cell.publish(
        snapshot(
            1,
            9080,
            vec![vhost(
                "ratings:9080",
                &["ratings", "ratings:9080"],
                RouteAction::Cluster(CLUSTER.into()),
                None,
            )],
            vec![(Cluster::eds(CLUSTER), vec![ep])],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    Outbound::new(cell, CertStore::new(), node())
}

async fn one(out: &Outbound) {
    let req = Request::get("http://ratings:9080/")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = out.request(req).await;
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("x-envoy-peer-metadata"));
    let _ = resp.into_body().collect().await;
}

/// A kept-alive HTTP/1.1 connection to a fresh mesh inbound listener.
async fn inbound_client() -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = InboundConfig {
        port: 9080,
        mode: None,
        node: node(),
        header_read_timeout: None,
        idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
        drain: None,
        ext_authz: None,
    };
    let app = tower::service_fn(|_req: Request<mesh_tower::inbound::RequestBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    tokio::spawn(inbound::serve(
        listener,
        app,
        SnapshotCell::new(),
        CertStore::new(),
        config,
        std::future::pending(),
    ));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

async fn one_inbound(
    send: &tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
    peer: Option<&PeerMetadataHeaders>,
) {
    let mut send = send.lock().await;
    send.ready().await.expect("ready");
    let mut req = Request::get("/").header("host", "ratings:9080");
    if let Some(p) = peer {
        req = req
            .header("x-envoy-peer-metadata-id", p.id.as_str())
            .header("x-envoy-peer-metadata", p.metadata.as_str());
    }
    let resp = send
        .send_request(req.body(Empty::new()).expect("request"))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The request span mesh opens per request, with no subscriber interested: what every
    // request pays for tracing when nobody listens (one callsite check).
    let mut g = c.benchmark_group("request_span");
    g.bench_function("no_subscriber", |b| {
        b.iter(|| {
            let span = mesh_tower::inbound::tracing_headers::outbound_span();
            std::hint::black_box(span.is_disabled())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("outbound_telemetry");

    let off = outbound(&rt, EndpointTlsMode::Disabled);
    rt.block_on(one(&off));
    g.bench_function("metrics_off", |b| b.to_async(&rt).iter(|| one(&off)));
    g.finish();

    let mut g = c.benchmark_group("inbound_telemetry");
    let peer = PeerMetadataHeaders::for_node(&node());
    let inb = tokio::sync::Mutex::new(rt.block_on(inbound_client()));
    rt.block_on(one_inbound(&inb, None));
    g.bench_function("metrics_off", |b| {
        b.to_async(&rt).iter(|| one_inbound(&inb, None))
    });
    g.finish();
    let mut g = c.benchmark_group("outbound_telemetry");

    assert!(
        mesh_tower::telemetry::prometheus_handle().is_some(),
        "recorder installed"
    );
    let on = outbound(&rt, EndpointTlsMode::Disabled);
    rt.block_on(one(&on));
    g.bench_function("metrics_on", |b| b.to_async(&rt).iter(|| one(&on)));

    let mx = outbound(&rt, EndpointTlsMode::Istio);
    rt.block_on(one(&mx));
    g.bench_function("metrics_on_peer_metadata", |b| {
        b.to_async(&rt).iter(|| one(&mx))
    });
    g.finish();

    let mut g = c.benchmark_group("inbound_telemetry");
    // A fresh listener (and connection) whose handles register with the recorder.
    let inb = tokio::sync::Mutex::new(rt.block_on(inbound_client()));
    rt.block_on(one_inbound(&inb, None));
    g.bench_function("metrics_on", |b| {
        b.to_async(&rt).iter(|| one_inbound(&inb, None))
    });
    let inb = tokio::sync::Mutex::new(rt.block_on(inbound_client()));
    rt.block_on(one_inbound(&inb, Some(&peer)));
    g.bench_function("metrics_on_peer_metadata", |b| {
        b.to_async(&rt).iter(|| one_inbound(&inb, Some(&peer)))
    });
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_env_filter(tracing_subscriber::EnvFilter::new("mesh::access_log=info"))
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        assert!(tracing::enabled!(
            target: mesh_tower::inbound::access_log::ACCESS_LOG_TARGET,
            tracing::Level::INFO
        ));
        g.bench_function("metrics_on_peer_metadata_access_log", |b| {
            b.to_async(&rt).iter(|| one_inbound(&inb, Some(&peer)))
        });
    });
    g.finish();

    // Request spans on: a registry with a layer interested only in `mesh::request` spans
    // (what the OTLP exporter layer installs), recording every field.
    let spans = || {
        use tracing_subscriber::prelude::*;
        let target = tracing_subscriber::filter::Targets::new().with_target(
            mesh_tower::inbound::tracing_headers::REQUEST_SPAN_TARGET,
            tracing::Level::INFO,
        );
        tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(target),
        )
    };
    tracing::subscriber::with_default(spans(), || {
        assert!(!mesh_tower::inbound::tracing_headers::outbound_span().is_disabled());
        let mut g = c.benchmark_group("outbound_telemetry");
        g.bench_function("metrics_on_request_spans", |b| {
            b.to_async(&rt).iter(|| one(&on))
        });
        g.finish();
        let mut g = c.benchmark_group("inbound_telemetry");
        let inb = tokio::sync::Mutex::new(rt.block_on(inbound_client()));
        rt.block_on(one_inbound(&inb, None));
        g.bench_function("metrics_on_request_spans", |b| {
            b.to_async(&rt).iter(|| one_inbound(&inb, None))
        });
        g.finish();
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
