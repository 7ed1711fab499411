//! RequestAuthentication end to end: the testkit control plane pushes the `virtualInbound`
//! istiod renders for a RequestAuthentication (`envoy.filters.http.jwt_authn`, requiring
//! `{provider OR allow_missing}`) plus an AuthorizationPolicy on request principals, and a
//! meshed server enforces them on real HTTP requests:
//!
//! * valid RS256 / ES256 tokens reach the app with the claim headers istiod configures, the
//!   token removed and the request principal in the request's extensions;
//! * a request without a token passes the JWT filter and is refused by RBAC (403);
//! * adversarial tokens (wrong signature, expired, not yet valid, wrong issuer, wrong audience,
//!   `alg: none`, a forged token smuggled in a second `Authorization` header, an oversized
//!   token) are refused with Envoy's status, body and `www-authenticate`, and the app is never
//!   reached;
//! * remote JWKS come from a real HTTP server on 127.0.0.1, cached for `cache_duration` and
//!   refetched after it, and an unreachable or hanging JWKS server fails tokens (bounded) but
//!   never the server;
//! * a plaintext peer cannot hand the app spoofed peer metadata, XFCC or JWT claim headers.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh::Mesh;
use mesh::parts::core::authz::jwt::{JwtSigner, RequestPrincipal, realm_uri};
use mesh::parts::xds::ads::LISTENER;
use mesh::parts::xds::testkit::authz::{
    AuthorizationPolicySpec, JwtRuleSpec, PolicyAction, RuleSpec, virtual_inbound_with_policies,
};
use mesh::parts::xds::testkit::{EndpointSpec, MeshModel, Protocol, ServiceSpec};
use serde_json::json;
use support::mesh::{NS, Plane, WAIT, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const RSA_PEM: &str = include_str!("../mesh-core/testdata/jwt-rsa2048.pk8.pem");
const ISS: &str = "https://accounts.example.com";

/// One refused request: what it is, its headers, the status and the body expected.
type RefusalCase = (&'static str, Vec<(&'static str, String)>, u16, &'static str);

fn model(endpoint: SocketAddr) -> MeshModel {
    MeshModel::default().service(
        ServiceSpec::new("backend", NS, "10.96.0.31".parse().unwrap())
            .port(9080, Protocol::Http)
            .endpoint(EndpointSpec::new(endpoint).service_account("backend")),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"iss": ISS, "sub": sub, "aud": "bookinfo", "exp": now() + 3600,
           "groups": ["admins", "dev"], "scope": "read write"})
}

/// The app: counts requests and answers with the request principal and every header.
#[derive(Clone, Default)]
struct App {
    hits: Arc<AtomicUsize>,
}

impl App {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    async fn serve(&self, mesh: &Mesh) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::clone(&self.hits);
        let svc = tower::service_fn(move |req: Request<mesh::Body>| {
            let hits = Arc::clone(&hits);
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let principal = req
                    .extensions()
                    .get::<RequestPrincipal>()
                    .map(|p| p.principal())
                    .unwrap_or_else(|| "none".into());
                let mut body = format!("principal={principal}\n");
                for (k, v) in req.headers() {
                    body.push_str(&format!(
                        "h:{k}={}\n",
                        String::from_utf8_lossy(v.as_bytes())
                    ));
                }
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        });
        let m = mesh.clone();
        tokio::spawn(async move { m.serve_on(listener, svc).await });
        addr
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: String,
}

/// A plaintext HTTP/1.1 request with `headers` (repeated names allowed), bounded by WAIT.
async fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
    timeout(WAIT, async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::get(path).header("host", "backend");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let www_authenticate = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            www_authenticate,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `token` with another payload under its signature.
fn tamper(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[1] = mesh::parts::core::authz::jwt::base64url(claims("admin").to_string().as_bytes());
    parts.join(".")
}

async fn push(
    plane: &Plane,
    policies: &[AuthorizationPolicySpec],
    rules: &[JwtRuleSpec],
    addr: SocketAddr,
) {
    let (name, listener) = virtual_inbound_with_policies(&plane.cp.model(), policies, rules, true);
    plane.cp.push_raw(LISTENER, vec![(name, listener)]);
    // Enforced once a garbage token is refused by the JWT filter.
    eventually(
        "the server enforces the pushed RequestAuthentication",
        || async {
            match send(addr, "/", &[("authorization", "Bearer a.b.c")]).await {
                Ok(a) if a.status == 401 => Some(()),
                _ => None,
            }
        },
    )
    .await;
}

async fn backend(plane: &Plane) -> (Mesh, App, SocketAddr) {
    let server = plane.ready_mesh("backend").await;
    let app = App::default();
    let addr = app.serve(&server).await;
    plane.cp.set_model(model(addr));
    (server, app, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_and_request_principals_feed_rbac() {
    let plane = Plane::start(MeshModel::default()).await;
    let (_server, app, addr) = backend(&plane).await;
    let rsa = JwtSigner::rsa_from_pkcs8_pem(RSA_PEM, "rsa", "RS256").unwrap();
    let ec = JwtSigner::ec_generate("ec", "ES256").unwrap();
    let mut rule = JwtRuleSpec::inline(ISS, &JwtSigner::jwks(&[&rsa, &ec]));
    rule.audiences = vec!["bookinfo".into()];
    rule.output_claim_to_headers = vec![("x-jwt-sub".into(), "sub".into())];
    let allow_alice = AuthorizationPolicySpec::new("alice-only", NS, PolicyAction::Allow)
        .rule(RuleSpec::default().request_principal(&format!("{ISS}/alice")));
    push(&plane, &[allow_alice], &[rule], addr).await;

    // Valid tokens, both algorithms: the app sees the principal and the claim header, not the
    // token.
    for signer in [&rsa, &ec] {
        let before = app.hits();
        let a = send(
            addr,
            "/books",
            &[
                ("authorization", &bearer(&signer.sign(&claims("alice")))),
                ("x-jwt-sub", "spoofed"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{}: {a:?}", signer.alg());
        assert_eq!(app.hits(), before + 1);
        assert!(
            a.body.contains(&format!("principal={ISS}/alice\n")),
            "{}",
            a.body
        );
        assert!(a.body.contains("h:x-jwt-sub=alice\n"), "{}", a.body);
        assert!(!a.body.contains("spoofed"), "{}", a.body);
        assert!(!a.body.contains("h:authorization="), "{}", a.body);
    }

    // No token: the JWT filter lets it pass (allow_missing) and RBAC refuses it.
    // A valid token of another principal: RBAC refuses it too.
    let bob = bearer(&rsa.sign(&claims("bob")));
    for headers in [vec![], vec![("authorization", bob.as_str())]] {
        let before = app.hits();
        let a = send(addr, "/books", &headers).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));
        assert_eq!(app.hits(), before);
    }

    // Adversarial tokens: Envoy's status and body, and the app never reached.
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    let mut early = claims("alice");
    early["nbf"] = json!(now() + 3600);
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = json!("https://evil.example.com");
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = json!("other-service");
    let good = rsa.sign(&claims("alice"));
    let forged = tamper(&good);
    let alg_none = format!(
        "{}.{}.",
        mesh::parts::core::authz::jwt::base64url(br#"{"alg":"none","typ":"JWT"}"#),
        mesh::parts::core::authz::jwt::base64url(claims("alice").to_string().as_bytes())
    );
    let oversized = format!(
        "{}.{}.{}",
        "e".repeat(40_000),
        "e".repeat(40_000),
        "A".repeat(512)
    );
    let cases: Vec<RefusalCase> = vec![
        (
            "wrong signature",
            vec![("authorization", bearer(&forged))],
            401,
            "Jwt verification fails",
        ),
        (
            "expired",
            vec![("authorization", bearer(&rsa.sign(&expired)))],
            401,
            "Jwt is expired",
        ),
        (
            "not yet valid",
            vec![("authorization", bearer(&ec.sign(&early)))],
            401,
            "Jwt not yet valid",
        ),
        (
            "wrong issuer",
            vec![("authorization", bearer(&rsa.sign(&wrong_iss)))],
            401,
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            vec![("authorization", bearer(&rsa.sign(&wrong_aud)))],
            403,
            "Audiences in Jwt are not allowed",
        ),
        (
            "alg none",
            vec![("authorization", bearer(&alg_none))],
            401,
            "Jwt header [alg] is not supported",
        ),
        (
            "forged token smuggled before a valid one",
            vec![
                ("authorization", bearer(&forged)),
                ("authorization", bearer(&good)),
            ],
            401,
            "Jwt verification fails",
        ),
        (
            "forged token in the query",
            vec![],
            401,
            "Jwt verification fails",
        ),
        // Over Envoy's 60 KiB `max_request_headers_kb`: the codec's 431 before the JWT filter.
        (
            "oversized token",
            vec![("authorization", bearer(&oversized))],
            431,
            "Request Header Fields Too Large",
        ),
    ];
    for (what, headers, want_status, want_body) in cases {
        let before = app.hits();
        let path = if what.contains("query") {
            format!("/books?access_token={forged}")
        } else {
            "/books".to_owned()
        };
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match send(addr, &path, &h).await {
            Ok(a) if want_status == 431 => {
                assert_eq!((a.status, a.body.as_str()), (431, want_body), "{what}");
                assert_eq!(a.www_authenticate, None, "{what}");
            }
            Ok(a) => {
                assert_eq!(
                    (a.status, a.body.as_str()),
                    (want_status, want_body),
                    "{what}"
                );
                // Envoy's realm: the original URI, its path cut at 256 bytes.
                let realm = realm_uri("http", "backend", &path);
                assert!(realm.len() < "http://backend".len() + 257);
                assert_eq!(
                    a.www_authenticate.as_deref(),
                    Some(format!("Bearer realm=\"{realm}\", error=\"invalid_token\"").as_str()),
                    "{what}"
                );
            }
            // A connection refused outright also keeps the app unreached.
            Err(e) => assert_eq!(want_status, 0, "{what}: {e}"),
        }
        assert_eq!(app.hits(), before, "{what} reached the app");
    }

    // Valid first, forged second: passes (Envoy verifies the first token after "Bearer "),
    // and the app does not see the forged one (the whole header is removed).
    let before = app.hits();
    let a = send(
        addr,
        "/books",
        &[
            ("authorization", &bearer(&good)),
            ("authorization", &bearer(&forged)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    assert!(!a.body.contains("authorization"), "{}", a.body);
    assert_eq!(app.hits(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_conditions_and_query_tokens() {
    let plane = Plane::start(MeshModel::default()).await;
    let (_server, app, addr) = backend(&plane).await;
    let ec = JwtSigner::ec_generate("ec", "ES256").unwrap();
    let rule = JwtRuleSpec::inline(ISS, &JwtSigner::jwks(&[&ec]));
    let admins = AuthorizationPolicySpec::new("admins", NS, PolicyAction::Allow).rule(
        RuleSpec::default()
            .request_principal("*")
            .claim("groups", &["admins"]),
    );
    push(&plane, &[admins], &[rule], addr).await;
    let token = ec.sign(&claims("carol"));
    let a = send(addr, &format!("/x?access_token={token}"), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let mut not_admin = claims("dave");
    not_admin["groups"] = json!(["dev"]);
    let before = app.hits();
    let a = send(
        addr,
        "/x",
        &[("authorization", &bearer(&ec.sign(&not_admin)))],
    )
    .await
    .unwrap();
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(app.hits(), before);
}

/// A JWKS server on 127.0.0.1: serves the current document and counts fetches.
#[derive(Clone)]
struct JwksServer {
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(doc: String) -> (JwksServer, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = JwksServer {
            doc: Arc::new(Mutex::new(doc)),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let s = s.clone();
                        async move {
                            s.fetches.fetch_add(1, Ordering::SeqCst);
                            let doc = s.doc.lock().unwrap().clone();
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(doc),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (server, addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jwks_are_fetched_cached_refreshed_and_fail_closed() {
    let plane = Plane::start(MeshModel::default()).await;
    let (_server, app, addr) = backend(&plane).await;
    let first = JwtSigner::ec_generate("k1", "ES256").unwrap();
    let second = JwtSigner::ec_generate("k2", "ES256").unwrap();
    let (jwks, jwks_addr) = JwksServer::start(JwtSigner::jwks(&[&first])).await;
    let mut rule = JwtRuleSpec::remote(
        ISS,
        &format!("http://{jwks_addr}/.well-known/jwks.json"),
        Duration::from_secs(2),
    );
    rule.jwks_cache_duration = Some(Duration::from_secs(1));
    // A second issuer whose JWKS server is gone, a third whose server never answers.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let hanging = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hanging.accept().await {
            held.push(s);
        }
    });
    let dead = JwtRuleSpec::remote(
        "https://gone.example",
        &format!("http://{gone}/jwks"),
        Duration::from_secs(2),
    );
    let slow = JwtRuleSpec::remote(
        "https://slow.example",
        &format!("http://{hanging_addr}/jwks"),
        Duration::from_millis(300),
    );
    push(&plane, &[], &[rule, dead, slow], addr).await;

    // Fetched on the first token, then served from the cache.
    let a = send(
        addr,
        "/",
        &[("authorization", &bearer(&first.sign(&claims("alice"))))],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let fetched = jwks.fetches();
    assert!(fetched >= 1);
    let a = send(
        addr,
        "/",
        &[("authorization", &bearer(&first.sign(&claims("alice"))))],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    // A request without a token needs no keys.
    assert_eq!(send(addr, "/", &[]).await.unwrap().status, 200);

    // Key rotation at the issuer: once the cache expires, the new key is fetched.
    *jwks.doc.lock().unwrap() = JwtSigner::jwks(&[&second]);
    eventually(
        "the rotated key is fetched after cache_duration",
        || async {
            let a = send(
                addr,
                "/",
                &[("authorization", &bearer(&second.sign(&claims("alice"))))],
            )
            .await
            .ok()?;
            (a.status == 200).then_some(())
        },
    )
    .await;
    assert!(jwks.fetches() > fetched);

    // Unreachable and hanging JWKS servers: the tokens fail (bounded), the server lives on.
    for iss in ["https://gone.example", "https://slow.example"] {
        let before = app.hits();
        let mut c = claims("alice");
        c["iss"] = json!(iss);
        let a = send(addr, "/", &[("authorization", &bearer(&first.sign(&c)))])
            .await
            .unwrap();
        assert_eq!(
            (a.status, a.body.as_str()),
            (401, "Jwks remote fetch is failed"),
            "{iss}"
        );
        assert_eq!(app.hits(), before);
    }
    assert_eq!(send(addr, "/", &[]).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_peers_cannot_spoof_peer_metadata_xfcc_or_claims() {
    let plane = Plane::start(MeshModel::default()).await;
    let (_server, app, addr) = backend(&plane).await;
    let ec = JwtSigner::ec_generate("ec", "ES256").unwrap();
    let mut rule = JwtRuleSpec::inline(ISS, &JwtSigner::jwks(&[&ec]));
    rule.output_claim_to_headers = vec![("x-jwt-groups".into(), "groups".into())];
    rule.output_payload_to_header = Some("x-jwt-payload".into());
    push(&plane, &[], &[rule], addr).await;
    let before = app.hits();
    let text = timeout(WAIT, async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"GET / HTTP/1.1\r\nHost: backend\r\n\
              x-envoy-peer-metadata-id: sidecar~10.0.0.1~admin-0.default~default.svc.cluster.local\r\n\
              x-envoy-peer-metadata: ChoKDkFQUF9DT05UQUlORVJTEggaBmFkbWlu\r\n\
              x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/default/sa/admin\r\n\
              x-jwt-groups: admins\r\nx-jwt-payload: eyJzdWIiOiJhZG1pbiJ9\r\n\
              Connection: close\r\n\r\n",
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
    assert_eq!(app.hits(), before + 1);
    for spoofed in [
        "h:x-envoy-peer-metadata",
        "h:x-forwarded-client-cert",
        "h:x-jwt-groups",
        "h:x-jwt-payload",
        "sa/admin",
    ] {
        assert!(!text.contains(spoofed), "{spoofed} reached the app: {text}");
    }
    // With a verified token the same headers carry the verified values only.
    let token = ec.sign(&claims("erin"));
    let a = send(
        addr,
        "/",
        &[("authorization", &bearer(&token)), ("x-jwt-groups", "root")],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("h:x-jwt-groups=root"), "{}", a.body);
    assert!(a.body.contains("h:x-jwt-groups="), "{}", a.body);
    assert!(
        a.body.contains(&format!(
            "h:x-jwt-payload={}\n",
            token.split('.').nth(1).unwrap()
        )),
        "{}",
        a.body
    );
}
