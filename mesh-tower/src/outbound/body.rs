//! The response body the outbound service returns: the upstream's body, or a local reply.
//! When it ends, the HTTP/1.1 connection goes back to its pool and the request's metrics are
//! recorded.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{BoxError, Checkin};
use super::telemetry::Record;

/// The body of every response [`Outbound`](super::Outbound) returns.
pub struct OutboundBody {
    kind: Kind,
    checkin: Option<Checkin>,
    record: Option<Record>,
    response_bytes: u64,
    guards: Option<InFlight>,
    /// The access log line, when a subscriber wants it.
    access: Option<Box<super::access::Pending>>,
    /// The route's stream idle timer, while the upstream's body streams.
    idle: Option<super::idle::ResponseWatch>,
}

/// What a response holds while its body streams: the host's active-request count (least
/// request) and the cluster's request count (circuit breaker).
#[derive(Debug, Default)]
#[allow(dead_code)] // Held for their `Drop`.
pub(crate) struct InFlight {
    pub host: Option<mesh_core::lb::ActiveRequest>,
    pub cluster: Option<CounterGuard>,
    /// The answering upstream attempt (dropped after the breaker slot, so the cluster's
    /// `rq_open` gauge sees the slot freed).
    pub attempt: Option<super::telemetry::Attempt>,
}

/// Holds one unit of a counter until dropped.
#[derive(Debug)]
pub(crate) struct CounterGuard(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl CounterGuard {
    /// Takes one unit of `counter` if it is below `max`.
    pub(crate) fn try_acquire(
        counter: &std::sync::Arc<std::sync::atomic::AtomicU32>,
        max: u32,
    ) -> Option<CounterGuard> {
        use std::sync::atomic::Ordering;
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| CounterGuard(counter.clone()))
    }
}

impl Drop for CounterGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

enum Kind {
    Full(Option<Bytes>),
    Incoming(Incoming),
}

impl std::fmt::Debug for OutboundBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Full(_) => "local",
            Kind::Incoming(_) => "upstream",
        };
        f.debug_struct("OutboundBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl OutboundBody {
    /// A complete body (used for Envoy's local replies).
    pub(crate) fn full(bytes: Bytes, record: Option<Record>) -> Self {
        OutboundBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            checkin: None,
            record,
            response_bytes: 0,
            guards: None,
            access: None,
            idle: None,
        }
    }

    /// The upstream's body; `checkin` returns its connection to the pool when it ends.
    pub(crate) fn upstream(
        body: Incoming,
        checkin: Option<Checkin>,
        record: Option<Record>,
        guards: InFlight,
    ) -> Self {
        let mut b = OutboundBody {
            kind: Kind::Incoming(body),
            checkin,
            record,
            response_bytes: 0,
            guards: Some(guards),
            access: None,
            idle: None,
        };
        if Body::is_end_stream(&b) {
            b.finish();
        }
        b
    }

    /// An empty body that records nothing.
    pub fn empty() -> Self {
        OutboundBody::full(Bytes::new(), None)
    }

    /// Emits `access` when the body ends (at once if it already has).
    pub(crate) fn set_access(&mut self, access: Box<super::access::Pending>) {
        if self.record.is_none() && self.guards.is_none() && Body::is_end_stream(self) {
            access.emit(self.response_bytes);
        } else {
            self.access = Some(access);
        }
    }

    /// Bounds the upstream's body by the route's stream idle timer (a local reply's body is
    /// complete already).
    pub(crate) fn set_idle(&mut self, idle: super::idle::ResponseWatch) {
        if matches!(self.kind, Kind::Incoming(_)) && !Body::is_end_stream(self) {
            self.idle = Some(idle);
        }
    }

    fn finish(&mut self) {
        self.guards = None;
        self.idle = None;
        if let Some(c) = self.checkin.take() {
            c.release();
        }
        if let Some(r) = self.record.take() {
            r.finish(self.response_bytes);
        }
        if let Some(a) = self.access.take() {
            a.emit(self.response_bytes);
        }
    }
}

impl Body for OutboundBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(b) => {
                let out = b.take();
                if let Some(b) = &out {
                    this.response_bytes += b.len() as u64;
                }
                this.finish();
                Poll::Ready(out.map(|b| Ok(Frame::data(b))))
            }
            Kind::Incoming(inc) => match Pin::new(&mut *inc).poll_frame(cx) {
                Poll::Pending => {
                    let Some(idle) = this.idle.as_mut() else {
                        return Poll::Pending;
                    };
                    ready!(idle.poll_expired(cx));
                    // Envoy resets the stream: the connection is not reusable, and the
                    // request is logged with `SI`.
                    tracing::debug!("stream idle timeout while the response body streamed");
                    this.checkin = None;
                    if let Some(r) = this.record.as_mut() {
                        r.flag |= mesh_core::flags::ResponseFlags::StreamIdleTimeout;
                    }
                    if let Some(a) = this.access.as_mut() {
                        a.add_flags(mesh_core::flags::ResponseFlags::StreamIdleTimeout);
                    }
                    this.kind = Kind::Full(None);
                    this.finish();
                    Poll::Ready(Some(Err(Box::new(super::idle::StreamIdleTimeout))))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(idle) = &this.idle {
                        idle.touch();
                    }
                    if let Some(d) = frame.data_ref() {
                        this.response_bytes += d.len() as u64;
                        if let Some(r) = this.record.as_mut().filter(|r| r.grpc) {
                            r.grpc_messages.response.inspect(d);
                        }
                    } else if let Some(t) = frame.trailers_ref()
                        && let Some(r) = this.record.as_mut()
                        && r.grpc
                    {
                        r.grpc_status = super::grpc_status(t);
                    }
                    if inc.is_end_stream() {
                        this.finish();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    // The connection is not reusable after a body error.
                    this.checkin = None;
                    this.finish();
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Incoming(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(i) => i.size_hint(),
        }
    }
}

impl Drop for OutboundBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the HTTP/1.1 connection mid-response: do not
        // reuse it. The request is still recorded.
        self.checkin = None;
        if let Some(r) = self.record.take() {
            r.finish(self.response_bytes);
        }
        if let Some(a) = self.access.take() {
            a.emit(self.response_bytes);
        }
    }
}
