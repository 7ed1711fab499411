//! The per-connection hyper service in front of the application: puts the peer identity into
//! request extensions and meters every request until its response body ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use mesh_core::identity::PeerIdentity;
use mesh_core::peer_metadata::{PEER_METADATA, PEER_METADATA_ID, PeerMetadata};
use mesh_core::readiness::Readiness;
use mesh_core::telemetry::WorkloadLabels;
use pin_project::pin_project;
use tower::ServiceExt;

use crate::grpc_frames::{CountedBody, MessageCount};
use crate::grpc_reply::{GRPC_STATUS, Grpc};
use tower::util::Oneshot;

use super::access_log::AccessLog;
use super::authz::{ConnectionAuthz, LocalReply};
use super::idle::{ActiveRequest, ConnectionActivity};
use super::jwt::JwksCache;
use super::stats::{ConnectionLabels, Finished, ListenerStats};
use mesh_core::authz::DynamicMetadata;
use mesh_core::authz::jwt::JwtAuthn;

/// This workload's `x-envoy-peer-metadata-id` / `x-envoy-peer-metadata` values, encoded once
/// per listener.
#[derive(Debug, Clone)]
pub(crate) struct LocalPeerHeaders {
    pub(crate) id: HeaderValue,
    pub(crate) metadata: HeaderValue,
}

/// The last peer metadata seen on a connection and the source labels it decoded to: a
/// sidecar sends the same value on every request, so decoding happens once per connection.
#[derive(Debug)]
struct CachedPeer {
    raw: HeaderValue,
    labels: Option<Arc<WorkloadLabels>>,
}

/// Wraps the application for one connection.
#[derive(Debug)]
pub(crate) struct InboundService<S> {
    app: S,
    peer: Option<PeerIdentity>,
    labels: Arc<ConnectionLabels>,
    local_headers: Option<Arc<LocalPeerHeaders>>,
    stats: Arc<ListenerStats>,
    access: Option<Arc<super::access_log::ConnectionInfo>>,
    cached_peer: ArcSwapOption<CachedPeer>,
    authz: Option<Arc<ConnectionAuthz>>,
    tls: bool,
    xfcc: Option<HeaderValue>,
    jwt: Option<(Arc<JwtAuthn>, Arc<JwksCache>)>,
    drain: Option<Readiness>,
    activity: Option<Arc<ConnectionActivity>>,
}

impl<S> InboundService<S> {
    pub(crate) fn new(
        app: S,
        peer: Option<PeerIdentity>,
        labels: Arc<ConnectionLabels>,
        local_headers: Option<Arc<LocalPeerHeaders>>,
        stats: Arc<ListenerStats>,
        access: Option<Arc<super::access_log::ConnectionInfo>>,
    ) -> Self {
        InboundService {
            app,
            peer,
            labels,
            local_headers,
            stats,
            access,
            cached_peer: ArcSwapOption::empty(),
            authz: None,
            tls: false,
            xfcc: None,
            jwt: None,
            drain: None,
            activity: None,
        }
    }

    /// Counts this connection's active requests for its idle timeout.
    pub(crate) fn with_activity(mut self, activity: Arc<ConnectionActivity>) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Runs the port's `jwt_authn` filter (RequestAuthentication) before authorization.
    pub(crate) fn with_jwt(mut self, jwt: Option<Arc<JwtAuthn>>, cache: Arc<JwksCache>) -> Self {
        self.jwt = jwt.map(|j| (j, cache));
        self
    }

    /// The XFCC element this connection's client certificate adds (`None`: no client
    /// certificate, so a client-sent XFCC is stripped).
    pub(crate) fn with_xfcc(mut self, xfcc: Option<HeaderValue>) -> Self {
        self.xfcc = xfcc;
        self
    }

    /// Enforces `authz` (the port's HTTP authorization chain) on every request.
    pub(crate) fn with_authz(mut self, authz: Option<Arc<ConnectionAuthz>>, tls: bool) -> Self {
        self.authz = authz;
        self.tls = tls;
        self
    }

    /// Answers HTTP/1.1 requests with `connection: close` once `drain` is draining.
    pub(crate) fn with_drain(mut self, drain: Option<Readiness>) -> Self {
        self.drain = drain;
        self
    }

    /// Reads and removes the peer metadata headers (Istio's `downstream_discovery`), returning
    /// the source labels they describe (`None` when absent or unreadable) and whether the
    /// request carried them (which decides `downstream_propagation`).
    fn discover_peer(&self, headers: &mut HeaderMap) -> (Option<Arc<WorkloadLabels>>, bool) {
        // A name scan (no hashing) skips the removes for requests without the exchange.
        if !headers
            .keys()
            .any(|k| *k == PEER_METADATA || *k == PEER_METADATA_ID)
        {
            return (None, false);
        }
        let id = headers.remove(PEER_METADATA_ID);
        let Some(raw) = headers.remove(PEER_METADATA) else {
            return (None, id.is_some());
        };
        let cached = self.cached_peer.load();
        if let Some(c) = cached.as_ref()
            && c.raw == raw
        {
            return (c.labels.clone(), true);
        }
        let labels = match PeerMetadata::decode_header(raw.as_bytes()) {
            Ok(m) => Some(Arc::new(self.labels.merge_peer(m.workload_labels()))),
            Err(error) => {
                tracing::debug!(%error, "ignoring unreadable peer metadata");
                None
            }
        };
        self.cached_peer.store(Some(Arc::new(CachedPeer {
            raw,
            labels: labels.clone(),
        })));
        (labels, true)
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for InboundService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    B: Body,
{
    type Response = Response<MeteredBody<B>>;
    type Error = S::Error;
    type Future = InboundFuture<S, B>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let kind = Grpc::of(req.method(), req.headers());
        let grpc = kind.telemetry();
        let (mut req, request_messages) = RequestBody::wrap(req, grpc);
        let head = req.method() == Method::HEAD;
        let request_bytes = req.body().size_hint().exact().unwrap_or(0);
        // Envoy's codec refuses these before any filter sees the request.
        let refused = super::codec::check(&req);
        // Envoy's codec refuses before the HCM knows the request is gRPC.
        let grpc_reply = if refused.is_none() { kind } else { Grpc::No };
        let (source, exchanged) = self.discover_peer(req.headers_mut());
        let trace = super::tracing_headers::on_request(req.headers_mut());
        let span = super::tracing_headers::inbound_request_span(
            &req,
            trace.as_ref(),
            self.access.as_deref(),
        );
        super::xfcc::apply(req.headers_mut(), self.xfcc.as_ref());
        let access = self
            .access
            .as_ref()
            .filter(|_| super::access_log::enabled())
            .map(|conn| Box::new(AccessLog::from_request(&req, Arc::clone(conn))));
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        self.stats.request_started();
        let close = req.version() <= http::Version::HTTP_11
            && self.drain.as_ref().is_some_and(Readiness::is_draining);
        let meter = Some(Meter {
            close,
            labels: Arc::clone(&self.labels),
            source,
            propagate: if exchanged {
                self.local_headers.clone()
            } else {
                None
            },
            stats: Arc::clone(&self.stats),
            access,
            grpc,
            grpc_reply,
            head,
            started,
            request_bytes,
            request_messages,
            span,
            active: self
                .activity
                .as_ref()
                .map(ConnectionActivity::request_started),
        });
        // Envoy's HCM normalizes the path before any filter; then the JWT filter and the RBAC
        // filters run.
        let mut local = refused.or_else(|| super::authz::normalize_request_path(req.uri_mut()));
        let mut external = None;
        if local.is_none() {
            match &self.jwt {
                Some((jwt, cache)) => {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let stale = cache.stale(&jwt.remote_jwks_wanted(req.headers(), path));
                    if !stale.is_empty() {
                        // Remote keys must be fetched first (bounded by each fetch's timeout).
                        let (jwt, cache) = (Arc::clone(jwt), Arc::clone(cache));
                        let authz = self.authz.clone();
                        let tls = self.tls;
                        let prepare = Prepare(Box::pin(async move {
                            cache.refresh(&stale).await;
                            match (super::jwt::check(&jwt, &cache, &mut req, tls), authz) {
                                (Ok(md), Some(a)) => {
                                    super::authz::ext_authz::authorize(a, req, tls, md).await
                                }
                                (Ok(_), None) => (req, None),
                                (Err(reply), _) => (req, Some(reply)),
                            }
                        }));
                        return InboundFuture {
                            state: State::Prepare {
                                prepare,
                                app: Some(self.app.clone()),
                            },
                            meter,
                        };
                    }
                    match super::jwt::check(jwt, cache, &mut req, self.tls) {
                        Ok(md) => local = self.authorize(&req, md, &mut external),
                        Err(reply) => local = Some(reply),
                    }
                }
                None => local = self.authorize(&req, DynamicMetadata::default(), &mut external),
            }
        }
        if let Some(pending) = external {
            // An ext_authz provider (CUSTOM action) must answer first.
            let prepare = Prepare(Box::pin(super::authz::ext_authz::resume(pending, req)));
            let app = Some(self.app.clone());
            let state = State::Prepare { prepare, app };
            return InboundFuture { state, meter };
        }
        let state = match local {
            None => State::App {
                call: self.app.clone().oneshot(req),
            },
            Some(reply) => State::Local {
                reply: Some(Box::new(reply)),
            },
        };
        InboundFuture { state, meter }
    }
}

impl<S> InboundService<S> {
    /// Runs the HTTP authorization chain; a request that must wait for an ext_authz provider
    /// is left in `external`.
    fn authorize(
        &self,
        req: &Request<RequestBody>,
        md: DynamicMetadata,
        external: &mut Option<Box<super::authz::PendingExtAuthz>>,
    ) -> Option<LocalReply> {
        let authz = self.authz.as_ref()?;
        match authz.check_request(req.method(), req.uri(), req.headers(), self.tls, md) {
            Ok(local) => local,
            Err(pending) => {
                *external = Some(pending);
                None
            }
        }
    }
}

/// Work before the application call that must await (remote JWKS fetches): yields the request
/// back, or the local reply replacing the application's.
struct Prepare(Pin<Box<dyn Future<Output = Prepared> + Send + 'static>>);

/// The request, and the local reply replacing the application's answer, if any.
type Prepared = (Request<RequestBody>, Option<LocalReply>);

impl std::fmt::Debug for Prepare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepare")
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    std::str::from_utf8(headers.get(GRPC_STATUS)?.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[derive(Debug)]
struct Meter {
    /// Draining: the HTTP/1.1 response closes the connection.
    close: bool,
    labels: Arc<ConnectionLabels>,
    source: Option<Arc<WorkloadLabels>>,
    propagate: Option<Arc<LocalPeerHeaders>>,
    stats: Arc<ListenerStats>,
    access: Option<Box<AccessLog>>,
    grpc: bool,
    /// What the request is to Envoy's local replies.
    grpc_reply: Grpc,
    head: bool,
    started: Instant,
    request_bytes: u64,
    /// gRPC: the request body's messages, counted as the application reads it.
    request_messages: Option<MessageCount>,
    /// The request's span (disabled unless a subscriber wants it), entered while polling.
    span: tracing::Span,
    /// Active on its connection until the response ends.
    active: Option<ActiveRequest>,
}

/// The application's response future, wrapping the body in a [`MeteredBody`].
#[pin_project]
#[derive(Debug)]
pub(crate) struct InboundFuture<S, B>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
{
    #[pin]
    state: State<S, B>,
    meter: Option<Meter>,
}

/// Calling the application, or answering locally (authorization denied, bad path).
// The application call is the hot path and stays inline; boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = StateProj)]
#[derive(Debug)]
enum State<S, B>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
{
    App {
        #[pin]
        call: Oneshot<S, Request<RequestBody>>,
    },
    Local {
        reply: Option<Box<LocalReply>>,
    },
    Prepare {
        prepare: Prepare,
        app: Option<S>,
    },
}

/// Envoy's local reply; to a gRPC request (`grpc`), its gRPC form (HTTP 200, trailers-only,
/// `grpc-status` mapped from the status, the body as `grpc-message`).
fn local_response<B>(reply: &LocalReply, grpc: Grpc) -> Response<InboundBody<B>> {
    let form = grpc.replies();
    let mut response = Response::new(InboundBody::Local {
        data: (!reply.body.is_empty() && !form).then(|| match &reply.body {
            std::borrow::Cow::Borrowed(b) => bytes::Bytes::from_static(b.as_bytes()),
            std::borrow::Cow::Owned(b) => bytes::Bytes::from(b.clone()),
        }),
    });
    *response.status_mut() = match form {
        true => StatusCode::OK,
        false => StatusCode::from_u16(reply.status).unwrap_or(StatusCode::FORBIDDEN),
    };
    let h = response.headers_mut();
    if form {
        let code = mesh_core::fault::http_to_grpc_status(reply.status);
        crate::grpc_reply::set_headers(h, grpc, code, reply.body.as_bytes());
    } else {
        if !reply.body.is_empty() {
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
        }
        h.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from(reply.body.len()),
        );
    }
    if let Some(location) = reply
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        h.insert(http::header::LOCATION, location);
    }
    if let Some(v) = reply
        .www_authenticate
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert(http::header::WWW_AUTHENTICATE, v);
    }
    for (name, value) in &reply.headers {
        h.append(name.clone(), value.clone());
    }
    response
}

impl<S, B> Future for InboundFuture<S, B>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
    B: Body,
{
    type Output = Result<Response<MeteredBody<B>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The application's own events nest under the request span.
        let _entered = this
            .meter
            .as_ref()
            .filter(|m| !m.span.is_disabled())
            .map(|m| m.span.clone().entered());
        if let StateProj::Prepare { prepare, app } = this.state.as_mut().project() {
            let (req, local) = ready!(prepare.0.as_mut().poll(cx));
            let next = match (local, app.take()) {
                (None, Some(app)) => State::App {
                    call: app.oneshot(req),
                },
                (Some(reply), _) => State::Local {
                    reply: Some(Box::new(reply)),
                },
                // Polled after completion: hyper never does this.
                (None, None) => return Poll::Pending,
            };
            this.state.set(next);
        }
        let (result, flags) = match this.state.project() {
            StateProj::App { call } => (
                ready!(call.poll(cx)).map(|r| r.map(|body| InboundBody::App { body })),
                "-",
            ),
            StateProj::Local { reply } => match reply.take() {
                Some(reply) => {
                    let grpc = this.meter.as_ref().map_or(Grpc::No, |m| m.grpc_reply);
                    (Ok(local_response(&reply, grpc)), reply.flags)
                }
                None => return Poll::Pending,
            },
            StateProj::Prepare { .. } => return Poll::Pending,
        };
        let Some(meter) = this.meter.take() else {
            // Polled after completion: hyper never does this.
            return Poll::Pending;
        };
        match result {
            Ok(mut response) => {
                if meter.close {
                    response
                        .headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                if let Some(local) = &meter.propagate {
                    let h = response.headers_mut();
                    h.insert(PEER_METADATA_ID, local.id.clone());
                    h.insert(PEER_METADATA, local.metadata.clone());
                }
                let status = response.status();
                super::tracing_headers::record_response(
                    &meter.span,
                    status.as_u16(),
                    flags,
                    None,
                    None,
                );
                let mut pending = Pending {
                    labels: meter.labels,
                    source: meter.source,
                    stats: meter.stats,
                    access: meter.access,
                    _active: meter.active,
                    flags,
                    finished: Finished {
                        grpc: meter.grpc,
                        response_code: status.as_u16(),
                        grpc_status: if meter.grpc {
                            grpc_status(response.headers())
                        } else {
                            None
                        },
                        response_flags: "-",
                        started: meter.started,
                        request_bytes: meter.request_bytes,
                        response_bytes: 0,
                        request_messages: meter.request_messages,
                        response_messages: Default::default(),
                    },
                };
                let (parts, body) = response.into_parts();
                // Bodies hyper will not poll: record at once.
                let bodiless = meter.head
                    || status == StatusCode::NO_CONTENT
                    || status == StatusCode::NOT_MODIFIED
                    || body.is_end_stream();
                let recorder = if bodiless {
                    pending.finish(flags);
                    None
                } else {
                    Some(pending)
                };
                Poll::Ready(Ok(Response::from_parts(
                    parts,
                    MeteredBody {
                        inner: body,
                        recorder: Recorder(recorder),
                    },
                )))
            }
            Err(error) => {
                // hyper resets the stream / closes the connection: nothing was sent.
                let mut pending = Pending {
                    labels: meter.labels,
                    source: meter.source,
                    stats: meter.stats,
                    access: meter.access,
                    _active: meter.active,
                    flags,
                    finished: Finished {
                        grpc: meter.grpc,
                        response_code: 0,
                        grpc_status: None,
                        response_flags: "-",
                        started: meter.started,
                        request_bytes: meter.request_bytes,
                        response_bytes: 0,
                        request_messages: meter.request_messages,
                        response_messages: Default::default(),
                    },
                };
                pending.finish("-");
                Poll::Ready(Err(error))
            }
        }
    }
}

#[derive(Debug)]
struct Pending {
    labels: Arc<ConnectionLabels>,
    source: Option<Arc<WorkloadLabels>>,
    stats: Arc<ListenerStats>,
    access: Option<Box<AccessLog>>,
    /// Flags recorded when the response ends normally (`RBAC` for a denial).
    flags: &'static str,
    finished: Finished,
    /// Active on its connection until recorded.
    _active: Option<ActiveRequest>,
}

impl Pending {
    fn finish(&mut self, flags: &'static str) {
        self.finished.response_flags = flags;
        self.labels.record(&self.finished, self.source.as_ref());
        self.stats.request_finished(self.finished.response_code);
        if let Some(access) = self.access.take() {
            access.emit(&self.finished);
        }
    }
}

/// Records the request once: at the end of the body, or (as Envoy's `DC`, downstream
/// connection termination) when the body is dropped before its end.
#[derive(Debug)]
struct Recorder(Option<Pending>);

impl Recorder {
    fn finish(&mut self) {
        if let Some(mut pending) = self.0.take() {
            let flags = pending.flags;
            pending.finish(flags);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(mut pending) = self.0.take() {
            pending.finish("DC");
        }
    }
}

/// The request body the application receives: hyper's [`Incoming`], read through mesh so the
/// destination side counts a gRPC request's messages (`istio_request_messages_total`) as the
/// body streams, as Envoy's `grpc_stats` filter does. Frames pass through unchanged and
/// unbuffered; a non-gRPC body is a plain pass-through.
#[derive(Debug)]
pub struct RequestBody(RequestKind);

#[derive(Debug)]
enum RequestKind {
    Plain(Incoming),
    Grpc(CountedBody<Incoming>),
}

impl RequestBody {
    /// Wraps the body of `req`, counting its messages when it is a gRPC request.
    fn wrap(req: Request<Incoming>, grpc: bool) -> (Request<RequestBody>, Option<MessageCount>) {
        let (parts, body) = req.into_parts();
        let (kind, count) = if grpc {
            let (counted, count) = CountedBody::new(body);
            (RequestKind::Grpc(counted), Some(count))
        } else {
            (RequestKind::Plain(body), None)
        };
        (Request::from_parts(parts, RequestBody(kind)), count)
    }
}

/// A body that mesh does not meter (for serving the same handler outside mesh).
impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        RequestBody(RequestKind::Plain(body))
    }
}

impl Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        match &mut self.get_mut().0 {
            RequestKind::Plain(body) => Pin::new(body).poll_frame(cx),
            RequestKind::Grpc(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            RequestKind::Plain(body) => body.is_end_stream(),
            RequestKind::Grpc(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            RequestKind::Plain(body) => body.size_hint(),
            RequestKind::Grpc(body) => body.size_hint(),
        }
    }
}

/// The response body: the application's, or a local reply's.
#[pin_project(project = InboundBodyProj)]
#[derive(Debug)]
pub enum InboundBody<B> {
    /// The application's body.
    App {
        /// The body.
        #[pin]
        body: B,
    },
    /// A local reply's (static) body.
    Local {
        /// The bytes not yet sent.
        data: Option<bytes::Bytes>,
    },
}

/// A frame of an [`InboundBody`]: the application's data, or a local reply's bytes.
#[derive(Debug)]
pub enum InboundData<D> {
    /// The application's.
    App(D),
    /// A local reply's.
    Local(bytes::Bytes),
}

impl<D: bytes::Buf> bytes::Buf for InboundData<D> {
    fn remaining(&self) -> usize {
        match self {
            InboundData::App(d) => d.remaining(),
            InboundData::Local(b) => b.remaining(),
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            InboundData::App(d) => d.chunk(),
            InboundData::Local(b) => b.chunk(),
        }
    }

    fn advance(&mut self, cnt: usize) {
        match self {
            InboundData::App(d) => d.advance(cnt),
            InboundData::Local(b) => b.advance(cnt),
        }
    }
}

impl<B: Body> Body for InboundBody<B> {
    type Data = InboundData<B::Data>;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            InboundBodyProj::App { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map(|frame| frame.map_data(InboundData::App)))),
            InboundBodyProj::Local { data } => {
                Poll::Ready(data.take().map(|b| Ok(Frame::data(InboundData::Local(b)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            InboundBody::App { body } => body.is_end_stream(),
            InboundBody::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            InboundBody::App { body } => body.size_hint(),
            InboundBody::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The response body (the application's or a local reply's), counting bytes and reading
/// `grpc-status` trailers.
#[pin_project]
#[derive(Debug)]
pub struct MeteredBody<B> {
    #[pin]
    inner: InboundBody<B>,
    recorder: Recorder,
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = InboundData<B::Data>;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(pending) = this.recorder.0.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        pending.finished.response_bytes += bytes::Buf::remaining(data) as u64;
                        if pending.finished.grpc {
                            pending.finished.response_messages.inspect_buf(data);
                        }
                    } else if let Some(status) = frame
                        .trailers_ref()
                        .filter(|_| pending.finished.grpc)
                        .and_then(grpc_status)
                    {
                        pending.finished.grpc_status = Some(status);
                    }
                    if this.inner.is_end_stream() {
                        this.recorder.finish();
                    }
                }
                None => this.recorder.finish(),
                // The body failed: hyper resets the stream; Drop records it.
                Some(Err(_)) => {}
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
