//! Client-side (`reporter="source"`) request metrics: the label parts that are constant per
//! upstream host are built once; the metric handles per outcome are cached lock-free.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use mesh_core::endpoint::WorkloadMetadata;
use mesh_core::flags::ResponseFlag;
use mesh_core::telemetry::{
    DestinationService, Reporter, RequestOutcome, UNKNOWN, WorkloadLabels, request_labels,
};

use crate::telemetry::RequestMetrics;

/// Distinct outcomes cached per host; beyond this, handles are registered per request.
const MAX_CACHED: usize = 64;

/// The constant labels of requests to one upstream host (or to no host, for local replies).
pub(crate) struct LabelBase {
    source: Arc<WorkloadLabels>,
    destination: WorkloadLabels,
    /// `None`: the destination service comes from each request's host.
    service: Option<DestinationService>,
    cache: ArcSwap<Vec<Arc<Cached>>>,
}

struct Cached {
    key: Key,
    metrics: RequestMetrics,
}

#[derive(PartialEq, Eq)]
struct Key {
    code: u16,
    flag: ResponseFlag,
    grpc: bool,
    grpc_status: Option<u32>,
    principal: Option<Arc<str>>,
    host: Option<Box<str>>,
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
        }
    }

    /// Whether requests need to carry their host for the `destination_service` label.
    pub(crate) fn needs_host(&self) -> bool {
        self.service.is_none()
    }

    fn metrics(&self, r: &Record) -> RequestMetrics {
        let host = if self.service.is_none() {
            r.host.as_deref()
        } else {
            None
        };
        let matches = |k: &Key| {
            k.code == r.code
                && k.flag == r.flag
                && k.grpc == r.grpc
                && k.grpc_status == r.grpc_status
                && k.principal == r.principal
                && k.host.as_deref() == host
        };
        if let Some(c) = self.cache.load().iter().find(|c| matches(&c.key)) {
            return c.metrics.clone();
        }
        let mut destination = self.destination.clone();
        if let Some(p) = &r.principal {
            destination.principal = p.to_string();
        }
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
        let metrics = RequestMetrics::register(request_labels(
            Reporter::Source,
            &self.source,
            &destination,
            &service,
            &outcome,
        ));
        if self.cache.load().len() < MAX_CACHED {
            let entry = Arc::new(Cached {
                key: Key {
                    code: r.code,
                    flag: r.flag,
                    grpc: r.grpc,
                    grpc_status: r.grpc_status,
                    principal: r.principal.clone(),
                    host: host.map(Box::from),
                },
                metrics: metrics.clone(),
            });
            self.cache.rcu(|v| {
                let mut v = Vec::clone(v);
                if !v.iter().any(|c| c.key == entry.key) {
                    v.push(entry.clone());
                }
                v
            });
        }
        metrics
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
}

impl Record {
    pub(crate) fn finish(self, response_bytes: u64) {
        let m = self.labels.metrics(&self);
        m.record(self.start.elapsed(), self.request_bytes, response_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(service_from_host("reviews.ns:9080").name, "reviews");
    }
}
