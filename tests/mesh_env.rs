//! `MeshBuilder::from_strings` with the environment Istio's injector sets, injected as a map:
//! the same path as `Mesh::from_env()` without touching the process environment. The
//! control plane listens with TLS (like istiod's :15012), verified against the root file in
//! `XDS_ROOT_CA`, and authenticates the token from `ISTIO_TOKEN_PATH`.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{
    ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec, XdsEvent,
};
use mesh::{Mesh, MeshBuilder};
use support::mesh::{Echo, NS, WAIT, field, next_event, node, ready, spiffe, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_strings_with_the_injected_environment_starts_a_working_mesh() {
    let ca = TestCa::new("cluster.local");
    let cp = ControlPlane::builder()
        .tls(true)
        .ca(ca.clone())
        .require_token(true)
        .start()
        .await
        .unwrap();
    let mut events = cp.events();
    let dir = temp_dir("env");
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, ca.token_for(NS, "productpage")).unwrap();

    // A meshed backend on the same control plane, with a static certificate.
    let backend = Mesh::builder(node("reviews-0", "reviews"))
        .discovery_address(
            format!("localhost:{}", cp.addr().port()),
            true,
            Some(root.clone()),
        )
        .token_path(token.clone())
        .certificate(mesh::CertificateSource::Static(Box::new(
            ca.workload_certificate(&spiffe("reviews"), Duration::from_secs(3600)),
        )))
        .bind_address("127.0.0.1".parse().unwrap())
        .status_ports(None, None, None)
        .start()
        .await
        .unwrap();
    ready(&backend).await;
    let app = Echo::new("reviews");
    let (addr, _serving) = app.serve_meshed(&backend).await;
    cp.set_model(
        MeshModel::default().service(
            ServiceSpec::new("reviews", NS, "10.96.0.60".parse().unwrap())
                .port(9080, Protocol::Http)
                .endpoint(EndpointSpec::new(addr).service_account("reviews")),
        ),
    );

    let address = format!("localhost:{}", cp.addr().port());
    let env: HashMap<String, String> = [
        ("POD_NAME", "productpage-v1-6b746f74dc-9stvs"),
        ("POD_NAMESPACE", NS),
        ("INSTANCE_IP", "127.0.0.1"),
        ("SERVICE_ACCOUNT", "productpage"),
        ("DISCOVERY_ADDRESS", address.as_str()),
        ("CA_ADDR", address.as_str()),
        ("XDS_ROOT_CA", root.to_str().unwrap()),
        ("ISTIO_TOKEN_PATH", token.to_str().unwrap()),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("ISTIO_META_WORKLOAD_NAME", "productpage-v1"),
        (
            "ISTIO_METAJSON_LABELS",
            r#"{"app":"productpage","version":"v1"}"#,
        ),
        ("SECRET_TTL", "1h"),
        ("STATUS_PORT", "0"),
        ("TERMINATION_DRAIN_DURATION_SECONDS", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let builder = MeshBuilder::from_strings(&env).expect("the injected environment is valid");
    let config = builder.config();
    assert_eq!(config.node.pod_name, "productpage-v1-6b746f74dc-9stvs");
    assert_eq!(config.node.service_account, "productpage");
    assert_eq!(config.node.workload_name, "productpage-v1");
    assert_eq!(
        config.node.labels.get("version").map(String::as_str),
        Some("v1")
    );
    assert!(config.discovery.tls, "a non-15010 address is TLS");
    assert_eq!(config.secret_ttl, Duration::from_secs(3600));
    assert_eq!(config.termination_drain, Duration::from_secs(1));
    assert_eq!(config.status_port, None, "STATUS_PORT=0 turns 15020 off");

    // Fixed pod ports cannot be used in tests: move 15021/15090 to free loopback ports.
    let mesh = builder
        .status_ports(None, Some(0), Some(0))
        .bind_address("127.0.0.1".parse().unwrap())
        .start()
        .await
        .expect("mesh starts from the environment");
    ready(&mesh).await;

    let opened = next_event(&mut events, "the productpage stream", |e| match e {
        XdsEvent::StreamOpened {
            node_id,
            authorization,
            ..
        } if node_id.contains("productpage") => Some((node_id.clone(), authorization.clone())),
        _ => None,
    })
    .await;
    assert_eq!(
        opened.0,
        "sidecar~127.0.0.1~productpage-v1-6b746f74dc-9stvs.default~default.svc.cluster.local"
    );
    // The token from ISTIO_TOKEN_PATH, as istio-agent sends it (require_token refuses others).
    let auth = opened.1.expect("authorization sent");
    let sent = auth.strip_prefix("Bearer ").expect("Bearer scheme");
    assert_eq!(ca.authenticate(sent), Ok(spiffe("productpage")));

    let cert = mesh
        .certificates()
        .current()
        .expect("certificate from the CA");
    assert_eq!(cert.identity, spiffe("productpage"));
    let issued = ca
        .requests()
        .into_iter()
        .filter(|r| r.identity == Some(spiffe("productpage")))
        .count();
    assert!(issued >= 1);

    let resp = tokio::time::timeout(WAIT, mesh.http_client().get("http://reviews:9080/from-env"))
        .await
        .unwrap()
        .unwrap();
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(field(&body, "server"), "reviews");
    assert_eq!(field(&body, "peer"), spiffe("productpage").to_string());
    assert_eq!(app.hits(), 1);
}
