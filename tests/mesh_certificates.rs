//! Whole-library certificate behaviour: workload certificates come from the testkit CA for
//! the service account in the token; a CA outage after the first certificate leaves mTLS
//! serving; a STRICT mesh server refuses expired, not-yet-valid and wrongly signed peers;
//! a mesh client refuses a server whose SPIFFE ID is not in the cluster's SAN list (`UF`).

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use mesh::parts::core::flags::ResponseFlag;
use mesh::parts::xds::testkit::ca::{CaRequestRecord, TestCa};
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use mesh::{CertificateSource, InboundTlsMode};
use support::mesh::{
    ClientCert, Echo, NS, Plane, WAIT, assert_refused, eventually, field, node, ready, spiffe,
    tls_request,
};
use tokio::time::timeout;

const URL: &str = "http://backend.default.svc.cluster.local:9080/";

fn model(endpoint: SocketAddr, sa: &str) -> MeshModel {
    let mut m = MeshModel::default().service(
        ServiceSpec::new("backend", NS, "10.96.0.30".parse().unwrap())
            .port(9080, Protocol::Http)
            .endpoint(EndpointSpec::new(endpoint).service_account(sa)),
    );
    m.peer_authentication = InboundTlsMode::Strict;
    m
}

fn strict() -> MeshModel {
    MeshModel {
        peer_authentication: InboundTlsMode::Strict,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_certificate_comes_from_the_ca_for_the_tokens_service_account() {
    let plane = Plane::start(MeshModel::default()).await;
    let mesh = plane.ready_mesh("reviews").await;
    let cert = mesh
        .certificates()
        .current()
        .expect("a certificate is loaded");
    assert_eq!(cert.identity, spiffe("reviews"));
    assert_eq!(
        cert.roots,
        vec![plane.ca.root_der()],
        "the mesh trusts the CA's root"
    );
    assert!(cert.not_after > SystemTime::now());

    let requests = plane.ca.requests();
    let ok: Vec<_> = requests.iter().filter(|r| answered(r)).collect();
    assert_eq!(ok.len(), 1, "{requests:?}");
    assert_eq!(
        ok[0].identity,
        Some(spiffe("reviews")),
        "authenticated from the token"
    );
    assert_eq!(ok[0].csr_uri_sans, vec![spiffe("reviews").to_string()]);
    assert_eq!(ok[0].cluster_id.as_deref(), Some("Kubernetes"));
}

/// Whether the CA answered the request (`tonic::Code::Ok`; the root crate does not depend on
/// tonic, so compare by name).
fn answered(r: &CaRequestRecord) -> bool {
    format!("{:?}", r.outcome) == "Ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_after_the_first_certificate_keeps_mtls_serving() {
    let plane = Plane::start(strict()).await;
    // A short lifetime, so that the server tries to rotate while the CA is down.
    let server = plane
        .builder(node("backend-0", "backend"))
        .secret_ttl(Duration::from_secs(20))
        .start()
        .await
        .expect("mesh starts");
    ready(&server).await;
    let first = server.certificates().current().expect("certificate");
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr, "backend"));
    let client = plane.ready_mesh("client").await;

    plane.ca.set_failing(true);
    let before = plane.ca.requests().len();
    eventually("the server's rotation attempt to fail", || async {
        plane.ca.requests()[before..]
            .iter()
            .any(|r| !answered(r))
            .then_some(())
    })
    .await;

    // Still the first certificate, still ready, and still serving mTLS: through the mesh
    // client, and on a brand-new handshake.
    let current = server.certificates().current().expect("certificate kept");
    assert_eq!(current.not_after, first.not_after);
    assert!(server.is_ready());
    let resp = timeout(WAIT, client.http_client().get(URL))
        .await
        .unwrap()
        .unwrap();
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(field(&body, "peer"), spiffe("client").to_string());
    let issued = plane.ca.issue(&spiffe("other"), Duration::from_secs(600));
    let text = tls_request(
        addr,
        Some(ClientCert {
            chain: vec![issued.leaf_der],
            key: issued.key_der,
        }),
    )
    .await
    .expect("a new handshake succeeds during the outage");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!("peer={}", spiffe("other"))),
        "{text}"
    );

    // When the CA is back, the server rotates.
    plane.ca.set_failing(false);
    eventually("rotation after the outage", || async {
        let c = server.certificates().current()?;
        (c.not_after != first.not_after).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_server_refuses_expired_not_yet_valid_and_wrongly_signed_peers() {
    let plane = Plane::start(strict()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    let expired = plane
        .ca
        .issue_with_validity(&spiffe("client"), now - 2 * hour, now - hour);
    let early = plane
        .ca
        .issue_with_validity(&spiffe("client"), now + hour, now + 2 * hour);
    // Same issuer name (`O=cluster.local`), another key: the signature does not verify.
    let forged = TestCa::new("cluster.local").issue(&spiffe("client"), hour);
    for (what, c) in [
        ("expired", expired),
        ("not yet valid", early),
        ("wrongly signed", forged.clone()),
    ] {
        let outcome = tls_request(
            addr,
            Some(ClientCert {
                chain: vec![c.leaf_der],
                key: c.key_der,
            }),
        )
        .await;
        assert_refused(&outcome, what);
    }
    assert_eq!(app.hits(), 0);

    // A meshed client presenting the wrongly signed certificate gets no answer from the app.
    plane.cp.set_model(model(addr, "backend"));
    let client = plane
        .builder(node("client-0", "client"))
        .certificate(CertificateSource::Static(Box::new(
            mesh::parts::core::WorkloadCertificate {
                chain: vec![forged.leaf_der.clone()],
                private_key: forged.key_der.clone(),
                roots: vec![plane.ca.root_der()],
                identity: spiffe("client"),
                not_before: forged.not_before,
                not_after: forged.not_after,
            },
        )))
        .start()
        .await
        .unwrap();
    ready(&client).await;
    let resp = timeout(WAIT, client.http_client().get(URL))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 503, "{:?}", resp.body());
    assert_eq!(app.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_client_refuses_a_server_outside_the_clusters_san_list() {
    let plane = Plane::start(MeshModel::default()).await;
    // The pod behind the endpoint runs as `impostor`, but istiod says `backend`.
    let server = plane.ready_mesh("impostor").await;
    let app = Echo::new("impostor");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr, "backend"));
    let client = plane.ready_mesh("client").await;
    let resp = get_once_the_backend_cluster_is_known(&client).await;
    assert_eq!(resp.status(), 503, "{:?}", resp.body());
    // istiod's default route retries connect-failure twice; every attempt fails the SAN check,
    // so mesh flags it `URX,UF` as Envoy 1.40 does.
    assert_eq!(
        resp.extensions().get::<ResponseFlag>().map(|f| f.as_str()),
        Some("URX,UF")
    );
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers"),
        "{body}"
    );
    assert_eq!(app.hits(), 0);

    // Once istiod names the right service account, the same server is accepted.
    plane.cp.set_model(model(addr, "impostor"));
    let body = eventually_ok(&client, "the corrected SAN list").await;
    assert_eq!(field(&body, "server"), "impostor");
    assert_eq!(field(&body, "peer"), spiffe("client").to_string());
}

/// `SECRET_GRACE_PERIOD_RATIO` from the injected environment reaches the running mesh's
/// certificate rotation: with a 1h certificate and ratio 0.999 the mesh renews within seconds
/// (the default 0.5 would wait 30 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_ratio_from_the_environment_drives_the_meshs_rotation() {
    use std::collections::HashMap;
    let plane = Plane::start(MeshModel::default()).await;
    let env: HashMap<String, String> = [
        ("POD_NAME", "reviews-0"),
        ("POD_NAMESPACE", NS),
        ("INSTANCE_IP", "127.0.0.1"),
        ("SERVICE_ACCOUNT", "reviews"),
        ("SECRET_TTL", "1h"),
        ("SECRET_GRACE_PERIOD_RATIO", "0.999"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let addr = plane.cp.addr().to_string();
    let builder = mesh::MeshBuilder::from_strings(&env).unwrap();
    assert_eq!(builder.config().secret_rotation.grace_period_ratio, 0.999);
    let mesh = builder
        .discovery_address(addr.clone(), false, None)
        .ca_address(addr, false, None)
        .token_path(plane.token_file("reviews-0", "reviews"))
        .certificate(CertificateSource::IstioCa)
        .bind_address("127.0.0.1".parse().unwrap())
        .status_ports(None, Some(0), Some(0))
        .start()
        .await
        .unwrap();
    ready(&mesh).await;
    let first = mesh.certificates().current().unwrap();
    let mut rx = mesh.certificates().subscribe();
    let renewed = timeout(Duration::from_secs(30), async {
        loop {
            if let Some(c) = mesh
                .certificates()
                .current()
                .filter(|c| c.chain[0] != first.chain[0])
            {
                return c;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("renewed long before half-life");
    assert_eq!(renewed.identity, spiffe("reviews"));
    let left = first.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(1800),
        "renewed with {left:?} left"
    );
}

/// The outbound side of `trustDomainAliases`: istiod expands the cluster's SAN list with the
/// aliases (`ExpandWithTrustDomains`), so a mesh client accepts a server whose certificate is
/// in the alias trust domain; without the alias the same server fails the SAN check (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_domain_aliases_extend_the_outbound_san_list() {
    let plane = Plane::start(MeshModel::default()).await;
    let alias_backend = mesh::SpiffeId::new("alias.domain", NS, "backend");
    let server = plane
        .builder(node("backend-0", "backend"))
        .certificate(CertificateSource::Static(Box::new(
            plane
                .ca
                .workload_certificate(&alias_backend, Duration::from_secs(3600)),
        )))
        .start()
        .await
        .unwrap();
    ready(&server).await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr, "backend"));
    let client = plane.ready_mesh("sleep").await;
    let resp = get_once_the_backend_cluster_is_known(&client).await;
    assert_eq!(resp.status(), 503, "{:?}", resp.body());
    assert_eq!(app.hits(), 0);

    plane
        .cp
        .set_model(model(addr, "backend").trust_domain_alias("alias.domain"));
    let body = eventually_ok(&client, "the SAN list with the alias").await;
    assert_eq!(field(&body, "peer"), spiffe("sleep").to_string());
    assert_eq!(app.hits(), 1);
}

/// Waits (bounded) until `client` knows the backend cluster, then sends one request.
async fn get_once_the_backend_cluster_is_known(
    client: &mesh::Mesh,
) -> http::Response<bytes::Bytes> {
    eventually("the backend cluster to arrive", || async {
        client
            .snapshot()
            .cluster("outbound|9080||backend.default.svc.cluster.local")
            .map(|_| ())
    })
    .await;
    timeout(WAIT, client.http_client().get(URL))
        .await
        .unwrap()
        .unwrap()
}

/// Waits (bounded) until a request from `client` to the backend answers 200; its body.
async fn eventually_ok(client: &mesh::Mesh, what: &str) -> String {
    eventually(what, || async {
        let resp = client.http_client().get(URL).await.ok()?;
        (resp.status() == 200).then(|| String::from_utf8_lossy(resp.body()).into_owned())
    })
    .await
}

/// `PROV_CERT` and `OUTPUT_CERTS` as pilot-agent uses them on VMs: with no token, the CA
/// refuses the mesh; with a provisioned certificate in `PROV_CERT` it authenticates the caller
/// by TLS client certificate and issues a certificate for that identity, which the mesh also
/// writes to `OUTPUT_CERTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prov_cert_authenticates_to_the_ca_and_output_certs_receives_the_issued_certificate() {
    use mesh::parts::xds::secrets::pem::{
        workload_certificate_from_pem, workload_certificate_to_pem,
    };
    use mesh::parts::xds::testkit::ControlPlane;
    let ca = TestCa::new("cluster.local");
    let cp = ControlPlane::builder()
        .tls(true)
        .ca(ca.clone())
        .start()
        .await
        .unwrap();
    let dir = support::mesh::temp_dir("prov-cert");
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    let address = format!("localhost:{}", cp.addr().port());
    let vm = spiffe("vm-app");
    let builder = |token_sa_missing: &std::path::Path| {
        mesh::Mesh::builder(node("vm-app-0", "vm-app"))
            .discovery_address(address.clone(), true, Some(root.clone()))
            .ca_address(address.clone(), true, Some(root.clone()))
            // No projected token on a VM: the file does not exist, so none is sent.
            .token_path(token_sa_missing)
            .certificate(CertificateSource::IstioCa)
            .bind_address("127.0.0.1".parse().unwrap())
            .status_ports(None, Some(0), Some(0))
    };
    let no_token = dir.join("no-token");

    // Without PROV_CERT the CA cannot authenticate the caller.
    let unauthenticated = builder(&no_token).start().await.unwrap();
    eventually("the CA to refuse the unauthenticated caller", || async {
        ca.requests()
            .iter()
            .any(|r| format!("{:?}", r.outcome) == "Unauthenticated")
            .then_some(())
    })
    .await;
    assert!(unauthenticated.certificates().current().is_none());
    drop(unauthenticated);

    let prov = dir.join("prov");
    std::fs::create_dir_all(&prov).unwrap();
    let provisioned = ca.workload_certificate(&vm, Duration::from_secs(3600));
    let (chain, key, roots) = workload_certificate_to_pem(&provisioned);
    std::fs::write(prov.join("cert-chain.pem"), chain).unwrap();
    std::fs::write(prov.join("key.pem"), key).unwrap();
    std::fs::write(prov.join("root-cert.pem"), roots).unwrap();
    let out = dir.join("out");
    let mesh = builder(&no_token)
        .provisioned_certs(&prov)
        .output_certs(&out)
        .start()
        .await
        .unwrap();
    ready(&mesh).await;
    let cert = mesh.certificates().current().unwrap();
    assert_eq!(cert.identity, vm);
    assert_ne!(
        cert.chain[0], provisioned.chain[0],
        "a freshly issued certificate"
    );
    let ok: Vec<_> = ca.requests().into_iter().filter(answered).collect();
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(
        ok[0].identity,
        Some(vm.clone()),
        "authenticated by client certificate"
    );

    let written = eventually("the issued certificate in OUTPUT_CERTS", || async {
        let read = |f: &str| std::fs::read(out.join(f)).ok();
        let loaded = workload_certificate_from_pem(
            &read("cert-chain.pem")?,
            &read("key.pem")?,
            &read("root-cert.pem")?,
        )
        .ok()?;
        (loaded.chain == cert.chain).then_some(loaded)
    })
    .await;
    assert_eq!(written.private_key, cert.private_key);
    assert_eq!(written.roots, vec![ca.root_der()]);
}
