//! Client-side (`reporter="source"`) telemetry: Istio's request metrics, whose label parts
//! that are constant per upstream host are built once and whose handles per outcome are cached
//! lock-free; the peer metadata exchange with Istio peers (FACTS.md f.1: the headers are sent
//! to `tlsMode: istio` endpoints, read from the response for the `destination_*` labels and
//! removed before the application sees the response); and Envoy's `envoy_cluster_*` stats
//! ([`ClusterStats`], registered once per host pool).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderMap, HeaderValue};
use mesh_core::endpoint::{EndpointTlsMode, WorkloadMetadata};
use mesh_core::flags::ResponseFlag;
use mesh_core::identity::NodeIdentity;
use mesh_core::outlier::{EJECTION_TYPES, EjectionType, OutlierCounts, OutlierStats};
use mesh_core::peer_metadata::{PeerMetadata, PeerMetadataHeaders};
use mesh_core::telemetry::{
    DestinationService, Reporter, RequestOutcome, UNKNOWN, WorkloadLabels, request_labels,
};
use metrics::{Counter, Gauge, Histogram, Label};

use crate::grpc_frames::{
    GrpcFrameCounter, MessageCount, REQUEST_MESSAGES_TOTAL, RESPONSE_MESSAGES_TOTAL,
};
use crate::telemetry::RequestMetrics;
use crate::telemetry::stats_tags::{
    CLUSTER_NAME, RESPONSE_CODE, RESPONSE_CODE_CLASS, RESPONSE_CODE_CLASSES,
};

use mesh_core::peer_metadata::{PEER_METADATA, PEER_METADATA_ID as PEER_ID};

/// The peer metadata headers this workload sends to Istio peers, encoded once at startup
/// (Istio's `upstream_propagation: istio_headers`).
#[derive(Debug, Clone)]
pub(crate) struct PeerHeaders {
    id: HeaderValue,
    metadata: HeaderValue,
}

impl PeerHeaders {
    /// The headers of `node`; `None` (with a warning) when its node id is not a valid header
    /// value.
    pub(crate) fn for_node(node: &NodeIdentity) -> Option<Self> {
        let encoded = PeerMetadataHeaders::for_node(node);
        match (
            HeaderValue::from_maybe_shared(bytes::Bytes::from(encoded.id.clone())),
            HeaderValue::from_maybe_shared(bytes::Bytes::from(encoded.metadata)),
        ) {
            (Ok(id), Ok(metadata)) => Some(PeerHeaders { id, metadata }),
            _ => {
                tracing::warn!(node_id = %encoded.id, "node id is not a valid header value; peer metadata is not sent upstream");
                None
            }
        }
    }

    /// Adds the headers to a request for an endpoint in `tls_mode`: only Istio peers
    /// (`tlsMode: istio`) take part in the exchange; a client-set value is replaced.
    pub(crate) fn propagate(
        this: Option<&Self>,
        tls_mode: EndpointTlsMode,
        headers: &mut HeaderMap,
    ) {
        if let Some(h) = this
            && tls_mode == EndpointTlsMode::Istio
        {
            headers.insert(PEER_ID, h.id.clone());
            headers.insert(PEER_METADATA, h.metadata.clone());
        }
    }
}

/// Reads and removes the upstream's peer metadata from its response headers (Istio's
/// `upstream_discovery: istio_headers`): the application never sees them; the metadata
/// becomes the `destination_*` labels of `record`.
pub(crate) fn discover_upstream_peer(headers: &mut HeaderMap, record: Option<&mut Record>) {
    // A name scan (no hashing) skips the removes for responses without the exchange.
    if !headers.keys().any(|k| *k == PEER_METADATA || *k == PEER_ID) {
        return;
    }
    headers.remove(PEER_ID);
    let Some(raw) = headers.remove(PEER_METADATA) else {
        return;
    };
    if let Some(r) = record {
        r.peer = r.labels.peer_labels(raw);
    }
}

/// The last decoded peer metadata of a host (an upstream sends the same bytes every time).
struct CachedPeer {
    raw: HeaderValue,
    labels: Option<Arc<WorkloadLabels>>,
}

/// A cluster's live state sampled into the `envoy_cluster_*` gauges when an attempt starts
/// and ends.
pub(crate) struct ClusterLive {
    /// Requests in flight to the cluster.
    pub rq_active: Arc<AtomicU32>,
    /// The breaker's `max_requests`.
    pub max_requests: u32,
    /// Ejected hosts of the cluster, when it has outlier detection (Envoy has no
    /// `outlier_detection.*` stats otherwise).
    pub ejected: Option<Arc<AtomicUsize>>,
    /// The cluster's outlier detector's counters (with `ejected`).
    pub outlier: Option<Arc<OutlierStats>>,
}

/// Envoy's response-code stats under one prefix, as Istio's stats tags name them:
/// `<prefix>upstream_rq_<code>` → `<prefix>upstream_rq{response_code}`,
/// `<prefix>upstream_rq_<c>xx` → `<prefix>upstream_rq{response_code_class="<c>xx"}` (the same
/// family: Istio's `_rq(_(\d{3}))$` and `_rq(_(\dxx))$` both strip the suffix), and
/// `<prefix>upstream_rq_completed` (Envoy's `CodeStats::chargeResponseStat`; the prefix is
/// empty for the answered attempt and `retry_` for an attempt whose response was retried).
struct CodeStats {
    rq: &'static str,
    completed: Counter,
    /// Classes 1..=5.
    xx: [Counter; 5],
    /// Per-code handles, registered on first use.
    code: ArcSwap<Vec<(u16, Counter)>>,
}

impl CodeStats {
    fn register(prefix: &'static str, name: &str) -> Self {
        let (rq, completed) = match prefix {
            "" => (
                "envoy_cluster_upstream_rq",
                "envoy_cluster_upstream_rq_completed",
            ),
            _ => (
                "envoy_cluster_retry_upstream_rq",
                "envoy_cluster_retry_upstream_rq_completed",
            ),
        };
        let class = |c: &'static str| {
            metrics::counter!(
                rq,
                [
                    Label::new(CLUSTER_NAME, name.to_owned()),
                    Label::new(RESPONSE_CODE_CLASS, c),
                ]
                .iter()
            )
        };
        CodeStats {
            rq,
            completed: metrics::counter!(completed, cluster_label(name).iter()),
            xx: RESPONSE_CODE_CLASSES.map(class),
            code: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Charges one response with `code` (a registered handle is used in place).
    fn charge(&self, code: u16, cluster: &str) {
        self.completed.increment(1);
        if let Some(c) = self.xx.get(usize::from(code / 100).wrapping_sub(1)) {
            c.increment(1);
        }
        if let Some((_, c)) = self.code.load().iter().find(|(k, _)| *k == code) {
            c.increment(1);
            return;
        }
        self.code_counter(code, cluster).increment(1);
    }

    fn code_counter(&self, code: u16, cluster: &str) -> Counter {
        if let Some((_, c)) = self.code.load().iter().find(|(k, _)| *k == code) {
            return c.clone();
        }
        let c = metrics::counter!(
            self.rq,
            [
                Label::new(CLUSTER_NAME, cluster.to_owned()),
                Label::new(RESPONSE_CODE, code.to_string()),
            ]
            .iter()
        );
        self.code.rcu(|v| {
            let mut v = Vec::clone(v);
            if !v.iter().any(|(k, _)| *k == code) {
                v.push((code, c.clone()));
            }
            v
        });
        c
    }
}

/// Envoy's per-cluster stats, named and labelled as an Istio sidecar's `/stats/prometheus` has
/// them: `envoy_cluster_<stat>{cluster_name="outbound|9080||reviews.default.svc.cluster.local"}`
/// (istiod gives every cluster `alt_stat_name: "<name>;"`, and the bootstrap's `cluster_name`
/// tag `^cluster(\.(.+);)` takes the whole name, dots included). Registered once: recording an
/// attempt is a handful of atomic updates.
///
/// As in Envoy, the request families count upstream *attempts* (every retry is one more
/// upstream request), while Istio's `istio_requests_total` counts the downstream request once:
/// `upstream_rq_total` counts attempts that reached an upstream connection (not connect
/// failures), the answered attempt's code goes to `upstream_rq{response_code}`,
/// `upstream_rq{response_code_class}` and `upstream_rq_completed`, a retried response's code
/// to the same under `retry_`, `upstream_rq_time` is the answered attempt's time to the end of
/// the upstream response, and `upstream_rq_retry*` count the router's retry decisions.
pub(crate) struct ClusterStats {
    name: String,
    rq_total: Counter,
    answered: CodeStats,
    /// Registered on the first retried response (Envoy creates `retry.*` stats on first use).
    retried: std::sync::OnceLock<CodeStats>,
    rq_time: Histogram,
    rq_active: Gauge,
    rq_retry: Counter,
    rq_retry_success: Counter,
    rq_retry_overflow: Counter,
    rq_retry_limit_exceeded: Counter,
    rq_retry_backoff_exponential: Counter,
    cx_total: Counter,
    cx_active: Gauge,
    rq_open: Gauge,
    ejections_active: Option<Gauge>,
    /// Outlier ejections by cause, when the cluster has outlier detection.
    ejections: Option<Ejections>,
    cx_connect_fail: Counter,
    cx_connect_timeout: Counter,
    rq_pending_overflow: Counter,
    rq_per_try_timeout: Counter,
    live: ClusterLive,
}

/// Envoy's outlier detection counters under Istio's stats naming (no tag is extracted from
/// them): `ejections_detected_<type>` (threshold reached, enforced or not),
/// `ejections_enforced_<type>` and `ejections_enforced_total`, `ejections_overflow` (refused
/// by `max_ejection_percent`), and the deprecated `ejections_total`,
/// `ejections_consecutive_5xx` and `ejections_success_rate` (detections; Envoy 1.40 still has
/// them for those two types only). Fed from the detector's [`OutlierStats`].
struct Ejections {
    detector: Arc<OutlierStats>,
    total: Counter,
    enforced_total: Counter,
    overflow: Counter,
    /// `detected`, `enforced` and the deprecated name (when Envoy has one) per type, in
    /// [`EjectionType::ALL`]'s order.
    by_type: [(Counter, Counter, Option<Counter>); EJECTION_TYPES],
}

impl Ejections {
    fn register(l: &[Label; 1], detector: Arc<OutlierStats>) -> Self {
        let c = |name: String| metrics::counter!(name, l.iter());
        let by_type = EjectionType::ALL.map(|t| {
            let suffix = t.stat_suffix();
            let older = matches!(t, EjectionType::Consecutive5xx | EjectionType::SuccessRate);
            (
                c(format!(
                    "envoy_cluster_outlier_detection_ejections_detected_{suffix}"
                )),
                c(format!(
                    "envoy_cluster_outlier_detection_ejections_enforced_{suffix}"
                )),
                older.then(|| {
                    c(format!(
                        "envoy_cluster_outlier_detection_ejections_{suffix}"
                    ))
                }),
            )
        });
        Ejections {
            detector,
            total: c("envoy_cluster_outlier_detection_ejections_total".into()),
            enforced_total: c("envoy_cluster_outlier_detection_ejections_enforced_total".into()),
            overflow: c("envoy_cluster_outlier_detection_ejections_overflow".into()),
            by_type,
        }
    }

    /// Adds what the detector counted since the last call.
    fn record(&self) {
        let n = self.detector.take();
        if n == OutlierCounts::default() {
            return;
        }
        self.total.increment(n.total);
        self.overflow.increment(n.overflow);
        self.enforced_total.increment(n.enforced_total());
        for (i, (detected, enforced, older)) in self.by_type.iter().enumerate() {
            detected.increment(n.detected[i]);
            enforced.increment(n.enforced[i]);
            if let Some(c) = older {
                // Envoy's deprecated `ejections_success_rate` counts local-origin
                // success-rate detections too.
                let also = match EjectionType::ALL[i] {
                    EjectionType::SuccessRate => {
                        n.detected[EjectionType::SuccessRateLocalOrigin.index()]
                    }
                    _ => 0,
                };
                c.increment(n.detected[i] + also);
            }
        }
    }
}

fn cluster_label(name: &str) -> [Label; 1] {
    [Label::new(CLUSTER_NAME, name.to_owned())]
}

/// How the router's retry state ended for the answered attempt (Envoy's
/// `RetryStateImpl::shouldRetry` counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryEnd {
    /// No retry happened and none was wanted.
    None,
    /// An earlier attempt was retried and this one needs no retry (`upstream_rq_retry_success`).
    Success,
    /// A retry was wanted but the retries are used up (`upstream_rq_retry_limit_exceeded`).
    LimitExceeded,
    /// A retry was wanted but the `max_retries` breaker was full (`upstream_rq_retry_overflow`).
    Overflow,
}

impl ClusterStats {
    /// Registers (or finds) the stats of cluster `name`.
    pub(crate) fn register(name: &str, live: ClusterLive) -> Self {
        let l = cluster_label(name);
        let counter = |stat: &'static str| metrics::counter!(stat, l.iter());
        // Charged by `route_timeout`; registered here so it shows (as 0) like Envoy's.
        let _ = counter("envoy_cluster_upstream_rq_timeout");
        ClusterStats {
            name: name.to_owned(),
            rq_total: counter("envoy_cluster_upstream_rq_total"),
            answered: CodeStats::register("", name),
            retried: std::sync::OnceLock::new(),
            rq_time: metrics::histogram!("envoy_cluster_upstream_rq_time", l.iter()),
            rq_active: metrics::gauge!("envoy_cluster_upstream_rq_active", l.iter()),
            rq_retry: counter("envoy_cluster_upstream_rq_retry"),
            rq_retry_success: counter("envoy_cluster_upstream_rq_retry_success"),
            rq_retry_overflow: counter("envoy_cluster_upstream_rq_retry_overflow"),
            rq_retry_limit_exceeded: counter("envoy_cluster_upstream_rq_retry_limit_exceeded"),
            rq_retry_backoff_exponential: counter(
                "envoy_cluster_upstream_rq_retry_backoff_exponential",
            ),
            cx_total: counter("envoy_cluster_upstream_cx_total"),
            cx_active: metrics::gauge!("envoy_cluster_upstream_cx_active", l.iter()),
            rq_open: metrics::gauge!("envoy_cluster_circuit_breakers_default_rq_open", l.iter()),
            ejections_active: live.ejected.as_ref().map(|_| {
                metrics::gauge!("envoy_cluster_outlier_detection_ejections_active", l.iter())
            }),
            ejections: live
                .outlier
                .clone()
                .map(|stats| Ejections::register(&l, stats)),
            cx_connect_fail: counter("envoy_cluster_upstream_cx_connect_fail"),
            cx_connect_timeout: counter("envoy_cluster_upstream_cx_connect_timeout"),
            rq_pending_overflow: counter("envoy_cluster_upstream_rq_pending_overflow"),
            rq_per_try_timeout: counter("envoy_cluster_upstream_rq_per_try_timeout"),
            live,
        }
    }

    /// Samples the breaker's `rq_open` and the outlier detector's ejections.
    fn sample_live(&self) {
        let active = self.live.rq_active.load(Ordering::Relaxed);
        self.rq_open.set(if active >= self.live.max_requests {
            1.0
        } else {
            0.0
        });
        if let (Some(g), Some(e)) = (&self.ejections_active, &self.live.ejected) {
            g.set(e.load(Ordering::Relaxed) as f64);
        }
        if let Some(e) = &self.ejections {
            e.record();
        }
    }
}

/// The route timeout fired for a request to cluster `name` (Envoy's
/// `upstream_rq_timeout`; a cold path, so the handle is looked up each time).
pub(crate) fn route_timeout(name: &str) {
    metrics::counter!(
        "envoy_cluster_upstream_rq_timeout",
        cluster_label(name).iter()
    )
    .increment(1);
}

/// One upstream attempt, counted in `envoy_cluster_upstream_rq_active` from its start until
/// dropped (at the end of the upstream response body, or when the attempt is abandoned).
pub(crate) struct Attempt {
    stats: Arc<ClusterStats>,
    started: Instant,
    /// The answer came from the upstream: `upstream_rq_time` is recorded when it ends.
    timed: bool,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("cluster", &self.stats.name)
            .finish_non_exhaustive()
    }
}

impl Attempt {
    /// The request reached an upstream connection: one more `upstream_rq_total` (Envoy counts
    /// a request when it is attached to a connection, so connect failures and pending
    /// overflows are not counted).
    pub(crate) fn sent(&self) {
        self.stats.rq_total.increment(1);
    }

    /// The attempt could not connect (Envoy counts a connect timeout as a connect failure
    /// too).
    pub(crate) fn connect_failed(&self, timeout: bool) {
        self.stats.cx_connect_fail.increment(1);
        if timeout {
            self.stats.cx_connect_timeout.increment(1);
        }
    }

    /// The `max_pending_requests` breaker turned the attempt away.
    pub(crate) fn pending_overflow(&self) {
        self.stats.rq_pending_overflow.increment(1);
    }

    /// The attempt hit its per-try timeout.
    pub(crate) fn per_try_timeout(&self) {
        self.stats.rq_per_try_timeout.increment(1);
    }

    /// The attempt is retried: its response's code (if it had one) goes to
    /// `retry_upstream_rq*`, and the retry (always with Envoy's exponential back-off) is
    /// counted.
    pub(crate) fn retried(self, code: Option<u16>) {
        if let Some(code) = code {
            let s = &self.stats;
            s.retried
                .get_or_init(|| CodeStats::register("retry_", &s.name))
                .charge(code, &s.name);
        }
        self.stats.rq_retry.increment(1);
        self.stats.rq_retry_backoff_exponential.increment(1);
    }

    /// The attempt gives the downstream its answer: `code` (the upstream's status, or the
    /// local reply's 503/504) is charged; `from_upstream` answers also record
    /// `upstream_rq_time` when the attempt ends.
    pub(crate) fn answered(&mut self, code: u16, from_upstream: bool, retry: RetryEnd) {
        let s = &self.stats;
        s.answered.charge(code, &s.name);
        self.timed = from_upstream;
        match retry {
            RetryEnd::None => {}
            RetryEnd::Success => s.rq_retry_success.increment(1),
            RetryEnd::LimitExceeded => s.rq_retry_limit_exceeded.increment(1),
            RetryEnd::Overflow => s.rq_retry_overflow.increment(1),
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let s = &self.stats;
        s.rq_active.decrement(1.0);
        if self.timed {
            s.rq_time
                .record(self.started.elapsed().as_secs_f64() * 1000.0);
        }
        s.sample_live();
    }
}

/// Counts one upstream connection in `envoy_cluster_upstream_cx_active` until dropped.
pub(crate) struct ConnectionGuard(Arc<ClusterStats>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.cx_active.decrement(1.0);
    }
}

/// Distinct outcomes cached per host; beyond this, handles are registered per request.
const MAX_CACHED: usize = 64;

/// The constant labels of requests to one upstream host (or to no host, for local replies).
pub(crate) struct LabelBase {
    source: Arc<WorkloadLabels>,
    destination: WorkloadLabels,
    /// `None`: the destination service comes from each request's host.
    service: Option<DestinationService>,
    cache: ArcSwap<Vec<Arc<Cached>>>,
    peer: ArcSwapOption<CachedPeer>,
    cluster: Option<Arc<ClusterStats>>,
}

struct Cached {
    key: Key,
    metrics: RequestMetrics,
    /// gRPC outcomes only.
    messages: Option<MessageCounters>,
}

impl Cached {
    fn record(&self, r: &Record, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.metrics.record(duration, request_bytes, response_bytes);
        if let Some(m) = &self.messages {
            m.record(&r.grpc_messages);
        }
    }
}

/// Istio's gRPC message counters for one label set (the labels of `istio_requests_total`).
pub(crate) struct MessageCounters {
    request: Counter,
    response: Counter,
}

impl MessageCounters {
    /// Registers (or finds) both counters for `labels`.
    pub(crate) fn register(labels: &[(&'static str, String)]) -> Self {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.clone()))
            .collect();
        MessageCounters {
            request: metrics::counter!(REQUEST_MESSAGES_TOTAL, labels.iter()),
            response: metrics::counter!(RESPONSE_MESSAGES_TOTAL, labels.iter()),
        }
    }

    fn record(&self, m: &GrpcMessages) {
        self.request
            .increment(m.request.as_ref().map_or(0, MessageCount::get));
        self.response.increment(m.response.count());
    }
}

/// The gRPC messages of one request: the request body's (counted as it streams to the
/// upstream, shared with the body) and the response body's (counted here as it streams back).
#[derive(Debug, Default)]
pub(crate) struct GrpcMessages {
    /// `None`: not a gRPC request, or its body was never sent.
    pub request: Option<MessageCount>,
    pub response: GrpcFrameCounter,
}

#[derive(PartialEq, Eq)]
struct Key {
    code: u16,
    flag: ResponseFlag,
    grpc: bool,
    grpc_status: Option<u32>,
    principal: Option<Arc<str>>,
    host: Option<Box<str>>,
    peer: Option<Arc<WorkloadLabels>>,
}

impl Key {
    /// Whether `r` (whose destination host is `host`) has this outcome.
    fn matches(&self, r: &Record, host: Option<&str>) -> bool {
        self.code == r.code
            && self.flag == r.flag
            && self.grpc == r.grpc
            && self.grpc_status == r.grpc_status
            && self.principal == r.principal
            && self.host.as_deref() == host
            && same_peer(&self.peer, &r.peer)
    }
}

fn same_peer(a: &Option<Arc<WorkloadLabels>>, b: &Option<Arc<WorkloadLabels>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || **a == **b,
        _ => false,
    }
}

/// The destination labels of an upstream: its own metadata when it sent some (response
/// headers, or the TCP metadata exchange), else `fallback` (the endpoint's metadata). The
/// principal is always the verified certificate's; with the upstream's metadata, so is the
/// namespace when the certificate's SAN names one.
pub(crate) fn upstream_destination(
    peer: Option<&WorkloadLabels>,
    fallback: &WorkloadLabels,
    principal: Option<&str>,
) -> WorkloadLabels {
    let mut destination = peer.unwrap_or(fallback).clone();
    if let Some(p) = principal {
        destination.principal = p.to_owned();
        if peer.is_some()
            && let Some(ns) = namespace_from_san(p)
        {
            destination.namespace = ns.to_owned();
        }
    }
    destination
}

/// The `istio.workload` endpoint metadata as destination labels. Like Envoy's fallback for
/// peers that sent no metadata, app and version come from the canonical name and revision.
pub(crate) fn destination_labels(w: Option<&WorkloadMetadata>) -> WorkloadLabels {
    let Some(w) = w else {
        return WorkloadLabels::default();
    };
    let or_unknown = |s: &str| {
        if s.is_empty() {
            UNKNOWN.to_owned()
        } else {
            s.to_owned()
        }
    };
    WorkloadLabels {
        workload: or_unknown(&w.name),
        namespace: or_unknown(&w.namespace),
        principal: UNKNOWN.to_owned(),
        app: or_unknown(&w.canonical_service),
        version: or_unknown(&w.canonical_revision),
        canonical_service: or_unknown(&w.canonical_service),
        canonical_revision: if w.canonical_revision.is_empty() {
            "latest".to_owned()
        } else {
            w.canonical_revision.clone()
        },
        cluster: or_unknown(&w.cluster_id),
    }
}

/// `destination_service*` from a request host (port stripped) when the cluster has no Istio
/// service metadata.
fn service_from_host(host: &str) -> DestinationService {
    let h = strip_port(host);
    if h.is_empty() {
        return DestinationService::default();
    }
    DestinationService {
        host: h.to_owned(),
        name: h.split('.').next().unwrap_or(h).to_owned(),
        namespace: UNKNOWN.to_owned(),
    }
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
pub(crate) fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            if h.starts_with('[') || !h.contains(':') {
                h
            } else {
                authority
            }
        }
        _ => authority,
    }
}

impl LabelBase {
    pub(crate) fn new(
        source: Arc<WorkloadLabels>,
        destination: WorkloadLabels,
        service: Option<DestinationService>,
    ) -> Self {
        LabelBase {
            source,
            destination,
            service,
            cache: ArcSwap::from_pointee(Vec::new()),
            peer: ArcSwapOption::empty(),
            cluster: None,
        }
    }

    /// Also records Envoy's `envoy_cluster_*` stats of the cluster the host belongs to.
    pub(crate) fn with_cluster(mut self, name: &str, live: ClusterLive) -> Self {
        self.cluster = Some(Arc::new(ClusterStats::register(name, live)));
        self
    }

    /// A new upstream connection to the host: counted in `envoy_cluster_upstream_cx_total`
    /// and, while the guard lives, `envoy_cluster_upstream_cx_active`.
    pub(crate) fn connection_opened(&self) -> Option<ConnectionGuard> {
        let c = self.cluster.as_ref()?;
        c.cx_total.increment(1);
        c.cx_active.increment(1.0);
        Some(ConnectionGuard(c.clone()))
    }

    /// An upstream attempt to the host starts: counted in `envoy_cluster_upstream_rq_active`
    /// until the returned guard is dropped (`None`: the host has no cluster stats).
    pub(crate) fn attempt_started(&self) -> Option<Attempt> {
        let c = self.cluster.as_ref()?;
        c.rq_active.increment(1.0);
        c.sample_live();
        Some(Attempt {
            stats: c.clone(),
            started: Instant::now(),
            timed: false,
        })
    }

    /// The workload labels in an upstream's `x-envoy-peer-metadata`, decoded once per
    /// distinct value.
    fn peer_labels(&self, raw: HeaderValue) -> Option<Arc<WorkloadLabels>> {
        if let Some(c) = self.peer.load().as_ref()
            && c.raw == raw
        {
            return c.labels.clone();
        }
        let labels = match PeerMetadata::decode_header(raw.as_bytes()) {
            Ok(m) => Some(Arc::new(m.workload_labels())),
            Err(error) => {
                tracing::debug!(%error, "ignoring unreadable upstream peer metadata");
                None
            }
        };
        self.peer.store(Some(Arc::new(CachedPeer {
            raw,
            labels: labels.clone(),
        })));
        labels
    }

    /// Whether requests need to carry their host for the `destination_service` label.
    pub(crate) fn needs_host(&self) -> bool {
        self.service.is_none()
    }

    /// Records the request into the handles of its outcome: cached handles are used in place
    /// (cloning them costs four atomic increments and decrements per request).
    fn record(&self, r: &Record, duration: Duration, request_bytes: u64, response_bytes: u64) {
        let host = self.host_of(r);
        if let Some(c) = self.cache.load().iter().find(|c| c.key.matches(r, host)) {
            c.record(r, duration, request_bytes, response_bytes);
            return;
        }
        self.entry(r)
            .record(r, duration, request_bytes, response_bytes);
    }

    /// The request host, when it names the destination service.
    fn host_of<'r>(&self, r: &'r Record) -> Option<&'r str> {
        if self.service.is_none() {
            r.host.as_deref()
        } else {
            None
        }
    }

    fn entry(&self, r: &Record) -> Arc<Cached> {
        let host = self.host_of(r);
        if let Some(c) = self.cache.load().iter().find(|c| c.key.matches(r, host)) {
            return c.clone();
        }
        // The upstream's own metadata, when it sent some, names the destination workload;
        // the principal is always the verified certificate's.
        let destination =
            upstream_destination(r.peer.as_deref(), &self.destination, r.principal.as_deref());
        let service = match &self.service {
            Some(s) => s.clone(),
            None => service_from_host(host.unwrap_or("")),
        };
        let outcome = RequestOutcome {
            protocol: if r.grpc { "grpc" } else { "http" },
            response_code: r.code,
            grpc_status: r.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
            response_flags: r.flag.as_str(),
            // The client side cannot know the server's policy (Istio reports `unknown`).
            connection_security_policy: UNKNOWN,
        };
        let labels = request_labels(
            Reporter::Source,
            &self.source,
            &destination,
            &service,
            &outcome,
        );
        let messages = r.grpc.then(|| MessageCounters::register(&labels));
        let entry = Arc::new(Cached {
            key: Key {
                code: r.code,
                flag: r.flag,
                grpc: r.grpc,
                grpc_status: r.grpc_status,
                principal: r.principal.clone(),
                host: host.map(Box::from),
                peer: r.peer.clone(),
            },
            metrics: RequestMetrics::register(labels),
            messages,
        });
        if self.cache.load().len() < MAX_CACHED {
            self.cache.rcu(|v| {
                let mut v = Vec::clone(v);
                if !v.iter().any(|c| c.key == entry.key) {
                    v.push(entry.clone());
                }
                v
            });
        }
        entry
    }
}

/// One request's telemetry, recorded exactly once when its response ends (or is dropped).
pub(crate) struct Record {
    pub start: Instant,
    pub labels: Arc<LabelBase>,
    pub host: Option<Box<str>>,
    pub principal: Option<Arc<str>>,
    pub code: u16,
    pub flag: ResponseFlag,
    pub grpc: bool,
    pub grpc_status: Option<u32>,
    pub request_bytes: u64,
    /// The upstream's workload as its peer metadata described it.
    pub peer: Option<Arc<WorkloadLabels>>,
    /// gRPC requests: the messages of both bodies.
    pub grpc_messages: GrpcMessages,
}

impl Record {
    pub(crate) fn finish(self, response_bytes: u64) {
        let elapsed = self.start.elapsed();
        self.labels
            .record(&self, elapsed, self.request_bytes, response_bytes);
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` → `<ns>`.
fn namespace_from_san(san: &str) -> Option<&str> {
    let ns = san.split("/ns/").nth(1)?.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(workload: &str) -> NodeIdentity {
        let mut n = NodeIdentity::new(
            &format!("{workload}-0"),
            "default",
            "10.0.0.1".parse().unwrap(),
            workload,
        );
        n.workload_name = workload.into();
        n.labels.insert("app".into(), workload.into());
        n
    }

    #[test]
    fn peer_headers_go_to_istio_endpoints_only() {
        let h = PeerHeaders::for_node(&node("reviews-v1"));
        let mut headers = HeaderMap::new();
        PeerHeaders::propagate(h.as_ref(), EndpointTlsMode::Disabled, &mut headers);
        assert!(headers.is_empty());
        PeerHeaders::propagate(h.as_ref(), EndpointTlsMode::Istio, &mut headers);
        let sent = PeerMetadata::decode_header(headers[&PEER_METADATA].as_bytes()).unwrap();
        assert_eq!(sent.workload_labels().workload, "reviews-v1");
        assert_eq!(
            headers[&PEER_ID].to_str().unwrap(),
            node("reviews-v1").node_id()
        );
    }

    #[test]
    fn upstream_metadata_fills_destination_labels_and_cluster_stats() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let live = ClusterLive {
                rq_active: Arc::new(AtomicU32::new(2)),
                max_requests: 2,
                ejected: Some(Arc::new(AtomicUsize::new(1))),
                outlier: Some(Arc::default()),
            };
            let base = Arc::new(
                LabelBase::new(
                    Arc::new(WorkloadLabels::from_node(&node("productpage-v1"))),
                    WorkloadLabels::default(),
                    None,
                )
                .with_cluster("outbound|9080||ratings.default.svc.cluster.local", live),
            );
            let cx = base.connection_opened();
            let upstream = PeerHeaders::for_node(&node("ratings-v1")).unwrap();
            let mut response = HeaderMap::new();
            response.insert(PEER_ID, upstream.id.clone());
            response.insert(PEER_METADATA, upstream.metadata.clone());
            response.insert("x-app", HeaderValue::from_static("kept"));
            for _ in 0..2 {
                let mut headers = response.clone();
                let mut record = Record {
                    start: Instant::now(),
                    labels: base.clone(),
                    host: Some("ratings.default:9080".into()),
                    principal: Some("spiffe://cluster.local/ns/prod/sa/ratings".into()),
                    code: 503,
                    flag: ResponseFlag::None,
                    grpc: false,
                    grpc_status: None,
                    request_bytes: 10,
                    peer: None,
                    grpc_messages: GrpcMessages::default(),
                };
                discover_upstream_peer(&mut headers, Some(&mut record));
                assert_eq!(headers.len(), 1, "only the app's header is left");
                record.finish(5);
            }
            // The breaker and ejection gauges are sampled when an attempt starts and ends.
            drop(base.attempt_started());
            drop(cx);
        });
        let text = handle.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .expect("recorded");
        assert!(
            line.contains("destination_workload=\"ratings-v1\""),
            "{line}"
        );
        assert!(line.contains("destination_app=\"ratings-v1\""), "{line}");
        // The namespace comes from the verified certificate, not the metadata.
        assert!(
            line.contains("destination_workload_namespace=\"prod\""),
            "{line}"
        );
        assert!(line.ends_with(" 2"), "one series for both requests: {line}");
        let cluster = "cluster_name=\"outbound|9080||ratings.default.svc.cluster.local\"";
        for (stat, value) in [
            ("envoy_cluster_upstream_cx_total{", "1"),
            ("envoy_cluster_upstream_cx_active{", "0"),
            ("envoy_cluster_circuit_breakers_default_rq_open{", "1"),
            ("envoy_cluster_outlier_detection_ejections_active{", "1"),
        ] {
            let l = text
                .lines()
                .find(|l| l.starts_with(stat) && l.contains(cluster))
                .unwrap_or_else(|| panic!("{stat} missing:\n{text}"));
            assert!(l.ends_with(&format!(" {value}")), "{l}");
        }
        // Requests alone charge no cluster request stats: attempts do.
        assert!(
            text.contains(&format!("envoy_cluster_upstream_rq_total{{{cluster}}} 0")),
            "{text}"
        );
    }

    /// Envoy 1.40, route `retry_on: 5xx`, upstream answering 503 then 200 (observed):
    /// `upstream_rq_total` 2, `upstream_rq_200` 1, `retry.upstream_rq_503` 1, both
    /// `_completed` 1, `upstream_rq_retry` / `_retry_success` / `_retry_backoff_exponential`
    /// 1, `upstream_rq_time` one sample; a dead host retried once: `upstream_rq_total` 0,
    /// `upstream_rq_503` 1, `upstream_rq_retry_limit_exceeded` 1, no `upstream_rq_time`.
    #[test]
    fn attempts_count_as_envoy_counts_them() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let base = |name: &str| {
                LabelBase::new(
                    Arc::new(WorkloadLabels::default()),
                    WorkloadLabels::default(),
                    None,
                )
                .with_cluster(
                    name,
                    ClusterLive {
                        rq_active: Arc::new(AtomicU32::new(0)),
                        max_requests: 10,
                        ejected: None,
                        outlier: None,
                    },
                )
            };
            let retried = base("c");
            let first = retried.attempt_started().expect("cluster stats");
            first.sent();
            let mid = handle.render();
            assert!(
                mid.contains("envoy_cluster_upstream_rq_active{cluster_name=\"c\"} 1"),
                "the gauge rises when the attempt starts:\n{mid}"
            );
            first.retried(Some(503));
            let mut second = retried.attempt_started().expect("cluster stats");
            second.sent();
            second.answered(200, true, RetryEnd::Success);
            drop(second);

            let dead = base("dead");
            let first = dead.attempt_started().expect("cluster stats");
            first.retried(None);
            let mut second = dead.attempt_started().expect("cluster stats");
            second.answered(503, false, RetryEnd::LimitExceeded);
        });
        let text = handle.render();
        let value = |sample: &str| -> Option<String> {
            text.lines()
                .find(|l| l.starts_with(sample))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        for (sample, want) in [
            (
                "envoy_cluster_upstream_rq_total{cluster_name=\"c\"}",
                Some("2"),
            ),
            (
                "envoy_cluster_upstream_rq{cluster_name=\"c\",response_code=\"200\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_retry_upstream_rq{cluster_name=\"c\",response_code=\"503\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq{cluster_name=\"c\",response_code_class=\"2xx\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_retry_upstream_rq{cluster_name=\"c\",response_code_class=\"5xx\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_completed{cluster_name=\"c\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_retry_upstream_rq_completed{cluster_name=\"c\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_retry{cluster_name=\"c\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_retry_success{cluster_name=\"c\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_retry_backoff_exponential{cluster_name=\"c\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_time_count{cluster_name=\"c\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_active{cluster_name=\"c\"}",
                Some("0"),
            ),
            (
                "envoy_cluster_upstream_rq_total{cluster_name=\"dead\"}",
                Some("0"),
            ),
            (
                "envoy_cluster_upstream_rq{cluster_name=\"dead\",response_code=\"503\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_retry_limit_exceeded{cluster_name=\"dead\"}",
                Some("1"),
            ),
            (
                "envoy_cluster_upstream_rq_time_count{cluster_name=\"dead\"}",
                Some("0"),
            ),
            (
                "envoy_cluster_upstream_rq_active{cluster_name=\"dead\"}",
                Some("0"),
            ),
        ] {
            assert_eq!(value(sample).as_deref(), want, "{sample}\n{text}");
        }
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(service_from_host("reviews.ns:9080").name, "reviews");
    }
}
