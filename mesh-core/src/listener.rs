//! LDS listeners, compiled to what mesh acts on: which outbound ports speak HTTP through which
//! route configuration, and the inbound mTLS mode per port.

use std::collections::HashMap;
use std::net::SocketAddr;

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

/// The inbound side: the mode per destination port, with the listener-wide default.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InboundPolicy {
    /// Mode for ports without their own filter chains.
    pub default_mode: InboundTlsMode,
    /// Per-port modes.
    pub per_port: HashMap<u16, InboundTlsMode>,
}

impl InboundPolicy {
    /// The mode for a destination port.
    pub fn mode_for(&self, port: u16) -> InboundTlsMode {
        self.per_port.get(&port).copied().unwrap_or(self.default_mode)
    }
}

/// The kind of a listener.
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
