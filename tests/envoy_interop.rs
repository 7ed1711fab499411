//! Interop with a real Envoy 1.40 playing the Istio sidecar on the other end of mTLS, with
//! every certificate issued by the testkit CA that also serves mesh's certificates:
//!
//! * Envoy (outbound sidecar) → mesh-served app (STRICT): the app sees Envoy's SPIFFE ID;
//! * mesh client → Envoy (inbound sidecar, STRICT) → app: the app sees mesh's SPIFFE ID in
//!   XFCC, over HTTP/1.1 and HTTP/2;
//! * refusals: Envoy expecting another SAN than mesh's server presents gets 503; a TLS client
//!   without a certificate, or with one from another root, is refused by mesh under STRICT.
//!
//! The Envoy tests skip (with the reason printed) when Envoy is not installed and `CI` is
//! not set; in CI the harness installs it.

use crate::support;

use std::time::Duration;

use mesh::InboundTlsMode;
use mesh::parts::tower::outbound::UpstreamPrincipal;
use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use support::envoy::{
    EnvoyProcess, InboundMode, SidecarBootstrap, SidecarCerts, envoy_binary, free_port,
};
use support::mesh::{
    ClientCert, Echo, NS, Plane, WAIT, assert_refused, field, http_get, spiffe, tls_request,
};
use tokio::time::timeout;

const SERVER_FQDN: &str = "server.default.svc.cluster.local";

fn strict_model() -> MeshModel {
    MeshModel {
        peer_authentication: InboundTlsMode::Strict,
        ..Default::default()
    }
}

/// Envoy's certificate material for service account `sa`, issued by `ca`.
fn envoy_certs(ca: &TestCa, sa: &str) -> SidecarCerts {
    let issued = ca.issue(&spiffe(sa), Duration::from_secs(3600));
    SidecarCerts {
        cert_chain_pem: issued.leaf_pem,
        key_pem: issued.key_pem,
        root_pem: ca.root_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_calls_a_mesh_served_app_over_istio_mtls() {
    let Some(_) = envoy_binary() else { return };
    let plane = Plane::start(strict_model()).await;
    let server = plane.ready_mesh("server").await;
    let app = Echo::new("server");
    let (app_addr, _serving) = app.serve_meshed(&server).await;

    let outbound_port = free_port();
    let wrong_san_port = free_port();
    let envoy = EnvoyProcess::start(
        &SidecarBootstrap::new("envoy-client-0", NS, envoy_certs(&plane.ca, "envoy-client"))
            .outbound(
                outbound_port,
                8080,
                SERVER_FQDN,
                app_addr,
                &spiffe("server").to_string(),
            )
            // The same mesh server, but Envoy expects another identity: it must check the SAN.
            .outbound(
                wrong_san_port,
                8081,
                "impostor.default.svc.cluster.local",
                app_addr,
                &spiffe("impostor").to_string(),
            )
            .to_yaml(),
    );
    let envoy_addr = ([127, 0, 0, 1], outbound_port).into();

    let (status, body) = http_get(envoy_addr, SERVER_FQDN, "/from-envoy")
        .await
        .expect("envoy answers");
    assert_eq!(status, 200, "body: {body}\n--- envoy ---\n{}", envoy.logs());
    assert_eq!(field(&body, "server"), "server");
    assert_eq!(field(&body, "path"), "/from-envoy");
    // mesh verified Envoy's client certificate and handed its identity to the app.
    assert_eq!(
        field(&body, "peer"),
        spiffe("envoy-client").to_string(),
        "{body}"
    );
    let cluster = format!("cluster.outbound|8080||{SERVER_FQDN}");
    assert!(
        envoy.wait_for_stat(&format!("{cluster}.ssl.handshake"), 1) >= 1,
        "not over TLS"
    );
    assert_eq!(
        envoy.wait_for_stat(&format!("{cluster}.upstream_rq_200"), 1),
        1
    );
    assert_eq!(
        envoy.wait_for_stat(&format!("{cluster}.ssl.ciphers.TLS_AES_128_GCM_SHA256"), 1),
        1,
        "mesh's server took the Envoy client's cipher preference"
    );

    // A second request on Envoy's pooled connection still carries the identity.
    let (status, body) = http_get(envoy_addr, "server.default:8080", "/again")
        .await
        .expect("envoy answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&body, "peer"), spiffe("envoy-client").to_string());
    let hits = app.hits();
    assert_eq!(hits, 2);

    // Envoy expecting `impostor` refuses mesh's `server` certificate: 503, SAN verify failure.
    let (status, body) = http_get(
        ([127, 0, 0, 1], wrong_san_port).into(),
        "impostor.default.svc.cluster.local",
        "/",
    )
    .await
    .expect("envoy answers");
    assert_eq!(status, 503, "{body}");
    let impostor = "cluster.outbound|8081||impostor.default.svc.cluster.local";
    assert!(envoy.wait_for_stat(&format!("{impostor}.ssl.fail_verify_san"), 1) >= 1);
    assert_eq!(
        app.hits(),
        hits,
        "the app was reached through a connection Envoy refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_client_calls_an_app_behind_an_envoy_sidecar_over_istio_mtls() {
    let Some(_) = envoy_binary() else { return };
    let app = Echo::new("behind-envoy");
    let app_addr = app.serve_plain().await;
    let ca = TestCa::new("cluster.local");
    let inbound_port = free_port();
    let envoy = EnvoyProcess::start(
        &SidecarBootstrap::new("envoy-server-0", NS, envoy_certs(&ca, "envoy-server"))
            .inbound(inbound_port, app_addr.port(), InboundMode::Strict)
            .to_yaml(),
    );

    // What istiod would tell mesh about the service behind Envoy: one meshed endpoint (the
    // sidecar's inbound port), service account envoy-server; port 8080 is HTTP/1.1, 8081 h2.
    let model = MeshModel::default().service(
        ServiceSpec::new("envoy-app", NS, "10.96.0.50".parse().unwrap())
            .port(8080, Protocol::Http)
            .port(8081, Protocol::Http2)
            .endpoint(
                EndpointSpec::new(([127, 0, 0, 1], inbound_port).into())
                    .service_account("envoy-server"),
            ),
    );
    let plane = Plane::start_with_ca(model, ca).await;
    let client = plane.ready_mesh("client").await;
    let http = client.http_client();

    for (port, proto) in [(8080, "HTTP/1.1"), (8081, "h2")] {
        let resp = timeout(
            WAIT,
            http.get(format!(
                "http://envoy-app.{NS}.svc.cluster.local:{port}/via-mesh"
            )),
        )
        .await
        .expect("bounded")
        .expect("response");
        let body = String::from_utf8_lossy(resp.body()).into_owned();
        assert_eq!(
            resp.status(),
            200,
            "{proto}: {body}\n--- envoy ---\n{}",
            envoy.logs()
        );
        assert_eq!(field(&body, "server"), "behind-envoy");
        assert_eq!(field(&body, "path"), "/via-mesh");
        // Envoy verified mesh's client certificate and forwarded its SPIFFE ID in XFCC.
        let xfcc = field(&body, "xfcc");
        assert!(
            xfcc.contains(&format!("URI={}", spiffe("client"))),
            "{proto}: xfcc={xfcc}"
        );
        assert!(
            xfcc.contains(&format!("By={}", spiffe("envoy-server"))),
            "{proto}: xfcc={xfcc}"
        );
        // mesh verified Envoy's server certificate against the cluster's SAN list.
        let peer = resp
            .extensions()
            .get::<UpstreamPrincipal>()
            .map(|p| p.0.to_string());
        assert_eq!(peer, Some(spiffe("envoy-server").to_string()), "{proto}");
    }
    let inbound_http = format!("http.inbound_0.0.0.0_{}", app_addr.port());
    assert!(envoy.wait_for_stat(&format!("{inbound_http}.downstream_cx_http1_total"), 1) >= 1);
    assert!(envoy.wait_for_stat(&format!("{inbound_http}.downstream_cx_http2_total"), 1) >= 1);
    assert_eq!(
        envoy.wait_for_stat(
            &format!("listener.127.0.0.1_{inbound_port}.ssl.fail_verify_no_cert"),
            0
        ),
        0
    );
    // Envoy's listener negotiated the cipher an Envoy client would have: BoringSSL prefers
    // AES-128-GCM in TLS 1.3, and so does mesh's client (rustls alone offers AES-256 first).
    let ciphers = format!("listener.127.0.0.1_{inbound_port}.ssl.ciphers");
    assert_eq!(
        envoy.wait_for_stat(&format!("{ciphers}.TLS_AES_128_GCM_SHA256"), 2),
        2,
        "--- envoy ---\n{}",
        envoy.logs()
    );
    assert_eq!(
        envoy.wait_for_stat(&format!("{ciphers}.TLS_AES_256_GCM_SHA384"), 0),
        0
    );
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mesh_server_refuses_clients_without_a_valid_certificate() {
    let plane = Plane::start(strict_model()).await;
    let server = plane.ready_mesh("server").await;
    let app = Echo::new("server");
    let (addr, _serving) = app.serve_meshed(&server).await;

    // No client certificate.
    let outcome = tls_request(addr, None).await;
    assert_refused(&outcome, "TLS without a client certificate");

    // A certificate for a mesh identity, but from another root.
    let other = TestCa::new("cluster.local");
    let foreign = other.issue(&spiffe("client"), Duration::from_secs(3600));
    let outcome = tls_request(
        addr,
        Some(ClientCert {
            chain: vec![foreign.leaf_der],
            key: foreign.key_der,
        }),
    )
    .await;
    assert_refused(&outcome, "certificate from another root");

    // Plaintext HTTP under STRICT.
    let plain = http_get(addr, "server", "/").await;
    assert!(
        !matches!(plain, Ok((200, _))),
        "plaintext served under STRICT: {plain:?}"
    );
    assert_eq!(app.hits(), 0, "a refused client reached the app");

    // The control: the same client with a certificate from the mesh's CA is served.
    let good = plane.ca.issue(&spiffe("client"), Duration::from_secs(3600));
    let outcome = tls_request(
        addr,
        Some(ClientCert {
            chain: vec![good.leaf_der],
            key: good.key_der,
        }),
    )
    .await;
    let text = outcome.expect("a valid client is served");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!("peer={}", spiffe("client"))),
        "{text}"
    );
    assert_eq!(app.hits(), 1);
}
