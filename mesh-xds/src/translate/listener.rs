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
use mesh_core::listener::{
    InboundPolicy, InboundTlsMode, Listener, ListenerKind, OutboundProtocol,
};
use mesh_core::snapshot::{BLACKHOLE_CLUSTER, OutboundTrafficPolicy, PASSTHROUGH_CLUSTER};

use super::{TranslateError, endpoint::socket_addr, from_any};

const KIND: &str = "Listener";
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
                kind: ListenerKind::Inbound(inbound_policy(l)),
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
        if any
            .type_url
            .ends_with("http_connection_manager.v3.HttpConnectionManager")
        {
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
        if any.type_url.ends_with("tcp_proxy.v3.TcpProxy") {
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
}

/// Per destination port: chains terminating TLS (transport_protocol `tls` with a transport
/// socket) only → STRICT; TLS and `raw_buffer` → PERMISSIVE; plaintext only → DISABLE.
/// Chains without a destination port give the default; the `15006` blackhole chain is skipped.
fn inbound_policy(l: &PbListener) -> InboundPolicy {
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
    for fc in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        let m = fc.filter_chain_match.clone().unwrap_or_default();
        let port = m.destination_port.map(|p| p.value);
        if port.is_some_and(|p| p == own_port) {
            continue;
        }
        let seen = match port.and_then(|p| u16::try_from(p).ok()) {
            Some(p) => per_port.entry(p).or_default(),
            None => &mut default,
        };
        let terminates_tls = fc.transport_socket.as_ref().is_some_and(|ts| {
            ts.name == "envoy.transport_sockets.tls"
                || matches!(&ts.config_type, Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) if a.type_url.ends_with("DownstreamTlsContext"))
        });
        match m.transport_protocol.as_str() {
            "tls" if terminates_tls => seen.mtls = true,
            // TLS passthrough of the application's own TLS: not a PeerAuthentication signal.
            "tls" => {}
            _ if terminates_tls => seen.mtls = true,
            _ => seen.plain = true,
        }
    }
    InboundPolicy {
        default_mode: default.mode().unwrap_or_default(),
        per_port: per_port
            .into_iter()
            .filter_map(|(p, s)| s.mode().map(|m| (p, m)))
            .collect(),
    }
}
