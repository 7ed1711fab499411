//! The inbound connection idle timeout: Envoy's HTTP connection manager closes a downstream
//! connection that has had no active request for `common_http_protocol_options.idle_timeout`
//! (1 hour unless configured; HTTP/2 connections are drained with GOAWAY first). A meshed
//! server must not close idle keep-alive connections much sooner: an Envoy sidecar calling it
//! keeps pooled connections for istiod's 1 hour upstream idle timeout, and a close racing a
//! request on such a connection is answered `503 UC`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Envoy's default downstream idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// One connection's requests: how many started or ended, how many are still active (until
/// the response body ends or the request is abandoned).
#[derive(Debug, Default)]
pub(crate) struct ConnectionActivity {
    events: AtomicU64,
    active: AtomicUsize,
}

impl ConnectionActivity {
    /// Counts a request as active until the returned guard drops.
    pub(crate) fn request_started(self: &Arc<Self>) -> ActiveRequest {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(Arc::clone(self))
    }

    /// Resolves once the connection has had no active request for a whole `timeout`: checked
    /// every `timeout`, so the connection closes between one and two timeouts after its last
    /// request started or ended. Never resolves without a timeout.
    pub(crate) async fn idle_for(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        let mut seen = self.events.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(timeout).await;
            let events = self.events.load(Ordering::Relaxed);
            if events == seen && self.active.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = events;
        }
    }
}

/// A request counted as active on its connection.
#[derive(Debug)]
pub(crate) struct ActiveRequest(Arc<ConnectionActivity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_a_whole_timeout_without_requests() {
        let activity = Arc::new(ConnectionActivity::default());
        let timeout = Some(Duration::from_secs(10));
        let start = tokio::time::Instant::now();
        activity.idle_for(timeout).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        // An active request keeps it open while it lasts, and its end counts as activity:
        // the request ends at 35 s, the check at 40 s sees that, the one at 50 s closes.
        let start = tokio::time::Instant::now();
        let request = activity.request_started();
        let idle = tokio::spawn({
            let activity = Arc::clone(&activity);
            async move { activity.idle_for(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(
            !idle.is_finished(),
            "an active request keeps the connection"
        );
        drop(request);
        idle.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(50));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_connection_is_never_idle() {
        let activity = ConnectionActivity::default();
        let never = tokio::time::timeout(Duration::from_secs(86_400), activity.idle_for(None));
        assert!(never.await.is_err());
    }
}
