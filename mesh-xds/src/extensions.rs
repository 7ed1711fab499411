//! Extension configs inside xDS resources (filters, listener filters, transport sockets, access
//! loggers, protocol options, matcher inputs, …): which ones mesh acts on, and which it accepts
//! without acting on them (Istio's stats and metadata-exchange filters, Wasm, tracing, CORS,
//! …).
//!
//! An extension mesh does not act on never causes a NACK: it is recorded, counted, and logged
//! once per process per type URL ([`report_ignored`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DynamicMessage, ReflectMessage, Value};

/// Extension config types whose settings mesh reads and honours: the translators' own list
/// ([`crate::translate::ACTED_ON`]).
pub const ACTED_ON: &[&str] = crate::translate::ACTED_ON;

/// Whether mesh acts on extension configs of this type URL.
pub fn is_acted_on(type_url: &str) -> bool {
    ACTED_ON.contains(&type_url)
}

/// Every extension type URL nested anywhere in `resource` (not the resource's own type), with
/// counts; a `TypedStruct` counts as the type it wraps. Well-known `google.protobuf.*` payloads
/// are not extensions and are skipped. A resource the descriptors cannot decode yields nothing.
pub fn extension_types(resource: &Any) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    if let Some(msg) = decode(resource) {
        walk(&msg, &mut out, 0);
    }
    out
}

/// The extension types in `resource` that mesh accepts without acting on, with counts.
pub fn ignored_extensions(resource: &Any) -> BTreeMap<String, usize> {
    let mut all = extension_types(resource);
    all.retain(|t, _| !is_acted_on(t));
    all
}

/// The extension types a listener or cluster names at its top levels (listener filters,
/// network filters, HTTP filters of an HTTP connection manager, access loggers, transport
/// sockets, cluster filters, protocol options) that mesh does not act on: the cheap, typed scan
/// the ADS client runs on every accepted resource ([`ignored_extensions`] walks everything by
/// reflection and is what `check-config` uses).
pub fn ignored_top_level(resource: &Any) -> BTreeSet<String> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::{Listener, filter, listener_filter};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_filter,
    };
    use prost::Message;
    let mut out = BTreeSet::new();
    let mut add = |a: &Any| {
        let t = wrapped_type(a);
        if !is_acted_on(&t) {
            out.insert(t);
        }
    };
    if resource.type_url == crate::ads::LISTENER {
        let Ok(l) = Listener::decode(resource.value.as_slice()) else {
            return out;
        };
        for lf in &l.listener_filters {
            if let Some(listener_filter::ConfigType::TypedConfig(a)) = &lf.config_type {
                add(a);
            }
        }
        for al in &l.access_log {
            if let Some(
                envoy_types::pb::envoy::config::accesslog::v3::access_log::ConfigType::TypedConfig(
                    a,
                ),
            ) = &al.config_type
            {
                add(a);
            }
        }
        for fc in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            if let Some(t) = socket(&fc.transport_socket) {
                add(t);
            }
            for f in &fc.filters {
                let Some(filter::ConfigType::TypedConfig(a)) = &f.config_type else {
                    continue;
                };
                add(a);
                if a.type_url.ends_with("HttpConnectionManager")
                    && let Ok(hcm) = HttpConnectionManager::decode(a.value.as_slice())
                {
                    for hf in &hcm.http_filters {
                        if let Some(http_filter::ConfigType::TypedConfig(a)) = &hf.config_type {
                            add(a);
                        }
                    }
                }
            }
        }
    } else if resource.type_url == crate::ads::CLUSTER {
        let Ok(c) = Cluster::decode(resource.value.as_slice()) else {
            return out;
        };
        if let Some(t) = socket(&c.transport_socket) {
            add(t);
        }
        for m in &c.transport_socket_matches {
            if let Some(t) = socket(&m.transport_socket) {
                add(t);
            }
        }
        for f in &c.filters {
            if let Some(a) = &f.typed_config {
                add(a);
            }
        }
        for a in c.typed_extension_protocol_options.values() {
            add(a);
        }
    }
    out
}

fn socket(ts: &Option<envoy_types::pb::envoy::config::core::v3::TransportSocket>) -> Option<&Any> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket;
    ts.as_ref().and_then(|t| {
        t.config_type
            .as_ref()
            .map(|transport_socket::ConfigType::TypedConfig(a)| a)
    })
}

/// The `type_url` field of `udpa.type.v1.TypedStruct` / `xds.type.v3.TypedStruct`.
#[derive(Clone, PartialEq, prost::Message)]
struct TypedStructHead {
    #[prost(string, tag = "1")]
    type_url: String,
}

/// The type an `Any` configures: its own, or the one a `TypedStruct` wraps.
fn wrapped_type(a: &Any) -> String {
    if a.type_url.ends_with(".TypedStruct")
        && let Ok(h) = <TypedStructHead as prost::Message>::decode(a.value.as_slice())
        && !h.type_url.is_empty()
    {
        return h.type_url;
    }
    a.type_url.clone()
}

static REPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Logs each type URL the first time this process meets it; returns the ones that were new.
pub fn report_ignored<'a>(types: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let Ok(mut seen) = REPORTED.lock() else {
        return Vec::new();
    };
    let mut new = Vec::new();
    for t in types {
        if seen.insert(t.clone()) {
            tracing::info!(
                extension = %t,
                "accepting an xDS extension mesh does not act on (reported once)"
            );
            new.push(t.clone());
        }
    }
    new
}

const MAX_DEPTH: usize = 64;

fn decode(any: &Any) -> Option<DynamicMessage> {
    let pool = crate::dump::descriptor_pool().ok()?;
    let name = any.type_url.rsplit('/').next()?;
    let desc = pool.get_message_by_name(name)?;
    DynamicMessage::decode(desc, any.value.as_slice()).ok()
}

fn walk(msg: &DynamicMessage, out: &mut BTreeMap<String, usize>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    for (_, v) in msg.fields() {
        walk_value(v, out, depth + 1);
    }
}

fn walk_value(v: &Value, out: &mut BTreeMap<String, usize>, depth: usize) {
    match v {
        Value::Message(m) => {
            if m.descriptor().full_name() == "google.protobuf.Any" {
                let type_url = m
                    .get_field_by_name("type_url")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let value = m
                    .get_field_by_name("value")
                    .and_then(|v| v.as_bytes().cloned())
                    .unwrap_or_default();
                let any = Any {
                    type_url,
                    value: value.to_vec(),
                };
                on_any(&any, out, depth);
            } else {
                walk(m, out, depth);
            }
        }
        Value::List(items) => items.iter().for_each(|i| walk_value(i, out, depth)),
        Value::Map(m) => m.values().for_each(|i| walk_value(i, out, depth)),
        _ => {}
    }
}

fn on_any(any: &Any, out: &mut BTreeMap<String, usize>, depth: usize) {
    let short = any.type_url.rsplit('/').next().unwrap_or_default();
    if short.starts_with("google.protobuf.") {
        return;
    }
    let Some(msg) = decode(any) else {
        *out.entry(any.type_url.clone()).or_default() += 1;
        return;
    };
    if short == "udpa.type.v1.TypedStruct" || short == "xds.type.v3.TypedStruct" {
        let inner = msg
            .get_field_by_name("type_url")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let inner = if inner.is_empty() {
            any.type_url.clone()
        } else {
            inner
        };
        *out.entry(inner).or_default() += 1;
        return;
    }
    *out.entry(any.type_url.clone()).or_default() += 1;
    walk(&msg, out, depth);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_filters_and_unwraps_typed_struct() {
        let dump = serde_json::json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "static_listeners": [{"listener": {
                "@type": crate::dump::LISTENER,
                "name": "l",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
                "filter_chains": [{"filters": [
                    {"name": "mx", "typed_config": {"@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange"}},
                    {"name": "hcm", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "x",
                        "rds": {"route_config_name": "80", "config_source": {"ads": {}}},
                        "http_filters": [
                            {"name": "envoy.filters.http.fault", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }}
                ]}]
            }}]
        }]});
        let d = crate::dump::ConfigDump::from_value(dump).unwrap();
        let all = extension_types(&d.resources[0].resource);
        assert_eq!(all.len(), 4, "{all:?}");
        let ignored = ignored_extensions(&d.resources[0].resource);
        assert_eq!(
            ignored.keys().cloned().collect::<Vec<_>>(),
            vec![
                "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange".to_owned(),
            ]
        );
        let top = ignored_top_level(&d.resources[0].resource);
        assert_eq!(top, ignored.keys().cloned().collect::<BTreeSet<_>>());
        let t = "type.googleapis.com/test.only.Reported".to_owned();
        assert_eq!(report_ignored([&t]), vec![t.clone()]);
        assert!(report_ignored([&t]).is_empty(), "reported twice");
    }
}
