//! A workload port declared TCP, end to end: the testkit control plane renders it into
//! `virtualInbound` as istiod does (TCP proxy chains only), mesh translates it, and the
//! server reports `istio_tcp_*` with `reporter="destination"` (label names and order as
//! Istio's own expectation template, testdata/istio/istio-proxy-metric_tcp_client_connection_open.yaml.tmpl)
//! instead of `istio_requests_total`, while still serving the app over HTTP.

use crate::support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use mesh::Mesh;
use mesh::parts::core::identity::NodeIdentity;
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

/// A meshed server on a fresh 127.0.0.1 port that the model declares TCP.
struct TcpServer {
    plane: Plane,
    server: Mesh,
    app: Echo,
    addr: SocketAddr,
    serving: tokio::task::JoinHandle<Result<(), mesh::MeshError>>,
}

/// Starts the control plane with service `name` (VIP `vip`, `port`) whose one endpoint (service
/// account `name`, labels `endpoint_labels`) is `server_node`'s mesh serving an [`Echo`] on a
/// fresh port that the model declares TCP.
async fn tcp_server(
    (name, vip, port): (&str, &str, (u16, Protocol)),
    endpoint_labels: &[(&str, &str)],
    server_node: NodeIdentity,
) -> TcpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let endpoint = endpoint_labels.iter().fold(
        EndpointSpec::new(addr).service_account(name),
        |e, (k, v)| e.label(k, v),
    );
    let service = ServiceSpec::new(name, NS, vip.parse().expect("vip"))
        .port(port.0, port.1)
        .endpoint(endpoint);
    let app = Echo::new(name);
    let model = MeshModel::default()
        .inbound_port(addr.port(), Protocol::Tcp)
        .service(service);
    let plane = Plane::start(model).await;
    let server = plane.builder(server_node).start().await.expect("starts");
    ready(&server).await;
    let serving = {
        let server = server.clone();
        let svc = app.service();
        tokio::spawn(async move { server.serve_on(listener, svc).await })
    };
    TcpServer {
        plane,
        server,
        app,
        addr,
        serving,
    }
}

/// Opens a mesh TCP connection to `authority` (retried until the client's config has it),
/// writes `request` and reads until the server closes: (the stream, what came back).
async fn tcp_round_trip(
    client: &Mesh,
    authority: &str,
    request: &[u8],
) -> (mesh::OutboundTcpStream, Vec<u8>) {
    let mut stream = eventually("a TCP connection through the mesh", || async {
        client.tcp_connect(authority).await.ok()
    })
    .await;
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("bounded")
        .expect("read");
    (stream, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_declared_port_reports_istio_tcp_metrics() {
    let mut server_node = node("ledger-v1-0", "ledger");
    server_node.workload_name = "tcp-ledger-v1".into();
    server_node.labels.insert("version".into(), "v1".into());
    let TcpServer {
        plane,
        server,
        app,
        addr,
        serving,
    } = tcp_server(
        ("ledger", "10.96.0.61", (5432, Protocol::Http)),
        &[],
        server_node,
    )
    .await;
    assert_eq!(
        server
            .snapshot()
            .inbound
            .as_ref()
            .map(|p| p.protocol_for(addr.port())),
        Some(InboundProtocol::Tcp)
    );
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
    // The server's own metadata (TCP metadata exchange) agrees with its endpoint's.
    let mut server_node = node("vault-v2-0", "vault");
    server_node.labels.insert("version".into(), "v2".into());
    let TcpServer {
        plane,
        server,
        app,
        addr,
        serving: _serving,
    } = tcp_server(
        ("vault", "10.96.0.62", (6432, Protocol::Tcp)),
        &[("version", "v2")],
        server_node,
    )
    .await;
    let mut client_node = node("cashier-0", "cashier");
    client_node.workload_name = "tcp-cashier-v1".into();
    let client = plane.builder(client_node).start().await.expect("starts");
    ready(&client).await;

    // HTTP/1.1 bytes over the raw connection: the server's app speaks HTTP on its TCP port.
    let request = b"GET /tcp HTTP/1.1\r\nhost: vault\r\nconnection: close\r\n\r\n";
    let (stream, response) =
        tcp_round_trip(&client, "vault.default.svc.cluster.local:6432", request).await;
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

/// The `istio_tcp_*` series of one closed connection (`keep` selects it), once its close was
/// reported.
async fn closed_connection_series(
    mesh: &mesh::Mesh,
    keep: impl Fn(&Sample) -> bool,
) -> [Sample; 4] {
    let text = eventually("the connection's istio_tcp_* at close", || async {
        let (_, text) = status_get(mesh, StatusPort::Prometheus, "/stats/prometheus").await;
        samples(&text, "istio_tcp_connections_closed_total")
            .iter()
            .any(|s| keep(s) && s.1 >= 1.0)
            .then_some(text)
    })
    .await;
    tcp_series(&text, keep)
}

fn assert_labels(labels: &[(String, String)], want: &[(&str, &str)]) {
    for (name, want) in want {
        assert_eq!(label(labels, name), Some(*want), "{name}: {labels:?}");
    }
}

/// Istio's TCP metadata exchange between a mesh client (`Mesh::tcp_connect`) and a mesh
/// server on a TCP port: the client offers `istio-peer-exchange`, the server's TCP chain
/// negotiates it, each side sends its frame, and each side's `istio_tcp_*` names the other
/// workload from its frame: the server's `source_*` (workload, app, version, canonical
/// service and revision) and the client's `destination_*`, which differ from the endpoint
/// metadata istiod sent (version `ep-v9`). The frames are not counted as application bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_metadata_exchange_names_each_side_to_the_other() {
    let labelled = |pod: &str, sa: &str, workload: &str, l: [(&str, &str); 4]| {
        let mut n = node(pod, sa);
        n.workload_name = workload.into();
        for (k, v) in l {
            n.labels.insert(k.into(), v.into());
        }
        n
    };
    let server_node = labelled(
        "depot-mx-0",
        "depot",
        "depot-mx",
        [
            ("app", "depot-app"),
            ("version", "v3"),
            ("service.istio.io/canonical-name", "depot-canon"),
            ("service.istio.io/canonical-revision", "r3"),
        ],
    );
    let client_node = labelled(
        "picker-mx-0",
        "picker",
        "picker-mx",
        [
            ("app", "picker-app"),
            ("version", "p1"),
            ("service.istio.io/canonical-name", "picker-canon"),
            ("service.istio.io/canonical-revision", "pr1"),
        ],
    );
    let TcpServer {
        plane,
        server,
        app: _,
        addr: _,
        serving: _serving,
    } = tcp_server(
        ("depot", "10.96.0.63", (7432, Protocol::Tcp)),
        &[("version", "ep-v9")],
        server_node,
    )
    .await;
    let client = plane.builder(client_node).start().await.expect("starts");
    ready(&client).await;

    let request = b"GET /mx HTTP/1.1\r\nhost: depot\r\nconnection: close\r\n\r\n";
    let (stream, response) =
        tcp_round_trip(&client, "depot.default.svc.cluster.local:7432", request).await;
    let text = String::from_utf8_lossy(&response);
    // The application reads the server's reply, not the server's frame.
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("path=/mx"), "{text}");
    drop(stream);

    let depot = spiffe("depot").to_string();
    let picker = spiffe("picker").to_string();
    let [opened, closed, received, sent] = closed_connection_series(&client, |s| {
        label(&s.0, "reporter") == Some("source")
            && label(&s.0, "source_workload") == Some("picker-mx")
    })
    .await;
    assert_eq!((opened.1, closed.1), (1.0, 1.0));
    assert_eq!(sent.1, request.len() as f64);
    assert_eq!(received.1, response.len() as f64);
    assert_labels(
        &opened.0,
        &[
            ("destination_workload", "depot-mx"),
            ("destination_workload_namespace", NS),
            ("destination_principal", depot.as_str()),
            ("destination_app", "depot-app"),
            ("destination_version", "v3"),
            ("destination_canonical_service", "depot-canon"),
            ("destination_canonical_revision", "r3"),
            ("destination_cluster", "Kubernetes"),
            ("destination_service", "depot.default.svc.cluster.local"),
            ("destination_service_name", "depot"),
            ("source_app", "picker-app"),
            ("source_version", "p1"),
        ],
    );

    let [opened, closed, received, sent] = closed_connection_series(&server, |s| {
        label(&s.0, "reporter") == Some("destination")
            && label(&s.0, "source_principal") == Some(picker.as_str())
    })
    .await;
    assert_eq!((opened.1, closed.1), (1.0, 1.0));
    assert_eq!(received.1, request.len() as f64);
    assert_eq!(sent.1, response.len() as f64);
    assert_labels(
        &opened.0,
        &[
            ("source_workload", "picker-mx"),
            ("source_workload_namespace", NS),
            ("source_app", "picker-app"),
            ("source_version", "p1"),
            ("source_canonical_service", "picker-canon"),
            ("source_canonical_revision", "pr1"),
            ("source_cluster", "Kubernetes"),
            ("destination_workload", "depot-mx"),
            ("destination_app", "depot-app"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
}

/// A frame as an Istio sidecar writes it (FACTS.md f.2), built with protobuf's own types
/// (prost, as generated for Envoy's API): magic, big-endian length, `Any` of a `Struct` with
/// `x-envoy-peer-metadata` (the f.1 Struct) and `x-envoy-peer-metadata-id`.
fn sidecar_frame(id: &str, workload: &str, labels: &[(&str, &str)]) -> Vec<u8> {
    use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
    use prost::Message as _;
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), string(v)))
            .collect(),
    };
    let metadata = Struct {
        fields: [
            ("WORKLOAD_NAME".to_owned(), string(workload)),
            ("NAMESPACE".to_owned(), string(NS)),
            ("CLUSTER_ID".to_owned(), string("Kubernetes")),
            (
                "LABELS".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            ),
        ]
        .into_iter()
        .collect(),
    };
    let value = Struct {
        fields: [
            (
                "x-envoy-peer-metadata".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(metadata)),
                },
            ),
            ("x-envoy-peer-metadata-id".to_owned(), string(id)),
        ]
        .into_iter()
        .collect(),
    };
    let any = Any {
        type_url: "type.googleapis.com/google.protobuf.Struct".to_owned(),
        value: value.encode_to_vec(),
    };
    let body = any.encode_to_vec();
    let mut frame = 0x3D23_0467u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Splits mesh's frame off the start of what the server sent and decodes it with protobuf's
/// own types: (`x-envoy-peer-metadata` string fields and `LABELS` entries, the id, the rest).
fn split_mesh_frame(received: &[u8]) -> (BTreeMap<String, String>, String, Vec<u8>) {
    use envoy_types::pb::google::protobuf::{Any, Struct, value::Kind};
    use prost::Message as _;
    assert!(received.len() >= 8, "a frame header: {received:?}");
    assert_eq!(
        received[..4],
        [0x3D, 0x23, 0x04, 0x67],
        "the exchange's magic first"
    );
    let len = u32::from_be_bytes([received[4], received[5], received[6], received[7]]) as usize;
    let body = &received[8..8 + len];
    let any = Any::decode(body).expect("a protobuf Any");
    assert_eq!(any.type_url, "type.googleapis.com/google.protobuf.Struct");
    let value = Struct::decode(any.value.as_slice()).expect("a protobuf Struct");
    let id = match value
        .fields
        .get("x-envoy-peer-metadata-id")
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("x-envoy-peer-metadata-id: {other:?}"),
    };
    let Some(Kind::StructValue(metadata)) = value
        .fields
        .get("x-envoy-peer-metadata")
        .and_then(|v| v.kind.clone())
    else {
        panic!("x-envoy-peer-metadata is a struct: {value:?}");
    };
    let mut fields = BTreeMap::new();
    for (k, v) in &metadata.fields {
        match &v.kind {
            Some(Kind::StringValue(s)) => {
                fields.insert(k.clone(), s.clone());
            }
            Some(Kind::StructValue(inner)) => {
                for (ik, iv) in &inner.fields {
                    if let Some(Kind::StringValue(s)) = &iv.kind {
                        fields.insert(format!("{k}.{ik}"), s.clone());
                    }
                }
            }
            other => panic!("{k}: {other:?}"),
        }
    }
    (fields, id, received[8 + len..].to_vec())
}

/// Byte level, a raw rustls client as the client sidecar: ALPN
/// `["istio-peer-exchange", "istio"]` to a mesh TCP port negotiates `istio-peer-exchange`;
/// mesh writes its frame first (decoded with protobuf's own types: its node id and workload
/// metadata). A client frame built from the facts names the client in the server's
/// `istio_tcp_*`; a client that sends its application bytes with no frame (wrong magic), or a
/// header whose body is no protobuf `Any`, is an unknown peer. In every case the application's
/// bytes pass through unchanged (the request's
/// path reaches the app, the reply comes back, byte counts are exactly the request's and the
/// reply's). A client offering Istio's HTTP ALPN gets no frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_istio_peer_exchange_client_gets_mesh_frame_and_its_bytes_pass_through() {
    use crate::authz_envoy::client_config;

    let mut server_node = node("kiosk-mx-0", "kiosk");
    server_node.workload_name = "kiosk-mx".into();
    server_node.labels.insert("version".into(), "k1".into());
    let TcpServer {
        plane,
        server,
        addr,
        serving: _serving,
        ..
    } = tcp_server(
        ("kiosk", "10.96.0.64", (7500, Protocol::Tcp)),
        &[],
        server_node.clone(),
    )
    .await;

    let kiosk_request =
        |path: &str| format!("GET {path} HTTP/1.1\r\nhost: kiosk\r\nconnection: close\r\n\r\n");
    let exchange = |sa: &'static str, prefix: Vec<u8>, path: &'static str| {
        let plane = &plane;
        async move {
            let mut config = client_config(&plane.ca, sa).expect("client config");
            config.alpn_protocols = vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let name = rustls_pki_types::ServerName::try_from(
                "outbound_.7500_._.kiosk.default.svc.cluster.local",
            )
            .expect("sni");
            let request = kiosk_request(path);
            let received = eventually("an mTLS connection to the TCP port", || async {
                let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
                let mut tls = connector.connect(name.clone(), tcp).await.ok()?;
                assert_eq!(
                    tls.get_ref().1.alpn_protocol(),
                    Some(&b"istio-peer-exchange"[..]),
                    "the TCP chain negotiates the exchange"
                );
                // The frame (if any) and the application's bytes in one write.
                let mut out = prefix.clone();
                out.extend_from_slice(request.as_bytes());
                tls.write_all(&out).await.ok()?;
                let mut received = Vec::new();
                timeout(WAIT, tls.read_to_end(&mut received))
                    .await
                    .expect("bounded")
                    .ok()?;
                Some(received)
            })
            .await;
            (request, received)
        }
    };

    let kiosk = spiffe("kiosk").to_string();
    let check_mesh_frame = |received: &[u8]| {
        let (fields, id, rest) = split_mesh_frame(received);
        assert_eq!(id, server_node.node_id());
        for (k, v) in [
            ("WORKLOAD_NAME", "kiosk-mx"),
            ("NAME", "kiosk-mx-0"),
            ("NAMESPACE", NS),
            ("CLUSTER_ID", "Kubernetes"),
            ("LABELS.app", "kiosk"),
            ("LABELS.version", "k1"),
            ("LABELS.service.istio.io/canonical-name", "kiosk"),
            ("LABELS.service.istio.io/canonical-revision", "k1"),
        ] {
            assert_eq!(
                fields.get(k).map(String::as_str),
                Some(v),
                "{k}: {fields:?}"
            );
        }
        rest
    };

    // 1. A sidecar's frame, then the application's bytes.
    let frame = sidecar_frame(
        "sidecar~10.0.0.9~rawpeer-0.default~default.svc.cluster.local",
        "rawpeer-wl",
        &[
            ("app", "rawpeer-app"),
            ("version", "rv1"),
            ("service.istio.io/canonical-name", "rawpeer-canon"),
            ("service.istio.io/canonical-revision", "rv1"),
        ],
    );
    let framed: &[(&str, &str)] = &[
        ("source_workload", "rawpeer-wl"),
        ("source_app", "rawpeer-app"),
        ("source_version", "rv1"),
        ("source_canonical_service", "rawpeer-canon"),
        ("source_canonical_revision", "rv1"),
        ("source_workload_namespace", NS),
        ("destination_principal", kiosk.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    // 2. No frame: the first bytes are the request's (wrong magic). The peer is unknown and
    //    every byte reaches the application.
    let unknown: &[(&str, &str)] = &[
        ("source_workload", "unknown"),
        ("source_app", "unknown"),
        ("source_workload_namespace", NS),
    ];
    // 3. The magic and a length, but a body that is no protobuf Any (here: the request itself,
    //    whose first byte is an invalid protobuf tag): as Envoy's filter, mesh takes the 8-byte
    //    header and hands the body to the application; the peer is unknown.
    let mut not_any = 0x3D23_0467u32.to_be_bytes().to_vec();
    not_any.extend_from_slice(&(kiosk_request("/mx-not-any").len() as u32).to_be_bytes());
    for (sa, prefix, path, want) in [
        ("rawpeer", frame, "/mx-framed", framed),
        ("rawnomagic", Vec::new(), "/mx-no-magic", unknown),
        ("rawnotany", not_any, "/mx-not-any", unknown),
    ] {
        let (request, received) = exchange(sa, prefix, path).await;
        let reply = check_mesh_frame(&received);
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("HTTP/1.1 200"), "{sa}: {text}");
        assert!(text.contains(&format!("path={path}\n")), "{sa}: {text}");
        let principal = spiffe(sa).to_string();
        let [opened, _, bytes_in, bytes_out] = closed_connection_series(&server, |s| {
            label(&s.0, "reporter") == Some("destination")
                && label(&s.0, "source_principal") == Some(principal.as_str())
        })
        .await;
        assert_eq!(bytes_in.1, request.len() as f64, "{sa}");
        assert_eq!(bytes_out.1, reply.len() as f64, "{sa}");
        assert_labels(&opened.0, want);
    }

    // 3. Istio's HTTP ALPN on the same port: no exchange, the reply comes first.
    let text = support::mesh::tls_request(addr, None)
        .await
        .expect("a reply");
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "no frame before HTTP: {text:?}"
    );
}
