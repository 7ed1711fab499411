//! LDS `Listener` → [`mesh_core::listener::Listener`] (+ the outbound traffic policy that
//! `virtualOutbound` expresses).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::{TrafficDirection, address};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener as PbListener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    StringMatcher as PbStringMatcher, string_matcher,
};
use mesh_core::cluster::SanMatcher;
use mesh_core::listener::{
    AuthzLayer, InboundPolicy, InboundProtocol, InboundTlsMode, Listener, ListenerKind,
    OutboundProtocol, PortAuthz,
};

use super::rbac::{translate_http_authz_filters, translate_network_authz_filters};
use mesh_core::snapshot::{BLACKHOLE_CLUSTER, OutboundTrafficPolicy, PASSTHROUGH_CLUSTER};

use super::{TranslateError, endpoint::socket_addr, from_any};

const KIND: &str = "Listener";
/// Type URL of the HTTP connection manager network filter config.
pub const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// Type URL of the TCP proxy network filter config.
pub const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
/// Type URL of the downstream TLS transport socket config.
pub const DOWNSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// Type URL of the router HTTP filter config: the terminal filter of an HCM chain, whose part
/// mesh's request path plays (routing, retries, timeouts).
pub const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
/// Name istiod gives the inbound capture listener.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
/// Name istiod gives the outbound capture listener.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";

/// A translated listener and, for `virtualOutbound`, the outbound traffic policy its
/// catch-all chain expresses (`PassthroughCluster` = `ALLOW_ANY`, `BlackHoleCluster` =
/// `REGISTRY_ONLY`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslatedListener {
    /// The listener.
    pub listener: Listener,
    /// Set only by `virtualOutbound`.
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

enum ChainKind {
    Http(String),
    Tcp(String),
    None,
}

/// Translates one listener. HTTP connection managers with RDS make an outbound HTTP
/// listener, TCP proxies an outbound TCP listener, `virtualInbound` (or any listener with
/// `traffic_direction: INBOUND`) the inbound PeerAuthentication policy; unknown filters are
/// ignored.
pub fn translate_listener(l: &PbListener) -> Result<TranslatedListener, TranslateError> {
    let name = &l.name;
    if name.is_empty() {
        return Err(TranslateError::new(KIND, "", "name is empty"));
    }
    let err = |reason: String| TranslateError::new(KIND, name.clone(), reason);
    let address = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(_)) => {
            socket_addr(l.address.as_ref()).map_err(|r| err(format!("address: {r}")))?
        }
        // Internal listeners and pipes: nothing mesh binds or routes by.
        Some(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        // Internal listeners (`internal_listener`, HBONE's connect_originate/main_internal)
        // have no address.
        None if l.listener_specifier.is_some() => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        None => return Err(err("address: missing".into())),
    };
    // Decode every chain first: a malformed filter config rejects the listener, as in Envoy.
    let mut kinds = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        kinds.push(chain_kind(fc).map_err(|r| err(format!("filter_chains[{i}]{r}")))?);
    }
    let default_kind = match &l.default_filter_chain {
        Some(fc) => Some(chain_kind(fc).map_err(|r| err(format!("default_filter_chain{r}")))?),
        None => None,
    };
    let inbound =
        name == VIRTUAL_INBOUND || l.traffic_direction == TrafficDirection::Inbound as i32;
    if inbound {
        return Ok(TranslatedListener {
            listener: Listener {
                name: name.clone(),
                address,
                kind: ListenerKind::Inbound(inbound_policy(l).map_err(err)?),
            },
            outbound_traffic_policy: None,
        });
    }
    if name == VIRTUAL_OUTBOUND {
        // The catch-all chain: the default chain, else a chain without a match (istiod's
        // `virtualOutbound-catchall-tcp`).
        let catchall = default_kind.as_ref().or_else(|| {
            l.filter_chains
                .iter()
                .zip(&kinds)
                .find(|(fc, _)| {
                    fc.filter_chain_match
                        .as_ref()
                        .is_none_or(|m| m.destination_port.is_none())
                })
                .map(|(_, k)| k)
        });
        let policy = match catchall {
            Some(ChainKind::Tcp(c)) if c == PASSTHROUGH_CLUSTER => {
                Some(OutboundTrafficPolicy::AllowAny)
            }
            Some(ChainKind::Tcp(c)) if c == BLACKHOLE_CLUSTER => {
                Some(OutboundTrafficPolicy::RegistryOnly)
            }
            _ => None,
        };
        return Ok(TranslatedListener {
            listener: Listener {
                name: name.clone(),
                address,
                kind: ListenerKind::Other,
            },
            outbound_traffic_policy: policy,
        });
    }
    // An HTTP chain wins over a TCP one (istiod's per-port listeners put HTTP first; TCP
    // chains on the same listener are for TLS passthrough).
    let all = || kinds.iter().chain(default_kind.iter());
    let kind = if let Some(rc) = all().find_map(|k| match k {
        ChainKind::Http(rc) => Some(rc.clone()),
        _ => None,
    }) {
        ListenerKind::Outbound(OutboundProtocol::Http { route_config: rc })
    } else if let Some(c) = all().find_map(|k| match k {
        ChainKind::Tcp(c) => Some(c.clone()),
        _ => None,
    }) {
        ListenerKind::Outbound(OutboundProtocol::Tcp { cluster: c })
    } else {
        ListenerKind::Other
    };
    Ok(TranslatedListener {
        listener: Listener {
            name: name.clone(),
            address,
            kind,
        },
        outbound_traffic_policy: None,
    })
}

/// What a chain's network filters do; `Err` carries `.filters[i] ...: reason`.
fn chain_kind(fc: &FilterChain) -> Result<ChainKind, String> {
    for (i, f) in fc.filters.iter().enumerate() {
        let any = match &f.config_type {
            Some(filter::ConfigType::TypedConfig(a)) => a,
            _ => continue,
        };
        if any.type_url == HCM_TYPE {
            let hcm: HttpConnectionManager =
                from_any(any).map_err(|r| format!(".filters[{i}] ({:?}): {r}", f.name))?;
            match hcm.route_specifier {
                Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                    if rds.route_config_name.is_empty() {
                        return Err(format!(
                            ".filters[{i}] ({:?}).rds.route_config_name: empty",
                            f.name
                        ));
                    }
                    return Ok(ChainKind::Http(rds.route_config_name));
                }
                // Inline route configurations are used on inbound chains only; nothing to route.
                _ => return Ok(ChainKind::None),
            }
        }
        if any.type_url == TCP_PROXY_TYPE {
            let tp: TcpProxy =
                from_any(any).map_err(|r| format!(".filters[{i}] ({:?}): {r}", f.name))?;
            return Ok(match tp.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => ChainKind::Tcp(c),
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                    match w.clusters.iter().max_by_key(|c| c.weight) {
                        Some(c) => ChainKind::Tcp(c.name.clone()),
                        None => {
                            return Err(format!(
                                ".filters[{i}] ({:?}).weighted_clusters: empty",
                                f.name
                            ));
                        }
                    }
                }
                _ => return Err(format!(".filters[{i}] ({:?}).cluster: empty", f.name)),
            });
        }
    }
    Ok(ChainKind::None)
}

#[derive(Default, Clone, Copy)]
struct Seen {
    mtls: bool,
    plain: bool,
    /// A chain with an HTTP connection manager.
    http: bool,
    /// A chain proxying TCP (`tcp_proxy`) without one.
    tcp: bool,
}

impl Seen {
    fn mode(self) -> Option<InboundTlsMode> {
        match (self.mtls, self.plain) {
            (true, false) => Some(InboundTlsMode::Strict),
            (true, true) => Some(InboundTlsMode::Permissive),
            (false, true) => Some(InboundTlsMode::Disable),
            (false, false) => None,
        }
    }

    /// TCP only when every chain that serves the port proxies TCP: a sniffed port (HTTP and
    /// TCP chains) is served as HTTP, as mesh serves it.
    fn protocol(self) -> Option<InboundProtocol> {
        match (self.http, self.tcp) {
            (false, true) => Some(InboundProtocol::Tcp),
            (true, _) => Some(InboundProtocol::Http),
            (false, false) => None,
        }
    }
}

/// Per destination port: chains terminating TLS (transport_protocol `tls` with a transport
/// socket) only → STRICT; TLS and `raw_buffer` → PERMISSIVE; plaintext only → DISABLE.
/// Chains without a destination port give the default; the `15006` blackhole chain is skipped.
///
/// Also per port: the authorization filters (an HTTP connection manager's RBAC/ext_authz
/// filters win over a TCP chain's network RBAC, since mesh serves HTTP) and the peer SAN
/// matchers of the mTLS chains. A filter mesh cannot enforce exactly rejects the listener.
fn inbound_policy(l: &PbListener) -> Result<InboundPolicy, String> {
    let own_port = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    p,
                ),
            ) => p,
            _ => 0,
        },
        _ => 0,
    };
    let mut per_port: HashMap<u16, Seen> = HashMap::new();
    let mut default = Seen::default();
    let mut authz_by_port: HashMap<Option<u16>, (AuthzLayer, Option<PortAuthz>)> = HashMap::new();
    let mut port_sans: HashMap<u16, Vec<SanMatcher>> = HashMap::new();
    let mut jwt_by_port: HashMap<Option<u16>, Option<Arc<mesh_core::authz::jwt::JwtAuthn>>> =
        HashMap::new();
    let mut default_sans: Vec<SanMatcher> = Vec::new();
    let chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, fc)| (format!("filter_chains[{i}]"), fc))
        .chain(
            l.default_filter_chain
                .iter()
                .map(|fc| ("default_filter_chain".to_owned(), fc)),
        );
    for (at, fc) in chains {
        let m = fc.filter_chain_match.clone().unwrap_or_default();
        let port = m.destination_port.map(|p| p.value);
        if port.is_some_and(|p| p == own_port) {
            continue;
        }
        let port = port.and_then(|p| u16::try_from(p).ok());
        let seen = match port {
            Some(p) => per_port.entry(p).or_default(),
            None => &mut default,
        };
        let tls = downstream_tls(fc).map_err(|r| format!("{at}.transport_socket: {r}"))?;
        match m.transport_protocol.as_str() {
            "tls" if tls.is_some() => seen.mtls = true,
            // TLS passthrough of the application's own TLS: not a PeerAuthentication signal.
            "tls" => {}
            _ if tls.is_some() => seen.mtls = true,
            _ => seen.plain = true,
        }
        if let Some(ctx) = &tls {
            let sans = peer_san_matchers(ctx)
                .map_err(|r| format!("{at}.transport_socket.typed_config.common_tls_context.combined_validation_context.default_validation_context.{r}"))?;
            let into = match port {
                Some(p) => port_sans.entry(p).or_default(),
                None => &mut default_sans,
            };
            for s in sans {
                if !into.contains(&s) {
                    into.push(s);
                }
            }
        }
        // RequestAuthentication: the HCM's jwt_authn filter; the first HTTP chain per port wins.
        if let Some(jwt) = chain_jwt(fc).map_err(|r| format!("{at}.{r}"))? {
            jwt_by_port.entry(port).or_insert(jwt.map(Arc::new));
        }
        let (layer, chain) = chain_authz(fc).map_err(|r| format!("{at}.{r}"))?;
        match layer {
            Some(AuthzLayer::Http) => seen.http = true,
            Some(AuthzLayer::Network) if chain_proxies_tcp(fc) => seen.tcp = true,
            _ => {}
        }
        let Some(layer) = layer else { continue };
        let authz = (!chain.is_empty()).then(|| PortAuthz {
            chain: Arc::new(chain),
            layer,
        });
        // Per port, the first HTTP chain wins; a TCP chain counts only where no HTTP chain is.
        match authz_by_port.get_mut(&port) {
            None => {
                authz_by_port.insert(port, (layer, authz));
            }
            Some(existing) if existing.0 == AuthzLayer::Network && layer == AuthzLayer::Http => {
                *existing = (layer, authz);
            }
            Some(_) => {}
        }
    }
    let mut default_authz = None;
    let mut port_authz = HashMap::new();
    for (port, (_, authz)) in authz_by_port {
        match port {
            Some(p) => {
                port_authz.insert(p, authz);
            }
            None => default_authz = authz,
        }
    }
    let mut default_jwt = None;
    let mut port_jwt = HashMap::new();
    for (port, jwt) in jwt_by_port {
        match port {
            Some(p) => {
                port_jwt.insert(p, jwt);
            }
            None => default_jwt = jwt,
        }
    }
    Ok(InboundPolicy {
        default_jwt,
        port_jwt,
        default_mode: default.mode().unwrap_or_default(),
        per_port: per_port
            .iter()
            .filter_map(|(p, s)| s.mode().map(|m| (*p, m)))
            .collect(),
        default_authz,
        port_authz,
        default_peer_sans: default_sans,
        port_peer_sans: port_sans,
        default_protocol: default.protocol().unwrap_or_default(),
        port_protocol: per_port
            .iter()
            .filter_map(|(p, s)| s.protocol().map(|proto| (*p, proto)))
            .collect(),
    })
}

/// The chain's downstream TLS context, when it terminates TLS.
fn downstream_tls(fc: &FilterChain) -> Result<Option<DownstreamTlsContext>, String> {
    let Some(ts) = &fc.transport_socket else {
        return Ok(None);
    };
    match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(any))
            if any.type_url == DOWNSTREAM_TLS_TYPE =>
        {
            from_any(any).map(Some)
        }
        _ if ts.name == "envoy.transport_sockets.tls" => Ok(Some(DownstreamTlsContext::default())),
        _ => Ok(None),
    }
}

/// `match_subject_alt_names` / URI `match_typed_subject_alt_names` of the default validation
/// context.
fn peer_san_matchers(ctx: &DownstreamTlsContext) -> Result<Vec<SanMatcher>, String> {
    let Some(common) = &ctx.common_tls_context else {
        return Ok(Vec::new());
    };
    let validation = match &common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContext(v)) => Some(v),
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            c.default_validation_context.as_ref()
        }
        _ => None,
    };
    let Some(v) = validation else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    #[allow(deprecated)]
    for (i, m) in v.match_subject_alt_names.iter().enumerate() {
        out.push(san_matcher(m).map_err(|r| format!("match_subject_alt_names[{i}]: {r}"))?);
    }
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let field = format!("match_typed_subject_alt_names[{i}]");
        if subject_alt_name_matcher::SanType::try_from(m.san_type)
            != Ok(subject_alt_name_matcher::SanType::Uri)
        {
            return Err(format!("{field}: only URI SAN matchers are supported"));
        }
        let sm = m
            .matcher
            .as_ref()
            .ok_or(format!("{field}.matcher: missing"))?;
        out.push(san_matcher(sm).map_err(|r| format!("{field}.matcher: {r}"))?);
    }
    Ok(out)
}

fn san_matcher(m: &PbStringMatcher) -> Result<SanMatcher, String> {
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

/// The chain's HTTP connection manager, with its place (`filters[i] (name)`) for errors.
fn chain_hcm(fc: &FilterChain) -> Result<Option<(HttpConnectionManager, String)>, String> {
    for (i, f) in fc.filters.iter().enumerate() {
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        if any.type_url == HCM_TYPE {
            let at = format!("filters[{i}] ({})", f.name);
            let hcm: HttpConnectionManager = from_any(any).map_err(|r| format!("{at}: {r}"))?;
            return Ok(Some((hcm, at)));
        }
    }
    Ok(None)
}

/// The chain's JWT filter: `None` when the chain has no HTTP connection manager, `Some(None)`
/// when its HCM has no `jwt_authn` filter.
#[allow(clippy::type_complexity)]
fn chain_jwt(fc: &FilterChain) -> Result<Option<Option<mesh_core::authz::jwt::JwtAuthn>>, String> {
    let Some((hcm, at)) = chain_hcm(fc)? else {
        return Ok(None);
    };
    super::jwt::translate_http_jwt_filter(&hcm.http_filters)
        .map(Some)
        .map_err(|r| format!("{at}.{r}"))
}

/// The chain's authorization: from its HTTP connection manager's filters (per request), else
/// from its network RBAC filters (per connection). `None` layer: a chain that serves neither
/// HTTP nor TCP proxying (nothing mesh would run on it).
fn chain_authz(
    fc: &FilterChain,
) -> Result<(Option<AuthzLayer>, mesh_core::authz::AuthzChain), String> {
    if let Some((hcm, at)) = chain_hcm(fc)? {
        let chain =
            translate_http_authz_filters(&hcm.http_filters).map_err(|r| format!("{at}.{r}"))?;
        return Ok((Some(AuthzLayer::Http), chain));
    }
    let chain = translate_network_authz_filters(&fc.filters)?;
    Ok((
        (chain_proxies_tcp(fc) || !chain.is_empty()).then_some(AuthzLayer::Network),
        chain,
    ))
}

/// Whether the chain has an `envoy.filters.network.tcp_proxy` filter.
fn chain_proxies_tcp(fc: &FilterChain) -> bool {
    fc.filters.iter().any(|f| {
        matches!(&f.config_type, Some(filter::ConfigType::TypedConfig(a)) if a.type_url == TCP_PROXY_TYPE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// istiod 1.18's `virtualInbound` from a real config dump: port 8083 is sniffed (HTTP
    /// connection manager chains selected by ALPN, and TCP proxy chains), as is the catch-all.
    fn deathstarbench_virtual_inbound() -> PbListener {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/istio/deathstarbench-geo-istio1.18_config_dump.json");
        let dump = crate::dump::ConfigDump::load(&path).expect("the dump loads");
        let resources = dump.xds_resources();
        let any = resources[crate::dump::LISTENER]
            .get(VIRTUAL_INBOUND)
            .expect("virtualInbound in the dump");
        PbListener::decode(any.value.as_slice()).expect("decodes")
    }

    fn inbound(l: &PbListener) -> InboundPolicy {
        match translate_listener(l).expect("translates").listener.kind {
            ListenerKind::Inbound(p) => p,
            other => panic!("inbound listener expected, got {other:?}"),
        }
    }

    fn is_hcm(fc: &FilterChain) -> bool {
        fc.filters
            .iter()
            .any(|f| f.name == "envoy.filters.network.http_connection_manager")
    }

    fn port_of(fc: &FilterChain) -> Option<u32> {
        fc.filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port)
            .map(|p| p.value)
    }

    #[test]
    fn sniffed_inbound_ports_are_http() {
        let l = deathstarbench_virtual_inbound();
        assert!(
            l.filter_chains
                .iter()
                .any(|fc| port_of(fc) == Some(8083) && is_hcm(fc))
        );
        let policy = inbound(&l);
        assert_eq!(policy.protocol_for(8083), InboundProtocol::Http);
        assert_eq!(policy.default_protocol, InboundProtocol::Http);
        assert_eq!(policy.protocol_for(9999), InboundProtocol::Http);
    }

    #[test]
    fn inbound_ports_with_only_tcp_proxy_chains_are_tcp() {
        // The same listener as istiod renders it for a port declared TCP (`tcp-*`): the
        // port's HTTP chains are gone, its TCP proxy chains stay.
        let mut l = deathstarbench_virtual_inbound();
        let before = l.filter_chains.len();
        l.filter_chains
            .retain(|fc| !(port_of(fc) == Some(8083) && is_hcm(fc)));
        assert_eq!(l.filter_chains.len(), before - 2);
        let policy = inbound(&l);
        assert_eq!(policy.protocol_for(8083), InboundProtocol::Tcp);
        assert_eq!(policy.port_protocol.get(&8083), Some(&InboundProtocol::Tcp));
        // Everything else is still sniffed; the 15006 blackhole chain is no port.
        assert_eq!(policy.default_protocol, InboundProtocol::Http);
        assert_eq!(policy.protocol_for(15006), InboundProtocol::Http);
        // The mTLS mode is unchanged (TLS and plaintext TCP chains remain).
        assert_eq!(policy.mode_for(8083), InboundTlsMode::Permissive);

        // Without the catch-all HTTP chains, unlisted ports are TCP too.
        l.filter_chains
            .retain(|fc| !(port_of(fc).is_none() && is_hcm(fc)));
        let policy = inbound(&l);
        assert_eq!(policy.default_protocol, InboundProtocol::Tcp);
        assert_eq!(policy.protocol_for(9999), InboundProtocol::Tcp);
    }

    #[cfg(feature = "testkit")]
    #[test]
    fn testkit_renders_declared_tcp_ports_as_tcp_proxy_chains() {
        use crate::testkit::{MeshModel, Protocol};
        let model = MeshModel::default()
            .inbound_port(5432, Protocol::Tcp)
            .inbound_port(9080, Protocol::Http);
        let generated = model.generate("default");
        let any = &generated[crate::ads::LISTENER][VIRTUAL_INBOUND];
        let l = PbListener::decode(any.value.as_slice()).expect("decodes");
        let tcp: Vec<_> = l
            .filter_chains
            .iter()
            .filter(|fc| port_of(fc) == Some(5432))
            .collect();
        assert_eq!(tcp.len(), 2, "TLS and plaintext chains");
        assert!(tcp.iter().all(|fc| chain_proxies_tcp(fc) && !is_hcm(fc)));
        let policy = inbound(&l);
        assert_eq!(policy.protocol_for(5432), InboundProtocol::Tcp);
        assert_eq!(policy.protocol_for(9080), InboundProtocol::Http);
        assert_eq!(policy.default_protocol, InboundProtocol::Http);
        assert_eq!(policy.mode_for(5432), InboundTlsMode::Permissive);
    }
}
