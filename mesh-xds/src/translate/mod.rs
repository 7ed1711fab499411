//! Envoy resources → mesh-core model, one translator per resource type.
//!
//! Every translator takes the decoded proto and returns the compiled mesh-core value or a
//! [`TranslateError`] that names the resource and the field or reason; the ADS client turns
//! those into the NACK's `error_detail`.

use std::time::Duration;

use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};

pub mod cluster;
pub mod endpoint;
pub mod ext_authz;
pub mod jwt;
pub mod listener;
pub mod name_table;
pub mod rbac;
pub mod route;

pub use cluster::translate_cluster;
pub use endpoint::translate_endpoint;
pub use listener::{TranslatedListener, translate_listener};
pub use name_table::translate_name_table;
pub use route::translate_route;

/// Every extension config type a translator reads and mesh honours: the one list that
/// [`crate::extensions`] reports against, built from the constants the translators dispatch
/// on, so an extension a translator starts reading is never reported as ignored.
pub const ACTED_ON: &[&str] = &[
    listener::HCM_TYPE,
    listener::TCP_PROXY_TYPE,
    listener::DOWNSTREAM_TLS_TYPE,
    listener::ROUTER_TYPE,
    rbac::HTTP_RBAC_TYPE,
    rbac::NETWORK_RBAC_TYPE,
    rbac::EXT_AUTHZ_TYPE,
    rbac::URI_TEMPLATE_MATCH_TYPE,
    jwt::JWT_AUTHN_TYPE,
    jwt::ISTIO_AUTHN_TYPE,
    route::HTTP_FAULT_TYPE,
    route::FILTER_CONFIG_TYPE,
    cluster::UPSTREAM_TLS_TYPE,
    cluster::RAW_BUFFER_TYPE,
    cluster::INTERNAL_UPSTREAM_TYPE,
    cluster::HTTP_PROTOCOL_OPTIONS_TYPE,
];

/// Why a resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct TranslateError {
    /// Resource kind (`Listener`, `Cluster`, `RouteConfiguration`, `ClusterLoadAssignment`,
    /// `NameTable`).
    pub kind: &'static str,
    /// Resource name.
    pub name: String,
    /// Field and reason.
    pub reason: String,
}

impl TranslateError {
    /// An error for resource `name` of `kind`.
    pub fn new(kind: &'static str, name: impl Into<String>, reason: impl Into<String>) -> Self {
        TranslateError {
            kind,
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// Packs a message into an `Any` with its canonical type URL.
pub fn to_any<M: prost::Message + prost::Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Unpacks an `Any`, checking its type URL; the error text names what was expected.
pub fn from_any<M: prost::Message + prost::Name + Default>(any: &Any) -> Result<M, String> {
    let want = M::type_url();
    if any.type_url != want {
        return Err(format!("expected {want}, got {}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", M::full_name()))
}

/// A protobuf `Duration` as a std `Duration` (negative values are an error).
pub(crate) fn duration(
    d: &envoy_types::pb::google::protobuf::Duration,
) -> Result<Duration, String> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(format!("negative duration {}s {}ns", d.seconds, d.nanos));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// `fields[key]` as a string.
pub(crate) fn struct_string<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v),
        _ => None,
    }
}

/// `fields[key]` as a struct.
#[allow(dead_code)]
pub(crate) fn struct_struct<'a>(s: &'a Struct, key: &str) -> Option<&'a Struct> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StructValue(v) => Some(v),
        _ => None,
    }
}

/// `fields[key]` as a list.
pub(crate) fn struct_list<'a>(s: &'a Struct, key: &str) -> Option<&'a [Value]> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::ListValue(v) => Some(&v.values),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions as ext;
    use prost::Name;

    /// Each constant is its proto's own type URL (the translators compare with `==`).
    #[test]
    fn acted_on_constants_are_the_protos_type_urls() {
        let want = [
            ext::filters::network::http_connection_manager::v3::HttpConnectionManager::type_url(),
            ext::filters::network::tcp_proxy::v3::TcpProxy::type_url(),
            ext::transport_sockets::tls::v3::DownstreamTlsContext::type_url(),
            ext::filters::http::router::v3::Router::type_url(),
            ext::filters::http::rbac::v3::Rbac::type_url(),
            ext::filters::network::rbac::v3::Rbac::type_url(),
            ext::filters::http::ext_authz::v3::ExtAuthz::type_url(),
            ext::path::r#match::uri_template::v3::UriTemplateMatchConfig::type_url(),
            ext::filters::http::jwt_authn::v3::JwtAuthentication::type_url(),
            jwt::ISTIO_AUTHN_TYPE.to_owned(),
            ext::filters::http::fault::v3::HttpFault::type_url(),
            envoy_types::pb::envoy::config::route::v3::FilterConfig::type_url(),
            ext::transport_sockets::tls::v3::UpstreamTlsContext::type_url(),
            ext::transport_sockets::raw_buffer::v3::RawBuffer::type_url(),
            ext::transport_sockets::internal_upstream::v3::InternalUpstreamTransport::type_url(),
            ext::upstreams::http::v3::HttpProtocolOptions::type_url(),
        ];
        assert_eq!(
            ACTED_ON,
            want.iter().map(String::as_str).collect::<Vec<_>>()
        );
    }

    /// No translator recognises an extension by a type URL literal of its own: every one it
    /// dispatches on is a constant listed in [`ACTED_ON`].
    #[test]
    fn translators_dispatch_only_on_acted_on_types() {
        for (file, src) in [
            ("cluster.rs", include_str!("cluster.rs")),
            ("endpoint.rs", include_str!("endpoint.rs")),
            ("ext_authz.rs", include_str!("ext_authz.rs")),
            ("jwt.rs", include_str!("jwt.rs")),
            ("listener.rs", include_str!("listener.rs")),
            ("name_table.rs", include_str!("name_table.rs")),
            ("rbac.rs", include_str!("rbac.rs")),
            ("route.rs", include_str!("route.rs")),
        ] {
            let code = src.split("#[cfg(test)]").next().unwrap_or_default();
            assert!(
                !code.contains("type_url.ends_with(")
                    && !code.contains(".ends_with(\"type.googleapis"),
                "{file} matches a type URL by suffix"
            );
            for (i, _) in code.match_indices("\"type.googleapis.com/") {
                let lit = &code[i + 1..];
                let lit = &lit[..lit.find('"').unwrap_or(lit.len())];
                assert!(ACTED_ON.contains(&lit), "{file}: {lit} is not in ACTED_ON");
            }
        }
    }
}
