//! A test OTLP collector: a real gRPC server for
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` on 127.0.0.1, keeping what it
//! receives as plain values ([`ExportedSpan`]). Also accepts spans from other exporters (a
//! real Envoy's `envoy.tracers.opentelemetry`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::proto::{self, any_value::Value};

/// An attribute value as received.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    /// `string_value`.
    String(String),
    /// `bool_value`.
    Bool(bool),
    /// `int_value`.
    Int(i64),
    /// `double_value`.
    Double(f64),
    /// A kind mesh does not declare (arrays, maps, bytes) or an empty value.
    Other,
}

/// The OTLP span kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// `SPAN_KIND_SERVER`.
    Server,
    /// `SPAN_KIND_CLIENT`.
    Client,
    /// Any other kind.
    Other(i32),
}

/// One span as the collector received it; ids in lower-case hex.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedSpan {
    /// The resource's `service.name`.
    pub service_name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; `None` for a root span.
    pub parent_span_id: Option<String>,
    /// The span name.
    pub name: String,
    /// The span kind.
    pub kind: SpanKind,
    /// The span's attributes.
    pub attributes: BTreeMap<String, AttributeValue>,
    /// Start and end, nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// See `start_unix_nano`.
    pub end_unix_nano: u64,
    /// Whether the status code is `STATUS_CODE_ERROR`.
    pub error: bool,
}

impl ExportedSpan {
    /// A string attribute.
    pub fn str_attribute(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(AttributeValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute.
    pub fn int_attribute(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(AttributeValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Received {
    spans: Mutex<Vec<ExportedSpan>>,
    exports: Mutex<u64>,
    changed: Notify,
}

/// The collector; stops when dropped.
#[derive(Debug)]
pub struct TestCollector {
    addr: SocketAddr,
    received: Arc<Received>,
    _stop: oneshot::Sender<()>,
}

impl TestCollector {
    /// Listens on 127.0.0.1 on an ephemeral port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let service = TraceServiceServer {
            received: Arc::clone(&received),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(TestCollector {
            addr,
            received,
            _stop: stop,
        })
    }

    /// `http://127.0.0.1:<port>`, for [`crate::OtlpConfig::endpoint`].
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ExportedSpan> {
        lock(&self.received.spans).clone()
    }

    /// `Export` calls received so far.
    pub fn exports(&self) -> u64 {
        *lock(&self.received.exports)
    }

    /// Waits (at most `timeout`) until at least `n` spans arrived; returns all received.
    pub async fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<ExportedSpan> {
        self.wait_for(n, timeout, |_| true).await
    }

    /// Waits (at most `timeout`) until at least `n` spans of trace `trace_id` (32 hex digits)
    /// arrived; returns those received.
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<ExportedSpan> {
        self.wait_for(n, timeout, |s| s.trace_id == trace_id).await
    }

    async fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
        keep: impl Fn(&ExportedSpan) -> bool,
    ) -> Vec<ExportedSpan> {
        let matching = || -> Vec<ExportedSpan> {
            lock(&self.received.spans)
                .iter()
                .filter(|s| keep(s))
                .cloned()
                .collect()
        };
        let wait = async {
            loop {
                let notified = self.received.changed.notified();
                if matching().len() >= n {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        matching()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<proto::AnyValue>) -> AttributeValue {
    match v.and_then(|v| v.value) {
        Some(Value::StringValue(s)) => AttributeValue::String(s),
        Some(Value::BoolValue(b)) => AttributeValue::Bool(b),
        Some(Value::IntValue(i)) => AttributeValue::Int(i),
        Some(Value::DoubleValue(d)) => AttributeValue::Double(d),
        None => AttributeValue::Other,
    }
}

impl Received {
    fn record(&self, req: proto::ExportTraceServiceRequest) {
        let mut out = Vec::new();
        for rs in req.resource_spans {
            let service_name = rs
                .resource
                .into_iter()
                .flat_map(|r| r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match value(kv.value) {
                    AttributeValue::String(s) => Some(s),
                    _ => None,
                })
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                out.push(ExportedSpan {
                    service_name: service_name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name,
                    kind: match s.kind {
                        proto::SPAN_KIND_SERVER => SpanKind::Server,
                        proto::SPAN_KIND_CLIENT => SpanKind::Client,
                        k => SpanKind::Other(k),
                    },
                    attributes: s
                        .attributes
                        .into_iter()
                        .map(|kv| (kv.key, value(kv.value)))
                        .collect(),
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    error: s
                        .status
                        .is_some_and(|st| st.code == proto::STATUS_CODE_ERROR),
                });
            }
        }
        lock(&self.spans).extend(out);
        *lock(&self.exports) += 1;
        self.changed.notify_waiters();
    }
}

/// The `TraceService` gRPC service (what generated tonic code would be, written out).
#[derive(Debug, Clone)]
struct TraceServiceServer {
    received: Arc<Received>,
}

impl tonic::server::NamedService for TraceServiceServer {
    const NAME: &'static str = proto::SERVICE_NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

struct Export(Arc<Received>);

impl tonic::server::UnaryService<proto::ExportTraceServiceRequest> for Export {
    type Response = proto::ExportTraceServiceResponse;
    type Future = BoxFuture<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<proto::ExportTraceServiceRequest>) -> Self::Future {
        let received = Arc::clone(&self.0);
        Box::pin(async move {
            received.record(request.into_inner());
            Ok(tonic::Response::new(proto::ExportTraceServiceResponse {
                partial_success: None,
            }))
        })
    }
}

impl<B> tower::Service<http::Request<B>> for TraceServiceServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != proto::EXPORT_PATH {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("unknown method").into_http())
            });
        }
        let export = Export(Arc::clone(&self.received));
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<
                proto::ExportTraceServiceResponse,
                proto::ExportTraceServiceRequest,
            >::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(export, req).await)
        })
    }
}
