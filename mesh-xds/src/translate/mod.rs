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
