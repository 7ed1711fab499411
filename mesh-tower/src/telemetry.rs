//! Istio's standard request metrics, recorded through the `metrics` facade into a Prometheus
//! recorder whose histograms use Envoy's default buckets.

use std::sync::OnceLock;
use std::time::Duration;

use mesh_core::telemetry::{
    DEFAULT_BUCKETS, REQUEST_BYTES, REQUEST_DURATION_MS, REQUESTS_TOTAL, RESPONSE_BYTES,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs mesh's Prometheus recorder as the process-wide `metrics` recorder (once) and
/// returns the handle that renders it. `None` when the application installed its own recorder
/// first; mesh's metrics then go to that recorder.
pub fn prometheus_handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Prefix("istio_".into()), &DEFAULT_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Prefix("envoy_".into()), &DEFAULT_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    spawn_upkeep(handle.clone());
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!(
                        "a metrics recorder was already installed; mesh's metrics go to it and /stats/prometheus shows only what mesh renders itself"
                    );
                    None
                }
            }
        })
        .clone()
}

/// How often histogram samples are folded into their buckets. The recorder keeps every
/// sample of a histogram until the next upkeep (or scrape); without this, memory grows with
/// traffic between scrapes (measured: 9 MiB → 76 MiB after a minute of load, issue 7).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Folds histogram samples into buckets on a small background thread, independent of any
/// tokio runtime, so memory stays flat whether or not anyone scrapes.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("mesh-metrics-upkeep".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread; histogram samples are folded only at scrape time");
    }
}

/// Records one finished HTTP request: `istio_requests_total`, and the duration, request-size
/// and response-size histograms, with `labels` from
/// [`mesh_core::telemetry::request_labels`].
pub fn record_request(
    labels: Vec<(&'static str, String)>,
    duration: Duration,
    request_bytes: u64,
    response_bytes: u64,
) {
    RequestMetrics::register(labels).record(duration, request_bytes, response_bytes);
}

/// The four handles of Istio's request metrics for one label set, registered once and kept by
/// the request path so that recording a request is four atomic updates and no label work.
///
/// Handles registered before a recorder is installed stay no-ops: install the recorder
/// ([`prometheus_handle`]) before serving traffic.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
    request_bytes: metrics::Histogram,
    response_bytes: metrics::Histogram,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// Registers (or finds) the metrics for `labels` in the current recorder.
    pub fn register(labels: Vec<(&'static str, String)>) -> Self {
        let labels: Vec<metrics::Label> = labels
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect();
        RequestMetrics {
            requests: metrics::counter!(REQUESTS_TOTAL, labels.iter()),
            duration: metrics::histogram!(REQUEST_DURATION_MS, labels.iter()),
            request_bytes: metrics::histogram!(REQUEST_BYTES, labels.iter()),
            response_bytes: metrics::histogram!(RESPONSE_BYTES, labels.iter()),
        }
    }

    /// Records one finished request.
    pub fn record(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.increment(1);
        self.duration.record(duration.as_secs_f64() * 1000.0);
        self.request_bytes.record(request_bytes as f64);
        self.response_bytes.record(response_bytes as f64);
    }
}

/// The tag names of the Envoy stats mesh serves on 15090, as an Istio sidecar's Prometheus
/// output has them. Istio's bootstrap (`stats_config`: `use_all_default_tags: false` and its
/// own `stats_tags`) replaces Envoy's default tags (`envoy_cluster_name`, …); Envoy removes the
/// matched part from the stat name and makes it the tag, so `cluster.<name>;.upstream_rq_200`
/// becomes `envoy_cluster_upstream_rq{response_code="200",cluster_name="<name>"}`.
pub mod stats_tags {
    /// `^cluster(\.(.+);)`: istiod sets every cluster's `alt_stat_name` to `<name>;`, so the
    /// whole cluster name, dots included, is the value.
    pub const CLUSTER_NAME: &str = "cluster_name";
    /// `_rq(_(\d{3}))$`: `upstream_rq_200` → `upstream_rq{response_code="200"}`.
    pub const RESPONSE_CODE: &str = "response_code";
    /// `_rq(_(\dxx))$`: `upstream_rq_2xx` → `upstream_rq{response_code_class="2xx"}` (the
    /// same family as the per-code counters).
    pub const RESPONSE_CODE_CLASS: &str = "response_code_class";
    /// The `response_code_class` values of classes 1..=5.
    pub const RESPONSE_CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    /// `^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`: the listener's
    /// address, e.g. `0.0.0.0_15006`.
    pub const LISTENER_ADDRESS: &str = "listener_address";
    /// `^http\.(((?:[_.[:digit:]\w]*|…));\.)`: istiod ends every HTTP connection manager's
    /// `stat_prefix` with `;` (`inbound_0.0.0.0_8080;`); the value is the prefix without it.
    pub const HTTP_CONN_MANAGER_PREFIX: &str = "http_conn_manager_prefix";
}
