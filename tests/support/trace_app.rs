//! Shared by the OTLP tests (included with `#[path]`): the test collector with mesh's
//! exporter installed as the process's subscriber, and a server app reporting the trace
//! headers it received.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use mesh::otel::{ExporterGuard, OtlpConfig};
use mesh_otel::testkit::TestCollector;
use tracing_subscriber::prelude::*;

/// Starts a test collector and installs mesh's OTLP layer, reporting as `service`, as the
/// global subscriber (one per test binary). `sampling` is the percentage of new traces.
pub async fn install_exporter(
    service: &str,
    sampling: Option<f64>,
) -> (TestCollector, ExporterGuard) {
    let collector = TestCollector::start().await.expect("collector");
    let mut config = OtlpConfig::new(collector.endpoint(), service);
    config.sampling_percentage = sampling;
    config.scheduled_delay = Duration::from_millis(100);
    let (otel, guard) = mesh::otel::layer(config).expect("exporter");
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otel))
        .expect("the only subscriber of this test binary");
    (collector, guard)
}

/// The server app: answers `traceparent=..\nrequest_id=..\nspan=<current tracing span>\n`.
pub async fn app(req: Request<mesh::Body>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let current = tracing::Span::current()
        .metadata()
        .map_or("none", |m| m.name());
    Ok(Response::new(Full::new(Bytes::from(format!(
        "traceparent={}\nrequest_id={}\nspan={current}\n",
        header("traceparent"),
        header("x-request-id"),
    )))))
}
