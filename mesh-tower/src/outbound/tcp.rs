//! Outbound TCP: what the sidecar's outbound TCP proxy listeners do for a connection the
//! application opens to a service.
//!
//! [`Outbound::connect_tcp`] resolves the authority (mesh's resolver: the NDS table, then
//! DNS), picks the listener Envoy would take ([`Snapshot::route_outbound_tcp`]: the
//! `<vip>_<port>` TCP listener's cluster, else `PassthroughCluster` / `BlackHoleCluster` by
//! the outbound traffic policy), picks an endpoint with the cluster's load balancer and opens
//! the connection: Istio mTLS (ALPN `istio-peer-exchange`, `istio`; the cluster's SNI, the
//! SPIFFE SAN check) to endpoints with `tlsMode: istio`, plaintext otherwise. When the server
//! negotiates `istio-peer-exchange`, the two sides swap workload metadata first
//! ([`crate::peer_exchange`]) and the server's names the destination. The returned
//! [`OutboundTcpStream`] reports Istio's TCP metrics with `reporter="source"` as Envoy's
//! `istio.stats` network filter does: opened at connect, byte deltas every
//! [`TCP_REPORTING_DURATION`](mesh_core::telemetry::TCP_REPORTING_DURATION) and at close,
//! closed when the stream is dropped.
//!
//! [`Snapshot::route_outbound_tcp`]: mesh_core::snapshot::Snapshot::route_outbound_tcp

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use mesh_core::cluster::ClusterDiscovery;
use mesh_core::endpoint::EndpointTlsMode;
use mesh_core::flags::ResponseFlag;
use mesh_core::lb::{ActiveRequest, PickContext};
use mesh_core::metadata_exchange::{ALPN_IN_MESH_WITH_MXC, ALPN_PEER_EXCHANGE};
use mesh_core::outlier::OutlierResult;
use mesh_core::snapshot::{PASSTHROUGH_CLUSTER, RouteDecision};
use mesh_core::telemetry::{DestinationService, Reporter, UNKNOWN};
use metrics::Label;
use pin_project::pin_project;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{self, ConnectError, Io, TlsTarget};
use super::telemetry::{ConnectionGuard, destination_labels, strip_port, upstream_destination};
use super::{Outbound, authority_port};
use crate::inbound::tcp_stats::{CountingStream, TcpConnection};
use crate::peer_exchange::{self, Replay};

/// Why [`Outbound::connect_tcp`] opened no connection.
#[derive(Debug, thiserror::Error)]
pub enum TcpConnectError {
    /// The authority is not `host:port`.
    #[error("{0:?} is not host:port")]
    Authority(String),
    /// The host did not resolve.
    #[error("{0} does not resolve")]
    Resolve(String),
    /// The destination is refused: `BlackHoleCluster` (`REGISTRY_ONLY`) or a listener whose
    /// cluster the snapshot lacks; the response flag Envoy would log.
    #[error("no cluster for {destination} ({})", flag.as_str())]
    NoCluster {
        /// The resolved destination.
        destination: SocketAddr,
        /// `NC`.
        flag: ResponseFlag,
    },
    /// The cluster has no healthy endpoint (Envoy's `UH`).
    #[error("no healthy upstream in {0}")]
    NoHealthyUpstream(String),
    /// TCP connect or the TLS handshake failed (Envoy's `UF`).
    #[error("upstream connect failure: {message}")]
    Connect {
        /// What failed.
        message: String,
        /// Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%`, when it gives one.
        transport_failure_reason: Option<String>,
    },
}

impl From<ConnectError> for TcpConnectError {
    fn from(e: ConnectError) -> Self {
        TcpConnectError::Connect {
            transport_failure_reason: e.transport_failure_reason(),
            message: e.to_string(),
        }
    }
}

/// An outbound TCP connection opened through the mesh: read and write it as a socket. Its
/// bytes are counted into `istio_tcp_*{reporter="source"}`; dropping it closes the
/// connection and reports it closed.
#[pin_project]
pub struct OutboundTcpStream {
    #[pin]
    io: CountingStream<Replay<Io>>,
    /// Reported closed when the last reference (this stream's) goes.
    _stats: Arc<Mutex<TcpConnection>>,
    _cx: Option<ConnectionGuard>,
    /// The host's active-request count (least request), held while the connection is open.
    _active: Option<ActiveRequest>,
    cluster: Arc<str>,
    upstream: SocketAddr,
    local: Option<SocketAddr>,
    principal: Option<Arc<str>>,
}

impl std::fmt::Debug for OutboundTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundTcpStream")
            .field("cluster", &self.cluster)
            .field("upstream", &self.upstream)
            .field("local", &self.local)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl OutboundTcpStream {
    /// The cluster the connection went to (`%UPSTREAM_CLUSTER%`).
    pub fn upstream_cluster(&self) -> &str {
        &self.cluster
    }

    /// The endpoint connected to (`%UPSTREAM_HOST%`).
    pub fn upstream_host(&self) -> SocketAddr {
        self.upstream
    }

    /// The local address of the upstream connection (`%UPSTREAM_LOCAL_ADDRESS%`).
    pub fn upstream_local_address(&self) -> Option<SocketAddr> {
        self.local
    }

    /// The peer's SPIFFE ID (or first URI SAN) over mTLS.
    pub fn peer_principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }
}

impl AsyncRead for OutboundTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl AsyncWrite for OutboundTcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

impl Outbound {
    /// Opens a TCP connection to `authority` (`host:port`; the host a service name, a VIP or
    /// any address) as the sidecar's outbound TCP proxy would carry it (see the
    /// [module](self) docs). Must be called inside a Tokio runtime.
    pub async fn connect_tcp(&self, authority: &str) -> Result<OutboundTcpStream, TcpConnectError> {
        let bad = || TcpConnectError::Authority(authority.to_owned());
        let port = authority_port(authority).ok_or_else(bad)?;
        let host = strip_port(authority);
        let destination = self
            .original_destination(host, port)
            .await
            .ok_or_else(|| TcpConnectError::Resolve(host.to_owned()))?;
        let decision = self.inner.cell.load().route_outbound_tcp(destination);
        let (cluster, endpoints) = match decision {
            RouteDecision::Forward {
                cluster, endpoints, ..
            } => (cluster, endpoints),
            RouteDecision::Respond { flag, .. } => {
                return Err(TcpConnectError::NoCluster { destination, flag });
            }
        };
        let state = self.inner.cluster_state(&cluster);
        let dns_endpoints = match self.dns_hosts(&state) {
            Some(d) => Box::pin(d.endpoints(cluster.connect_timeout)).await,
            None => None,
        };
        let endpoints = dns_endpoints.as_ref().or(endpoints.as_ref());
        // As Envoy's TCP proxy: the connection counts as an active request on the host while
        // it is open (least request), and its connect outcome goes to outlier detection.
        let (addr, tls_mode, workload, set, picked) = match (&cluster.discovery, endpoints) {
            (ClusterDiscovery::OriginalDestination, _) => {
                (destination, EndpointTlsMode::Disabled, None, None, None)
            }
            (_, Some(set)) => {
                let ctx = PickContext {
                    hash: None,
                    avoid: &[],
                    host_selection_retry_count: 0,
                };
                let p = self
                    .inner
                    .pick_host(&state, set, &ctx)
                    .ok_or_else(|| TcpConnectError::NoHealthyUpstream(cluster.name.clone()))?;
                let ep = &set.endpoints[p.index];
                (
                    ep.address,
                    ep.tls_mode,
                    ep.workload.as_ref(),
                    Some(&**set),
                    Some(p),
                )
            }
            (_, None) => return Err(TcpConnectError::NoHealthyUpstream(cluster.name.clone())),
        };
        let (active, live) = match picked {
            Some(p) => (p.active, p.live),
            None => (None, None),
        };
        let tls = match cluster.discovery {
            ClusterDiscovery::OriginalDestination => None,
            _ => cluster.tls_for(tls_mode),
        };
        let target = match tls {
            None => None,
            Some(tls) => {
                let istio =
                    tls_mode == EndpointTlsMode::Istio || tls.alpn.iter().any(|a| a == "istio");
                let alpn = istio.then_some(ALPN_IN_MESH_WITH_MXC);
                let config = crate::tls::client_config(&self.inner.certs, tls, alpn)
                    .map_err(|source| ConnectError::TlsConfig { addr, source })?;
                let server_name = if tls.sni.is_empty() {
                    ServerName::IpAddress(addr.ip().into())
                } else {
                    crate::tls::server_name(tls)
                        .map_err(|source| ConnectError::TlsConfig { addr, source })?
                };
                Some(TlsTarget {
                    config,
                    server_name,
                    tls: tls.clone(),
                })
            }
        };
        let host_pool = self
            .inner
            .host_pool(&state, addr, target.is_some(), workload, set);
        let connected = pool::connect(
            addr,
            target.as_ref(),
            cluster.connect_timeout,
            cluster.connection_pool.tcp_keepalive.as_ref(),
        )
        .await;
        // Envoy's tcp_proxy: `LocalOriginConnectSuccessFinal` once connected (TLS included),
        // `LocalOriginTimeout` for a connect timeout, `LocalOriginConnectFailed` otherwise.
        if let Some(live) = &live {
            let r = match &connected {
                Ok(_) => OutlierResult::ConnectSucceeded,
                Err(ConnectError::Timeout { .. }) => OutlierResult::Timeout,
                Err(_) => OutlierResult::ConnectFailed,
            };
            state.report_outlier(live, r);
        }
        let (io, principal) = connected?;
        let cx = host_pool.labels.connection_opened();
        let local = io.local_addr();
        // Istio's metadata exchange, when the server negotiated it: the server's own metadata
        // names the destination.
        let exchange = matches!(&io, Io::Tls(t)
            if t.get_ref().1.alpn_protocol() == Some(ALPN_PEER_EXCHANGE.as_bytes()));
        let (io, upstream_peer) = if exchange {
            match peer_exchange::exchange(io, &self.inner.exchange_frame).await {
                Ok((io, peer)) => (io, peer.and_then(|p| p.metadata)),
                Err(e) => {
                    return Err(TcpConnectError::Connect {
                        message: format!("istio-peer-exchange with {addr}: {e}"),
                        transport_failure_reason: None,
                    });
                }
            }
        } else {
            (Replay::new(io), None)
        };

        // Istio's TCP label set as the client sidecar reports it.
        let destination_labels = upstream_destination(
            upstream_peer.map(|m| m.workload_labels()).as_ref(),
            &destination_labels(workload),
            principal.as_deref(),
        );
        let service = match &state.service {
            Some(s) => s.clone(),
            None if cluster.name == PASSTHROUGH_CLUSTER => DestinationService {
                host: PASSTHROUGH_CLUSTER.to_owned(),
                name: PASSTHROUGH_CLUSTER.to_owned(),
                namespace: UNKNOWN.to_owned(),
            },
            None => DestinationService {
                host: host.to_owned(),
                name: host.split('.').next().unwrap_or(host).to_owned(),
                namespace: UNKNOWN.to_owned(),
            },
        };
        let labels: Vec<Label> = mesh_core::telemetry::tcp_labels(
            Reporter::Source,
            &self.inner.source,
            &destination_labels,
            &service,
            "-",
            // The client side cannot know the server's policy (Istio reports `unknown`).
            UNKNOWN,
        )
        .into_iter()
        .map(|(k, v)| Label::new(k, v))
        .collect();
        let stats = TcpConnection::open(&labels);
        let io = stats.wrap(io);
        let stats = Arc::new(Mutex::new(stats));
        spawn_periodic_reports(Arc::downgrade(&stats));
        Ok(OutboundTcpStream {
            io,
            _stats: stats,
            _cx: cx,
            _active: active,
            cluster: Arc::from(cluster.name.as_str()),
            upstream: addr,
            local,
            principal,
        })
    }
}

/// Reports the connection's byte deltas every `TCP_REPORTING_DURATION` while it is open.
fn spawn_periodic_reports(stats: std::sync::Weak<Mutex<TcpConnection>>) {
    let period = mesh_core::telemetry::TCP_REPORTING_DURATION;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(s) = stats.upgrade() else { return };
            s.lock().unwrap_or_else(|e| e.into_inner()).report();
        }
    });
}
