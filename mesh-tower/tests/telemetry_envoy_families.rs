//! Every `envoy_*` family mesh serves on 15090 exists in a real Envoy 1.40's
//! `/stats/prometheus` with the same label names, after the same kind of traffic (HTTP
//! requests through an inbound listener whose HTTP connection manager has istiod's
//! `inbound_0.0.0.0_<port>;` stat prefix), Envoy running with an Istio sidecar's stats naming:
//! the bootstrap `stats_config` of testdata/istio/bootstrap_default_golden.json (Istio's
//! `stats_tags`, `use_all_default_tags: false`; its inclusion list left out so every family
//! shows) and `alt_stat_name: "<cluster>;"` as istiod sets it.
//!
//! Envoy is the binary `scripts/install-envoy.sh` installs into `<repo>/.envoy/venv` (or
//! `ENVOY_BIN`); outside CI the test is skipped with a printed reason when it is absent, in CI it
//! fails.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh_core::readiness::Readiness;
use mesh_core::{CertStore, NodeIdentity, SnapshotCell};
use mesh_tower::inbound::{self, InboundConfig};
use mesh_tower::status::{StatusContext, StatusPort, serve_status};
use tokio::net::{TcpListener, TcpStream};

#[path = "support_outbound/mod.rs"]
mod support_outbound;

const WAIT: Duration = Duration::from_secs(20);

fn envoy_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.envoy/venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        // CI runs scripts/test.sh, which installs Envoy and sets ENVOY_BIN: never skip there.
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty()),
            "CI: Envoy 1.40 not installed (scripts/test.sh installs it and sets ENVOY_BIN)"
        );
        eprintln!("skipping: Envoy 1.40 not installed (run scripts/install-envoy.sh)");
    }
    found
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "reviews:9080")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn ok<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// Family name → label names of its samples (histogram `le` and suffixes folded away).
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(t)) = (it.next(), it.next()) {
                types.insert(n.to_owned(), t.to_owned());
                out.entry(n.to_owned()).or_default();
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match line.find('{') {
            Some(i) => (
                &line[..i],
                &line[i + 1..line.rfind('}').unwrap_or(line.len())],
            ),
            None => (line.split(' ').next().unwrap_or(""), ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        let set = out.entry(family.to_owned()).or_default();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, _)) = pair.split_once('=')
                && k != "le"
            {
                set.insert(k.trim().to_owned());
            }
        }
    }
    out
}

/// Istio's bootstrap `stats_config` without its `stats_matcher` inclusion list.
fn istio_stats_config() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/istio/bootstrap_default_golden.json");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("golden bootstrap"))
            .expect("golden bootstrap is JSON");
    let mut config = golden["stats_config"].clone();
    assert_eq!(config["use_all_default_tags"], false, "{config}");
    config
        .as_object_mut()
        .expect("stats_config is an object")
        .remove("stats_matcher");
    config
}

#[tokio::test]
async fn every_envoy_family_mesh_emits_exists_in_real_envoy_with_the_same_labels() {
    let Some(envoy) = envoy_binary() else { return };
    let metrics = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");

    // An upstream app for Envoy, and mesh's inbound serving the same kind of app.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = app.accept().await else {
                return;
            };
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(ok)),
            );
        }
    });
    let mesh_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mesh_addr = mesh_listener.local_addr().unwrap();
    let node = NodeIdentity::new(
        "fam-v1-7f99c7d8b5-abcde",
        "default",
        "10.1.2.3".parse().unwrap(),
        "fam",
    );
    let config = InboundConfig {
        port: 9401,
        mode: None,
        node,
        header_read_timeout: None,
        idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
        drain: None,
        ext_authz: None,
    };
    tokio::spawn(inbound::serve(
        mesh_listener,
        tower::service_fn(ok),
        SnapshotCell::new(),
        CertStore::new(),
        config,
        std::future::pending(),
    ));

    let admin_port = free_port();
    let listen_port = free_port();
    let dir = std::env::temp_dir().join(format!("mesh-envoy-families-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bootstrap = serde_json::json!({
        "stats_config": istio_stats_config(),
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "virtualInbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "inbound_0.0.0.0_9401;",
                        "route_config": {"name": "inbound|9401||", "virtual_hosts": [{"name": "inbound|http|9401", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|9401||"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                    }
                }]}]
            }],
            "clusters": [{
                "name": "inbound|9401||",
                "alt_stat_name": "inbound|9401||;",
                "type": "STATIC",
                "connect_timeout": "1s",
                "outlier_detection": {"consecutive_5xx": 5},
                "load_assignment": {"cluster_name": "inbound|9401||", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": app_addr.port()}}}}]}]}
            }]
        }
    });
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let _envoy = Envoy(
        Command::new(&envoy)
            .arg("-c")
            .arg(&path)
            .args([
                "--base-id",
                &listen_port.to_string(),
                "--log-level",
                "error",
                "--disable-hot-restart",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start envoy"),
    );
    let envoy_addr: SocketAddr = ([127, 0, 0, 1], listen_port).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();

    // Same traffic through both.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if get(envoy_addr, "/").await.is_some_and(|(s, _)| s == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Envoy did not serve in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        assert_eq!(get(envoy_addr, "/").await.unwrap().0, 200);
        assert_eq!(get(mesh_addr, "/").await.unwrap().0, 200);
    }
    // Outbound through mesh to the same app over a cluster with outlier detection (as
    // Envoy's cluster above): registers the cluster's families, outlier and connect-failure
    // counters included.
    let cluster = "outbound|9401||fam.default.svc.cluster.local";
    let mut c = mesh_core::cluster::Cluster::eds(cluster);
    c.outlier_detection = Some(mesh_core::outlier::OutlierDetection::default());
    let vh = support_outbound::vhost(
        "fam:9401",
        &["fam", "fam:9080"],
        mesh_core::route::RouteAction::Cluster(cluster.into()),
        None,
    );
    let cell = SnapshotCell::new();
    cell.publish(
        support_outbound::snapshot(
            1,
            9080,
            vec![vh],
            vec![(c, vec![mesh_core::endpoint::Endpoint::new(app_addr)])],
            mesh_core::snapshot::OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    let out = mesh_tower::outbound::Outbound::new(cell, CertStore::new(), support_outbound::node());
    assert_eq!(out.get("http://fam:9080/").await.unwrap().status(), 200);
    // A plaintext connection refused by STRICT is not part of this traffic; the family
    // exists in Envoy regardless.

    let (status, envoy_text) = get(admin, "/stats/prometheus").await.expect("Envoy admin");
    assert_eq!(status, 200);
    let envoy_families = families(&envoy_text);

    let mut ctx = StatusContext::new(Readiness::new(SnapshotCell::new(), None));
    ctx.metrics = Some(metrics);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_status(
        l,
        StatusPort::Prometheus,
        Arc::new(ctx),
        std::future::pending(),
    ));
    let (_, mesh_text) = get(addr, "/stats/prometheus").await.unwrap();
    let mesh_families = families(&mesh_text);

    let ours: Vec<_> = mesh_families
        .iter()
        .filter(|(n, _)| n.starts_with("envoy_"))
        .collect();
    assert!(
        ours.len() >= 9,
        "mesh emitted too few envoy families: {ours:?}"
    );
    // The outbound cluster's families are among those compared.
    for family in [
        "envoy_cluster_upstream_cx_connect_fail",
        "envoy_cluster_upstream_cx_connect_timeout",
        "envoy_cluster_upstream_rq_pending_overflow",
        "envoy_cluster_upstream_rq_timeout",
        "envoy_cluster_upstream_rq_per_try_timeout",
        "envoy_cluster_outlier_detection_ejections_total",
        "envoy_cluster_outlier_detection_ejections_enforced_total",
        "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx",
        "envoy_cluster_outlier_detection_ejections_consecutive_5xx",
        "envoy_cluster_outlier_detection_ejections_overflow",
        "envoy_cluster_outlier_detection_ejections_detected_consecutive_5xx",
        "envoy_cluster_outlier_detection_ejections_detected_consecutive_gateway_failure",
        "envoy_cluster_outlier_detection_ejections_detected_consecutive_local_origin_failure",
        "envoy_cluster_outlier_detection_ejections_detected_success_rate",
        "envoy_cluster_outlier_detection_ejections_detected_failure_percentage",
        "envoy_cluster_outlier_detection_ejections_detected_local_origin_success_rate",
        "envoy_cluster_outlier_detection_ejections_enforced_local_origin_success_rate",
        "envoy_cluster_outlier_detection_ejections_detected_local_origin_failure_percentage",
        "envoy_cluster_outlier_detection_ejections_enforced_local_origin_failure_percentage",
    ] {
        assert!(mesh_families.contains_key(family), "{family} not emitted");
    }
    let mut problems = Vec::new();
    let compared = ours.len();
    for (name, labels) in ours {
        match envoy_families.get(name) {
            None => problems.push(format!("{name}: not in Envoy's output")),
            Some(theirs) if theirs != labels => {
                problems.push(format!("{name}: labels {labels:?}, Envoy has {theirs:?}"))
            }
            Some(_) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!(
        "compared {compared} envoy families with Envoy {}",
        envoy_families.len()
    );
}
