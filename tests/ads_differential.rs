//! Differential harness over ADS: one testkit MeshModel (plus one raw RouteConfiguration
//! overlay for the matchers the model cannot express) is served to mesh and, by a second
//! testkit control plane with the same model, to a real Envoy 1.40 as an Istio sidecar over
//! delta ADS (listeners bound on 127.0.0.1 ephemeral ports, SDS secrets from the testkit CA).
//! The same requests go through both to plaintext echo upstreams on 127.0.0.1 that report
//! which endpoint served them and which route sent them (`x-route`, added by each route); the
//! outcomes must be identical, and so must the number of upstream attempts when upstreams
//! answer 503 or 500.

use crate::support;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use mesh::parts::xds::ads::ROUTE;
use mesh::parts::xds::dump::{ConfigDump, resource_json};
use mesh::parts::xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec};
use mesh_core::snapshot::OutboundTrafficPolicy;
use serde_json::{Value, json};
use support::envoy::{AdsBootstrap, EnvoyProcess, envoy_binary};
use support::mesh::{NS, Plane, WAIT, eventually, spiffe};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const PORT: u16 = 9080;

/// A plaintext upstream: answers `status` with `endpoint=<name>\nroute=<x-route>\n`.
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
                    let route = req
                        .headers()
                        .get("x-route")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let mut resp = Response::new(Full::new(Bytes::from(format!(
                        "endpoint={name}\nroute={route}\n"
                    ))));
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

/// What a request came to: status, and for upstream answers the route and endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    status: u16,
    route: String,
    endpoint: String,
}

fn outcome(status: u16, body: &str) -> Outcome {
    let field = |k: &str| support::mesh::field(body, k).to_owned();
    Outcome {
        status,
        route: field("route"),
        endpoint: field("endpoint"),
    }
}

/// One request through Envoy's outbound listener at `addr`.
async fn via_envoy(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Outcome {
    let r = timeout(WAIT, async {
        let stream = TcpStream::connect(addr).await.expect("connect envoy");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::get(path).header("host", authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).expect("request"))
            .await
            .expect("envoy answers");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        outcome(status, &String::from_utf8_lossy(&body))
    })
    .await;
    r.expect("envoy answered in time")
}

/// The same request through mesh's outbound client.
async fn via_mesh(
    m: &mesh::Mesh,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Outcome {
    // The port comes from the Host when it has one, else from the URI: 9080 either way.
    let uri = if authority.contains(':') {
        format!("http://{authority}{path}")
    } else {
        format!("http://{authority}:{PORT}{path}")
    };
    let mut req = Request::get(uri).header("host", authority);
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
    let body = timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    outcome(status, &String::from_utf8_lossy(&body))
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
fn overlay(
    generated: &mesh::parts::xds::testkit::ResourceSet,
) -> (String, envoy_types::pb::google::protobuf::Any) {
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
    let dump = json!({"configs": [{
        "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "dynamic_route_configs": [{"route_config": rc}],
    }]});
    let set = ConfigDump::from_value(dump)
        .expect("overlay loads")
        .xds_resources();
    let (name, any) = set[ROUTE].iter().next().expect("one route config");
    (name.clone(), any.clone())
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

    // mesh, through its own testkit control plane.
    let plane = Plane::start(model.clone()).await;
    plane
        .cp
        .push_raw(ROUTE, vec![(rc_name.clone(), rc.clone())]);
    let client = plane.ready_mesh("client").await;
    eventually("mesh holds the overlay", || {
        let has = client
            .snapshot()
            .route_configs
            .get(&rc_name)
            .is_some_and(|r| {
                r.virtual_hosts
                    .iter()
                    .any(|v| &*v.name == "shop.example:9080")
            });
        async move { has.then_some(()) }
    })
    .await;

    // Envoy, through a second control plane serving the same model and overlay.
    let cp = ControlPlane::builder()
        .ca(plane.ca.clone())
        .model(model.clone())
        .bind_loopback(true)
        .strip_istio_proxy_extensions(true)
        .sds_secrets(spiffe("client"))
        .start()
        .await
        .expect("control plane for envoy");
    cp.push_raw(ROUTE, vec![(rc_name.clone(), rc.clone())]);
    let boot = AdsBootstrap::sidecar("client-0", NS, cp.addr()).service_account("client");
    let envoy = tokio::task::block_in_place(|| EnvoyProcess::start(&boot.to_yaml()));
    let listener = format!("0.0.0.0_{PORT}");
    let addr = tokio::task::block_in_place(|| {
        let mut addr = None;
        let ok = envoy.wait_until(Duration::from_secs(60), |e| {
            addr = e.listener_address(&listener);
            addr.is_some()
                && e.config_dump(false)
                    .to_string()
                    .contains("shop.example:9080")
        });
        assert!(
            ok,
            "Envoy never served {listener} with the overlay:\n{}",
            envoy.logs()
        );
        addr.expect("address")
    });
    assert!(addr.ip().is_loopback(), "{addr}");

    // Routing: the same outcome for every request, and the one the table expects.
    let mut mismatches = Vec::new();
    for (authority, path, headers, status, route, endpoints) in CASES {
        let m = via_mesh(&client, authority, path, headers).await;
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
                via_mesh(&client, "reviews", "/", &[]).await
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
                via_mesh(&client, svc, "/", &[]).await
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
    drop(envoy);
}
