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
    Cluster, ClusterDiscovery, LbPolicy, SanMatcher, ServiceMetadata, UpstreamProtocol, UpstreamTls,
};

use super::{TranslateError, duration, from_any, struct_list, struct_string};

const KIND: &str = "Cluster";

/// The `typed_extension_protocol_options` key of the upstream HTTP options.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

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
        None => ClusterDiscovery::Static,
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
                    cluster::DiscoveryType::Static
                    | cluster::DiscoveryType::StrictDns
                    | cluster::DiscoveryType::LogicalDns,
                ) => ClusterDiscovery::Static,
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
    if let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS_KEY)
    {
        let opts: HttpProtocolOptions = from_any(any).map_err(|r| {
            err(format!(
                "typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY:?}]: {r}"
            ))
        })?;
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
    })
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
    if any.type_url.ends_with("raw_buffer.v3.RawBuffer") {
        return Ok(None);
    }
    if any
        .type_url
        .ends_with("internal_upstream.v3.InternalUpstreamTransport")
    {
        // A wrapper that passes metadata to an internal listener; the wrapped socket decides.
        let w: envoy_types::pb::envoy::extensions::transport_sockets::internal_upstream::v3::InternalUpstreamTransport =
            from_any(any)?;
        return upstream_tls(w.transport_socket.as_ref())
            .map_err(|r| format!("internal_upstream.transport_socket: {r}"));
    }
    if !any.type_url.ends_with("tls.v3.UpstreamTlsContext") {
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
