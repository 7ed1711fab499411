//! The resources the client has accepted, per type, and the snapshot built from them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::cluster::Cluster;
use mesh_core::endpoint::EndpointSet;
use mesh_core::listener::{ListenerKind, OutboundProtocol};
use mesh_core::name_table::NameTable;
use mesh_core::route::RouteConfig;
use mesh_core::snapshot::{OutboundTrafficPolicy, Snapshot};

use super::types::{CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};
use crate::istio_proto;
use crate::translate::{self, TranslateError, TranslatedListener, from_any};

/// One accepted resource.
#[derive(Debug, Clone)]
pub(crate) struct Held<T> {
    pub version: String,
    pub value: Arc<T>,
}

/// A resource as it arrived: name (may be empty in SotW), version, payload.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    pub name: String,
    pub version: String,
    pub resource: Option<Any>,
}

/// Outcome of applying one response.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Something in the state changed.
    pub changed: bool,
    /// Rejected resources, `"<name>: <reason>"`.
    pub errors: Vec<String>,
    /// Names present in the response (accepted or rejected).
    pub present: BTreeSet<String>,
}

/// Everything accepted so far.
#[derive(Debug, Default)]
pub(crate) struct XdsState {
    pub clusters: BTreeMap<String, Held<Cluster>>,
    pub endpoints: BTreeMap<String, Held<EndpointSet>>,
    pub listeners: BTreeMap<String, Held<TranslatedListener>>,
    pub routes: BTreeMap<String, Held<RouteConfig>>,
    pub name_table: Option<Held<NameTable>>,
    /// Last fully accepted version per type URL.
    pub type_versions: BTreeMap<String, String>,
    pub cds_acked: bool,
    pub lds_acked: bool,
    pub snapshot_version: u64,
}

fn apply_typed<P, T>(
    map: &mut BTreeMap<String, Held<T>>,
    incoming: &[Incoming],
    kind: &str,
    name_of: fn(&P) -> &str,
    translate: fn(&P) -> Result<T, TranslateError>,
    out: &mut Applied,
) where
    P: prost::Message + prost::Name + Default,
{
    for r in incoming {
        let Some(any) = &r.resource else {
            out.errors
                .push(format!("{kind} {:?}: resource body missing", r.name));
            out.present.insert(r.name.clone());
            continue;
        };
        let proto: P = match from_any(any) {
            Ok(p) => p,
            Err(e) => {
                out.errors.push(format!("{kind} {:?}: {e}", r.name));
                out.present.insert(r.name.clone());
                continue;
            }
        };
        let name = if r.name.is_empty() {
            name_of(&proto).to_owned()
        } else {
            r.name.clone()
        };
        out.present.insert(name.clone());
        if name_of(&proto) != name {
            out.errors.push(format!(
                "{kind} {name:?}: resource name does not match its content ({:?})",
                name_of(&proto)
            ));
            continue;
        }
        if map
            .get(&name)
            .is_some_and(|h| h.version == r.version && !r.version.is_empty())
        {
            continue;
        }
        match translate(&proto) {
            Ok(value) => {
                if kind != "ClusterLoadAssignment" {
                    // Extensions mesh does not act on are accepted; each is logged once.
                    let ignored = crate::extensions::ignored_top_level(any);
                    crate::extensions::report_ignored(ignored.iter());
                }
                map.insert(
                    name,
                    Held {
                        version: r.version.clone(),
                        value: Arc::new(value),
                    },
                );
                out.changed = true;
            }
            Err(e) => out.errors.push(e.to_string()),
        }
    }
}

impl XdsState {
    /// Applies resources of `type_url`; `removed` names are dropped.
    pub fn apply(&mut self, type_url: &str, incoming: &[Incoming], removed: &[String]) -> Applied {
        let mut out = Applied::default();
        match type_url {
            CLUSTER => {
                apply_typed::<PbCluster, _>(
                    &mut self.clusters,
                    incoming,
                    "Cluster",
                    |c| &c.name,
                    translate::translate_cluster,
                    &mut out,
                );
                remove(&mut self.clusters, removed, &mut out);
            }
            ENDPOINT => {
                apply_typed::<ClusterLoadAssignment, _>(
                    &mut self.endpoints,
                    incoming,
                    "ClusterLoadAssignment",
                    |c| &c.cluster_name,
                    translate::translate_endpoint,
                    &mut out,
                );
                remove(&mut self.endpoints, removed, &mut out);
            }
            LISTENER => {
                apply_typed::<PbListener, _>(
                    &mut self.listeners,
                    incoming,
                    "Listener",
                    |l| &l.name,
                    translate::translate_listener,
                    &mut out,
                );
                remove(&mut self.listeners, removed, &mut out);
            }
            ROUTE => {
                apply_typed::<RouteConfiguration, _>(
                    &mut self.routes,
                    incoming,
                    "RouteConfiguration",
                    |r| &r.name,
                    translate::translate_route,
                    &mut out,
                );
                remove(&mut self.routes, removed, &mut out);
            }
            NAME_TABLE => {
                // One unnamed resource; the last valid one wins.
                for r in incoming {
                    let parsed = r
                        .resource
                        .as_ref()
                        .ok_or_else(|| "resource body missing".to_owned())
                        .and_then(from_any::<istio_proto::NameTable>)
                        .and_then(|t| translate::translate_name_table(&t).map_err(|e| e.reason));
                    match parsed {
                        Ok(t) => {
                            self.name_table = Some(Held {
                                version: r.version.clone(),
                                value: Arc::new(t),
                            });
                            out.changed = true;
                        }
                        Err(e) => out.errors.push(format!("NameTable {:?}: {e}", r.name)),
                    }
                }
            }
            other => out.errors.push(format!("unsupported type {other}")),
        }
        out
    }

    /// The EDS names of accepted EDS clusters.
    pub fn wanted_endpoints(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| c.value.eds_service_name().map(str::to_owned))
            .collect()
    }

    /// The route configuration names of accepted HTTP listeners.
    pub fn wanted_routes(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| match &l.value.listener.kind {
                ListenerKind::Outbound(OutboundProtocol::Http { route_config }) => {
                    Some(route_config.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Drops endpoints and routes nobody references any more; returns whether any went.
    pub fn prune(&mut self) -> bool {
        let eps = self.wanted_endpoints();
        let rts = self.wanted_routes();
        let (e, r) = (self.endpoints.len(), self.routes.len());
        self.endpoints.retain(|k, _| eps.contains(k));
        self.routes.retain(|k, _| rts.contains(k));
        e != self.endpoints.len() || r != self.routes.len()
    }

    /// Versions of held resources of a type, for delta `initial_resource_versions`.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn v<T>(m: &BTreeMap<String, Held<T>>) -> HashMap<String, String> {
            m.iter()
                .map(|(k, h)| (k.clone(), h.version.clone()))
                .collect()
        }
        match type_url {
            CLUSTER => v(&self.clusters),
            ENDPOINT => v(&self.endpoints),
            LISTENER => v(&self.listeners),
            ROUTE => v(&self.routes),
            _ => HashMap::new(),
        }
    }

    /// Whether the first complete configuration is here: CDS and LDS ACKed once, and every
    /// EDS and RDS resource they reference has arrived.
    pub fn synced(&self) -> bool {
        self.cds_acked
            && self.lds_acked
            && self
                .wanted_endpoints()
                .iter()
                .all(|n| self.endpoints.contains_key(n))
            && self
                .wanted_routes()
                .iter()
                .all(|n| self.routes.contains_key(n))
    }

    /// Builds the next whole snapshot.
    pub fn snapshot(&mut self) -> Snapshot {
        self.snapshot_version += 1;
        let policy = self
            .listeners
            .values()
            .find_map(|l| l.value.outbound_traffic_policy)
            .unwrap_or(OutboundTrafficPolicy::AllowAny);
        Snapshot::new(
            self.snapshot_version,
            self.listeners
                .iter()
                .map(|(k, h)| (k.clone(), Arc::new(h.value.listener.clone())))
                .collect(),
            self.routes
                .iter()
                .map(|(k, h)| (k.clone(), h.value.clone()))
                .collect(),
            self.clusters
                .iter()
                .map(|(k, h)| (k.clone(), h.value.clone()))
                .collect(),
            self.endpoints
                .iter()
                .map(|(k, h)| (k.clone(), h.value.clone()))
                .collect(),
            self.name_table
                .as_ref()
                .map(|h| h.value.clone())
                .unwrap_or_default(),
            policy,
            self.type_versions.clone(),
        )
    }
}

fn remove<T>(map: &mut BTreeMap<String, Held<T>>, removed: &[String], out: &mut Applied) {
    for n in removed {
        if map.remove(n).is_some() {
            out.changed = true;
        }
    }
}
