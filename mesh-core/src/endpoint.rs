//! EDS endpoints, compiled: addresses with weight, health, locality, TLS mode and workload
//! metadata, and the round-robin picker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Envoy's `HealthStatus` for an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HealthStatus {
    /// UNKNOWN: treated as healthy, as Envoy does.
    #[default]
    Unknown,
    /// HEALTHY.
    Healthy,
    /// UNHEALTHY.
    Unhealthy,
    /// DRAINING.
    Draining,
    /// TIMEOUT.
    Timeout,
    /// DEGRADED.
    Degraded,
}

impl HealthStatus {
    /// Whether Envoy would send traffic to an endpoint in this state (outside panic mode).
    pub fn is_routable(self) -> bool {
        matches!(
            self,
            HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded
        )
    }
}

/// Whether the endpoint runs a sidecar (or mesh) that terminates Istio mTLS: the endpoint's
/// `envoy.transport_socket_match` metadata `tlsMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EndpointTlsMode {
    /// `tlsMode: istio`: use the cluster's `tlsMode-istio` transport socket (auto mTLS).
    Istio,
    /// Anything else: plaintext.
    #[default]
    Disabled,
}

/// The `istio.workload` endpoint metadata: `name;namespace;canonical;revision;cluster`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WorkloadMetadata {
    /// Workload name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Canonical service.
    pub canonical_service: String,
    /// Canonical revision.
    pub canonical_revision: String,
    /// Cluster id.
    pub cluster_id: String,
}

impl WorkloadMetadata {
    /// Parses the `;`-separated form istiod writes.
    pub fn parse(s: &str) -> Option<WorkloadMetadata> {
        let mut it = s.split(';');
        let w = WorkloadMetadata {
            name: it.next()?.to_owned(),
            namespace: it.next().unwrap_or_default().to_owned(),
            canonical_service: it.next().unwrap_or_default().to_owned(),
            canonical_revision: it.next().unwrap_or_default().to_owned(),
            cluster_id: it.next().unwrap_or_default().to_owned(),
        };
        Some(w)
    }
}

/// Locality of an endpoint (`region/zone/subzone`).
#[derive(Clone, Debug, PartialEq, Eq, Default, Hash)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Sub-zone.
    pub sub_zone: String,
}

/// One upstream host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// `load_balancing_weight` (1 when unset).
    pub weight: u32,
    /// Health as EDS reports it.
    pub health: HealthStatus,
    /// Auto-mTLS mode.
    pub tls_mode: EndpointTlsMode,
    /// Locality.
    pub locality: Locality,
    /// EDS priority.
    pub priority: u32,
    /// The `load_balancing_weight` of the endpoint's locality (its `LocalityLbEndpoints`),
    /// used when the cluster balances by locality weight; `None` when unset (such a locality
    /// gets no traffic under locality-weighted balancing, as in Envoy).
    pub locality_weight: Option<u32>,
    /// `istio.workload` metadata, when present.
    pub workload: Option<WorkloadMetadata>,
    /// The host's hostname, what a route's `auto_host_rewrite` puts in `Host`: the EDS
    /// endpoint's `hostname`, or for `STRICT_DNS`/`LOGICAL_DNS` clusters the address as
    /// configured (Envoy 1.40 ignores `hostname` there). `None`: `Host` stays as it is.
    pub hostname: Option<std::sync::Arc<str>>,
}

impl Endpoint {
    /// A healthy, weight-1, plaintext endpoint.
    pub fn new(address: SocketAddr) -> Self {
        Endpoint {
            address,
            weight: 1,
            health: HealthStatus::Unknown,
            tls_mode: EndpointTlsMode::Disabled,
            locality: Locality::default(),
            priority: 0,
            locality_weight: None,
            workload: None,
            hostname: None,
        }
    }
}

/// A cluster's endpoints (one `ClusterLoadAssignment`), with the routable ones indexed for
/// picking.
#[derive(Debug)]
pub struct EndpointSet {
    /// The cluster (or EDS `service_name`) these endpoints belong to.
    pub cluster_name: String,
    /// Every endpoint, as EDS sent it.
    pub endpoints: Vec<Endpoint>,
    /// The CLA's `policy.overprovisioning_factor` in percent (Envoy's default 140 = 1.4).
    pub overprovisioning_factor: u32,
    routable: Vec<usize>,
    next: AtomicUsize,
}

/// Two sets are equal when they hold the same endpoints for the same cluster (the routable
/// index is derived from those; the round-robin cursor is state, not configuration).
impl PartialEq for EndpointSet {
    fn eq(&self, other: &Self) -> bool {
        self.cluster_name == other.cluster_name
            && self.endpoints == other.endpoints
            && self.overprovisioning_factor == other.overprovisioning_factor
    }
}

impl Eq for EndpointSet {}

impl EndpointSet {
    /// Compiles a set: routable endpoints are those whose health allows traffic; the lowest
    /// priority that has any routable endpoint is used (priority failover, without
    /// overprovisioning maths yet).
    pub fn new(cluster_name: impl Into<String>, endpoints: Vec<Endpoint>) -> Self {
        let best = endpoints
            .iter()
            .filter(|e| e.health.is_routable())
            .map(|e| e.priority)
            .min();
        let routable = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.health.is_routable() && Some(e.priority) == best)
            .map(|(i, _)| i)
            .collect();
        EndpointSet {
            cluster_name: cluster_name.into(),
            endpoints,
            overprovisioning_factor: crate::lb::DEFAULT_OVERPROVISIONING_FACTOR,
            routable,
            next: AtomicUsize::new(0),
        }
    }

    /// Sets the CLA's overprovisioning factor (percent; 140 is Envoy's 1.4).
    #[must_use]
    pub fn with_overprovisioning_factor(mut self, percent: u32) -> Self {
        self.overprovisioning_factor = percent;
        self
    }

    /// Number of endpoints traffic can go to.
    pub fn routable_len(&self) -> usize {
        self.routable.len()
    }

    /// Round-robin pick among routable endpoints; `None` when there are none (Envoy: `UH`).
    pub fn pick_round_robin(&self) -> Option<&Endpoint> {
        if self.routable.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.routable.len();
        Some(&self.endpoints[self.routable[i]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16, health: HealthStatus, priority: u32) -> Endpoint {
        Endpoint {
            health,
            priority,
            ..Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)))
        }
    }

    #[test]
    fn round_robin_skips_unhealthy() {
        let set = EndpointSet::new(
            "c",
            vec![
                ep(1, HealthStatus::Healthy, 0),
                ep(2, HealthStatus::Unhealthy, 0),
                ep(3, HealthStatus::Unknown, 0),
            ],
        );
        let picks: Vec<u16> = (0..4)
            .map(|_| set.pick_round_robin().unwrap().address.port())
            .collect();
        assert_eq!(picks, vec![1, 3, 1, 3]);
    }

    #[test]
    fn lower_priority_used_only_when_higher_is_empty() {
        let set = EndpointSet::new(
            "c",
            vec![
                ep(1, HealthStatus::Unhealthy, 0),
                ep(2, HealthStatus::Healthy, 1),
            ],
        );
        assert_eq!(set.pick_round_robin().unwrap().address.port(), 2);
        let none = EndpointSet::new("c", vec![ep(1, HealthStatus::Draining, 0)]);
        assert!(none.pick_round_robin().is_none());
    }

    #[test]
    fn workload_metadata_parses_istio_form() {
        let w = WorkloadMetadata::parse("reviews-v1;default;reviews;v1;Kubernetes").unwrap();
        assert_eq!(w.canonical_revision, "v1");
        assert_eq!(w.cluster_id, "Kubernetes");
    }
}
