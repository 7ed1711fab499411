//! Debug views of the current configuration: Envoy-shaped `/config_dump`, `/clusters`,
//! `/server_info`, and pilot-agent's `/debug/ndsz` and `/debug/syncz`.

use std::time::Instant;

use mesh_core::identity::NodeIdentity;
use mesh_core::snapshot::Snapshot;
use serde_json::{Value, json};

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const NDS_TYPE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

fn version(s: &Snapshot, type_url: &str) -> String {
    s.xds_versions.get(type_url).cloned().unwrap_or_default()
}

fn sorted<'a, T>(m: impl Iterator<Item = (&'a String, T)>) -> Vec<(&'a String, T)> {
    let mut v: Vec<_> = m.collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// Envoy's `/config_dump` shape (`envoy.admin.v3.*ConfigDump`), naming every listener,
/// cluster and route configuration with the accepted xDS version. Resource bodies carry only
/// their names: mesh keeps compiled config, not the protos.
pub fn config_dump(s: &Snapshot, node: Option<&NodeIdentity>) -> Value {
    let node_json = node.map(|n| {
        json!({
            "id": n.node_id(),
            "cluster": format!("{}.{}", n.canonical_service(), n.namespace),
            "metadata": {
                "NAME": n.pod_name, "NAMESPACE": n.namespace, "CLUSTER_ID": n.cluster_id,
                "WORKLOAD_NAME": n.workload_name, "SERVICE_ACCOUNT": n.service_account,
                "LABELS": n.labels, "INSTANCE_IPS": n.instance_ip.to_string(),
            },
        })
    });
    let lv = version(s, LISTENER_TYPE);
    let cv = version(s, CLUSTER_TYPE);
    let rv = version(s, ROUTE_TYPE);
    let listeners: Vec<Value> = sorted(s.listeners.iter())
        .into_iter()
        .map(|(name, _)| json!({"name": name, "active_state": {"version_info": lv, "listener": {"@type": LISTENER_TYPE, "name": name}}}))
        .collect();
    let clusters: Vec<Value> = sorted(s.clusters.iter())
        .into_iter()
        .map(|(name, _)| json!({"version_info": cv, "cluster": {"@type": CLUSTER_TYPE, "name": name}}))
        .collect();
    let routes: Vec<Value> = sorted(s.route_configs.iter())
        .into_iter()
        .map(|(name, _)| json!({"version_info": rv, "route_config": {"@type": ROUTE_TYPE, "name": name}}))
        .collect();
    json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {"node": node_json}},
        {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "version_info": cv, "dynamic_active_clusters": clusters},
        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "version_info": lv, "dynamic_listeners": listeners},
        {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes},
    ]})
}

/// pilot-agent's `/debug/ndsz`: the NDS table as JSON; `None` when there is no table.
pub fn ndsz(s: &Snapshot) -> Option<Value> {
    if s.name_table.table.is_empty() {
        return None;
    }
    let table: serde_json::Map<String, Value> = sorted(s.name_table.table.iter())
        .into_iter()
        .map(|(host, info)| {
            let ips: Vec<String> = info.ips.iter().map(ToString::to_string).collect();
            let mut v = json!({"ips": ips, "registry": info.registry});
            if !info.shortname.is_empty() {
                v["shortname"] = json!(info.shortname);
                v["namespace"] = json!(info.namespace);
            }
            if !info.alt_hosts.is_empty() {
                v["altHosts"] = json!(info.alt_hosts);
            }
            (host.clone(), v)
        })
        .collect();
    Some(json!({"table": table}))
}

/// `/debug/syncz`: per xDS type, the accepted version and resource count.
pub fn syncz(s: &Snapshot, synced: bool) -> Value {
    let count = |t: &str| match t {
        LISTENER_TYPE => Some(s.listeners.len()),
        CLUSTER_TYPE => Some(s.clusters.len()),
        ROUTE_TYPE => Some(s.route_configs.len()),
        ENDPOINT_TYPE => Some(s.endpoints.len()),
        NDS_TYPE => Some(s.name_table.table.len()),
        _ => None,
    };
    let types: Vec<Value> = [
        LISTENER_TYPE,
        CLUSTER_TYPE,
        ROUTE_TYPE,
        ENDPOINT_TYPE,
        SECRET_TYPE,
        NDS_TYPE,
    ]
    .iter()
    .map(|t| {
        json!({
            "type_url": t,
            "version": s.xds_versions.get(*t),
            "acked": s.xds_versions.contains_key(*t),
            "resources": count(t),
        })
    })
    .collect();
    json!({"synced": synced, "snapshot_version": s.version, "types": types})
}

/// Envoy's `/clusters` text: `<cluster>::<host>::<stat>::<value>` lines per endpoint.
pub fn clusters_text(s: &Snapshot) -> String {
    let mut out = String::new();
    for (name, cluster) in sorted(s.clusters.iter()) {
        out.push_str(&format!("{name}::observability_name::{name}\n"));
        if let Some((_, Some(eps))) = s.cluster(&cluster.name) {
            for ep in &eps.endpoints {
                let a = ep.address;
                out.push_str(&format!("{name}::{a}::health_flags::healthy\n"));
                out.push_str(&format!("{name}::{a}::weight::{}\n", ep.weight));
            }
        }
    }
    out
}

/// Envoy's `/server_info` (the fields tools read).
pub fn server_info(node: Option<&NodeIdentity>, started: Instant, live: bool) -> Value {
    let up = format!("{}s", started.elapsed().as_secs());
    json!({
        "version": concat!("mesh/", env!("CARGO_PKG_VERSION")),
        "state": if live { "LIVE" } else { "DRAINING" },
        "uptime_current_epoch": up,
        "uptime_all_epochs": up,
        "hot_restart_version": "disabled",
        "node": node.map(|n| json!({"id": n.node_id()})),
    })
}
