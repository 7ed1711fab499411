//! The declarative mesh the testkit control plane serves, and the istiod-shaped xDS resources
//! generated from it for one client namespace (FACTS.md c.5).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, Metadata, SocketAddress, TransportSocket,
    address, config_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost, WeightedCluster, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options, http_protocol_options::explicit_http_config,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{
    Any, BoolValue, Duration, ListValue, Struct, UInt32Value, Value, value::Kind,
};
use mesh_core::listener::InboundTlsMode;
use mesh_core::snapshot::OutboundTrafficPolicy;

use crate::ads::{CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};
use crate::istio_proto;
use crate::translate::to_any;

/// A port's protocol, as the Kubernetes Service port name/appProtocol declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `http`: HTTP/1.1 upstream.
    Http,
    /// `http2`: HTTP/2 upstream.
    Http2,
    /// `grpc`: HTTP/2 upstream.
    Grpc,
    /// `tcp`: TCP proxy.
    Tcp,
}

impl Protocol {
    fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

/// One backend instance of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Where it listens (used for every service port).
    pub addr: SocketAddr,
    /// Pod labels (subsets select on them).
    pub labels: BTreeMap<String, String>,
    /// Its Kubernetes service account.
    pub service_account: String,
    /// Whether it runs a sidecar/mesh (endpoint metadata `tlsMode: istio`).
    pub tls_mode_istio: bool,
}

impl EndpointSpec {
    /// A meshed endpoint (`tlsMode: istio`) with service account `default`.
    pub fn new(addr: SocketAddr) -> Self {
        EndpointSpec {
            addr,
            labels: BTreeMap::new(),
            service_account: "default".into(),
            tls_mode_istio: true,
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Sets the service account.
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    /// Marks the endpoint as not meshed (plaintext).
    pub fn plaintext(mut self) -> Self {
        self.tls_mode_istio = false;
        self
    }
}

/// A DestinationRule subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetSpec {
    /// Subset name (`v1`).
    pub name: String,
    /// Label selector.
    pub labels: BTreeMap<String, String>,
}

/// A VirtualService-style weighted split of one port across subsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedRouteSpec {
    /// Service port the route applies to.
    pub port: u16,
    /// `(subset, weight)`; an empty subset name means the whole service.
    pub split: Vec<(String, u32)>,
}

/// A Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// ClusterIP.
    pub vip: IpAddr,
    /// Ports and protocols.
    pub ports: Vec<(u16, Protocol)>,
    /// Endpoints.
    pub endpoints: Vec<EndpointSpec>,
    /// DestinationRule subsets.
    pub subsets: Vec<SubsetSpec>,
    /// Weighted routes.
    pub routes: Vec<WeightedRouteSpec>,
    /// A VirtualService `retries.retryOn` for this host; `None` keeps istiod's default
    /// policy (`connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`).
    pub retry_on: Option<String>,
}

impl ServiceSpec {
    /// A service without ports or endpoints.
    pub fn new(name: &str, namespace: &str, vip: IpAddr) -> Self {
        ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            vip,
            ports: Vec::new(),
            endpoints: Vec::new(),
            subsets: Vec::new(),
            routes: Vec::new(),
            retry_on: None,
        }
    }

    /// Retries on `retry_on` (Envoy's `x-envoy-retry-on` conditions, as a VirtualService's
    /// `retries.retryOn` renders), keeping istiod's other retry settings.
    pub fn retry_on(mut self, retry_on: &str) -> Self {
        self.retry_on = Some(retry_on.into());
        self
    }

    /// Adds a port.
    pub fn port(mut self, port: u16, protocol: Protocol) -> Self {
        self.ports.push((port, protocol));
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, e: EndpointSpec) -> Self {
        self.endpoints.push(e);
        self
    }

    /// Adds a subset selecting `label=value`.
    pub fn subset(mut self, name: &str, label: &str, value: &str) -> Self {
        self.subsets.push(SubsetSpec {
            name: name.into(),
            labels: BTreeMap::from([(label.into(), value.into())]),
        });
        self
    }

    /// Splits `port` across subsets by weight.
    pub fn weighted(mut self, port: u16, split: &[(&str, u32)]) -> Self {
        self.routes.push(WeightedRouteSpec {
            port,
            split: split.iter().map(|(s, w)| (s.to_string(), *w)).collect(),
        });
        self
    }

    /// `<name>.<ns>.svc.<domain>`.
    pub fn fqdn(&self, domain: &str) -> String {
        format!("{}.{}.svc.{domain}", self.name, self.namespace)
    }
}

/// A ServiceEntry's `resolution`, for the DNS kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsResolution {
    /// `resolution: DNS`: a `STRICT_DNS` cluster.
    Dns,
    /// `resolution: DNS_ROUND_ROBIN`: a `LOGICAL_DNS` cluster.
    DnsRoundRobin,
}

/// A `ServiceEntry` with DNS resolution (`location: MESH_EXTERNAL`), rendered as istiod
/// renders one for an IPv4 proxy: per port a `STRICT_DNS` / `LOGICAL_DNS` cluster
/// `outbound|<port>||<host>` whose inline endpoints are the entry's endpoint addresses (or the
/// host itself when it lists none), `dns_lookup_family: V4_ONLY`, `dns_refresh_rate` from
/// mesh config (60 s by default), `respect_dns_ttl: true`, plaintext; and an HTTP port's
/// virtual host for `<host>` and `<host>:<port>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntrySpec {
    /// `hosts[0]`, e.g. `api.external.test`.
    pub host: String,
    /// The ServiceEntry's namespace.
    pub namespace: String,
    /// `ports`.
    pub ports: Vec<(u16, Protocol)>,
    /// `resolution`.
    pub resolution: DnsResolution,
    /// `endpoints[].address` (names or IPs) with an optional target port; empty: the host.
    pub endpoints: Vec<(String, Option<u16>)>,
    /// Mesh config `dnsRefreshRate` (istiod's default 60 s).
    pub dns_refresh_rate: std::time::Duration,
}

impl ServiceEntrySpec {
    /// A `resolution: DNS` entry for `host` in `namespace`, without ports or endpoints.
    pub fn dns(host: &str, namespace: &str) -> Self {
        ServiceEntrySpec {
            host: host.into(),
            namespace: namespace.into(),
            ports: Vec::new(),
            resolution: DnsResolution::Dns,
            endpoints: Vec::new(),
            dns_refresh_rate: std::time::Duration::from_secs(60),
        }
    }

    /// Sets the resolution.
    pub fn resolution(mut self, r: DnsResolution) -> Self {
        self.resolution = r;
        self
    }

    /// Adds a port.
    pub fn port(mut self, port: u16, protocol: Protocol) -> Self {
        self.ports.push((port, protocol));
        self
    }

    /// Adds an endpoint address (a name DNS resolves, or an IP), reached on `target_port`
    /// (the service port when `None`).
    pub fn endpoint(mut self, address: &str, target_port: Option<u16>) -> Self {
        self.endpoints.push((address.into(), target_port));
        self
    }

    /// Sets mesh config's `dnsRefreshRate`.
    pub fn dns_refresh_rate(mut self, d: std::time::Duration) -> Self {
        self.dns_refresh_rate = d;
        self
    }
}

/// The whole mesh as the testkit control plane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshModel {
    /// Services.
    pub services: Vec<ServiceSpec>,
    /// ServiceEntries with DNS resolution.
    pub service_entries: Vec<ServiceEntrySpec>,
    /// `outboundTrafficPolicy`.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Mesh-wide PeerAuthentication mode (rendered into `virtualInbound`).
    pub peer_authentication: InboundTlsMode,
    /// Per-port PeerAuthentication overrides.
    pub port_peer_authentication: BTreeMap<u16, InboundTlsMode>,
    /// The declared protocol of the workload's own inbound ports (the Service ports that
    /// select it), rendered into `virtualInbound` as istiod does: HTTP ports get HTTP
    /// connection manager chains, TCP ports `tcp_proxy` chains only; other ports (and the
    /// catch-all) both, for protocol sniffing.
    pub inbound_ports: BTreeMap<u16, Protocol>,
    /// Trust domain (SPIFFE IDs in SAN matchers).
    pub trust_domain: String,
    /// meshConfig `trustDomainAliases`: istiod accepts peers of these trust domains on inbound
    /// mTLS chains (`match_subject_alt_names` prefixes), expands the outbound clusters' SAN
    /// lists and AuthorizationPolicy principals with them.
    pub trust_domain_aliases: Vec<String>,
    /// Cluster DNS domain (`cluster.local`).
    pub cluster_domain: String,
}

impl Default for MeshModel {
    fn default() -> Self {
        MeshModel {
            services: Vec::new(),
            service_entries: Vec::new(),
            outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
            peer_authentication: InboundTlsMode::Permissive,
            port_peer_authentication: BTreeMap::new(),
            inbound_ports: BTreeMap::new(),
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: Vec::new(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

impl MeshModel {
    /// Adds a service.
    pub fn service(mut self, s: ServiceSpec) -> Self {
        self.services.push(s);
        self
    }

    /// Adds a meshConfig `trustDomainAliases` entry.
    pub fn trust_domain_alias(mut self, alias: &str) -> Self {
        self.trust_domain_aliases.push(alias.into());
        self
    }

    /// The trust domain then its aliases, without duplicates (istiod's trust-domain bundle
    /// and `TrustDomainsForValidation`).
    pub fn trust_domains(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for td in std::iter::once(&self.trust_domain).chain(&self.trust_domain_aliases) {
            if !out.contains(td) {
                out.push(td.clone());
            }
        }
        out
    }

    /// The inbound mTLS chains' `match_subject_alt_names`: one `prefix: spiffe://<td>/` per
    /// trust domain in [`MeshModel::trust_domains`], as istiod renders them.
    pub fn inbound_peer_san_matchers(&self) -> Vec<StringMatcher> {
        self.trust_domains()
            .iter()
            .map(|td| StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix(format!(
                    "spiffe://{td}/"
                ))),
                ignore_case: false,
            })
            .collect()
    }

    /// Adds a ServiceEntry with DNS resolution.
    pub fn service_entry(mut self, e: ServiceEntrySpec) -> Self {
        self.service_entries.push(e);
        self
    }

    /// Declares the protocol of one of the workload's own inbound ports.
    pub fn inbound_port(mut self, port: u16, protocol: Protocol) -> Self {
        self.inbound_ports.insert(port, protocol);
        self
    }
}

/// Generated resources: type URL → name → resource.
pub type ResourceSet = BTreeMap<&'static str, BTreeMap<String, Any>>;

fn sock(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        initial_fetch_timeout: Some(Duration {
            seconds: 0,
            nanos: 0,
        }),
        resource_api_version: 2,
        ..Default::default()
    }
}

fn s(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

fn strukt(fields: &[(&str, Value)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ads()),
    }
}

fn network_filter(name: &str, any: Any) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any)),
    }
}

/// `envoy.filters.listener.tls_inspector` and `envoy.filters.listener.http_inspector`, as
/// istiod puts them on an outbound HTTP listener.
fn outbound_listener_filters() -> Vec<ListenerFilter> {
    use envoy_types::pb::envoy::config::listener::v3::listener_filter;
    use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
    use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
    [
        (
            "envoy.filters.listener.tls_inspector",
            to_any(&TlsInspector::default()),
        ),
        (
            "envoy.filters.listener.http_inspector",
            to_any(&HttpInspector::default()),
        ),
    ]
    .into_iter()
    .map(|(name, any)| ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any)),
        ..Default::default()
    })
    .collect()
}

fn tcp_proxy_filter(cluster: &str) -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        to_any(&TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }),
    )
}

/// istiod's default route retry policy, as its dumps carry it (previous_hosts predicate with
/// its typed config, five host selection attempts).
fn default_retry() -> RetryPolicy {
    use envoy_types::pb::envoy::config::route::v3::retry_policy::{
        RetryHostPredicate, retry_host_predicate,
    };
    use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(to_any(
                &PreviousHostsPredicate {},
            ))),
        }],
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

fn cluster_name(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound|{port}|{subset}|{fqdn}")
}

fn selects(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl MeshModel {
    /// Every resource istiod would send a sidecar in `client_namespace`.
    pub fn generate(&self, client_namespace: &str) -> ResourceSet {
        let mut out: ResourceSet = BTreeMap::new();
        for t in [CLUSTER, ENDPOINT, LISTENER, ROUTE, NAME_TABLE] {
            out.insert(t, BTreeMap::new());
        }
        let domain = &self.cluster_domain;
        let mut http_ports: BTreeMap<u16, Vec<VirtualHost>> = BTreeMap::new();
        let mut name_table = istio_proto::NameTable::default();
        for svc in &self.services {
            let fqdn = svc.fqdn(domain);
            name_table.table.insert(
                fqdn.clone(),
                istio_proto::NameInfo {
                    ips: vec![svc.vip.to_string()],
                    registry: "Kubernetes".into(),
                    shortname: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    alt_hosts: Vec::new(),
                },
            );
            // istiod's `spiffe.ExpandWithTrustDomains`: each service account's identity in the
            // trust domain and in every alias.
            let sans: BTreeSet<String> = svc
                .endpoints
                .iter()
                .flat_map(|e| {
                    self.trust_domains().into_iter().map(move |td| {
                        format!(
                            "spiffe://{td}/ns/{}/sa/{}",
                            svc.namespace, e.service_account
                        )
                    })
                })
                .collect();
            for &(port, proto) in &svc.ports {
                let mut subsets: Vec<(String, Option<&BTreeMap<String, String>>)> =
                    vec![(String::new(), None)];
                subsets.extend(
                    svc.subsets
                        .iter()
                        .map(|s| (s.name.clone(), Some(&s.labels))),
                );
                for (subset, sel) in subsets {
                    let name = cluster_name(port, &subset, &fqdn);
                    let c = self.cluster(&name, port, &subset, &fqdn, proto, &sans, svc);
                    out.entry(CLUSTER)
                        .or_default()
                        .insert(name.clone(), to_any(&c));
                    let eps: Vec<&EndpointSpec> = svc
                        .endpoints
                        .iter()
                        .filter(|e| sel.is_none_or(|sel| selects(sel, &e.labels)))
                        .collect();
                    let cla = cla(&name, &eps, svc);
                    out.entry(ENDPOINT).or_default().insert(name, to_any(&cla));
                }
                if proto.is_http() {
                    http_ports.entry(port).or_default().push(virtual_host(
                        svc,
                        port,
                        &fqdn,
                        client_namespace,
                    ));
                } else {
                    let name = format!("{}_{port}", svc.vip);
                    let l = Listener {
                        name: name.clone(),
                        address: Some(sock(svc.vip, port)),
                        filter_chains: vec![FilterChain {
                            filters: vec![tcp_proxy_filter(&cluster_name(port, "", &fqdn))],
                            ..Default::default()
                        }],
                        traffic_direction: 2,
                        ..Default::default()
                    };
                    out.entry(LISTENER).or_default().insert(name, to_any(&l));
                }
            }
        }
        for se in &self.service_entries {
            // The cluster and virtual host of a service named after the host, made DNS.
            let svc = ServiceSpec::new(&se.host, &se.namespace, IpAddr::from([0, 0, 0, 0]));
            for &(port, proto) in &se.ports {
                let name = cluster_name(port, "", &se.host);
                let mut c = self.cluster(&name, port, "", &se.host, proto, &BTreeSet::new(), &svc);
                c.transport_socket_matches.clear();
                c.eds_cluster_config = None;
                let t = match se.resolution {
                    DnsResolution::Dns => cluster::DiscoveryType::StrictDns,
                    DnsResolution::DnsRoundRobin => cluster::DiscoveryType::LogicalDns,
                };
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(t as i32));
                c.dns_lookup_family = cluster::DnsLookupFamily::V4Only as i32;
                #[allow(deprecated)]
                {
                    c.dns_refresh_rate = Some(Duration {
                        seconds: se.dns_refresh_rate.as_secs() as i64,
                        nanos: se.dns_refresh_rate.subsec_nanos() as i32,
                    });
                    c.respect_dns_ttl = true;
                }
                let targets: Vec<(String, u16)> = if se.endpoints.is_empty() {
                    vec![(se.host.clone(), port)]
                } else {
                    se.endpoints
                        .iter()
                        .map(|(a, p)| (a.clone(), p.unwrap_or(port)))
                        .collect()
                };
                c.load_assignment = Some(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: targets
                            .into_iter()
                            .map(|(address, port)| LbEndpoint {
                                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                                    Endpoint {
                                        address: Some(Address {
                                            address: Some(address::Address::SocketAddress(
                                                SocketAddress {
                                                    address,
                                                    port_specifier: Some(
                                                        socket_address::PortSpecifier::PortValue(
                                                            port.into(),
                                                        ),
                                                    ),
                                                    ..Default::default()
                                                },
                                            )),
                                        }),
                                        ..Default::default()
                                    },
                                )),
                                load_balancing_weight: Some(UInt32Value { value: 1 }),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                });
                out.entry(CLUSTER)
                    .or_default()
                    .insert(name.clone(), to_any(&c));
                if proto.is_http() {
                    let mut vh = virtual_host(&svc, port, &se.host, client_namespace);
                    vh.domains = vec![se.host.clone(), format!("{}:{port}", se.host)];
                    http_ports.entry(port).or_default().push(vh);
                }
            }
        }
        for (port, mut vhosts) in http_ports {
            vhosts.push(self.fallback_vhost());
            let rc = RouteConfiguration {
                name: port.to_string(),
                virtual_hosts: vhosts,
                validate_clusters: Some(BoolValue { value: false }),
                ..Default::default()
            };
            out.entry(ROUTE)
                .or_default()
                .insert(rc.name.clone(), to_any(&rc));
            let name = format!("0.0.0.0_{port}");
            let hcm = HttpConnectionManager {
                stat_prefix: format!("outbound_0.0.0.0_{port}"),
                route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                    config_source: Some(ads()),
                    route_config_name: port.to_string(),
                })),
                http_filters: vec![super::authz::router_http_filter()],
                ..Default::default()
            };
            let l = Listener {
                name: name.clone(),
                address: Some(sock(IpAddr::from([0, 0, 0, 0]), port)),
                // As istiod renders it: the inspectors that set the transport and application
                // protocol the filter chain matches on.
                listener_filters: outbound_listener_filters(),
                listener_filters_timeout: Some(Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                continue_on_listener_filters_timeout: true,
                filter_chains: vec![FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        transport_protocol: "raw_buffer".into(),
                        application_protocols: vec!["http/1.1".into(), "h2c".into()],
                        ..Default::default()
                    }),
                    filters: vec![network_filter(
                        "envoy.filters.network.http_connection_manager",
                        to_any(&hcm),
                    )],
                    ..Default::default()
                }],
                traffic_direction: 2,
                ..Default::default()
            };
            out.entry(LISTENER).or_default().insert(name, to_any(&l));
        }
        for c in [passthrough_cluster(), blackhole_cluster()] {
            out.entry(CLUSTER)
                .or_default()
                .insert(c.name.clone(), to_any(&c));
        }
        let vo = self.virtual_outbound();
        out.entry(LISTENER)
            .or_default()
            .insert(vo.name.clone(), to_any(&vo));
        let vi = self.virtual_inbound();
        out.entry(LISTENER)
            .or_default()
            .insert(vi.name.clone(), to_any(&vi));
        out.entry(NAME_TABLE)
            .or_default()
            .insert(String::new(), to_any(&name_table));
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn cluster(
        &self,
        name: &str,
        port: u16,
        subset: &str,
        fqdn: &str,
        proto: Protocol,
        sans: &BTreeSet<String>,
        svc: &ServiceSpec,
    ) -> Cluster {
        let h2 = matches!(proto, Protocol::Http2 | Protocol::Grpc);
        let mut alpn = vec!["istio-peer-exchange".to_string(), "istio".to_string()];
        if h2 {
            alpn.push("h2".into());
        }
        let tls = UpstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                alpn_protocols: alpn,
                tls_certificate_sds_secret_configs: vec![sds("default")],
                validation_context_type: Some(
                    common_tls_context::ValidationContextType::CombinedValidationContext(
                        common_tls_context::CombinedCertificateValidationContext {
                            default_validation_context: Some(CertificateValidationContext {
                                #[allow(deprecated)]
                                match_subject_alt_names: sans
                                    .iter()
                                    .map(|s| StringMatcher {
                                        match_pattern: Some(string_matcher::MatchPattern::Exact(
                                            s.clone(),
                                        )),
                                        ignore_case: false,
                                    })
                                    .collect(),
                                ..Default::default()
                            }),
                            validation_context_sds_secret_config: Some(sds("ROOTCA")),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            sni: format!("outbound_.{port}_.{subset}_.{fqdn}"),
            ..Default::default()
        };
        let mut c = Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: name.into(),
            }),
            connect_timeout: Some(Duration {
                seconds: 10,
                nanos: 0,
            }),
            lb_policy: cluster::LbPolicy::LeastRequest as i32,
            // istiod's default thresholds: everything unbounded (Envoy's own defaults, e.g.
            // max_retries 3, would otherwise cap concurrent retries).
            circuit_breakers: Some(istiod_circuit_breakers()),
            metadata: Some(Metadata {
                filter_metadata: [(
                    "istio".to_string(),
                    strukt(&[(
                        "services",
                        Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: vec![Value {
                                    kind: Some(Kind::StructValue(strukt(&[
                                        ("host", s(fqdn)),
                                        ("name", s(&svc.name)),
                                        ("namespace", s(&svc.namespace)),
                                    ]))),
                                }],
                            })),
                        },
                    )]),
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            transport_socket_matches: vec![
                cluster::TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(strukt(&[("tlsMode", s("istio"))])),
                    transport_socket: Some(TransportSocket {
                        name: "envoy.transport_sockets.tls".into(),
                        config_type: Some(transport_socket::ConfigType::TypedConfig(to_any(&tls))),
                    }),
                },
                cluster::TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Struct::default()),
                    transport_socket: Some(TransportSocket {
                        name: "envoy.transport_sockets.raw_buffer".into(),
                        config_type: Some(transport_socket::ConfigType::TypedConfig(to_any(
                            &RawBuffer {},
                        ))),
                    }),
                },
            ],
            ..Default::default()
        };
        if proto.is_http() {
            let protocol_config = if h2 {
                explicit_http_config::ProtocolConfig::Http2ProtocolOptions(Default::default())
            } else {
                explicit_http_config::ProtocolConfig::HttpProtocolOptions(Default::default())
            };
            let opts = HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(protocol_config),
                        },
                    ),
                ),
                ..Default::default()
            };
            c.typed_extension_protocol_options.insert(
                crate::translate::cluster::HTTP_PROTOCOL_OPTIONS_KEY.into(),
                to_any(&opts),
            );
        }
        c
    }

    fn fallback_vhost(&self) -> VirtualHost {
        let (name, action) = match self.outbound_traffic_policy {
            OutboundTrafficPolicy::AllowAny => (
                "allow_any",
                route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        mesh_core::snapshot::PASSTHROUGH_CLUSTER.into(),
                    )),
                    timeout: Some(Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            ),
            OutboundTrafficPolicy::RegistryOnly => (
                "block_all",
                route::Action::DirectResponse(DirectResponseAction {
                    status: 502,
                    ..Default::default()
                }),
            ),
        };
        VirtualHost {
            name: name.into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: name.into(),
                r#match: Some(prefix_match()),
                action: Some(action),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn virtual_outbound(&self) -> Listener {
        let catchall = match self.outbound_traffic_policy {
            OutboundTrafficPolicy::AllowAny => mesh_core::snapshot::PASSTHROUGH_CLUSTER,
            OutboundTrafficPolicy::RegistryOnly => mesh_core::snapshot::BLACKHOLE_CLUSTER,
        };
        Listener {
            name: "virtualOutbound".into(),
            address: Some(sock(IpAddr::from([0, 0, 0, 0]), 15001)),
            filter_chains: vec![
                FilterChain {
                    name: "virtualOutbound-blackhole".into(),
                    filter_chain_match: Some(FilterChainMatch {
                        destination_port: Some(UInt32Value { value: 15001 }),
                        ..Default::default()
                    }),
                    filters: vec![tcp_proxy_filter(mesh_core::snapshot::BLACKHOLE_CLUSTER)],
                    ..Default::default()
                },
                FilterChain {
                    name: "virtualOutbound-catchall-tcp".into(),
                    filters: vec![tcp_proxy_filter(catchall)],
                    ..Default::default()
                },
            ],
            use_original_dst: Some(BoolValue { value: true }),
            traffic_direction: 2,
            ..Default::default()
        }
    }

    fn virtual_inbound(&self) -> Listener {
        let mut chains = vec![FilterChain {
            name: "virtualInbound-blackhole".into(),
            filter_chain_match: Some(FilterChainMatch {
                destination_port: Some(UInt32Value { value: 15006 }),
                ..Default::default()
            }),
            filters: vec![tcp_proxy_filter(mesh_core::snapshot::BLACKHOLE_CLUSTER)],
            ..Default::default()
        }];
        let ports: BTreeSet<u16> = self
            .port_peer_authentication
            .keys()
            .chain(self.inbound_ports.keys())
            .copied()
            .collect();
        let mut modes: Vec<(Option<u16>, InboundTlsMode)> = ports
            .into_iter()
            .map(|p| {
                let mode = self.port_peer_authentication.get(&p);
                (Some(p), mode.copied().unwrap_or(self.peer_authentication))
            })
            .collect();
        modes.push((None, self.peer_authentication));
        for (port, mode) in modes {
            let declared = port.and_then(|p| self.inbound_ports.get(&p).copied());
            // istiod: HTTP chains (selected by ALPN / the sniffed protocol) for HTTP and
            // undeclared ports, TCP proxy chains for TCP and undeclared ports.
            let http_chains = declared.is_none_or(Protocol::is_http);
            let tcp_chains = declared.is_none_or(|p| !p.is_http());
            let tcp_filters = || {
                if tcp_chains {
                    vec![tcp_proxy_filter("InboundPassthroughClusterIpv4")]
                } else {
                    vec![super::authz::inbound_http_connection_manager(&[])]
                }
            };
            let dest = port.map(|p| UInt32Value {
                value: u32::from(p),
            });
            let name = port
                .map(|p| format!("0.0.0.0_{p}"))
                .unwrap_or_else(|| "virtualInbound".into());
            if mode != InboundTlsMode::Disable {
                let tls = DownstreamTlsContext {
                    common_tls_context: Some(CommonTlsContext {
                        alpn_protocols: vec![
                            "istio-peer-exchange".into(),
                            "h2".into(),
                            "http/1.1".into(),
                        ],
                        tls_certificate_sds_secret_configs: vec![sds("default")],
                        validation_context_type: Some(
                            common_tls_context::ValidationContextType::CombinedValidationContext(
                                common_tls_context::CombinedCertificateValidationContext {
                                    #[allow(deprecated)]
                                    default_validation_context: Some(
                                        CertificateValidationContext {
                                            match_subject_alt_names: self
                                                .inbound_peer_san_matchers(),
                                            ..Default::default()
                                        },
                                    ),
                                    validation_context_sds_secret_config: Some(sds("ROOTCA")),
                                    ..Default::default()
                                },
                            ),
                        ),
                        ..Default::default()
                    }),
                    require_client_certificate: Some(BoolValue { value: true }),
                    ..Default::default()
                };
                let transport_socket = Some(TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(to_any(&tls))),
                });
                if http_chains && tcp_chains {
                    chains.push(FilterChain {
                        name: name.clone(),
                        filter_chain_match: Some(FilterChainMatch {
                            destination_port: dest,
                            transport_protocol: "tls".into(),
                            application_protocols: vec![
                                "istio-http/1.0".into(),
                                "istio-http/1.1".into(),
                                "istio-h2".into(),
                            ],
                            ..Default::default()
                        }),
                        filters: vec![super::authz::inbound_http_connection_manager(&[])],
                        transport_socket: transport_socket.clone(),
                        ..Default::default()
                    });
                }
                chains.push(FilterChain {
                    name: name.clone(),
                    filter_chain_match: Some(FilterChainMatch {
                        destination_port: dest,
                        transport_protocol: "tls".into(),
                        ..Default::default()
                    }),
                    filters: tcp_filters(),
                    transport_socket,
                    ..Default::default()
                });
            }
            if mode != InboundTlsMode::Strict {
                if http_chains && tcp_chains {
                    chains.push(FilterChain {
                        name: name.clone(),
                        filter_chain_match: Some(FilterChainMatch {
                            destination_port: dest,
                            transport_protocol: "raw_buffer".into(),
                            application_protocols: vec!["http/1.1".into(), "h2c".into()],
                            ..Default::default()
                        }),
                        filters: vec![super::authz::inbound_http_connection_manager(&[])],
                        ..Default::default()
                    });
                }
                chains.push(FilterChain {
                    name,
                    filter_chain_match: Some(FilterChainMatch {
                        destination_port: dest,
                        transport_protocol: "raw_buffer".into(),
                        ..Default::default()
                    }),
                    filters: tcp_filters(),
                    ..Default::default()
                });
            }
        }
        Listener {
            name: "virtualInbound".into(),
            address: Some(sock(IpAddr::from([0, 0, 0, 0]), 15006)),
            filter_chains: chains,
            traffic_direction: 1,
            ..Default::default()
        }
    }
}

fn prefix_match() -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
        ..Default::default()
    }
}

fn virtual_host(svc: &ServiceSpec, port: u16, fqdn: &str, client_ns: &str) -> VirtualHost {
    let (n, ns) = (&svc.name, &svc.namespace);
    let mut hosts = vec![fqdn.to_string()];
    if ns == client_ns {
        hosts.push(n.clone());
    }
    hosts.extend([
        format!("{n}.{ns}"),
        format!("{n}.{ns}.svc"),
        svc.vip.to_string(),
    ]);
    let mut domains = Vec::with_capacity(hosts.len() * 2);
    for h in hosts {
        domains.push(format!("{h}:{port}"));
        domains.push(h);
    }
    let action = match svc.routes.iter().find(|r| r.port == port) {
        Some(w) => {
            let clusters: Vec<weighted_cluster::ClusterWeight> = w
                .split
                .iter()
                .filter(|(_, weight)| *weight > 0)
                .map(|(subset, weight)| weighted_cluster::ClusterWeight {
                    name: cluster_name(port, subset, fqdn),
                    weight: Some(UInt32Value { value: *weight }),
                    ..Default::default()
                })
                .collect();
            if clusters.len() == 1 {
                route_action::ClusterSpecifier::Cluster(clusters[0].name.clone())
            } else {
                route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters,
                    ..Default::default()
                })
            }
        }
        None => route_action::ClusterSpecifier::Cluster(cluster_name(port, "", fqdn)),
    };
    VirtualHost {
        name: format!("{fqdn}:{port}"),
        domains,
        routes: vec![Route {
            name: "default".into(),
            r#match: Some(prefix_match()),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(action),
                timeout: Some(Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                retry_policy: Some(match &svc.retry_on {
                    Some(on) => RetryPolicy {
                        retry_on: on.clone(),
                        ..default_retry()
                    },
                    None => default_retry(),
                }),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn cla(name: &str, eps: &[&EndpointSpec], svc: &ServiceSpec) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: eps
                .iter()
                .map(|e| {
                    let canonical = e
                        .labels
                        .get("app")
                        .cloned()
                        .unwrap_or_else(|| svc.name.clone());
                    let revision = e
                        .labels
                        .get("version")
                        .cloned()
                        .unwrap_or_else(|| "latest".into());
                    let mut md = vec![(
                        "istio".to_string(),
                        strukt(&[(
                            "workload",
                            s(&format!(
                                "{};{};{canonical};{revision};Kubernetes",
                                svc.name, svc.namespace
                            )),
                        )]),
                    )];
                    if e.tls_mode_istio {
                        md.push((
                            "envoy.transport_socket_match".into(),
                            strukt(&[("tlsMode", s("istio"))]),
                        ));
                    }
                    LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(sock(e.addr.ip(), e.addr.port())),
                            ..Default::default()
                        })),
                        health_status: 1,
                        metadata: Some(Metadata {
                            filter_metadata: md.into_iter().collect(),
                            ..Default::default()
                        }),
                        load_balancing_weight: Some(UInt32Value { value: 1 }),
                    }
                })
                .collect(),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The thresholds istiod puts on every outbound cluster without a DestinationRule
/// connection pool (all `u32::MAX`, `track_remaining`).
fn istiod_circuit_breakers() -> CircuitBreakers {
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: Some(UInt32Value { value: u32::MAX }),
            max_pending_requests: Some(UInt32Value { value: u32::MAX }),
            max_requests: Some(UInt32Value { value: u32::MAX }),
            max_retries: Some(UInt32Value { value: u32::MAX }),
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn passthrough_cluster() -> Cluster {
    Cluster {
        name: mesh_core::snapshot::PASSTHROUGH_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    }
}

fn blackhole_cluster() -> Cluster {
    Cluster {
        name: mesh_core::snapshot::BLACKHOLE_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_retry_is_istiods() {
        // As istiod 1.18 writes it (testdata/istio/deathstarbench-geo-istio1.18_config_dump.json).
        let p = default_retry();
        assert_eq!(p.host_selection_retry_max_attempts, 5);
        assert_eq!(p.retry_host_predicate.len(), 1);
        let pred = &p.retry_host_predicate[0];
        assert_eq!(pred.name, "envoy.retry_host_predicates.previous_hosts");
        match &pred.config_type {
            Some(
                envoy_types::pb::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any),
            ) => assert_eq!(
                any.type_url,
                "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            ),
            other => panic!("typed config expected: {other:?}"),
        }
        // mesh's translator reads it as previous_hosts with five picks.
        let rc = RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![VirtualHost {
                name: "a".into(),
                domains: vec!["a".into()],
                routes: vec![Route {
                    r#match: Some(prefix_match()),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        retry_policy: Some(p),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let rc = crate::translate::translate_route(&rc).expect("translates");
        let r = &rc.virtual_hosts[0].routes[0];
        let retry = r.retry.as_ref().expect("retry policy");
        assert!(retry.previous_hosts);
        assert_eq!(retry.host_selection_retry_max_attempts, 5);
        assert_eq!(retry.num_retries, 2);
    }
}
