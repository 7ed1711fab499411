//! The CUSTOM action end to end: istiod's rendering (a shadow RBAC marking the requests the
//! CUSTOM rules cover, then `envoy.filters.http.ext_authz` to `outbound|9191||ext-authz…`)
//! pushed by the testkit control plane, a meshed server, and a real
//! `envoy.service.auth.v3.Authorization` gRPC provider on 127.0.0.1 (tonic) that allows by
//! header. Requests reach the app only when the provider allows; the provider's header
//! changes reach the app; its denial (status, body, headers) reaches the client; a provider
//! that is down gives `status_on_error` (403 by default), or lets the request through with
//! `failure_mode_allow`; DENY policies still apply after an allow.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use mesh::parts::xds::ads::LISTENER;
use mesh::parts::xds::testkit::authz::{
    AuthorizationPolicySpec, ExtAuthzProvider, ExtAuthzProviderSpec, PolicyAction, RuleSpec,
    virtual_inbound_with_authz,
};
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use support::mesh::{NS, Plane, WAIT, eventually, spiffe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const PROVIDER_PORT: u16 = 9191;

/// The provider's Service host; each test names its own, as each test's mesh registers its
/// own provider client in the process.
fn provider_host(name: &str) -> String {
    format!("{name}.{NS}.svc.cluster.local")
}

fn model(app: SocketAddr, provider: SocketAddr, name: &str) -> MeshModel {
    MeshModel::default()
        .service(
            ServiceSpec::new("backend", NS, "10.96.0.30".parse().unwrap())
                .port(9080, Protocol::Http)
                .endpoint(EndpointSpec::new(app).service_account("backend")),
        )
        .service(
            ServiceSpec::new(name, NS, "10.96.0.40".parse().unwrap())
                .port(PROVIDER_PORT, Protocol::Grpc)
                .endpoint(EndpointSpec::new(provider).service_account("ext-authz")),
        )
}

/// An app that reports the headers the provider manages, and counts its requests.
#[derive(Clone, Default)]
struct App(Arc<AtomicUsize>);

impl App {
    fn hits(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    async fn serve(&self, mesh: &mesh::Mesh) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::clone(&self.0);
        let svc = tower::service_fn(move |req: http::Request<mesh::Body>| {
            hits.fetch_add(1, Ordering::SeqCst);
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            let body = format!(
                "check-result={}\nx-ext-authz={}\n",
                h("x-ext-authz-check-result"),
                h("x-ext-authz")
            );
            async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            }
        });
        let m = mesh.clone();
        tokio::spawn(async move { m.serve_on(listener, svc).await });
        addr
    }
}

/// A plaintext HTTP/1.1 request: (status, raw response head, body).
async fn get(addr: SocketAddr, path: &str, allow: bool) -> (u16, String, String) {
    get_with(addr, path, if allow { Some("allow") } else { None }).await
}

/// [`get`] with any `x-ext-authz` value.
async fn get_with(addr: SocketAddr, path: &str, verdict: Option<&str>) -> (u16, String, String) {
    timeout(WAIT, async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let extra = verdict
            .map(|v| format!("x-ext-authz: {v}\r\n"))
            .unwrap_or_default();
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: backend\r\n{extra}Connection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let _ = tcp.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, head.to_ascii_lowercase(), body.to_owned())
    })
    .await
    .expect("request timed out")
}

fn custom(provider: ExtAuthzProviderSpec) -> AuthorizationPolicySpec {
    AuthorizationPolicySpec::new("ext-authz", NS, PolicyAction::Custom)
        .provider(provider)
        .rule(RuleSpec::default().path("/ext*"))
}

async fn push(plane: &Plane, policies: &[AuthorizationPolicySpec]) {
    let (name, listener) = virtual_inbound_with_authz(&plane.cp.model(), policies, true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_action_consults_a_real_grpc_provider() {
    let provider = ExtAuthzProvider::start().await.unwrap();
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = App::default();
    let addr = app.serve(&server).await;
    plane.cp.set_model(model(addr, provider.addr, "ext-authz"));
    let spec = ExtAuthzProviderSpec::new(&provider_host("ext-authz"), PROVIDER_PORT);
    let deny_ext_deny = AuthorizationPolicySpec::new("deny-ext-deny", NS, PolicyAction::Deny)
        .rule(RuleSpec::default().path("/ext/deny"));
    push(&plane, &[custom(spec.clone()), deny_ext_deny]).await;
    eventually("the server sends /ext requests to the provider", || async {
        let (status, _, body) = get(addr, "/ext/a", false).await;
        (status == 403 && body.starts_with("denied by ext_authz")).then_some(())
    })
    .await;

    // Denied by the provider: its status, body and headers; the app sees nothing.
    let before = app.hits();
    let (status, head, body) = get(addr, "/ext/a?q=1", false).await;
    assert_eq!(status, 403);
    assert_eq!(body, "denied by ext_authz for path /ext/a?q=1");
    assert!(head.contains("x-ext-authz-check-result: denied"), "{head}");
    assert_eq!(
        app.hits(),
        before,
        "a request the provider denied reached the app"
    );

    // Allowed: the provider's header changes reach the app (added result, removed header).
    let (status, _, body) = get(addr, "/ext/a", true).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("check-result=allowed"), "{body}");
    assert!(body.contains("x-ext-authz=-"), "{body}");
    assert_eq!(app.hits(), before + 1);

    // What Envoy sends: method, path, host, headers, destination principal and address.
    let last = provider.received().pop().expect("the provider was called");
    let attrs = last.attributes.unwrap();
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(
        (http.method.as_str(), http.path.as_str()),
        ("GET", "/ext/a")
    );
    assert_eq!(http.host, "backend");
    assert_eq!(http.protocol, "HTTP/1.1");
    assert_eq!(
        http.headers.get("x-ext-authz").map(String::as_str),
        Some("allow")
    );
    let dest = attrs.destination.unwrap();
    assert_eq!(dest.principal, spiffe("backend").to_string());
    assert!(dest.address.is_some());
    // Plaintext: no source principal.
    assert_eq!(attrs.source.unwrap().principal, "");

    // Not covered by the CUSTOM rules: the provider is not called.
    let calls = provider.received().len();
    let (status, _, body) = get(addr, "/other", false).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("check-result=-"), "{body}");
    assert_eq!(
        provider.received().len(),
        calls,
        "uncovered request reached the provider"
    );

    // The chain resumes after an allow: a DENY policy still denies.
    let hits = app.hits();
    let (status, _, body) = get(addr, "/ext/deny", true).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(app.hits(), hits);

    // Path normalization happens first: /x/../ext/a is covered.
    let (status, _, _) = get(addr, "/x/../ext/a", false).await;
    assert_eq!(status, 403);
    assert_eq!(app.hits(), hits);

    // A provider slower than the filter's timeout (Envoy's default 200 ms): status_on_error.
    let (status, _, body) = get_with(addr, "/ext/a", Some("slow")).await;
    assert_eq!((status, body.as_str()), (403, ""));
    assert_eq!(
        app.hits(),
        hits,
        "a request the provider did not answer reached the app"
    );

    // Provider down (its endpoint refuses connections): status_on_error (403, empty body,
    // UAEX), nothing reaches the app.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    // (A model push regenerates the listener without policies: push them again after it.)
    plane.cp.set_model(model(addr, dead, "ext-authz"));
    push(&plane, &[custom(spec.clone())]).await;
    eventually("the stopped provider refuses calls", || async {
        let (status, _, body) = get(addr, "/ext/a", true).await;
        (status == 403 && body.is_empty()).then_some(())
    })
    .await;
    let hits = app.hits();
    let (status, head, body) = get(addr, "/ext/a", true).await;
    assert_eq!((status, body.as_str()), (403, ""), "{head}");
    assert_eq!(
        app.hits(),
        hits,
        "the app was reached while the provider was down"
    );

    // A custom statusOnError.
    let mut on_error = spec.clone();
    on_error.status_on_error = Some(503);
    push(&plane, &[custom(on_error)]).await;
    eventually("statusOnError 503 applies", || async {
        (get(addr, "/ext/a", true).await.0 == 503).then_some(())
    })
    .await;
    assert_eq!(app.hits(), hits);

    // failOpen (failure_mode_allow): the request goes through.
    let mut open = spec.clone();
    open.fail_open = true;
    push(&plane, &[custom(open)]).await;
    eventually("failure_mode_allow lets requests through", || async {
        (get(addr, "/ext/a", false).await.0 == 200).then_some(())
    })
    .await;
    assert!(app.hits() > hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_action_sees_the_mtls_peer_principal() {
    let provider = ExtAuthzProvider::start().await.unwrap();
    let plane = Plane::start(MeshModel::default()).await;
    let server = plane.ready_mesh("backend").await;
    let app = App::default();
    let addr = app.serve(&server).await;
    plane
        .cp
        .set_model(model(addr, provider.addr, "ext-authz-mtls"));
    let spec = ExtAuthzProviderSpec::new(&provider_host("ext-authz-mtls"), PROVIDER_PORT);
    push(&plane, &[custom(spec)]).await;
    eventually("the server enforces the CUSTOM policy", || async {
        let (status, _, body) = get(addr, "/ext/a", false).await;
        (status == 403 && body.starts_with("denied by ext_authz")).then_some(())
    })
    .await;
    let sleep = plane.ready_mesh("sleep").await;
    let url = "http://backend.default.svc.cluster.local:9080/ext/b";
    let denied = timeout(WAIT, sleep.http_client().get(url))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(
        String::from_utf8_lossy(denied.body()),
        "denied by ext_authz for path /ext/b"
    );
    let last = provider.received().pop().unwrap();
    let attrs = last.attributes.unwrap();
    assert_eq!(attrs.source.unwrap().principal, spiffe("sleep").to_string());
    assert_eq!(
        attrs.destination.unwrap().principal,
        spiffe("backend").to_string()
    );
}
