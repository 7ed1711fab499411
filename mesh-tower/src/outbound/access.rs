//! The outbound access log: one event per request on [`ACCESS_LOG_TARGET`], emitted when the
//! response body ends (or is dropped), with the fields inbound has (shared in
//! [`crate::inbound::access_log`]), filled from what the outbound path learnt while routing and
//! sending: cluster, route, upstream host, how the last attempt ended.
//!
//! Captured only when a subscriber enables the target.
//!
//! [`ACCESS_LOG_TARGET`]: crate::inbound::access_log::ACCESS_LOG_TARGET

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Response;
use mesh_core::flags::ResponseFlag;

use super::pool::ConnectError;
use crate::inbound::access_log::{Line, RequestFields, VIA_UPSTREAM};

/// What the outbound path learns for the access log while it routes and sends.
#[derive(Debug, Default)]
pub(crate) struct UpstreamInfo {
    /// `%UPSTREAM_CLUSTER_RAW%`.
    pub cluster: Option<String>,
    /// `%ROUTE_NAME%` (empty names print as `-`).
    pub route: Option<Arc<str>>,
    /// `%UPSTREAM_HOST%`: the last attempt's host.
    pub host: Option<SocketAddr>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`: the local address of the connection that carried the
    /// last attempt.
    pub local_address: Option<SocketAddr>,
    /// The last attempt's response came from the upstream.
    pub from_upstream: bool,
    /// The last attempt hit its per-try timeout.
    pub per_try_timeout: bool,
    /// The last attempt's reset reason (Envoy's `StreamResetReason` names).
    pub reset: Option<&'static str>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`, spaces as `_` as Envoy logs it.
    pub transport_failure_reason: Option<String>,
    /// Time from the request to the upstream's response headers
    /// (`x-envoy-upstream-service-time`).
    pub service_time: Option<Duration>,
}

impl UpstreamInfo {
    /// A new attempt to `host` starts: what the previous one left is forgotten.
    pub(crate) fn attempt(&mut self, host: SocketAddr) {
        *self = UpstreamInfo {
            cluster: self.cluster.take(),
            route: self.route.take(),
            host: Some(host),
            ..UpstreamInfo::default()
        };
    }

    /// The attempt could not connect (Envoy: `remote_connection_failure` with the transport
    /// failure reason, or `connection_timeout`).
    pub(crate) fn connect_failed(&mut self, e: &ConnectError) {
        let reason = match e {
            ConnectError::Timeout { .. } => None,
            // Envoy 1.40 reports a refused TCP connect as
            // `delayed_connect_error: Connection refused` (observed).
            ConnectError::Tcp { source, .. } => {
                Some(format!("delayed_connect_error: {}", os_error_text(source)))
            }
            other => other.transport_failure_reason(),
        };
        self.reset = Some(e.reset_reason());
        self.transport_failure_reason = reason.map(|r| r.replace(' ', "_"));
    }
}

/// An I/O error's text without Rust's ` (os error N)` suffix (`Connection refused`), as
/// `strerror` gives it.
fn os_error_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for an outbound response with `flags` (Envoy 1.40,
/// observed: `via_upstream`, `route_not_found`,
/// `upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}`,
/// `upstream_reset_before_response_started{overflow}`).
fn details(flags: ResponseFlag, u: &UpstreamInfo) -> Option<String> {
    let reset = |reason: &str| {
        let mut d = format!("upstream_reset_before_response_started{{{reason}");
        if let Some(t) = &u.transport_failure_reason {
            d.push('|');
            d.push_str(t);
        }
        d.push('}');
        Some(d)
    };
    if flags.contains(ResponseFlag::StreamIdleTimeout) {
        // Also when it fired after the upstream's headers (Envoy 1.40, observed).
        Some("stream_idle_timeout".into())
    } else if flags.contains(ResponseFlag::NoRouteFound) {
        Some("route_not_found".into())
    } else if flags.contains(ResponseFlag::FaultInjected) {
        Some("fault_filter_abort".into())
    } else if flags.contains(ResponseFlag::UpstreamRequestTimeout) {
        Some(if u.per_try_timeout && !u.from_upstream {
            "upstream_per_try_timeout".into()
        } else {
            "upstream_response_timeout".into()
        })
    } else if flags.contains(ResponseFlag::NoHealthyUpstream) {
        Some("no_healthy_upstream".into())
    } else if flags.contains(ResponseFlag::UpstreamConnectionFailure) {
        reset(u.reset.unwrap_or("remote_connection_failure"))
    } else if flags.contains(ResponseFlag::UpstreamConnectionTermination) {
        reset("connection_termination")
    } else if flags.contains(ResponseFlag::UpstreamOverflow) && !u.from_upstream {
        reset("overflow")
    } else if u.from_upstream {
        Some(VIA_UPSTREAM.into())
    } else if flags == ResponseFlag::None {
        Some("direct_response".into())
    } else {
        None
    }
}

/// An outbound request's access log, from the request until its response body ends.
#[derive(Debug)]
pub(crate) struct Pending {
    request: RequestFields,
    started: Instant,
    bytes_received: u64,
    pub(crate) upstream: UpstreamInfo,
    response_code: u16,
    flags: ResponseFlag,
    upstream_peer: Option<Arc<str>>,
}

impl Pending {
    /// Captures the request (after the HCM's `x-request-id` handling).
    pub(crate) fn new(parts: &http::request::Parts, body_size: &http_body::SizeHint) -> Self {
        Pending {
            request: RequestFields::from_head(
                &parts.method,
                &parts.uri,
                parts.version,
                &parts.headers,
            ),
            started: Instant::now(),
            // Body bytes, as Envoy's `%BYTES_RECEIVED%`: known up front for sized bodies.
            bytes_received: body_size.exact().unwrap_or(body_size.lower()),
            upstream: UpstreamInfo::default(),
            response_code: 0,
            flags: ResponseFlag::None,
            upstream_peer: None,
        }
    }

    /// Takes what the response head says: status, flags, the upstream's identity.
    pub(crate) fn response<B>(&mut self, resp: &Response<B>) {
        self.response_code = resp.status().as_u16();
        self.flags = resp
            .extensions()
            .get::<ResponseFlag>()
            .copied()
            .unwrap_or_default();
        self.upstream_peer = resp
            .extensions()
            .get::<super::UpstreamPrincipal>()
            .map(|p| p.0.clone());
    }

    /// Adds flags learnt after the response head (`SI` while the body streamed).
    pub(crate) fn add_flags(&mut self, flags: ResponseFlag) {
        self.flags |= flags;
    }

    /// Emits the event once `bytes_sent` body bytes went to the application.
    pub(crate) fn emit(&self, bytes_sent: u64) {
        let u = &self.upstream;
        let details = details(self.flags, u);
        Line {
            response_code: self.response_code,
            response_flags: self.flags.as_str(),
            response_code_details: details.as_deref(),
            upstream_transport_failure_reason: u.transport_failure_reason.as_deref(),
            bytes_received: self.bytes_received,
            bytes_sent,
            duration: self.started.elapsed(),
            upstream_service_time: u.service_time,
            upstream_host: u.host,
            upstream_local_address: u.local_address,
            upstream_cluster: u.cluster.as_deref(),
            route_name: u.route.as_deref().filter(|r| !r.is_empty()),
            upstream_peer_uri_san: self.upstream_peer.as_deref(),
            ..Line::default()
        }
        .emit(&self.request);
    }
}
