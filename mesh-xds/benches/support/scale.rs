//! The scale workload shared by `mesh-xds/benches/translate.rs` (criterion) and the root
//! package's `benches/xds_scale.rs` (mesh vs Envoy over ADS): N services rendered by the
//! testkit model as istiod renders them, made deployable on a real Envoy, and translated into
//! one mesh-core snapshot the way the ADS client publishes it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener as PbListener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::google::protobuf::BoolValue;
use mesh_core::snapshot::{OutboundTrafficPolicy, Snapshot};
use mesh_xds::ads::{CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};
use mesh_xds::istio_proto;
use mesh_xds::testkit::{EndpointSpec, MeshModel, Protocol, ResourceSet, ServiceSpec};
use mesh_xds::translate::{
    from_any, to_any, translate_cluster, translate_endpoint, translate_listener,
    translate_name_table, translate_route,
};

/// Envoy's SDS resource type (served over ADS to Envoy only; mesh does not subscribe).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// How the N services spread over ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Each service on its own port: N listeners `0.0.0.0_<port>`, N route configurations
    /// (one virtual host each), N clusters, N ClusterLoadAssignments of 3 endpoints.
    PortPerService,
    /// Every service on port 80: one listener, one route configuration with N virtual hosts.
    SharedPort,
}

/// First service port for [`Shape::PortPerService`].
pub const BASE_PORT: u16 = 20000;

/// The service port of service `i`.
pub fn service_port(shape: Shape, i: usize) -> u16 {
    match shape {
        Shape::PortPerService => BASE_PORT + i as u16,
        Shape::SharedPort => 80,
    }
}

/// `svc-<i>.default.svc.cluster.local`.
pub fn service_host(i: usize) -> String {
    format!("svc-{i}.default.svc.cluster.local")
}

/// N HTTP services in namespace `default`, each with one port and 3 meshed endpoints on
/// 127.x addresses (never contacted).
pub fn model(n: usize, shape: Shape) -> MeshModel {
    let mut m = MeshModel::default();
    for i in 0..n {
        let vip = IpAddr::V4(Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250) as u8 + 1));
        let mut svc = ServiceSpec::new(&format!("svc-{i}"), "default", vip)
            .port(service_port(shape, i), Protocol::Http);
        for e in 0..3u16 {
            let ip = Ipv4Addr::new(
                127,
                1 + (i / 62500) as u8,
                ((i / 250) % 250) as u8,
                (i % 250) as u8 + 1,
            );
            svc = svc.endpoint(
                EndpointSpec::new(SocketAddr::new(IpAddr::V4(ip), 9001 + e))
                    .service_account(&format!("svc-{i}")),
            );
        }
        m.services.push(svc);
    }
    m
}

/// What istiod adds to the testkit's rendering for a sidecar that really runs Envoy: outbound
/// and virtual listeners are `bind_to_port: false` (iptables captures traffic; here it keeps
/// Envoy from binding 0.0.0.0 ports) and every HTTP connection manager ends in the router.
/// mesh is served exactly the same resources.
pub fn istio_shaped(set: &mut ResourceSet) {
    let Some(listeners) = set.get_mut(LISTENER) else {
        return;
    };
    for any in listeners.values_mut() {
        let Ok(mut l) = from_any::<PbListener>(any) else {
            continue;
        };
        l.bind_to_port = Some(BoolValue { value: false });
        for chain in &mut l.filter_chains {
            for f in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(tc)) = &mut f.config_type else {
                    continue;
                };
                let Ok(mut hcm) = from_any::<HttpConnectionManager>(tc) else {
                    continue;
                };
                if hcm.http_filters.is_empty() {
                    hcm.http_filters.push(HttpFilter {
                        name: "envoy.filters.http.router".into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
                            &Router::default(),
                        ))),
                        ..Default::default()
                    });
                }
                *tc = to_any(&hcm);
            }
        }
        *any = to_any(&l);
    }
}

/// The SDS secrets istiod's clusters name (`default`, `ROOTCA`), for an Envoy that fetches
/// them over ADS.
pub fn add_secrets(set: &mut ResourceSet, chain_pem: &str, key_pem: &str, root_pem: &str) {
    let inline = |s: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineString(s.into())),
        ..Default::default()
    };
    let default = Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(chain_pem)),
            private_key: Some(inline(key_pem)),
            ..Default::default()
        })),
    };
    let root = Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(root_pem)),
                ..Default::default()
            },
        )),
    };
    let secrets = set.entry(SECRET).or_default();
    secrets.insert(default.name.clone(), to_any(&default));
    secrets.insert(root.name.clone(), to_any(&root));
}

/// The N-service resource set both mesh and Envoy are served.
pub fn resources(n: usize, shape: Shape) -> ResourceSet {
    let mut set = model(n, shape).generate("default");
    istio_shaped(&mut set);
    set
}

/// Decodes and translates every resource and builds the snapshot the ADS client would publish
/// (all clusters and listeners warmed): what mesh does with a full push.
pub fn build_snapshot(set: &ResourceSet, version: u64) -> Result<Snapshot, String> {
    let empty = BTreeMap::new();
    let of = |t: &str| set.get(t).unwrap_or(&empty);
    let mut clusters = HashMap::new();
    for (name, any) in of(CLUSTER) {
        let c = translate_cluster(&from_any::<PbCluster>(any)?).map_err(|e| e.to_string())?;
        clusters.insert(name.clone(), Arc::new(c));
    }
    let mut endpoints = HashMap::new();
    for (name, any) in of(ENDPOINT) {
        let e = translate_endpoint(&from_any::<ClusterLoadAssignment>(any)?)
            .map_err(|e| e.to_string())?;
        endpoints.insert(name.clone(), Arc::new(e));
    }
    let mut routes = HashMap::new();
    for (name, any) in of(ROUTE) {
        let r =
            translate_route(&from_any::<RouteConfiguration>(any)?).map_err(|e| e.to_string())?;
        routes.insert(name.clone(), Arc::new(r));
    }
    let mut listeners = HashMap::new();
    let mut policy = None;
    for (name, any) in of(LISTENER) {
        let l = translate_listener(&from_any::<PbListener>(any)?).map_err(|e| e.to_string())?;
        policy = policy.or(l.outbound_traffic_policy);
        listeners.insert(name.clone(), Arc::new(l.listener));
    }
    let name_table = match of(NAME_TABLE).values().next() {
        Some(any) => translate_name_table(&from_any::<istio_proto::NameTable>(any)?)
            .map_err(|e| e.to_string())?,
        None => Default::default(),
    };
    Ok(Snapshot::new(
        version,
        listeners,
        routes,
        clusters,
        endpoints,
        Arc::new(name_table),
        policy.unwrap_or(OutboundTrafficPolicy::AllowAny),
        BTreeMap::new(),
    ))
}

/// Encoded size of every resource of the set (what goes over the wire), bytes.
pub fn wire_bytes(set: &ResourceSet) -> usize {
    set.values()
        .flat_map(|m| m.values())
        .map(|a| a.value.len())
        .sum()
}
