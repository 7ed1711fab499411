//! The access log events (target `mesh::access_log`), outbound and inbound: one per request, with the
//! fields of Istio's default format, captured by a subscriber scoped to the test's thread
//! (the tests share a process; `#[tokio::test]` runs every task on that thread). Expected
//! values are Envoy 1.40's for the same cases (observed with its JSON access log).

use crate::{support, support_outbound};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use mesh_core::retry::{RetryOn, RetryPolicy};
use mesh_core::route::{PathMatch, Route, RouteAction, RouteMatch, VirtualHost};
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::inbound::access_log::ACCESS_LOG_TARGET;
use mesh_tower::outbound::Outbound;
use support_outbound::*;
use tokio::net::TcpListener;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

const C: &str = "outbound|9080||svc.default.svc.cluster.local";

type Events = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

/// Collects the fields of access log events.
struct Capture(Events);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != ACCESS_LOG_TARGET {
            return;
        }
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(fields);
    }
}

/// Starts capturing on this thread until the guard drops.
fn capture() -> (Events, tracing::subscriber::DefaultGuard) {
    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
    (events, tracing::subscriber::set_default(subscriber))
}

fn outbound(retry: Option<RetryPolicy>, endpoints: Vec<SocketAddr>) -> Outbound {
    let route = Route::new(
        "default",
        RouteMatch::path(PathMatch::Prefix("/api".into())),
        RouteAction::Cluster(C.into()),
    )
    .with_retry(retry);
    let vh = VirtualHost {
        name: "svc:9080".into(),
        domains: vec!["svc".into(), "svc:9080".into()],
        routes: vec![route],
    };
    one_cluster_outbound(vh, C, endpoints)
}

/// Sends `req`, reads the whole body, and returns the status, the body and the one event.
async fn send(
    out: &Outbound,
    events: &Events,
    req: Request<Full<Bytes>>,
) -> (u16, Bytes, BTreeMap<String, String>) {
    let resp = out.request(req).await;
    let status = resp.status().as_u16();
    assert!(
        events.lock().unwrap().is_empty(),
        "logged before the body ended"
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut logged = std::mem::take(&mut *events.lock().unwrap());
    assert_eq!(logged.len(), 1, "one event per request: {logged:?}");
    (status, body, logged.remove(0))
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://svc:9080{path}"))
        .body(Full::default())
        .unwrap()
}

fn assert_fields(event: &BTreeMap<String, String>, want: &[(&str, &str)]) {
    for (k, v) in want {
        assert_eq!(
            event.get(*k).map(String::as_str),
            Some(*v),
            "{k} in {event:#?}"
        );
    }
}

#[tokio::test]
async fn a_success_is_logged_with_the_request_and_upstream_fields() {
    bounded(async {
        let (events, _guard) = capture();
        let up = scripted("up", &[]).await;
        let out = outbound(None, vec![up.addr]);
        let req = Request::post("http://svc:9080/api/x?q=1")
            .header("user-agent", "curl/8")
            .header("x-forwarded-for", "10.1.1.1")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let (status, body, e) = send(&out, &events, req).await;
        assert_eq!(status, 200);
        let addr = up.addr.to_string();
        let sent = body.len().to_string();
        assert_fields(
            &e,
            &[
                ("method", "POST"),
                ("path", "/api/x?q=1"),
                ("protocol", "HTTP/1.1"),
                ("response_code", "200"),
                ("response_flags", "-"),
                ("response_code_details", "via_upstream"),
                ("connection_termination_details", "-"),
                ("upstream_transport_failure_reason", "-"),
                ("bytes_received", "7"),
                ("bytes_sent", &sent),
                ("x_forwarded_for", "10.1.1.1"),
                ("user_agent", "curl/8"),
                ("authority", "svc:9080"),
                ("upstream_host", &addr),
                ("upstream_cluster", C),
                ("route_name", "default"),
                ("requested_server_name", "-"),
                ("upstream_peer_uri_san", "-"),
            ],
        );
        // The upstream connection's own end: a loopback address, not the upstream's.
        let local: std::net::SocketAddr = e["upstream_local_address"]
            .parse()
            .unwrap_or_else(|_| panic!("upstream_local_address in {e:#?}"));
        assert!(
            local.ip().is_loopback() && local.port() != 0 && local != up.addr,
            "{local}"
        );
        // Envoy's HCM generated the request id the upstream saw.
        let id = &e["request_id"];
        assert_eq!(id.len(), 36, "a UUID: {id}");
        assert!(e["upstream_service_time"].parse::<u64>().is_ok(), "{e:#?}");
        assert!(e["duration"].parse::<u64>().is_ok(), "{e:#?}");
        let t = &e["start_time"];
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    })
    .await;
}

#[tokio::test]
async fn exhausted_retries_are_logged_with_urx() {
    bounded(async {
        let (events, _guard) = capture();
        // The upstream's 503 retried once: Envoy logs `503 URX via_upstream`.
        let up = scripted("up", &[Act::Status(503), Act::Status(503)]).await;
        let policy = RetryPolicy {
            retry_on: RetryOn::HTTP_5XX,
            num_retries: 1,
            ..RetryPolicy::default()
        };
        let out = outbound(Some(policy.clone()), vec![up.addr]);
        let (status, _, e) = send(&out, &events, get("/api/retry")).await;
        assert_eq!(status, 503);
        assert_fields(
            &e,
            &[
                ("response_code", "503"),
                ("response_flags", "URX"),
                ("response_code_details", "via_upstream"),
                ("upstream_cluster", C),
                ("upstream_host", &up.addr.to_string()),
            ],
        );
        assert_eq!(up.seen().len(), 2);

        // A refused connect retried once: `503 URX,UF` with Envoy's reset details.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let policy = RetryPolicy {
            retry_on: RetryOn::CONNECT_FAILURE,
            ..policy
        };
        let out = outbound(Some(policy), vec![dead]);
        let (status, _, e) = send(&out, &events, get("/api/dead")).await;
        assert_eq!(status, 503);
        assert_fields(
            &e,
            &[
                ("response_code", "503"),
                ("response_flags", "URX,UF"),
                (
                    "response_code_details",
                    "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
                ),
                (
                    "upstream_transport_failure_reason",
                    "delayed_connect_error:_Connection_refused",
                ),
                ("upstream_service_time", "-"),
                ("upstream_host", &dead.to_string()),
                // No connection was made.
                ("upstream_local_address", "-"),
            ],
        );
    })
    .await;
}

#[tokio::test]
async fn no_route_is_logged_as_nr_without_an_upstream() {
    bounded(async {
        let (events, _guard) = capture();
        let up = scripted("up", &[]).await;
        let out = outbound(None, vec![up.addr]);
        let (status, body, e) = send(&out, &events, get("/nope")).await;
        assert_eq!(status, 404);
        assert!(body.is_empty());
        assert_fields(
            &e,
            &[
                ("path", "/nope"),
                ("response_code", "404"),
                ("response_flags", "NR"),
                ("response_code_details", "route_not_found"),
                ("bytes_sent", "0"),
                ("upstream_host", "-"),
                ("upstream_cluster", "-"),
                ("upstream_service_time", "-"),
                ("route_name", "-"),
            ],
        );
        assert!(up.seen().is_empty());
    })
    .await;
}

/// A route `idle_timeout` that fires while the upstream's body stalls: the body ends with
/// `StreamIdleTimeout` and the request is logged `200 SI stream_idle_timeout` with the bytes
/// that did arrive, as Envoy 1.40 logs it (observed; tests/routing_oracle.rs compares the rest).
#[tokio::test]
async fn an_idle_response_body_is_logged_with_si() {
    bounded(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (events, _guard) = capture();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _up = support_outbound::AbortOnDrop(tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                .await;
            // Stall until mesh gives up and closes.
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        }));
        let mut route = Route::new(
            "idle",
            RouteMatch::path(PathMatch::Prefix("/".into())),
            RouteAction::Cluster(C.into()),
        );
        route.idle_timeout = Some(std::time::Duration::from_millis(300));
        let vh = VirtualHost {
            name: "svc:9080".into(),
            domains: vec!["svc".into(), "svc:9080".into()],
            routes: vec![route],
        };
        let out = one_cluster_outbound(vh, C, vec![addr]);
        let resp = out.request(get("/stall")).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"abc");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<mesh_tower::outbound::StreamIdleTimeout>(), "{err}");
        let logged = std::mem::take(&mut *events.lock().unwrap());
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_fields(
            &logged[0],
            &[
                ("response_code", "200"),
                ("response_flags", "SI"),
                ("response_code_details", "stream_idle_timeout"),
                ("bytes_sent", "3"),
                ("route_name", "idle"),
            ],
        );
    })
    .await;
}

/// The inbound event: the connection's addresses, the peer's identity, the app as upstream.
#[tokio::test]
async fn an_inbound_request_is_logged_with_the_connection_fields() {
    bounded(async {
        let (events, _guard) = capture();
        let app = tower::service_fn(|_req: Request<mesh_tower::inbound::RequestBody>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"hello",
            ))))
        });
        let server = support::inbound::InboundServer::start(
            app,
            SnapshotCell::new(),
            CertStore::new(),
            support::inbound::config(9080, None, node()),
        )
        .await;
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let client = tcp.local_addr().unwrap().to_string();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/in?x=1")
            .header("host", "reviews:9080")
            .header("x-request-id", "req-1")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), b"hello");
        // The event is emitted as the server finishes the body: wait for it (bounded).
        let e = loop {
            if let Some(e) = events.lock().unwrap().pop() {
                break e;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        let local = server.addr.to_string();
        assert_fields(
            &e,
            &[
                ("method", "POST"),
                ("path", "/in?x=1"),
                ("response_code", "200"),
                ("response_flags", "-"),
                ("response_code_details", "via_upstream"),
                ("bytes_received", "3"),
                ("bytes_sent", "5"),
                ("request_id", "req-1"),
                ("authority", "reviews:9080"),
                ("upstream_cluster", "inbound|9080||"),
                ("downstream_local_address", &local),
                ("downstream_remote_address", &client),
                ("downstream_peer_uri_san", "-"),
                ("route_name", "default"),
            ],
        );
        drop(send);
        server.shutdown().await;
    })
    .await;
}
