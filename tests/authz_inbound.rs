//! Whole-library authorization: the testkit control plane's `virtualInbound` carries the RBAC
//! filters istiod renders for AuthorizationPolicies, and a meshed server enforces them —
//! ALLOW for one SPIFFE principal (the named meshed client gets 200, another identity and
//! plaintext get 403 `RBAC: access denied` and the app sees nothing), DENY overriding ALLOW
//! after path normalization, network RBAC on TCP chains closing connections, the
//! `RBAC` response flag in `istio_requests_total`, and the inbound trust-domain check.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh::SpiffeId;
use mesh::parts::tower::status::StatusPort;
use mesh::parts::xds::ads::LISTENER;
use mesh::parts::xds::testkit::authz::{
    AuthorizationPolicySpec, PolicyAction, RuleSpec, virtual_inbound_with_authz,
};
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use rustls::crypto::ring;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::mesh::{
    Echo, NS, Plane, WAIT, eventually, field, http_get, istio_mtls_request, node, ready, spiffe,
    status_get,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const URL: &str = "http://backend.default.svc.cluster.local:9080/";

fn model(endpoint: SocketAddr) -> MeshModel {
    MeshModel::default().service(
        ServiceSpec::new("backend", NS, "10.96.0.30".parse().unwrap())
            .port(9080, Protocol::Http)
            .endpoint(EndpointSpec::new(endpoint).service_account("backend")),
    )
}

fn allow_sleep() -> AuthorizationPolicySpec {
    AuthorizationPolicySpec::new("allow-sleep", NS, PolicyAction::Allow)
        .rule(RuleSpec::default().principal("cluster.local/ns/default/sa/sleep"))
}

/// A raw HTTP/1.1 request over mTLS with `identity`'s certificate from the plane's CA (or no
/// client certificate): `Err` when refused before an HTTP answer, else (status, body).
async fn mtls(
    plane: &Plane,
    addr: SocketAddr,
    identity: Option<&SpiffeId>,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    mtls_with_headers(plane, addr, identity, method, path, "").await
}

/// [`mtls`] with extra header lines (each ending in `\r\n`).
async fn mtls_with_headers(
    plane: &Plane,
    addr: SocketAddr,
    identity: Option<&SpiffeId>,
    method: &str,
    path: &str,
    headers: &str,
) -> Result<(u16, String), String> {
    let provider = Arc::new(ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(support::mesh::AcceptAnyServer(Arc::new(
            ring::default_provider(),
        ))));
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let c = plane.ca.issue(id, Duration::from_secs(3600));
            builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(c.leaf_der)],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der)),
                )
                .map_err(|e| e.to_string())?
        }
    };
    istio_mtls_request(
        config,
        addr,
        "outbound_.9080_._.backend.default.svc.cluster.local",
        &format!("{method} {path} HTTP/1.1\r\nHost: backend\r\n{headers}"),
    )
    .await
}

/// Pushes `policies` into the plane's `virtualInbound` and waits until the server enforces
/// them (an identity no policy allows is refused).
async fn push_policies(
    plane: &Plane,
    addr: SocketAddr,
    policies: &[AuthorizationPolicySpec],
    http: bool,
) {
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), policies, http);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    let nobody = spiffe("nobody");
    eventually("the server enforces the pushed policy", || async {
        match mtls(plane, addr, Some(&nobody), "GET", "/").await {
            Ok((200, _)) => None,
            _ => Some(()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policy_admits_only_the_named_principal() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr));
    push_policies(&plane, addr, &[allow_sleep()], true).await;
    let before = app.hits();

    // The meshed client with the allowed identity: 200, the app sees its SPIFFE ID.
    let sleep = plane
        .builder(node("sleep-0", "sleep"))
        .start()
        .await
        .unwrap();
    ready(&sleep).await;
    let resp = timeout(WAIT, sleep.http_client().get(URL))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    assert_eq!(field(&body, "peer"), spiffe("sleep").to_string());
    // XFCC as istiod configures the inbound HCM (APPEND_FORWARD, subject/URI/DNS).
    let xfcc = field(&body, "xfcc");
    assert!(
        xfcc.starts_with(&format!("By={};Hash=", spiffe("backend")))
            && xfcc.contains(";Subject=\"")
            && xfcc.ends_with(&format!(";URI={}", spiffe("sleep"))),
        "{xfcc}"
    );
    assert_eq!(app.hits(), before + 1);

    // Another meshed identity: 403 "RBAC: access denied" from the server's sidecar part.
    let other = plane
        .builder(node("other-0", "other"))
        .start()
        .await
        .unwrap();
    ready(&other).await;
    let resp = timeout(WAIT, other.http_client().get(URL))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(String::from_utf8_lossy(resp.body()), "RBAC: access denied");
    assert_eq!(app.hits(), before + 1, "a denied request reached the app");

    // Plaintext (PERMISSIVE lets it in, but it has no principal): denied.
    let (status, body) = http_get(addr, "backend", "/").await.unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(app.hits(), before + 1);

    // The denial is recorded with Envoy's RBAC flag.
    let (_, metrics) = status_get(&server, StatusPort::Prometheus, "/stats/prometheus").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_code=\"403\"")
                && l.contains("response_flags=\"RBAC\"")),
        "no RBAC-flagged istio_requests_total:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("istio_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_overrides_allow_after_path_normalization() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr));
    let deny_admin = AuthorizationPolicySpec::new("deny-admin", NS, PolicyAction::Deny)
        .rule(RuleSpec::default().path("/admin*"));
    let deny_delete = AuthorizationPolicySpec::new("deny-delete", NS, PolicyAction::Deny).rule(
        RuleSpec::default()
            .method("DELETE")
            .not_principal("cluster.local/ns/default/sa/admin"),
    );
    push_policies(
        &plane,
        addr,
        &[allow_sleep(), deny_admin, deny_delete],
        true,
    )
    .await;
    let sleep = spiffe("sleep");
    let admin = spiffe("admin");

    let cases: &[(&SpiffeId, &str, &str, u16)] = &[
        (&sleep, "GET", "/data", 200),
        (&sleep, "GET", "/admin", 403),
        (&sleep, "GET", "/admin/users", 403),
        (&sleep, "GET", "/x/../admin", 403),
        (&sleep, "GET", "/x/./../admin/", 403),
        (&sleep, "GET", "/%61dmin", 403),
        (&sleep, "GET", "/admin/../data", 200),
        (&sleep, "GET", "/a\\..\\admin", 403),
        // Escaped slashes stay escaped (BASE): `/admin%2Fx` is one segment starting "admin".
        (&sleep, "GET", "/admin%2Fx", 403),
        (&sleep, "GET", "/a%zz", 400),
        (&sleep, "DELETE", "/data", 403),
        // `admin` is not allowed by the ALLOW policy, so it is denied even where DENY is not.
        (&admin, "DELETE", "/data", 403),
    ];
    for (id, method, path, want) in cases {
        let before = app.hits();
        let (status, body) = mtls(&plane, addr, Some(id), method, path)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} as {id}: {e}"));
        assert_eq!(status, *want, "{method} {path} as {id}: {body}");
        if *want == 403 {
            assert_eq!(body, "RBAC: access denied");
        }
        let reached = app.hits() - before;
        assert_eq!(
            reached,
            usize::from(*want == 200),
            "{method} {path} as {id}"
        );
        if *want == 200 {
            // The app sees the normalized path.
            assert!(!body.contains(".."), "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rbac_on_a_tcp_chain_closes_denied_connections() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr));
    // An HTTP-only ALLOW rule cannot match on a TCP chain: istiod drops it, so only the
    // principal rule remains.
    let http_only = AuthorizationPolicySpec::new("get-only", NS, PolicyAction::Allow)
        .rule(RuleSpec::default().method("GET"));
    push_policies(&plane, addr, &[allow_sleep(), http_only], false).await;
    let before = app.hits();
    let refused = mtls(&plane, addr, Some(&spiffe("other")), "GET", "/").await;
    assert!(refused.is_err(), "{refused:?}");
    let plain = http_get(addr, "backend", "/").await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(app.hits(), before);
    let (status, _) = mtls(&plane, addr, Some(&spiffe("sleep")), "GET", "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(app.hits(), before + 1);
}

/// Pushes the plane model's `virtualInbound` with every chain's `match_subject_alt_names`
/// cleared (a control plane that leaves peer validation to the root alone).
fn push_without_peer_san_matchers(plane: &Plane) {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        DownstreamTlsContext, common_tls_context::ValidationContextType,
    };
    use mesh::parts::xds::translate::{from_any, to_any};
    let generated = plane.cp.model().generate("default");
    let mut listener: Listener = from_any(&generated[LISTENER]["virtualInbound"]).unwrap();
    for fc in &mut listener.filter_chains {
        let Some(ConfigType::TypedConfig(any)) = fc
            .transport_socket
            .as_mut()
            .and_then(|t| t.config_type.as_mut())
        else {
            continue;
        };
        let mut ctx: DownstreamTlsContext = from_any(any).unwrap();
        if let Some(ValidationContextType::CombinedValidationContext(c)) = ctx
            .common_tls_context
            .as_mut()
            .and_then(|c| c.validation_context_type.as_mut())
            && let Some(v) = c.default_validation_context.as_mut()
        {
            #[allow(deprecated)]
            v.match_subject_alt_names.clear();
        }
        *any = to_any(&ctx);
    }
    plane
        .cp
        .push_raw(LISTENER, vec![(listener.name.clone(), to_any(&listener))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_another_trust_domain_are_refused_in_the_handshake() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    let foreign = SpiffeId::new("evil.example", NS, "sleep");
    // Same roots, wrong trust domain: refused even without istiod's SAN matchers (the
    // workload's own trust domain is the default). The model renders istiod's matchers, so
    // push its `virtualInbound` with them removed first.
    push_without_peer_san_matchers(&plane);
    eventually("a virtualInbound without SAN matchers", || async {
        let snapshot = server.snapshot();
        let inbound = snapshot.inbound.as_ref()?;
        inbound.default_peer_sans.is_empty().then_some(())
    })
    .await;
    let outcome = mtls(&plane, addr, Some(&foreign), "GET", "/").await;
    assert!(outcome.is_err(), "{outcome:?}");
    let (status, _) = mtls(&plane, addr, Some(&spiffe("sleep")), "GET", "/")
        .await
        .unwrap();
    assert_eq!(status, 200);

    // istiod's matchers (prefix spiffe://cluster.local/) with an ALLOW-any policy pushed.
    plane.cp.set_model(model(addr));
    let allow_any = AuthorizationPolicySpec::new("any", NS, PolicyAction::Allow)
        .rule(RuleSpec::default().principal("*"));
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), &[allow_any], true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    eventually(
        "plaintext denied by the ALLOW-any-principal policy",
        || async {
            match http_get(addr, "backend", "/").await {
                Ok((403, _)) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    let before = app.hits();
    let outcome = mtls(&plane, addr, Some(&foreign), "GET", "/").await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(app.hits(), before);
    let (status, _) = mtls(&plane, addr, Some(&spiffe("sleep")), "GET", "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_xfcc_from_a_plaintext_peer_is_stripped() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    let text = timeout(WAIT, async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"GET / HTTP/1.1\r\nHost: backend\r\nx-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/default/sa/admin\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut raw = Vec::new();
        let _ = tcp.read_to_end(&mut raw).await;
        String::from_utf8_lossy(&raw).into_owned()
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\nxfcc=\n"),
        "spoofed XFCC reached the app: {text}"
    );
    assert!(!text.contains("sa/admin"), "{text}");
}

/// meshConfig `trustDomainAliases` as istiod renders it: the inbound mTLS chains accept
/// `spiffe://<alias>/` peers (signed by the same root) and an ALLOW for
/// `cluster.local/ns/default/sa/sleep` also lists `spiffe://alias.domain/ns/default/sa/sleep`.
/// Without the alias, the same peer is refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_domain_aliases_admit_alias_peers_and_their_principals() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    let alias_sleep = SpiffeId::new("alias.domain", NS, "sleep");
    let alias_other = SpiffeId::new("alias.domain", NS, "other");
    let foreign_sleep = SpiffeId::new("evil.example", NS, "sleep");

    plane.cp.set_model(model(addr));
    push_policies(&plane, addr, &[allow_sleep()], true).await;
    let before = app.hits();
    let outcome = mtls(&plane, addr, Some(&alias_sleep), "GET", "/").await;
    assert!(outcome.is_err(), "no alias yet: {outcome:?}");
    assert_eq!(app.hits(), before);

    plane
        .cp
        .set_model(model(addr).trust_domain_alias("alias.domain"));
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), &[allow_sleep()], true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    // An alias peer gets through the handshake and is then judged by the RBAC filter.
    let (status, body) = eventually("alias peers pass the handshake", || async {
        mtls(&plane, addr, Some(&alias_other), "GET", "/")
            .await
            .ok()
    })
    .await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(app.hits(), before);

    let (status, body) = mtls(&plane, addr, Some(&alias_sleep), "GET", "/")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&body, "peer"), alias_sleep.to_string());
    let (status, _) = mtls(&plane, addr, Some(&spiffe("sleep")), "GET", "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(app.hits(), before + 2);
    // A trust domain that is neither the mesh's nor an alias stays refused.
    let outcome = mtls(&plane, addr, Some(&foreign_sleep), "GET", "/").await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(app.hits(), before + 2);
}

/// `remoteIpBlocks` and `ipBlocks` DENY rules as istiod renders them (`remote_ip` /
/// `direct_remote_ip` principals), judged as the sidecar's inbound HCM derives the addresses
/// (`use_remote_address: false`, no trusted hops): `remote_ip` is the last
/// `x-forwarded-for` entry, else the peer; `direct_remote_ip` is always the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_on_remote_ip_blocks_uses_the_last_xff_entry_and_ip_blocks_the_peer() {
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = Echo::new("backend");
    let (addr, _serving) = app.serve_meshed(&server).await;
    plane.cp.set_model(model(addr));
    let sleep = spiffe("sleep");
    let get = |xff: Option<&'static str>| {
        let headers = xff
            .map(|v| format!("x-forwarded-for: {v}\r\n"))
            .unwrap_or_default();
        let plane = &plane;
        let sleep = &sleep;
        async move {
            mtls_with_headers(plane, addr, Some(sleep), "GET", "/", &headers)
                .await
                .map(|(status, body)| (status, body.starts_with("RBAC: access denied")))
        }
    };
    let denied = Ok((403, true));

    let deny_remote = AuthorizationPolicySpec::new("deny-remote", NS, PolicyAction::Deny)
        .rule(RuleSpec::default().remote_ip_block("10.9.9.0/24"));
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), &[deny_remote], true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    eventually("the remoteIpBlocks DENY is enforced", || async {
        (get(Some("10.9.9.9")).await == denied).then_some(())
    })
    .await;
    let before = app.hits();
    assert_eq!(get(Some("1.2.3.4, 10.9.9.9")).await, denied);
    // Earlier entries are not the client address: only the last one counts.
    assert_eq!(get(Some("10.9.9.9, 1.2.3.4")).await.map(|r| r.0), Ok(200));
    // No x-forwarded-for: the peer (127.0.0.1) is the remote address.
    assert_eq!(get(None).await.map(|r| r.0), Ok(200));
    assert_eq!(app.hits(), before + 2);

    let deny_peer = AuthorizationPolicySpec::new("deny-peer", NS, PolicyAction::Deny)
        .rule(RuleSpec::default().ip_block("127.0.0.1"));
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), &[deny_peer], true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    eventually("the ipBlocks DENY is enforced", || async {
        (get(None).await == denied).then_some(())
    })
    .await;
    let before = app.hits();
    // x-forwarded-for does not change the peer address.
    assert_eq!(get(Some("1.2.3.4")).await, denied);
    assert_eq!(app.hits(), before);

    // notIpBlocks: deny everyone but the loopback peer.
    let deny_others = AuthorizationPolicySpec::new("deny-others", NS, PolicyAction::Deny)
        .rule(RuleSpec::default().not_ip_block("127.0.0.0/8"));
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), &[deny_others], true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    eventually("the notIpBlocks DENY is enforced", || async {
        (get(Some("10.9.9.9")).await.map(|r| r.0) == Ok(200)).then_some(())
    })
    .await;
    assert_eq!(app.hits(), before + 1);
}
