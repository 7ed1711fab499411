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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

type Sample = (Vec<(String, String)>, f64);

/// The one series `keep` selects in each `istio_tcp_*` family (opened, closed, received,
/// sent), after checking that the label names and their order are those of Istio's TCP
/// template and that every family carries the same label set.
fn tcp_series(text: &str, keep: impl Fn(&Sample) -> bool) -> [Sample; 4] {
    let series = [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ]
    .map(|name| {
        let mut f: Vec<Sample> = samples(text, name).into_iter().filter(&keep).collect();
        assert_eq!(f.len(), 1, "one {name} series: {f:?}");
        f.remove(0)
    });
    let template = istio_template(
        "istio-proxy-metric_tcp_client_connection_open.yaml.tmpl",
        &BTreeMap::new(),
    );
    let expected: Vec<&str> = template.iter().map(|(k, _)| k.as_str()).collect();
    let names: Vec<&str> = series[0].0.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, expected);
    for s in &series[1..] {
        assert_eq!(s.0, series[0].0, "same label set on every family");
    }
    series
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
    let [opened, closed, received, sent] = tcp_series(&text, |s| {
        label(&s.0, "destination_workload") == Some("tcp-ledger-v1")
    });
    assert!(opened.1 >= 1.0);
    assert_eq!(opened.1, closed.1, "every opened connection closed");
    assert!(received.1 > 0.0 && sent.1 > 0.0);
    let labels = &opened.0;
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

    // No request metrics on the server side for that port (the client still reports its own).
    for name in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_count",
    ] {
        let server_side: Vec<_> = samples(&text, name)
            .into_iter()
            .filter(|s| label(&s.0, "destination_workload") == Some("tcp-ledger-v1"))
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

/// A mesh client opens a TCP connection to a TCP service by name (`Mesh::tcp_connect`): NDS
/// resolves the name to the VIP, the VIP's `<vip>_<port>` TCP listener names the cluster,
/// the endpoint is reached over Istio mTLS, and the client reports `istio_tcp_*` with
/// `reporter="source"` and the label names and order of Istio's TCP template, while the
/// server reports the same connection with `reporter="destination"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_tcp_connection_reports_istio_tcp_metrics_as_the_source() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let model = MeshModel::default()
        .inbound_port(addr.port(), Protocol::Tcp)
        .service(
            ServiceSpec::new("vault", NS, "10.96.0.62".parse().unwrap())
                .port(6432, Protocol::Tcp)
                .endpoint(
                    EndpointSpec::new(addr)
                        .service_account("vault")
                        .label("version", "v2"),
                ),
        );
    let plane = Plane::start(model).await;
    let server = plane
        .builder(node("vault-v2-0", "vault"))
        .start()
        .await
        .expect("starts");
    ready(&server).await;
    let app = Echo::new("vault");
    let _serving = {
        let server = server.clone();
        let svc = app.service();
        tokio::spawn(async move { server.serve_on(listener, svc).await })
    };
    let mut client_node = node("cashier-0", "cashier");
    client_node.workload_name = "tcp-cashier-v1".into();
    let client = plane.builder(client_node).start().await.expect("starts");
    ready(&client).await;

    // HTTP/1.1 bytes over the raw connection: the server's app speaks HTTP on its TCP port.
    let request = b"GET /tcp HTTP/1.1\r\nhost: vault\r\nconnection: close\r\n\r\n";
    let mut stream = eventually("a TCP connection through the mesh", || async {
        client
            .tcp_connect("vault.default.svc.cluster.local:6432")
            .await
            .ok()
    })
    .await;
    assert_eq!(
        stream.upstream_cluster(),
        "outbound|6432||vault.default.svc.cluster.local"
    );
    assert_eq!(stream.upstream_host(), addr);
    assert_eq!(
        stream.peer_principal(),
        Some(spiffe("vault").to_string().as_str())
    );
    let local = stream.upstream_local_address().expect("local address");
    assert!(local.ip().is_loopback() && local.port() != 0, "{local}");
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("bounded")
        .expect("read");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(app.hits() >= 1);
    drop(stream);

    let (status, text) = status_get(&client, StatusPort::Prometheus, "/stats/prometheus").await;
    assert_eq!(status, 200);
    let [opened, closed, received, sent] = tcp_series(&text, |s| {
        label(&s.0, "source_workload") == Some("tcp-cashier-v1")
            && label(&s.0, "reporter") == Some("source")
            && label(&s.0, "destination_service_name") == Some("vault")
    });
    assert_eq!((opened.1, closed.1), (1.0, 1.0));
    // Bytes the application wrote and read (after TLS), exactly.
    assert_eq!(sent.1, request.len() as f64);
    assert_eq!(received.1, response.len() as f64);
    let labels = &opened.0;
    let cashier = spiffe("cashier").to_string();
    let vault = spiffe("vault").to_string();
    for (name, want) in [
        ("reporter", "source"),
        ("source_workload", "tcp-cashier-v1"),
        ("source_workload_namespace", NS),
        ("source_principal", cashier.as_str()),
        ("source_app", "cashier"),
        ("destination_workload", "vault"),
        ("destination_workload_namespace", NS),
        ("destination_principal", vault.as_str()),
        ("destination_canonical_service", "vault"),
        ("destination_canonical_revision", "v2"),
        ("destination_service", "vault.default.svc.cluster.local"),
        ("destination_service_name", "vault"),
        ("destination_service_namespace", NS),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ] {
        assert_eq!(label(labels, name), Some(want), "{name}: {labels:?}");
    }
    // Envoy's cluster stats count the upstream connection.
    assert!(
        text.lines()
            .any(|l| l.starts_with("envoy_cluster_upstream_cx_total{")
                && l.contains("cluster_name=\"outbound|6432||vault.default.svc.cluster.local\"")),
        "envoy_cluster_upstream_cx_total for the TCP cluster: {}",
        text.lines()
            .filter(|l| l.contains("cx_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The server saw the same connection from the client's identity.
    let (_, server_text) = status_get(&server, StatusPort::Prometheus, "/stats/prometheus").await;
    let from_cashier = samples(&server_text, "istio_tcp_connections_opened_total")
        .into_iter()
        .filter(|s| label(&s.0, "reporter") == Some("destination"))
        .filter(|s| label(&s.0, "source_principal") == Some(cashier.as_str()))
        .count();
    assert_eq!(from_cashier, 1);

    // An address the mesh does not know goes to PassthroughCluster, plaintext.
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain_addr = plain.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        let (mut s, _) = plain.accept().await.expect("accept");
        s.write_all(b"hello").await.expect("write");
    });
    let mut stream = timeout(WAIT, client.tcp_connect(&plain_addr.to_string()))
        .await
        .expect("bounded")
        .expect("passthrough connect");
    assert_eq!(stream.upstream_cluster(), "PassthroughCluster");
    assert_eq!(stream.peer_principal(), None);
    let mut hello = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut hello))
        .await
        .expect("bounded")
        .expect("read");
    assert_eq!(hello, b"hello");
    accept.await.expect("accepted");
    drop(stream);
    let (_, text) = status_get(&client, StatusPort::Prometheus, "/stats/prometheus").await;
    let passthrough: Vec<_> = samples(&text, "istio_tcp_received_bytes_total")
        .into_iter()
        .filter(|s| label(&s.0, "source_workload") == Some("tcp-cashier-v1"))
        .filter(|s| label(&s.0, "destination_service_name") == Some("PassthroughCluster"))
        .collect();
    assert_eq!(passthrough.len(), 1, "{passthrough:?}");
    assert_eq!(passthrough[0].1, 5.0);
    assert_eq!(
        label(&passthrough[0].0, "destination_workload"),
        Some("unknown")
    );
}
