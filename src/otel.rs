//! OpenTelemetry export of mesh's request spans (feature `otel`).
//!
//! Every request through mesh gets a `tracing` span (target `mesh::request`: `inbound` for
//! requests served, `outbound` for requests sent) carrying the ids mesh propagates in
//! `traceparent` / B3 as the sidecar's tracer does. [`layer`] exports those spans over
//! OTLP/gRPC to a collector, so they appear in the same traces as the Envoy sidecars':
//!
//! ```no_run
//! use tracing_subscriber::prelude::*;
//! let (otel, _guard) = mesh::otel::layer(mesh::otel::OtlpConfig::new(
//!     "http://otel-collector.observability:4317",
//!     "reviews.default",
//! ))?;
//! tracing_subscriber::registry().with(otel).init();
//! # Ok::<(), mesh::otel::Error>(())
//! ```

pub use mesh_otel::{
    Error, ExportStats, ExporterGuard, MeshOtelLayer, OtelLayer, OtlpConfig, REQUEST_SPAN_TARGET,
};

/// Starts the OTLP exporter ([`mesh_otel::layer`]) and turns on trace starting for requests
/// that arrive without a trace context, sampling [`OtlpConfig::sampling_percentage`] of them
/// (the tracer configuration Envoy's HTTP connection manager would have). Keep the returned
/// guard alive: dropping it flushes the queued spans and stops the exporter.
pub fn layer<S>(config: OtlpConfig) -> Result<(MeshOtelLayer<S>, ExporterGuard), Error>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let sampling = config.sampling_percentage;
    let started = mesh_otel::layer(config)?;
    mesh_tower::inbound::tracing_headers::start_traces(sampling);
    Ok(started)
}
