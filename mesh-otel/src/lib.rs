//! # mesh-otel
//!
//! OpenTelemetry trace export for mesh, the way an Envoy sidecar with the
//! `envoy.tracers.opentelemetry` tracer reports its spans: [`layer`] returns a
//! `tracing_subscriber` [`Layer`] that turns mesh's per-request spans (target
//! `mesh::request`, names `inbound` / `outbound`, carrying `trace_id`, `span_id`,
//! `parent_span_id` and `sampled`) into OTLP spans with exactly those ids — so they join the
//! trace that Envoy sidecars and the application report — and exports the sampled ones in
//! batches over OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
//!
//! The request path never waits on the exporter: a closed span is handed to a bounded queue
//! (`try_send`); when the queue is full the span is dropped and counted
//! ([`ExportStats::dropped`]). A background thread with its own small runtime batches and
//! sends; dropping the [`ExporterGuard`] flushes what is queued (bounded by the export
//! timeout) and stops it.
//!
//! Protobuf stays in this crate: the OTLP messages are private, and the test collector
//! ([`testkit`], feature `testkit`) hands out plain Rust values.

mod export;
mod layer;
mod proto;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use export::ExporterGuard;
pub use layer::OtelLayer;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{Filtered, Targets};

/// `tracing` target of mesh's request spans (the spans this layer exports).
pub const REQUEST_SPAN_TARGET: &str = "mesh::request";

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector.observability:4317`
    /// (plaintext HTTP/2; `https://` is refused with [`Error::TlsUnsupported`]).
    pub endpoint: String,
    /// The `service.name` resource attribute (Istio's sidecars report
    /// `<canonical service>.<namespace>`).
    pub service_name: String,
    /// More resource attributes (`k8s.namespace.name`, `service.version`, ...).
    pub resource_attributes: Vec<(String, String)>,
    /// Spans waiting for export; beyond this, spans are dropped and counted.
    pub max_queue_size: usize,
    /// Spans per `Export` call.
    pub max_export_batch_size: usize,
    /// How long a span may wait for a fuller batch.
    pub scheduled_delay: Duration,
    /// Bound on one `Export` call (and on the flush when the guard is dropped).
    pub export_timeout: Duration,
    /// Percentage (0–100) of requests without a trace context for which mesh starts a sampled
    /// trace, as Envoy's `random_sampling` (Istio's default mesh config: 1%). `None`: mesh
    /// starts no traces and only reports those its callers started.
    pub sampling_percentage: Option<f64>,
}

impl OtlpConfig {
    /// Defaults as the OpenTelemetry batch span processor's (queue 2048, batches of 512, 5 s
    /// delay, 30 s export timeout) and Istio's 1% sampling of new traces.
    pub fn new(endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        OtlpConfig {
            endpoint: endpoint.into(),
            service_name: service_name.into(),
            resource_attributes: Vec::new(),
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(5),
            export_timeout: Duration::from_secs(30),
            sampling_percentage: Some(1.0),
        }
    }
}

/// The exporter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint is not a URI tonic can connect to.
    #[error("invalid OTLP endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The configured endpoint.
        endpoint: String,
        /// Why it was rejected.
        #[source]
        source: tonic::transport::Error,
    },
    /// A size in the configuration is zero.
    #[error("invalid OTLP exporter configuration: {0} must be greater than zero")]
    Config(&'static str),
    /// The endpoint asks for TLS, which the exporter does not speak.
    #[error(
        "OTLP endpoint {0:?}: TLS to the collector is not supported; use an http:// endpoint (collectors listen for plaintext OTLP/gRPC on 4317)"
    )]
    TlsUnsupported(String),
    /// The background exporter thread could not be started.
    #[error("cannot start the OTLP exporter thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The exporter has stopped (its thread ended) before a flush completed.
    #[error("the OTLP exporter has stopped")]
    Stopped,
}

/// Counters of the exporter, for the application's own health reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStats {
    /// Sampled spans handed to the queue.
    pub queued: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans the collector accepted (partial-success rejections excluded).
    pub exported: u64,
    /// Spans lost to failed `Export` calls or collector rejections.
    pub failed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    queued: AtomicU64,
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ExportStats {
        ExportStats {
            queued: self.queued.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// The layer exporting mesh's request spans, filtered to [`REQUEST_SPAN_TARGET`] at INFO
/// (the application's other spans and events are not affected by it).
pub type MeshOtelLayer<S> = Filtered<OtelLayer, Targets, S>;

/// Starts the exporter and returns the layer to add to the application's subscriber, and the
/// guard that flushes and stops the exporter when dropped:
///
/// ```no_run
/// use tracing_subscriber::prelude::*;
/// let (otel, _guard) = mesh_otel::layer(mesh_otel::OtlpConfig::new(
///     "http://otel-collector.observability:4317",
///     "reviews.default",
/// ))?;
/// tracing_subscriber::registry()
///     .with(otel)
///     .with(tracing_subscriber::fmt::layer())
///     .init();
/// # Ok::<(), mesh_otel::Error>(())
/// ```
///
/// A global filter in front of the registry (e.g. an `EnvFilter` added with `.with(..)`
/// rather than per layer) must let `mesh::request=info` through.
///
/// Trace starting for requests without a context ([`OtlpConfig::sampling_percentage`]) is
/// switched on by `mesh::otel::layer`, which wraps this function.
pub fn layer<S>(config: OtlpConfig) -> Result<(MeshOtelLayer<S>, ExporterGuard), Error>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let (queue, guard) = export::start(config)?;
    let layer = OtelLayer::new(queue, guard.counters());
    let filter = Targets::new().with_target(REQUEST_SPAN_TARGET, tracing::Level::INFO);
    Ok((layer.with_filter(filter), guard))
}
