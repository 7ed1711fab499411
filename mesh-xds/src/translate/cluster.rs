//! CDS `Cluster` → [`mesh_core::cluster::Cluster`].

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster as PbCluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options, http_protocol_options::explicit_http_config,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use mesh_core::cluster::{
    Cluster, ClusterDiscovery, ConnectionPool, DEFAULT_DNS_REFRESH_RATE, DnsDiscovery, DnsMode,
    DnsTarget, LbPolicy, SanMatcher, ServiceMetadata, TcpKeepalive, UpstreamProtocol, UpstreamTls,
};
use mesh_core::lb::MAGLEV_MAX_TABLE_SIZE;
use mesh_core::resolve::LookupFamily;

use super::{TranslateError, duration, from_any, struct_list, struct_string};

const KIND: &str = "Cluster";

/// The `typed_extension_protocol_options` key of the upstream HTTP options.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Type URL of the upstream HTTP protocol options (under [`HTTP_PROTOCOL_OPTIONS_KEY`]).
pub const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Type URL of the plaintext transport socket config.
pub const RAW_BUFFER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
/// Type URL of the internal upstream transport socket (a wrapper whose inner socket decides).
pub const INTERNAL_UPSTREAM_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport";
/// Type URL of the upstream TLS transport socket config.
pub const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// Translates one cluster: discovery type, LB policy, connect timeout, the `tlsMode-istio`
/// auto-mTLS socket, a plain TLS transport socket, the upstream protocol and the Istio service
/// metadata.
pub fn translate_cluster(c: &PbCluster) -> Result<Cluster, TranslateError> {
    let name = &c.name;
    if name.is_empty() {
        return Err(TranslateError::new(KIND, "", "name is empty"));
    }
    let err = |reason: String| TranslateError::new(KIND, name.clone(), reason);
    let discovery = match &c.cluster_discovery_type {
        None => inline(c, cluster::DiscoveryType::Static).map_err(err)?,
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster::DiscoveryType::try_from(*t) {
                Ok(cluster::DiscoveryType::Eds) => {
                    let service_name = c
                        .eds_cluster_config
                        .as_ref()
                        .map(|e| e.service_name.clone())
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| name.clone());
                    ClusterDiscovery::Eds { service_name }
                }
                Ok(cluster::DiscoveryType::OriginalDst) => ClusterDiscovery::OriginalDestination,
                Ok(
                    t @ (cluster::DiscoveryType::Static
                    | cluster::DiscoveryType::StrictDns
                    | cluster::DiscoveryType::LogicalDns),
                ) => inline(c, t).map_err(err)?,
                Err(_) => return Err(err(format!("type: unknown discovery type {t}"))),
            }
        }
        Some(cluster::ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(err(format!("cluster_type {:?} is not supported", ct.name)));
        }
    };
    let lb_policy = match cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        Ok(cluster::LbPolicy::Random) => LbPolicy::Random,
        Ok(cluster::LbPolicy::RingHash) => LbPolicy::RingHash,
        Ok(cluster::LbPolicy::Maglev) => LbPolicy::Maglev,
        Ok(cluster::LbPolicy::ClusterProvided) => LbPolicy::ClusterProvided,
        // load_balancing_policy is configured separately; fall back to round robin.
        Ok(cluster::LbPolicy::LoadBalancingPolicyConfig) => LbPolicy::RoundRobin,
        Err(_) => return Err(err(format!("lb_policy: unknown value {}", c.lb_policy))),
    };
    let connect_timeout = match &c.connect_timeout {
        Some(d) => duration(d).map_err(|r| err(format!("connect_timeout: {r}")))?,
        None => Duration::from_secs(5),
    };
    let mut istio_tls = None;
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        let is_istio = m
            .r#match
            .as_ref()
            .and_then(|s| struct_string(s, "tlsMode"))
            .is_some_and(|v| v == "istio");
        if !is_istio || istio_tls.is_some() {
            continue;
        }
        let field = format!(
            "transport_socket_matches[{i}] ({:?}).transport_socket",
            m.name
        );
        istio_tls =
            upstream_tls(m.transport_socket.as_ref()).map_err(|r| err(format!("{field}: {r}")))?;
    }
    let tls = upstream_tls(c.transport_socket.as_ref())
        .map_err(|r| err(format!("transport_socket: {r}")))?;
    let mut protocol = UpstreamProtocol::Http1;
    #[allow(deprecated)]
    if c.http2_protocol_options.is_some() {
        protocol = UpstreamProtocol::Http2;
    }
    let mut connection_pool = ConnectionPool {
        tcp_keepalive: tcp_keepalive(c),
        ..ConnectionPool::default()
    };
    #[allow(deprecated)]
    let cluster_max_requests = c.max_requests_per_connection.as_ref().map(|v| v.value);
    connection_pool.max_requests_per_connection = cluster_max_requests.filter(|n| *n > 0);
    if let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS_KEY)
    {
        let opts: HttpProtocolOptions = from_any(any).map_err(|r| {
            err(format!(
                "typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY:?}]: {r}"
            ))
        })?;
        if let Some(common) = &opts.common_http_protocol_options {
            if let Some(n) = &common.max_requests_per_connection {
                if cluster_max_requests.is_some() {
                    // Envoy refuses the cluster too.
                    return Err(err(
                        "only one of max_requests_per_connection from Cluster or \
                         HttpProtocolOptions can be specified"
                            .into(),
                    ));
                }
                connection_pool.max_requests_per_connection = (n.value > 0).then_some(n.value);
            }
            if let Some(d) = &common.idle_timeout {
                let d = duration(d).map_err(|r| {
                    err(format!(
                        "typed_extension_protocol_options: common_http_protocol_options.idle_timeout: {r}"
                    ))
                })?;
                connection_pool.idle_timeout = (!d.is_zero()).then_some(d);
            }
        }
        protocol = match opts.upstream_protocol_options {
            Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                match e.protocol_config {
                    Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(_)) => {
                        UpstreamProtocol::Http2
                    }
                    Some(explicit_http_config::ProtocolConfig::Http3ProtocolOptions(_)) => {
                        return Err(err(
                            "typed_extension_protocol_options: HTTP/3 upstreams are not supported"
                                .into(),
                        ));
                    }
                    _ => UpstreamProtocol::Http1,
                }
            }
            Some(http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                _,
            )) => UpstreamProtocol::UseDownstream,
            Some(http_protocol_options::UpstreamProtocolOptions::AutoConfig(_)) | None => protocol,
        };
    }
    let service = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("istio"))
        .and_then(|s| struct_list(s, "services"))
        .and_then(|l| l.first())
        .and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(s)) => Some(s),
            _ => None,
        })
        .map(|s| ServiceMetadata {
            host: struct_string(s, "host").unwrap_or_default().to_owned(),
            name: struct_string(s, "name").unwrap_or_default().to_owned(),
            namespace: struct_string(s, "namespace").unwrap_or_default().to_owned(),
        });
    Ok(Cluster {
        name: name.clone(),
        discovery,
        lb_policy,
        connect_timeout,
        istio_tls,
        tls,
        protocol,
        service,
        lb_config: lb_config(c).map_err(err)?,
        outlier_detection: outlier_detection(c).map_err(err)?,
        circuit_breakers: circuit_breakers(c).map_err(err)?,
        connection_pool,
    })
}

/// `upstream_connection_options.tcp_keepalive` (times in seconds; a 0 leaves the system's
/// value, as the kernel refuses 0).
fn tcp_keepalive(c: &PbCluster) -> Option<TcpKeepalive> {
    let k = c
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())?;
    let value = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
        v.as_ref().map(|v| v.value).filter(|n| *n > 0)
    };
    let secs = |v| value(v).map(|n| Duration::from_secs(n.into()));
    Some(TcpKeepalive {
        probes: value(&k.keepalive_probes),
        time: secs(&k.keepalive_time),
        interval: secs(&k.keepalive_interval),
    })
}

/// A non-EDS cluster's inline `load_assignment` (STATIC, STRICT_DNS, LOGICAL_DNS), compiled
/// as Envoy reads it: the set is named after the cluster whatever the CLA's `cluster_name`;
/// STATIC endpoints must be IP literals; every address of a DNS cluster is a name to resolve
/// (an IP literal resolves to itself), with the cluster's DNS settings; a LOGICAL_DNS cluster
/// must list exactly one endpoint.
// istiod renders `dns_refresh_rate` and `respect_dns_ttl` as these (deprecated) cluster fields.
#[allow(deprecated)]
fn inline(c: &PbCluster, t: cluster::DiscoveryType) -> Result<ClusterDiscovery, String> {
    use super::endpoint::{Hostnames, compile, compile_endpoints, overprovisioning_factor};
    let mode = match t {
        cluster::DiscoveryType::StrictDns => DnsMode::Strict,
        cluster::DiscoveryType::LogicalDns => DnsMode::Logical,
        _ => {
            let set = match &c.load_assignment {
                None => mesh_core::endpoint::EndpointSet::new(c.name.clone(), Vec::new()),
                Some(cla) => compile(cla, &c.name, Hostnames::Reject)
                    .map_err(|r| format!("load_assignment.{r}"))?,
            };
            return Ok(ClusterDiscovery::Static {
                load_assignment: std::sync::Arc::new(set),
            });
        }
    };
    let (targets, overprovisioning_factor) = match &c.load_assignment {
        None if mode == DnsMode::Logical => {
            return Err("LOGICAL_DNS clusters must have a single host".into());
        }
        None => (Vec::new(), mesh_core::lb::DEFAULT_OVERPROVISIONING_FACTOR),
        Some(cla) => {
            if mode == DnsMode::Logical
                && (cla.endpoints.len() != 1 || cla.endpoints[0].lb_endpoints.len() != 1)
            {
                return Err(
                    "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a \
                     single lb_endpoint"
                        .into(),
                );
            }
            let (endpoints, hosts) = compile_endpoints(cla, &c.name, Hostnames::Resolve)
                .map_err(|r| format!("load_assignment.{r}"))?;
            let targets = endpoints
                .into_iter()
                .zip(hosts)
                .map(|(endpoint, host)| DnsTarget {
                    port: endpoint.address.port(),
                    host,
                    endpoint,
                })
                .collect();
            (targets, overprovisioning_factor(cla))
        }
    };
    let refresh_rate = match &c.dns_refresh_rate {
        Some(d) => {
            let d = duration(d).map_err(|r| format!("dns_refresh_rate: {r}"))?;
            if d < Duration::from_millis(1) {
                return Err("dns_refresh_rate: must be at least 1ms".into());
            }
            d
        }
        None => DEFAULT_DNS_REFRESH_RATE,
    };
    let lookup_family = match cluster::DnsLookupFamily::try_from(c.dns_lookup_family) {
        Ok(cluster::DnsLookupFamily::Auto) => LookupFamily::Auto,
        Ok(cluster::DnsLookupFamily::V4Only) => LookupFamily::V4Only,
        Ok(cluster::DnsLookupFamily::V6Only) => LookupFamily::V6Only,
        Ok(cluster::DnsLookupFamily::V4Preferred) => LookupFamily::V4Preferred,
        Ok(cluster::DnsLookupFamily::All) => LookupFamily::All,
        Err(_) => {
            return Err(format!(
                "dns_lookup_family: unknown value {}",
                c.dns_lookup_family
            ));
        }
    };
    Ok(ClusterDiscovery::Dns(std::sync::Arc::new(DnsDiscovery {
        mode,
        targets,
        lookup_family,
        refresh_rate,
        respect_dns_ttl: c.respect_dns_ttl,
        overprovisioning_factor,
    })))
}

/// `lb_config` (least request, ring hash, Maglev), `common_lb_config.healthy_panic_threshold`
/// and `common_lb_config.locality_weighted_lb_config`.
fn lb_config(c: &PbCluster) -> Result<mesh_core::lb::LbConfig, String> {
    use mesh_core::lb::{LbConfig, Real};
    let mut out = LbConfig::default();
    match &c.lb_config {
        Some(cluster::LbConfig::LeastRequestLbConfig(l)) => {
            if let Some(n) = &l.choice_count {
                if n.value < 2 {
                    return Err("least_request_lb_config.choice_count: must be at least 2".into());
                }
                out.choice_count = n.value;
            }
            if let Some(b) = &l.active_request_bias {
                if !b.default_value.is_finite() || b.default_value < 0.0 {
                    return Err(
                        "least_request_lb_config.active_request_bias: must be a finite number >= 0"
                            .into(),
                    );
                }
                out.active_request_bias = Real(b.default_value);
            }
        }
        Some(cluster::LbConfig::RingHashLbConfig(r)) => {
            if let Some(m) = &r.minimum_ring_size {
                out.minimum_ring_size = m.value.max(1);
            }
            if let Some(m) = &r.maximum_ring_size {
                out.maximum_ring_size = m.value.max(1);
            }
            if out.minimum_ring_size > out.maximum_ring_size {
                return Err(
                    "ring_hash_lb_config: minimum_ring_size is larger than maximum_ring_size"
                        .into(),
                );
            }
        }
        Some(cluster::LbConfig::MaglevLbConfig(m)) => {
            if let Some(t) = &m.table_size {
                // The proto's own bound (`envoy --mode validate` refuses 5000077): the table
                // is allocated whole, so an unbounded size would exhaust memory.
                if t.value > MAGLEV_MAX_TABLE_SIZE {
                    return Err(format!(
                        "maglev_lb_config.table_size: value must be less than or equal to \
                         {MAGLEV_MAX_TABLE_SIZE}"
                    ));
                }
                if !mesh_core::lb::is_maglev_table_size(t.value) {
                    return Err(format!(
                        "maglev_lb_config.table_size: {} is not a prime",
                        t.value
                    ));
                }
                out.maglev_table_size = t.value;
            }
        }
        _ => {}
    }
    if let Some(p) = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
    {
        if !(0.0..=100.0).contains(&p.value) {
            return Err("common_lb_config.healthy_panic_threshold: must be within 0..100".into());
        }
        // Envoy truncates to the nearest percent.
        out.healthy_panic_threshold = Real(p.value.trunc());
    }
    out.locality_weighted = matches!(
        c.common_lb_config
            .as_ref()
            .and_then(|l| l.locality_config_specifier.as_ref()),
        Some(cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    );
    Ok(out)
}

/// `outlier_detection`, Envoy's defaults for unset fields.
fn outlier_detection(
    c: &PbCluster,
) -> Result<Option<mesh_core::outlier::OutlierDetection>, String> {
    let Some(o) = &c.outlier_detection else {
        return Ok(None);
    };
    let mut out = mesh_core::outlier::OutlierDetection::default();
    let u = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: &mut u32| {
        if let Some(v) = v {
            *d = v.value;
        }
    };
    let pct = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>,
               d: &mut u32,
               field: &str|
     -> Result<(), String> {
        if let Some(v) = v {
            if v.value > 100 {
                return Err(format!(
                    "outlier_detection.{field}: {} is over 100",
                    v.value
                ));
            }
            *d = v.value;
        }
        Ok(())
    };
    let dur = |v: &Option<envoy_types::pb::google::protobuf::Duration>,
               d: &mut Duration,
               field: &str|
     -> Result<(), String> {
        if let Some(v) = v {
            *d = duration(v).map_err(|e| format!("outlier_detection.{field}: {e}"))?;
        }
        Ok(())
    };
    u(&o.consecutive_5xx, &mut out.consecutive_5xx);
    u(
        &o.consecutive_gateway_failure,
        &mut out.consecutive_gateway_failure,
    );
    u(
        &o.consecutive_local_origin_failure,
        &mut out.consecutive_local_origin_failure,
    );
    dur(&o.interval, &mut out.interval, "interval")?;
    if out.interval.is_zero() {
        return Err("outlier_detection.interval: must be > 0".into());
    }
    dur(
        &o.base_ejection_time,
        &mut out.base_ejection_time,
        "base_ejection_time",
    )?;
    dur(
        &o.max_ejection_time,
        &mut out.max_ejection_time,
        "max_ejection_time",
    )?;
    // Envoy's `DetectorImpl::create` refuses the cluster (unset, the maximum is
    // max(300 s, base_ejection_time)).
    if o.max_ejection_time.is_some() && out.max_ejection_time < out.base_ejection_time {
        return Err(
            "outlier_detection: outlier detector's max_ejection_time cannot be smaller than base_ejection_time"
                .into(),
        );
    }
    dur(
        &o.max_ejection_time_jitter,
        &mut out.max_ejection_time_jitter,
        "max_ejection_time_jitter",
    )?;
    pct(
        &o.max_ejection_percent,
        &mut out.max_ejection_percent,
        "max_ejection_percent",
    )?;
    pct(
        &o.enforcing_consecutive_5xx,
        &mut out.enforcing_consecutive_5xx,
        "enforcing_consecutive_5xx",
    )?;
    pct(
        &o.enforcing_consecutive_gateway_failure,
        &mut out.enforcing_consecutive_gateway_failure,
        "enforcing_consecutive_gateway_failure",
    )?;
    pct(
        &o.enforcing_consecutive_local_origin_failure,
        &mut out.enforcing_consecutive_local_origin_failure,
        "enforcing_consecutive_local_origin_failure",
    )?;
    pct(
        &o.enforcing_success_rate,
        &mut out.enforcing_success_rate,
        "enforcing_success_rate",
    )?;
    u(
        &o.success_rate_minimum_hosts,
        &mut out.success_rate_minimum_hosts,
    );
    u(
        &o.success_rate_request_volume,
        &mut out.success_rate_request_volume,
    );
    u(
        &o.success_rate_stdev_factor,
        &mut out.success_rate_stdev_factor,
    );
    pct(
        &o.failure_percentage_threshold,
        &mut out.failure_percentage_threshold,
        "failure_percentage_threshold",
    )?;
    pct(
        &o.enforcing_failure_percentage,
        &mut out.enforcing_failure_percentage,
        "enforcing_failure_percentage",
    )?;
    u(
        &o.failure_percentage_minimum_hosts,
        &mut out.failure_percentage_minimum_hosts,
    );
    u(
        &o.failure_percentage_request_volume,
        &mut out.failure_percentage_request_volume,
    );
    pct(
        &o.enforcing_local_origin_success_rate,
        &mut out.enforcing_local_origin_success_rate,
        "enforcing_local_origin_success_rate",
    )?;
    pct(
        &o.enforcing_failure_percentage_local_origin,
        &mut out.enforcing_failure_percentage_local_origin,
        "enforcing_failure_percentage_local_origin",
    )?;
    out.split_external_local_origin_errors = o.split_external_local_origin_errors;
    out.always_eject_one_host = o.always_eject_one_host.as_ref().is_some_and(|b| b.value);
    Ok(Some(out))
}

/// `circuit_breakers.thresholds` of the DEFAULT priority (the first such entry, as in Envoy),
/// Envoy's defaults for unset fields. mesh's requests are all DEFAULT priority, as Istio's
/// are, so HIGH thresholds never apply.
fn circuit_breakers(c: &PbCluster) -> Result<mesh_core::outlier::CircuitBreakers, String> {
    let mut out = mesh_core::outlier::CircuitBreakers::default();
    let Some(t) = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
    else {
        return Ok(out);
    };
    let set = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: &mut u32| {
        if let Some(v) = v {
            *d = v.value;
        }
    };
    set(&t.max_connections, &mut out.max_connections);
    set(&t.max_pending_requests, &mut out.max_pending_requests);
    set(&t.max_requests, &mut out.max_requests);
    set(&t.max_retries, &mut out.max_retries);
    if let Some(b) = &t.retry_budget {
        let mut budget = mesh_core::outlier::RetryBudget::default();
        if let Some(p) = &b.budget_percent {
            if !(0.0..=100.0).contains(&p.value) {
                return Err(format!(
                    "circuit_breakers.thresholds.retry_budget.budget_percent: {} is not within 0..100",
                    p.value
                ));
            }
            budget.budget_percent = mesh_core::lb::Real(p.value);
        }
        set(&b.min_retry_concurrency, &mut budget.min_retry_concurrency);
        out.retry_budget = Some(budget);
    }
    Ok(out)
}

/// `Some(UpstreamTls)` for an `envoy.transport_sockets.tls` socket, `None` for raw buffer or
/// no socket.
fn upstream_tls(ts: Option<&TransportSocket>) -> Result<Option<UpstreamTls>, String> {
    let Some(ts) = ts else { return Ok(None) };
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => a,
        None if ts.name == "envoy.transport_sockets.tls" => {
            return Err("tls transport socket without typed_config".into());
        }
        None => return Ok(None),
    };
    if any.type_url == RAW_BUFFER_TYPE {
        return Ok(None);
    }
    if any.type_url == INTERNAL_UPSTREAM_TYPE {
        // A wrapper that passes metadata to an internal listener; the wrapped socket decides.
        let w: envoy_types::pb::envoy::extensions::transport_sockets::internal_upstream::v3::InternalUpstreamTransport =
            from_any(any)?;
        return upstream_tls(w.transport_socket.as_ref())
            .map_err(|r| format!("internal_upstream.transport_socket: {r}"));
    }
    if any.type_url != UPSTREAM_TLS_TYPE {
        return Err(format!(
            "unsupported transport socket {:?} ({})",
            ts.name, any.type_url
        ));
    }
    let ctx: UpstreamTlsContext = from_any(any)?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let mut san_matchers = Vec::new();
    let validation: Option<&CertificateValidationContext> = match &common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => Some(v),
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.as_ref()
        }
        _ => None,
    };
    if let Some(v) = validation {
        #[allow(deprecated)]
        for (i, m) in v.match_subject_alt_names.iter().enumerate() {
            san_matchers
                .push(san_matcher(m).map_err(|r| format!("match_subject_alt_names[{i}]: {r}"))?);
        }
        for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
            let field = format!("match_typed_subject_alt_names[{i}]");
            match subject_alt_name_matcher::SanType::try_from(m.san_type) {
                Ok(subject_alt_name_matcher::SanType::Uri) => {}
                _ => return Err(format!("{field}: only URI SAN matchers are supported")),
            }
            let Some(sm) = &m.matcher else {
                return Err(format!("{field}.matcher: missing"));
            };
            san_matchers.push(san_matcher(sm).map_err(|r| format!("{field}.matcher: {r}"))?);
        }
    }
    Ok(Some(UpstreamTls {
        sni: ctx.sni,
        alpn: common.alpn_protocols,
        san_matchers,
    }))
}

fn san_matcher(m: &StringMatcher) -> Result<SanMatcher, String> {
    if m.ignore_case {
        return Err("ignore_case SAN matchers are not supported".into());
    }
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => Ok(SanMatcher::Exact(s.clone())),
        Some(string_matcher::MatchPattern::Prefix(s)) => Ok(SanMatcher::Prefix(s.clone())),
        Some(_) => Err("only exact and prefix SAN matchers are supported".into()),
        None => Err("empty matcher".into()),
    }
}

#[cfg(test)]
mod resilience_tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::{
        CircuitBreakers as PbCircuitBreakers, OutlierDetection as PbOutlierDetection,
        circuit_breakers::Thresholds,
    };
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value, UInt64Value};

    fn base() -> PbCluster {
        PbCluster {
            name: "outbound|80||a.default.svc.cluster.local".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            lb_policy: cluster::LbPolicy::LeastRequest as i32,
            ..Default::default()
        }
    }

    #[test]
    fn lb_outlier_and_breakers_translate_with_envoy_defaults() {
        let c = translate_cluster(&base()).unwrap();
        assert_eq!(c.lb_config, mesh_core::lb::LbConfig::default());
        assert!(c.outlier_detection.is_none());
        assert_eq!(c.circuit_breakers.max_retries, 3);

        let mut pb = base();
        pb.lb_config = Some(cluster::LbConfig::LeastRequestLbConfig(
            cluster::LeastRequestLbConfig {
                choice_count: Some(UInt32Value { value: 3 }),
                ..Default::default()
            },
        ));
        pb.common_lb_config = Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 25.7 }),
            ..Default::default()
        });
        // istiod's outlier detection for a DestinationRule with consecutive5xxErrors: 3.
        pb.outlier_detection = Some(PbOutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 3 }),
            interval: Some(PbDuration {
                seconds: 1,
                nanos: 0,
            }),
            base_ejection_time: Some(PbDuration {
                seconds: 60,
                nanos: 0,
            }),
            max_ejection_percent: Some(UInt32Value { value: 100 }),
            enforcing_success_rate: Some(UInt32Value { value: 0 }),
            // A DestinationRule's splitExternalLocalOriginErrors.
            split_external_local_origin_errors: true,
            enforcing_failure_percentage_local_origin: Some(UInt32Value { value: 30 }),
            ..Default::default()
        });
        // istiod's default thresholds.
        let max = Some(UInt32Value { value: u32::MAX });
        pb.circuit_breakers = Some(PbCircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: max,
                max_pending_requests: max,
                max_requests: max,
                max_retries: max,
                ..Default::default()
            }],
            ..Default::default()
        });
        let c = translate_cluster(&pb).unwrap();
        assert_eq!(c.lb_config.choice_count, 3);
        assert_eq!(c.lb_config.healthy_panic_threshold.0, 25.0);
        let o = c.outlier_detection.unwrap();
        assert_eq!(o.consecutive_5xx, 3);
        assert_eq!(o.interval, Duration::from_secs(1));
        assert_eq!(o.base_ejection_time, Duration::from_secs(60));
        assert_eq!(o.max_ejection_percent, 100);
        assert_eq!(o.enforcing_success_rate, 0);
        assert_eq!(o.consecutive_gateway_failure, 5);
        assert!(o.split_external_local_origin_errors);
        assert_eq!(o.enforcing_failure_percentage_local_origin, 30);
        assert_eq!(o.enforcing_local_origin_success_rate, 100);
        assert_eq!(c.circuit_breakers.max_retries, u32::MAX);
        assert_eq!(c.circuit_breakers.max_requests, u32::MAX);
        assert_eq!(c.circuit_breakers.retry_budget, None);

        // A retry budget on DEFAULT (Envoy's 20% / 3 for unset fields); the first DEFAULT
        // entry counts; HIGH is not read.
        let mut pb = base();
        pb.circuit_breakers = Some(PbCircuitBreakers {
            thresholds: vec![
                Thresholds {
                    priority: 1,
                    max_retries: Some(UInt32Value { value: 1 }),
                    ..Default::default()
                },
                Thresholds {
                    retry_budget: Some(envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget {
                        min_retry_concurrency: Some(UInt32Value { value: 5 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Thresholds {
                    max_retries: Some(UInt32Value { value: 9 }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let cb = translate_cluster(&pb).unwrap().circuit_breakers;
        assert_eq!(cb.max_retries, 3);
        let b = cb.retry_budget.unwrap();
        assert_eq!((b.budget_percent.0, b.min_retry_concurrency), (20.0, 5));
        let mut bad = pb.clone();
        bad.circuit_breakers.as_mut().unwrap().thresholds[1]
            .retry_budget
            .as_mut()
            .unwrap()
            .budget_percent = Some(Percent { value: 120.0 });
        let e = translate_cluster(&bad).unwrap_err();
        assert!(e.to_string().contains("budget_percent"), "{e}");

        let mut bad = base();
        bad.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
            table_size: Some(UInt64Value { value: 65536 }),
        }));
        let e = translate_cluster(&bad).unwrap_err();
        assert!(e.to_string().contains("table_size"), "{e}");
        // A prime above the proto's bound (Envoy 1.40: "TableSize: value must be less than or
        // equal to 5000011"); 5000011 itself is accepted.
        let mut bad = base();
        bad.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
            table_size: Some(UInt64Value { value: 5_000_077 }),
        }));
        let e = translate_cluster(&bad).unwrap_err();
        assert!(
            e.to_string().contains("less than or equal to 5000011"),
            "{e}"
        );
        let mut ok = base();
        ok.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
            table_size: Some(UInt64Value { value: 5_000_011 }),
        }));
        assert_eq!(
            translate_cluster(&ok).unwrap().lb_config.maglev_table_size,
            5_000_011
        );
        let mut bad = base();
        bad.outlier_detection = Some(PbOutlierDetection {
            max_ejection_percent: Some(UInt32Value { value: 101 }),
            ..Default::default()
        });
        let e = translate_cluster(&bad).unwrap_err();
        assert!(e.to_string().contains("max_ejection_percent"), "{e}");
        // As Envoy 1.40 refuses it (`envoy --mode validate`: "outlier detector's
        // max_ejection_time cannot be smaller than base_ejection_time").
        let secs = |seconds| Some(PbDuration { seconds, nanos: 0 });
        let mut bad = base();
        bad.outlier_detection = Some(PbOutlierDetection {
            base_ejection_time: secs(10),
            max_ejection_time: secs(5),
            ..Default::default()
        });
        let e = translate_cluster(&bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("max_ejection_time cannot be smaller"),
            "{e}"
        );
        // Unset, the maximum follows a long base time; the jitter is read.
        let mut ok = base();
        ok.outlier_detection = Some(PbOutlierDetection {
            base_ejection_time: secs(600),
            max_ejection_time_jitter: secs(2),
            ..Default::default()
        });
        let o = translate_cluster(&ok).unwrap().outlier_detection.unwrap();
        assert_eq!(o.max_ejection_time_jitter, Duration::from_secs(2));
    }

    /// What istiod renders for a DestinationRule `connectionPool` with
    /// `http.maxRequestsPerConnection: 2`, `http.idleTimeout: 300s` and
    /// `tcp.tcpKeepalive.time: 300s`.
    #[test]
    fn connection_pool_options_translate() {
        use envoy_types::pb::envoy::config::cluster::v3::UpstreamConnectionOptions;
        use envoy_types::pb::envoy::config::core::v3::{
            HttpProtocolOptions as CommonOptions, TcpKeepalive as PbKeepalive,
        };
        use mesh_core::cluster::{ConnectionPool, DEFAULT_IDLE_TIMEOUT};
        let c = translate_cluster(&base()).unwrap();
        assert_eq!(c.connection_pool, ConnectionPool::default());
        assert_eq!(c.connection_pool.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));

        let with_common = |common: CommonOptions| {
            let mut pb = base();
            let opts = HttpProtocolOptions {
                common_http_protocol_options: Some(common),
                ..Default::default()
            };
            pb.typed_extension_protocol_options.insert(
                HTTP_PROTOCOL_OPTIONS_KEY.into(),
                super::super::to_any(&opts),
            );
            pb
        };
        let mut pb = with_common(CommonOptions {
            idle_timeout: Some(PbDuration {
                seconds: 300,
                nanos: 0,
            }),
            max_requests_per_connection: Some(UInt32Value { value: 2 }),
            ..Default::default()
        });
        pb.upstream_connection_options = Some(UpstreamConnectionOptions {
            tcp_keepalive: Some(PbKeepalive {
                keepalive_time: Some(UInt32Value { value: 300 }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let p = translate_cluster(&pb).unwrap().connection_pool;
        assert_eq!(p.max_requests_per_connection, Some(2));
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(300)));
        let k = p.tcp_keepalive.unwrap();
        assert_eq!(k.time, Some(Duration::from_secs(300)));
        assert_eq!((k.probes, k.interval), (None, None));

        // idle_timeout 0 disables it; max_requests_per_connection 0 is no limit.
        let p = translate_cluster(&with_common(CommonOptions {
            idle_timeout: Some(PbDuration::default()),
            max_requests_per_connection: Some(UInt32Value { value: 0 }),
            ..Default::default()
        }))
        .unwrap()
        .connection_pool;
        assert_eq!(
            (p.idle_timeout, p.max_requests_per_connection),
            (None, None)
        );

        // The deprecated cluster field works alone, and not together with the options.
        let mut pb = base();
        #[allow(deprecated)]
        {
            pb.max_requests_per_connection = Some(UInt32Value { value: 1 });
        }
        let p = translate_cluster(&pb).unwrap().connection_pool;
        assert_eq!(p.max_requests_per_connection, Some(1));
        let mut both = with_common(CommonOptions {
            max_requests_per_connection: Some(UInt32Value { value: 2 }),
            ..Default::default()
        });
        #[allow(deprecated)]
        {
            both.max_requests_per_connection = Some(UInt32Value { value: 1 });
        }
        let e = translate_cluster(&both).unwrap_err();
        assert!(e.to_string().contains("max_requests_per_connection"), "{e}");
    }
}

#[cfg(test)]
mod load_assignment_tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn lb(host: &str, port: u32, weight: Option<u32>) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: host.into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            ..Default::default()
        }
    }

    fn cluster_of(t: cluster::DiscoveryType, eps: Vec<LbEndpoint>) -> PbCluster {
        PbCluster {
            name: "outbound|80||static.example".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(t as i32)),
            load_assignment: Some(ClusterLoadAssignment {
                // Envoy ignores an inline CLA's cluster_name.
                cluster_name: "something-else".into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: eps,
                    priority: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn addrs(c: &Cluster) -> Vec<(String, u32, u32)> {
        c.inline_endpoints()
            .expect("inline endpoints")
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.weight, e.priority))
            .collect()
    }

    use envoy_types::pb::envoy::config::core::v3::socket_address;

    #[test]
    fn static_cluster_endpoints_come_from_its_load_assignment() {
        let c = translate_cluster(&cluster_of(
            cluster::DiscoveryType::Static,
            vec![lb("10.0.0.1", 8080, Some(3)), lb("::1", 9090, None)],
        ))
        .unwrap();
        assert_eq!(
            addrs(&c),
            vec![
                ("10.0.0.1:8080".to_owned(), 3, 1),
                ("[::1]:9090".to_owned(), 1, 1)
            ]
        );
        let set = c.inline_endpoints().unwrap();
        assert_eq!(set.cluster_name, "outbound|80||static.example");
        assert_eq!(set.routable_len(), 2);
        assert_eq!(c.eds_service_name(), None);
    }

    #[test]
    fn static_cluster_with_a_hostname_is_rejected_naming_the_field() {
        let e = translate_cluster(&cluster_of(
            cluster::DiscoveryType::Static,
            vec![lb("10.0.0.1", 80, None), lb("db.example.com", 5432, None)],
        ))
        .unwrap_err();
        assert!(
            e.reason
                .starts_with("load_assignment.endpoints[0].lb_endpoints[1].endpoint.address"),
            "{e}"
        );
    }

    fn targets(c: &Cluster) -> Vec<(String, u16, u32, u32)> {
        c.dns()
            .expect("a DNS cluster")
            .targets
            .iter()
            .map(|t| {
                (
                    t.host.clone(),
                    t.port,
                    t.endpoint.weight,
                    t.endpoint.priority,
                )
            })
            .collect()
    }

    #[test]
    fn dns_clusters_resolve_every_address_with_its_endpoint_settings() {
        let c = translate_cluster(&cluster_of(
            cluster::DiscoveryType::StrictDns,
            vec![
                lb("db.example.com", 5432, Some(3)),
                lb("10.0.0.7", 5433, None),
            ],
        ))
        .unwrap();
        assert!(c.inline_endpoints().is_none());
        assert_eq!(
            targets(&c),
            vec![
                ("db.example.com".to_owned(), 5432, 3, 1),
                ("10.0.0.7".to_owned(), 5433, 1, 1)
            ]
        );
        let dns = c.dns().unwrap();
        assert_eq!(dns.mode, DnsMode::Strict);
        // auto_host_rewrite's Host for a DNS host is its configured address (Envoy 1.40).
        let hostnames: Vec<_> = dns
            .targets
            .iter()
            .map(|t| t.endpoint.hostname.as_deref())
            .collect();
        assert_eq!(hostnames, vec![Some("db.example.com"), Some("10.0.0.7")]);
        // Envoy's defaults: AUTO, 5 s, TTL not respected.
        assert_eq!(dns.lookup_family, LookupFamily::Auto);
        assert_eq!(dns.refresh_rate, Duration::from_secs(5));
        assert!(!dns.respect_dns_ttl);
        assert_eq!(
            dns.next_refresh(Some(Duration::from_secs(30))),
            Duration::from_secs(5)
        );

        let c = translate_cluster(&cluster_of(
            cluster::DiscoveryType::LogicalDns,
            vec![lb("api.example.com", 443, None)],
        ))
        .unwrap();
        assert_eq!(c.dns().unwrap().mode, DnsMode::Logical);
        assert_eq!(targets(&c), vec![("api.example.com".to_owned(), 443, 1, 1)]);
        let e = translate_cluster(&cluster_of(
            cluster::DiscoveryType::LogicalDns,
            vec![
                lb("a.example.com", 443, None),
                lb("b.example.com", 443, None),
            ],
        ))
        .unwrap_err();
        assert!(e.reason.contains("single lb_endpoint"), "{e}");
        let mut pb = cluster_of(cluster::DiscoveryType::LogicalDns, vec![]);
        pb.load_assignment = None;
        let e = translate_cluster(&pb).unwrap_err();
        assert!(e.reason.contains("single host"), "{e}");
    }

    #[test]
    #[allow(deprecated)]
    fn dns_settings_as_istiod_renders_them() {
        // istiod: dns_lookup_family by the proxy's IP families, dns_refresh_rate from mesh
        // config, respect_dns_ttl on (the zipkin cluster of the deathstarbench dump: 30s, V4_ONLY).
        let mut pb = cluster_of(
            cluster::DiscoveryType::StrictDns,
            vec![lb("zipkin.istio-system", 9411, None)],
        );
        pb.dns_refresh_rate = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 30,
            nanos: 0,
        });
        pb.dns_lookup_family = cluster::DnsLookupFamily::V4Only as i32;
        pb.respect_dns_ttl = true;
        let c = translate_cluster(&pb).unwrap();
        let dns = c.dns().unwrap();
        assert_eq!(dns.lookup_family, LookupFamily::V4Only);
        assert_eq!(dns.refresh_rate, Duration::from_secs(30));
        assert!(dns.respect_dns_ttl);
        assert_eq!(
            dns.next_refresh(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            dns.next_refresh(Some(Duration::ZERO)),
            Duration::from_secs(30)
        );
        assert_eq!(dns.next_refresh(None), Duration::from_secs(30));
        for (family, want) in [
            (cluster::DnsLookupFamily::V6Only, LookupFamily::V6Only),
            (
                cluster::DnsLookupFamily::V4Preferred,
                LookupFamily::V4Preferred,
            ),
            (cluster::DnsLookupFamily::All, LookupFamily::All),
        ] {
            pb.dns_lookup_family = family as i32;
            assert_eq!(
                translate_cluster(&pb).unwrap().dns().unwrap().lookup_family,
                want
            );
        }
        pb.dns_lookup_family = 99;
        let e = translate_cluster(&pb).unwrap_err();
        assert!(e.reason.starts_with("dns_lookup_family"), "{e}");
        pb.dns_lookup_family = 0;
        pb.dns_refresh_rate = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: 1000,
        });
        let e = translate_cluster(&pb).unwrap_err();
        assert!(e.reason.starts_with("dns_refresh_rate"), "{e}");
    }

    #[test]
    fn eds_and_original_dst_clusters_ignore_an_inline_load_assignment() {
        let c = translate_cluster(&cluster_of(
            cluster::DiscoveryType::Eds,
            vec![lb("10.0.0.1", 80, None)],
        ))
        .unwrap();
        assert!(c.inline_endpoints().is_none());
        assert_eq!(c.eds_service_name(), Some("outbound|80||static.example"));
        let c = translate_cluster(&cluster_of(
            cluster::DiscoveryType::OriginalDst,
            vec![lb("10.0.0.1", 80, None)],
        ))
        .unwrap();
        assert!(c.inline_endpoints().is_none());
        let mut pb = cluster_of(cluster::DiscoveryType::Static, vec![]);
        pb.load_assignment = None;
        let c = translate_cluster(&pb).unwrap();
        assert!(addrs(&c).is_empty());
    }
}
