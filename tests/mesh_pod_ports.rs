//! Whole-library pod-facing ports: `/healthz/ready` on 15020 and 15021 answers 503 until the
//! first configuration *and* a certificate are in, then 200; `/stats/prometheus` on 15020 and
//! 15090 carries Istio's `istio_requests_total` once a request went through.

mod support;

use std::time::Duration;

use mesh::CertificateSource;
use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use support::mesh::{Echo, NS, Plane, WAIT, eventually, node, ready, spiffe, status_get};
use tokio::net::TcpListener;

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
