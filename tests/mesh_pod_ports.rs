//! Whole-library pod-facing ports: `/healthz/ready` on 15020 and 15021 answers 503 until the
//! first configuration *and* a certificate are in, then 200; `/stats/prometheus` on 15020 and
//! 15090 carries Istio's `istio_requests_total` once a request went through.

use crate::support;

use std::time::Duration;

use mesh::CertificateSource;
use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use support::mesh::{Echo, NS, Plane, WAIT, eventually, node, ready, spiffe, status_get};
use tokio::net::TcpListener;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_certificate() {
    let plane = Plane::start(MeshModel::default()).await;
    plane.ca.set_failing(true);
    let mesh = plane.mesh("ratings").await;

    // The configuration arrives, the certificate cannot.
    eventually("the first configuration", || async {
        mesh.snapshot_cell().is_synced().then_some(())
    })
    .await;
    eventually("a refused certificate request", || async {
        (!plane.ca.requests().is_empty()).then_some(())
    })
    .await;
    assert!(mesh.certificates().current().is_none());
    assert!(!mesh.is_ready());
    for port in [StatusPort::Agent, StatusPort::Readiness] {
        let (status, _) = status_get(&mesh, port, "/healthz/ready").await;
        assert_eq!(status, 503, "{port:?} before the certificate");
    }

    plane.ca.set_failing(false);
    ready(&mesh).await;
    for port in [StatusPort::Agent, StatusPort::Readiness] {
        eventually("200 on /healthz/ready", || async {
            (status_get(&mesh, port, "/healthz/ready").await.0 == 200).then_some(())
        })
        .await;
    }
    assert_eq!(
        mesh.certificates().current().map(|c| c.identity.clone()),
        Some(spiffe("ratings"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_configuration() {
    // An "istiod" that accepts connections but never answers: the certificate is there
    // (static), the configuration never comes.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let plane = Plane::start(MeshModel::default()).await;
    let cert = plane
        .ca
        .workload_certificate(&spiffe("ratings"), Duration::from_secs(3600));
    let mesh = plane
        .builder(node("ratings-0", "ratings"))
        .discovery_address(silent_addr.to_string(), false, None)
        .certificate(CertificateSource::Static(Box::new(cert)))
        .start()
        .await
        .unwrap();
    assert!(mesh.certificates().current().is_some());
    // Give the stream time to be attempted (no assertion on time: only on the answer).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!mesh.is_ready());
    for port in [StatusPort::Agent, StatusPort::Readiness] {
        let (status, _) = status_get(&mesh, port, "/healthz/ready").await;
        assert_eq!(status, 503, "{port:?} without configuration");
    }
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_ports_carry_istio_requests_total_after_a_request() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("details").await;
    let app = Echo::new("details");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(
        MeshModel::default().service(
            ServiceSpec::new("details", NS, "10.96.0.40".parse().unwrap())
                .port(9080, Protocol::Http)
                .endpoint(EndpointSpec::new(addr).service_account("details")),
        ),
    );
    let client = plane.ready_mesh("productpage").await;
    let resp = eventually("a 200 from details", || async {
        let r = client
            .http_client()
            .get("http://details.default.svc.cluster.local:9080/")
            .await
            .ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(resp.status(), 200);

    let wanted = |text: &str, reporter: &str| {
        text.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("reporter=\"{reporter}\""))
                && l.contains("response_code=\"200\"")
                && l.contains(
                    "source_principal=\"spiffe://cluster.local/ns/default/sa/productpage\"",
                )
                && l.contains(
                    "destination_principal=\"spiffe://cluster.local/ns/default/sa/details\"",
                )
                && (reporter == "destination"
                    || l.contains("destination_service=\"details.default.svc.cluster.local\""))
        })
    };
    for (mesh, reporter) in [(&client, "source"), (&server, "destination")] {
        for port in [StatusPort::Agent, StatusPort::Prometheus] {
            let deadline = tokio::time::Instant::now() + WAIT;
            let text = loop {
                let (status, text) = status_get(mesh, port, "/stats/prometheus").await;
                assert_eq!(status, 200);
                if wanted(&text, reporter) {
                    break text;
                }
                if tokio::time::Instant::now() > deadline {
                    let lines: Vec<&str> = text
                        .lines()
                        .filter(|l| l.contains("istio_requests_total"))
                        .collect();
                    panic!(
                        "no istio_requests_total reporter={reporter} on {port:?}:\n{}",
                        lines.join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(
                text.contains("# TYPE istio_requests_total counter"),
                "{port:?}"
            );
        }
    }
}

/// mesh's own agent measurements are on 15020 under pilot-agent's names, types and labels
/// (`istio_agent_cert_expiry_seconds{resource_name="default"}`, the CSR counters with
/// `request_type="csr"`, `istio_agent_startup_duration_seconds`), and the merged output parses
/// with promtool and `prometheus_client`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_on_15020_carry_pilot_agent_names() {
    let plane = Plane::start(MeshModel::default()).await;
    let mesh = plane.ready_mesh("reviews").await;
    let (status, text) = status_get(&mesh, StatusPort::Agent, "/stats/prometheus").await;
    assert_eq!(status, 200);
    for (family, kind) in [
        ("istio_agent_cert_expiry_seconds", "gauge"),
        ("istio_agent_num_outgoing_requests", "counter"),
        ("istio_agent_outgoing_latency", "counter"),
        ("istio_agent_startup_duration_seconds", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "no {kind} {family} on 15020"
        );
    }
    let Some(tools) = support::prometheus::tools() else {
        return;
    };
    let report = tools.check_metrics(&text);
    assert!(report.parse_error.is_none(), "{}", report.output);
    let samples = tools.python_parse(&text);
    let sample = |family: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| s.family == family && label.is_none_or(|(k, v)| s.label(k) == Some(v)))
            .unwrap_or_else(|| panic!("prometheus_client found no {family} {label:?}"))
    };
    let expiry = sample(
        "istio_agent_cert_expiry_seconds",
        Some(("resource_name", "default")),
    );
    let cert = mesh
        .certificates()
        .current()
        .expect("ready means a certificate");
    let lifetime = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry.value > 0.0 && expiry.value <= lifetime,
        "cert expiry {} outside (0, {lifetime}]",
        expiry.value
    );
    let csrs = sample(
        "istio_agent_num_outgoing_requests",
        Some(("request_type", "csr")),
    );
    assert!(csrs.value >= 1.0, "{csrs:?}");
    assert_eq!(csrs.kind, "counter");
    sample(
        "istio_agent_outgoing_latency",
        Some(("request_type", "csr")),
    );
    let startup = sample("istio_agent_startup_duration_seconds", None);
    assert!(startup.value > 0.0, "{startup:?}");
}

/// The optional admin listener (Envoy's 15000): off by default; when on, bound to loopback
/// only, and `/config_dump` carries every accepted resource in full, in Envoy's admin JSON,
/// which `meshctl check-config`'s reader takes back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_the_full_config_dump_on_loopback_only() {
    use mesh_xds::ads::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
    use mesh_xds::dump::{ConfigDump, resource_json};

    let model = MeshModel::default().service(
        ServiceSpec::new("details", NS, "10.96.0.40".parse().unwrap())
            .port(9080, Protocol::Http)
            .endpoint(EndpointSpec::new("127.0.0.1:9080".parse().unwrap())),
    );
    let plane = Plane::start(model).await;

    let plain = plane.ready_mesh("reviews").await;
    assert!(
        plain.status_addr(StatusPort::Admin).is_none(),
        "the admin listener is off unless asked for"
    );

    // Pod-facing listeners on 0.0.0.0 (none bound here), the admin listener still on loopback.
    let mesh = plane
        .builder(node("productpage-0", "productpage"))
        .bind_address("0.0.0.0".parse().unwrap())
        .status_ports(None, None, None)
        .admin_port(Some(0))
        .start()
        .await
        .unwrap();
    ready(&mesh).await;
    let admin = mesh.status_addr(StatusPort::Admin).expect("admin port on");
    assert_eq!(admin.ip(), std::net::IpAddr::from([127, 0, 0, 1]));
    if let Some(ip) = non_loopback_ip() {
        let refused = tokio::net::TcpStream::connect((ip, admin.port())).await;
        assert!(refused.is_err(), "admin port reachable on {ip}");
    } else {
        eprintln!("no non-loopback address on this machine: reachability check skipped");
    }

    let (status, text) = status_get(&mesh, StatusPort::Admin, "/config_dump").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let types: Vec<&str> = v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["@type"].as_str().unwrap())
        .collect();
    assert!(
        !types.iter().any(|t| t.ends_with("EndpointsConfigDump")),
        "EDS only with ?include_eds, as Envoy: {types:?}"
    );
    let details = "outbound|9080||details.default.svc.cluster.local";
    let cluster = v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["dynamic_active_clusters"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .find(|c| c["cluster"]["name"] == details)
        .expect("details cluster in the dump");
    assert_eq!(cluster["cluster"]["@type"], CLUSTER);
    assert_eq!(cluster["cluster"]["type"], "EDS", "a full body, not a name");
    assert!(cluster["last_updated"].as_str().unwrap().ends_with('Z'));

    // Round trip: what the dump holds is exactly what the control plane served.
    let served = plane.cp.resources_for(NS);
    let dump = ConfigDump::from_json_str(&text).unwrap();
    assert!(dump.rejected.is_empty(), "{:?}", dump.rejected);
    let report = mesh_xds::check::check(&dump);
    assert_eq!(report.rejected(), 0, "{report}");
    let back = dump.xds_resources();
    for type_url in [CLUSTER, LISTENER, ROUTE] {
        let names = |m: Option<&std::collections::BTreeMap<String, _>>| {
            m.map(|m| m.keys().cloned().collect::<Vec<String>>())
                .unwrap_or_default()
        };
        assert_eq!(
            names(back.get(type_url)),
            names(served.get(type_url)),
            "{type_url}"
        );
    }
    // Same configuration (compared as rendered: nested Anys may re-encode differently).
    for type_url in [CLUSTER, LISTENER, ROUTE] {
        for (name, any) in &back[type_url] {
            let again = resource_json(any).unwrap();
            assert_eq!(
                again,
                resource_json(&served[type_url][name]).unwrap(),
                "{type_url} {name} changed in the round trip"
            );
        }
    }
    let (_, with_eds) = status_get(&mesh, StatusPort::Admin, "/config_dump?include_eds").await;
    let with_eds = ConfigDump::from_json_str(&with_eds).unwrap();
    assert_eq!(
        with_eds.xds_resources()[ENDPOINT]
            .keys()
            .collect::<Vec<_>>(),
        served[ENDPOINT].keys().collect::<Vec<_>>()
    );

    let (status, clusters) = status_get(&mesh, StatusPort::Admin, "/clusters").await;
    assert_eq!(status, 200);
    assert!(
        clusters.contains(&format!("{details}::127.0.0.1:9080::health_flags::healthy")),
        "{clusters}"
    );
    let (status, live) = status_get(&mesh, StatusPort::Admin, "/ready").await;
    assert_eq!((status, live.as_str()), (200, "LIVE\n"));
    let (status, info) = status_get(&mesh, StatusPort::Admin, "/server_info").await;
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "LIVE");
    assert!(
        info["node"]["id"]
            .as_str()
            .unwrap()
            .contains("~productpage-0.default~"),
        "{info}"
    );
}

/// An address of this machine other than loopback (found without sending anything).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.255.255.255:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// The admin listener's stats: `/stats/prometheus` and `/stats?format=prometheus` (Envoy's
/// admin serves both) pass real `promtool check metrics`, and `/stats` lists the Envoy stats
/// under Envoy's dotted names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_stats_pass_promtool() {
    let app = Echo::new("details");
    let upstream = app.serve_plain().await;
    let model = MeshModel::default().service(
        ServiceSpec::new("details", NS, "10.96.0.41".parse().unwrap())
            .port(9080, Protocol::Http)
            .endpoint(EndpointSpec::new(upstream).plaintext()),
    );
    let plane = Plane::start(model).await;
    let mesh = plane
        .builder(node("admin-stats-0", "admin-stats"))
        .admin_port(Some(0))
        .start()
        .await
        .unwrap();
    ready(&mesh).await;
    // Traffic, so the cluster, HTTP and Istio families have samples.
    let http = mesh.http_client();
    let r = timeout(
        WAIT,
        http.get("http://details.default.svc.cluster.local:9080/"),
    )
    .await
    .expect("bounded")
    .expect("response");
    assert_eq!(r.status(), 200);

    let (status, prometheus) = status_get(&mesh, StatusPort::Admin, "/stats/prometheus").await;
    assert_eq!(status, 200);
    for family in [
        "# TYPE istio_requests_total counter",
        "# TYPE envoy_cluster_upstream_rq_total counter",
        "# TYPE envoy_server_live gauge",
    ] {
        assert!(
            prometheus.contains(family),
            "no {family:?} in /stats/prometheus"
        );
    }
    let (status, by_format) =
        status_get(&mesh, StatusPort::Admin, "/stats?format=prometheus").await;
    assert_eq!(status, 200);
    assert!(by_format.contains("# TYPE istio_requests_total counter"));
    let (status, stats) = status_get(&mesh, StatusPort::Admin, "/stats").await;
    assert_eq!(status, 200);
    // `/stats` names them as Envoy does (compared with a real Envoy in
    // tests/telemetry_prometheus.rs `admin_stats_name_stats_as_envoy_does`): dotted, the tag
    // values back in the name, no labels.
    let cluster = "cluster.outbound|9080||details.default.svc.cluster.local;.";
    for line in [
        format!("{cluster}upstream_rq_total: "),
        format!("{cluster}upstream_rq_200: "),
        "server.live: 1".to_owned(),
    ] {
        assert!(
            stats.lines().any(|l| l.starts_with(&line)),
            "no {line:?} in /stats:\n{stats}"
        );
    }
    assert!(!stats.contains('{'), "labels in /stats:\n{stats}");
    assert!(!stats.contains("istio_requests_total"), "{stats}");

    let Some(tools) = support::prometheus::tools() else {
        return;
    };
    tools.check_clean("15000 /stats/prometheus", &prometheus);
    tools.check_clean("15000 /stats?format=prometheus", &by_format);
    // Every sample reads back through `prometheus_client`'s parser too.
    let parsed = tools.python_parse(&prometheus);
    assert!(
        parsed
            .iter()
            .any(|s| s.name == "istio_requests_total" && s.label("reporter") == Some("source")),
        "prometheus_client found no istio_requests_total"
    );
}
