//! Differential harness over ADS: the same testkit MeshModel, plus raw overlays for what the
//! model cannot express, is served to mesh and, by a second testkit control plane, to a real
//! Envoy 1.40 as an Istio sidecar over delta ADS (listeners bound on 127.0.0.1 ephemeral
//! ports, SDS secrets from the testkit CA). The same requests go through both, mesh through
//! its whole outbound stack (`Mesh::http_client()`), to plaintext echo upstreams on 127.0.0.1
//! that report which endpoint served them, which route sent them (`x-route`, added by each
//! route) and the path, `Host` and headers they received; the outcomes (with `Location`,
//! response headers and local-reply bodies) must be identical.
//!
//! - `mesh_and_envoy_over_ads_route_and_retry_alike`: Istio's generated routes with header
//!   and path routes added, and the number of upstream attempts when upstreams answer 503 or
//!   500.
//! - `oracle_table_and_distributions_over_ads_match_envoy`: tests/routing_oracle.rs' route
//!   table and request table (tests/support/routes.rs, every matcher) plus a virtual host of
//!   route actions (rewrites, header changes, redirects, direct responses, `cluster_header`,
//!   `weighted_clusters`) as one port's route configuration, 399 requests; then chi-square
//!   tests of a weighted split and of each LB policy (ROUND_ROBIN, LEAST_REQUEST, RANDOM,
//!   RING_HASH, MAGLEV) against the configured weights and between the two, 600 requests a
//!   side each.

use crate::support;
use crate::support::routes::{
    CHI2_999, Req, any_via_dump, chi_square, chi_square_fit, config_json, requests, vhosts,
};

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh::parts::xds::ads::{CLUSTER, ENDPOINT, ROUTE};
use mesh::parts::xds::dump::resource_json;
use mesh::parts::xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec};
use mesh_core::snapshot::OutboundTrafficPolicy;
use serde_json::{Value, json};
use support::envoy::{AdsBootstrap, EnvoyProcess, envoy_binary};
use support::mesh::{NS, Plane, WAIT, eventually, spiffe};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const PORT: u16 = 9080;

/// A plaintext upstream: answers `status` with `endpoint=<name>`, `route=<x-route>` and the
/// path, `Host`, `x-added` and `x-remove` it received, one `key=value` a line.
#[derive(Clone)]
struct Upstream {
    name: &'static str,
    status: u16,
    hits: Arc<AtomicUsize>,
    addr: SocketAddr,
}

async fn upstream(name: &'static str, status: u16) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let header = |k: &str| {
                        req.headers()
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let pq = req.uri().path_and_query().map_or("", |p| p.as_str());
                    let body = format!(
                        "endpoint={name}\nroute={}\npath={pq}\nauthority={}\nadded={}\nremoved={}\n",
                        header("x-route"),
                        header("host"),
                        header("x-added"),
                        header("x-remove"),
                    );
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = http::StatusCode::from_u16(status).expect("status");
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream {
        name,
        status,
        hits,
        addr,
    }
}

/// What a request came to: status, for upstream answers the route and endpoint and what the
/// upstream received, for local answers the body; `location` and `x-resp` response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    status: u16,
    route: String,
    endpoint: String,
    path: String,
    authority: String,
    added: String,
    removed: String,
    text: String,
    location: String,
    x_resp: String,
}

fn outcome(status: u16, headers: &http::HeaderMap, body: &str) -> Outcome {
    let field = |k: &str| support::mesh::field(body, k).to_owned();
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let endpoint = field("endpoint");
    Outcome {
        status,
        route: field("route"),
        path: field("path"),
        authority: field("authority"),
        added: field("added"),
        removed: field("removed"),
        text: if endpoint.is_empty() {
            body.to_owned()
        } else {
            String::new()
        },
        endpoint,
        location: header("location"),
        x_resp: header("x-resp"),
    }
}

/// A keep-alive HTTP/1.1 client to one of Envoy's outbound listeners.
struct EnvoyClient {
    addr: SocketAddr,
    send: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl EnvoyClient {
    fn new(addr: SocketAddr) -> Self {
        EnvoyClient { addr, send: None }
    }

    /// One request over the kept connection (a new one when Envoy closed it).
    async fn request(
        &mut self,
        method: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Outcome {
        let r = timeout(WAIT, async {
            let mut kept = self.send.take();
            if let Some(s) = kept.as_mut()
                && s.ready().await.is_err()
            {
                kept = None;
            }
            let mut send = match kept {
                Some(s) => s,
                None => {
                    let stream = TcpStream::connect(self.addr).await.expect("connect envoy");
                    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .expect("handshake");
                    tokio::spawn(conn);
                    send
                }
            };
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", authority);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = send
                .send_request(req.body(Empty::<Bytes>::new()).expect("request"))
                .await
                .expect("envoy answers");
            let status = resp.status().as_u16();
            let head = resp.headers().clone();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            self.send = Some(send);
            outcome(status, &head, &String::from_utf8_lossy(&body))
        })
        .await;
        r.expect("envoy answered in time")
    }
}

/// One GET through Envoy's outbound listener at `addr`, on a connection of its own.
async fn via_envoy(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Outcome {
    EnvoyClient::new(addr)
        .request("GET", authority, path, headers)
        .await
}

/// The same request through mesh's outbound client, as an application calling
/// `http://<host>:<port>` with `Host: authority` would send it (the listener is the URI's
/// port, as a sidecar's is the port the application connects to; the virtual host comes from
/// `Host`).
async fn via_mesh(
    m: &mesh::Mesh,
    port: u16,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Outcome {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let target = match http::uri::Authority::try_from(format!("{host}:{port}")) {
        Ok(a) => a.to_string(),
        Err(_) => format!("127.0.0.1:{port}"),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{target}{path}"))
        .header("host", authority);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = timeout(
        WAIT,
        m.http_client()
            .request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("mesh answered in time");
    let status = resp.status().as_u16();
    let head = resp.headers().clone();
    let body = timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    outcome(status, &head, &String::from_utf8_lossy(&body))
}

fn fqdn(svc: &str) -> String {
    format!("{svc}.{NS}.svc.cluster.local")
}

fn cluster(svc: &str, subset: &str) -> String {
    format!("outbound|{PORT}|{subset}|{}", fqdn(svc))
}

/// The model's route configuration `9080` with what the model cannot express: header-match
/// routes ahead of the reviews split, an `x-route` header on every route, and a `shop.example`
/// virtual host of path matchers (first match wins; anything else there is 404 NR).
fn overlay(generated: &mesh::parts::xds::testkit::ResourceSet) -> (String, Any) {
    let mut rc = resource_json(&generated[ROUTE][&PORT.to_string()]).expect("route config renders");
    let tag = |name: &str| json!([{"header": {"key": "x-route", "value": name}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]);
    let to = |name: &str, m: Value, c: String| json!({"name": name, "match": m, "route": {"cluster": c, "timeout": "0s"}, "request_headers_to_add": tag(name)});
    let vhosts = rc["virtual_hosts"].as_array_mut().expect("virtual hosts");
    for vh in vhosts.iter_mut() {
        let vh_name = vh["name"].as_str().unwrap_or("").to_owned();
        for r in vh["routes"].as_array_mut().into_iter().flatten() {
            let name = format!("{}/{}", vh_name, r["name"].as_str().unwrap_or(""));
            r["request_headers_to_add"] = tag(&name);
        }
        if vh["name"] == format!("{}:{PORT}", fqdn("reviews")) {
            let routes = vh["routes"].as_array_mut().expect("routes");
            routes.insert(0, to("jason", json!({"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]}), cluster("reviews", "v3")));
            routes.insert(1, to("canary", json!({"prefix": "/", "headers": [{"name": "x-canary", "present_match": true}]}), cluster("reviews", "v1")));
            routes.insert(2, to("beta", json!({"prefix": "/beta", "headers": [{"name": "x-user", "string_match": {"prefix": "beta-"}}]}), cluster("reviews", "v2")));
        }
    }
    let shop = json!({
        "name": "shop.example:9080",
        "domains": ["shop.example", "shop.example:9080"],
        "routes": [
            to("cart", json!({"prefix": "/cart"}), cluster("reviews", "v1")),
            to("checkout", json!({"path": "/checkout"}), cluster("reviews", "v2")),
            to("item", json!({"safe_regex": {"regex": "/item/[0-9]+"}}), cluster("reviews", "v3")),
            to("api", json!({"prefix": "/api/", "case_sensitive": false}), cluster("reviews", "v2")),
            to("search", json!({"prefix": "/search", "query_parameters": [{"name": "q", "present_match": true}]}), cluster("reviews", "v3")),
            {"name": "teapot", "match": {"prefix": "/teapot"}, "direct_response": {"status": 418}},
        ],
    });
    let last = vhosts.len() - 1; // block_all stays last
    vhosts.insert(last, shop);
    let name = rc["name"].as_str().expect("name").to_owned();
    (name, any_of(ROUTE, &rc))
}

/// The `Any` of a route configuration, cluster or load assignment from its JSON form.
fn any_of(type_url: &str, v: &Value) -> Any {
    let (section, list, entry) = match type_url {
        ROUTE => ("RoutesConfigDump", "dynamic_route_configs", "route_config"),
        CLUSTER => ("ClustersConfigDump", "dynamic_active_clusters", "cluster"),
        _ => (
            "EndpointsConfigDump",
            "dynamic_endpoint_configs",
            "endpoint_config",
        ),
    };
    any_via_dump(type_url, section, list, entry, v)
}

/// mesh and Envoy fed the same model and raw overlays, each by its own testkit control
/// plane.
struct Pair {
    client: mesh::Mesh,
    envoy: EnvoyProcess,
    _plane: Plane,
    _cp: ControlPlane,
}

impl Pair {
    /// Starts both with `model` plus `raw` (type URL, resources) pushed before either
    /// connects; waits (bounded) until mesh's snapshot satisfies `mesh_holds` and Envoy serves
    /// a listener for each of `ports` and has every name of `envoy_holds` in its config dump.
    async fn start(
        model: &MeshModel,
        raw: &[(&str, Vec<(String, Any)>)],
        ports: &[u16],
        mesh_holds: impl Fn(&mesh_core::Snapshot) -> bool,
        envoy_holds: &[&str],
    ) -> Pair {
        let plane = Plane::start(model.clone()).await;
        for (t, res) in raw {
            plane.cp.push_raw(t, res.clone());
        }
        let client = plane.ready_mesh("client").await;
        eventually("mesh holds the overlays", || {
            let has = mesh_holds(&client.snapshot());
            async move { has.then_some(()) }
        })
        .await;
        let cp = ControlPlane::builder()
            .ca(plane.ca.clone())
            .model(model.clone())
            .bind_loopback(true)
            .strip_istio_proxy_extensions(true)
            .sds_secrets(spiffe("client"))
            .start()
            .await
            .expect("control plane for envoy");
        for (t, res) in raw {
            cp.push_raw(t, res.clone());
        }
        let boot = AdsBootstrap::sidecar("client-0", NS, cp.addr()).service_account("client");
        let envoy = tokio::task::block_in_place(|| EnvoyProcess::start(&boot.to_yaml()));
        tokio::task::block_in_place(|| {
            let ok = envoy.wait_until(Duration::from_secs(60), |e| {
                ports
                    .iter()
                    .all(|p| e.listener_address(&format!("0.0.0.0_{p}")).is_some())
                    && {
                        let dump = e.config_dump(true).to_string();
                        envoy_holds.iter().all(|n| dump.contains(n))
                    }
            });
            assert!(
                ok,
                "Envoy never served {ports:?} with {envoy_holds:?}:\n{}",
                envoy.logs()
            );
        });
        Pair {
            client,
            envoy,
            _plane: plane,
            _cp: cp,
        }
    }

    /// Where Envoy's outbound listener for `port` is bound (127.0.0.1).
    fn envoy_addr(&self, port: u16) -> SocketAddr {
        let addr =
            tokio::task::block_in_place(|| self.envoy.listener_address(&format!("0.0.0.0_{port}")))
                .expect("listener");
        assert!(addr.ip().is_loopback(), "{addr}");
        addr
    }
}

/// (authority, path, headers, expected status, expected route, endpoints it may land on).
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
    &'static str,
    &'static [&'static str],
);

const V1: &[&str] = &["r1"];
const V2: &[&str] = &["r2"];
const V3: &[&str] = &["r3"];
const V12: &[&str] = &["r1", "r2"];
const NONE: &[&str] = &[""];
const SPLIT: &str = "reviews.default.svc.cluster.local:9080/default";

const CASES: &[Case] = &[
    // The reviews split and its header routes, under every host form istiod lists.
    ("reviews", "/", &[], 200, SPLIT, V12),
    ("reviews:9080", "/x", &[], 200, SPLIT, V12),
    ("reviews.default", "/", &[], 200, SPLIT, V12),
    ("reviews.default.svc", "/", &[], 200, SPLIT, V12),
    (
        "reviews.default.svc.cluster.local",
        "/a/b",
        &[],
        200,
        SPLIT,
        V12,
    ),
    (
        "reviews.default.svc.cluster.local:9080",
        "/",
        &[],
        200,
        SPLIT,
        V12,
    ),
    ("10.96.0.20", "/", &[], 200, SPLIT, V12),
    ("REVIEWS.default", "/", &[], 200, SPLIT, V12),
    ("reviews", "/", &[("end-user", "jason")], 200, "jason", V3),
    ("reviews", "/", &[("end-user", "Jason")], 200, SPLIT, V12),
    ("reviews", "/", &[("end-user", "jason2")], 200, SPLIT, V12),
    ("reviews", "/", &[("End-User", "jason")], 200, "jason", V3),
    ("reviews", "/", &[("x-canary", "")], 200, "canary", V1),
    ("reviews", "/", &[("x-canary", "no")], 200, "canary", V1),
    (
        "reviews",
        "/",
        &[("end-user", "jason"), ("x-canary", "1")],
        200,
        "jason",
        V3,
    ),
    ("reviews", "/beta", &[("x-user", "beta-7")], 200, "beta", V2),
    (
        "reviews",
        "/beta/x",
        &[("x-user", "beta-")],
        200,
        "beta",
        V2,
    ),
    (
        "reviews",
        "/beta",
        &[("x-user", "alpha-7")],
        200,
        SPLIT,
        V12,
    ),
    ("reviews", "/beta", &[("x-user", "BETA-7")], 200, SPLIT, V12),
    ("reviews", "/bet", &[("x-user", "beta-7")], 200, SPLIT, V12),
    // shop.example: path matchers and near-misses (404 NR).
    ("shop.example", "/cart", &[], 200, "cart", V1),
    ("shop.example", "/cart/items", &[], 200, "cart", V1),
    ("shop.example", "/carts", &[], 200, "cart", V1),
    ("shop.example", "/Cart", &[], 404, "", NONE),
    ("shop.example:9080", "/checkout", &[], 200, "checkout", V2),
    ("shop.example", "/checkout?x=1", &[], 200, "checkout", V2),
    ("shop.example", "/checkout/", &[], 404, "", NONE),
    ("shop.example", "/Checkout", &[], 404, "", NONE),
    ("shop.example", "/item/42", &[], 200, "item", V3),
    ("shop.example", "/item/42a", &[], 404, "", NONE),
    ("shop.example", "/item/", &[], 404, "", NONE),
    ("shop.example", "/api/v1", &[], 200, "api", V2),
    ("shop.example", "/API/v1", &[], 200, "api", V2),
    ("shop.example", "/Api/", &[], 200, "api", V2),
    ("shop.example", "/api", &[], 404, "", NONE),
    ("shop.example", "/search?q=shoes", &[], 200, "search", V3),
    ("shop.example", "/search?q", &[], 200, "search", V3),
    ("shop.example", "/search?query=shoes", &[], 404, "", NONE),
    ("shop.example", "/search", &[], 404, "", NONE),
    ("shop.example", "/teapot", &[], 418, "", NONE),
    ("shop.example", "/", &[], 404, "", NONE),
    ("Shop.Example", "/cart", &[], 200, "cart", V1),
    // REGISTRY_ONLY: an unknown host is block_all's 502.
    ("shop.example.com", "/cart", &[], 502, "", NONE),
    ("nothere", "/", &[], 502, "", NONE),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_and_envoy_over_ads_route_and_retry_alike() {
    let Some(_) = envoy_binary() else { return };
    let r1 = upstream("r1", 200).await;
    let r2 = upstream("r2", 200).await;
    let r3 = upstream("r3", 200).await;
    let flaky = upstream("flaky", 503).await;
    let broken = upstream("broken", 500).await;
    let broken5xx = upstream("broken5xx", 500).await;
    let ep = |u: &Upstream, v: &str| EndpointSpec::new(u.addr).label("version", v).plaintext();
    let mut model = MeshModel::default()
        .service(
            ServiceSpec::new("reviews", NS, "10.96.0.20".parse().unwrap())
                .port(PORT, Protocol::Http)
                .endpoint(ep(&r1, "v1"))
                .endpoint(ep(&r2, "v2"))
                .endpoint(ep(&r3, "v3"))
                .subset("v1", "version", "v1")
                .subset("v2", "version", "v2")
                .subset("v3", "version", "v3")
                .weighted(PORT, &[("v1", 50), ("v2", 50)]),
        )
        .service(
            ServiceSpec::new("flaky", NS, "10.96.0.21".parse().unwrap())
                .port(PORT, Protocol::Http)
                .endpoint(ep(&flaky, "v1")),
        )
        .service(
            ServiceSpec::new("broken", NS, "10.96.0.22".parse().unwrap())
                .port(PORT, Protocol::Http)
                .endpoint(ep(&broken, "v1")),
        )
        .service(
            ServiceSpec::new("broken5xx", NS, "10.96.0.23".parse().unwrap())
                .port(PORT, Protocol::Http)
                .endpoint(ep(&broken5xx, "v1"))
                .retry_on("5xx"),
        );
    model.outbound_traffic_policy = OutboundTrafficPolicy::RegistryOnly;
    let (rc_name, rc) = overlay(&model.generate(NS));

    let pair = Pair::start(
        &model,
        &[(ROUTE, vec![(rc_name.clone(), rc)])],
        &[PORT],
        |snap| {
            snap.route_configs.get(&rc_name).is_some_and(|r| {
                r.virtual_hosts
                    .iter()
                    .any(|v| &*v.name == "shop.example:9080")
            })
        },
        &["shop.example:9080"],
    )
    .await;
    let (client, addr) = (&pair.client, pair.envoy_addr(PORT));

    // Routing: the same outcome for every request, and the one the table expects.
    let mut mismatches = Vec::new();
    for (authority, path, headers, status, route, endpoints) in CASES {
        let m = via_mesh(client, PORT, "GET", authority, path, headers).await;
        let e = via_envoy(addr, authority, path, headers).await;
        let expected_ok = e.status == *status
            && (route.is_empty() || e.route == *route)
            && endpoints.contains(&e.endpoint.as_str());
        let same = m.status == e.status
            && m.route == e.route
            && (m.endpoint == e.endpoint
                || (*endpoints).len() > 1 && endpoints.contains(&m.endpoint.as_str()));
        if !same || !expected_ok {
            mismatches.push(format!("{authority}{path} {headers:?}: mesh {m:?}, envoy {e:?}, expected {status} {route} {endpoints:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        CASES.len(),
        mismatches.join("\n")
    );

    // The 50/50 split reaches both subsets through each, and nothing else.
    for via in ["mesh", "envoy"] {
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let o = if via == "mesh" {
                via_mesh(client, PORT, "GET", "reviews", "/", &[]).await
            } else {
                via_envoy(addr, "reviews", "/", &[]).await
            };
            seen.insert(o.endpoint);
        }
        assert_eq!(
            seen,
            BTreeSet::from(["r1".to_owned(), "r2".to_owned()]),
            "{via}"
        );
    }

    // Retries: istiod's default policy retries 503 twice (retriable-status-codes), not 500;
    // `retryOn: 5xx` retries 500 twice. Same attempts and final status through both.
    for (svc, u, status, attempts) in [
        ("flaky", &flaky, 503, 3),
        ("broken", &broken, 500, 1),
        ("broken5xx", &broken5xx, 500, 3),
    ] {
        for via in ["mesh", "envoy"] {
            let before = u.hits.load(Ordering::SeqCst);
            let o = if via == "mesh" {
                via_mesh(client, PORT, "GET", svc, "/", &[]).await
            } else {
                via_envoy(addr, svc, "/", &[]).await
            };
            assert_eq!(o.status, status, "{via} {svc}: {o:?}");
            assert_eq!(o.endpoint, u.name, "{via} {svc}");
            assert_eq!(u.status, status);
            let hits = u.hits.load(Ordering::SeqCst) - before;
            assert_eq!(hits, attempts, "{via} {svc}: upstream attempts");
        }
    }
}

/// The port whose route configuration is routing_oracle's table.
const ORACLE_PORT: u16 = 8080;

/// Envoy's own weights for the LB clusters' three endpoints (load_balancing_weight).
const EP_WEIGHTS: [u32; 3] = [1, 2, 3];

/// routing_oracle's route table as route configuration `8080`: each route forwards to
/// subset `v1`..`v3` of `echo` (route `i` to `v<i % 3 + 1>`) with its name in `x-route`.
/// Returns it and, per route name, the endpoint that must serve it.
fn oracle_routes() -> (Value, Vec<(String, String)>) {
    let mut rc = config_json(&vhosts());
    rc["name"] = json!(ORACLE_PORT.to_string());
    let mut served = Vec::new();
    let mut i = 0;
    for vh in rc["virtual_hosts"].as_array_mut().expect("virtual hosts") {
        for r in vh["routes"].as_array_mut().expect("routes") {
            let name = r["name"].as_str().expect("name").to_owned();
            let o = r.as_object_mut().expect("route");
            o.remove("direct_response");
            o.remove("response_headers_to_add");
            let v = i % 3 + 1;
            i += 1;
            o.insert(
                "route".into(),
                json!({"cluster": format!("outbound|{ORACLE_PORT}|v{v}|{}", fqdn("echo")), "timeout": "0s"}),
            );
            o.insert(
                "request_headers_to_add".into(),
                json!([{"header": {"key": "x-route", "value": name}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]),
            );
            served.push((name, format!("e{v}")));
        }
    }
    // Route actions, in their own virtual host ahead of `*`.
    let sub = |v: u32| format!("outbound|{ORACLE_PORT}|v{v}|{}", fqdn("echo"));
    let tag = |name: &str| json!({"header": {"key": "x-route", "value": name}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"});
    let fwd = |name: &str, prefix: &str, v: u32, extra: Value| {
        let mut route = json!({"cluster": sub(v), "timeout": "0s"});
        for (k, x) in extra.as_object().into_iter().flatten() {
            route[k] = x.clone();
        }
        json!({"name": name, "match": {"prefix": prefix}, "route": route,
               "request_headers_to_add": [tag(name)]})
    };
    let mut hdrs = fwd("hdrs", "/hdr", 1, json!({}));
    hdrs["request_headers_to_add"] =
        json!([tag("hdrs"), {"header": {"key": "x-added", "value": "a"}}]);
    hdrs["request_headers_to_remove"] = json!(["x-remove"]);
    hdrs["response_headers_to_add"] = json!([{"header": {"key": "x-resp", "value": "r"}}]);
    let mut add_if_absent = fwd("add_if_absent", "/append", 2, json!({}));
    add_if_absent["request_headers_to_add"] = json!([tag("add_if_absent"),
        {"header": {"key": "x-added", "value": "b"}, "append_action": "ADD_IF_ABSENT"}]);
    let mut cluster_header = fwd("cluster_header", "/ch", 1, json!({}));
    cluster_header["route"] = json!({"cluster_header": "x-cluster", "timeout": "0s"});
    let mut weighted = fwd("weighted", "/wt", 1, json!({}));
    weighted["route"] = json!({"weighted_clusters": {"clusters": [
        {"name": sub(2), "weight": 1}, {"name": sub(3), "weight": 0}]}, "timeout": "0s"});
    let local = |name: &str, prefix: &str, action: &str, v: Value| json!({"name": name, "match": {"prefix": prefix}, action: v});
    let routes = vec![
        fwd(
            "rw_prefix",
            "/pre/",
            1,
            json!({"prefix_rewrite": "/rewritten/"}),
        ),
        fwd(
            "rw_prefix_root",
            "/strip",
            2,
            json!({"prefix_rewrite": "/"}),
        ),
        fwd(
            "rw_regex",
            "/rx/",
            3,
            json!({"regex_rewrite": {
            "pattern": {"regex": "^/rx/([0-9]+)$"}, "substitution": "/num/\\1"}}),
        ),
        fwd(
            "rw_host",
            "/host",
            1,
            json!({"host_rewrite_literal": "rewritten.example"}),
        ),
        hdrs,
        add_if_absent,
        cluster_header,
        weighted,
        local(
            "redir_host",
            "/redirect",
            "redirect",
            json!({"host_redirect": "new.example",
            "path_redirect": "/moved", "response_code": "PERMANENT_REDIRECT"}),
        ),
        local(
            "redir_https",
            "/secure",
            "redirect",
            json!({"https_redirect": true, "strip_query": true}),
        ),
        local(
            "redir_prefix",
            "/old/",
            "redirect",
            json!({"prefix_rewrite": "/new/"}),
        ),
        local(
            "redir_port",
            "/port",
            "redirect",
            json!({"port_redirect": 8443, "response_code": "TEMPORARY_REDIRECT"}),
        ),
        local(
            "direct",
            "/direct",
            "direct_response",
            json!({"status": 503, "body": {"inline_string": "nope"}}),
        ),
        local(
            "direct_empty",
            "/teapot",
            "direct_response",
            json!({"status": 418}),
        ),
    ];
    for (name, v) in [
        ("rw_prefix", 1),
        ("rw_prefix_root", 2),
        ("rw_regex", 3),
        ("rw_host", 1),
        ("hdrs", 1),
        ("add_if_absent", 2),
        ("cluster_header", 3),
        ("weighted", 2),
    ] {
        served.push((name.to_owned(), format!("e{v}")));
    }
    let vhosts = rc["virtual_hosts"].as_array_mut().expect("virtual hosts");
    let last = vhosts.len() - 1; // `*` stays last
    vhosts.insert(
        last,
        json!({"name": "actions", "domains": ["actions.example", "actions.example:8080"], "routes": routes}),
    );
    (rc, served)
}

/// Requests for the route actions of [`oracle_routes`]: rewrites, header changes, redirects,
/// direct responses, `cluster_header` and `weighted_clusters`, near-misses, hosts with port
/// and in other case.
fn action_requests() -> Vec<Req> {
    const CH: &str = "outbound|8080|v3|echo.default.svc.cluster.local";
    let get = |host: &str, path: &str, headers: Vec<(&'static str, &'static str)>| Req {
        host: host.into(),
        method: "GET",
        path: path.into(),
        headers,
    };
    let mut out = Vec::new();
    for host in ["actions.example", "actions.example:8080", "Actions.Example"] {
        for path in [
            "/pre/a",
            "/pre/a/b?x=1",
            "/pre",
            "/pre/",
            "/strip/x",
            "/strip",
            "/stripx?y=2",
            "/rx/12",
            "/rx/12?q=1",
            "/rx/12/x",
            "/rx/x",
            "/host",
            "/host/x?y",
            "/redirect",
            "/redirect/x?a=b",
            "/secure/x?a=b",
            "/secure",
            "/old/x?q=1",
            "/old",
            "/port/x",
            "/direct",
            "/teapot",
            "/wt",
            "/ch",
            "/nothing",
        ] {
            out.push(get(host, path, vec![]));
        }
    }
    out.push(get("actions.example", "/hdr", vec![]));
    out.push(get("actions.example", "/hdr", vec![("x-remove", "gone")]));
    out.push(get("actions.example", "/hdr", vec![("x-added", "client")]));
    out.push(get(
        "actions.example",
        "/append",
        vec![("x-added", "client")],
    ));
    out.push(get("actions.example", "/append", vec![]));
    out.push(get("actions.example", "/ch", vec![("x-cluster", CH)]));
    out.push(get("actions.example", "/ch", vec![("x-cluster", "nope")]));
    out.push(get("actions.example", "/ch", vec![("x-cluster", "")]));
    out
}

/// Counts, per endpoint name of `names`, which served each of `outcomes`; any other answer
/// fails.
fn tally(via: &str, svc: &str, names: &[&str], outcomes: &[Outcome]) -> Vec<usize> {
    let mut counts = vec![0; names.len()];
    for o in outcomes {
        assert_eq!(o.status, 200, "{via} {svc}: {o:?}");
        let i = names
            .iter()
            .position(|e| *e == o.endpoint)
            .unwrap_or_else(|| panic!("{via} {svc}: {o:?}"));
        counts[i] += 1;
    }
    counts
}

/// Beyond following the configured weights, how a distribution case must agree with Envoy.
#[derive(Clone, Copy)]
enum Agree {
    /// Random draws: in distribution only.
    InDistribution,
    /// A deterministic schedule: exact counts where Envoy's are exact.
    Schedule,
    /// Hash policies: the same key on the same endpoint for at least this many requests.
    PerKey(usize),
}

/// routing_oracle's whole request table (every matcher, near-misses, case variants, missing
/// and repeated headers, ports in hosts) through mesh's outbound stack and a real Envoy, both
/// fed over ADS; then the distribution of a 70/20/10 `weighted_clusters` split and of
/// ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and MAGLEV (header hash policy) over endpoints
/// weighted 1:2:3, each side checked against the configured weights and against the other with
/// chi-square at p = 0.001; schedules must be exact where Envoy's are, hashed keys must land on
/// the same endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_table_and_distributions_over_ads_match_envoy() {
    let Some(_) = envoy_binary() else { return };
    let e1 = upstream("e1", 200).await;
    let e2 = upstream("e2", 200).await;
    let e3 = upstream("e3", 200).await;
    let eps = [&e1, &e2, &e3];
    let ep = |u: &Upstream, v: &str| EndpointSpec::new(u.addr).label("version", v).plaintext();
    let mut echo = ServiceSpec::new("echo", NS, "10.96.1.1".parse().unwrap())
        .port(ORACLE_PORT, Protocol::Http)
        .port(PORT, Protocol::Http)
        .weighted(PORT, &[("v1", 70), ("v2", 20), ("v3", 10)]);
    for (i, u) in eps.iter().enumerate() {
        let v = format!("v{}", i + 1);
        echo = echo.endpoint(ep(u, &v)).subset(&v, "version", &v);
    }
    let policies = [
        ("rr", "ROUND_ROBIN"),
        ("lr", "LEAST_REQUEST"),
        ("rnd", "RANDOM"),
        ("rh", "RING_HASH"),
        ("mg", "MAGLEV"),
    ];
    let mut model = MeshModel::default().service(echo);
    for (i, (svc, _)) in policies.iter().enumerate() {
        let mut s = ServiceSpec::new(svc, NS, format!("10.96.1.{}", i + 2).parse().unwrap())
            .port(PORT, Protocol::Http);
        for u in eps {
            s = s.endpoint(ep(u, "v1"));
        }
        model = model.service(s);
    }
    model.outbound_traffic_policy = OutboundTrafficPolicy::RegistryOnly;

    // Raw overlays: the oracle table; each LB service's cluster with its policy and its
    // endpoints weighted 1:2:3.
    let generated = model.generate(NS);
    let (rc, served) = oracle_routes();
    let mut clusters = Vec::new();
    let mut cla = Vec::new();
    for (svc, policy) in policies {
        let name = format!("outbound|{PORT}||{}", fqdn(svc));
        let mut c = resource_json(&generated[CLUSTER][&name]).expect("cluster renders");
        c["lb_policy"] = json!(policy);
        clusters.push((name.clone(), any_of(CLUSTER, &c)));
        let mut l = resource_json(&generated[ENDPOINT][&name]).expect("endpoints render");
        for group in l["endpoints"].as_array_mut().expect("localities") {
            for e in group["lb_endpoints"].as_array_mut().expect("endpoints") {
                let port = e["endpoint"]["address"]["socket_address"]["port_value"]
                    .as_u64()
                    .expect("port");
                let i = eps
                    .iter()
                    .position(|u| u64::from(u.addr.port()) == port)
                    .expect("one of ours");
                e["load_balancing_weight"] = json!(EP_WEIGHTS[i]);
            }
        }
        cla.push((name, any_of(ENDPOINT, &l)));
    }
    // The hash policies hash the `x-key` header.
    let mut lb_routes = resource_json(&generated[ROUTE][&PORT.to_string()]).expect("routes");
    for vh in lb_routes["virtual_hosts"]
        .as_array_mut()
        .expect("virtual hosts")
    {
        let hashed = ["rh", "mg"].iter().any(|svc| {
            vh["domains"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d == *svc))
        });
        for r in vh["routes"].as_array_mut().into_iter().flatten() {
            if hashed && r.get("route").is_some() {
                r["route"]["hash_policy"] = json!([{"header": {"header_name": "x-key"}}]);
            }
        }
    }
    let rc_name = ORACLE_PORT.to_string();
    let pair = Pair::start(
        &model,
        &[
            (
                ROUTE,
                vec![
                    (rc_name.clone(), any_of(ROUTE, &rc)),
                    (PORT.to_string(), any_of(ROUTE, &lb_routes)),
                ],
            ),
            (CLUSTER, clusters),
            (ENDPOINT, cla),
        ],
        &[ORACLE_PORT, PORT],
        |snap| {
            let routes = snap
                .route_configs
                .get(&rc_name)
                .is_some_and(|r| r.virtual_hosts.iter().any(|v| &*v.name == "main"));
            let lb = policies.iter().all(|(svc, _)| {
                let name = format!("outbound|{PORT}||{}", fqdn(svc));
                snap.clusters.contains_key(&name) && snap.endpoints.contains_key(&name)
            });
            routes && lb
        },
        &[
            "api.example.com:8080",
            "RANDOM",
            "LEAST_REQUEST",
            "MAGLEV",
            "x-key",
        ],
    )
    .await;
    let client = &pair.client;

    // 1. The table: same status, route and endpoint through both, for every request.
    let mut reqs: Vec<Req> = requests();
    reqs.extend(action_requests());
    assert!(reqs.len() >= 300, "only {} requests", reqs.len());
    let mut envoy = EnvoyClient::new(pair.envoy_addr(ORACLE_PORT));
    let mut mismatches = Vec::new();
    let mut routed = BTreeSet::new();
    let mut seen = Vec::new();
    for req in &reqs {
        let e = envoy
            .request(req.method, &req.host, &req.path, &req.headers)
            .await;
        let m = via_mesh(
            client,
            ORACLE_PORT,
            req.method,
            &req.host,
            &req.path,
            &req.headers,
        )
        .await;
        // Envoy's answer is one the table allows: a route's own endpoint, or 404 NR.
        let consistent = match e.status {
            200 => served
                .iter()
                .any(|(r, ep)| *r == e.route && *ep == e.endpoint),
            _ => e.route.is_empty(),
        };
        routed.insert(if e.status == 404 {
            "<404>".to_owned()
        } else {
            e.route.clone()
        });
        if m != e || !consistent {
            mismatches.push(format!("{req:?}: mesh {m:?}, envoy {e:?}"));
        }
        if req.host == "actions.example" && req.headers.is_empty() {
            seen.push((req.path.clone(), e));
        }
    }
    // The actions took effect (what Envoy did, and mesh did the same).
    let at = |path: &str| {
        seen.iter()
            .find(|(p, _)| p == path)
            .map(|(_, o)| o.clone())
            .expect("asked")
    };
    assert_eq!(at("/pre/a/b?x=1").path, "/rewritten/a/b?x=1");
    assert_eq!(at("/rx/12").path, "/num/12");
    assert_eq!(at("/host").authority, "rewritten.example");
    assert_eq!(at("/hdr").added, "a");
    assert_eq!(at("/hdr").x_resp, "r");
    assert_eq!(at("/redirect").location, "http://new.example/moved");
    assert_eq!(at("/direct").text, "nope");
    assert_eq!(at("/wt").endpoint, "e2");
    eprintln!(
        "oracle table over ADS: {} requests, {} routes reached, {} differ",
        reqs.len(),
        routed.len(),
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        reqs.len(),
        mismatches.join("\n")
    );
    let missed: Vec<&str> = served
        .iter()
        .map(|(r, _)| r.as_str())
        .chain(["<404>"])
        .filter(|r| !routed.contains(*r))
        .collect();
    assert!(missed.is_empty(), "routes no request reached: {missed:?}");

    // 2. Distributions: the weighted split and each LB policy, N requests through each side.
    const N: usize = 600;
    let names = ["e1", "e2", "e3"];
    let mut envoy = EnvoyClient::new(pair.envoy_addr(PORT));
    let mut failures = Vec::new();
    let uniform = [1, 1, 1];
    // (service, weights the picks must follow, how mesh and Envoy must agree beyond that).
    let cases: [(&str, &[u32], Agree); 6] = [
        ("echo", &[70, 20, 10], Agree::InDistribution),
        ("rr", &EP_WEIGHTS, Agree::Schedule),
        ("lr", &EP_WEIGHTS, Agree::Schedule),
        // Envoy's random LB picks uniformly whatever the endpoint weights.
        ("rnd", &uniform, Agree::InDistribution),
        ("rh", &EP_WEIGHTS, Agree::PerKey(N)),
        // A few keys land elsewhere in mesh's Maglev table (README).
        ("mg", &EP_WEIGHTS, Agree::PerKey(N * 98 / 100)),
    ];
    for (svc, weights, agree) in cases {
        let key = |i: usize| format!("key-{i}");
        let mut outcomes = Vec::with_capacity(N);
        for i in 0..N {
            let k = key(i);
            outcomes.push(envoy.request("GET", svc, "/", &[("x-key", &k)]).await);
        }
        let e = tally("envoy", svc, &names, &outcomes);
        let mut mesh_outcomes = Vec::with_capacity(N);
        for i in 0..N {
            let k = key(i);
            mesh_outcomes.push(via_mesh(client, PORT, "GET", svc, "/", &[("x-key", &k)]).await);
        }
        let m = tally("mesh", svc, &names, &mesh_outcomes);
        let (fe, dfe) = chi_square_fit(&e, weights);
        let (fm, dfm) = chi_square_fit(&m, weights);
        let (two, df) = chi_square(&e, &m);
        let same_key = outcomes
            .iter()
            .zip(&mesh_outcomes)
            .filter(|(e, m)| e.endpoint == m.endpoint)
            .count();
        eprintln!(
            "{svc}: weights {weights:?} envoy {e:?} (chi2 {fe:.2}) mesh {m:?} (chi2 {fm:.2}), envoy vs mesh chi2 {two:.2} df {df}, same endpoint for {same_key} of {N} requests"
        );
        if fe > CHI2_999[dfe.min(8)] {
            failures.push(format!(
                "{svc}: envoy {e:?} is not {weights:?} (chi2 {fe:.1})"
            ));
        }
        if fm > CHI2_999[dfm.min(8)] {
            failures.push(format!(
                "{svc}: mesh {m:?} is not {weights:?} (chi2 {fm:.1})"
            ));
        }
        if two > CHI2_999[df.min(8)] {
            failures.push(format!("{svc}: envoy {e:?} vs mesh {m:?} (chi2 {two:.1})"));
        }
        match agree {
            Agree::InDistribution => {}
            // With no request in flight, ROUND_ROBIN and LEAST_REQUEST over unequal weights
            // are Envoy's earliest-deadline-first schedule: N a multiple of the weight sum is
            // served exactly by weight. Where Envoy is exact (an upstream request still
            // counted active can shift one pick), mesh must be too.
            Agree::Schedule => {
                let total: u32 = weights.iter().sum();
                let exact: Vec<usize> = weights
                    .iter()
                    .map(|w| N * *w as usize / total as usize)
                    .collect();
                if e == exact && m != exact {
                    failures.push(format!(
                        "{svc}: envoy serves exactly {e:?} (a schedule), mesh {m:?}"
                    ));
                }
            }
            Agree::PerKey(at_least) => {
                if same_key < at_least {
                    failures.push(format!(
                        "{svc}: the same key reached the same endpoint for {same_key} of {N} requests (at least {at_least})"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
