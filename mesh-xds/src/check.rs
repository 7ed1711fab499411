//! `meshctl check-config`: translate every resource of a config dump the way the ADS client
//! would, and say per type what was accepted, what was rejected (and why), and which
//! extensions were accepted without mesh acting on them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use serde_json::json;

use crate::dump::{CLUSTER, ConfigDump, DumpError, ENDPOINT, LISTENER, ROUTE, SECRET};
use crate::translate::{self, from_any};

/// One rejected resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Resource name.
    pub name: String,
    /// Why (the text a NACK's `error_detail` would carry).
    pub reason: String,
}

/// The verdict for one resource type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeReport {
    /// Resources translated.
    pub accepted: usize,
    /// Resources refused.
    pub rejected: Vec<Rejected>,
    /// Extension type URLs accepted without mesh acting on them, with counts.
    pub ignored_extensions: BTreeMap<String, usize>,
}

/// The verdict for a whole dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// `bootstrap.node.id`, if the dump has one.
    pub node_id: Option<String>,
    /// Per type URL (`Listener`, `Cluster`, `RouteConfiguration`, `ClusterLoadAssignment`,
    /// `Secret`).
    pub types: BTreeMap<&'static str, TypeReport>,
    /// Extension types outside the Envoy API, kept opaque, with counts.
    pub opaque_types: BTreeMap<String, usize>,
    /// Fields newer than mesh's Envoy API, dropped, with counts.
    pub unknown_fields: BTreeMap<String, usize>,
    /// Dump sections not read, with counts.
    pub ignored_sections: BTreeMap<String, usize>,
}

impl CheckReport {
    /// Total rejected resources.
    pub fn rejected(&self) -> usize {
        self.types.values().map(|t| t.rejected.len()).sum()
    }

    /// Total accepted resources.
    pub fn accepted(&self) -> usize {
        self.types.values().map(|t| t.accepted).sum()
    }

    /// The report for a type URL (empty if none).
    pub fn of(&self, type_url: &str) -> TypeReport {
        self.types.get(type_url).cloned().unwrap_or_default()
    }

    /// Machine-readable form.
    pub fn to_json(&self) -> serde_json::Value {
        let types: serde_json::Map<String, serde_json::Value> = self
            .types
            .iter()
            .map(|(t, r)| {
                (
                    short(t).to_owned(),
                    json!({
                        "accepted": r.accepted,
                        "rejected": r.rejected.iter().map(|x| json!({"name": x.name, "reason": x.reason})).collect::<Vec<_>>(),
                        "ignored_extensions": r.ignored_extensions,
                    }),
                )
            })
            .collect();
        json!({
            "node_id": self.node_id,
            "types": types,
            "opaque_types": self.opaque_types,
            "unknown_fields": self.unknown_fields,
            "ignored_sections": self.ignored_sections,
            "accepted": self.accepted(),
            "rejected": self.rejected(),
        })
    }
}

fn short(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.node_id {
            writeln!(f, "node: {n}")?;
        }
        for (t, r) in &self.types {
            writeln!(
                f,
                "{}: {} accepted, {} rejected, {} ignored extension types",
                short(t),
                r.accepted,
                r.rejected.len(),
                r.ignored_extensions.len()
            )?;
            for x in &r.rejected {
                writeln!(f, "  rejected {:?}: {}", x.name, x.reason)?;
            }
            for (e, n) in &r.ignored_extensions {
                writeln!(f, "  ignored {e} ×{n}")?;
            }
        }
        for (e, n) in &self.opaque_types {
            writeln!(
                f,
                "opaque (outside the Envoy API, kept as TypedStruct): {e} ×{n}"
            )?;
        }
        for (e, n) in &self.unknown_fields {
            writeln!(f, "unknown field (dropped): {e} ×{n}")?;
        }
        for (e, n) in &self.ignored_sections {
            writeln!(f, "section not read: {e} ×{n}")?;
        }
        writeln!(
            f,
            "total: {} accepted, {} rejected",
            self.accepted(),
            self.rejected()
        )
    }
}

/// Loads and checks a dump file.
pub fn check_file(path: &Path) -> Result<CheckReport, DumpError> {
    Ok(check(&ConfigDump::load(path)?))
}

/// Translates every resource of `dump`.
pub fn check(dump: &ConfigDump) -> CheckReport {
    let mut report = CheckReport {
        node_id: dump.node_id.clone(),
        opaque_types: dump.opaque_types.clone(),
        unknown_fields: dump.unknown_fields.clone(),
        ignored_sections: dump.ignored_sections.clone(),
        ..Default::default()
    };
    for r in &dump.rejected {
        report
            .types
            .entry(r.type_url)
            .or_default()
            .rejected
            .push(Rejected {
                name: r.name.clone(),
                reason: format!("{} (at {})", r.reason, r.location),
            });
    }
    for r in &dump.resources {
        let entry = report.types.entry(r.type_url).or_default();
        match translate_any(r.type_url, &r.resource) {
            Ok(()) => {
                entry.accepted += 1;
                for (t, n) in crate::extensions::ignored_extensions(&r.resource) {
                    *entry.ignored_extensions.entry(t).or_default() += n;
                }
            }
            Err(reason) => entry.rejected.push(Rejected {
                name: r.name.clone(),
                reason,
            }),
        }
    }
    report
}

/// Decodes and translates one resource as the ADS client would; `Err` is the NACK text.
pub fn translate_any(type_url: &str, any: &Any) -> Result<(), String> {
    match type_url {
        LISTENER => translate::translate_listener(&from_any::<Listener>(any)?)
            .map(drop)
            .map_err(|e| e.to_string()),
        CLUSTER => translate::translate_cluster(&from_any::<Cluster>(any)?)
            .map(drop)
            .map_err(|e| e.to_string()),
        ROUTE => translate::translate_route(&from_any::<RouteConfiguration>(any)?)
            .map(drop)
            .map_err(|e| e.to_string()),
        ENDPOINT => translate::translate_endpoint(&from_any::<ClusterLoadAssignment>(any)?)
            .map(drop)
            .map_err(|e| e.to_string()),
        SECRET => from_any::<Secret>(any).map(drop),
        other => Err(format!("unsupported resource type {other}")),
    }
}
