//! The stream idle timer of a route's `idle_timeout`, as Envoy's connection manager runs it:
//! started when the route is chosen, reset by every piece of the request body read from the
//! application and every piece of the response (headers, body) handed back to it, never by
//! upstream attempts or retries themselves.
//!
//! When it fires before the response headers, the answer is Envoy's local reply: 504
//! `stream timeout`, or 408 while the request body was still arriving, flag `SI`, details
//! `stream_idle_timeout`. After the headers, the response body ends with
//! [`StreamIdleTimeout`] (Envoy resets the stream) and the request is logged with `SI`.
//!
//! Resetting is one atomic store; the timer wakes at the last known deadline and sleeps again
//! when activity moved it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::pool::{BoxError, ReqBody};

/// Envoy's local reply body when the stream idle timeout fires.
pub const STREAM_TIMEOUT: &str = "stream timeout";

/// The response body ended because the route's stream idle timeout fired while it streamed
/// (Envoy resets the stream; its access log shows flag `SI`).
#[derive(Debug, thiserror::Error)]
#[error("stream timeout")]
pub struct StreamIdleTimeout;

/// One stream's idle timer; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct StreamIdle(Arc<State>);

#[derive(Debug)]
struct State {
    timeout: Duration,
    origin: Instant,
    /// Nanoseconds from `origin` to the last activity.
    last: AtomicU64,
    /// The application's request body has ended (Envoy's `remote_decode_complete`).
    request_complete: AtomicBool,
}

impl StreamIdle {
    /// A timer of `timeout`, starting now.
    pub(crate) fn new(timeout: Duration) -> Self {
        StreamIdle(Arc::new(State {
            timeout,
            origin: Instant::now(),
            last: AtomicU64::new(0),
            request_complete: AtomicBool::new(false),
        }))
    }

    /// Activity on the stream: the timer starts over.
    pub(crate) fn touch(&self) {
        let since = Instant::now().saturating_duration_since(self.0.origin);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.0.last.fetch_max(nanos, Ordering::AcqRel);
    }

    /// When the timer fires unless there is activity before.
    fn deadline(&self) -> Instant {
        self.0.origin + Duration::from_nanos(self.0.last.load(Ordering::Acquire)) + self.0.timeout
    }

    /// Completes when the stream has been idle for the timeout.
    pub(crate) async fn expired(&self) {
        loop {
            let d = self.deadline();
            if Instant::now() >= d {
                return;
            }
            tokio::time::sleep_until(d).await;
        }
    }

    /// The local reply's status: 504, or 408 while the request body was still arriving
    /// (Envoy 1.40, observed).
    pub(crate) fn status(&self) -> u16 {
        if self.0.request_complete.load(Ordering::Acquire) {
            504
        } else {
            408
        }
    }

    fn request_ended(&self) {
        self.0.request_complete.store(true, Ordering::Release);
        self.touch();
    }

    /// The application's request body, resetting the timer as it is read.
    pub(crate) fn watch_request(&self, body: ReqBody) -> ReqBody {
        if body.is_end_stream() {
            self.request_ended();
            return body;
        }
        http_body_util::BodyExt::boxed_unsync(RequestBody {
            inner: body,
            idle: self.clone(),
        })
    }

    /// A watcher for the response body.
    pub(crate) fn response_watch(self) -> ResponseWatch {
        let sleep = Box::pin(tokio::time::sleep_until(self.deadline()));
        ResponseWatch { idle: self, sleep }
    }
}

/// How a [`Bounded`] future ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended<T> {
    /// The future completed first.
    Done(T),
    /// The deadline passed first.
    Deadline,
    /// The stream went idle first.
    Idle,
}

/// `inner` raced against an optional deadline and an optional stream idle timer (checked in
/// that order, after `inner`, at every poll), in one future that holds `inner` once. The
/// `async` form (`match deadline { None => f.await, Some(d) => timeout_at(d, f).await }`)
/// keeps the argument and the awaited copy side by side, so each such layer doubled the
/// request future, which is moved (memcpy'd) several times per request.
#[pin_project::pin_project]
pub(crate) struct Bounded<'a, F> {
    #[pin]
    inner: F,
    /// Polled with an unconstrained budget, as `tokio::time::Timeout` polls its delay, so a
    /// busy `inner` cannot keep the deadline from firing.
    deadline: Option<Pin<Box<tokio::task::Unconstrained<Sleep>>>>,
    idle: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
}

/// Runs `inner` until `deadline` (if any) or until the stream `idle` timer (if any) fires.
pub(crate) fn bounded<'a, F: Future>(
    inner: F,
    deadline: Option<Instant>,
    idle: Option<&'a StreamIdle>,
) -> Bounded<'a, F> {
    Bounded {
        inner,
        deadline: deadline
            .map(|d| Box::pin(tokio::task::unconstrained(tokio::time::sleep_until(d)))),
        idle: idle.map(|i| Box::pin(i.expired()) as Pin<Box<dyn Future<Output = ()> + Send>>),
    }
}

impl<F: Future> Future for Bounded<'_, F> {
    type Output = Ended<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ended::Done(out));
        }
        if let Some(d) = this.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ended::Deadline);
        }
        if let Some(i) = this.idle
            && i.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ended::Idle);
        }
        Poll::Pending
    }
}

struct RequestBody {
    inner: ReqBody,
    idle: StreamIdle,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let out = Pin::new(&mut self.inner).poll_frame(cx);
        match &out {
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.idle.request_ended(),
            Poll::Ready(Some(Ok(_))) => self.idle.touch(),
            Poll::Ready(None) => self.idle.request_ended(),
            _ => {}
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The idle timer as the response body sees it.
pub(crate) struct ResponseWatch {
    idle: StreamIdle,
    sleep: Pin<Box<Sleep>>,
}

impl ResponseWatch {
    /// A frame went to the application.
    pub(crate) fn touch(&self) {
        self.idle.touch();
    }

    /// Ready when the stream has been idle for the timeout; registers a wake-up otherwise.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let d = self.idle.deadline();
            if Instant::now() >= d {
                return Poll::Ready(());
            }
            if self.sleep.deadline() != d {
                self.sleep.as_mut().reset(d);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn activity_pushes_the_deadline_and_the_status_follows_the_request() {
        let idle = StreamIdle::new(Duration::from_millis(100));
        assert_eq!(idle.status(), 408);
        tokio::time::sleep(Duration::from_millis(60)).await;
        idle.touch();
        let touched = Instant::now();
        idle.expired().await;
        // A timer never fires early: the whole timeout passed since the last activity.
        assert!(touched.elapsed() >= Duration::from_millis(100));
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|e| match e {})
            .boxed_unsync();
        let _ = idle.watch_request(body);
        assert_eq!(idle.status(), 504);
    }

    #[tokio::test]
    async fn bounded_gives_up_on_a_stalled_future() {
        let idle = StreamIdle::new(Duration::from_millis(50));
        assert_eq!(
            bounded(async { 7 }, None, Some(&idle)).await,
            Ended::Done(7)
        );
        let stalled = bounded(std::future::pending::<()>(), None, Some(&idle)).await;
        assert_eq!(stalled, Ended::Idle);
        assert_eq!(bounded(async { 1 }, None, None).await, Ended::Done(1));
        let soon = Instant::now() + Duration::from_millis(10);
        let late = bounded(std::future::pending::<()>(), Some(soon), None).await;
        assert_eq!(late, Ended::Deadline);
        let past = Instant::now();
        assert_eq!(bounded(async { 2 }, Some(past), None).await, Ended::Done(2));
    }
}
