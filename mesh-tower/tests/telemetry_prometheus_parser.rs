//! mesh's 15020 and 15090 output read by a real Prometheus parser (Python
//! `prometheus_client.parser.text_string_to_metric_families`), and `istio_requests_total`'s
//! label names, order and values checked against Istio's own expectation templates
//! (`testdata/istio/istio-proxy-metric_{server,client}_request_total.yaml.tmpl`).
//!
//! The parser is installed from PyPI into `<repo>/.envoy/prom-venv` (git-ignored). Outside CI
//! the test is skipped with a printed reason when it is not installed; with `CI` set it is
//! installed, and a failed install fails the test.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh_core::cluster::{Cluster, ServiceMetadata};
use mesh_core::peer_metadata::{
    PEER_METADATA_HEADER, PEER_METADATA_ID_HEADER, PeerMetadataHeaders,
};
use mesh_core::readiness::Readiness;
use mesh_core::telemetry::{
    DestinationService, Reporter, RequestOutcome, WorkloadLabels, request_labels,
};
use mesh_core::{CertStore, NodeIdentity, Snapshot, SnapshotCell};
use mesh_tower::inbound::{self, InboundConfig, RequestBody};
use mesh_tower::status::{StatusContext, StatusPort, serve_status};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's python with `prometheus_client`, installing it under CI.
fn parser_python() -> Option<PathBuf> {
    let venv = repo().join(".envoy/prom-venv");
    let python = venv.join("bin/python");
    let has = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import prometheus_client.parser"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.is_file() && has(&python) {
        return Some(python);
    }
    if std::env::var_os("CI").is_none_or(|v| v.is_empty()) {
        eprintln!(
            "skipping: Python prometheus_client not installed in {} (python3 -m venv {0} && {0}/bin/pip install prometheus-client, or set CI=true)",
            venv.display()
        );
        return None;
    }
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "prometheus-client"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok && has(&python),
        "installing prometheus-client into {} failed",
        venv.display()
    );
    Some(python)
}

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": fam.name, "type": fam.type, "samples": [
        {"name": s.name, "labels": [[k, v] for k, v in s.labels.items()], "value": s.value}
        for s in fam.samples]})
print(json.dumps(out))
"#;

/// Parses exposition text with the real parser; panics with its error if it rejects it.
fn parse(python: &PathBuf, text: &str) -> Vec<Value> {
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the output: {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(v) => v,
        other => panic!("unexpected parser output {other}"),
    }
}

/// `(name, Some(value))` pairs from an Istio template; templated values are `None`.
fn template_labels(file: &str) -> Vec<(String, Option<String>)> {
    let path = repo().join("testdata/istio").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    let mut in_labels = false;
    for line in text.lines() {
        let t = line.trim();
        if t == "label:" {
            in_labels = true;
            continue;
        }
        if !in_labels {
            continue;
        }
        if let Some(name) = t.strip_prefix("- name: ") {
            out.push((name.to_owned(), None));
        } else if let Some(v) = t.strip_prefix("value: ")
            && let Some(last) = out.last_mut()
            && last.1.is_none()
            && !v.contains("{{")
        {
            last.1 = Some(v.trim_matches('"').to_owned());
        } else if t.starts_with("{{") {
            // A templated value: leave it unchecked.
            if let Some(last) = out.last_mut() {
                last.1 = Some(String::from("\u{0}templated"));
            }
        }
    }
    out
}

fn client_node() -> NodeIdentity {
    let mut n = NodeIdentity::new(
        "productpage-v1-6b746f74dc-9stvs",
        "default",
        "10.0.0.1".parse().unwrap(),
        "bookinfo-productpage",
    );
    n.labels.insert("app".into(), "productpage".into());
    n.labels.insert("version".into(), "v1".into());
    n.labels.insert(
        "service.istio.io/canonical-name".into(),
        "productpage-v1".into(),
    );
    n.labels.insert(
        "service.istio.io/canonical-revision".into(),
        "version-1".into(),
    );
    n.cluster_id = "client-cluster".into();
    n
}

fn server_node() -> NodeIdentity {
    let mut n = NodeIdentity::new(
        "ratings-v1-5f9699cfdf-4xzqr",
        "default",
        "10.0.0.2".parse().unwrap(),
        "bookinfo-ratings",
    );
    n.labels.insert("app".into(), "ratings".into());
    n.labels.insert("version".into(), "v1".into());
    n.labels
        .insert("service.istio.io/canonical-name".into(), "ratings".into());
    n.labels.insert(
        "service.istio.io/canonical-revision".into(),
        "version-1".into(),
    );
    n.cluster_id = "server-cluster".into();
    n
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "server.default.svc.cluster.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        WAIT,
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn ok(_req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn find_sample<'a>(
    families: &'a [Value],
    family: &str,
    must: &[(&str, &str)],
) -> Option<&'a Value> {
    families
        .iter()
        .filter(|f| f["name"] == family)
        .flat_map(|f| f["samples"].as_array().into_iter().flatten())
        .find(|s| {
            let labels = s["labels"].as_array().unwrap();
            must.iter()
                .all(|(k, v)| labels.iter().any(|l| l[0] == *k && l[1] == *v))
        })
}

fn check_against_template(sample: &Value, template: &[(String, Option<String>)]) {
    let labels: Vec<(String, String)> = sample["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l[0].as_str().unwrap().to_owned(),
                l[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<&str> = template.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, want, "label names and order");
    for ((k, got), (_, want)) in labels.iter().zip(template) {
        if let Some(want) = want
            && !want.starts_with('\u{0}')
        {
            assert_eq!(got, want, "value of {k}");
        }
    }
}

#[tokio::test]
async fn status_ports_parse_and_istio_requests_total_matches_istios_templates() {
    let Some(python) = parser_python() else {
        return;
    };
    let metrics = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");

    // The destination side through real inbound traffic carrying the client's peer metadata.
    let cell = SnapshotCell::new();
    let mut snapshot = Snapshot::default();
    let mut cluster = Cluster::eds("inbound|9301||");
    cluster.service = Some(ServiceMetadata {
        host: "server.default.svc.cluster.local".into(),
        name: "server".into(),
        namespace: "default".into(),
    });
    snapshot
        .clusters
        .insert(cluster.name.clone(), Arc::new(cluster));
    cell.publish(snapshot, true);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    let config = InboundConfig {
        port: 9301,
        mode: None,
        node: server_node(),
        header_read_timeout: None,
        idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
        drain: None,
        ext_authz: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(inbound::serve(
        listener,
        tower::service_fn(ok),
        cell.clone(),
        CertStore::new(),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let sent = PeerMetadataHeaders::for_node(&client_node());
    for _ in 0..3 {
        let (status, _) = get(
            app_addr,
            "/ratings/0",
            &[
                (PEER_METADATA_ID_HEADER, &sent.id),
                (PEER_METADATA_HEADER, &sent.metadata),
            ],
        )
        .await;
        assert_eq!(status, 200);
    }
    // The source side as the outbound stack registers it (same label builder, reporter=source).
    let source =
        mesh_core::peer_metadata::PeerMetadata::from_node(&client_node()).workload_labels();
    let mut destination =
        mesh_core::peer_metadata::PeerMetadata::from_node(&server_node()).workload_labels();
    destination.principal = WorkloadLabels::default().principal;
    mesh_tower::telemetry::RequestMetrics::register(request_labels(
        Reporter::Source,
        &source,
        &destination,
        &DestinationService {
            host: "server.default.svc.cluster.local".into(),
            name: "server".into(),
            namespace: "default".into(),
        },
        &RequestOutcome {
            protocol: "http",
            response_code: 200,
            grpc_status: String::new(),
            response_flags: "-",
            connection_security_policy: "unknown",
        },
    ))
    .record(Duration::from_millis(3), 0, 2);

    // 15020 and 15090.
    let mut ctx = StatusContext::new(Readiness::new(cell, None));
    ctx.metrics = Some(metrics);
    let ctx = Arc::new(ctx);
    let mut outputs = Vec::new();
    for port in [StatusPort::Agent, StatusPort::Prometheus] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_status(l, port, ctx.clone(), std::future::pending()));
        let (status, text) = get(addr, "/stats/prometheus", &[]).await;
        assert_eq!(status, 200);
        outputs.push((port, text));
    }
    drop(stop);

    let server_template = template_labels("istio-proxy-metric_server_request_total.yaml.tmpl");
    let client_template = template_labels("istio-proxy-metric_client_request_total.yaml.tmpl");
    assert_eq!(server_template.len(), 25);
    for (port, text) in &outputs {
        let families = parse(&python, text);
        assert!(!families.is_empty(), "{port:?}: no families");
        for f in &families {
            let name = f["name"].as_str().unwrap();
            assert!(
                !f["samples"].as_array().unwrap().is_empty() || f["type"] != "unknown",
                "{port:?}: {name}"
            );
        }
        let dest = find_sample(
            &families,
            "istio_requests",
            &[
                ("reporter", "destination"),
                ("destination_workload", "ratings-v1"),
                ("source_workload", "productpage-v1"),
            ],
        )
        .unwrap_or_else(|| panic!("{port:?}: no reporter=destination series\n{text}"));
        assert_eq!(dest["name"], "istio_requests_total");
        assert!(dest["value"].as_f64().unwrap() >= 3.0);
        check_against_template(dest, &server_template);
        let src = find_sample(
            &families,
            "istio_requests",
            &[
                ("reporter", "source"),
                ("destination_workload", "ratings-v1"),
                ("source_workload", "productpage-v1"),
            ],
        )
        .unwrap_or_else(|| panic!("{port:?}: no reporter=source series"));
        check_against_template(src, &client_template);
        // Histograms come out as histograms with Envoy's buckets.
        let hist = families
            .iter()
            .find(|f| f["name"] == "istio_request_duration_milliseconds")
            .expect("duration histogram");
        assert_eq!(hist["type"], "histogram");
        let le: Vec<&str> = hist["samples"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == "istio_request_duration_milliseconds_bucket")
            .filter_map(|s| {
                s["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|l| l[0] == "le")
                    .and_then(|l| l[1].as_str())
            })
            .take(20)
            .collect();
        assert_eq!(le[..3], ["0.5", "1", "5"], "{le:?}");
    }
}
