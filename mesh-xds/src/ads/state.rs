//! The resources the client has accepted, per type, and the snapshot built from them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

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

use super::retained::ConfigDumpSource;
use super::types::{CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};
use crate::istio_proto;
use crate::translate::{self, TranslateError, TranslatedListener, from_any};

/// One accepted resource.
#[derive(Debug)]
pub(crate) struct Held<T> {
    pub version: String,
    pub value: Arc<T>,
}

impl<T> Clone for Held<T> {
    fn clone(&self) -> Self {
        Held {
            version: self.version.clone(),
            value: self.value.clone(),
        }
    }
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

/// A cluster or listener version waiting for its EDS / RDS resource (Envoy's warming).
#[derive(Debug)]
pub(crate) struct Warming<T> {
    /// The version that warms (a newer one restarts warming).
    pub value: Arc<T>,
    /// When `initial_fetch_timeout` expires and it is used without its dependency.
    pub deadline: Instant,
}

/// Everything accepted so far.
///
/// `clusters` and `listeners` are what the client holds (ACKed, reported in delta
/// `initial_resource_versions`, subscribed for); `active_clusters` and `active_listeners` are
/// the versions the published snapshot uses. A new or changed cluster becomes active once its
/// `ClusterLoadAssignment` is held, a listener once its `RouteConfiguration` is, or either when
/// `initial_fetch_timeout` expires; until then the previous version (if any) keeps serving.
#[derive(Debug, Default)]
pub(crate) struct XdsState {
    pub clusters: BTreeMap<String, Held<Cluster>>,
    pub endpoints: BTreeMap<String, Held<EndpointSet>>,
    pub listeners: BTreeMap<String, Held<TranslatedListener>>,
    pub active_clusters: BTreeMap<String, Held<Cluster>>,
    pub active_listeners: BTreeMap<String, Held<TranslatedListener>>,
    pub warming_clusters: BTreeMap<String, Warming<Cluster>>,
    pub warming_listeners: BTreeMap<String, Warming<TranslatedListener>>,
    /// How long a warming cluster or listener waits for its dependency.
    pub initial_fetch_timeout: Duration,
    pub routes: BTreeMap<String, Held<RouteConfig>>,
    pub name_table: Option<Held<NameTable>>,
    /// Last fully accepted version per type URL.
    pub type_versions: BTreeMap<String, String>,
    pub cds_acked: bool,
    pub lds_acked: bool,
    pub snapshot_version: u64,
    /// The accepted raw resources, kept only for `/config_dump`.
    pub retained: Option<ConfigDumpSource>,
}

/// Where accepted raw resources go when `/config_dump` is on: the store and the type URL.
type Keep<'a> = Option<(&'a ConfigDumpSource, &'static str)>;

#[allow(clippy::too_many_arguments)]
fn apply_typed<P, T>(
    map: &mut BTreeMap<String, Held<T>>,
    incoming: &[Incoming],
    kind: &str,
    name_of: fn(&P) -> &str,
    translate: fn(&P) -> Result<T, TranslateError>,
    out: &mut Applied,
    keep: Keep<'_>,
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
                if let Some((store, type_url)) = keep {
                    store.keep(type_url, &name, &r.version, any);
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
        let retained = self.retained.clone();
        let keep = retained.as_ref();
        match type_url {
            CLUSTER => {
                apply_typed::<PbCluster, _>(
                    &mut self.clusters,
                    incoming,
                    "Cluster",
                    |c| &c.name,
                    translate::translate_cluster,
                    &mut out,
                    keep.map(|k| (k, CLUSTER)),
                );
                remove(&mut self.clusters, removed, &mut out);
                if let Some(k) = keep.filter(|_| !removed.is_empty()) {
                    k.retain_only(CLUSTER, |n| self.clusters.contains_key(n));
                }
            }
            ENDPOINT => {
                apply_typed::<ClusterLoadAssignment, _>(
                    &mut self.endpoints,
                    incoming,
                    "ClusterLoadAssignment",
                    |c| &c.cluster_name,
                    translate::translate_endpoint,
                    &mut out,
                    keep.map(|k| (k, ENDPOINT)),
                );
                remove(&mut self.endpoints, removed, &mut out);
                if let Some(k) = keep.filter(|_| !removed.is_empty()) {
                    k.retain_only(ENDPOINT, |n| self.endpoints.contains_key(n));
                }
            }
            LISTENER => {
                apply_typed::<PbListener, _>(
                    &mut self.listeners,
                    incoming,
                    "Listener",
                    |l| &l.name,
                    translate::translate_listener,
                    &mut out,
                    keep.map(|k| (k, LISTENER)),
                );
                remove(&mut self.listeners, removed, &mut out);
                if let Some(k) = keep.filter(|_| !removed.is_empty()) {
                    k.retain_only(LISTENER, |n| self.listeners.contains_key(n));
                }
            }
            ROUTE => {
                apply_typed::<RouteConfiguration, _>(
                    &mut self.routes,
                    incoming,
                    "RouteConfiguration",
                    |r| &r.name,
                    translate::translate_route,
                    &mut out,
                    keep.map(|k| (k, ROUTE)),
                );
                remove(&mut self.routes, removed, &mut out);
                if let Some(k) = keep.filter(|_| !removed.is_empty()) {
                    k.retain_only(ROUTE, |n| self.routes.contains_key(n));
                }
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

    /// The EDS names of held EDS clusters and of the active versions still serving.
    pub fn wanted_endpoints(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .chain(self.active_clusters.values())
            .filter_map(|c| c.value.eds_service_name().map(str::to_owned))
            .collect()
    }

    /// The route configuration names of held HTTP listeners and of the active versions
    /// still serving.
    pub fn wanted_routes(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .chain(self.active_listeners.values())
            .filter_map(|l| route_config_of(&l.value))
            .collect()
    }

    /// Moves warmed (or timed-out) clusters and listeners into the active set and drops
    /// active ones no longer held; returns whether the active set changed.
    pub fn promote(&mut self, now: Instant) -> bool {
        let timeout = self.initial_fetch_timeout;
        let endpoints = &self.endpoints;
        let c = promote_kind(
            &self.clusters,
            &mut self.active_clusters,
            &mut self.warming_clusters,
            now,
            timeout,
            |c| {
                c.eds_service_name()
                    .is_none_or(|s| endpoints.contains_key(s))
            },
            "cluster",
        );
        let routes = &self.routes;
        let l = promote_kind(
            &self.listeners,
            &mut self.active_listeners,
            &mut self.warming_listeners,
            now,
            timeout,
            |l| route_config_of(l).is_none_or(|r| routes.contains_key(&r)),
            "listener",
        );
        c || l
    }

    /// The earliest `initial_fetch_timeout` expiry among warming resources.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.warming_clusters
            .values()
            .map(|w| w.deadline)
            .chain(self.warming_listeners.values().map(|w| w.deadline))
            .min()
    }

    /// How many clusters and listeners are warming.
    pub fn warming(&self) -> usize {
        self.warming_clusters.len() + self.warming_listeners.len()
    }

    /// Drops endpoints and routes nobody references any more; returns whether any went.
    pub fn prune(&mut self) -> bool {
        let eps = self.wanted_endpoints();
        let rts = self.wanted_routes();
        let (e, r) = (self.endpoints.len(), self.routes.len());
        self.endpoints.retain(|k, _| eps.contains(k));
        self.routes.retain(|k, _| rts.contains(k));
        if let Some(k) = &self.retained {
            k.retain_only(ENDPOINT, |n| eps.contains(n));
            k.retain_only(ROUTE, |n| rts.contains(n));
        }
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
    /// held cluster and listener has warmed (its EDS / RDS resource arrived, or its
    /// `initial_fetch_timeout` expired).
    pub fn synced(&self) -> bool {
        self.cds_acked
            && self.lds_acked
            && all_active(&self.clusters, &self.active_clusters)
            && all_active(&self.listeners, &self.active_listeners)
    }

    /// Builds the next whole snapshot.
    pub fn snapshot(&mut self) -> Snapshot {
        self.snapshot_version += 1;
        let policy = self
            .active_listeners
            .values()
            .find_map(|l| l.value.outbound_traffic_policy)
            .unwrap_or(OutboundTrafficPolicy::AllowAny);
        Snapshot::new(
            self.snapshot_version,
            self.active_listeners
                .iter()
                .map(|(k, h)| (k.clone(), Arc::new(h.value.listener.clone()))),
            self.routes
                .iter()
                .map(|(k, h)| (k.clone(), h.value.clone())),
            self.active_clusters
                .iter()
                .map(|(k, h)| (k.clone(), h.value.clone())),
            self.endpoints
                .iter()
                .map(|(k, h)| (k.clone(), h.value.clone())),
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

/// The RDS name an HTTP outbound listener depends on.
fn route_config_of(l: &TranslatedListener) -> Option<String> {
    match &l.listener.kind {
        ListenerKind::Outbound(OutboundProtocol::Http { route_config }) => {
            Some(route_config.clone())
        }
        _ => None,
    }
}

fn all_active<T>(held: &BTreeMap<String, Held<T>>, active: &BTreeMap<String, Held<T>>) -> bool {
    held.iter().all(|(k, h)| {
        active
            .get(k)
            .is_some_and(|a| Arc::ptr_eq(&a.value, &h.value))
    })
}

/// One kind's warming step: held versions whose dependency is there (or whose timeout
/// expired) become active; active ones no longer held go.
fn promote_kind<T>(
    held: &BTreeMap<String, Held<T>>,
    active: &mut BTreeMap<String, Held<T>>,
    warming: &mut BTreeMap<String, Warming<T>>,
    now: Instant,
    timeout: Duration,
    ready: impl Fn(&T) -> bool,
    kind: &str,
) -> bool {
    let mut changed = false;
    let before = active.len();
    active.retain(|k, _| held.contains_key(k));
    warming.retain(|k, _| held.contains_key(k));
    changed |= before != active.len();
    for (name, h) in held {
        if active
            .get(name)
            .is_some_and(|a| Arc::ptr_eq(&a.value, &h.value))
        {
            warming.remove(name);
            continue;
        }
        let w = match warming.get(name) {
            Some(w) if Arc::ptr_eq(&w.value, &h.value) => w,
            _ => {
                warming.insert(
                    name.clone(),
                    Warming {
                        value: h.value.clone(),
                        deadline: now + timeout,
                    },
                );
                &warming[name]
            }
        };
        let timed_out = now >= w.deadline;
        if ready(&h.value) || timed_out {
            if timed_out && !ready(&h.value) {
                tracing::warn!(
                    kind,
                    name = %name,
                    timeout_ms = timeout.as_millis() as u64,
                    "initial fetch timeout: using the {kind} without its dependency"
                );
                metrics::counter!("mesh_xds_init_fetch_timeout_total", "kind" => kind.to_owned())
                    .increment(1);
            }
            warming.remove(name);
            active.insert(name.clone(), h.clone());
            changed = true;
        } else {
            tracing::debug!(kind, name = %name, "warming");
        }
    }
    changed
}
