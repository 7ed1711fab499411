//! EDS `ClusterLoadAssignment` → [`mesh_core::endpoint::EndpointSet`].

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HealthStatus as PbHealth, Metadata, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, lb_endpoint,
};
use mesh_core::endpoint::{
    Endpoint, EndpointSet, EndpointTlsMode, HealthStatus, Locality, WorkloadMetadata,
};

use super::{TranslateError, struct_string};

const KIND: &str = "ClusterLoadAssignment";

/// Translates one CLA: every `lb_endpoint` with its socket address, health, weight, priority,
/// locality, auto-mTLS mode (`envoy.transport_socket_match.tlsMode == "istio"`),
/// `istio.workload` metadata and `hostname` (for `auto_host_rewrite`).
pub fn translate_endpoint(cla: &ClusterLoadAssignment) -> Result<EndpointSet, TranslateError> {
    let name = &cla.cluster_name;
    if name.is_empty() {
        return Err(TranslateError::new(KIND, "", "cluster_name is empty"));
    }
    compile(cla, name, Hostnames::Reject)
        .map_err(|reason| TranslateError::new(KIND, name.clone(), reason))
}

/// What a CLA's non-IP socket addresses mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hostnames {
    /// An address must be an IP literal (EDS, STATIC clusters): anything else is an error.
    Reject,
    /// Every address is for DNS to resolve (STRICT_DNS / LOGICAL_DNS clusters): a hostname
    /// or an IP literal, kept as written with its port.
    Resolve,
}

/// A CLA's endpoints as the set named `name`; `Err` is `field: reason`.
pub(crate) fn compile(
    cla: &ClusterLoadAssignment,
    name: &str,
    hostnames: Hostnames,
) -> Result<EndpointSet, String> {
    let (out, _) = compile_endpoints(cla, name, hostnames)?;
    // `policy.overprovisioning_factor` is a percentage of 100 (Envoy's default 140).
    Ok(EndpointSet::new(name, out).with_overprovisioning_factor(overprovisioning_factor(cla)))
}

/// The CLA's `policy.overprovisioning_factor` in percent (Envoy's default 140).
pub(crate) fn overprovisioning_factor(cla: &ClusterLoadAssignment) -> u32 {
    cla.policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .map_or(mesh_core::lb::DEFAULT_OVERPROVISIONING_FACTOR, |f| f.value)
}

/// A CLA's endpoints, and with [`Hostnames::Resolve`] the host each one's address names
/// (parallel to the endpoints; their `address` is then the unspecified IP with the port).
pub(crate) fn compile_endpoints(
    cla: &ClusterLoadAssignment,
    name: &str,
    hostnames: Hostnames,
) -> Result<(Vec<Endpoint>, Vec<String>), String> {
    // Exactly sized: a snapshot holds every endpoint of every cluster (istiod's 3-endpoint
    // services would otherwise keep a fourth, empty slot each).
    let mut out = Vec::with_capacity(cla.endpoints.iter().map(|g| g.lb_endpoints.len()).sum());
    let mut hosts = Vec::new();
    for (li, group) in cla.endpoints.iter().enumerate() {
        let locality = group
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            })
            .unwrap_or_default();
        for (ei, lb) in group.lb_endpoints.iter().enumerate() {
            // Only error paths name the field: no allocation per accepted endpoint.
            let field = || format!("endpoints[{li}].lb_endpoints[{ei}]");
            let ep = match &lb.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
                Some(lb_endpoint::HostIdentifier::EndpointName(n)) => {
                    return Err(format!(
                        "{}.endpoint_name {n:?}: named endpoints are not supported",
                        field()
                    ));
                }
                None => return Err(format!("{}.endpoint: missing", field())),
            };
            // Unix sockets and Envoy internal addresses (bootstrap's xds-grpc/sds-grpc, HBONE
            // internal listeners) are valid for Envoy but nothing mesh can dial: accepted and
            // skipped.
            if matches!(
                ep.address.as_ref().and_then(|a| a.address.as_ref()),
                Some(address::Address::Pipe(_) | address::Address::EnvoyInternalAddress(_))
            ) {
                tracing::debug!(cluster = %name, endpoint = %field(), "skipping a pipe/internal endpoint mesh cannot dial");
                continue;
            }
            let address = match (
                hostnames,
                ep.address.as_ref().and_then(|a| a.address.as_ref()),
            ) {
                (Hostnames::Resolve, Some(address::Address::SocketAddress(sa))) => {
                    let port =
                        port(sa).map_err(|r| format!("{}.endpoint.address: {r}", field()))?;
                    if sa.address.is_empty() {
                        return Err(format!("{}.endpoint.address: address is empty", field()));
                    }
                    hosts.push(sa.address.clone());
                    SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port)
                }
                _ => socket_addr(ep.address.as_ref())
                    .map_err(|r| format!("{}.endpoint.address: {r}", field()))?,
            };
            let health = match PbHealth::try_from(lb.health_status) {
                Ok(PbHealth::Unknown) => HealthStatus::Unknown,
                Ok(PbHealth::Healthy) => HealthStatus::Healthy,
                Ok(PbHealth::Unhealthy) => HealthStatus::Unhealthy,
                Ok(PbHealth::Draining) => HealthStatus::Draining,
                Ok(PbHealth::Timeout) => HealthStatus::Timeout,
                Ok(PbHealth::Degraded) => HealthStatus::Degraded,
                Err(_) => {
                    return Err(format!(
                        "{}.health_status: unknown value {}",
                        field(),
                        lb.health_status
                    ));
                }
            };
            let weight = match &lb.load_balancing_weight {
                Some(w) if w.value == 0 => {
                    return Err(format!(
                        "{}.load_balancing_weight: must be at least 1",
                        field()
                    ));
                }
                Some(w) => w.value,
                None => 1,
            };
            let (tls_mode, workload) = endpoint_metadata(lb.metadata.as_ref());
            out.push(Endpoint {
                address,
                weight,
                health,
                tls_mode,
                locality: locality.clone(),
                priority: group.priority,
                locality_weight: group.load_balancing_weight.as_ref().map(|w| w.value),
                workload,
                hostname: endpoint_hostname(ep, hostnames == Hostnames::Resolve),
            });
        }
    }
    Ok((out, hosts))
}

/// The hostname Envoy 1.40 gives an endpoint's host, which `auto_host_rewrite` puts in `Host`:
/// for an EDS or `STATIC` cluster the endpoint's `hostname` (none when empty: `Host` is left
/// alone); for a `STRICT_DNS` or `LOGICAL_DNS` cluster (`dns_cluster`) the socket address as
/// configured, DNS name or IP literal, whatever `hostname` says (observed against the real
/// Envoy).
pub fn endpoint_hostname(ep: &PbEndpoint, dns_cluster: bool) -> Option<std::sync::Arc<str>> {
    let name = if dns_cluster {
        match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(address::Address::SocketAddress(sa)) => sa.address.as_str(),
            _ => "",
        }
    } else {
        ep.hostname.as_str()
    };
    (!name.is_empty()).then(|| name.into())
}

/// A socket address with an IP literal and a numeric port.
pub(crate) fn socket_addr(addr: Option<&Address>) -> Result<SocketAddr, String> {
    let sa = match addr.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(address::Address::Pipe(_)) => return Err("pipe addresses are not supported".into()),
        Some(address::Address::EnvoyInternalAddress(_)) => {
            return Err("internal addresses are not supported".into());
        }
        None => return Err("missing socket_address".into()),
    };
    let ip = sa
        .address
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", sa.address))?;
    Ok(SocketAddr::new(ip, port(sa)?))
}

/// A socket address's numeric port (0 when unset).
fn port(sa: &SocketAddress) -> Result<u16, String> {
    match &sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(*p).map_err(|_| format!("port_value {p} out of range"))
        }
        Some(socket_address::PortSpecifier::NamedPort(n)) => {
            Err(format!("named_port {n:?} is not supported"))
        }
        None => Ok(0),
    }
}

fn endpoint_metadata(md: Option<&Metadata>) -> (EndpointTlsMode, Option<WorkloadMetadata>) {
    let Some(md) = md else {
        return (EndpointTlsMode::Disabled, None);
    };
    let tls = md
        .filter_metadata
        .get("envoy.transport_socket_match")
        .and_then(|s| struct_string(s, "tlsMode"))
        .map(|m| {
            if m == "istio" {
                EndpointTlsMode::Istio
            } else {
                EndpointTlsMode::Disabled
            }
        })
        .unwrap_or_default();
    let workload = md
        .filter_metadata
        .get("istio")
        .and_then(|s| struct_string(s, "workload"))
        .and_then(WorkloadMetadata::parse);
    (tls, workload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::SocketAddress;
    use envoy_types::pb::envoy::config::endpoint::v3::{LbEndpoint, LocalityLbEndpoints};

    fn ep(address: &str, hostname: &str) -> PbEndpoint {
        PbEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: address.into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(8080)),
                    ..Default::default()
                })),
            }),
            hostname: hostname.into(),
            ..Default::default()
        }
    }

    #[test]
    fn hostnames_come_from_the_endpoint_or_the_dns_address() {
        let cla = ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: [ep("10.0.0.1", "named.example"), ep("10.0.0.2", "")]
                    .into_iter()
                    .map(|e| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(e)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let set = translate_endpoint(&cla).unwrap();
        let names: Vec<_> = set
            .endpoints
            .iter()
            .map(|e| e.hostname.as_deref())
            .collect();
        assert_eq!(names, [Some("named.example"), None]);
        // STRICT_DNS / LOGICAL_DNS: the configured address, never `hostname`.
        let dns = |e: &PbEndpoint| endpoint_hostname(e, true);
        assert_eq!(
            dns(&ep("localhost", "override.example")).as_deref(),
            Some("localhost")
        );
        assert_eq!(dns(&ep("127.0.0.1", "")).as_deref(), Some("127.0.0.1"));
    }
}
