//! Upstream connections: TCP (+ Istio mTLS) connect, and the per-host pools.
//!
//! One [`HostPool`] per (cluster, endpoint address, TLS mode). HTTP/1.1 connections are
//! checked out of a bounded idle list and checked back in when the response body ends; HTTP/2
//! shares one multiplexed connection per host, replaced when it closes.
//!
//! The cluster's [`ConnectionPool`] settings apply as in Envoy: a connection carries at most
//! `max_requests_per_connection` requests (HTTP/1.1: closed after the last response; HTTP/2:
//! no new streams, closed when its streams end), a connection without requests for
//! `idle_timeout` is closed by its own task, and `tcp_keepalive` is set on every socket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::cluster::{ConnectionPool, TcpKeepalive, UpstreamTls};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::telemetry::LabelBase;

/// Boxed error type of request and response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body every pooled connection carries.
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per host.
const MAX_IDLE_PER_HOST: usize = 128;

/// The protocol spoken to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Proto {
    Http1,
    Http2,
}

/// What TLS to originate towards a host.
#[derive(Clone, Debug)]
pub(crate) struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub tls: UpstreamTls,
}

/// Why a connection could not be made. Every variant is Envoy's `UF`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Connect (TCP + TLS) took longer than the cluster's connect timeout.
    #[error("connect to {addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The TLS configuration could not be built.
    #[error("TLS configuration for {addr}: {source}")]
    TlsConfig {
        addr: SocketAddr,
        #[source]
        source: crate::tls::TlsError,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
        verify_failed: bool,
    },
    /// The peer's identity is not one the cluster accepts.
    #[error(
        "peer {addr} presented {presented:?}, which matches none of the cluster's subject alt names"
    )]
    PeerRejected {
        addr: SocketAddr,
        presented: Vec<String>,
    },
    /// The HTTP handshake (h2 preface / settings) failed.
    #[error("HTTP handshake with {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl ConnectError {
    /// Envoy's `StreamResetReason` for the failed connect, in its access-log spelling:
    /// `connection_timeout`, else `remote_connection_failure`.
    pub(crate) fn reset_reason(&self) -> &'static str {
        match self {
            ConnectError::Timeout { .. } => "connection_timeout",
            _ => "remote_connection_failure",
        }
    }

    /// Envoy's transport failure reason for the local reply body, if it gives one.
    pub(crate) fn transport_failure_reason(&self) -> Option<String> {
        match self {
            ConnectError::Tls {
                verify_failed: true, ..
            }
            | ConnectError::PeerRejected { .. } => Some(
                "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end"
                    .to_owned(),
            ),
            ConnectError::Tls { source, .. } => {
                Some(format!("TLS_error:|{source}:TLS_error_end"))
            }
            ConnectError::TlsConfig { source, .. } => {
                Some(format!("TLS_error:|{source}:TLS_error_end"))
            }
            _ => None,
        }
    }
}

/// A connection's byte stream: plain TCP or TLS over TCP.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    /// The local address of the connection (`%UPSTREAM_LOCAL_ADDRESS%`).
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Io::Plain(t) => t.local_addr().ok(),
            Io::Tls(t) => t.get_ref().0.local_addr().ok(),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Turns on `SO_KEEPALIVE` with the given parameters (unset ones keep the system's), as
/// Envoy does for `upstream_connection_options.tcp_keepalive`.
fn set_keepalive(tcp: &TcpStream, k: &TcpKeepalive) -> io::Result<()> {
    let mut params = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        params = params.with_time(t);
    }
    if let Some(i) = k.interval {
        params = params.with_interval(i);
    }
    if let Some(n) = k.probes {
        params = params.with_retries(n);
    }
    socket2::SockRef::from(tcp).set_tcp_keepalive(&params)
}

/// Opens TCP (and TLS when `tls` is set) to `addr` within `timeout`, with `keepalive` on the
/// socket. Returns the stream and the peer's principal (its SPIFFE ID, or first URI SAN) for
/// mTLS connections.
pub(crate) async fn connect(
    addr: SocketAddr,
    tls: Option<&TlsTarget>,
    timeout: Duration,
    keepalive: Option<&TcpKeepalive>,
) -> Result<(Io, Option<Arc<str>>), ConnectError> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        let _ = tcp.set_nodelay(true);
        if let Some(k) = keepalive
            && let Err(e) = set_keepalive(&tcp, k)
        {
            tracing::debug!(error = %e, upstream = %addr, "cannot set TCP keepalive");
        }
        let Some(t) = tls else {
            return Ok((Io::Plain(tcp), None));
        };
        let connector = tokio_rustls::TlsConnector::from(t.config.clone());
        let stream = connector
            .connect(t.server_name.clone(), tcp)
            .await
            .map_err(|source| {
                let verify_failed = source
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| {
                        matches!(
                            e,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                ConnectError::Tls {
                    addr,
                    source,
                    verify_failed,
                }
            })?;
        let peer = match stream.get_ref().1.peer_certificates() {
            Some(chain) if !chain.is_empty() => {
                let id = crate::tls::peer_identity(chain);
                let sans: Vec<&str> = id.uri_sans.iter().map(String::as_str).collect();
                if !t.tls.accepts_peer(&sans) {
                    return Err(ConnectError::PeerRejected {
                        addr,
                        presented: id.uri_sans.to_vec(),
                    });
                }
                match id.spiffe_id {
                    Some(s) => Some(Arc::from(s.to_string())),
                    None => id.uri_sans.first().map(|s| Arc::from(s.as_str())),
                }
            }
            _ => {
                if !t.tls.accepts_peer(&[]) {
                    return Err(ConnectError::PeerRejected {
                        addr,
                        presented: Vec::new(),
                    });
                }
                None
            }
        };
        Ok((Io::Tls(Box::new(stream)), peer))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}

/// `ConnUse::active` of a connection its idle timer has closed.
const CLOSED: u32 = u32::MAX;

/// Milliseconds on a process-wide monotonic clock.
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// How one connection is used: requests in flight (or [`CLOSED`]), requests carried so far,
/// and since when it has had none. Shared by the pool's handle and the connection's task.
#[derive(Debug)]
struct ConnUse {
    active: AtomicU32,
    requests: AtomicU32,
    idle_since_ms: AtomicU64,
    /// `max_requests_per_connection` (`u32::MAX`: no limit).
    max_requests: u32,
}

impl ConnUse {
    fn new(pool: &ConnectionPool) -> Arc<Self> {
        Arc::new(ConnUse {
            active: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
            max_requests: pool.max_requests_per_connection.unwrap_or(u32::MAX),
        })
    }

    /// Starts a request on the connection: `false` when its idle timer closed it or it has
    /// carried `max_requests_per_connection` already.
    fn checkout(&self) -> bool {
        if self
            .requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_requests).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != CLOSED).then_some(n + 1)
            })
            .is_ok()
    }

    /// A request on the connection ended.
    fn end(&self) {
        self.idle_since_ms.store(now_ms(), Ordering::Release);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether the connection may carry another request after the current ones.
    fn reusable(&self) -> bool {
        self.requests.load(Ordering::Acquire) < self.max_requests
    }

    /// Resolves once the connection has had no request for `timeout` (it is then marked
    /// [`CLOSED`], so no request can take it); never without a timeout.
    async fn idle_timeout(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let wait = if self.active.load(Ordering::Acquire) == 0 {
                let idle = now_ms().saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
                timeout.saturating_sub(Duration::from_millis(idle))
            } else {
                timeout
            };
            if wait.is_zero()
                && self
                    .active
                    .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return;
            }
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Runs a connection until it ends or its idle timeout closes it.
async fn drive<F>(conn: F, usage: Arc<ConnUse>, idle_timeout: Option<Duration>, proto: &str)
where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
{
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(error = %e, proto, "upstream connection ended with an error");
        },
        () = usage.idle_timeout(idle_timeout) => {
            tracing::debug!(proto, "upstream connection closed after its idle timeout");
        }
    }
}

/// Who is on the other end of an upstream connection, and this end's address.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnEnds {
    /// The peer's principal (mTLS).
    pub peer: Option<Arc<str>>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    pub local: Option<SocketAddr>,
}

/// An HTTP/1.1 connection and who is on the other end.
pub(crate) struct H1Conn {
    sender: http1::SendRequest<ReqBody>,
    ends: ConnEnds,
    usage: Arc<ConnUse>,
}

#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<ReqBody>,
    ends: ConnEnds,
    usage: Arc<ConnUse>,
}

/// Why a request got no response headers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made (`UF`).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection was reset or closed before response headers (`UC`).
    #[error("upstream reset before response headers: {0}")]
    Reset(#[source] hyper::Error),
    /// The request would have waited for a connection with the cluster's
    /// `max_pending_requests` already waiting (`UO`).
    #[error("circuit breaker open: max_pending_requests")]
    Overflow,
}

/// A cluster's connection circuit breakers and the counters they watch (one per cluster,
/// shared by its host pools).
#[derive(Debug, Default)]
pub(crate) struct ConnLimits {
    /// Connections open to the cluster's hosts.
    pub cx_active: AtomicU32,
    /// `max_connections`.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub rq_pending: AtomicU32,
    /// `max_pending_requests`.
    pub max_pending: u32,
}

impl ConnLimits {
    /// Limits for `breakers`.
    pub(crate) fn new(breakers: &mesh_core::outlier::CircuitBreakers) -> Self {
        ConnLimits {
            cx_active: AtomicU32::new(0),
            max_connections: breakers.max_connections,
            rq_pending: AtomicU32::new(0),
            max_pending: breakers.max_pending_requests,
        }
    }
}

fn try_take(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// One request waiting for a connection (`max_pending_requests`).
struct Pending<'a>(&'a AtomicU32);

impl<'a> Pending<'a> {
    fn take(limits: &'a ConnLimits) -> Result<Self, SendError> {
        if try_take(&limits.rq_pending, limits.max_pending) {
            Ok(Pending(&limits.rq_pending))
        } else {
            Err(SendError::Overflow)
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open connection, counted against the host pool and the cluster until dropped (it
/// lives in the connection's task).
struct ConnSlot {
    pool: Arc<HostPool>,
    limits: Arc<ConnLimits>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Ordering::AcqRel);
        self.limits.cx_active.fetch_sub(1, Ordering::AcqRel);
        self.pool.wake_waiters();
    }
}

/// One request's use of a connection, ended when dropped; an HTTP/1.1 connection goes back to
/// its pool once its response has been read ([`Checkin::release`]).
pub(crate) struct Checkin {
    pool: Arc<HostPool>,
    usage: Arc<ConnUse>,
    conn: Option<H1Conn>,
}

impl Checkin {
    /// The response has been read: an HTTP/1.1 connection can carry the next request, unless
    /// it has carried `max_requests_per_connection` (then it closes).
    pub(crate) fn release(mut self) {
        let conn = self.conn.take();
        let pool = self.pool.clone();
        drop(self);
        if let Some(c) = conn.filter(|c| c.usage.reusable()) {
            pool.put_idle(c);
        }
    }
}

impl Drop for Checkin {
    fn drop(&mut self) {
        self.usage.end();
    }
}

/// Connections to one upstream host, and the telemetry labels of requests sent to it.
pub(crate) struct HostPool {
    pub addr: SocketAddr,
    pub workload: Option<mesh_core::endpoint::WorkloadMetadata>,
    pub labels: Arc<LabelBase>,
    idle: Mutex<Vec<H1Conn>>,
    h2: Mutex<Option<H2Conn>>,
    h2_connecting: tokio::sync::Mutex<()>,
    /// Connections open to this host.
    open: AtomicU32,
    /// Requests waiting for a connection to this host, and their wake-up.
    waiting: AtomicU32,
    released: tokio::sync::Notify,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds (or returns the cached) TLS target for a new connection; called only when a
/// connection is opened.
pub(crate) type TlsSource<'a> =
    &'a (dyn Fn() -> Result<Arc<TlsTarget>, ConnectError> + Send + Sync);

/// Everything a host needs to open a connection.
pub(crate) struct ConnectParams<'a> {
    pub tls: Option<TlsSource<'a>>,
    pub timeout: Duration,
    /// The cluster's connection circuit breakers.
    pub limits: &'a Arc<ConnLimits>,
    /// The cluster's connection reuse, idle timeout and keepalive.
    pub pool: &'a ConnectionPool,
}

impl ConnectParams<'_> {
    async fn open(&self, addr: SocketAddr) -> Result<(Io, Option<Arc<str>>), ConnectError> {
        let target = self.tls.map(|f| f()).transpose()?;
        connect(
            addr,
            target.as_deref(),
            self.timeout,
            self.pool.tcp_keepalive.as_ref(),
        )
        .await
    }
}

impl HostPool {
    pub(crate) fn new(
        addr: SocketAddr,
        workload: Option<mesh_core::endpoint::WorkloadMetadata>,
        labels: Arc<LabelBase>,
    ) -> Self {
        HostPool {
            addr,
            workload,
            labels,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            open: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            released: tokio::sync::Notify::new(),
        }
    }

    /// Wakes requests waiting for a connection (only when there are any: no cost otherwise).
    fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.released.notify_waiters();
        }
    }

    /// A slot for a new connection: under the cluster's `max_connections`, or the pool's
    /// first connection (Envoy always lets a pool without connections open one, so requests
    /// never queue on a host with no way to be served).
    fn connection_slot(self: &Arc<Self>, limits: &Arc<ConnLimits>) -> Option<ConnSlot> {
        let first = self.open.load(Ordering::Acquire) == 0;
        if try_take(&limits.cx_active, limits.max_connections) {
            // counted below
        } else if first {
            limits.cx_active.fetch_add(1, Ordering::AcqRel);
        } else {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(ConnSlot {
            pool: self.clone(),
            limits: limits.clone(),
        })
    }

    /// An idle HTTP/1.1 connection, checked out for one request.
    fn take_idle(&self) -> Option<H1Conn> {
        let mut idle = lock(&self.idle);
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && c.usage.checkout() {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, conn: H1Conn) {
        if conn.sender.is_closed() {
            return;
        }
        {
            let mut idle = lock(&self.idle);
            if idle.len() < MAX_IDLE_PER_HOST {
                idle.push(conn);
            }
        }
        self.wake_waiters();
    }

    /// Number of idle HTTP/1.1 connections (for tests and debugging).
    #[allow(dead_code)]
    pub(crate) fn idle_len(&self) -> usize {
        lock(&self.idle).len()
    }

    async fn connect_h1(
        &self,
        p: &ConnectParams<'_>,
        slot: ConnSlot,
    ) -> Result<H1Conn, ConnectError> {
        let (io, peer) = p.open(self.addr).await?;
        let ends = ConnEnds {
            peer,
            local: io.local_addr(),
        };
        let cx = self.labels.connection_opened();
        let (sender, conn) =
            http1::handshake(TokioIo::new(io))
                .await
                .map_err(|source| ConnectError::Http {
                    addr: self.addr,
                    source,
                })?;
        let usage = ConnUse::new(p.pool);
        // Checked out for the request that opened it.
        usage.checkout();
        let (task_usage, idle_timeout) = (usage.clone(), p.pool.idle_timeout);
        tokio::spawn(async move {
            let _cx = cx;
            let _slot = slot;
            drive(conn, task_usage, idle_timeout, "HTTP/1.1").await;
        });
        Ok(H1Conn {
            sender,
            ends,
            usage,
        })
    }

    /// The host's HTTP/2 connection, when one is open, checked out for one stream. A
    /// connection that may carry no more streams (idle-closed, or at
    /// `max_requests_per_connection`) is forgotten: it closes when its streams end.
    fn h2_ready(&self) -> Option<H2Conn> {
        let mut h2 = lock(&self.h2);
        let c = h2.as_ref().filter(|c| !c.sender.is_closed())?;
        if c.usage.checkout() {
            return Some(c.clone());
        }
        *h2 = None;
        None
    }

    async fn h2_conn(self: &Arc<Self>, p: &ConnectParams<'_>) -> Result<(H2Conn, bool), SendError> {
        if let Some(c) = self.h2_ready() {
            return Ok((c, true));
        }
        // No connection ready: the request is pending until one is.
        let _pending = Pending::take(p.limits)?;
        let _gate = self.h2_connecting.lock().await;
        if let Some(c) = self.h2_ready() {
            return Ok((c, true));
        }
        // One multiplexed connection per host: always the pool's only one.
        let slot = ConnSlot {
            pool: self.clone(),
            limits: p.limits.clone(),
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        p.limits.cx_active.fetch_add(1, Ordering::AcqRel);
        let (io, peer) = p.open(self.addr).await?;
        let ends = ConnEnds {
            peer,
            local: io.local_addr(),
        };
        let cx = self.labels.connection_opened();
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Http {
                addr: self.addr,
                source,
            })?;
        let usage = ConnUse::new(p.pool);
        // Checked out for the request that opened it.
        usage.checkout();
        let (task_usage, idle_timeout) = (usage.clone(), p.pool.idle_timeout);
        tokio::spawn(async move {
            let _cx = cx;
            let _slot = slot;
            drive(conn, task_usage, idle_timeout, "HTTP/2").await;
        });
        let c = H2Conn {
            sender,
            ends,
            usage,
        };
        if c.usage.reusable() {
            *lock(&self.h2) = Some(c.clone());
        }
        Ok((c, false))
    }

    /// A new HTTP/1.1 connection for a request that found none idle: the request is pending
    /// (`max_pending_requests`, else `UO`) until a connection slot frees under
    /// `max_connections` or a connection is checked back in.
    /// Returns the connection and whether it was pooled.
    async fn new_h1(self: &Arc<Self>, p: &ConnectParams<'_>) -> Result<(H1Conn, bool), SendError> {
        let _pending = Pending::take(p.limits)?;
        loop {
            if let Some(slot) = self.connection_slot(p.limits) {
                return Ok((self.connect_h1(p, slot).await?, false));
            }
            // Register before looking again, so a release in between is not missed.
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let idle = self.take_idle();
            if idle.is_none() && self.open.load(Ordering::Acquire) > 0 {
                released.await;
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if let Some(c) = idle {
                return Ok((c, true));
            }
        }
    }

    /// Sends `req` over a pooled (or new) connection. For HTTP/1.1 the returned [`Checkin`]
    /// must be released when the response body has ended.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: http::Request<ReqBody>,
        proto: Proto,
        p: &ConnectParams<'_>,
    ) -> Result<(http::Response<Incoming>, ConnEnds, Option<Checkin>), SendError> {
        match proto {
            Proto::Http1 => loop {
                let (conn, reused) = match self.take_idle() {
                    Some(c) => (c, true),
                    // Connecting is the cold path: boxed, so the per-request future stays
                    // small (it is moved several times per request).
                    None => Box::pin(self.new_h1(p)).await?,
                };
                // The request's use of the connection, ended however this attempt ends.
                let mut checkin = Checkin {
                    pool: self.clone(),
                    usage: conn.usage.clone(),
                    conn: Some(conn),
                };
                let Some(conn) = checkin.conn.as_mut() else {
                    unreachable!("the connection was just checked out")
                };
                if reused && conn.sender.ready().await.is_err() {
                    continue;
                }
                match conn.sender.try_send_request(req).await {
                    Ok(resp) => {
                        let ends = conn.ends.clone();
                        return Ok((resp, ends, Some(checkin)));
                    }
                    Err(mut e) => match e.take_message() {
                        // A pooled connection closed under us before the request went out:
                        // send it on another one.
                        Some(r) if reused => req = r,
                        _ => return Err(SendError::Reset(e.into_error())),
                    },
                }
            },
            Proto::Http2 => {
                let mut retried = false;
                loop {
                    let (mut conn, reused) = match self.h2_ready() {
                        Some(c) => (c, true),
                        None => Box::pin(self.h2_conn(p)).await?,
                    };
                    // The stream's use of the connection, ended with the response body.
                    let stream = Checkin {
                        pool: self.clone(),
                        usage: conn.usage.clone(),
                        conn: None,
                    };
                    let ready = conn.sender.ready().await;
                    let result = match ready {
                        Ok(()) => conn.sender.try_send_request(req).await,
                        Err(e) => {
                            if reused && !retried {
                                retried = true;
                                self.forget_h2();
                                continue;
                            }
                            return Err(SendError::Reset(e));
                        }
                    };
                    match result {
                        Ok(resp) => return Ok((resp, conn.ends, Some(stream))),
                        Err(mut e) => match e.take_message() {
                            Some(r) if reused && !retried => {
                                retried = true;
                                self.forget_h2();
                                req = r;
                            }
                            _ => return Err(SendError::Reset(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    fn forget_h2(&self) {
        *lock(&self.h2) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client socket of a plaintext connection to a local listener, opened with
    /// `keepalive`.
    async fn client_socket(
        keepalive: Option<&TcpKeepalive>,
    ) -> (TcpStream, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (io, _) = connect(addr, None, Duration::from_secs(5), keepalive)
            .await
            .unwrap();
        match io {
            Io::Plain(tcp) => (tcp, listener),
            Io::Tls(_) => unreachable!("no TLS asked for"),
        }
    }

    #[tokio::test]
    async fn tcp_keepalive_is_set_on_upstream_sockets() {
        let (tcp, _l) = client_socket(None).await;
        assert!(!socket2::SockRef::from(&tcp).keepalive().unwrap());

        // Istio's DestinationRule `tcp.tcpKeepalive {time: 7s, interval: 3s, probes: 4}`.
        let k = TcpKeepalive {
            probes: Some(4),
            time: Some(Duration::from_secs(7)),
            interval: Some(Duration::from_secs(3)),
        };
        let (tcp, _l) = client_socket(Some(&k)).await;
        let s = socket2::SockRef::from(&tcp);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);

        // Only SO_KEEPALIVE: the system's parameters stay.
        let (plain, _l) = client_socket(None).await;
        let system_time = socket2::SockRef::from(&plain).tcp_keepalive_time().unwrap();
        let (tcp, _l) = client_socket(Some(&TcpKeepalive::default())).await;
        let s = socket2::SockRef::from(&tcp);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), system_time);
    }
}
