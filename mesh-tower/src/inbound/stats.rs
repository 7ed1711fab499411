//! Istio's request metrics on the inbound side (`reporter="destination"`), recorded when the
//! response body ends.
//!
//! Every label but the outcome (protocol, response code, gRPC status, response flags) is fixed
//! for a connection, so a connection keeps the metric handles of its last outcome: the steady
//! state records a request with four atomic updates and no allocation or lock. A new outcome
//! builds the labels with [`mesh_core::telemetry::request_labels`] (Istio's exact order) and
//! registers its handles once.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use mesh_core::identity::PeerIdentity;
use mesh_core::telemetry::{
    DestinationService, REQUEST_BYTES, REQUEST_DURATION_MS, REQUESTS_TOTAL, RESPONSE_BYTES,
    Reporter, RequestOutcome, UNKNOWN, WorkloadLabels, request_labels,
};
use metrics::{Counter, Gauge, Histogram, Label};

use crate::grpc_frames::{
    GrpcFrameCounter, MessageCount, REQUEST_MESSAGES_TOTAL, RESPONSE_MESSAGES_TOTAL,
};
use crate::telemetry::stats_tags::{
    HTTP_CONN_MANAGER_PREFIX, LISTENER_ADDRESS, RESPONSE_CODE_CLASS, RESPONSE_CODE_CLASSES,
};

/// Inbound connections open right now, over every inbound listener of the process (what
/// pilot-agent sums from `listener.*.downstream_cx_active` for
/// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`).
static ACTIVE_CONNECTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Inbound connections open right now in this process.
pub fn active_connections() -> usize {
    ACTIVE_CONNECTIONS.load(std::sync::atomic::Ordering::Acquire)
}

/// Envoy's stat prefix of Istio's inbound capture listener (`virtualInbound`, 15006): the
/// `listener_address` label of listener stats.
pub const INBOUND_LISTENER_ADDRESS: &str = "0.0.0.0_15006";

/// Envoy's listener and HTTP connection manager stats for one inbound port, registered once
/// and named as an Istio sidecar's Prometheus output has them (Istio's stats tags): recording
/// is atomic updates.
#[derive(Debug)]
pub(crate) struct ListenerStats {
    cx_total: Counter,
    cx_active: Gauge,
    http_cx_total: Counter,
    http_cx_active: Gauge,
    rq_total: Counter,
    rq_active: Gauge,
    /// `envoy_http_downstream_rq{response_code_class}` for classes 1xx..=5xx (Envoy's
    /// `http.<prefix>.downstream_rq_2xx`).
    rq_xx: [Counter; 5],
}

impl ListenerStats {
    /// Stats for the inbound HTTP connection manager of `port` (istiod's stat prefix
    /// `inbound_0.0.0.0_<port>;`, tagged without the `;`).
    pub(crate) fn new(port: u16) -> Self {
        let listener = [Label::new(LISTENER_ADDRESS, INBOUND_LISTENER_ADDRESS)];
        let hcm_prefix = format!("inbound_0.0.0.0_{port}");
        let hcm = [Label::new(HTTP_CONN_MANAGER_PREFIX, hcm_prefix.clone())];
        let class = |c: &'static str| {
            metrics::counter!(
                "envoy_http_downstream_rq",
                [
                    Label::new(RESPONSE_CODE_CLASS, c),
                    Label::new(HTTP_CONN_MANAGER_PREFIX, hcm_prefix.clone()),
                ]
                .iter()
            )
        };
        ListenerStats {
            cx_total: metrics::counter!("envoy_listener_downstream_cx_total", listener.iter()),
            cx_active: metrics::gauge!("envoy_listener_downstream_cx_active", listener.iter()),
            http_cx_total: metrics::counter!("envoy_http_downstream_cx_total", hcm.iter()),
            http_cx_active: metrics::gauge!("envoy_http_downstream_cx_active", hcm.iter()),
            rq_total: metrics::counter!("envoy_http_downstream_rq_total", hcm.iter()),
            rq_active: metrics::gauge!("envoy_http_downstream_rq_active", hcm.iter()),
            rq_xx: RESPONSE_CODE_CLASSES.map(class),
        }
    }

    /// A connection was accepted; the guard counts it active until dropped.
    pub(crate) fn connection_opened(self: &Arc<Self>) -> ActiveConnection {
        self.cx_total.increment(1);
        self.cx_active.increment(1.0);
        ACTIVE_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ActiveConnection {
            stats: Arc::clone(self),
            http: false,
        }
    }

    /// A request arrived.
    pub(crate) fn request_started(&self) {
        self.rq_total.increment(1);
        self.rq_active.increment(1.0);
    }

    /// A request ended with `code` (`0`: no response).
    pub(crate) fn request_finished(&self, code: u16) {
        self.rq_active.decrement(1.0);
        if let Some(c) = self.rq_xx.get(usize::from(code / 100).wrapping_sub(1)) {
            c.increment(1);
        }
    }
}

/// Keeps `envoy_listener_downstream_cx_active` (and the HTTP one, once HTTP is served) up for
/// one connection.
#[derive(Debug)]
pub(crate) struct ActiveConnection {
    stats: Arc<ListenerStats>,
    http: bool,
}

impl ActiveConnection {
    /// The connection reached the HTTP connection manager.
    pub(crate) fn serving_http(&mut self) {
        if !self.http {
            self.http = true;
            self.stats.http_cx_total.increment(1);
            self.stats.http_cx_active.increment(1.0);
        }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        ACTIVE_CONNECTIONS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.stats.cx_active.decrement(1.0);
        if self.http {
            self.stats.http_cx_active.decrement(1.0);
        }
    }
}

/// Labels that are the same for every request on one connection.
#[derive(Debug)]
pub(crate) struct ConnectionLabels {
    source: WorkloadLabels,
    destination: Arc<WorkloadLabels>,
    service: Arc<DestinationService>,
    security_policy: &'static str,
    last: ArcSwapOption<Handles>,
    /// A TCP-proxied port ([`into_tcp`](Self::into_tcp)): no request metrics.
    tcp: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct OutcomeKey {
    protocol: &'static str,
    response_code: u16,
    grpc_status: Option<u16>,
    response_flags: &'static str,
}

#[derive(Debug)]
struct Handles {
    key: OutcomeKey,
    /// The peer-metadata source labels these handles were registered with (`None`: the
    /// connection's own).
    source: Option<Arc<WorkloadLabels>>,
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
    /// gRPC outcomes: `istio_request_messages_total` and `istio_response_messages_total`.
    messages: Option<(Counter, Counter)>,
}

/// What is known about a request when its response ends.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) grpc: bool,
    pub(crate) response_code: u16,
    pub(crate) grpc_status: Option<u16>,
    pub(crate) response_flags: &'static str,
    pub(crate) started: Instant,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    /// gRPC: the messages of the request body, counted as the application reads it.
    pub(crate) request_messages: Option<MessageCount>,
    /// gRPC: the messages of the response body, counted as it streams.
    pub(crate) response_messages: GrpcFrameCounter,
}

impl ConnectionLabels {
    /// Labels for a connection from `peer` (`None` for plaintext or a TLS client without a
    /// certificate). `destination_tls` / `destination_plain` are this workload's labels with
    /// and without its principal: Envoy reports the local certificate's URI SAN whenever the
    /// connection is TLS (`tls`), and `unknown` on plaintext.
    pub(crate) fn new(
        tls: bool,
        peer: Option<&PeerIdentity>,
        destination_tls: &Arc<WorkloadLabels>,
        destination_plain: &Arc<WorkloadLabels>,
        service: Arc<DestinationService>,
    ) -> Self {
        let mut source = WorkloadLabels::default();
        let principal = peer.and_then(|p| p.uri_sans.first());
        let mutual = principal.is_some();
        if let Some(principal) = principal {
            source.principal = principal.clone();
            // Istio takes the peer namespace from the SAN's `/ns/<x>/` segment.
            source.namespace = peer
                .and_then(|p| p.spiffe_id.as_ref())
                .map(|id| id.namespace().to_owned())
                .or_else(|| namespace_from_san(principal))
                .unwrap_or_else(|| UNKNOWN.to_owned());
        }
        ConnectionLabels {
            source,
            destination: Arc::clone(if tls {
                destination_tls
            } else {
                destination_plain
            }),
            service,
            security_policy: if mutual { "mutual_tls" } else { "none" },
            last: ArcSwapOption::empty(),
            tcp: false,
        }
    }

    /// Labels for a connection to a port istiod renders as a TCP proxy: the `istio_tcp_*`
    /// label set is returned, and requests on the connection record no request metrics (the
    /// sidecar has no HTTP connection manager there).
    pub(crate) fn into_tcp(mut self) -> (Self, Vec<Label>) {
        self.tcp = true;
        let labels = mesh_core::telemetry::tcp_labels(
            Reporter::Destination,
            &self.source,
            &self.destination,
            &self.service,
            "-",
            self.security_policy,
        )
        .into_iter()
        .map(|(k, v)| Label::new(k, v))
        .collect();
        (self, labels)
    }

    /// The source labels for a request that carried the peer's `x-envoy-peer-metadata`:
    /// workload, app, version, canonical service/revision and cluster from the metadata; the
    /// principal from the peer certificate (Istio reads it from the connection); the namespace
    /// from the certificate's SAN when there is one, else from the metadata.
    pub(crate) fn merge_peer(&self, mut peer: WorkloadLabels) -> WorkloadLabels {
        peer.principal = self.source.principal.clone();
        if self.source.namespace != UNKNOWN {
            peer.namespace = self.source.namespace.clone();
        }
        peer
    }

    /// The connection's source as the peer's TCP metadata exchange described it (see
    /// [`merge_peer`](Self::merge_peer)).
    pub(crate) fn with_peer(mut self, peer: WorkloadLabels) -> Self {
        self.source = self.merge_peer(peer);
        self
    }

    /// Records one finished request. `peer` is the source as the request's peer metadata
    /// described it (see [`merge_peer`](Self::merge_peer)), `None` for the connection's own.
    pub(crate) fn record(&self, finished: &Finished, peer: Option<&Arc<WorkloadLabels>>) {
        if self.tcp {
            return;
        }
        let key = OutcomeKey {
            protocol: if finished.grpc { "grpc" } else { "http" },
            response_code: finished.response_code,
            grpc_status: finished.grpc_status,
            response_flags: finished.response_flags,
        };
        let guard = self.last.load();
        let same_source = |h: &Handles| match (&h.source, peer) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || **a == **b,
            _ => false,
        };
        // The current handles are used in place (no reference count traffic per request).
        let fresh;
        let handles: &Handles = match guard.as_ref() {
            Some(h) if h.key == key && same_source(h) => h,
            _ => {
                fresh = Arc::new(self.register(key, peer.cloned()));
                self.last.store(Some(Arc::clone(&fresh)));
                &fresh
            }
        };
        handles.requests.increment(1);
        handles
            .duration
            .record(finished.started.elapsed().as_secs_f64() * 1000.0);
        handles.request_bytes.record(finished.request_bytes as f64);
        handles
            .response_bytes
            .record(finished.response_bytes as f64);
        if let Some((request, response)) = &handles.messages {
            request.increment(
                finished
                    .request_messages
                    .as_ref()
                    .map_or(0, MessageCount::get),
            );
            response.increment(finished.response_messages.count());
        }
    }

    fn register(&self, key: OutcomeKey, peer: Option<Arc<WorkloadLabels>>) -> Handles {
        let outcome = RequestOutcome {
            protocol: key.protocol,
            response_code: key.response_code,
            grpc_status: key.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
            response_flags: key.response_flags,
            connection_security_policy: self.security_policy,
        };
        let labels: Vec<Label> = request_labels(
            Reporter::Destination,
            peer.as_deref().unwrap_or(&self.source),
            &self.destination,
            &self.service,
            &outcome,
        )
        .into_iter()
        .map(|(k, v)| Label::new(k, v))
        .collect();
        Handles {
            requests: metrics::counter!(REQUESTS_TOTAL, labels.iter()),
            duration: metrics::histogram!(REQUEST_DURATION_MS, labels.iter()),
            request_bytes: metrics::histogram!(REQUEST_BYTES, labels.iter()),
            response_bytes: metrics::histogram!(RESPONSE_BYTES, labels.iter()),
            messages: (key.protocol == "grpc").then(|| {
                (
                    metrics::counter!(REQUEST_MESSAGES_TOTAL, labels.iter()),
                    metrics::counter!(RESPONSE_MESSAGES_TOTAL, labels.iter()),
                )
            }),
            key,
            source: peer,
        }
    }
}

/// Inbound `destination_service*` rebuilt from the outbound view (see
/// [`DestinationService::inbound_from_outbound`]), computed once per snapshot and port:
/// later connections on the same snapshot only read the cached value.
pub(crate) fn inbound_service(
    snapshot: &Arc<mesh_core::Snapshot>,
    node: &mesh_core::NodeIdentity,
    port: u16,
) -> Option<DestinationService> {
    /// The snapshot (weak: a live `Weak` keeps its address from being reused), port, answer.
    type Entry = (
        std::sync::Weak<mesh_core::Snapshot>,
        u16,
        Option<DestinationService>,
    );
    static CACHE: std::sync::OnceLock<arc_swap::ArcSwap<Vec<Entry>>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| arc_swap::ArcSwap::from_pointee(Vec::new()));
    let same =
        |w: &std::sync::Weak<mesh_core::Snapshot>| std::ptr::eq(w.as_ptr(), Arc::as_ptr(snapshot));
    if let Some((_, _, s)) = cache.load().iter().find(|(w, p, _)| same(w) && *p == port) {
        return s.clone();
    }
    let found = DestinationService::inbound_from_outbound(snapshot, node, port);
    cache.rcu(|entries| {
        // Entries of dropped snapshots go; the list stays bounded.
        let mut next: Vec<Entry> = entries
            .iter()
            .filter(|(w, p, _)| w.strong_count() > 0 && !(same(w) && *p == port))
            .take(64)
            .cloned()
            .collect();
        next.push((Arc::downgrade(snapshot), port, found.clone()));
        next
    });
    found
}

fn namespace_from_san(san: &str) -> Option<String> {
    let rest = san.split("/ns/").nth(1)?;
    let ns = rest.split('/').next()?;
    (!ns.is_empty()).then(|| ns.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_namespace_comes_from_the_san() {
        assert_eq!(
            namespace_from_san("spiffe://td/ns/frontend/sa/web").as_deref(),
            Some("frontend")
        );
        assert_eq!(namespace_from_san("spiffe://td/sa/web"), None);
        assert_eq!(namespace_from_san("spiffe://td/ns//sa/web"), None);
    }

    #[test]
    fn labels_follow_the_connection_security() {
        let dest_tls = Arc::new(WorkloadLabels {
            principal: "spiffe://cluster.local/ns/default/sa/reviews".into(),
            ..WorkloadLabels::default()
        });
        let dest_plain = Arc::new(WorkloadLabels::default());
        let service = Arc::new(DestinationService::default());
        let peer = PeerIdentity {
            spiffe_id: "spiffe://cluster.local/ns/frontend/sa/web".parse().ok(),
            uri_sans: vec!["spiffe://cluster.local/ns/frontend/sa/web".to_string()].into(),
        };
        let mtls =
            ConnectionLabels::new(true, Some(&peer), &dest_tls, &dest_plain, service.clone());
        assert_eq!(mtls.security_policy, "mutual_tls");
        assert_eq!(mtls.source.namespace, "frontend");
        assert_eq!(mtls.source.canonical_revision, "latest");
        assert!(Arc::ptr_eq(&mtls.destination, &dest_tls));
        let plain = ConnectionLabels::new(false, None, &dest_tls, &dest_plain, service);
        assert_eq!(plain.security_policy, "none");
        assert_eq!(plain.source.principal, UNKNOWN);
        assert!(Arc::ptr_eq(&plain.destination, &dest_plain));
    }
}
