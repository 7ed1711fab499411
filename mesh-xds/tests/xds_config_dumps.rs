//! Every real istiod config dump under testdata/istio translates (the legacy v2 one is
//! refused clearly); counts are checked against the files.

use std::path::PathBuf;

use mesh_xds::check::{CheckReport, check};
use mesh_xds::dump::{CLUSTER, ConfigDump, ENDPOINT, LISTENER, Origin, ROUTE, SECRET};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/istio")
        .join(name)
}

fn load(name: &str) -> Option<(ConfigDump, CheckReport)> {
    // The real istiod output lives in the repository (testdata/istio); a missing file is a
    // broken checkout, not a reason to skip.
    let p = data(name);
    let d = ConfigDump::load(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = check(&d);
    println!("{name}\n{r}");
    Some((d, r))
}

fn count(d: &ConfigDump, t: &str, o: Origin) -> usize {
    d.of_type(t).filter(|r| r.origin == o).count()
}

#[test]
fn deathstarbench_every_resource_translates() {
    let Some((d, r)) = load("deathstarbench-geo-istio1.18_config_dump.json") else {
        return;
    };
    assert_eq!(r.rejected(), 0, "{r}");
    assert_eq!(
        d.node_id.as_deref(),
        Some("sidecar~172.16.188.31~geo-5c54dcd5bd-z5ghf.hr2~hr2.svc.cluster.local")
    );
    // 142 dynamic listeners: 140 active, and two refused attempts at virtualInbound (the
    // dumping Envoy's Lua validation; mesh does not act on Lua and accepts them).
    assert_eq!(count(&d, LISTENER, Origin::Dynamic), 140);
    assert_eq!(count(&d, LISTENER, Origin::Failed), 2);
    assert_eq!(count(&d, LISTENER, Origin::Static), 2);
    assert_eq!(count(&d, CLUSTER, Origin::Dynamic), 138);
    assert_eq!(count(&d, CLUSTER, Origin::Static), 5);
    assert_eq!(count(&d, ROUTE, Origin::Dynamic), 90);
    assert_eq!(count(&d, ROUTE, Origin::Static), 2);
    assert_eq!(count(&d, ENDPOINT, Origin::Dynamic), 138);
    assert_eq!(count(&d, ENDPOINT, Origin::Static), 5);
    assert_eq!(count(&d, SECRET, Origin::Dynamic), 2);
    assert_eq!(r.of(LISTENER).accepted, 144);
    assert!(set_has_virtual_inbound(&d));
    assert_eq!(r.of(CLUSTER).accepted, 143);
    assert_eq!(r.of(ROUTE).accepted, 92);
    assert_eq!(r.of(ENDPOINT).accepted, 143);
    // Istio's own extensions are kept and reported, not rejected.
    for t in [
        "type.googleapis.com/stats.PluginConfig",
        "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
        "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    ] {
        assert!(d.opaque_types.contains_key(t), "{t} not recorded");
    }
    let lis = r.of(LISTENER).ignored_extensions;
    assert!(
        lis.contains_key("type.googleapis.com/stats.PluginConfig"),
        "{lis:?}"
    );
    assert!(lis.contains_key("type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"));
    assert!(!lis.contains_key(
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    ));
    // What a control plane replays: the dynamic resources only.
    let set = d.xds_resources();
    assert_eq!(set[LISTENER].len(), 141);
    assert_eq!(set[CLUSTER].len(), 138);
    assert_eq!(set[ROUTE].len(), 90);
    assert_eq!(set[ENDPOINT].len(), 138);
}

fn set_has_virtual_inbound(d: &ConfigDump) -> bool {
    d.xds_resources()[LISTENER].contains_key("virtualInbound")
}

#[test]
fn authz_yaml_dump_translates() {
    let Some((d, r)) = load("istioctl-authz_configdump.yaml") else {
        return;
    };
    assert_eq!(r.rejected(), 0, "{r}");
    assert_eq!(count(&d, LISTENER, Origin::Dynamic), 27);
    assert_eq!(count(&d, LISTENER, Origin::Static), 2);
    let lis = r.of(LISTENER).ignored_extensions;
    // The filters mesh enforces (RBAC, ext_authz, fault) are acted on, not ignored ...
    for acted in [
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    ] {
        assert!(
            !lis.contains_key(acted),
            "{acted} reported ignored: {lis:?}"
        );
        assert!(mesh_xds::extensions::is_acted_on(acted), "{acted}");
    }
    // ... while the ones it does not act on are still reported.
    for ignored in [
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
    ] {
        assert!(lis.contains_key(ignored), "{ignored} not reported: {lis:?}");
    }
}

#[test]
fn endpoint_dump_translates() {
    let Some((d, r)) = load("istioctl-endpoint_configdump.json") else {
        return;
    };
    assert_eq!(r.rejected(), 0, "{r}");
    assert_eq!(count(&d, ENDPOINT, Origin::Dynamic), 32);
    assert_eq!(count(&d, ENDPOINT, Origin::Static), 5);
    assert_eq!(r.of(ENDPOINT).accepted, 37);
}

#[test]
fn waypoint_all_sections_dump_translates() {
    let Some((d, r)) = load("istioctl-proxyconfig_config_dump.json") else {
        return;
    };
    assert_eq!(r.rejected(), 0, "{r}");
    assert_eq!(d.of_type(CLUSTER).count(), 3);
    assert_eq!(d.of_type(ENDPOINT).count(), 2);
    assert_eq!(d.of_type(LISTENER).count(), 2);
    assert_eq!(d.of_type(ROUTE).count(), 1);
    assert_eq!(d.of_type(SECRET).count(), 2);
    assert!(
        d.node_id
            .as_deref()
            .unwrap_or_default()
            .starts_with("waypoint~")
    );
}

#[test]
fn describe_and_secret_dumps_translate() {
    let Some((d, r)) = load("istioctl-describe_http_config.json") else {
        return;
    };
    assert_eq!(r.rejected(), 0, "{r}");
    assert_eq!(r.of(ROUTE).accepted, 1);
    assert_eq!(r.of(CLUSTER).accepted, 1);
    assert_eq!(d.resources.len(), 2);
    let Some((d, r)) = load("istioctl-secret-istio_config_dump.json") else {
        return;
    };
    assert_eq!(r.rejected(), 0, "{r}");
    assert_eq!(count(&d, SECRET, Origin::Dynamic), 2);
    assert_eq!(count(&d, SECRET, Origin::Warming), 1);
}

#[test]
fn legacy_v2_dump_is_refused_with_a_clear_error() {
    let Some((d, r)) = load("legacy-istio1.4_productpage-v1-c7765c886-v99jb.json") else {
        return;
    };
    assert_eq!(r.accepted(), 0, "{r}");
    // 18 clusters, 7 listeners, 6 route configs, all envoy.api.v2.
    assert_eq!(r.of(CLUSTER).rejected.len(), 18);
    assert_eq!(r.of(LISTENER).rejected.len(), 7);
    assert_eq!(r.of(ROUTE).rejected.len(), 6);
    assert!(
        d.rejected
            .iter()
            .all(|x| x.reason.contains("legacy xDS v2 resource"))
    );
}
