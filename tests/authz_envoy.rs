//! Authorization interop with a real Envoy 1.40 sidecar under STRICT Istio mTLS, every
//! certificate from the testkit CA:
//!
//! * Envoy sidecar client → mesh server with an ALLOW policy for the Envoy client's principal
//!   and a DENY on `/admin*`: allowed requests 200, denied 403 `RBAC: access denied`;
//! * mesh client → app behind an Envoy sidecar whose inbound HCM carries the RBAC filters
//!   istiod renders (the same testkit rendering mesh is fed): the same status codes;
//! * differential: the same policies and the same 40 requests (principals, methods, paths
//!   with normalization edge cases, spoofed headers) to a mesh server and to Envoy give the
//!   same status for every request.
//!
//! Envoy gets istiod's RBAC filters with one change: principals matched on Istio's
//! `io.istio.peer_principal` filter state (which upstream Envoy does not set) are matched as
//! `authenticated.principal_name`, the same URI SAN ([`upstream_principals`]).
//!
//! Skips (printing why) when Envoy is not installed and `CI` is not set.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh::InboundTlsMode;
use mesh::parts::xds::ads::LISTENER;
use mesh::parts::xds::testkit::authz::{
    AuthorizationPolicySpec, PolicyAction, RuleSpec, http_rbac_filters, virtual_inbound_with_authz,
};
use mesh::parts::xds::testkit::ca::TestCa;
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use support::envoy::{
    EnvoyProcess, InboundMode, SidecarBootstrap, SidecarCerts, envoy_binary, free_port,
};
use support::mesh::{Echo, NS, Plane, WAIT, eventually, http_get, istio_mtls_request, spiffe};
use tokio::time::timeout;

const SERVER_FQDN: &str = "server.default.svc.cluster.local";

pub(crate) fn strict_model() -> MeshModel {
    MeshModel {
        peer_authentication: InboundTlsMode::Strict,
        ..Default::default()
    }
}

fn envoy_certs(ca: &TestCa, sa: &str) -> SidecarCerts {
    let issued = ca.issue(&spiffe(sa), Duration::from_secs(3600));
    SidecarCerts {
        cert_chain_pem: issued.leaf_pem,
        key_pem: issued.key_pem,
        root_pem: ca.root_pem(),
    }
}

pub(crate) fn principal(sa: &str) -> String {
    format!("cluster.local/ns/{NS}/sa/{sa}")
}

/// ALLOW `allowed` principals; ALLOW `reader` GET on `/public*`; DENY `/admin*`; DENY DELETE
/// unless from `admin`.
fn policies(allowed: &[&str]) -> Vec<AuthorizationPolicySpec> {
    let mut allow = RuleSpec::default();
    for sa in allowed {
        allow = allow.principal(&principal(sa));
    }
    vec![
        AuthorizationPolicySpec::new("allow-clients", NS, PolicyAction::Allow)
            .rule(allow)
            .rule(
                RuleSpec::default()
                    .principal(&principal("reader"))
                    .method("GET")
                    .path("/public*"),
            )
            // ipBlocks: the peer address (loopback here), whatever x-forwarded-for says.
            .rule(RuleSpec::default().ip_block("127.0.0.1").path("/loopback*")),
        // remoteIpBlocks: the last x-forwarded-for entry (use_remote_address false).
        AuthorizationPolicySpec::new("deny-remote", NS, PolicyAction::Deny)
            .rule(RuleSpec::default().remote_ip_block("10.9.9.0/24")),
        AuthorizationPolicySpec::new("deny-admin", NS, PolicyAction::Deny)
            .rule(RuleSpec::default().path("/admin*")),
        AuthorizationPolicySpec::new("deny-delete", NS, PolicyAction::Deny).rule(
            RuleSpec::default()
                .method("DELETE")
                .not_principal(&principal("admin")),
        ),
    ]
}

/// A client config presenting `sa`'s certificate from `ca`, accepting any server.
pub(crate) fn client_config(ca: &TestCa, sa: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(ring::default_provider());
    let c = ca.issue(&spiffe(sa), Duration::from_secs(3600));
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(support::mesh::AcceptAnyServer(Arc::new(
            ring::default_provider(),
        ))))
        .with_client_auth_cert(
            vec![CertificateDer::from(c.leaf_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der)),
        )
        .map_err(|e| e.to_string())
}

/// A gRPC-shaped request's headers (no body).
const GRPC_REQUEST: &[(&str, &str)] = &[
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("content-length", "0"),
];

/// Envoy's RBAC denial of a gRPC request (status, `content-type`, `grpc-status`,
/// `grpc-message`): trailers-only, PERMISSION_DENIED.
type GrpcDenial<'a> = (u16, Option<&'a str>, Option<&'a str>, Option<&'a str>);
const GRPC_RBAC_DENIED: GrpcDenial<'static> = (
    200,
    Some("application/grpc"),
    Some("7"),
    Some("RBAC: access denied"),
);

/// The SNI a sidecar sends to the server's port 8080.
pub(crate) const SERVER_SNI: &str = "outbound_.8080_._.server.default.svc.cluster.local";

/// One HTTP/1.1 request over Istio mTLS with `sa`'s certificate: (status, body).
async fn mtls(
    ca: &TestCa,
    addr: SocketAddr,
    sa: &str,
    method: &str,
    path: &str,
    extra: &str,
) -> Result<(u16, String), String> {
    istio_mtls_request(
        client_config(ca, sa)?,
        addr,
        SERVER_SNI,
        &format!("{method} {path} HTTP/1.1\r\nHost: server\r\n{extra}"),
    )
    .await
}

/// The Envoy bootstrap with `policies`' RBAC filters (as istiod renders them, converted to
/// Envoy's JSON) inserted before the router of every inbound HTTP connection manager.
fn with_rbac(mut bootstrap: Value, policies: &[AuthorizationPolicySpec]) -> Value {
    let filters: Vec<Value> = http_rbac_filters(policies)
        .iter()
        .map(|f| {
            let Some(
                envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(any),
            ) = &f.config_type
            else {
                panic!("typed config")
            };
            let mut config = mesh::parts::xds::dump::resource_json(any).expect("rbac json");
            upstream_principals(&mut config);
            serde_json::json!({"name": f.name, "typed_config": config})
        })
        .collect();
    assert!(!filters.is_empty());
    let listeners = bootstrap["static_resources"]["listeners"]
        .as_array_mut()
        .expect("listeners");
    let mut patched = 0;
    for l in listeners
        .iter_mut()
        .filter(|l| l["name"] == "virtualInbound")
    {
        for chain in l["filter_chains"].as_array_mut().expect("chains") {
            for f in chain["filters"].as_array_mut().expect("filters") {
                let http = f["typed_config"]["http_filters"]
                    .as_array_mut()
                    .expect("http_filters");
                let mut all = filters.clone();
                all.append(http);
                *http = all;
                patched += 1;
            }
        }
    }
    assert!(patched > 0, "no inbound HCM to patch");
    bootstrap
}

/// istiod matches principals on the `io.istio.peer_principal` filter state, which Istio's
/// Envoy build sets to the peer certificate's URI SAN; upstream Envoy 1.40 has no such filter
/// state, so for it the same matcher is expressed as `authenticated.principal_name` (what
/// istiod rendered before filter state, matching the same URI SAN).
fn upstream_principals(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let replace = map
                .get("filter_state")
                .filter(|fs| fs["key"] == "io.istio.peer_principal")
                .map(|fs| fs["string_match"].clone());
            if let Some(matcher) = replace {
                map.remove("filter_state");
                map.insert(
                    "authenticated".into(),
                    serde_json::json!({"principal_name": matcher}),
                );
            }
            map.values_mut().for_each(upstream_principals);
        }
        Value::Array(items) => items.iter_mut().for_each(upstream_principals),
        _ => {}
    }
}

/// An Envoy sidecar with inbound RBAC (STRICT) in front of a plain app.
pub(crate) fn envoy_with_rbac(
    ca: &TestCa,
    app: SocketAddr,
    policies: &[AuthorizationPolicySpec],
) -> (EnvoyProcess, SocketAddr) {
    let port = free_port();
    let bootstrap = SidecarBootstrap::new("envoy-server-0", NS, envoy_certs(ca, "envoy-server"))
        .inbound(port, app.port(), InboundMode::Strict)
        .to_json();
    let text = serde_json::to_string_pretty(&with_rbac(bootstrap, policies)).unwrap();
    (EnvoyProcess::start(&text), ([127, 0, 0, 1], port).into())
}

/// A mesh server (STRICT) enforcing `policies`, pushed by the plane.
pub(crate) async fn mesh_with_rbac(
    plane: &Plane,
    app: &Echo,
    policies: &[AuthorizationPolicySpec],
) -> (mesh::Mesh, SocketAddr) {
    let server = plane.ready_mesh("server").await;
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(
        strict_model().service(
            ServiceSpec::new("server", NS, "10.96.0.60".parse().unwrap())
                .port(8080, Protocol::Http)
                .endpoint(EndpointSpec::new(addr).service_account("server")),
        ),
    );
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), policies, true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    let ca = plane.ca.clone();
    eventually("the mesh server enforces the policies", || {
        let ca = ca.clone();
        async move {
            match mtls(&ca, addr, "nobody", "GET", "/", "").await {
                Ok((403, _)) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_client_against_mesh_server_policy() {
    let Some(_) = envoy_binary() else { return };
    let plane = Plane::start(strict_model()).await;
    let app = Echo::new("server");
    let (_server, addr) = mesh_with_rbac(&plane, &app, &policies(&["envoy-client"])).await;
    let outbound_port = free_port();
    let envoy = EnvoyProcess::start(
        &SidecarBootstrap::new("envoy-client-0", NS, envoy_certs(&plane.ca, "envoy-client"))
            .outbound(
                outbound_port,
                8080,
                SERVER_FQDN,
                addr,
                &spiffe("server").to_string(),
            )
            .to_yaml(),
    );
    let via = ([127, 0, 0, 1], outbound_port).into();
    let before = app.hits();
    let (status, body) = http_get(via, SERVER_FQDN, "/hello")
        .await
        .expect("envoy answers");
    assert_eq!(status, 200, "{body}\n--- envoy ---\n{}", envoy.logs());
    assert_eq!(app.hits(), before + 1);
    for path in ["/admin", "/admin/users", "/x/../admin/y"] {
        let (status, body) = http_get(via, SERVER_FQDN, path)
            .await
            .expect("envoy answers");
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
    }
    assert_eq!(app.hits(), before + 1, "a denied request reached the app");
    // A gRPC request: mesh's denial in Envoy's gRPC form, as Envoy's own (see
    // `mesh_client_against_envoy_sidecar_rbac`), through the Envoy client.
    let denied = tokio::task::spawn_blocking(move || {
        crate::routing_oracle::KeepAlive::connect(outbound_port).request(
            "POST",
            SERVER_FQDN,
            "/admin",
            GRPC_REQUEST,
        )
    })
    .await
    .unwrap();
    let pick = |k: &str| denied.1.iter().find(|h| h.0 == k).map(|h| h.1.as_str());
    assert_eq!(
        (
            denied.0,
            pick("content-type"),
            pick("grpc-status"),
            pick("grpc-message")
        ),
        GRPC_RBAC_DENIED,
        "{denied:?}"
    );
    // Another identity than the Envoy client's: denied by the ALLOW policy.
    let (status, body) = mtls(&plane.ca, addr, "stranger", "GET", "/hello", "")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_client_against_envoy_sidecar_rbac() {
    let Some(_) = envoy_binary() else { return };
    let app = Echo::new("behind-envoy");
    let app_addr = app.serve_plain().await;
    let ca = TestCa::new("cluster.local");
    let policies = policies(&["client"]);
    let (envoy, inbound) = envoy_with_rbac(&ca, app_addr, &policies);
    let model = MeshModel::default().service(
        ServiceSpec::new("envoy-app", NS, "10.96.0.50".parse().unwrap())
            .port(8080, Protocol::Http)
            .endpoint(EndpointSpec::new(inbound).service_account("envoy-server")),
    );
    let plane = Plane::start_with_ca(model, ca).await;
    let client = plane.ready_mesh("client").await;
    let other = plane.ready_mesh("other").await;
    let url = |p: &str| format!("http://envoy-app.{NS}.svc.cluster.local:8080{p}");
    let get = |m: &mesh::Mesh, p: String| {
        let h = m.http_client();
        async move {
            let r = timeout(WAIT, h.get(p))
                .await
                .expect("bounded")
                .expect("response");
            (
                r.status().as_u16(),
                String::from_utf8_lossy(r.body()).into_owned(),
            )
        }
    };
    let (status, body) = get(&client, url("/hello")).await;
    assert_eq!(status, 200, "{body}\n--- envoy ---\n{}", envoy.logs());
    let (status, body) = get(&client, url("/admin/x")).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, body) = get(&other, url("/hello")).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    // Envoy's denial of a gRPC request: its gRPC form, passed through mesh's outbound.
    let mut req = http::Request::post(url("/admin/x"));
    for (k, v) in GRPC_REQUEST {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = timeout(WAIT, client.http_client().request(req))
        .await
        .expect("bounded");
    let pick = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok());
    assert_eq!(
        (
            r.status().as_u16(),
            pick("content-type"),
            pick("grpc-status"),
            pick("grpc-message")
        ),
        GRPC_RBAC_DENIED,
        "{r:?}"
    );
    assert_eq!(
        app.hits(),
        1,
        "a denied request reached the app behind Envoy"
    );
    let denied = envoy
        .stat(&format!(
            "http.inbound_0.0.0.0_{}.rbac.denied",
            app_addr.port()
        ))
        .unwrap_or(0);
    assert!(denied >= 2, "Envoy's RBAC filter denied {denied} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_policy_same_decisions_as_envoy() {
    let Some(_) = envoy_binary() else { return };
    let plane = Plane::start(strict_model()).await;
    let policies = policies(&["client", "admin"]);
    let mesh_app = Echo::new("server");
    let (_server, mesh_addr) = mesh_with_rbac(&plane, &mesh_app, &policies).await;
    let envoy_app = Echo::new("behind-envoy");
    let envoy_app_addr = envoy_app.serve_plain().await;
    let (envoy, envoy_addr) = envoy_with_rbac(&plane.ca, envoy_app_addr, &policies);
    let mesh_base = mesh_app.hits();

    let principals = ["client", "admin", "reader", "stranger"];
    let requests = [
        ("GET", "/", ""),
        ("GET", "/public/a", ""),
        ("POST", "/public/a", ""),
        ("GET", "/admin", ""),
        ("GET", "/x/../admin", ""),
        ("GET", "/public/../admin/x", ""),
        ("GET", "/./admin/", ""),
        ("GET", "/ADMIN", ""),
        ("DELETE", "/item", ""),
        ("GET", "/", "x-forwarded-for: 10.9.9.9\r\n"),
        ("GET", "/", "x-forwarded-for: 10.9.9.9, 1.2.3.4\r\n"),
        ("GET", "/", "x-forwarded-for: 1.2.3.4, 10.9.9.9\r\n"),
        ("GET", "/loopback", "x-forwarded-for: 10.1.1.1\r\n"),
        ("GET", "/loopback", ""),
        (
            "GET",
            "/public/b?x=/admin",
            "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/admin\r\n",
        ),
    ];
    let mut compared = 0;
    let mut mismatches = Vec::new();
    let mut envoy_says = std::collections::HashMap::new();
    for sa in principals {
        for (method, path, extra) in requests {
            let m = mtls(&plane.ca, mesh_addr, sa, method, path, extra).await;
            let e = mtls(&plane.ca, envoy_addr, sa, method, path, extra).await;
            let (m, e) = (
                m.map(|r| r.0)
                    .unwrap_or_else(|err| panic!("mesh {sa} {method} {path}: {err}")),
                e.map(|r| r.0).unwrap_or_else(|err| {
                    panic!("envoy {sa} {method} {path}: {err}\n{}", envoy.logs())
                }),
            );
            compared += 1;
            envoy_says.insert((sa, method, path, extra), e);
            if m != e {
                mismatches.push(format!("{sa} {method} {path}: mesh {m}, envoy {e}"));
            }
        }
    }
    assert!(compared >= 30);
    // The address rules decide something: Envoy denies the allowed client by its last
    // x-forwarded-for entry, and admits a stranger by its peer address.
    let said = |sa, path, extra| envoy_says[&(sa, "GET", path, extra)];
    assert_eq!(
        said("client", "/", "x-forwarded-for: 1.2.3.4, 10.9.9.9\r\n"),
        403
    );
    assert_eq!(
        said("client", "/", "x-forwarded-for: 10.9.9.9, 1.2.3.4\r\n"),
        200
    );
    assert_eq!(
        said("stranger", "/loopback", "x-forwarded-for: 10.1.1.1\r\n"),
        200
    );
    assert_eq!(said("stranger", "/", ""), 403);
    assert!(
        mismatches.is_empty(),
        "mesh and Envoy disagree:\n{}",
        mismatches.join("\n")
    );
    // Both allowed and denied outcomes occurred, and both apps saw the same allowed requests.
    assert!(envoy_app.hits() > 0);
    assert_eq!(mesh_app.hits() - mesh_base, envoy_app.hits());
}
