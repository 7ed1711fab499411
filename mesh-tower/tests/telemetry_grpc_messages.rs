//! Istio's gRPC message counters over real sockets: a hand-framed HTTP/2 gRPC client calls
//! through mesh's outbound path (`reporter="source"`) into a gRPC app served by mesh's
//! inbound listener (`reporter="destination"`), with a unary call (through a route with a
//! retry policy, so the request body is buffered for replay) and a streaming call (no retry
//! policy: the body streams), each with messages split across HTTP/2 data frames. The
//! destination side counts the request's messages as the app reads its `RequestBody`.

mod support_outbound;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use mesh_core::cluster::{Cluster, UpstreamProtocol};
use mesh_core::endpoint::Endpoint;
use mesh_core::retry::RetryPolicy;
use mesh_core::route::{PathMatch, Route, RouteAction, RouteMatch, VirtualHost};
use mesh_core::snapshot::OutboundTrafficPolicy;
use mesh_core::{CertStore, SnapshotCell};
use mesh_tower::inbound::{self, InboundConfig, RequestBody};
use mesh_tower::outbound::Outbound;
use support_outbound::*;
use tokio::net::TcpListener;

const CLUSTER: &str = "outbound|9090||greeter.default.svc.cluster.local";

/// gRPC framing of `payloads` (uncompressed).
fn framed(payloads: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.push(0);
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// A body of data frames cut at `cuts` (so messages and headers straddle frames), then
/// optional trailers.
struct Frames(VecDeque<Frame<Bytes>>);

impl Frames {
    fn new(bytes: &[u8], cuts: &[usize], trailers: Option<HeaderMap>) -> Self {
        let mut frames = VecDeque::new();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            frames.push_back(Frame::data(Bytes::copy_from_slice(&bytes[at..c])));
            at = c;
        }
        if let Some(t) = trailers {
            frames.push_back(Frame::trailers(t));
        }
        Frames(frames)
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// The gRPC app: counts the request's messages itself and answers with `1` message for
/// `/greeter.Greeter/SayHello`, else `4` messages (a server stream) split over frames, and
/// `grpc-status: 0` trailers.
async fn greeter(req: Request<RequestBody>) -> Result<Response<Frames>, Infallible> {
    let unary = req.uri().path() == "/greeter.Greeter/SayHello";
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut seen = mesh_tower::grpc_frames::GrpcFrameCounter::new();
    seen.inspect(&body);
    let reply = if unary {
        framed(&[b"hello"])
    } else {
        framed(&[b"a", b"bb", b"", b"dddd"])
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let cuts: &[usize] = if unary { &[2] } else { &[3, 6, 7, 15, 16] };
    let mut resp = Response::new(Frames::new(&reply, cuts, Some(trailers)));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/grpc+proto"),
    );
    resp.headers_mut()
        .insert("x-request-messages-seen", HeaderValue::from(seen.count()));
    Ok(resp)
}

async fn serve_greeter() -> SocketAddr {
    let _ = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut server = node();
    server.workload_name = "greeter-v1".into();
    let config = InboundConfig {
        port: 9090,
        mode: None,
        node: server,
        header_read_timeout: None,
        idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
        drain: None,
        ext_authz: None,
    };
    tokio::spawn(inbound::serve(
        listener,
        tower::service_fn(greeter),
        SnapshotCell::new(),
        CertStore::new(),
        config,
        std::future::pending(),
    ));
    addr
}

/// Outbound to the greeter over HTTP/2: the unary method's route retries (body buffered),
/// every other path streams.
fn outbound(addr: SocketAddr) -> Outbound {
    let mut cluster = Cluster::eds(CLUSTER);
    cluster.protocol = UpstreamProtocol::Http2;
    let unary = Route::new(
        "unary",
        RouteMatch::path(PathMatch::Exact("/greeter.Greeter/SayHello".into())),
        RouteAction::Cluster(CLUSTER.into()),
    )
    .with_retry(Some(RetryPolicy::istio_default()));
    let rest = Route::new(
        "rest",
        RouteMatch::any(),
        RouteAction::Cluster(CLUSTER.into()),
    );
    let vh = VirtualHost {
        name: "greeter:9090".into(),
        domains: vec!["greeter".into(), "greeter:9090".into()],
        routes: vec![unary, rest],
    };
    let cell = SnapshotCell::new();
    cell.publish(
        snapshot(
            1,
            9090,
            vec![vh],
            vec![(cluster, vec![Endpoint::new(addr)])],
            OutboundTrafficPolicy::RegistryOnly,
        ),
        true,
    );
    Outbound::new(cell, CertStore::new(), node())
}

/// Calls `method` with `messages` split at `cuts`; returns the reply's messages and what the
/// app counted.
async fn call(out: &Outbound, method: &str, messages: &[&[u8]], cuts: &[usize]) -> (u64, u64) {
    let body = framed(messages);
    let req = Request::post(format!("http://greeter:9090{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Frames::new(&body, cuts, None))
        .unwrap();
    let resp = out.request(req).await;
    assert_eq!(resp.status(), 200);
    let seen: u64 = resp.headers()["x-request-messages-seen"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(
        collected.trailers().and_then(|t| t.get("grpc-status")),
        Some(&HeaderValue::from_static("0"))
    );
    let mut got = mesh_tower::grpc_frames::GrpcFrameCounter::new();
    got.inspect(&collected.to_bytes());
    (got.count(), seen)
}

const DESTINATION_GRPC: [&str; 3] = [
    "reporter=\"destination\"",
    "request_protocol=\"grpc\"",
    "grpc_response_status=\"0\"",
];

/// The destination side's `istio_request_messages_total` for gRPC calls so far.
fn destination_request_messages() -> u64 {
    let text = mesh_tower::telemetry::prometheus_handle()
        .expect("mesh's recorder")
        .render();
    sum(&text, "istio_request_messages_total", &DESTINATION_GRPC)
}

/// `name{...} value` samples with every `needle`, summed.
fn sum(text: &str, name: &str, needles: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_message_counters_on_both_sides_for_unary_and_streaming_calls() {
    bounded(async {
        let addr = serve_greeter().await;
        let out = outbound(addr);

        // Unary: one message each way; the request message's header straddles two frames.
        assert_eq!(
            call(&out, "/greeter.Greeter/SayHello", &[b"world"], &[3]).await,
            (1, 1)
        );
        // Recorded as the response ended, before the client read its trailers.
        assert_eq!(destination_request_messages(), 1);
        // Client and server streaming: 3 messages up (one empty), 4 down.
        assert_eq!(
            call(
                &out,
                "/greeter.Greeter/Chat",
                &[b"one", b"", b"three!"],
                &[1, 4, 9, 10, 12]
            )
            .await,
            (4, 3)
        );
        assert_eq!(destination_request_messages(), 1 + 3);
        // A plain HTTP request to the same cluster has no message counters.
        let r = out.get("http://greeter:9090/plain").await.unwrap();
        assert_eq!(r.status(), 200);

        let handle = mesh_tower::telemetry::prometheus_handle().expect("mesh's recorder");
        let text = handle.render();
        let source = [
            "reporter=\"source\"",
            "request_protocol=\"grpc\"",
            "grpc_response_status=\"0\"",
        ];
        let destination = DESTINATION_GRPC;
        assert_eq!(sum(&text, "istio_requests_total", &source), 2, "{text}");
        assert_eq!(
            sum(&text, "istio_request_messages_total", &source),
            4,
            "{text}"
        );
        assert_eq!(
            sum(&text, "istio_response_messages_total", &source),
            5,
            "{text}"
        );
        assert_eq!(
            sum(&text, "istio_requests_total", &destination),
            2,
            "{text}"
        );
        assert_eq!(
            sum(&text, "istio_request_messages_total", &destination),
            4,
            "{text}"
        );
        assert_eq!(
            sum(&text, "istio_response_messages_total", &destination),
            5,
            "{text}"
        );
        // Same label set as istio_requests_total, on both sides.
        for reporter in [source[0], destination[0]] {
            let labels = |name: &str| -> Vec<String> {
                text.lines()
                    .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(reporter))
                    .map(|l| l[name.len()..l.rfind(' ').unwrap()].to_owned())
                    .collect()
            };
            let requests = labels("istio_requests_total");
            for family in [
                "istio_request_messages_total",
                "istio_response_messages_total",
            ] {
                let mine = labels(family);
                assert!(!mine.is_empty(), "{family} {reporter} missing:\n{text}");
                for l in &mine {
                    assert!(
                        requests.contains(l),
                        "{family}{l} has no istio_requests_total twin"
                    );
                }
            }
        }
        // The plain request was recorded on both sides, as HTTP.
        for reporter in [source[0], destination[0]] {
            let http = [
                reporter,
                "request_protocol=\"http\"",
                "response_code=\"200\"",
            ];
            assert_eq!(sum(&text, "istio_requests_total", &http), 1, "{text}");
        }
        // Non-gRPC requests have none.
        assert!(
            !text
                .lines()
                .any(|l| l.contains("messages_total{") && l.contains("request_protocol=\"http\"")),
            "{text}"
        );
    })
    .await;
}
