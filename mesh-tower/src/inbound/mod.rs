//! Inbound: TLS detection, mTLS termination, peer identity, HTTP/1.1 and h2 — the engine
//! behind `mesh::serve(app)`, doing what Envoy's `virtualInbound` listener (15006) does for a
//! sidecar.
//!
//! Per accepted connection:
//!
//! 1. **Detect TLS** on the first bytes without consuming them, like Envoy's `tls_inspector`:
//!    a TLS handshake record starts `0x16 0x03`. A client that sends nothing within
//!    [`DETECT_TIMEOUT`] is treated as plaintext (Istio's
//!    `continue_on_listener_filters_timeout`).
//! 2. **Apply the PeerAuthentication mode** of the port ([`InboundConfig::mode`], else the
//!    snapshot's inbound policy, else PERMISSIVE): STRICT closes plaintext connections,
//!    DISABLE closes TLS connections (no filter chain matches; counted in
//!    `envoy_listener_no_filter_chain_match`).
//! 3. **Terminate TLS** with [`tls::server_config`]: client certificate required in STRICT,
//!    requested but optional in PERMISSIVE. The verified peer's [`PeerIdentity`] goes into
//!    every request's extensions; plaintext requests carry none. On a TCP port the client may
//!    negotiate `istio-peer-exchange`; then Istio's TCP metadata exchange runs first
//!    ([`crate::peer_exchange`]) and the client's frame names the `source_*` of `istio_tcp_*`.
//! 4. **Serve HTTP/1.1 and h2** (ALPN `h2`/`istio-h2` and prior-knowledge h2c) with hyper.
//! 5. **Record** `istio_requests_total` & co. with `reporter="destination"` when each response
//!    ends; on a port istiod renders as TCP proxy chains only, `istio_tcp_*` per connection
//!    instead (`tcp_stats`), as the sidecar's tcp_proxy chain reports it.
//!
//! When `shutdown` resolves the listener stops accepting, idle connections close, and requests
//! in flight finish (HTTP/1.1 connections close after their response, h2 connections get a
//! GOAWAY); [`serve`] returns once every connection is done.

pub mod access_log;
pub mod authz;
pub mod codec;
mod idle;
pub mod jwt;
pub use idle::DEFAULT_IDLE_TIMEOUT;
mod service;
mod stats;
pub(crate) mod tcp_stats;
pub mod tracing_headers;
pub mod xfcc;

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_core::authz::jwt::JwtAuthn;
use mesh_core::cluster::SanMatcher;
use mesh_core::identity::{NodeIdentity, PeerIdentity};
use mesh_core::listener::{AuthzLayer, InboundProtocol, InboundTlsMode, PortAuthz};
use mesh_core::readiness::Readiness;
use mesh_core::telemetry::{DestinationService, UNKNOWN, WorkloadLabels};
use mesh_core::{CertStore, SnapshotCell};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::peer_exchange::{self, Replay};
use crate::tls;
use access_log::ConnectionInfo;
use mesh_core::metadata_exchange::{ALPN_PEER_EXCHANGE, PeerExchange};
use mesh_core::peer_metadata::PeerMetadataHeaders;
pub use service::{InboundBody, InboundData, MeteredBody, RequestBody};
use service::{InboundService, LocalPeerHeaders};
use stats::{ConnectionLabels, ListenerStats};
pub use stats::{INBOUND_LISTENER_ADDRESS, active_connections};

/// How long a connection may stay silent before TLS detection gives up and treats it as
/// plaintext (Envoy's `listener_filters_timeout`, 15 s by default).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a TLS handshake may take before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The request headers' size limit: Envoy's `max_request_headers_kb` default (60 KiB), which
/// istiod leaves unset on the inbound HTTP connection manager. Larger requests are answered
/// 431 and never reach the application.
pub const MAX_REQUEST_HEADERS_BYTES: usize = 60 * 1024;

/// The request headers' count limit: Envoy's `common_http_protocol_options.max_headers_count`
/// default (100), also left unset by istiod. More headers are answered 431.
pub const MAX_HEADERS_COUNT: usize = 100;

/// Configuration of one inbound listener.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// The application port (the destination port whose PeerAuthentication mode applies and
    /// whose `inbound|<port>||` cluster names the destination service in metrics).
    pub port: u16,
    /// Overrides the mTLS mode; `None` reads `snapshot.inbound.mode_for(port)` per connection
    /// (PERMISSIVE while istiod has sent no inbound policy).
    pub mode: Option<InboundTlsMode>,
    /// This workload (the `destination_*` labels).
    pub node: NodeIdentity,
    /// HTTP/1.1 header read timeout (Envoy's `request_headers_timeout`); `None`: none, as
    /// in Envoy by default.
    pub header_read_timeout: Option<Duration>,
    /// Closes a connection that has had no active request this long (Envoy's
    /// `common_http_protocol_options.idle_timeout`, 1 hour by default:
    /// [`DEFAULT_IDLE_TIMEOUT`]); HTTP/2 connections are drained with GOAWAY first. `None`:
    /// never.
    pub idle_timeout: Option<Duration>,
    /// The pod's readiness: once it is draining, HTTP/1.1 responses carry
    /// `connection: close` (as Envoy's HTTP connection manager does during a drain), so
    /// callers move their keep-alive connections off this workload before the listener stops,
    /// instead of racing a request against the close of an idle connection.
    pub drain: Option<Readiness>,
    /// The client CUSTOM AuthorizationPolicies call (ext_authz); `None` answers them as an
    /// unreachable provider would (`status_on_error`, or allowed with `failure_mode_allow`).
    pub ext_authz: Option<Arc<dyn mesh_core::authz::ext_authz::ExternalAuthorizer>>,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains gracefully.
///
/// `app` is any Tower service over `http::Request<`[`RequestBody`]`>`: an axum `Router`,
/// a tonic server, `tower::service_fn`. It is cloned per request. The peer's
/// [`PeerIdentity`] is in `req.extensions()` for mTLS requests.
///
/// Returns when every connection has finished after `shutdown`; accept errors (for example
/// running out of file descriptors) are logged and retried, never returned.
pub async fn serve<S, B>(
    listener: TcpListener,
    app: S,
    cell: SnapshotCell,
    certs: CertStore,
    config: InboundConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let shared = Arc::new(Shared::new(cell, certs, config)?);
    // Dropped senders tell `serve` that every connection task has ended.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let (drain_tx, drain_rx) = watch::channel(false);
    let local = listener.local_addr().ok();
    tracing::debug!(
        ?local,
        port = shared.config.port,
        "inbound listener serving"
    );

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let app = app.clone();
                    let shared = Arc::clone(&shared);
                    let alive = alive_tx.clone();
                    let drain = drain_rx.clone();
                    tokio::spawn(async move {
                        handle_connection(tcp, remote, app, shared, drain).await;
                        drop(alive);
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "inbound accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }

    drop(listener);
    tracing::debug!(?local, "inbound listener draining");
    let _ = drain_tx.send(true);
    drop(alive_tx);
    // `recv` returns `None` once every connection task dropped its sender.
    let _ = alive_rx.recv().await;
    tracing::debug!(?local, "inbound listener drained");
    Ok(())
}

/// Per-listener state shared by its connections.
#[derive(Debug)]
struct Shared {
    cell: SnapshotCell,
    certs: CertStore,
    config: InboundConfig,
    strict_tls: Arc<rustls::ServerConfig>,
    permissive_tls: Arc<rustls::ServerConfig>,
    /// [`strict_tls`](Self::strict_tls) and [`permissive_tls`](Self::permissive_tls) for a TCP
    /// port: `istio-peer-exchange` negotiable.
    strict_tcp_tls: Arc<rustls::ServerConfig>,
    permissive_tcp_tls: Arc<rustls::ServerConfig>,
    /// This workload's TCP metadata exchange frame.
    exchange_frame: Vec<u8>,
    destination_tls: Arc<WorkloadLabels>,
    destination_plain: Arc<WorkloadLabels>,
    builder: auto::Builder<TokioExecutor>,
    inbound_cluster: Arc<str>,
    local_headers: Option<Arc<LocalPeerHeaders>>,
    stats: Arc<ListenerStats>,
    jwks: Arc<jwt::JwksCache>,
}

impl Shared {
    fn new(cell: SnapshotCell, certs: CertStore, config: InboundConfig) -> std::io::Result<Self> {
        let tls_err = |e: tls::TlsError| std::io::Error::other(e);
        let destination_tls = WorkloadLabels::from_node(&config.node);
        let destination_plain = WorkloadLabels {
            principal: UNKNOWN.to_owned(),
            ..destination_tls.clone()
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Envoy's header limits. hyper refuses (431) a request head with more header lines than
        // the count, or larger than its read buffer; the buffer and h2's header list are sized
        // twice the byte limit so that requests just over it reach `service::header_limits`,
        // which measures as Envoy does and answers with Envoy's 431 reply.
        builder
            .http1()
            .timer(TokioTimer::new())
            .max_headers(MAX_HEADERS_COUNT)
            .max_buf_size(2 * MAX_REQUEST_HEADERS_BYTES)
            // hyper's default (30 s) would also close keep-alive connections idle for 30 s:
            // idle connections are the idle timeout's, as in Envoy.
            .header_read_timeout(config.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size((2 * MAX_REQUEST_HEADERS_BYTES) as u32);
        let encoded = PeerMetadataHeaders::for_node(&config.node);
        let local_headers = match (
            http::HeaderValue::from_str(&encoded.id),
            http::HeaderValue::from_str(&encoded.metadata),
        ) {
            (Ok(id), Ok(metadata)) => Some(Arc::new(LocalPeerHeaders { id, metadata })),
            _ => {
                tracing::warn!(node_id = %encoded.id, "node id is not a valid header value; peer metadata is not sent");
                None
            }
        };
        let peer_sans = peer_san_source(cell.clone(), certs.clone(), &config);
        let strict_tls = tls::server_config_with_peer_sans(&certs, true, Some(peer_sans.clone()))
            .map_err(tls_err)?;
        let permissive_tls =
            tls::server_config_with_peer_sans(&certs, false, Some(peer_sans)).map_err(tls_err)?;
        Ok(Shared {
            jwks: Arc::new(jwt::JwksCache::new()),
            local_headers,
            stats: Arc::new(ListenerStats::new(config.port)),
            strict_tcp_tls: tls::with_peer_exchange(&strict_tls),
            permissive_tcp_tls: tls::with_peer_exchange(&permissive_tls),
            strict_tls,
            permissive_tls,
            exchange_frame: mesh_core::metadata_exchange::frame_for_node(&config.node),
            destination_tls: Arc::new(destination_tls),
            destination_plain: Arc::new(destination_plain),
            builder,
            inbound_cluster: Arc::from(format!("inbound|{}||", config.port)),
            cell,
            certs,
            config,
        })
    }

    /// The port's mTLS mode, authorization and JWT filter, read once per connection.
    fn policy(&self) -> (InboundTlsMode, Option<PortAuthz>, Option<Arc<JwtAuthn>>) {
        let snapshot = self.cell.load_guard();
        let policy = snapshot.inbound.as_ref();
        let mode = self.config.mode.unwrap_or_else(|| {
            policy
                .map(|p| p.mode_for(self.config.port))
                .unwrap_or_default()
        });
        let authz = policy.and_then(|p| p.authz_for(self.config.port).cloned());
        let jwt = policy.and_then(|p| p.jwt_for(self.config.port).cloned());
        (mode, authz, jwt)
    }

    /// Whether istiod's chains proxy the port as TCP (then the connection reports
    /// `istio_tcp_*` instead of request metrics), read once per connection.
    fn tcp_port(&self) -> bool {
        let snapshot = self.cell.load_guard();
        snapshot
            .inbound
            .as_ref()
            .is_some_and(|p| p.protocol_for(self.config.port) == InboundProtocol::Tcp)
    }

    /// The connection's authorization facts, when the port has a policy.
    fn connection_authz(
        &self,
        authz: Option<&PortAuthz>,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        sni: Option<&str>,
        peer: Option<&PeerIdentity>,
    ) -> Option<Arc<authz::ConnectionAuthz>> {
        let authz = authz?;
        Some(Arc::new(authz::ConnectionAuthz {
            chain: Arc::clone(&authz.chain),
            source: remote,
            destination: local.map(|l| SocketAddr::new(l.ip(), self.config.port)),
            sni: sni.map(str::to_owned),
            peer_principal: peer.and_then(|p| p.uri_sans.first().cloned()),
            peer_authenticated: peer.is_some(),
            local_principal: Some(self.config.node.spiffe_id().to_string()),
            ext_authz: self.config.ext_authz.clone(),
        }))
    }

    /// `destination_service*` from the `inbound|<port>||` cluster's Istio metadata.
    fn destination_service(&self) -> DestinationService {
        let snapshot = self.cell.load_guard();
        snapshot
            .clusters
            .get(&*self.inbound_cluster)
            .and_then(|cluster| cluster.service.as_ref())
            .map(|service| DestinationService {
                host: service.host.clone(),
                name: service.name.clone(),
                namespace: service.namespace.clone(),
            })
            .or_else(|| stats::inbound_service(&snapshot, &self.config.node, self.config.port))
            .unwrap_or_default()
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detected {
    Tls,
    Plaintext,
    Closed,
}

/// Peeks at the first bytes without consuming them.
async fn detect(tcp: &TcpStream) -> Detected {
    let mut buf = [0u8; 3];
    match tokio::time::timeout(DETECT_TIMEOUT, tcp.peek(&mut buf)).await {
        Err(_) => Detected::Plaintext,
        Ok(Err(_)) | Ok(Ok(0)) => Detected::Closed,
        // A TLS record of type handshake (22), protocol major version 3. HTTP/1 methods and
        // the h2 preface start with an ASCII letter.
        Ok(Ok(n)) if buf[0] == 0x16 && (n < 2 || buf[1] == 0x03) => Detected::Tls,
        Ok(Ok(_)) => Detected::Plaintext,
    }
}

async fn handle_connection<S, B>(
    tcp: TcpStream,
    remote: SocketAddr,
    app: S,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
) where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let _ = tcp.set_nodelay(true);
    let mut active = shared.stats.connection_opened();
    let local = tcp.local_addr().ok();
    let detected = tokio::select! {
        detected = detect(&tcp) => detected,
        () = drained(&mut drain) => return,
    };
    let (mode, port_authz, jwt) = shared.policy();
    let tcp_port = shared.tcp_port();
    match (detected, mode) {
        (Detected::Closed, _) => {}
        (Detected::Plaintext, InboundTlsMode::Strict) => {
            no_filter_chain(remote, "plaintext connection refused: mTLS mode is STRICT");
        }
        (Detected::Tls, InboundTlsMode::Disable) => {
            no_filter_chain(remote, "TLS connection refused: mTLS mode is DISABLE");
        }
        (Detected::Plaintext, _) => {
            let conn_authz =
                shared.connection_authz(port_authz.as_ref(), local, remote, None, None);
            let Some(http_authz) = admit(port_authz.as_ref(), conn_authz) else {
                return;
            };
            let labels = ConnectionLabels::new(
                false,
                None,
                &shared.destination_tls,
                &shared.destination_plain,
                Arc::new(shared.destination_service()),
            );
            let info = connection_info(&shared, local, remote, None, None);
            if !tcp_port {
                active.serving_http();
            }
            serve_http(
                tcp,
                app,
                None,
                (http_authz, false, None, jwt),
                (labels, tcp_port),
                info,
                &shared,
                drain,
            )
            .await;
        }
        (Detected::Tls, mode) => {
            let config = match (mode == InboundTlsMode::Strict, tcp_port) {
                (true, false) => &shared.strict_tls,
                (false, false) => &shared.permissive_tls,
                (true, true) => &shared.strict_tcp_tls,
                (false, true) => &shared.permissive_tcp_tls,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => accepted,
                () = drained(&mut drain) => return,
            };
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    handshake_failed(remote, &error);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "inbound TLS handshake timed out");
                    return;
                }
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(tls::peer_identity);
            let labels = ConnectionLabels::new(
                true,
                peer.as_ref(),
                &shared.destination_tls,
                &shared.destination_plain,
                Arc::new(shared.destination_service()),
            );
            let sni = stream.get_ref().1.server_name().map(str::to_owned);
            let xfcc = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| {
                    let by = shared.certs.current().map(|c| c.identity.to_string());
                    xfcc::client_cert_element(by.as_deref(), leaf.as_ref())
                });
            let conn_authz = shared.connection_authz(
                port_authz.as_ref(),
                local,
                remote,
                sni.as_deref(),
                peer.as_ref(),
            );
            let Some(http_authz) = admit(port_authz.as_ref(), conn_authz) else {
                return;
            };
            let principal = peer.as_ref().and_then(|p| p.uri_sans.first().cloned());
            let info = connection_info(&shared, local, remote, sni, principal);
            if !tcp_port {
                active.serving_http();
            }
            // A TCP port's chain runs Istio's metadata exchange when the client asked for it.
            let exchange = tcp_port
                && stream.get_ref().1.alpn_protocol() == Some(ALPN_PEER_EXCHANGE.as_bytes());
            let (stream, labels) = if exchange {
                // The wait for the client's frame (up to `PEER_EXCHANGE_TIMEOUT`) ends with the
                // drain, as the TLS handshake's does: a client that never sends its frame does
                // not hold the drain up.
                let exchanged = tokio::select! {
                    r = peer_exchange::exchange(stream, &shared.exchange_frame) => r,
                    () = drained(&mut drain) => {
                        tracing::debug!(%remote, "istio-peer-exchange ended by the drain");
                        return;
                    }
                };
                match exchanged {
                    Ok((
                        stream,
                        Some(PeerExchange {
                            metadata: Some(m), ..
                        }),
                    )) => (stream, labels.with_peer(m.workload_labels())),
                    Ok((stream, _)) => (stream, labels),
                    Err(error) => {
                        tracing::debug!(%remote, %error, "istio-peer-exchange failed");
                        return;
                    }
                }
            } else {
                (Replay::new(stream), labels)
            };
            serve_http(
                stream,
                app,
                peer,
                (http_authz, true, xfcc, jwt),
                (labels, tcp_port),
                info,
                &shared,
                drain,
            )
            .await;
        }
    }
}

/// Applies a network (TCP chain) policy to the connection: `None` closes it. `Some` carries
/// the per-request (HTTP) authorization to enforce, if any.
fn admit(
    port_authz: Option<&PortAuthz>,
    conn: Option<Arc<authz::ConnectionAuthz>>,
) -> Option<Option<Arc<authz::ConnectionAuthz>>> {
    match (port_authz.map(|a| a.layer), conn) {
        (Some(AuthzLayer::Network), Some(conn)) => conn.check_connection().then_some(None),
        (_, conn) => Some(conn),
    }
}

/// The peer SAN matchers the inbound verifier applies at handshake time: istiod's
/// `match_subject_alt_names` for the port, else the workload's own trust domain
/// (`spiffe://<trust domain>/`, from the current certificate, else the node's).
fn peer_san_source(
    cell: SnapshotCell,
    certs: CertStore,
    config: &InboundConfig,
) -> tls::PeerSanSource {
    let port = config.port;
    let node_trust_domain = config.node.trust_domain.clone();
    Arc::new(move || {
        let snapshot = cell.load_guard();
        if let Some(sans) = snapshot
            .inbound
            .as_ref()
            .map(|p| p.peer_sans_for(port))
            .filter(|s| !s.is_empty())
        {
            return sans.to_vec();
        }
        let trust_domain = certs
            .current()
            .map(|c| c.identity.trust_domain().to_owned())
            .unwrap_or_else(|| node_trust_domain.clone());
        vec![SanMatcher::Prefix(format!("spiffe://{trust_domain}/"))]
    })
}

fn no_filter_chain(remote: SocketAddr, why: &str) {
    metrics::counter!(
        "envoy_listener_no_filter_chain_match",
        crate::telemetry::stats_tags::LISTENER_ADDRESS => stats::INBOUND_LISTENER_ADDRESS
    )
    .increment(1);
    tracing::debug!(%remote, "{why}");
}

fn handshake_failed(remote: SocketAddr, error: &std::io::Error) {
    let rustls_error = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::NoCertificatesPresented) => {
            tls::count_no_client_cert();
            tracing::warn!(
                %remote,
                "refusing mTLS client: it presented no certificate and the mode is STRICT"
            );
        }
        // Certificate refusals were logged and counted by the verifier.
        Some(rustls::Error::InvalidCertificate(_)) => {}
        _ => tracing::debug!(%remote, %error, "inbound TLS handshake failed"),
    }
}

/// What the HTTP filters of a connection enforce: RBAC, whether TLS carried it, the XFCC
/// element, and the JWT filter.
type HttpFilters = (
    Option<Arc<authz::ConnectionAuthz>>,
    bool,
    Option<http::HeaderValue>,
    Option<Arc<JwtAuthn>>,
);

#[allow(clippy::too_many_arguments)]
async fn serve_http<I, S, B>(
    io: I,
    app: S,
    peer: Option<PeerIdentity>,
    (authz, tls, xfcc, jwt): HttpFilters,
    (labels, tcp_port): (ConnectionLabels, bool),
    info: Option<Arc<ConnectionInfo>>,
    shared: &Shared,
    mut drain: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // A TCP port's connection is metered as the sidecar's tcp_proxy chain meters it; HTTP
    // ports serve the stream as it is.
    let (labels, tcp) = if tcp_port {
        let (labels, tcp_labels) = labels.into_tcp();
        (labels, Some(tcp_stats::TcpConnection::open(&tcp_labels)))
    } else {
        (labels, None)
    };
    let activity = Arc::new(idle::ConnectionActivity::default());
    let service = InboundService::new(
        app,
        peer,
        Arc::new(labels),
        shared.local_headers.clone(),
        Arc::clone(&shared.stats),
        info,
    )
    .with_activity(Arc::clone(&activity))
    .with_authz(authz, tls)
    .with_drain(shared.config.drain.clone())
    .with_xfcc(xfcc)
    .with_jwt(jwt, Arc::clone(&shared.jwks));
    macro_rules! drive {
        ($io:expr) => {{
            let conn = shared.builder.serve_connection_with_upgrades($io, service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                () = drained(&mut drain) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = activity.idle_for(shared.config.idle_timeout) => {
                    tracing::debug!("closing an idle inbound connection");
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }};
    }
    let result = match tcp {
        None => drive!(TokioIo::new(io)),
        Some(tcp) => {
            let io = TokioIo::new(tcp.wrap(io));
            tcp.report_while(async { drive!(io) }).await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "inbound connection ended with an error");
    }
}

/// The access log's per-connection fields, only when access logs or request spans are enabled.
fn connection_info(
    shared: &Shared,
    local: Option<SocketAddr>,
    remote: SocketAddr,
    sni: Option<String>,
    principal: Option<String>,
) -> Option<Arc<ConnectionInfo>> {
    (access_log::enabled() || tracing_headers::spans_enabled()).then(|| {
        Arc::new(ConnectionInfo {
            downstream_local: local,
            downstream_remote: remote,
            requested_server_name: sni,
            upstream_cluster: Arc::clone(&shared.inbound_cluster),
            source_principal: principal,
        })
    })
}

/// Resolves once the listener drains (or `serve` was dropped).
async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}
