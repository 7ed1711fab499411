//! CaClient against a real tonic server serving the testkit CA (plaintext and TLS).

use crate::ca_support;

use std::time::{Duration, SystemTime};

use ca_support::{Scratch, serve_ca};
use mesh_core::SpiffeId;
use mesh_xds::ca::{CaClient, CaError, generate_csr, parse_certificate_chain};
use mesh_xds::testkit::ca::TestCa;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME;

fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

async fn client_with_token(
    ca: &TestCa,
    scratch: &Scratch,
    tls: bool,
    token: Option<&str>,
) -> CaClient {
    let root = tls.then(|| scratch.write("root-cert.pem", &ca.root_pem()));
    let addr = serve_ca(ca, tls, root).await;
    let token_path = token.map(|t| scratch.write("istio-token", t));
    CaClient::connect(&addr, token_path, "Kubernetes".into(), vec![])
        .await
        .unwrap()
}

async fn check_issued_for_token_identity(tls: bool) {
    let ca = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let client =
        client_with_token(&ca, &scratch, tls, Some(&ca.token_for("prod", "reviews"))).await;
    // The CSR asks for another identity: istiod ignores it and uses the token's.
    let csr = generate_csr(&SpiffeId::new("cluster.local", "default", "impostor")).unwrap();
    let before = SystemTime::now();
    let chain = tokio::time::timeout(
        Duration::from_secs(20),
        client.create_certificate(&csr.csr_pem, Duration::from_secs(3600)),
    )
    .await
    .unwrap()
    .unwrap();

    assert_eq!(chain.len(), 2, "leaf + root");
    assert!(chain.iter().all(|c| c.ends_with('\n')));
    assert_eq!(pem_to_der(&chain[1]), ca.root_der());

    let leaf_der = pem_to_der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let root_der = ca.root_der();
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.subject().iter().count(), 0, "empty subject");
    assert_eq!(leaf.issuer().to_string(), "O=cluster.local");
    let san_ext = leaf
        .get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME)
        .unwrap()
        .unwrap();
    assert!(san_ext.critical, "SAN must be critical");
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/prod/sa/reviews"
        )]
    );
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    // notBefore = now − 2 min, notAfter = now + ttl.
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert_eq!(na - nb, 3600 + 120);
    let now = before
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((nb - (now - 120)).abs() <= 5, "notBefore {nb} vs now {now}");

    // The key from the CSR matches the issued leaf.
    let wc = parse_certificate_chain(&chain, csr.private_key_pkcs8_der).unwrap();
    assert_eq!(
        wc.identity,
        SpiffeId::new("cluster.local", "prod", "reviews")
    );
    let key = rustls::crypto::ring::sign::any_supported_type(
        &rustls_pki_types::PrivateKeyDer::Pkcs8(wc.private_key.clone().into()),
    )
    .unwrap();
    let certified =
        rustls::sign::CertifiedKey::new(wc.chain.iter().map(|c| c.clone().into()).collect(), key);
    certified.keys_match().unwrap();

    let requests = ca.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        r.identity,
        Some(SpiffeId::new("cluster.local", "prod", "reviews"))
    );
    assert_eq!(r.cluster_id.as_deref(), Some("Kubernetes"));
    assert_eq!(r.validity_duration, 3600);
    assert_eq!(r.cert_signer.as_deref(), Some(""));
    assert_eq!(
        r.csr_uri_sans,
        vec!["spiffe://cluster.local/ns/default/sa/impostor".to_owned()]
    );
    assert_eq!(r.outcome, tonic::Code::Ok);
}

#[tokio::test]
async fn plaintext_csr_gets_the_token_identity() {
    check_issued_for_token_identity(false).await;
}

#[tokio::test]
async fn tls_csr_gets_the_token_identity() {
    check_issued_for_token_identity(true).await;
}

#[tokio::test]
async fn tls_rejects_a_server_from_another_root() {
    let ca = TestCa::new("cluster.local");
    let other = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let root = scratch.write("root-cert.pem", &other.root_pem());
    let addr = serve_ca(&ca, true, Some(root)).await;
    let token = scratch.write("istio-token", &ca.token_for("prod", "reviews"));
    let client = CaClient::connect(&addr, Some(token), String::new(), vec![])
        .await
        .unwrap();
    let csr = generate_csr(&SpiffeId::new("cluster.local", "prod", "reviews")).unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.create_certificate(&csr.csr_pem, Duration::from_secs(3600)),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, CaError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("root-cert.pem"), "{text}");
    assert!(
        ca.requests().is_empty(),
        "the request must not reach the CA"
    );
}

#[tokio::test]
async fn tls_without_root_file_is_a_configuration_error() {
    let ca = TestCa::new("cluster.local");
    let mut addr = serve_ca(&ca, true, None).await;
    let err = CaClient::connect(&addr, None, String::new(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::MissingRootCert { .. }), "{err:?}");
    addr.root_cert = Some("/nonexistent/mesh/root-cert.pem".into());
    let err = CaClient::connect(&addr, None, String::new(), vec![])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/mesh/root-cert.pem"),
        "{err}"
    );
}

async fn expect_unauthenticated(token: Option<&str>, ca: &TestCa) -> CaError {
    let scratch = Scratch::new();
    let client = client_with_token(ca, &scratch, false, token).await;
    let csr = generate_csr(&SpiffeId::new("cluster.local", "prod", "reviews")).unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.create_certificate(&csr.csr_pem, Duration::from_secs(3600)),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, CaError::Unauthenticated { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("request authenticate failure"), "{text}");
    assert!(text.contains("token"), "{text}");
    err
}

#[tokio::test]
async fn missing_token_is_unauthenticated_with_a_hint() {
    let ca = TestCa::new("cluster.local");
    let err = expect_unauthenticated(None, &ca).await;
    assert!(err.to_string().contains("no token was sent"), "{err}");
    assert_eq!(ca.requests()[0].identity, None);
    assert_eq!(ca.requests()[0].outcome, tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn token_from_another_issuer_is_unauthenticated() {
    let ca = TestCa::new("cluster.local");
    let foreign = TestCa::new("cluster.local").token_for("prod", "reviews");
    let err = expect_unauthenticated(Some(&foreign), &ca).await;
    assert!(err.to_string().contains("istio-token"), "{err}");
}

#[tokio::test]
async fn token_with_wrong_audience_is_unauthenticated() {
    let ca = TestCa::new("cluster.local");
    let token = ca.token_with(
        "prod",
        "reviews",
        "kubernetes",
        SystemTime::now() + Duration::from_secs(600),
    );
    expect_unauthenticated(Some(&token), &ca).await;
}

#[tokio::test]
async fn token_is_reread_on_every_call() {
    let ca = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let client = client_with_token(&ca, &scratch, false, Some("not-a-jwt")).await;
    let csr = generate_csr(&SpiffeId::new("cluster.local", "prod", "reviews")).unwrap();
    let call = || {
        tokio::time::timeout(
            Duration::from_secs(20),
            client.create_certificate(&csr.csr_pem, Duration::from_secs(600)),
        )
    };
    assert!(matches!(
        call().await.unwrap(),
        Err(CaError::Unauthenticated { .. })
    ));
    scratch.write("istio-token", &ca.token_for("prod", "reviews"));
    let chain = call().await.unwrap().unwrap();
    assert_eq!(chain.len(), 2);
    std::fs::remove_file(scratch.0.join("istio-token")).unwrap();
    // A missing token file sends no credential; the CA's refusal names the missing file.
    let err = call().await.unwrap().unwrap_err();
    assert!(matches!(err, CaError::Unauthenticated { .. }), "{err:?}");
    assert!(err.to_string().contains("istio-token"), "{err}");
    assert!(err.to_string().contains("does not"), "{err}");
}

#[tokio::test]
async fn ttl_over_ninety_days_is_rejected_and_zero_means_a_day() {
    let ca = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let client =
        client_with_token(&ca, &scratch, false, Some(&ca.token_for("prod", "reviews"))).await;
    let csr = generate_csr(&SpiffeId::new("cluster.local", "prod", "reviews")).unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.create_certificate(&csr.csr_pem, Duration::from_secs(90 * 86400 + 1)),
    )
    .await
    .unwrap()
    .unwrap_err();
    match &err {
        CaError::Rpc { code, message, .. } => {
            assert_eq!(*code, tonic::Code::InvalidArgument);
            assert!(message.contains("TTL"), "{message}");
        }
        other => panic!("expected an Rpc error, got {other:?}"),
    }
    // Exactly 90 days is allowed; 0 means the 24h default.
    let chain = client
        .create_certificate(&csr.csr_pem, Duration::from_secs(90 * 86400))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    let chain = client
        .create_certificate(&csr.csr_pem, Duration::ZERO)
        .await
        .unwrap();
    let leaf_der = pem_to_der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let v = leaf.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        86400 + 120
    );
}

#[tokio::test]
async fn failing_ca_is_unavailable() {
    let ca = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let client =
        client_with_token(&ca, &scratch, false, Some(&ca.token_for("prod", "reviews"))).await;
    ca.set_failing(true);
    let csr = generate_csr(&SpiffeId::new("cluster.local", "prod", "reviews")).unwrap();
    let err = client
        .create_certificate(&csr.csr_pem, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Unavailable { .. }), "{err:?}");
    ca.set_failing(false);
    assert!(
        client
            .create_certificate(&csr.csr_pem, Duration::from_secs(600))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn unreachable_ca_is_unavailable() {
    // Bind then drop to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = mesh_core::config::ControlPlaneAddress {
        address: format!("127.0.0.1:{port}"),
        tls: false,
        root_cert: None,
        server_name: None,
    };
    let client = CaClient::connect(&addr, None, String::new(), vec![])
        .await
        .unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.create_certificate("csr", Duration::from_secs(600)),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, CaError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert!(err.to_string().contains(&addr.address), "{err}");
}

#[tokio::test]
async fn invalid_header_is_rejected_at_connect() {
    let addr = mesh_core::config::ControlPlaneAddress {
        address: "127.0.0.1:1".into(),
        tls: false,
        root_cert: None,
        server_name: None,
    };
    let err = CaClient::connect(
        &addr,
        None,
        String::new(),
        vec![("bad header".into(), "v".into())],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CaError::InvalidHeader { .. }), "{err:?}");
}

#[tokio::test]
async fn ca_headers_and_cluster_id_are_sent() {
    let ca = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let addr = serve_ca(&ca, false, None).await;
    let token = scratch.write("istio-token", &ca.token_for("prod", "reviews"));
    let client = CaClient::connect(
        &addr,
        Some(token),
        "east".into(),
        vec![("X-Tenant".into(), "blue".into())],
    )
    .await
    .unwrap();
    let csr = generate_csr(&SpiffeId::new("cluster.local", "prod", "reviews")).unwrap();
    client
        .create_certificate(&csr.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
    let r = &ca.requests()[0];
    assert_eq!(r.cluster_id.as_deref(), Some("east"));
    assert_eq!(r.headers.get("x-tenant").map(String::as_str), Some("blue"));
    assert_eq!(r.headers.get("clusterid").map(String::as_str), Some("east"));
    assert!(!r.headers.contains_key("authorization"));
}
