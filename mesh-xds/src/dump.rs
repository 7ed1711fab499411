//! Envoy `/config_dump` files (JSON, or the YAML `istioctl … -o yaml` writes) → xDS resources.
//!
//! A dump is `{"configs": [{"@type": "…envoy.admin.v3.<X>ConfigDump", …}]}` in protobuf-JSON.
//! Each resource inside is read by reflection over the descriptor set `envoy-types` ships (the
//! whole Envoy v3 API) and re-encoded as the `Any` istiod would have sent. Istio's own
//! extension types that are not in that set (`stats.PluginConfig`,
//! `envoy.tcp.metadataexchange.config.MetadataExchange`, `istio.…alpn…FilterConfig`, Wasm
//! plugin configs, …) never fail a load: each is kept, content and all, as a
//! `udpa.type.v1.TypedStruct` carrying the original type URL (the form Envoy itself accepts
//! for any extension) and is counted in [`ConfigDump::opaque_types`]. Fields newer than the
//! descriptor set are dropped and counted in [`ConfigDump::unknown_fields`].
//!
//! One resource that cannot be read is a [`DumpRejection`] naming it; the others still load.
//! Legacy xDS v2 resources (`envoy.api.v2.*`, Istio ≤ 1.7) are rejected with a message saying
//! so; a v2 admin envelope (`envoy.admin.v2alpha.*`) fails the whole load with
//! [`DumpError::LegacyV2`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, ReflectMessage,
};
use serde_json::{Map, Value};

/// Type URL of CDS resources.
pub const CLUSTER: &str = crate::ads::CLUSTER;
/// Type URL of EDS resources.
pub const ENDPOINT: &str = crate::ads::ENDPOINT;
/// Type URL of LDS resources.
pub const LISTENER: &str = crate::ads::LISTENER;
/// Type URL of RDS resources.
pub const ROUTE: &str = crate::ads::ROUTE;
/// Type URL of SDS secrets.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

const TYPE_PREFIX: &str = "type.googleapis.com/";
/// The wrapper unknown extension configs are kept in.
pub const TYPED_STRUCT: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";

static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();

/// The Envoy v3 API descriptor pool (from `envoy-types`), plus `udpa.type.v1.TypedStruct` and
/// `xds.type.v3.TypedStruct`, decoded once per process.
pub fn descriptor_pool() -> Result<&'static DescriptorPool, DumpError> {
    POOL.get_or_init(|| {
        let bytes: &[u8] = include_bytes!(env!("MESH_XDS_ENVOY_DESCRIPTORS"));
        let mut pool = DescriptorPool::decode(bytes).map_err(|e| e.to_string())?;
        for (file, package) in [
            ("udpa/type/v1/typed_struct.proto", "udpa.type.v1"),
            ("xds/type/v3/typed_struct.proto", "xds.type.v3"),
        ] {
            if pool
                .get_message_by_name(&format!("{package}.TypedStruct"))
                .is_none()
            {
                pool.add_file_descriptor_proto(typed_struct_file(file, package))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(pool)
    })
    .as_ref()
    .map_err(|e| DumpError::Descriptors(e.clone()))
}

fn typed_struct_file(file: &str, package: &str) -> prost_types::FileDescriptorProto {
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto};
    let field = |name: &str, number, ty: Type, type_name: Option<&str>| FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(str::to_owned),
        json_name: Some(name.replace("_u", "U")),
        ..Default::default()
    };
    FileDescriptorProto {
        name: Some(file.into()),
        package: Some(package.into()),
        dependency: vec!["google/protobuf/struct.proto".into()],
        message_type: vec![DescriptorProto {
            name: Some("TypedStruct".into()),
            field: vec![
                field("type_url", 1, Type::String, None),
                field("value", 2, Type::Message, Some(".google.protobuf.Struct")),
            ],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

/// Why a dump could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Neither JSON nor YAML.
    #[error("not valid JSON or YAML: {0}")]
    Syntax(String),
    /// Parsed, but not `{"configs": [...]}`.
    #[error("not an Envoy config dump: {0}")]
    Shape(String),
    /// An xDS v2 dump (Envoy ≤ 1.16, Istio ≤ 1.7).
    #[error(
        "legacy xDS v2 config dump ({0}): Envoy removed the v2 API in 1.18 and istiod sends only v3; capture the dump from a current sidecar"
    )]
    LegacyV2(String),
    /// The built-in descriptor set is unusable (a build problem, not the dump's).
    #[error("Envoy API descriptors: {0}")]
    Descriptors(String),
}

/// Where in the dump a resource was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// Bootstrap (`static_*`).
    Static,
    /// Delivered by xDS and in use (`dynamic_active_*`, `active_state`, `dynamic_*_configs`).
    Dynamic,
    /// Delivered by xDS and still warming.
    Warming,
    /// Delivered by xDS and draining (listeners).
    Draining,
    /// Delivered by xDS and refused by the Envoy that wrote the dump (`error_state`).
    Failed,
}

/// One resource read from a dump.
#[derive(Clone, Debug, PartialEq)]
pub struct DumpedResource {
    /// Its xDS type URL ([`CLUSTER`], [`ENDPOINT`], [`LISTENER`], [`ROUTE`], [`SECRET`]).
    pub type_url: &'static str,
    /// Its name (`cluster_name` for EDS).
    pub name: String,
    /// `version_info` of the dynamic entry (empty for static resources).
    pub version: String,
    /// Where it was in the dump.
    pub origin: Origin,
    /// The resource as istiod would send it.
    pub resource: Any,
}

/// One resource that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpRejection {
    /// The type URL expected at that place.
    pub type_url: &'static str,
    /// Its name, when it could be found.
    pub name: String,
    /// JSON path of the entry in the dump (`configs[3].dynamic_listeners[7]`).
    pub location: String,
    /// Why.
    pub reason: String,
}

/// A loaded config dump.
#[derive(Clone, Debug, Default)]
pub struct ConfigDump {
    /// `bootstrap.node.id`, when the dump has a bootstrap section.
    pub node_id: Option<String>,
    /// Every resource read, in dump order.
    pub resources: Vec<DumpedResource>,
    /// Resources that could not be read.
    pub rejected: Vec<DumpRejection>,
    /// Extension type URLs not in the Envoy API, kept as `TypedStruct`, with counts.
    pub opaque_types: BTreeMap<String, usize>,
    /// `message.field` names newer than the descriptor set (dropped), with counts.
    pub unknown_fields: BTreeMap<String, usize>,
    /// Dump sections mesh does not read (`ScopedRoutesConfigDump` with content, …), with counts.
    pub ignored_sections: BTreeMap<String, usize>,
}

impl ConfigDump {
    /// Loads a dump from a file: YAML when it ends in `.yaml`/`.yml`, JSON otherwise.
    pub fn load(path: &Path) -> Result<Self, DumpError> {
        let text = std::fs::read_to_string(path).map_err(|source| DumpError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if yaml {
            Self::from_yaml_str(&text)
        } else {
            Self::from_json_str(&text)
        }
    }

    /// Parses protobuf-JSON.
    pub fn from_json_str(text: &str) -> Result<Self, DumpError> {
        let v: Value = serde_json::from_str(text).map_err(|e| DumpError::Syntax(e.to_string()))?;
        Self::from_value(v)
    }

    /// Parses the YAML form.
    pub fn from_yaml_str(text: &str) -> Result<Self, DumpError> {
        let v: Value = serde_yaml::from_str(text).map_err(|e| DumpError::Syntax(e.to_string()))?;
        Self::from_value(v)
    }

    /// Reads an already parsed dump.
    pub fn from_value(v: Value) -> Result<Self, DumpError> {
        let pool = descriptor_pool()?;
        let configs = v
            .get("configs")
            .and_then(Value::as_array)
            .ok_or_else(|| DumpError::Shape("no \"configs\" array at the top level".into()))?;
        let mut out = ConfigDump::default();
        for (i, section) in configs.iter().enumerate() {
            let ty = section
                .get("@type")
                .and_then(Value::as_str)
                .ok_or_else(|| DumpError::Shape(format!("configs[{i}] has no \"@type\"")))?;
            let short = ty.strip_prefix(TYPE_PREFIX).unwrap_or(ty);
            if short.starts_with("envoy.admin.v2") {
                return Err(DumpError::LegacyV2(short.to_owned()));
            }
            let at = format!("configs[{i}]");
            let mut r = Reader {
                pool,
                out: &mut out,
            };
            match short {
                "envoy.admin.v3.BootstrapConfigDump" => {
                    out.node_id = section
                        .get("bootstrap")
                        .and_then(|b| b.get("node"))
                        .and_then(|n| n.get("id"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                "envoy.admin.v3.ListenersConfigDump" => {
                    r.entries(
                        section,
                        &at,
                        "static_listeners",
                        Origin::Static,
                        LISTENER,
                        "listener",
                    );
                    for (j, e) in list(section, "dynamic_listeners").iter().enumerate() {
                        for (state, origin) in [
                            ("active_state", Origin::Dynamic),
                            ("warming_state", Origin::Warming),
                            ("draining_state", Origin::Draining),
                        ] {
                            if let Some(s) = field(e, state) {
                                let loc = format!("{at}.dynamic_listeners[{j}].{state}");
                                r.entry(s, &loc, origin, LISTENER, "listener");
                            }
                        }
                        if let Some(s) = field(e, "error_state") {
                            let loc = format!("{at}.dynamic_listeners[{j}].error_state");
                            r.entry(s, &loc, Origin::Failed, LISTENER, "failed_configuration");
                        }
                    }
                }
                "envoy.admin.v3.ClustersConfigDump" => {
                    r.entries(
                        section,
                        &at,
                        "static_clusters",
                        Origin::Static,
                        CLUSTER,
                        "cluster",
                    );
                    r.entries(
                        section,
                        &at,
                        "dynamic_active_clusters",
                        Origin::Dynamic,
                        CLUSTER,
                        "cluster",
                    );
                    r.entries(
                        section,
                        &at,
                        "dynamic_warming_clusters",
                        Origin::Warming,
                        CLUSTER,
                        "cluster",
                    );
                }
                "envoy.admin.v3.RoutesConfigDump" => {
                    r.entries(
                        section,
                        &at,
                        "static_route_configs",
                        Origin::Static,
                        ROUTE,
                        "route_config",
                    );
                    r.entries(
                        section,
                        &at,
                        "dynamic_route_configs",
                        Origin::Dynamic,
                        ROUTE,
                        "route_config",
                    );
                }
                "envoy.admin.v3.EndpointsConfigDump" => {
                    r.entries(
                        section,
                        &at,
                        "static_endpoint_configs",
                        Origin::Static,
                        ENDPOINT,
                        "endpoint_config",
                    );
                    r.entries(
                        section,
                        &at,
                        "dynamic_endpoint_configs",
                        Origin::Dynamic,
                        ENDPOINT,
                        "endpoint_config",
                    );
                }
                "envoy.admin.v3.SecretsConfigDump" => {
                    r.entries(
                        section,
                        &at,
                        "static_secrets",
                        Origin::Static,
                        SECRET,
                        "secret",
                    );
                    r.entries(
                        section,
                        &at,
                        "dynamic_active_secrets",
                        Origin::Dynamic,
                        SECRET,
                        "secret",
                    );
                    r.entries(
                        section,
                        &at,
                        "dynamic_warming_secrets",
                        Origin::Warming,
                        SECRET,
                        "secret",
                    );
                }
                other => {
                    let has_content = section
                        .as_object()
                        .is_some_and(|o| o.keys().any(|k| k != "@type"));
                    if has_content {
                        *out.ignored_sections.entry(other.to_owned()).or_default() += 1;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The resources of one type URL.
    pub fn of_type<'a>(&'a self, type_url: &'a str) -> impl Iterator<Item = &'a DumpedResource> {
        self.resources
            .iter()
            .filter(move |r| r.type_url == type_url)
    }

    /// What istiod sent (dynamic resources of the four ADS types; for a name the dumping Envoy
    /// refused and holds no active version of, the refused one) keyed by type URL and name:
    /// the set a control plane replays.
    pub fn xds_resources(&self) -> BTreeMap<&'static str, BTreeMap<String, Any>> {
        let mut out: BTreeMap<&'static str, BTreeMap<String, Any>> = BTreeMap::new();
        for pass in [Origin::Failed, Origin::Dynamic] {
            for r in &self.resources {
                if r.origin == pass && r.type_url != SECRET {
                    out.entry(r.type_url)
                        .or_default()
                        .insert(r.name.clone(), r.resource.clone());
                }
            }
        }
        out
    }
}

impl ConfigDump {
    /// The snapshot mesh's ADS client would publish after accepting this dump's
    /// [`xds_resources`](Self::xds_resources) (and its static ones): the same translation and
    /// the same state, with every cluster and listener treated as warmed. Every route
    /// configuration in the dump is kept, referenced by a listener or not. Returns the
    /// snapshot and the rejection reasons of resources that did not translate.
    pub fn snapshot(&self) -> (mesh_core::Snapshot, Vec<String>) {
        use crate::ads::state::{Incoming, XdsState};
        let mut state = XdsState {
            initial_fetch_timeout: std::time::Duration::ZERO,
            ..XdsState::default()
        };
        let mut by_type: BTreeMap<&'static str, BTreeMap<String, Incoming>> = BTreeMap::new();
        for pass in [Origin::Static, Origin::Failed, Origin::Dynamic] {
            for r in self.resources.iter().filter(|r| r.origin == pass) {
                by_type.entry(r.type_url).or_default().insert(
                    r.name.clone(),
                    Incoming {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.resource.clone()),
                    },
                );
            }
        }
        let mut errors = Vec::new();
        for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE, crate::ads::NAME_TABLE] {
            let incoming: Vec<Incoming> = by_type
                .remove(type_url)
                .map(|m| m.into_values().collect())
                .unwrap_or_default();
            if incoming.is_empty() {
                continue;
            }
            errors.extend(state.apply(type_url, &incoming, &[]).errors);
        }
        state.cds_acked = true;
        state.lds_acked = true;
        state.promote(tokio::time::Instant::now());
        (state.snapshot(), errors)
    }
}

/// Envoy's admin `/config_dump` JSON for what an ADS client holds: a
/// `BootstrapConfigDump` with the node, then `ClustersConfigDump` (`dynamic_active_clusters`,
/// `dynamic_warming_clusters`), `ListenersConfigDump` (`dynamic_listeners` with
/// `active_state` or `warming_state`), `RoutesConfigDump` (`dynamic_route_configs`) and
/// `EndpointsConfigDump` (`dynamic_endpoint_configs`), each resource in full as protobuf-JSON
/// with its `@type`, field names as in the `.proto` files (as Envoy writes them).
///
/// Extension configs of types outside the Envoy API (Istio's `stats.PluginConfig`, Wasm
/// plugin configs, …) cannot be rendered without their schema: each becomes a
/// `udpa.type.v1.TypedStruct` naming the original type URL with an empty `value`, the form
/// [`ConfigDump`] reads back. A resource that does not decode at all is left out and logged.
pub fn render_config_dump(held: &crate::ads::RetainedResources) -> Value {
    use serde_json::json;
    let Ok(pool) = descriptor_pool() else {
        return json!({"configs": []});
    };
    let ts = |t: std::time::SystemTime| Value::String(rfc3339(t));
    let version = |t: &str| held.type_versions.get(t).cloned().unwrap_or_default();
    let of = |t: &str| held.by_type.get(t).into_iter().flat_map(|m| m.iter());
    let mut active_clusters = Vec::new();
    let mut warming_clusters = Vec::new();
    for (name, r) in of(CLUSTER) {
        let Some(body) = any_to_json(pool, &r.resource) else {
            continue;
        };
        let e =
            json!({"version_info": r.version, "cluster": body, "last_updated": ts(r.last_updated)});
        if held.warming.contains(name) {
            warming_clusters.push(e);
        } else {
            active_clusters.push(e);
        }
    }
    let listeners: Vec<Value> = of(LISTENER)
        .filter_map(|(name, r)| {
            let body = any_to_json(pool, &r.resource)?;
            let state = json!({"version_info": r.version, "listener": body, "last_updated": ts(r.last_updated)});
            let key = if held.warming.contains(name) {
                "warming_state"
            } else {
                "active_state"
            };
            Some(json!({"name": name, key: state}))
        })
        .collect();
    let routes: Vec<Value> = of(ROUTE)
        .filter_map(|(_, r)| {
            let body = any_to_json(pool, &r.resource)?;
            Some(json!({"version_info": r.version, "route_config": body, "last_updated": ts(r.last_updated)}))
        })
        .collect();
    let endpoints: Vec<Value> = of(ENDPOINT)
        .filter_map(|(_, r)| {
            let body = any_to_json(pool, &r.resource)?;
            Some(json!({"version_info": r.version, "endpoint_config": body, "last_updated": ts(r.last_updated)}))
        })
        .collect();
    let node = held.node.as_ref().and_then(|n| {
        let any = crate::translate::to_any(n);
        let mut v = any_to_json(pool, &any)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("@type");
        }
        Some(v)
    });
    json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {"node": node}},
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "version_info": version(CLUSTER),
         "dynamic_active_clusters": active_clusters, "dynamic_warming_clusters": warming_clusters},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "version_info": version(LISTENER),
         "dynamic_listeners": listeners},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes},
        {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints},
    ]})
}

/// One resource as `/config_dump` renders it (protobuf-JSON with `@type`, extensions outside
/// the Envoy API as `TypedStruct`); `None` when it does not decode. Two resources with equal
/// renderings are the same configuration, whatever their encoded bytes.
pub fn resource_json(any: &Any) -> Option<Value> {
    any_to_json(descriptor_pool().ok()?, any)
}

/// One resource as protobuf-JSON with `@type`; `None` (logged) when it does not decode.
fn any_to_json(pool: &DescriptorPool, any: &Any) -> Option<Value> {
    let short = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    let desc = pool.get_message_by_name(short)?;
    let mut msg = match DynamicMessage::decode(desc, any.value.as_slice()) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(type_url = %any.type_url, error = %e, "config_dump: resource does not decode");
            return None;
        }
    };
    opaque_extensions(pool, &mut msg);
    let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    let mut v = match msg.serialize_with_options(serde_json::value::Serializer, &opts) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(type_url = %any.type_url, error = %e, "config_dump: resource does not render");
            return None;
        }
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("@type".into(), Value::String(any.type_url.clone()));
    }
    Some(v)
}

/// Rewrites every `Any` inside `msg` whose type is outside the pool (or does not decode) into
/// a `TypedStruct` naming that type, so the message renders.
fn opaque_extensions(pool: &DescriptorPool, msg: &mut DynamicMessage) {
    if msg.descriptor().full_name() == "google.protobuf.Any" {
        opaque_any(pool, msg);
        return;
    }
    for (_, v) in msg.fields_mut() {
        opaque_value(pool, v);
    }
}

fn opaque_value(pool: &DescriptorPool, v: &mut prost_reflect::Value) {
    use prost_reflect::Value as V;
    match v {
        V::Message(m) => opaque_extensions(pool, m),
        V::List(items) => items.iter_mut().for_each(|i| opaque_value(pool, i)),
        V::Map(m) => m.values_mut().for_each(|i| opaque_value(pool, i)),
        _ => {}
    }
}

fn opaque_any(pool: &DescriptorPool, any: &mut DynamicMessage) {
    use prost_reflect::Value as V;
    let text = |m: &DynamicMessage, f: &str| match m.get_field_by_name(f).as_deref() {
        Some(V::String(s)) => s.clone(),
        _ => String::new(),
    };
    let type_url = text(any, "type_url");
    let bytes = match any.get_field_by_name("value").as_deref() {
        Some(V::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    let short = type_url.rsplit('/').next().unwrap_or(&type_url);
    if let Some(desc) = pool.get_message_by_name(short)
        && let Ok(mut inner) = DynamicMessage::decode(desc, bytes.as_ref())
    {
        opaque_extensions(pool, &mut inner);
        any.set_field_by_name(
            "value",
            V::Bytes(prost::Message::encode_to_vec(&inner).into()),
        );
        return;
    }
    let Some(ts_desc) = pool.get_message_by_name(&TYPED_STRUCT[TYPE_PREFIX.len()..]) else {
        return;
    };
    let mut ts = DynamicMessage::new(ts_desc);
    ts.set_field_by_name("type_url", V::String(type_url));
    any.set_field_by_name("type_url", V::String(TYPED_STRUCT.to_owned()));
    any.set_field_by_name("value", V::Bytes(prost::Message::encode_to_vec(&ts).into()));
}

/// `2026-11-25T06:34:00.123Z`.
fn rfc3339(t: std::time::SystemTime) -> String {
    mesh_core::time::rfc3339_millis(t)
}

/// `obj[name]`, also accepting the lowerCamelCase JSON name.
fn field<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| obj.get(camel(name).as_str()))
}

fn list<'a>(obj: &'a Value, name: &str) -> &'a [Value] {
    field(obj, name)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

struct Reader<'a> {
    pool: &'a DescriptorPool,
    out: &'a mut ConfigDump,
}

impl Reader<'_> {
    fn entries(
        &mut self,
        section: &Value,
        at: &str,
        key: &str,
        origin: Origin,
        type_url: &'static str,
        inner: &str,
    ) {
        for (j, e) in list(section, key).iter().enumerate() {
            self.entry(e, &format!("{at}.{key}[{j}]"), origin, type_url, inner);
        }
    }

    /// One `{version_info?, <inner>: {"@type": …}}` entry.
    fn entry(
        &mut self,
        e: &Value,
        location: &str,
        origin: Origin,
        type_url: &'static str,
        inner: &str,
    ) {
        let version = field(e, "version_info")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let reject = |out: &mut ConfigDump, name: String, reason: String| {
            out.rejected.push(DumpRejection {
                type_url,
                name,
                location: location.to_owned(),
                reason,
            });
        };
        let Some(body) = field(e, inner) else {
            // Secrets without content (warming, or `name` only) and error-only entries.
            if type_url != SECRET {
                let name = field(e, "name").and_then(Value::as_str).unwrap_or_default();
                reject(
                    self.out,
                    name.to_owned(),
                    format!("entry has no \"{inner}\""),
                );
            }
            return;
        };
        let mut name = resource_name(body, type_url);
        let mut named;
        let mut body = body;
        if name.is_empty() && origin == Origin::Static && type_url != ENDPOINT {
            // Envoy allocates a name for an unnamed bootstrap listener (and inline route
            // configs have none); give it one that says where it came from.
            name = format!("<{location}>");
            named = body.clone();
            if let Some(o) = named.as_object_mut() {
                o.insert("name".into(), Value::String(name.clone()));
            }
            body = &named;
        }
        match self.decode(body, type_url) {
            Ok(resource) => self.out.resources.push(DumpedResource {
                type_url,
                name,
                version,
                origin,
                resource,
            }),
            Err(reason) => reject(self.out, name, reason),
        }
    }

    /// A resource JSON object (with `@type`) → `Any`.
    fn decode(&mut self, body: &Value, type_url: &'static str) -> Result<Any, String> {
        let ty = body
            .get("@type")
            .and_then(Value::as_str)
            .ok_or("no \"@type\"")?;
        let short = ty.strip_prefix(TYPE_PREFIX).unwrap_or(ty);
        if short.starts_with("envoy.api.v2") {
            return Err(format!(
                "legacy xDS v2 resource {short}: Envoy removed the v2 API in 1.18 and istiod sends only v3"
            ));
        }
        if ty != type_url {
            return Err(format!("expected {type_url}, found {ty}"));
        }
        let desc = self
            .pool
            .get_message_by_name(&type_url[TYPE_PREFIX.len()..])
            .ok_or_else(|| format!("{type_url} is not in the Envoy API descriptors"))?;
        let mut body = body.clone();
        if let Some(o) = body.as_object_mut() {
            o.remove("@type");
        }
        self.prepare(&mut body, &desc);
        let opts = DeserializeOptions::new().deny_unknown_fields(false);
        let msg = DynamicMessage::deserialize_with_options(desc, body, &opts)
            .map_err(|e| format!("cannot read as {}: {e}", &type_url[TYPE_PREFIX.len()..]))?;
        Ok(Any {
            type_url: type_url.to_owned(),
            value: prost::Message::encode_to_vec(&msg),
        })
    }

    /// Walks a message's JSON alongside its descriptor: `Any`s of types outside the pool become
    /// `TypedStruct`s, unknown fields are dropped and counted.
    fn prepare(&mut self, v: &mut Value, desc: &MessageDescriptor) {
        let full = desc.full_name();
        if full.starts_with("google.protobuf.") && full != "google.protobuf.Any" {
            // Well-known types have their own JSON forms (and Struct holds arbitrary JSON).
            return;
        }
        if full == "google.protobuf.Any" {
            self.prepare_any(v);
            return;
        }
        let Some(obj) = v.as_object_mut() else { return };
        let keys: Vec<String> = obj.keys().cloned().collect();
        for k in keys {
            let fd = desc
                .get_field_by_json_name(&k)
                .or_else(|| desc.get_field_by_name(&k));
            let Some(fd) = fd else {
                *self
                    .out
                    .unknown_fields
                    .entry(format!("{full}.{k}"))
                    .or_default() += 1;
                obj.remove(&k);
                continue;
            };
            let Some(child) = obj.get_mut(&k) else {
                continue;
            };
            if fd.is_map() {
                let Kind::Message(entry) = fd.kind() else {
                    continue;
                };
                let Kind::Message(vdesc) = entry.map_entry_value_field().kind() else {
                    continue;
                };
                if let Some(m) = child.as_object_mut() {
                    for item in m.values_mut() {
                        self.prepare(item, &vdesc);
                    }
                }
            } else if let Kind::Message(m) = fd.kind() {
                if let Some(items) = child.as_array_mut().filter(|_| fd.is_list()) {
                    for item in items {
                        self.prepare(item, &m);
                    }
                } else {
                    self.prepare(child, &m);
                }
            }
        }
    }

    fn prepare_any(&mut self, v: &mut Value) {
        let Some(obj) = v.as_object_mut() else { return };
        let Some(ty) = obj.get("@type").and_then(Value::as_str).map(str::to_owned) else {
            return;
        };
        let short = ty.rsplit('/').next().unwrap_or(&ty).to_owned();
        if let Some(desc) = self.pool.get_message_by_name(&short) {
            if short.starts_with("google.protobuf.") {
                return;
            }
            // Prepare the body without the "@type" key, then put it back.
            let mut body = Value::Object(std::mem::take(obj));
            if let Some(o) = body.as_object_mut() {
                o.remove("@type");
            }
            self.prepare(&mut body, &desc);
            let mut m = match body {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            m.insert("@type".into(), Value::String(ty));
            *obj = m;
            return;
        }
        *self.out.opaque_types.entry(ty.clone()).or_default() += 1;
        obj.remove("@type");
        let content = Value::Object(std::mem::take(obj));
        obj.insert("@type".into(), Value::String(TYPED_STRUCT.into()));
        obj.insert("type_url".into(), Value::String(ty));
        obj.insert("value".into(), content);
    }
}

/// The name field of a resource's JSON (`cluster_name` for a CLA).
fn resource_name(body: &Value, type_url: &str) -> String {
    let key = if type_url == ENDPOINT {
        "cluster_name"
    } else {
        "name"
    };
    field(body, key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_envoy_and_typed_struct() {
        let pool = descriptor_pool().unwrap();
        for n in [
            "envoy.config.listener.v3.Listener",
            "envoy.admin.v3.ListenersConfigDump",
            "udpa.type.v1.TypedStruct",
            "xds.type.v3.TypedStruct",
        ] {
            assert!(pool.get_message_by_name(n).is_some(), "{n}");
        }
    }

    #[test]
    fn unknown_extension_is_kept_as_typed_struct() {
        let dump = serde_json::json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "dynamic_listeners": [{"name": "l", "active_state": {"version_info": "v1", "listener": {
                "@type": LISTENER,
                "name": "l",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
                "brand_new_field": 3,
                "filter_chains": [{"filters": [{"name": "istio.stats", "typed_config": {
                    "@type": "type.googleapis.com/stats.PluginConfig",
                    "disable_host_header_fallback": true
                }}]}]
            }}}]
        }]});
        let d = ConfigDump::from_value(dump).unwrap();
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
        assert_eq!(d.opaque_types["type.googleapis.com/stats.PluginConfig"], 1);
        assert_eq!(
            d.unknown_fields["envoy.config.listener.v3.Listener.brand_new_field"],
            1
        );
        let r = &d.resources[0];
        assert_eq!((r.name.as_str(), r.version.as_str()), ("l", "v1"));
        let l: envoy_types::pb::envoy::config::listener::v3::Listener =
            crate::translate::from_any(&r.resource).unwrap();
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a)) =
            &l.filter_chains[0].filters[0].config_type
        else {
            panic!("no typed config")
        };
        assert_eq!(a.type_url, TYPED_STRUCT);
    }

    #[test]
    fn v2_envelope_and_resources_are_refused_clearly() {
        let v2 = serde_json::json!({"configs": [{"@type": "type.googleapis.com/envoy.admin.v2alpha.ListenersConfigDump"}]});
        let e = ConfigDump::from_value(v2).unwrap_err();
        assert!(e.to_string().contains("legacy xDS v2"), "{e}");
        let mixed = serde_json::json!({"configs": [{
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "static_clusters": [{"cluster": {"@type": "type.googleapis.com/envoy.api.v2.Cluster", "name": "c"}}]
        }]});
        let d = ConfigDump::from_value(mixed).unwrap();
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].name, "c");
        assert!(
            d.rejected[0]
                .reason
                .contains("legacy xDS v2 resource envoy.api.v2.Cluster")
        );
    }

    #[test]
    fn rfc3339_dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_589_640_123);
        assert_eq!(rfc3339(t), "2026-11-25T06:54:00.123Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn rendered_dump_reads_back_with_unknown_extensions_as_typed_struct() {
        use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
        let listener = Listener {
            name: "l".into(),
            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                address: Some(
                    envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                        envoy_types::pb::envoy::config::core::v3::SocketAddress {
                            address: "0.0.0.0".into(),
                            port_specifier: Some(
                                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(80),
                            ),
                            ..Default::default()
                        },
                    ),
                ),
            }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "istio.stats".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(Any {
                        type_url: "type.googleapis.com/stats.PluginConfig".into(),
                        value: vec![8, 1],
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut held = crate::ads::RetainedResources::default();
        held.by_type.entry(LISTENER).or_default().insert(
            "l".into(),
            crate::ads::RetainedResource {
                version: "v1".into(),
                resource: crate::translate::to_any(&listener),
                last_updated: std::time::SystemTime::now(),
            },
        );
        let v = render_config_dump(&held);
        let l = &v["configs"][2]["dynamic_listeners"][0];
        assert_eq!(l["name"], "l");
        assert_eq!(l["active_state"]["listener"]["@type"], LISTENER);
        let tc = &l["active_state"]["listener"]["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(tc["@type"], TYPED_STRUCT);
        assert_eq!(tc["type_url"], "type.googleapis.com/stats.PluginConfig");
        let back = ConfigDump::from_value(v).unwrap();
        assert!(back.rejected.is_empty(), "{:?}", back.rejected);
        assert_eq!(back.resources.len(), 1);
        assert_eq!(back.resources[0].version, "v1");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(ConfigDump::from_json_str("{").is_err());
        assert!(ConfigDump::from_json_str("[]").is_err());
        assert!(ConfigDump::from_json_str(r#"{"configs":[{}]}"#).is_err());
        let d = ConfigDump::from_json_str(
            r#"{"configs":[{"@type":"type.googleapis.com/envoy.admin.v3.ClustersConfigDump","static_clusters":[{"cluster":{"@type":"type.googleapis.com/envoy.config.cluster.v3.Cluster","name":"c","connect_timeout":"forever"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(d.rejected.len(), 1, "{d:?}");
    }
}
