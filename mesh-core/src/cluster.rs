//! CDS clusters, compiled: discovery type, load-balancing policy, the Istio auto-mTLS transport
//! socket, and the upstream protocol.

use std::time::Duration;

/// How a cluster finds its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterDiscovery {
    /// EDS, keyed by `service_name` (istiod uses the cluster name).
    Eds {
        /// The `ClusterLoadAssignment` name to subscribe to.
        service_name: String,
    },
    /// Endpoints listed inline in the cluster's `load_assignment` (STATIC).
    Static {
        /// The inline `load_assignment`, compiled (named after the cluster); empty when the
        /// cluster has none.
        load_assignment: std::sync::Arc<crate::endpoint::EndpointSet>,
    },
    /// `STRICT_DNS` / `LOGICAL_DNS`: the inline `load_assignment`'s addresses are names that
    /// DNS resolves, again and again; the hosts are what the last answers said.
    Dns(std::sync::Arc<DnsDiscovery>),
    /// `ORIGINAL_DST`: connect where the application asked (PassthroughCluster).
    OriginalDestination,
}

/// Envoy's default `dns_refresh_rate`: 5 s.
pub const DEFAULT_DNS_REFRESH_RATE: Duration = Duration::from_secs(5);

/// `STRICT_DNS` or `LOGICAL_DNS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// `STRICT_DNS`: every address of every target is a host.
    Strict,
    /// `LOGICAL_DNS`: one host, at the first address of the single target's latest answer;
    /// new connections go to that address.
    Logical,
}

/// One `lb_endpoint` of a DNS cluster: the name (or IP literal) and port to resolve, and the
/// endpoint every address it resolves to becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    /// The socket address's `address` as configured (a host name, or an IP literal, which
    /// resolves to itself).
    pub host: String,
    /// The socket address's `port_value`.
    pub port: u16,
    /// Weight, health, locality, priority, TLS mode and workload metadata of the
    /// `lb_endpoint`; its `address` is replaced by each resolved address (with `port`).
    pub endpoint: crate::endpoint::Endpoint,
}

/// How a DNS cluster finds its hosts: its targets and Envoy's DNS settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsDiscovery {
    /// Strict or logical.
    pub mode: DnsMode,
    /// The inline `load_assignment`'s endpoints, in order (a LOGICAL_DNS cluster has one).
    pub targets: Vec<DnsTarget>,
    /// `dns_lookup_family`.
    pub lookup_family: crate::resolve::LookupFamily,
    /// `dns_refresh_rate` (Envoy's default 5 s).
    pub refresh_rate: Duration,
    /// `respect_dns_ttl`: refresh when the answer's TTL runs out instead (the refresh rate
    /// when the answer carries none).
    pub respect_dns_ttl: bool,
    /// The inline CLA's `policy.overprovisioning_factor` (percent).
    pub overprovisioning_factor: u32,
}

impl DnsDiscovery {
    /// When to ask again after an answer with `ttl` (see [`respect_dns_ttl`](Self::respect_dns_ttl)).
    pub fn next_refresh(&self, ttl: Option<Duration>) -> Duration {
        match ttl {
            Some(t) if self.respect_dns_ttl && !t.is_zero() => t,
            _ => self.refresh_rate,
        }
    }
}

/// `lb_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// ROUND_ROBIN.
    #[default]
    RoundRobin,
    /// LEAST_REQUEST (istiod's default): power of two choices.
    LeastRequest,
    /// RANDOM.
    Random,
    /// RING_HASH.
    RingHash,
    /// MAGLEV.
    Maglev,
    /// CLUSTER_PROVIDED (ORIGINAL_DST).
    ClusterProvided,
}

/// A SAN matcher from `match_subject_alt_names` / `match_typed_subject_alt_names`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SanMatcher {
    /// Exact match.
    Exact(String),
    /// Prefix match.
    Prefix(String),
}

impl SanMatcher {
    /// Whether a peer with these URI SANs passes `matchers`: any SAN matching any matcher, or
    /// no matchers at all. With matchers and no SANs it fails closed.
    pub fn accepts<S: AsRef<str>>(matchers: &[SanMatcher], uri_sans: &[S]) -> bool {
        matchers.is_empty()
            || uri_sans
                .iter()
                .any(|san| matchers.iter().any(|m| m.matches(san.as_ref())))
    }

    /// Whether `san` satisfies this matcher.
    pub fn matches(&self, san: &str) -> bool {
        match self {
            SanMatcher::Exact(e) => san == e,
            SanMatcher::Prefix(p) => san.starts_with(p.as_str()),
        }
    }
}

/// The upstream TLS settings of Istio's `tlsMode-istio` transport socket (ISTIO_MUTUAL): the
/// workload certificate (SDS `default`), the mesh roots (SDS `ROOTCA`), SNI, ALPN and the
/// peer SPIFFE IDs accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// SNI, `outbound_.<port>_.<subset>_.<fqdn>`.
    pub sni: String,
    /// ALPN offered, e.g. `["istio-peer-exchange", "istio"]`.
    pub alpn: Vec<String>,
    /// Peer URI SAN matchers; empty means any identity the mesh roots vouch for.
    pub san_matchers: Vec<SanMatcher>,
}

impl UpstreamTls {
    /// Whether a peer presenting these URI SANs is acceptable (fails closed: with matchers, at
    /// least one SAN must match one of them).
    pub fn accepts_peer(&self, uri_sans: &[&str]) -> bool {
        SanMatcher::accepts(&self.san_matchers, uri_sans)
    }
}

/// Istio service facts carried in cluster metadata (`filter_metadata.istio.services`), used
/// for `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceMetadata {
    /// `host`, e.g. `reviews.default.svc.cluster.local`.
    pub host: String,
    /// `name`.
    pub name: String,
    /// `namespace`.
    pub namespace: String,
}

/// Upstream protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (Istio's default for `http` ports).
    #[default]
    Http1,
    /// HTTP/2 (`http2_protocol_options`, or `h2UpgradePolicy: UPGRADE`).
    Http2,
    /// Use the downstream protocol (`use_downstream_protocol_config`).
    UseDownstream,
}

/// `upstream_connection_options.tcp_keepalive`: Envoy turns `SO_KEEPALIVE` on and sets each
/// given parameter; unset ones keep the system's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpKeepalive {
    /// `keepalive_probes` (`TCP_KEEPCNT`).
    pub probes: Option<u32>,
    /// `keepalive_time` (`TCP_KEEPIDLE`).
    pub time: Option<Duration>,
    /// `keepalive_interval` (`TCP_KEEPINTVL`).
    pub interval: Option<Duration>,
}

/// Envoy's default upstream connection idle timeout (`common_http_protocol_options.idle_timeout`
/// unset): one hour.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How the cluster's upstream connections are kept: what Istio's DestinationRule
/// `connectionPool` renders besides the circuit breakers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionPool {
    /// `max_requests_per_connection` (cluster field, or `common_http_protocol_options`):
    /// requests a connection carries before it is closed; `None` is no limit.
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.idle_timeout`: a connection without requests for this
    /// long is closed; `None` (configured 0) never closes. Envoy's default is one hour.
    pub idle_timeout: Option<Duration>,
    /// `upstream_connection_options.tcp_keepalive`.
    pub tcp_keepalive: Option<TcpKeepalive>,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            max_requests_per_connection: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            tcp_keepalive: None,
        }
    }
}

/// One cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Name, e.g. `outbound|9080|v1|reviews.default.svc.cluster.local`.
    pub name: String,
    /// Where endpoints come from.
    pub discovery: ClusterDiscovery,
    /// Load-balancing policy.
    pub lb_policy: LbPolicy,
    /// `connect_timeout` (Envoy default 5s; istiod sends 10s).
    pub connect_timeout: Duration,
    /// The `tlsMode-istio` transport socket (used for endpoints with `tlsMode: istio`).
    pub istio_tls: Option<UpstreamTls>,
    /// The cluster's default transport socket when it is TLS (applies to every endpoint);
    /// `None` is plaintext.
    pub tls: Option<UpstreamTls>,
    /// Upstream HTTP protocol.
    pub protocol: UpstreamProtocol,
    /// Istio service metadata, if present.
    pub service: Option<ServiceMetadata>,
    /// Policy-specific load-balancing settings and the panic threshold.
    pub lb_config: crate::lb::LbConfig,
    /// `outlier_detection`, when configured.
    pub outlier_detection: Option<crate::outlier::OutlierDetection>,
    /// `circuit_breakers` (default priority).
    pub circuit_breakers: crate::outlier::CircuitBreakers,
    /// Connection reuse, idle timeout and TCP keepalive.
    pub connection_pool: ConnectionPool,
}

impl Cluster {
    /// A plaintext round-robin EDS cluster named `name` (EDS service name = cluster name).
    pub fn eds(name: impl Into<String>) -> Self {
        let name = name.into();
        Cluster {
            discovery: ClusterDiscovery::Eds {
                service_name: name.clone(),
            },
            name,
            lb_policy: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(10),
            istio_tls: None,
            tls: None,
            protocol: UpstreamProtocol::Http1,
            service: None,
            lb_config: crate::lb::LbConfig::default(),
            outlier_detection: None,
            circuit_breakers: crate::outlier::CircuitBreakers::default(),
            connection_pool: ConnectionPool::default(),
        }
    }

    /// The TLS to use towards an endpoint with `tls_mode`: the auto-mTLS socket for
    /// `tlsMode: istio` endpoints, else the cluster's default socket.
    pub fn tls_for(&self, tls_mode: crate::endpoint::EndpointTlsMode) -> Option<&UpstreamTls> {
        match tls_mode {
            crate::endpoint::EndpointTlsMode::Istio => {
                self.istio_tls.as_ref().or(self.tls.as_ref())
            }
            crate::endpoint::EndpointTlsMode::Disabled => self.tls.as_ref(),
        }
    }

    /// The endpoints listed inline in the cluster (`load_assignment` of a STATIC cluster).
    pub fn inline_endpoints(&self) -> Option<&std::sync::Arc<crate::endpoint::EndpointSet>> {
        match &self.discovery {
            ClusterDiscovery::Static { load_assignment } => Some(load_assignment),
            _ => None,
        }
    }

    /// How a `STRICT_DNS` / `LOGICAL_DNS` cluster resolves its hosts.
    pub fn dns(&self) -> Option<&std::sync::Arc<DnsDiscovery>> {
        match &self.discovery {
            ClusterDiscovery::Dns(d) => Some(d),
            _ => None,
        }
    }

    /// The EDS resource name for this cluster, if it uses EDS.
    pub fn eds_service_name(&self) -> Option<&str> {
        match &self.discovery {
            ClusterDiscovery::Eds { service_name } => Some(service_name),
            _ => None,
        }
    }
}

/// Parts of an Istio cluster name `direction|port|subset|host`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioClusterName<'a> {
    /// `outbound` or `inbound`.
    pub direction: &'a str,
    /// Port.
    pub port: u16,
    /// Subset (may be empty).
    pub subset: &'a str,
    /// Service FQDN (may be empty for inbound).
    pub host: &'a str,
}

impl<'a> IstioClusterName<'a> {
    /// Splits `outbound|9080|v1|reviews.default.svc.cluster.local`.
    pub fn parse(name: &'a str) -> Option<Self> {
        let mut it = name.split('|');
        let direction = it.next()?;
        let port = it.next()?.parse().ok()?;
        let subset = it.next()?;
        let host = it.next()?;
        if it.next().is_some() || !(direction == "outbound" || direction == "inbound") {
            return None;
        }
        Some(IstioClusterName {
            direction,
            port,
            subset,
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_matching_fails_closed() {
        let tls = UpstreamTls {
            sni: "outbound_.80_._.a.ns.svc.cluster.local".into(),
            alpn: vec![],
            san_matchers: vec![SanMatcher::Exact(
                "spiffe://cluster.local/ns/ns/sa/a".into(),
            )],
        };
        assert!(tls.accepts_peer(&["spiffe://cluster.local/ns/ns/sa/a"]));
        assert!(!tls.accepts_peer(&["spiffe://cluster.local/ns/ns/sa/b"]));
        assert!(!tls.accepts_peer(&[]));
        let prefix = SanMatcher::Prefix("spiffe://cluster.local/ns/ns/".into());
        assert!(prefix.matches("spiffe://cluster.local/ns/ns/sa/x"));
        assert!(!prefix.matches("spiffe://other/ns/ns/sa/x"));
    }

    #[test]
    fn istio_cluster_names() {
        let n =
            IstioClusterName::parse("outbound|9080|v1|reviews.default.svc.cluster.local").unwrap();
        assert_eq!((n.port, n.subset), (9080, "v1"));
        assert!(IstioClusterName::parse("PassthroughCluster").is_none());
        assert!(IstioClusterName::parse("outbound|x||h").is_none());
    }
}
