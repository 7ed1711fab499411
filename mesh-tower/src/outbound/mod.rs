//! Outbound: route → cluster → endpoint → pooled connection, with Istio auto-mTLS.
//!
//! [`Outbound`] is what the application's HTTP client calls instead of going through Envoy's
//! outbound listener. Per request it loads the current [`Snapshot`](mesh_core::Snapshot) once,
//! routes on the authority and port, applies the route's fault injection, rewrites and
//! header mutations, picks an endpoint with the cluster's load balancer
//! ([`mesh_core::lb`]: priorities, panic threshold, round robin / least request / random /
//! ring hash / Maglev), and sends the request over a pooled connection: plaintext, or Istio
//! mTLS (`istio-http/1.1` / `istio-h2` ALPN, SNI `outbound_.<port>_.<subset>_.<fqdn>`) when the
//! endpoint's `tlsMode` is `istio`.
//!
//! Resilience follows Envoy's router: the route timeout bounds all attempts; the retry policy
//! ([`mesh_core::retry`]) retries connect failures, resets, per-try timeouts and retriable
//! responses with jittered back-off, avoiding previous hosts, with the request body kept up
//! to the buffer limit; outlier detection ([`mesh_core::outlier`]) sees every attempt; the
//! circuit breakers `max_requests` (503 `UO`) and `max_retries` (or the `retry_budget`) are
//! enforced per cluster;
//! `request_mirror_policies` send fire-and-forget shadows.
//!
//! Like Envoy, it always answers: failures become Envoy's local replies (same status, body
//! and [`ResponseFlag`] in the response extensions), e.g. `NR` 404, `UH` 503
//! `no healthy upstream`, `UF` 503 `upstream connect error or disconnect/reset before
//! headers. reset reason: connection failure`, `UT` 504 `upstream request timeout`, `URX`
//! when retries ran out on a retriable failure, `FI` for an injected abort.

mod access;
mod body;
mod dns;
mod idle;
mod pool;
mod replay;
mod tcp;
mod telemetry;

/// The request path's internal maps: keys come from configuration (cluster names, endpoint
/// addresses), so a fast hash fits; SipHash costs ~100 instructions per lookup.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use mesh_core::cluster::LbPolicy;
use mesh_core::cluster::{Cluster, ClusterDiscovery, UpstreamProtocol, UpstreamTls};
use mesh_core::endpoint::{EndpointSet, EndpointTlsMode, WorkloadMetadata};
use mesh_core::flags::ResponseFlag;
use mesh_core::headers::FormatContext;
use mesh_core::lb::{ActiveRequest, Balancer, HostState, PickContext};
use mesh_core::outlier::{OutlierDetector, OutlierResult};
use mesh_core::resolve::Resolve;
use mesh_core::retry::{AttemptOutcome, RetryPolicy};
use mesh_core::route::{Forwarding, HostRewrite};
use mesh_core::snapshot::{RouteDecision, Snapshot};
use mesh_core::telemetry::{DestinationService, WorkloadLabels};
use mesh_core::{CertStore, NodeIdentity, SnapshotCell};
use rustls_pki_types::ServerName;
use tokio::sync::watch;

use crate::grpc_reply::{self, GRPC_STATUS, Grpc};
pub use body::OutboundBody;
use body::{CounterGuard, InFlight};
use idle::Ended;
pub use idle::{STREAM_TIMEOUT, StreamIdleTimeout};
pub use pool::BoxError;
pub use tcp::{OutboundTcpStream, TcpConnectError};

use pool::{ConnectError, ConnectParams, HostPool, Proto, ReqBody, SendError, TlsTarget};
use telemetry::{LabelBase, Record};

use crate::inbound::tracing_headers;

/// Envoy's local reply body for `UH`.
pub const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
/// Envoy's local reply body for `UT`.
pub const UPSTREAM_REQUEST_TIMEOUT: &str = "upstream request timeout";
/// Envoy's local reply body prefix for `UF` / `UC` / `UO`.
pub const UPSTREAM_RESET_PREFIX: &str =
    "upstream connect error or disconnect/reset before headers. ";

/// Envoy's local reply body for an upstream reset before the response headers: `reason` (a
/// `StreamResetReason` in its access-log spelling, `_` for spaces), after a retry "retried and
/// the latest reset reason", and the transport failure reason when there is one.
fn upstream_reset_body(retried: bool, reason: &str, transport: Option<&str>) -> Bytes {
    let mut text = String::from(UPSTREAM_RESET_PREFIX);
    if retried {
        text.push_str("retried and the latest ");
    }
    text.push_str("reset reason: ");
    text.push_str(&reason.replace('_', " "));
    if let Some(t) = transport {
        text.push_str(", transport failure reason: ");
        text.push_str(t);
    }
    Bytes::from(text)
}

/// ALPN Envoy's `istio.alpn` filter offers for HTTP/1.1 over Istio mTLS.
const ALPN_ISTIO_HTTP11: &[&[u8]] = &[b"istio-http/1.1", b"istio", b"http/1.1"];
/// ALPN Envoy's `istio.alpn` filter offers for HTTP/2 over Istio mTLS.
const ALPN_ISTIO_H2: &[&[u8]] = &[b"istio-h2", b"istio", b"h2"];

/// A convenience call ([`Outbound::get`], [`Outbound::post`]) failed. Routing failures are
/// not errors: they are Envoy's local replies.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The request could not be built (bad URI).
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
    /// The response body failed while being read.
    #[error("reading the response body: {0}")]
    Body(#[source] BoxError),
}

/// The outbound request path as a Tower service. Cheap to clone; clones share pools.
#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
    resolver: Option<Arc<dyn Resolve>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("clusters", &self.inner.clusters.load().len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    cell: SnapshotCell,
    certs: CertStore,
    cert_version: watch::Receiver<u64>,
    source: Arc<WorkloadLabels>,
    clusters: ArcSwap<HashMap<String, Arc<ClusterState>>>,
    clusters_write: Mutex<()>,
    /// Labels of local replies given before an upstream host was chosen.
    no_host: Arc<LabelBase>,
    /// Peer metadata headers for Istio peers, encoded once.
    peer_headers: Option<telemetry::PeerHeaders>,
    /// The pod's IP (`%DOWNSTREAM_REMOTE_ADDRESS%`).
    instance_ip: IpAddr,
    /// This workload's TCP metadata exchange frame.
    exchange_frame: Vec<u8>,
}

/// Per-cluster state that outlives snapshots while the cluster is unchanged: host pools and
/// the cached TLS configurations.
struct ClusterState {
    cluster: Arc<Cluster>,
    service: Option<DestinationService>,
    hosts: ArcSwap<HashMap<(SocketAddr, bool), Arc<HostPool>>>,
    hosts_write: Mutex<()>,
    tls: Mutex<Vec<TlsCacheEntry>>,
    /// Live per-host state by address (active requests, ejection), carried over when the
    /// cluster's configuration changes.
    host_states: Arc<Mutex<HashMap<SocketAddr, Arc<HostState>>>>,
    /// Ejected hosts of the cluster.
    ejected: Arc<AtomicUsize>,
    /// The balancer over the current endpoint set.
    balancer: ArcSwapOption<BalancerEntry>,
    /// A DNS cluster's resolved hosts (started on first use).
    dns: std::sync::OnceLock<Arc<dns::DnsHosts>>,
    balancer_write: Mutex<()>,
    outlier: Option<OutlierDetector>,
    /// Requests in flight (circuit breaker `max_requests`).
    rq_active: Arc<AtomicU32>,
    /// Retries in flight (circuit breaker `max_retries`).
    rq_retry_active: Arc<AtomicU32>,
    /// Connections and pending requests (circuit breakers `max_connections`,
    /// `max_pending_requests`).
    conn_limits: Arc<pool::ConnLimits>,
    /// The `Host` header value made for the first request without one (HTTP/1.1 upstreams):
    /// callers of a cluster name it the same way, so later requests with that authority clone
    /// it (a reference count) instead of copying the authority into a new header value.
    host_header: std::sync::OnceLock<(Box<str>, HeaderValue)>,
}

/// A cluster's outlier detection state ([`Outbound::outlier_detection`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetectionState {
    /// The detector's counts (Envoy's `outlier_detection.ejections_*` counters).
    pub counts: mesh_core::outlier::OutlierCounts,
    /// The ejected hosts (`ejections_active` is their number).
    pub ejected: Vec<SocketAddr>,
}

/// A host picked by [`Inner::pick_host`].
struct PickedHost {
    /// Its index in the endpoint set.
    index: usize,
    /// Its active-request count while held (least request only).
    active: Option<ActiveRequest>,
    /// With outlier detection, the host to report results on.
    live: Option<LiveHost>,
}

/// A picked host of a cluster with outlier detection ([`ClusterState::report_outlier`]).
struct LiveHost {
    entry: Arc<BalancerEntry>,
    host: Arc<HostState>,
}

impl ClusterState {
    /// Reports how a request (or a TCP connect) to `live` ended to the cluster's outlier
    /// detector. Its detections and ejections reach the cluster's stats through the
    /// detector's counters (`ClusterLive::outlier`).
    fn report_outlier(&self, live: &LiveHost, result: OutlierResult) {
        if let Some(d) = &self.outlier {
            d.report(&live.host, live.entry.lb.hosts(), result, &mut rand::rng());
        }
    }
}

/// A balancer and the endpoint set it was built from.
struct BalancerEntry {
    set: Arc<EndpointSet>,
    lb: Balancer,
}

struct TlsCacheEntry {
    istio: bool,
    proto: Proto,
    cert_version: u64,
    target: Arc<TlsTarget>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Outbound {
    /// The outbound path over the snapshots published in `cell`, presenting the workload
    /// certificate from `certs`, reporting metrics as `node`.
    pub fn new(cell: SnapshotCell, certs: CertStore, node: NodeIdentity) -> Self {
        let source = Arc::new(WorkloadLabels::from_node(&node));
        let cert_version = certs.subscribe();
        Outbound {
            inner: Arc::new(Inner {
                cell,
                certs,
                cert_version,
                no_host: Arc::new(LabelBase::new(
                    source.clone(),
                    WorkloadLabels::default(),
                    None,
                )),
                peer_headers: telemetry::PeerHeaders::for_node(&node),
                instance_ip: node.instance_ip,
                exchange_frame: mesh_core::metadata_exchange::frame_for_node(&node),
                source,
                clusters: ArcSwap::from_pointee(HashMap::default()),
                clusters_write: Mutex::new(()),
            }),
            resolver: None,
        }
    }

    /// Resolves hosts of `PassthroughCluster` requests and of `STRICT_DNS` / `LOGICAL_DNS`
    /// clusters with `resolver` (e.g. mesh-dns) instead of the system resolver.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Starts resolving the hosts of every `STRICT_DNS` / `LOGICAL_DNS` cluster of each
    /// snapshot published to the cell as it arrives (as Envoy does when a cluster is added),
    /// rather than on the cluster's first request, and stops resolving clusters the snapshot
    /// no longer has. The task ends when this `Outbound` and its clones are gone and the cell
    /// is dropped; abort the handle to stop it earlier. Must be called inside a Tokio runtime.
    pub fn spawn_dns_refresh(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let resolver = self.resolver.clone();
        let mut changes = self.inner.cell.subscribe();
        tokio::spawn(async move {
            loop {
                {
                    let Some(inner) = weak.upgrade() else { return };
                    let this = Outbound {
                        inner,
                        resolver: resolver.clone(),
                    };
                    this.start_dns_clusters();
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Starts the resolution of the current snapshot's DNS clusters; forgets the state of
    /// clusters it no longer has.
    fn start_dns_clusters(&self) {
        let snapshot = self.inner.cell.load();
        {
            let _w = lock(&self.inner.clusters_write);
            let current = self.inner.clusters.load();
            if current
                .keys()
                .any(|name| !snapshot.clusters.contains_key(name.as_str()))
            {
                self.inner
                    .clusters
                    .store(Arc::new(states_in_snapshot(&current, &snapshot)));
            }
        }
        for cluster in snapshot.clusters.values().filter(|c| c.dns().is_some()) {
            let state = self.inner.cluster_state(cluster);
            self.dns_hosts(&state);
        }
    }

    /// The resolved hosts of a DNS cluster (resolution started on first use).
    fn dns_hosts<'s>(&self, state: &'s ClusterState) -> Option<&'s Arc<dns::DnsHosts>> {
        let d = state.cluster.dns()?;
        Some(state.dns.get_or_init(|| {
            let resolver = self
                .resolver
                .clone()
                .unwrap_or_else(|| Arc::new(dns::SystemResolver));
            dns::DnsHosts::start(&state.cluster, d, resolver)
        }))
    }

    /// Cluster `cluster`'s outlier detection as Envoy's admin shows it: the detector's
    /// `outlier_detection.*` counts since the cluster's current configuration arrived, and the
    /// hosts ejected now (as of the last sweep: returns happen on the next pick or result).
    /// `None` when the cluster has no outlier detection or has served no request yet.
    pub fn outlier_detection(&self, cluster: &str) -> Option<OutlierDetectionState> {
        let clusters = self.inner.clusters.load();
        let state = clusters.get(cluster)?;
        let detector = state.outlier.as_ref()?;
        let mut ejected: Vec<SocketAddr> = lock(&state.host_states)
            .values()
            .filter(|h| h.is_ejected())
            .map(|h| h.address)
            .collect();
        ejected.sort();
        Some(OutlierDetectionState {
            counts: detector.stats().counts(),
            ejected,
        })
    }

    /// `GET uri`, with the whole response body collected.
    pub async fn get(&self, uri: impl AsRef<str>) -> Result<Response<Bytes>, OutboundError> {
        let req = Request::get(uri.as_ref()).body(http_body_util::Empty::<Bytes>::new())?;
        collect(self.request(req).await).await
    }

    /// `POST uri` with `body`, with the whole response body collected.
    pub async fn post(
        &self,
        uri: impl AsRef<str>,
        body: Bytes,
    ) -> Result<Response<Bytes>, OutboundError> {
        let req = Request::post(uri.as_ref()).body(http_body_util::Full::new(body))?;
        collect(self.request(req).await).await
    }

    /// Sends one request and returns the upstream's response or Envoy's local reply.
    pub async fn request<B>(&self, req: Request<B>) -> Response<OutboundBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        let body: ReqBody = body.map_err(Into::into).boxed_unsync();
        // x-request-id and the trace context as Envoy's outbound HCM leaves them upstream.
        let trace = tracing_headers::on_request(&mut parts.headers);
        let mut access = crate::inbound::access_log::enabled().then(|| {
            Box::new(access::Pending::new(
                &parts,
                &http_body::Body::size_hint(&body),
            ))
        });
        let info = access.as_mut().map(|a| &mut a.upstream);
        let span = tracing_headers::outbound_span();
        let mut resp = if span.is_disabled() {
            self.handle(parts, body, info).await
        } else {
            let head = (&parts.method, &parts.uri, parts.version, &parts.headers);
            tracing_headers::record_request(&span, trace.as_ref(), head);
            let resp =
                tracing::Instrument::instrument(self.handle(parts, body, info), span.clone()).await;
            tracing_headers::record_outbound_response(&span, &resp);
            resp
        };
        if let Some(mut a) = access {
            a.response(&resp);
            resp.body_mut().set_access(a);
        }
        resp
    }

    async fn handle(
        &self,
        parts: http::request::Parts,
        body: ReqBody,
        mut info: Option<&mut access::UpstreamInfo>,
    ) -> Response<OutboundBody> {
        let start = Instant::now();
        let authority = AuthorityBuf::of(&parts);
        let host = authority.as_str();
        let port = destination_port(&parts.uri, host);
        let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let grpc = Grpc::of(&parts.method, &parts.headers);
        let request_bytes =
            headers_size(&parts.headers) + http_body::Body::size_hint(&body).exact().unwrap_or(0);
        let no_host = |flag_status: (u16, Option<Bytes>, ResponseFlag, Option<String>)| {
            let record = self.record(&self.inner.no_host, start, host, grpc, request_bytes);
            let (status, text, flag, location) = flag_status;
            local_reply(status, text, flag, location, record, grpc)
        };

        // The request as the route table and the fault filter see it.
        let req = mesh_core::route::RequestView {
            authority: host,
            path,
            method: parts.method.as_str(),
            scheme: "http",
            headers: &parts.headers,
            random: rand::random(),
        };
        let (decision, retry_enabled) = {
            let snapshot = self.inner.cell.load_guard();
            let d = snapshot.route_outbound_request(port, &req);
            let enabled = match &d {
                RouteDecision::Forward { retry: Some(p), .. } => p.enabled_for(&req),
                _ => false,
            };
            (d, enabled)
        };
        let fwd = match decision {
            RouteDecision::Respond {
                status,
                body: text,
                flag,
                location,
            } => return no_host((status, text.map(Bytes::from), flag, location)),
            RouteDecision::Forward {
                route,
                cluster,
                endpoints,
                timeout,
                idle_timeout,
                retry,
                retry_buffer_limit,
                attempt_count_upstream,
                attempt_count_downstream,
                hash,
                forwarding,
                rewritten_path,
                fault,
                set_cookies,
                ..
            } => Forward {
                idle: idle_timeout.map(idle::StreamIdle::new),
                route,
                shadow: false,
                fault,
                set_cookies,
                hash,
                forwarding,
                rewritten_path,
                cluster,
                endpoints,
                timeout,
                // Before response headers no upstream data arrives, so the per-try idle
                // timeout bounds the try like the per-try timeout does.
                per_try_timeout: retry.as_ref().and_then(|p| {
                    match (p.per_try_timeout, p.per_try_idle_timeout) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                }),
                retry: retry.filter(|_| retry_enabled),
                retry_buffer_limit,
                attempt_count_upstream,
                attempt_count_downstream,
            },
        };
        tracing_headers::record_upstream_cluster(&fwd.cluster.name);
        if let Some(u) = info.as_deref_mut() {
            u.cluster = Some(fwd.cluster.name.clone());
            u.route = Some(fwd.route.clone());
        }
        // Fault injection runs before the router: a delay outside the route timeout, then
        // an abort.
        let mut delayed = false;
        if let Some(f) = fwd.fault.as_deref() {
            // The fault filter draws its own values, as Envoy's does.
            let (delay, abort) = if f.applies(&req, &fwd.cluster.name) {
                (
                    f.delay_for(&req, rand::random::<u64>()),
                    f.abort_for(&req, rand::random::<u64>()),
                )
            } else {
                (None, None)
            };
            if let Some(d) = delay {
                // Cold paths are boxed: the request future stays small (it is moved, i.e.
                // memcpy'd, several times per request).
                let sleep = Box::pin(tokio::time::sleep(d));
                if idle::bounded(sleep, None, fwd.idle.as_ref()).await == Ended::Idle {
                    return stream_idle_reply(
                        fwd.idle.as_ref(),
                        ResponseFlag::DelayInjected,
                        no_host,
                    );
                }
                delayed = true;
            }
            if let Some(a) = abort {
                let text = f
                    .abort
                    .as_ref()
                    .and_then(|a| a.body.clone())
                    .unwrap_or_else(|| mesh_core::fault::FAULT_ABORT_BODY.to_owned());
                let flag = match delayed {
                    true => ResponseFlag::DelayInjected | ResponseFlag::FaultInjected,
                    false => ResponseFlag::FaultInjected,
                };
                let (status, code) = a.reply(grpc.replies());
                let record = self.record(&self.inner.no_host, start, host, grpc, request_bytes);
                let text = Some(Bytes::from(text));
                return grpc_local_reply(status, text, flag, None, record, code, grpc);
            }
        }
        let deadline = fwd
            .timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
        let body = match &fwd.idle {
            Some(i) => i.watch_request(body),
            None => body,
        };
        let attempts = self.attempts(
            parts,
            body,
            &authority,
            port,
            &fwd,
            start,
            grpc,
            request_bytes,
            info,
        );
        // One future holds `attempts` once (see `idle::Bounded`).
        let mut resp = match idle::bounded(attempts, deadline, fwd.idle.as_ref()).await {
            Ended::Idle => stream_idle_reply(fwd.idle.as_ref(), ResponseFlag::None, no_host),
            Ended::Done(mut r) => {
                if let Some(i) = &fwd.idle {
                    // The response headers reach the application: activity.
                    i.touch();
                    r.body_mut().set_idle(i.clone().response_watch());
                }
                r
            }
            Ended::Deadline => {
                // The route timeout covers every attempt and back-off.
                telemetry::route_timeout(&fwd.cluster.name);
                no_host((
                    504,
                    Some(Bytes::from_static(UPSTREAM_REQUEST_TIMEOUT.as_bytes())),
                    ResponseFlag::UpstreamRequestTimeout,
                    None,
                ))
            }
        };
        if delayed {
            let flags = resp.extensions().get::<ResponseFlag>().copied();
            let flags = flags.unwrap_or_default() | ResponseFlag::DelayInjected;
            resp.extensions_mut().insert(flags);
        }
        resp
    }

    /// Sends the request, retrying as the route's retry policy says. Returns the last
    /// response or Envoy's local reply for the last failure.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        mut parts: http::request::Parts,
        body: ReqBody,
        authority: &AuthorityBuf,
        port: u16,
        fwd: &Forward,
        start: Instant,
        grpc: Grpc,
        request_bytes: u64,
        mut info: Option<&mut access::UpstreamInfo>,
    ) -> Response<OutboundBody> {
        let host = authority.as_str();
        // Where the application asked to go (`PassthroughCluster`'s original destination): the
        // URI's authority, else the `Host` header.
        let destination = parts.uri.authority().cloned();
        let cluster = &fwd.cluster;
        let state = self.inner.cluster_state(cluster);
        // gRPC: the request's messages, counted as its body streams (Envoy's grpc_stats).
        let (body, mut request_messages) = if grpc.telemetry() && !fwd.shadow {
            let (b, n) = crate::grpc_frames::CountedBody::new(body);
            (b.boxed_unsync(), Some(n))
        } else {
            (body, None)
        };
        let proto = match cluster.protocol {
            UpstreamProtocol::Http1 => Proto::Http1,
            UpstreamProtocol::Http2 => Proto::Http2,
            UpstreamProtocol::UseDownstream if parts.version == Version::HTTP_2 => Proto::Http2,
            UpstreamProtocol::UseDownstream => Proto::Http1,
        };

        // Keep the body for retries, up to the buffer limit; a bigger body is sent once.
        let mut retry = fwd.retry.as_deref();
        let mirrors = match fwd.forwarding.as_deref() {
            Some(f) if !fwd.shadow && !f.mirrors.is_empty() => &f.mirrors[..],
            _ => &[],
        };
        let mut once_body = None;
        let mut replay = None;
        let keep_body = retry.is_some() || !mirrors.is_empty();
        if keep_body && http_body::Body::is_end_stream(&body) {
            // No body: the first attempt sends the original, retries an empty one.
            replay = Some(replay::Replay::empty());
            once_body = Some(body);
        } else if keep_body {
            match Box::pin(replay::buffer(body, fwd.retry_buffer_limit)).await {
                Ok(r) => replay = Some(r),
                Err(replay::Overflow::Limit(b)) => {
                    tracing::debug!(
                        limit = fwd.retry_buffer_limit,
                        "request body exceeds the retry buffer limit; retries disabled"
                    );
                    retry = None;
                    once_body = Some(b);
                }
                Err(replay::Overflow::Body(e)) => {
                    tracing::debug!(error = %e, "request body failed while buffering for retries");
                    let record = self.record_unless(
                        fwd.shadow,
                        &self.inner.no_host,
                        start,
                        host,
                        grpc,
                        request_bytes,
                    );
                    return local_reply(
                        400,
                        None,
                        ResponseFlag::DownstreamProtocolError,
                        None,
                        record,
                        grpc,
                    );
                }
            }
        } else {
            once_body = Some(body);
        }

        // Circuit breaker: requests in flight to the cluster.
        let Some(rq_guard) =
            CounterGuard::try_acquire(&state.rq_active, cluster.circuit_breakers.max_requests)
        else {
            tracing::debug!(cluster = %cluster.name, "circuit breaker open: max_requests");
            let record = self.record_unless(
                fwd.shadow,
                &self.inner.no_host,
                start,
                host,
                grpc,
                request_bytes,
            );
            return local_reply(
                503,
                Some(upstream_reset_body(false, "overflow", None)),
                ResponseFlag::UpstreamOverflow,
                None,
                record,
                grpc,
            );
        };
        let mut rq_guard = Some(rq_guard);
        let mut retry_guard: Option<CounterGuard> = None;
        let max_attempts = retry.map_or(1, |p| p.num_retries.saturating_add(1));
        // The route's rewrites and request header mutations, once for all attempts.
        let mut rewritten_authority = None;
        if let Some(f) = fwd.forwarding.as_deref() {
            if let Some(path) = &fwd.rewritten_path {
                rewrite_path(&mut parts, path);
            }
            if let Some(HostRewrite::Literal(h)) = &f.host_rewrite
                && let Ok(v) = HeaderValue::from_str(h)
            {
                parts.headers.insert(header::HOST, v.clone());
                rewritten_authority = Some(AuthorityBuf::Header(v));
            }
            if !f.request_headers.is_empty() {
                let (request, rest) = (std::mem::take(&mut parts.headers), &parts);
                let mut headers = request.clone();
                let ctx = self.format_context(&request, rest.version, fwd, port, start);
                f.request_headers.apply(&mut headers, &ctx);
                parts.headers = headers;
            }
        }
        let authority = rewritten_authority.as_ref().unwrap_or(authority);
        // Response header mutations may read the request: keep it to the end.
        let keep_request = fwd
            .forwarding
            .as_deref()
            .is_some_and(|f| !f.response_headers.is_empty());
        if let Some(r) = &replay {
            for m in mirrors {
                self.mirror(m, &parts, r, authority, port, grpc);
            }
        }
        let auto_host = fwd
            .forwarding
            .as_deref()
            .is_some_and(|f| f.host_rewrite == Some(HostRewrite::Auto));
        let mut auto_authority: Option<AuthorityBuf> = None;
        // A DNS cluster's hosts are its latest answers; before the first, a request waits for
        // them, within the connect timeout.
        let dns_endpoints = match self.dns_hosts(&state) {
            Some(d) => Box::pin(d.endpoints(cluster.connect_timeout)).await,
            None => None,
        };
        let endpoints = dns_endpoints.as_ref().or(fwd.endpoints.as_ref());
        let mut parts = Some(parts);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let last = attempt >= max_attempts;

            // Pick the upstream host (avoiding hosts already tried when the policy says so).
            let avoid: &[SocketAddr] = match retry {
                Some(p) if p.previous_hosts => &tried,
                _ => &[],
            };
            // Envoy re-picks up to `host_selection_retry_max_attempts` times after the first
            // pick (only a retry has hosts to avoid).
            let host_selection_retry_count =
                retry.map_or(0, |p| p.host_selection_retry_max_attempts);
            // The host's active-request count (least request) and, with outlier detection,
            // the host to report on.
            let mut active: Option<ActiveRequest> = None;
            let mut live: Option<LiveHost> = None;
            let picked = match (&cluster.discovery, endpoints) {
                (ClusterDiscovery::OriginalDestination, _) => {
                    let to = destination.as_ref().map_or(host, Authority::as_str);
                    Box::pin(self.original_destination(to, port))
                        .await
                        .map(|addr| (addr, EndpointTlsMode::Disabled, None, None))
                }
                (_, Some(set)) => {
                    let ctx = PickContext {
                        hash: fwd.hash,
                        avoid,
                        host_selection_retry_count,
                    };
                    self.inner.pick_host(&state, set, &ctx).map(|p| {
                        let ep = &set.endpoints[p.index];
                        active = p.active;
                        live = p.live;
                        (
                            ep.address,
                            ep.tls_mode,
                            Some((ep.workload.as_ref(), set)),
                            ep.hostname.as_ref(),
                        )
                    })
                }
                (_, None) => None,
            };
            let Some((addr, tls_mode, ep_info, hostname)) = picked else {
                let record = self.record_unless(
                    fwd.shadow,
                    &self.inner.no_host,
                    start,
                    host,
                    grpc,
                    request_bytes,
                );
                return local_reply(
                    503,
                    Some(Bytes::from_static(NO_HEALTHY_UPSTREAM.as_bytes())),
                    ResponseFlag::NoHealthyUpstream,
                    None,
                    record,
                    grpc,
                );
            };
            if let Some(u) = info.as_deref_mut() {
                u.attempt(addr);
            }
            let upstream_tls = match cluster.discovery {
                ClusterDiscovery::OriginalDestination => None,
                _ => cluster.tls_for(tls_mode),
            };
            let (workload, set) = match ep_info {
                Some((w, set)) => (w, Some(set.as_ref())),
                None => (None, None),
            };
            let host_pool =
                self.inner
                    .host_pool(&state, addr, upstream_tls.is_some(), workload, set);

            // The request for this attempt: the original on the last attempt, else a copy.
            let mut p = if last && !keep_request {
                match parts.take() {
                    Some(p) => p,
                    None => break self.no_parts(start, host, grpc, request_bytes),
                }
            } else {
                match parts.as_ref() {
                    Some(p) => copy_parts(p),
                    None => break self.no_parts(start, host, grpc, request_bytes),
                }
            };
            if fwd.attempt_count_upstream {
                p.headers
                    .insert(X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt));
            }
            // `auto_host_rewrite`: the chosen host's hostname, when it has one. Envoy rewrites
            // the request it keeps for retries, so a later host without a hostname sends the
            // earlier host's.
            if auto_host && let Some(v) = hostname.and_then(|h| HeaderValue::from_str(h).ok()) {
                auto_authority = Some(AuthorityBuf::Header(v));
            }
            if let Some(AuthorityBuf::Header(v)) = &auto_authority {
                p.headers.insert(header::HOST, v.clone());
            }
            let authority = auto_authority.as_ref().unwrap_or(authority);
            telemetry::PeerHeaders::propagate(
                self.inner.peer_headers.as_ref(),
                tls_mode,
                &mut p.headers,
            );
            if let Err(e) = prepare(&mut p, authority, proto, &state.host_header) {
                tracing::debug!(error = %e, "cannot forward request");
                let record = self.record_unless(
                    fwd.shadow,
                    &host_pool.labels,
                    start,
                    host,
                    grpc,
                    request_bytes,
                );
                return local_reply(404, None, ResponseFlag::NoRouteFound, None, record, grpc);
            }
            let b = match (once_body.take(), &replay) {
                (Some(b), _) => b,
                (None, Some(r)) => r.body(),
                (None, None) => once_body.take().unwrap_or_else(|| {
                    http_body_util::Empty::new()
                        .map_err(|e| match e {})
                        .boxed_unsync()
                }),
            };
            let req = Request::from_parts(p, b);

            let istio = tls_mode == EndpointTlsMode::Istio;
            let inner = &*self.inner;
            let state_ref = &*state;
            let tls_fn = upstream_tls
                .map(|tls| move || inner.tls_target(state_ref, tls, istio, proto, addr));
            let params = ConnectParams {
                tls: tls_fn.as_ref().map(|f| {
                    f as &(dyn Fn() -> Result<Arc<TlsTarget>, ConnectError> + Send + Sync)
                }),
                timeout: cluster.connect_timeout,
                limits: &state.conn_limits,
                pool: &cluster.connection_pool,
            };
            // Envoy's cluster stats count every attempt (telemetry::Attempt).
            let mut attempt_stats = host_pool.labels.attempt_started();
            let send = host_pool.send(req, proto, &params);
            let per_try_deadline = fwd
                .per_try_timeout
                .and_then(|t| tokio::time::Instant::now().checked_add(t));
            let result = match idle::bounded(send, per_try_deadline, None).await {
                Ended::Done(r) => Some(r),
                Ended::Deadline | Ended::Idle => None,
            };

            if let Some(u) = info.as_deref_mut() {
                match &result {
                    None => u.per_try_timeout = true,
                    Some(Ok((_, ends, _))) => {
                        u.local_address = ends.local;
                        u.from_upstream = true;
                        u.service_time = Some(start.elapsed());
                    }
                    Some(Err(SendError::Connect(e))) => u.connect_failed(e),
                    Some(Err(SendError::Overflow)) => u.reset = Some("overflow"),
                    Some(Err(SendError::Reset(_))) => u.reset = Some("connection_termination"),
                }
            }
            let outcome = match &result {
                None => AttemptOutcome::PerTryTimeout,
                Some(Ok((resp, _, _))) => AttemptOutcome::Response {
                    status: resp.status().as_u16(),
                    headers: resp.headers(),
                },
                Some(Err(SendError::Connect(_))) => AttemptOutcome::ConnectFailure,
                Some(Err(SendError::Overflow)) => AttemptOutcome::Overflow,
                Some(Err(SendError::Reset(e))) => AttemptOutcome::Reset {
                    refused_stream: is_refused_stream(e),
                },
            };
            if !matches!(
                result,
                Some(Err(SendError::Connect(_) | SendError::Overflow))
            ) && let Some(a) = &attempt_stats
            {
                a.sent();
            }
            if let Some(a) = &attempt_stats {
                match &result {
                    None => a.per_try_timeout(),
                    Some(Err(SendError::Connect(e))) => {
                        a.connect_failed(matches!(e, ConnectError::Timeout { .. }))
                    }
                    Some(Err(SendError::Overflow)) => a.pending_overflow(),
                    _ => {}
                }
            }
            if let Some(live) = &live {
                let r = match &outcome {
                    AttemptOutcome::Response { status, .. } => Some(OutlierResult::Http(*status)),
                    AttemptOutcome::ConnectFailure => Some(OutlierResult::ConnectFailed),
                    AttemptOutcome::Reset { .. } => Some(OutlierResult::Reset),
                    AttemptOutcome::PerTryTimeout => Some(OutlierResult::Timeout),
                    // A local overflow says nothing about the host.
                    AttemptOutcome::Overflow => None,
                };
                if let Some(r) = r {
                    state.report_outlier(live, r);
                }
            }
            let retriable = retry.is_some_and(|p| p.would_retry(&outcome));
            // Circuit breaker: retries in flight to the cluster (an overflow ends retrying
            // without URX, as in Envoy).
            let retry_slot = if retriable && !last {
                drop(retry_guard.take());
                // `max_retries`, or the retry budget over the cluster's active and pending
                // requests.
                let active = state.rq_active.load(std::sync::atomic::Ordering::Acquire)
                    + state
                        .conn_limits
                        .rq_pending
                        .load(std::sync::atomic::Ordering::Acquire);
                let g = CounterGuard::try_acquire(
                    &state.rq_retry_active,
                    cluster.circuit_breakers.retry_limit(active),
                );
                if g.is_none() {
                    tracing::debug!(cluster = %cluster.name, "circuit breaker open: max_retries");
                }
                g
            } else {
                None
            };
            let overflowed = retriable && !last && retry_slot.is_none();
            if let Some(g) = retry_slot {
                retry_guard = Some(g);
                drop(active);
                tracing::debug!(
                    cluster = %cluster.name,
                    upstream = %addr,
                    attempt,
                    "retrying upstream request"
                );
                tried.push(addr);
                if let Some(a) = attempt_stats.take() {
                    a.retried(match &result {
                        Some(Ok((r, _, _))) => Some(r.status().as_u16()),
                        _ => None,
                    });
                }
                drop(result);
                if let Some(p) = retry {
                    let wait = p.back_off.delay(attempt, rand::random::<u64>());
                    Box::pin(tokio::time::sleep(wait)).await;
                }
                continue;
            }
            // Retries exhausted on a retriable condition: Envoy's URX.
            let exhausted = retriable && retry.is_some() && !overflowed;
            // Envoy sets the retry verdict before the cause: `URX,UF`, or `UO,UF` when the
            // retry breaker was full.
            let verdict = if exhausted {
                ResponseFlag::UpstreamRetryLimitExceeded
            } else if overflowed {
                ResponseFlag::UpstreamOverflow
            } else {
                ResponseFlag::None
            };
            drop(retry_guard.take());
            // Envoy's local reply says so once a retry was sent.
            let retried = attempt > 1;
            if let Some(a) = attempt_stats.as_mut() {
                let (code, upstream) = match &result {
                    None => (504, false),
                    Some(Ok((r, _, _))) => (r.status().as_u16(), true),
                    Some(Err(_)) => (503, false),
                };
                let end = match (exhausted, overflowed, attempt > 1) {
                    (true, _, _) => telemetry::RetryEnd::LimitExceeded,
                    (_, true, _) => telemetry::RetryEnd::Overflow,
                    (_, _, true) => telemetry::RetryEnd::Success,
                    _ => telemetry::RetryEnd::None,
                };
                a.answered(code, upstream, end);
            }
            let guards = InFlight {
                host: active,
                cluster: rq_guard.take(),
                attempt: attempt_stats,
            };
            let mut record = self.record_unless(
                fwd.shadow,
                &host_pool.labels,
                start,
                host,
                grpc,
                request_bytes,
            );
            if let Some(r) = record.as_mut() {
                r.grpc_messages.request = request_messages.take();
            }
            let mut resp = match result {
                None => {
                    let flag = verdict | ResponseFlag::UpstreamRequestTimeout;
                    local_reply(
                        504,
                        Some(Bytes::from_static(UPSTREAM_REQUEST_TIMEOUT.as_bytes())),
                        flag,
                        None,
                        record,
                        grpc,
                    )
                }
                Some(Ok((resp, ends, checkin))) => {
                    let peer = ends.peer;
                    let flag = verdict;
                    let (mut parts, incoming) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    telemetry::discover_upstream_peer(&mut parts.headers, record.as_mut());
                    if let Some(p) = &peer {
                        parts.extensions.insert(UpstreamPrincipal(p.clone()));
                    }
                    if let Some(r) = record.as_mut() {
                        r.code = parts.status.as_u16();
                        r.principal = peer;
                        r.flag = flag;
                        if r.grpc {
                            r.grpc_status = grpc_status(&parts.headers);
                        }
                    }
                    parts.extensions.insert(flag);
                    // Envoy's router adds the generated cookies to the upstream's response.
                    for c in &fwd.set_cookies {
                        if let Ok(v) = HeaderValue::from_str(c) {
                            parts.headers.append(header::SET_COOKIE, v);
                        }
                    }
                    let body = OutboundBody::upstream(incoming, checkin, record, guards);
                    Response::from_parts(parts, body)
                }
                Some(Err(SendError::Connect(e))) => {
                    tracing::debug!(cluster = %cluster.name, error = %e, "upstream connection failure");
                    let transport = e.transport_failure_reason();
                    let text = upstream_reset_body(retried, e.reset_reason(), transport.as_deref());
                    let flag = verdict | ResponseFlag::UpstreamConnectionFailure;
                    local_reply(503, Some(text), flag, None, record, grpc)
                }
                Some(Err(SendError::Overflow)) => {
                    tracing::debug!(cluster = %cluster.name, "circuit breaker open: max_pending_requests");
                    local_reply(
                        503,
                        Some(upstream_reset_body(retried, "overflow", None)),
                        verdict | ResponseFlag::UpstreamOverflow,
                        None,
                        record,
                        grpc,
                    )
                }
                Some(Err(SendError::Reset(e))) => {
                    tracing::debug!(cluster = %cluster.name, error = %e, "upstream reset before response headers");
                    let text = upstream_reset_body(retried, "connection_termination", None);
                    let flag = verdict | ResponseFlag::UpstreamConnectionTermination;
                    local_reply(503, Some(text), flag, None, record, grpc)
                }
            };
            if fwd.attempt_count_downstream {
                resp.headers_mut()
                    .insert(X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt));
            }
            if let Some(f) = fwd.forwarding.as_deref()
                && !f.response_headers.is_empty()
            {
                let empty = HeaderMap::new();
                let request = parts.as_ref().map_or(&empty, |p| &p.headers);
                let version = parts.as_ref().map_or(Version::HTTP_11, |p| p.version);
                let response = resp.headers().clone();
                let mut ctx = self.format_context(request, version, fwd, port, start);
                ctx.response = Some((&response, resp.status().as_u16()));
                ctx.upstream_host = Some(addr);
                f.response_headers.apply(resp.headers_mut(), &ctx);
            }
            break resp;
        }
    }

    /// What `%…%` header formatters read for this request. mesh has no downstream
    /// connection: the downstream remote address is the pod's `INSTANCE_IP` with port 0 and
    /// the local one the outbound listener's `0.0.0.0:<port>`.
    fn format_context<'a>(
        &'a self,
        request: &'a HeaderMap,
        version: Version,
        fwd: &'a Forward,
        port: u16,
        start: Instant,
    ) -> FormatContext<'a> {
        let mut ctx = FormatContext::new(request, protocol_name(version), &fwd.cluster.name);
        ctx.route_name = &fwd.route;
        ctx.downstream_remote = Some(SocketAddr::new(self.inner.instance_ip, 0));
        ctx.downstream_local = Some(SocketAddr::from(([0, 0, 0, 0], port)));
        ctx.start_time = std::time::SystemTime::now()
            .checked_sub(start.elapsed())
            .unwrap_or_else(std::time::SystemTime::now);
        ctx.hostname = hostname();
        ctx
    }

    fn record_unless(
        &self,
        shadow: bool,
        labels: &Arc<LabelBase>,
        start: Instant,
        host: &str,
        grpc: Grpc,
        request_bytes: u64,
    ) -> Option<Record> {
        if shadow {
            None
        } else {
            self.record(labels, start, host, grpc, request_bytes)
        }
    }

    /// Sends a fire-and-forget copy of the request to the mirror's cluster, with `-shadow`
    /// appended to the host (before a port).
    fn mirror(
        &self,
        m: &mesh_core::route::MirrorPolicy,
        parts: &http::request::Parts,
        body: &replay::Replay,
        authority: &AuthorityBuf,
        port: u16,
        grpc: Grpc,
    ) {
        if m.fraction.is_some_and(|f| !f.hit(rand::random::<u64>())) {
            return;
        }
        let Some((cluster, endpoints)) = self.inner.cell.load().cluster(&m.cluster) else {
            tracing::debug!(cluster = %m.cluster, "mirror cluster not found");
            return;
        };
        let host = authority.as_str();
        let shadow_host = if m.disable_shadow_host_suffix_append {
            host.to_owned()
        } else {
            match authority_port(host) {
                Some(p) => format!(
                    "{}-shadow:{p}",
                    &host[..host.len() - p.to_string().len() - 1]
                ),
                None => format!("{host}-shadow"),
            }
        };
        let Ok(value) = HeaderValue::from_str(&shadow_host) else {
            return;
        };
        let mut p = copy_parts(parts);
        p.headers.insert(header::HOST, value.clone());
        // Envoy 1.40 sends shadows through its async client, which appends this address to
        // `x-forwarded-for` (observed in the routing oracle).
        p.headers.append(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("192.0.2.2"),
        );
        let fwd = Forward {
            route: Arc::from(""),
            cluster,
            endpoints,
            timeout: None,
            idle: None,
            per_try_timeout: None,
            retry: None,
            retry_buffer_limit: 0,
            attempt_count_upstream: false,
            attempt_count_downstream: false,
            hash: None,
            forwarding: None,
            rewritten_path: None,
            fault: None,
            set_cookies: Vec::new(),
            shadow: true,
        };
        let this = self.clone();
        let body = body.body();
        tokio::spawn(async move {
            let authority = AuthorityBuf::Header(value);
            let send = async {
                let resp = this
                    .attempts(
                        p,
                        body,
                        &authority,
                        port,
                        &fwd,
                        Instant::now(),
                        grpc,
                        0,
                        None,
                    )
                    .await;
                let _ = resp.into_body().collect().await;
            };
            // A shadow never outlives a minute.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), send).await;
        });
    }

    fn no_parts(
        &self,
        start: Instant,
        host: &str,
        grpc: Grpc,
        request_bytes: u64,
    ) -> Response<OutboundBody> {
        let record = self.record(&self.inner.no_host, start, host, grpc, request_bytes);
        local_reply(500, None, ResponseFlag::None, None, record, grpc)
    }

    fn record(
        &self,
        labels: &Arc<LabelBase>,
        start: Instant,
        host: &str,
        grpc: Grpc,
        request_bytes: u64,
    ) -> Option<Record> {
        Some(Record {
            start,
            labels: labels.clone(),
            host: labels.needs_host().then(|| Box::from(host)),
            principal: None,
            code: 0,
            flag: ResponseFlag::None,
            grpc: grpc.telemetry(),
            grpc_status: None,
            request_bytes,
            peer: None,
            grpc_messages: Default::default(),
        })
    }

    /// `PassthroughCluster`: where the application asked to go.
    async fn original_destination(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let name = telemetry::strip_port(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Some(SocketAddr::new(ip, port));
        }
        let resolver: &dyn Resolve = match &self.resolver {
            Some(r) => r.as_ref(),
            None => &dns::SystemResolver,
        };
        match resolver.resolve(name).await {
            Ok(ips) => ips.first().map(|ip| SocketAddr::new(*ip, port)),
            Err(e) => {
                tracing::debug!(error = %e, "passthrough destination not resolvable");
                None
            }
        }
    }
}

impl Inner {
    fn cluster_state(&self, cluster: &Arc<Cluster>) -> Arc<ClusterState> {
        if let Some(s) = self.clusters.load().get(cluster.name.as_str())
            && (Arc::ptr_eq(&s.cluster, cluster) || *s.cluster == **cluster)
        {
            return s.clone();
        }
        let _w = lock(&self.clusters_write);
        let current = self.clusters.load();
        if let Some(s) = current.get(cluster.name.as_str())
            && (Arc::ptr_eq(&s.cluster, cluster) || *s.cluster == **cluster)
        {
            return s.clone();
        }
        // A changed cluster keeps its hosts' live state.
        let (host_states, ejected) = match current.get(cluster.name.as_str()) {
            Some(old) => (old.host_states.clone(), old.ejected.clone()),
            None => (Arc::default(), Arc::default()),
        };
        let state = Arc::new(ClusterState {
            host_states,
            ejected,
            balancer: ArcSwapOption::empty(),
            dns: std::sync::OnceLock::new(),
            host_header: std::sync::OnceLock::new(),
            balancer_write: Mutex::new(()),
            outlier: cluster.outlier_detection.clone().map(OutlierDetector::new),
            rq_active: Arc::default(),
            rq_retry_active: Arc::default(),
            conn_limits: Arc::new(pool::ConnLimits::new(&cluster.circuit_breakers)),
            cluster: cluster.clone(),
            service: cluster.service.as_ref().map(|s| DestinationService {
                host: s.host.clone(),
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            }),
            hosts: ArcSwap::from_pointee(HashMap::default()),
            hosts_write: Mutex::new(()),
            tls: Mutex::new(Vec::new()),
        });
        // Drop the state of clusters the current snapshot no longer has.
        let snapshot = self.cell.load();
        let mut next = states_in_snapshot(&current, &snapshot);
        next.insert(cluster.name.clone(), state.clone());
        self.clusters.store(Arc::new(next));
        state
    }

    /// Picks a host of `set` with the cluster's load balancer, after the outlier detector's
    /// sweep when one is due. Least request counts the request on the host while
    /// [`PickedHost::active`] is held.
    fn pick_host(
        &self,
        state: &ClusterState,
        set: &Arc<EndpointSet>,
        ctx: &PickContext<'_>,
    ) -> Option<PickedHost> {
        let entry = self.balancer(state, set);
        if let Some(d) = &state.outlier {
            d.sweep_if_due(entry.lb.hosts(), &mut rand::rng());
        }
        let index = entry.lb.pick(ctx, &mut rand::rng())?;
        let hs = entry.lb.host(index);
        let active =
            (state.cluster.lb_policy == LbPolicy::LeastRequest).then(|| hs.start_request());
        let live = state.outlier.is_some().then(|| LiveHost {
            host: hs.clone(),
            entry: entry.clone(),
        });
        Some(PickedHost {
            index,
            active,
            live,
        })
    }

    /// The balancer for `set`, rebuilt when the endpoint set changed.
    fn balancer(&self, state: &ClusterState, set: &Arc<EndpointSet>) -> Arc<BalancerEntry> {
        if let Some(e) = state.balancer.load().as_ref()
            && Arc::ptr_eq(&e.set, set)
        {
            return e.clone();
        }
        let _w = lock(&state.balancer_write);
        if let Some(e) = state.balancer.load_full()
            && Arc::ptr_eq(&e.set, set)
        {
            return e;
        }
        let mut states = lock(&state.host_states);
        // Hosts that left the set lose their state (and their ejection).
        states.retain(|addr, h| {
            let keep = set.endpoints.iter().any(|e| e.address == *addr);
            if !keep {
                h.set_ejected(false);
            }
            keep
        });
        let lb = Balancer::new(
            set,
            state.cluster.lb_policy,
            &state.cluster.lb_config,
            state.ejected.clone(),
            |ep| {
                states
                    .entry(ep.address)
                    .or_insert_with(|| Arc::new(HostState::new(ep.address, state.ejected.clone())))
                    .clone()
            },
        );
        drop(states);
        let entry = Arc::new(BalancerEntry {
            set: set.clone(),
            lb,
        });
        state.balancer.store(Some(entry.clone()));
        entry
    }

    fn host_pool(
        &self,
        state: &ClusterState,
        addr: SocketAddr,
        tls: bool,
        workload: Option<&WorkloadMetadata>,
        set: Option<&EndpointSet>,
    ) -> Arc<HostPool> {
        let key = (addr, tls);
        if let Some(h) = state.hosts.load().get(&key)
            && h.workload.as_ref() == workload
        {
            return h.clone();
        }
        let _w = lock(&state.hosts_write);
        let current = state.hosts.load();
        if let Some(h) = current.get(&key)
            && h.workload.as_ref() == workload
        {
            return h.clone();
        }
        let labels = Arc::new(
            LabelBase::new(
                self.source.clone(),
                telemetry::destination_labels(workload),
                state.service.clone(),
            )
            .with_cluster(
                &state.cluster.name,
                telemetry::ClusterLive {
                    rq_active: state.rq_active.clone(),
                    max_requests: state.cluster.circuit_breakers.max_requests,
                    ejected: state.outlier.is_some().then(|| state.ejected.clone()),
                    outlier: state.outlier.as_ref().map(|d| d.stats()),
                },
            ),
        );
        let pool = Arc::new(HostPool::new(addr, workload.cloned(), labels));
        let mut next: HashMap<(SocketAddr, bool), Arc<HostPool>> = match set {
            // Drop hosts the endpoint set no longer has.
            Some(set) => current
                .iter()
                .filter(|((a, _), _)| set.endpoints.iter().any(|e| e.address == *a))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            // Original destination: keep a bounded number of hosts.
            None if current.len() >= 256 => HashMap::default(),
            None => (**current).clone(),
        };
        next.insert(key, pool.clone());
        state.hosts.store(Arc::new(next));
        pool
    }

    /// The TLS configuration for new connections of this cluster, rebuilt only when the
    /// workload certificate changed.
    fn tls_target(
        &self,
        state: &ClusterState,
        tls: &UpstreamTls,
        istio: bool,
        proto: Proto,
        addr: SocketAddr,
    ) -> Result<Arc<TlsTarget>, ConnectError> {
        let version = *self.cert_version.borrow();
        let mut cache = lock(&state.tls);
        if let Some(e) = cache
            .iter()
            .find(|e| e.istio == istio && e.proto == proto && e.cert_version == version)
        {
            return Ok(e.target.clone());
        }
        // Envoy's istio.alpn filter overrides the ALPN of HTTP traffic over Istio mTLS.
        let istio_alpn = istio
            || tls
                .alpn
                .iter()
                .any(|a| a == "istio" || a == "istio-peer-exchange");
        let alpn = match (istio_alpn, proto) {
            (false, _) => None,
            (true, Proto::Http1) => Some(ALPN_ISTIO_HTTP11),
            (true, Proto::Http2) => Some(ALPN_ISTIO_H2),
        };
        let config = crate::tls::client_config(&self.certs, tls, alpn)
            .map_err(|source| ConnectError::TlsConfig { addr, source })?;
        let server_name = if tls.sni.is_empty() {
            ServerName::IpAddress(addr.ip().into())
        } else {
            ServerName::try_from(tls.sni.clone()).map_err(|e| ConnectError::TlsConfig {
                addr,
                source: crate::tls::TlsError::Rustls(rustls::Error::General(format!(
                    "invalid SNI {:?}: {e}",
                    tls.sni
                ))),
            })?
        };
        let target = Arc::new(TlsTarget {
            config,
            server_name,
            tls: tls.clone(),
        });
        cache.retain(|e| !(e.istio == istio && e.proto == proto));
        cache.push(TlsCacheEntry {
            istio,
            proto,
            cert_version: version,
            target: target.clone(),
        });
        Ok(target)
    }
}

impl<B> tower::Service<Request<B>> for Outbound
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<OutboundBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<OutboundBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.request(req).await) })
    }
}

async fn collect(resp: Response<OutboundBody>) -> Result<Response<Bytes>, OutboundError> {
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(OutboundError::Body)?
        .to_bytes();
    Ok(Response::from_parts(parts, bytes))
}

/// What the route decided, for the attempts.
struct Forward {
    /// The route's name (`%ROUTE_NAME%`).
    route: Arc<str>,
    cluster: Arc<Cluster>,
    endpoints: Option<Arc<EndpointSet>>,
    timeout: Option<std::time::Duration>,
    /// The route's stream idle timer (`idle_timeout`).
    idle: Option<idle::StreamIdle>,
    per_try_timeout: Option<std::time::Duration>,
    retry: Option<Arc<RetryPolicy>>,
    retry_buffer_limit: u32,
    attempt_count_upstream: bool,
    attempt_count_downstream: bool,
    hash: Option<u64>,
    forwarding: Option<Arc<Forwarding>>,
    rewritten_path: Option<String>,
    fault: Option<Arc<mesh_core::fault::Fault>>,
    /// `Set-Cookie` values of generated hash-policy cookies, for the upstream's response.
    set_cookies: Vec<String>,
    /// A mirror copy: no telemetry, no further mirroring.
    shadow: bool,
}

/// The machine's host name, as Envoy's `%HOSTNAME%` gives it (`gethostname`; in Kubernetes
/// the pod's name), read once.
fn hostname() -> &'static str {
    static NAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default()
    });
    &NAME
}

/// Envoy's `%PROTOCOL%`.
fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// Replaces the request's `path?query`, keeping scheme and authority.
fn rewrite_path(parts: &mut http::request::Parts, path_and_query: &str) {
    let Ok(pq) = PathAndQuery::try_from(path_and_query) else {
        tracing::debug!(
            path = path_and_query,
            "rewritten path is not a valid URI path; kept the original"
        );
        return;
    };
    let mut b = Uri::builder();
    if let Some(s) = parts.uri.scheme() {
        b = b.scheme(s.clone());
    }
    if let Some(a) = parts.uri.authority() {
        b = b.authority(a.clone());
    }
    if let Ok(uri) = b.path_and_query(pq).build() {
        parts.uri = uri;
    }
}

/// `x-envoy-attempt-count`.
const X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// A copy of the request head for one more attempt (extensions are not carried).
fn copy_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// Whether a send error is an HTTP/2 `REFUSED_STREAM` reset (hyper wraps h2's error, whose
/// `Debug` names the reason; only read on the failure path).
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if format!("{err:?}").contains("REFUSED_STREAM") {
            return true;
        }
        source = err.source();
    }
    false
}

/// The request's authority: the `Host` header as the application sent it, else the URI's.
enum AuthorityBuf {
    Header(HeaderValue),
    Uri(Authority),
    None,
}

impl AuthorityBuf {
    fn of(parts: &http::request::Parts) -> Self {
        if let Some(h) = parts.headers.get(header::HOST)
            && h.to_str().is_ok()
        {
            return AuthorityBuf::Header(h.clone());
        }
        match parts.uri.authority() {
            Some(a) => AuthorityBuf::Uri(a.clone()),
            None => AuthorityBuf::None,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            AuthorityBuf::Header(h) => h.to_str().unwrap_or(""),
            AuthorityBuf::Uri(a) => a.as_str(),
            AuthorityBuf::None => "",
        }
    }
}

/// The outbound listener's port: the port the application asked to connect to, as a
/// sidecar's listener is the original destination port of the connection. That is the URI's
/// (`http://reviews:9080/`, `http://reviews/` = 80, `https` = 443) whatever the `Host` header
/// says (Envoy matches `Host: a:9090` against port 9080's route configuration when the
/// connection went to 9080); only an origin-form URI falls back to the `Host` header's port.
fn destination_port(uri: &Uri, host: &str) -> u16 {
    match uri.authority() {
        Some(a) => a
            .port_u16()
            .unwrap_or(if uri.scheme() == Some(&Scheme::HTTPS) {
                443
            } else {
                80
            }),
        None => authority_port(host).unwrap_or(80),
    }
}

/// The port in `host:port`, if any.
fn authority_port(authority: &str) -> Option<u16> {
    let (h, p) = authority.rsplit_once(':')?;
    if h.contains(':') && !h.ends_with(']') {
        return None;
    }
    p.parse().ok()
}

pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// Approximate wire size of a header block (what Istio's byte histograms count on top of
/// the body).
fn headers_size(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// Headers that only concern one hop (RFC 9110 §7.6.1) and that Envoy removes.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|h| h == name)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (comparisons, no hashing); most requests and responses have
    // none of these headers.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(c) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = c
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        if h == header::TE {
            // `te: trailers` is end-to-end in gRPC and Envoy keeps it.
            let keep = headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            if keep {
                continue;
            }
        }
        headers.remove(h);
    }
}

/// Shapes the request for the upstream protocol: hop-by-hop headers removed; HTTP/1.1 gets
/// origin-form and a `Host` header (kept as the application sent it), HTTP/2 an absolute URI
/// whose authority becomes `:authority`.
fn prepare(
    parts: &mut http::request::Parts,
    authority: &AuthorityBuf,
    proto: Proto,
    host_header: &std::sync::OnceLock<(Box<str>, HeaderValue)>,
) -> Result<(), http::Error> {
    strip_hop_by_hop(&mut parts.headers);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match proto {
        Proto::Http1 => {
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST) {
                let v = host_value(authority.as_str(), host_header)?;
                parts.headers.insert(header::HOST, v);
            }
            if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
                parts.uri = Uri::from(pq);
            }
        }
        Proto::Http2 => {
            parts.version = Version::HTTP_2;
            let a = match authority {
                AuthorityBuf::Uri(a) => a.clone(),
                AuthorityBuf::Header(h) => Authority::try_from(h.as_bytes())?,
                AuthorityBuf::None => Authority::from_static("localhost"),
            };
            parts.uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(a)
                .path_and_query(pq)
                .build()?;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(())
}

/// The `Host` header value for `authority`: the cluster's cached one when it is the same
/// authority (the first one seen is cached), else a new value.
fn host_value(
    authority: &str,
    cache: &std::sync::OnceLock<(Box<str>, HeaderValue)>,
) -> Result<HeaderValue, http::Error> {
    if let Some((a, v)) = cache.get()
        && **a == *authority
    {
        return Ok(v.clone());
    }
    let v = HeaderValue::from_str(authority).map_err(http::Error::from)?;
    if cache.get().is_none() {
        let _ = cache.set((Box::from(authority), v.clone()));
    }
    Ok(v)
}

/// Envoy's local reply: status, optional `text/plain` body, the flag in the extensions; to a
/// gRPC request, its gRPC form (see [`grpc_local_reply`]) with the `grpc-status` Envoy maps
/// the HTTP status to.
fn local_reply(
    status: u16,
    body: Option<Bytes>,
    flag: ResponseFlag,
    location: Option<String>,
    record: Option<Record>,
    grpc: Grpc,
) -> Response<OutboundBody> {
    let code = grpc
        .replies()
        .then(|| mesh_core::fault::http_to_grpc_status(status));
    grpc_local_reply(status, body, flag, location, record, code, grpc)
}

/// [`local_reply`] with the gRPC status given: with one, Envoy's gRPC form (as Envoy 1.40
/// answers, see the root crate's `grpc_local_replies` test): HTTP 200, trailers-only (no
/// body, no `content-length`), `content-type: application/grpc`, `grpc-status`, and the
/// body percent-encoded as `grpc-message` (none for `HEAD`); `location` kept.
fn grpc_local_reply(
    status: u16,
    body: Option<Bytes>,
    flag: ResponseFlag,
    location: Option<String>,
    mut record: Option<Record>,
    grpc_status: Option<u32>,
    grpc: Grpc,
) -> Response<OutboundBody> {
    let status = match grpc_status {
        Some(_) => StatusCode::OK,
        None => StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    if let Some(r) = record.as_mut() {
        r.code = status.as_u16();
        r.flag = flag;
        r.grpc_status = grpc_status.filter(|_| r.grpc);
    }
    let body = body.unwrap_or_default();
    let (body, message) = match grpc_status {
        Some(_) => (Bytes::new(), Some(body)),
        None => (body, None),
    };
    let mut resp = Response::new(OutboundBody::full(body.clone(), record));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    match (grpc_status, message) {
        (Some(code), Some(m)) => grpc_reply::set_headers(h, grpc, code, &m),
        _ => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            if !body.is_empty() {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
        }
    }
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, l);
    }
    resp.extensions_mut().insert(flag);
    resp
}

/// Envoy's local reply when the stream idle timer fires before the response headers: 504
/// `stream timeout` (408 while the request body was still arriving), flag `SI` after `earlier`.
fn stream_idle_reply(
    idle: Option<&idle::StreamIdle>,
    earlier: ResponseFlag,
    reply: impl FnOnce((u16, Option<Bytes>, ResponseFlag, Option<String>)) -> Response<OutboundBody>,
) -> Response<OutboundBody> {
    tracing::debug!("stream idle timeout");
    reply((
        idle.map_or(504, idle::StreamIdle::status),
        Some(Bytes::from_static(STREAM_TIMEOUT.as_bytes())),
        earlier | ResponseFlag::StreamIdleTimeout,
        None,
    ))
}

/// The upstream's verified SPIFFE URI SAN, in the response extensions of every response that
/// came over Istio mTLS: who actually answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPrincipal(pub Arc<str>);

/// The cluster states of `current` whose cluster `snapshot` still has.
fn states_in_snapshot(
    current: &HashMap<String, Arc<ClusterState>>,
    snapshot: &Snapshot,
) -> HashMap<String, Arc<ClusterState>> {
    current
        .iter()
        .filter(|(name, _)| snapshot.clusters.contains_key(name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_ports() {
        assert_eq!(authority_port("a:9080"), Some(9080));
        assert_eq!(authority_port("a"), None);
        assert_eq!(authority_port("[::1]:80"), Some(80));
        assert_eq!(authority_port("[::1]"), None);
    }

    #[test]
    fn listener_port_is_the_uri_port_whatever_the_host_says() {
        let port = |uri: &str, host: &str| destination_port(&uri.parse().unwrap(), host);
        assert_eq!(port("http://a:9080/", "a:9090"), 9080);
        assert_eq!(port("http://a:9080/", "b"), 9080);
        assert_eq!(port("http://a/", "a:9080"), 80);
        assert_eq!(port("https://a/", "a"), 443);
        assert_eq!(port("/x", "a:9080"), 9080);
        assert_eq!(port("/x", "a"), 80);
        assert_eq!(port("/x", "[::1]:81"), 81);
    }

    #[test]
    fn host_header_is_the_authority_whether_cached_or_not() {
        let cache = std::sync::OnceLock::new();
        let first = host_value("reviews:9080", &cache).unwrap();
        assert_eq!(first, "reviews:9080");
        assert_eq!(cache.get().map(|(a, _)| &**a), Some("reviews:9080"));
        assert_eq!(host_value("reviews:9080", &cache).unwrap(), "reviews:9080");
        // Another authority is not served from the cache (nor replaces it).
        assert_eq!(host_value("ratings", &cache).unwrap(), "ratings");
        assert_eq!(cache.get().map(|(a, _)| &**a), Some("reviews:9080"));
        assert!(host_value("bad\nhost", &cache).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-app").unwrap(), "kept");
    }
}

#[cfg(test)]
mod future_sizes {
    use super::*;

    /// The request future is moved (memcpy'd) several times per request: each
    /// `match timeout { None => f.await, Some(t) => timeout(t, f).await }` layer used to
    /// double it (13 KB in a debug build; `idle::Bounded` holds `f` once).
    #[test]
    fn request_future_stays_small() {
        let node = NodeIdentity::new("a-0", "default", "127.0.0.1".parse().unwrap(), "a");
        let out = Outbound::new(SnapshotCell::new(), CertStore::new(), node);
        let req = Request::get("http://x/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let f = out.request(req);
        let size = std::mem::size_of_val(&f);
        assert!(size < 8 * 1024, "Outbound::request future is {size} bytes");
    }
}
