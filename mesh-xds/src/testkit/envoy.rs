//! Serving an upstream Envoy (not istio-proxy) on a test machine: what the testkit control
//! plane changes in the resources it serves when asked to
//! ([`ControlPlaneBuilder::bind_loopback`](super::ControlPlaneBuilder::bind_loopback),
//! [`ControlPlaneBuilder::strip_istio_proxy_extensions`](super::ControlPlaneBuilder::strip_istio_proxy_extensions),
//! [`ControlPlaneBuilder::sds_secrets`](super::ControlPlaneBuilder::sds_secrets)).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, SocketAddress, address, data_source, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::extensions::wasm::v3::PluginConfig;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::SpiffeId;
use prost::Message;

use super::ca::TestCa;
use super::model::ResourceSet;
use crate::ads::{CLUSTER, LISTENER};
use crate::translate::{from_any, to_any};

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const WASM_HTTP: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const WASM_NETWORK: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
const TYPED_STRUCTS: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];
/// The Wasm runtime of plugins compiled into istio-proxy (`envoy.wasm.stats`,
/// `envoy.wasm.metadata_exchange`): upstream Envoy has none of them.
const NULL_VM: &str = "envoy.wasm.runtime.null";

/// The type URL a `TypedStruct` names (field 1).
#[derive(Clone, PartialEq, Message)]
struct TypedStructTypeUrl {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// Every Listener that binds (`bind_to_port` unset or true) gets address 127.0.0.1 port 0:
/// Envoy binds an ephemeral loopback port (admin `/listeners` says which), so a replay never
/// binds 0.0.0.0 or a pod/VIP address and two listeners never compete for a port.
/// Listeners with `bind_to_port: false` (istiod's per-port outbound listeners under iptables
/// capture) bind nothing and are left as they are. Returns how many were moved.
pub fn bind_loopback(set: &mut ResourceSet) -> usize {
    let mut moved = 0;
    let Some(listeners) = set.get_mut(LISTENER) else {
        return 0;
    };
    for any in listeners.values_mut() {
        let Ok(mut l) = from_any::<Listener>(any) else {
            continue;
        };
        if l.bind_to_port.as_ref().is_some_and(|b| !b.value) {
            continue;
        }
        l.address = Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            })),
        });
        l.additional_addresses.clear();
        *any = to_any(&l);
        moved += 1;
    }
    moved
}

/// Whether an extension config exists only in istio-proxy's Envoy build: a `TypedStruct` (or a
/// bare `Any`) whose type is outside the Envoy API (`stats.PluginConfig`,
/// `envoy.tcp.metadataexchange.config.MetadataExchange`, `istio.envoy.config.filter.http.alpn…`,
/// `io.istio.network.authn.Config`), or a Wasm filter whose plugin runs in the null VM (its
/// code is compiled into istio-proxy).
pub fn is_istio_proxy_only(any: &Any) -> bool {
    let pool = crate::dump::descriptor_pool().ok();
    let known = |type_url: &str| {
        let short = type_url.rsplit('/').next().unwrap_or(type_url);
        pool.is_none_or(|p| p.get_message_by_name(short).is_some())
    };
    if TYPED_STRUCTS.contains(&any.type_url.as_str()) {
        return TypedStructTypeUrl::decode(any.value.as_slice())
            .is_ok_and(|ts| !ts.type_url.is_empty() && !known(&ts.type_url));
    }
    if any.type_url == WASM_HTTP || any.type_url == WASM_NETWORK {
        // Both Wasm filter messages carry `PluginConfig config = 1`.
        #[derive(Clone, PartialEq, Message)]
        struct Wasm {
            #[prost(message, optional, tag = "1")]
            config: Option<PluginConfig>,
        }
        use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config::Vm;
        return Wasm::decode(any.value.as_slice()).is_ok_and(|w| {
            matches!(
                w.config.and_then(|c| c.vm),
                Some(Vm::VmConfig(vm)) if vm.runtime == NULL_VM
            )
        });
    }
    !known(&any.type_url)
}

/// Drops the extensions only istio-proxy implements ([`is_istio_proxy_only`]) so that an
/// upstream Envoy accepts what istiod wrote: Cluster upstream `filters`
/// (`istio.metadata_exchange`), listener network filters (`istio.stats`,
/// `istio.metadata_exchange`, `istio_authn`) and HTTP filters (`istio.stats`,
/// `istio.metadata_exchange`, `istio.alpn`). Everything else is served unchanged. Returns how
/// many filters were dropped.
pub fn strip_istio_proxy_extensions(set: &mut ResourceSet) -> usize {
    let mut dropped = 0;
    if let Some(clusters) = set.get_mut(CLUSTER) {
        for any in clusters.values_mut() {
            let Ok(mut c) = from_any::<Cluster>(any) else {
                continue;
            };
            let before = c.filters.len();
            c.filters
                .retain(|f| !f.typed_config.as_ref().is_some_and(is_istio_proxy_only));
            if c.filters.len() != before {
                dropped += before - c.filters.len();
                *any = to_any(&c);
            }
        }
    }
    if let Some(listeners) = set.get_mut(LISTENER) {
        for any in listeners.values_mut() {
            let Ok(mut l) = from_any::<Listener>(any) else {
                continue;
            };
            let mut n = 0;
            for chain in l
                .filter_chains
                .iter_mut()
                .chain(l.default_filter_chain.as_mut())
            {
                n += strip_chain(chain);
            }
            if n > 0 {
                dropped += n;
                *any = to_any(&l);
            }
        }
    }
    dropped
}

fn strip_chain(chain: &mut FilterChain) -> usize {
    let before = chain.filters.len();
    chain.filters.retain(|f| match &f.config_type {
        Some(filter::ConfigType::TypedConfig(a)) => !is_istio_proxy_only(a),
        _ => true,
    });
    let mut dropped = before - chain.filters.len();
    for f in &mut chain.filters {
        let Some(filter::ConfigType::TypedConfig(a)) = &mut f.config_type else {
            continue;
        };
        if a.type_url != HCM {
            continue;
        }
        let Ok(mut hcm) = HttpConnectionManager::decode(a.value.as_slice()) else {
            continue;
        };
        let before = hcm.http_filters.len();
        hcm.http_filters.retain(|h| match &h.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => !is_istio_proxy_only(a),
            _ => true,
        });
        if hcm.http_filters.len() != before {
            dropped += before - hcm.http_filters.len();
            *a = to_any(&hcm);
        }
    }
    dropped
}

/// The two SDS secrets istio-agent serves its Envoy, as the testkit serves them: `default`
/// (a certificate for `identity` from `ca`, valid for a day) and `ROOTCA` (the CA's root).
pub fn sds_secrets(ca: &TestCa, identity: &SpiffeId) -> BTreeMap<String, Any> {
    let issued = ca.issue(identity, std::time::Duration::from_secs(24 * 3600));
    let inline = |s: String| DataSource {
        specifier: Some(data_source::Specifier::InlineString(s)),
        ..Default::default()
    };
    let default = Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(issued.chain_pem)),
            private_key: Some(inline(issued.key_pem)),
            ..Default::default()
        })),
    };
    let root = Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(ca.root_pem())),
                ..Default::default()
            },
        )),
    };
    [default, root]
        .into_iter()
        .map(|s| (s.name.clone(), to_any(&s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};

    #[test]
    fn bind_loopback_moves_binding_listeners_only() {
        let model = MeshModel::default().service(
            ServiceSpec::new("a", "default", "10.96.0.1".parse().unwrap())
                .port(80, Protocol::Http)
                .endpoint(EndpointSpec::new("127.0.0.1:1".parse().unwrap())),
        );
        let mut set = model.generate("default");
        let mut not_bound = from_any::<Listener>(&set[LISTENER]["0.0.0.0_80"]).unwrap();
        not_bound.name = "10.0.0.1_80".into();
        not_bound.bind_to_port =
            Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
        let original = to_any(&not_bound);
        set.get_mut(LISTENER)
            .unwrap()
            .insert(not_bound.name.clone(), original.clone());
        let n = bind_loopback(&mut set);
        // 0.0.0.0_80, virtualOutbound, virtualInbound.
        assert_eq!(n, 3);
        assert_eq!(set[LISTENER]["10.0.0.1_80"], original);
        for name in ["0.0.0.0_80", "virtualOutbound", "virtualInbound"] {
            let l = from_any::<Listener>(&set[LISTENER][name]).unwrap();
            let Some(address::Address::SocketAddress(sa)) = l.address.and_then(|a| a.address)
            else {
                panic!("{name}: no socket address");
            };
            assert_eq!(sa.address, "127.0.0.1", "{name}");
            assert_eq!(
                sa.port_specifier,
                Some(socket_address::PortSpecifier::PortValue(0))
            );
        }
    }

    #[test]
    fn istio_proxy_only_extensions_are_recognised() {
        let ts = |inner: &str| Any {
            type_url: TYPED_STRUCTS[0].into(),
            value: TypedStructTypeUrl {
                type_url: inner.into(),
            }
            .encode_to_vec(),
        };
        assert!(is_istio_proxy_only(&ts(
            "type.googleapis.com/stats.PluginConfig"
        )));
        assert!(!is_istio_proxy_only(&ts(
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        )));
        assert!(!is_istio_proxy_only(&to_any(
            &envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::default()
        )));
        use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
        use envoy_types::pb::envoy::extensions::wasm::v3::{VmConfig, plugin_config::Vm};
        let wasm = |runtime: &str| Wasm {
            config: Some(PluginConfig {
                vm: Some(Vm::VmConfig(VmConfig {
                    runtime: runtime.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        };
        assert!(is_istio_proxy_only(&to_any(&wasm(NULL_VM))));
        assert!(!is_istio_proxy_only(&to_any(&wasm(
            "envoy.wasm.runtime.v8"
        ))));
    }
}
