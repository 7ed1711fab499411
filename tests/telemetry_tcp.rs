//! A workload port declared TCP, end to end: the testkit control plane renders it into
//! `virtualInbound` as istiod does (TCP proxy chains only), mesh translates it, and the
//! server reports `istio_tcp_*` with `reporter="destination"` (label names and order as
//! Istio's own expectation template, testdata/istio/istio-proxy-metric_tcp_client_connection_open.yaml.tmpl)
//! instead of `istio_requests_total`, while still serving the app over HTTP.

use crate::support;

use std::collections::BTreeMap;

use mesh::parts::core::listener::InboundProtocol;
use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use support::mesh::{Echo, NS, Plane, WAIT, eventually, node, ready, spiffe, status_get};
use support::prometheus::istio_template;
use tokio::net::TcpListener;
use tokio::time::timeout;

/// `name{labels} value` lines of `family`, labels in exposition order.
fn samples(text: &str, family: &str) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(family)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_declared_port_reports_istio_tcp_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let model = MeshModel::default()
        .inbound_port(addr.port(), Protocol::Tcp)
        .service(
            ServiceSpec::new("ledger", NS, "10.96.0.61".parse().unwrap())
                .port(5432, Protocol::Http)
                .endpoint(EndpointSpec::new(addr).service_account("ledger")),
        );
    let plane = Plane::start(model).await;
    let mut server_node = node("ledger-v1-0", "ledger");
    server_node.workload_name = "tcp-ledger-v1".into();
    server_node.labels.insert("version".into(), "v1".into());
    let server = plane.builder(server_node).start().await.expect("starts");
    ready(&server).await;
    assert_eq!(
        server
            .snapshot()
            .inbound
            .as_ref()
            .map(|p| p.protocol_for(addr.port())),
        Some(InboundProtocol::Tcp)
    );
    let app = Echo::new("ledger");
    let serving = {
        let server = server.clone();
        let svc = app.service();
        tokio::spawn(async move { server.serve_on(listener, svc).await })
    };
    let client = plane.ready_mesh("teller").await;

    // Over mTLS (the client's outbound stack), several requests.
    let http = client.http_client();
    let url = "http://ledger.default.svc.cluster.local:5432/";
    eventually("a 200 from the TCP-declared port", || async {
        let r = http.get(url).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    for _ in 0..3 {
        let r = timeout(WAIT, http.get(url))
            .await
            .expect("bounded")
            .expect("response");
        assert_eq!(r.status(), 200);
    }
    assert!(app.hits() >= 4);

    // The server stops: its connections close and report their totals.
    server.shutdown();
    timeout(WAIT, serving)
        .await
        .expect("serve ended after shutdown")
        .expect("task")
        .expect("serve");

    let (status, text) = status_get(&client, StatusPort::Prometheus, "/stats/prometheus").await;
    assert_eq!(status, 200);
    let ours = |s: &(Vec<(String, String)>, f64)| {
        label(&s.0, "destination_workload") == Some("tcp-ledger-v1")
    };
    let family = |name: &str| -> Vec<(Vec<(String, String)>, f64)> {
        samples(&text, name).into_iter().filter(ours).collect()
    };
    let opened = family("istio_tcp_connections_opened_total");
    let closed = family("istio_tcp_connections_closed_total");
    let received = family("istio_tcp_received_bytes_total");
    let sent = family("istio_tcp_sent_bytes_total");
    for (name, f) in [
        ("opened", &opened),
        ("closed", &closed),
        ("received", &received),
        ("sent", &sent),
    ] {
        assert_eq!(f.len(), 1, "one {name} series: {f:?}");
    }
    assert!(opened[0].1 >= 1.0);
    assert_eq!(opened[0].1, closed[0].1, "every opened connection closed");
    assert!(received[0].1 > 0.0 && sent[0].1 > 0.0);

    // Label names and order as Istio's TCP template; values as the server sees them.
    let template = istio_template(
        "istio-proxy-metric_tcp_client_connection_open.yaml.tmpl",
        &BTreeMap::new(),
    );
    let expected: Vec<&str> = template.iter().map(|(k, _)| k.as_str()).collect();
    let labels = &opened[0].0;
    let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, expected);
    let teller = spiffe("teller").to_string();
    let ledger = spiffe("ledger").to_string();
    for (name, want) in [
        ("reporter", "destination"),
        ("source_principal", teller.as_str()),
        ("source_workload_namespace", NS),
        ("destination_principal", ledger.as_str()),
        ("destination_workload", "tcp-ledger-v1"),
        ("destination_workload_namespace", NS),
        ("destination_app", "ledger"),
        ("destination_version", "v1"),
        ("destination_canonical_service", "ledger"),
        ("destination_canonical_revision", "v1"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(label(labels, name), Some(want), "{name}: {labels:?}");
    }
    for f in [&closed, &received, &sent] {
        assert_eq!(&f[0].0, labels, "same label set on every family");
    }

    // No request metrics on the server side for that port (the client still reports its own).
    for name in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_count",
    ] {
        let server_side: Vec<_> = family(name)
            .into_iter()
            .filter(|s| label(&s.0, "reporter") == Some("destination"))
            .collect();
        assert_eq!(server_side, Vec::new(), "{name}");
    }
    let client_side: Vec<_> = samples(&text, "istio_requests_total")
        .into_iter()
        .filter(|s| label(&s.0, "reporter") == Some("source"))
        .filter(|s| label(&s.0, "destination_service_name") == Some("ledger"))
        .collect();
    assert!(!client_side.is_empty(), "the client reports its requests");
}
