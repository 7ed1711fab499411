//! The client's request queue: at most one pending request per xDS type.
//!
//! A flood of responses produces a flood of ACKs and subscription changes. Rather than queue
//! them without bound, a request for a type that already has one waiting is merged into it:
//! the newest nonce, version and error detail win (the server only acts on the latest nonce
//! of a type), delta subscribe/unsubscribe lists are combined in order, and the node stays on
//! the stream's first request. Types leave in the order they first became pending, so the
//! initial CDS → EDS → LDS → RDS order is kept.
//!
//! A NACK is never merged away by a later ACK: istiod counts and logs a rejection only when
//! the NACK reaches it, so a pending NACK keeps its place and the ACK queues behind it. A type
//! therefore holds at most two pending requests: one NACK (later NACKs fold into it, their
//! error messages joined) and one other request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::Stream;
use tokio::sync::Notify;

/// What the pending-request queue has held: a handle for metrics and tests, shared by every
/// stream of one [`AdsClient`](super::AdsClient).
#[derive(Debug, Clone, Default)]
pub struct RequestQueueStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    pending: AtomicUsize,
    high_water: AtomicUsize,
    merged: AtomicUsize,
}

impl RequestQueueStats {
    /// Requests waiting to be written now.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// The most requests ever waiting at once (bounded by the number of xDS types).
    pub fn high_water(&self) -> usize {
        self.inner.high_water.load(Ordering::Relaxed)
    }

    /// Requests folded into one already waiting for the same type.
    pub fn merged(&self) -> usize {
        self.inner.merged.load(Ordering::Relaxed)
    }

    fn set_pending(&self, n: usize) {
        self.inner.pending.store(n, Ordering::Relaxed);
        self.inner.high_water.fetch_max(n, Ordering::Relaxed);
        metrics::gauge!("mesh_xds_pending_requests").set(n as f64);
    }
}

/// A request that can be folded into an earlier one of the same type.
pub(crate) trait Mergeable: Sized {
    fn type_url(&self) -> &str;
    /// Folds `newer` into `self`; `first` says `self` is the type's first request on the
    /// stream (its subscription semantics differ).
    fn merge(&mut self, newer: Self, first: bool);
    /// The `error_detail`, when this request is a NACK.
    fn error(&self) -> Option<&RpcStatus>;
    fn error_mut(&mut self) -> &mut Option<RpcStatus>;
    /// Whether this is an ACK (a nonce and no error): it would erase a pending NACK.
    fn is_ack(&self) -> bool;
}

/// The longest joined NACK message kept (a flood of bad pushes must not grow it unbounded).
const MAX_NACK_MESSAGE: usize = 16 * 1024;

/// Folds `newer` into `older` keeping every rejection: when both are NACKs their messages
/// are joined, older first, the oldest lines dropped beyond [`MAX_NACK_MESSAGE`] (the newest
/// rejection is always named).
fn merge_keeping_errors<T: Mergeable>(older: &mut T, newer: T, first: bool) {
    let previous = older.error().map(|e| e.message.clone());
    older.merge(newer, first);
    let (Some(prev), Some(now)) = (previous, older.error_mut().as_mut()) else {
        return;
    };
    if prev.is_empty() || prev == now.message {
        return;
    }
    let room = MAX_NACK_MESSAGE.saturating_sub(now.message.len() + 1);
    let keep = if prev.len() > room {
        // Drop whole lines from the front: cut just after a newline.
        let start = prev.len() - room;
        match prev.as_bytes()[start..].iter().position(|b| *b == b'\n') {
            Some(i) => &prev[start + i + 1..],
            None => "",
        }
    } else {
        prev.as_str()
    };
    if !keep.is_empty() {
        now.message = format!("{keep}\n{}", now.message);
    }
}

impl Mergeable for DeltaDiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }

    fn merge(&mut self, newer: Self, first: bool) {
        if self.node.is_none() {
            self.node = newer.node;
        }
        if self.initial_resource_versions.is_empty() {
            self.initial_resource_versions = newer.initial_resource_versions;
        }
        for n in newer.resource_names_subscribe {
            self.resource_names_unsubscribe.retain(|u| *u != n);
            if !self.resource_names_subscribe.contains(&n) {
                self.resource_names_subscribe.push(n);
            }
        }
        for n in newer.resource_names_unsubscribe {
            // A first request's names define a non-wildcard subscription: keep them and let
            // the unsubscribe (applied after them) take the name away again.
            if !first {
                self.resource_names_subscribe.retain(|s| *s != n);
            }
            if !self.resource_names_unsubscribe.contains(&n) {
                self.resource_names_unsubscribe.push(n);
            }
        }
        if !newer.response_nonce.is_empty() || newer.error_detail.is_some() {
            self.response_nonce = newer.response_nonce;
            self.error_detail = newer.error_detail;
        }
    }

    fn error(&self) -> Option<&RpcStatus> {
        self.error_detail.as_ref()
    }

    fn error_mut(&mut self) -> &mut Option<RpcStatus> {
        &mut self.error_detail
    }

    fn is_ack(&self) -> bool {
        !self.response_nonce.is_empty() && self.error_detail.is_none()
    }
}

impl Mergeable for DiscoveryRequest {
    fn type_url(&self) -> &str {
        &self.type_url
    }

    fn merge(&mut self, newer: Self, _first: bool) {
        // SotW requests carry the whole state: the newer one replaces the older, except
        // that the node must still travel on the stream's first request.
        let node = self.node.take();
        let (nonce, error) = (
            std::mem::take(&mut self.response_nonce),
            self.error_detail.take(),
        );
        *self = newer;
        if self.node.is_none() {
            self.node = node;
        }
        // A request that answers no response keeps the pending ACK/NACK's nonce and error.
        if self.response_nonce.is_empty() && self.error_detail.is_none() {
            self.response_nonce = nonce;
            self.error_detail = error;
        }
    }

    fn error(&self) -> Option<&RpcStatus> {
        self.error_detail.as_ref()
    }

    fn error_mut(&mut self) -> &mut Option<RpcStatus> {
        &mut self.error_detail
    }

    fn is_ack(&self) -> bool {
        !self.response_nonce.is_empty() && self.error_detail.is_none()
    }
}

struct Pending<T> {
    request: T,
    first: bool,
}

struct State<T> {
    queue: VecDeque<Pending<T>>,
    /// Types whose first request has been queued on this stream.
    started: Vec<String>,
    held: bool,
    closed: bool,
}

/// The per-stream queue; cloneable, one writer (the gRPC request stream) and any number of
/// producers.
pub(crate) struct Outbox<T> {
    state: Arc<(Mutex<State<T>>, Notify)>,
    stats: RequestQueueStats,
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Outbox {
            state: self.state.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<T: Mergeable + Send + 'static> Outbox<T> {
    pub fn new(stats: RequestQueueStats) -> Self {
        stats.set_pending(0);
        Outbox {
            state: Arc::new((
                Mutex::new(State {
                    queue: VecDeque::new(),
                    started: Vec::new(),
                    held: false,
                    closed: false,
                }),
                Notify::new(),
            )),
            stats,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request`, merging it into the pending one of its type if there is one.
    pub fn push(&self, request: T) {
        let mut st = self.lock();
        let first = !st.started.iter().any(|t| t == request.type_url());
        if first {
            st.started.push(request.type_url().to_owned());
        }
        let mine: Vec<usize> = st
            .queue
            .iter()
            .enumerate()
            .filter(|(_, p)| p.request.type_url() == request.type_url())
            .map(|(i, _)| i)
            .collect();
        match mine.as_slice() {
            [] => st.queue.push_back(Pending { request, first }),
            // An ACK would erase the pending NACK: it queues behind it instead.
            [i] if st.queue[*i].request.error().is_some() && request.is_ack() => {
                st.queue.push_back(Pending {
                    request,
                    first: false,
                });
            }
            [i] => {
                let p = &mut st.queue[*i];
                let was_first = p.first;
                merge_keeping_errors(&mut p.request, request, was_first);
                self.stats.inner.merged.fetch_add(1, Ordering::Relaxed);
            }
            [nack, later, ..] => {
                let (nack, later) = (*nack, *later);
                if st.queue[later].request.error().is_some() && request.is_ack() {
                    // Two NACKs pending and an ACK: fold the later NACK into the first one
                    // (messages joined, newest nonce) and let the ACK take its place.
                    let Some(Pending {
                        request: second, ..
                    }) = st.queue.remove(later)
                    else {
                        return;
                    };
                    let first_nack = &mut st.queue[nack];
                    let was_first = first_nack.first;
                    merge_keeping_errors(&mut first_nack.request, second, was_first);
                    st.queue.push_back(Pending {
                        request,
                        first: false,
                    });
                } else {
                    let p = &mut st.queue[later];
                    let was_first = p.first;
                    merge_keeping_errors(&mut p.request, request, was_first);
                }
                self.stats.inner.merged.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.set_pending(st.queue.len());
        let held = st.held;
        drop(st);
        if !held {
            self.state.1.notify_one();
        }
    }

    /// Holds writes until [`Outbox::release`]: the requests of a batch of responses leave
    /// together, after the batch's snapshot is published.
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Lets held requests go.
    pub fn release(&self) {
        self.lock().held = false;
        self.state.1.notify_one();
    }

    /// Ends the request stream.
    pub fn close(&self) {
        self.lock().closed = true;
        self.state.1.notify_one();
    }

    fn pop(&self) -> Result<Option<T>, ()> {
        let mut st = self.lock();
        if st.closed {
            return Err(());
        }
        if st.held {
            return Ok(None);
        }
        let r = st.queue.pop_front().map(|p| p.request);
        self.stats.set_pending(st.queue.len());
        Ok(r)
    }

    /// The request stream handed to tonic.
    pub fn stream(&self) -> impl Stream<Item = T> + Send + 'static {
        futures_util::stream::unfold(self.clone(), |ob| async move {
            loop {
                match ob.pop() {
                    Err(()) => return None,
                    Ok(Some(r)) => return Some((r, ob)),
                    Ok(None) => ob.state.1.notified().await,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn delta(t: &str, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: t.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn one_pending_request_per_type_latest_nonce_wins() {
        let stats = RequestQueueStats::default();
        let ob = Outbox::new(stats.clone());
        ob.push(delta("cds", &[], &[], ""));
        ob.push(delta("eds", &["a"], &[], ""));
        for i in 0..10_000 {
            ob.push(delta("eds", &[], &[], &format!("n{i}")));
            ob.push(delta("cds", &[], &[], &format!("c{i}")));
        }
        assert_eq!(stats.high_water(), 2);
        let first = ob.pop().unwrap().unwrap();
        assert_eq!(first.type_url, "cds");
        assert_eq!(first.response_nonce, "c9999");
        let second = ob.pop().unwrap().unwrap();
        assert_eq!(second.resource_names_subscribe, vec!["a".to_string()]);
        assert_eq!(second.response_nonce, "n9999");
        assert!(ob.pop().unwrap().is_none());
        assert_eq!(stats.pending(), 0);
    }

    #[test]
    fn delta_subscriptions_merge_in_order() {
        let ob = Outbox::new(RequestQueueStats::default());
        ob.push(delta("eds", &["a"], &[], ""));
        let _ = ob.pop();
        // Not a first request: unsubscribe cancels a pending subscribe, and vice versa.
        ob.push(delta("eds", &["b"], &[], ""));
        ob.push(delta("eds", &[], &["b", "a"], "n1"));
        ob.push(delta("eds", &["a"], &[], ""));
        let r = ob.pop().unwrap().unwrap();
        assert_eq!(r.resource_names_subscribe, vec!["a".to_string()]);
        assert_eq!(r.resource_names_unsubscribe, vec!["b".to_string()]);
        // An empty nonce does not erase the pending ACK's nonce.
        assert_eq!(r.response_nonce, "n1");
    }

    fn nack(t: &str, nonce: &str, message: &str) -> DeltaDiscoveryRequest {
        let mut r = delta(t, &[], &[], nonce);
        r.error_detail = Some(RpcStatus {
            code: 13,
            message: message.into(),
            details: Vec::new(),
        });
        r
    }

    #[test]
    fn a_nack_then_an_ack_sends_both_in_order() {
        let ob = Outbox::new(RequestQueueStats::default());
        ob.push(nack("cds", "n1", "bad"));
        ob.push(delta("cds", &[], &[], "n2"));
        let r = ob.pop().unwrap().unwrap();
        assert_eq!(r.response_nonce, "n1");
        assert_eq!(r.error_detail.unwrap().message, "bad");
        let r = ob.pop().unwrap().unwrap();
        assert_eq!(r.response_nonce, "n2");
        assert!(r.error_detail.is_none());
        assert!(ob.pop().unwrap().is_none());
    }

    #[test]
    fn nacks_in_a_flood_are_kept_and_bounded_at_two_per_type() {
        let stats = RequestQueueStats::default();
        let ob = Outbox::new(stats.clone());
        for i in 0..10_000 {
            if i % 100 == 50 {
                ob.push(nack(
                    "cds",
                    &format!("n{i}"),
                    &format!("Cluster \"c{i}\": bad"),
                ));
            } else {
                ob.push(delta("cds", &[], &[], &format!("n{i}")));
            }
            // A subscription change without a nonce never erases a NACK either.
            ob.push(delta("cds", &[], &[], ""));
        }
        assert!(stats.high_water() <= 2, "{}", stats.high_water());
        let first = ob.pop().unwrap().unwrap();
        let msg = first
            .error_detail
            .expect("the NACK survived the flood")
            .message;
        // Every rejection of the flood is named (all lines fit the bound here).
        for i in (50..10_000).step_by(100) {
            assert!(msg.contains(&format!("\"c{i}\"")), "c{i} missing");
        }
        let last = ob.pop().unwrap().unwrap();
        assert_eq!(last.response_nonce, "n9999");
        assert!(last.error_detail.is_none());
        assert!(ob.pop().unwrap().is_none());
    }

    #[test]
    fn nack_messages_are_bounded() {
        let ob = Outbox::new(RequestQueueStats::default());
        for i in 0..20_000 {
            ob.push(nack(
                "lds",
                &format!("n{i}"),
                &format!("Listener \"l{i}\": bad"),
            ));
        }
        let r = ob.pop().unwrap().unwrap();
        let msg = r.error_detail.unwrap().message;
        assert!(msg.len() <= MAX_NACK_MESSAGE, "{}", msg.len());
        assert!(
            msg.ends_with("\"l19999\": bad"),
            "the newest rejection is always named"
        );
        assert!(!msg.contains("\"l0\""), "the oldest went first");
        assert!(
            msg.lines().all(|l| l.starts_with("Listener ")),
            "whole lines only"
        );
        assert_eq!(r.response_nonce, "n19999");
    }

    #[test]
    fn held_requests_wait_for_release_and_close_ends_the_stream() {
        let ob = Outbox::new(RequestQueueStats::default());
        ob.hold();
        ob.push(delta("cds", &[], &[], ""));
        assert!(ob.pop().unwrap().is_none());
        ob.release();
        assert!(ob.pop().unwrap().is_some());
        ob.close();
        assert!(ob.pop().is_err());
    }
}
