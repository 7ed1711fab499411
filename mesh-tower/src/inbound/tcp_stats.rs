//! Istio's TCP metrics on the inbound side (`reporter="destination"`), for ports istiod
//! renders as TCP proxy chains ([`InboundProtocol::Tcp`](mesh_core::listener::InboundProtocol)).
//!
//! On such a port the sidecar's stats filter counts the connection, not requests:
//! `istio_tcp_connections_opened_total` once the connection is up,
//! `istio_tcp_received_bytes_total` / `istio_tcp_sent_bytes_total` as deltas every
//! [`TCP_REPORTING_DURATION`] and at close, and `istio_tcp_connections_closed_total` at close.
//! Bytes are those the proxy sees after TLS termination: what the client's application wrote
//! and read.
//!
//! The four handles are registered once per connection; the stream wrapper only adds to two
//! atomics per read or write.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::telemetry::{
    TCP_CONNECTIONS_CLOSED_TOTAL, TCP_CONNECTIONS_OPENED_TOTAL, TCP_RECEIVED_BYTES_TOTAL,
    TCP_REPORTING_DURATION, TCP_SENT_BYTES_TOTAL,
};
use metrics::{Counter, Label};
use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes that crossed one connection so far.
#[derive(Debug, Default)]
struct ByteCounts {
    received: AtomicU64,
    sent: AtomicU64,
}

/// One TCP-port connection's metrics: opened when created, byte deltas reported by
/// [`report_while`](Self::report_while) and at drop, closed at drop.
#[derive(Debug)]
pub(crate) struct TcpConnection {
    closed: Counter,
    sent: Counter,
    received: Counter,
    counts: Arc<ByteCounts>,
    reported_sent: u64,
    reported_received: u64,
}

impl TcpConnection {
    /// Registers the connection's handles with `labels` (Istio's TCP label set, see
    /// [`mesh_core::telemetry::tcp_labels`]) and counts it opened.
    pub(crate) fn open(labels: &[Label]) -> Self {
        metrics::counter!(TCP_CONNECTIONS_OPENED_TOTAL, labels.iter()).increment(1);
        TcpConnection {
            closed: metrics::counter!(TCP_CONNECTIONS_CLOSED_TOTAL, labels.iter()),
            sent: metrics::counter!(TCP_SENT_BYTES_TOTAL, labels.iter()),
            received: metrics::counter!(TCP_RECEIVED_BYTES_TOTAL, labels.iter()),
            counts: Arc::default(),
            reported_sent: 0,
            reported_received: 0,
        }
    }

    /// Wraps the (post-TLS) stream so its bytes are counted for this connection.
    pub(crate) fn wrap<T>(&self, inner: T) -> CountingStream<T> {
        CountingStream {
            inner,
            counts: Arc::clone(&self.counts),
        }
    }

    /// Adds the bytes since the last report to the counters.
    pub(crate) fn report(&mut self) {
        let received = self.counts.received.load(Ordering::Relaxed);
        let sent = self.counts.sent.load(Ordering::Relaxed);
        self.received
            .increment(received.saturating_sub(self.reported_received));
        self.sent.increment(sent.saturating_sub(self.reported_sent));
        self.reported_received = received;
        self.reported_sent = sent;
    }

    /// Runs `serving` (the connection), reporting byte deltas every
    /// [`TCP_REPORTING_DURATION`]; the connection is reported closed when `serving` ends (or
    /// this future is dropped).
    pub(crate) async fn report_while<F: Future>(self, serving: F) -> F::Output {
        self.report_every(TCP_REPORTING_DURATION, serving).await
    }

    async fn report_every<F: Future>(mut self, period: Duration, serving: F) -> F::Output {
        tokio::pin!(serving);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                output = serving.as_mut() => return output,
                _ = tick.tick() => self.report(),
            }
        }
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        self.report();
        self.closed.increment(1);
    }
}

/// A stream that counts the bytes read from it (received from the peer) and written to it
/// (sent to the peer).
#[pin_project]
#[derive(Debug)]
pub(crate) struct CountingStream<T> {
    #[pin]
    inner: T,
    counts: Arc<ByteCounts>,
}

impl<T: AsyncRead> AsyncRead for CountingStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.counts
                .received
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.counts.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            this.counts.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_bytes_both_ways_and_reports_them_once() {
        let conn = TcpConnection::open(&[Label::new("reporter", "destination")]);
        let (client, server) = tokio::io::duplex(64);
        let mut server = conn.wrap(server);
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"hi!").await.unwrap();
        let mut back = [0u8; 3];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(conn.counts.received.load(Ordering::Relaxed), 5);
        assert_eq!(conn.counts.sent.load(Ordering::Relaxed), 3);
        let mut conn = conn;
        conn.report();
        assert_eq!((conn.reported_received, conn.reported_sent), (5, 3));
        // A second report adds nothing new.
        conn.report();
        assert_eq!((conn.reported_received, conn.reported_sent), (5, 3));
    }

    fn line(rendered: &str, family: &str, id: &str) -> Option<String> {
        rendered
            .lines()
            .find(|l| l.starts_with(&format!("{family}{{")) && l.contains(id))
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn open_connections_report_bytes_periodically_and_at_close() {
        let handle = crate::telemetry::prometheus_handle().expect("mesh's recorder");
        let id = "tcp-stats-periodic-test";
        let conn = TcpConnection::open(&[Label::new("destination_workload", id)]);
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = conn.wrap(server);
        let rendered = handle.clone();
        let serving = async move {
            client.write_all(b"0123456789").await.unwrap();
            let mut buf = [0u8; 10];
            server.read_exact(&mut buf).await.unwrap();
            // A periodic report while the connection is still open.
            let received = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let text = rendered.render();
                    if let Some(l) = line(&text, TCP_RECEIVED_BYTES_TOTAL, id)
                        && !l.ends_with(" 0")
                    {
                        return l;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .ok();
            let closed = line(&rendered.render(), TCP_CONNECTIONS_CLOSED_TOTAL, id);
            server.write_all(b"abc").await.unwrap();
            client.read_exact(&mut buf[..3]).await.unwrap();
            (received, closed)
        };
        let (received, closed) = conn.report_every(Duration::from_millis(20), serving).await;
        assert!(received.is_some_and(|l| l.ends_with(" 10")));
        assert!(closed.is_none_or(|l| l.ends_with(" 0")));
        let text = handle.render();
        let value =
            |family| line(&text, family, id).map(|l| l.rsplit(' ').next().map(str::to_owned));
        assert_eq!(value(TCP_CONNECTIONS_OPENED_TOTAL), Some(Some("1".into())));
        assert_eq!(value(TCP_CONNECTIONS_CLOSED_TOTAL), Some(Some("1".into())));
        assert_eq!(value(TCP_RECEIVED_BYTES_TOTAL), Some(Some("10".into())));
        assert_eq!(value(TCP_SENT_BYTES_TOTAL), Some(Some("3".into())));
    }
}
