//! LDS listeners, compiled to what mesh acts on: which outbound ports speak HTTP through which
//! route configuration, and the inbound mTLS mode per port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::authz::AuthzChain;
use crate::authz::jwt::JwtAuthn;
use crate::cluster::SanMatcher;

/// What an outbound listener does with traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundProtocol {
    /// HTTP connection manager with RDS.
    Http {
        /// `rds.route_config_name`.
        route_config: String,
    },
    /// TCP proxy to a cluster.
    Tcp {
        /// Cluster name.
        cluster: String,
    },
}

/// Inbound PeerAuthentication mode as istiod renders it into the inbound listener's filter
/// chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InboundTlsMode {
    /// mTLS only; plaintext refused.
    Strict,
    /// mTLS and plaintext both accepted (TLS detected on the first bytes).
    #[default]
    Permissive,
    /// Plaintext only.
    Disable,
}

/// Where a port's authorization filters sit, which decides when they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthzLayer {
    /// `envoy.filters.http.rbac` / `ext_authz` in the HTTP connection manager: once per request.
    Http,
    /// `envoy.filters.network.rbac` on a TCP chain: once per connection, without request
    /// attributes (a denied connection is closed).
    Network,
}

/// What istiod's inbound filter chains do with a port's traffic, which decides the Istio
/// metrics the sidecar reports for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InboundProtocol {
    /// At least one chain runs an HTTP connection manager (a port declared HTTP, or one
    /// istiod sniffs): `istio_requests_total` & co per request.
    #[default]
    Http,
    /// Only `envoy.filters.network.tcp_proxy` chains (a port declared TCP: name `tcp-*`,
    /// `appProtocol: tcp`, or a protocol istiod does not sniff): `istio_tcp_*` per connection
    /// and no request metrics.
    Tcp,
}

/// The authorization of one inbound port (or of the catch-all chains).
#[derive(Clone, Debug, PartialEq)]
pub struct PortAuthz {
    /// The filters, in listener order (never empty: ports without policy carry no `PortAuthz`).
    pub chain: Arc<AuthzChain>,
    /// Per request or per connection.
    pub layer: AuthzLayer,
}

// Authz chains compare structurally; the only non-`Eq` leaves are `f64` metadata bounds
// istiod never renders as NaN.
impl Eq for PortAuthz {}

/// The inbound side: the mode per destination port, with the listener-wide default; the
/// authorization filters and the accepted peer SAN matchers istiod rendered per port.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InboundPolicy {
    /// Mode for ports without their own filter chains.
    pub default_mode: InboundTlsMode,
    /// Per-port modes.
    pub per_port: HashMap<u16, InboundTlsMode>,
    /// Authorization of ports without their own filter chains (`None`: nothing to enforce).
    pub default_authz: Option<PortAuthz>,
    /// Per-port authorization; a port with its own chains but no policy maps to `None`.
    pub port_authz: HashMap<u16, Option<PortAuthz>>,
    /// Peer URI SAN matchers of the mTLS chains without a destination port
    /// (`match_subject_alt_names`, istiod: prefix `spiffe://<trust domain>/` per trust
    /// domain and alias). Empty: not rendered.
    pub default_peer_sans: Vec<SanMatcher>,
    /// Per-port peer URI SAN matchers.
    pub port_peer_sans: HashMap<u16, Vec<SanMatcher>>,
    /// RequestAuthentication (`envoy.filters.http.jwt_authn`) of ports without their own
    /// filter chains (`None`: no JWT filter).
    pub default_jwt: Option<Arc<JwtAuthn>>,
    /// Per-port JWT filter; a port with its own chains but no JWT filter maps to `None`.
    pub port_jwt: HashMap<u16, Option<Arc<JwtAuthn>>>,
    /// Protocol of ports without their own filter chains (istiod's catch-all chains sniff
    /// HTTP, so [`InboundProtocol::Http`] unless they are all TCP proxies).
    pub default_protocol: InboundProtocol,
    /// Per-port protocol of the ports with their own filter chains.
    pub port_protocol: HashMap<u16, InboundProtocol>,
}

impl InboundPolicy {
    /// The mode for a destination port.
    pub fn mode_for(&self, port: u16) -> InboundTlsMode {
        self.per_port
            .get(&port)
            .copied()
            .unwrap_or(self.default_mode)
    }

    /// The authorization for a destination port (`None`: no policy).
    pub fn authz_for(&self, port: u16) -> Option<&PortAuthz> {
        match self.port_authz.get(&port) {
            Some(authz) => authz.as_ref(),
            None => self.default_authz.as_ref(),
        }
    }

    /// The JWT filter for a destination port (`None`: no RequestAuthentication).
    pub fn jwt_for(&self, port: u16) -> Option<&Arc<JwtAuthn>> {
        match self.port_jwt.get(&port) {
            Some(jwt) => jwt.as_ref(),
            None => self.default_jwt.as_ref(),
        }
    }

    /// The protocol istiod's chains give a destination port.
    pub fn protocol_for(&self, port: u16) -> InboundProtocol {
        self.port_protocol
            .get(&port)
            .copied()
            .unwrap_or(self.default_protocol)
    }

    /// The peer SAN matchers for a destination port (empty: none rendered).
    pub fn peer_sans_for(&self, port: u16) -> &[SanMatcher] {
        self.port_peer_sans
            .get(&port)
            .unwrap_or(&self.default_peer_sans)
    }
}

/// The kind of a listener.
// Listeners are compiled config read once per connection, not per request; boxing the inbound
// policy would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// An outbound listener on a port (`0.0.0.0_<port>` or `<vip>_<port>`).
    Outbound(OutboundProtocol),
    /// istiod's `virtualInbound` (or an inbound listener), with the PeerAuthentication modes.
    Inbound(InboundPolicy),
    /// `virtualOutbound` and anything mesh does not act on.
    Other,
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Name, e.g. `0.0.0.0_9080`.
    pub name: String,
    /// Bound address.
    pub address: SocketAddr,
    /// What it does.
    pub kind: ListenerKind,
}
