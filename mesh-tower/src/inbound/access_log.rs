//! Access logs as `tracing` events, inbound and outbound alike: one event per finished request
//! on target [`ACCESS_LOG_TARGET`] at INFO, with the fields of Istio's default text format
//! (`[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
//! %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
//! "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
//! %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
//! "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
//! %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
//! %REQUESTED_SERVER_NAME% %ROUTE_NAME%`), named as Istio's JSON encoding of that format names
//! them (`upstream_service_time`, `x_forwarded_for`, `user_agent`, `request_id`, ...), plus the
//! peer identities (`downstream_peer_uri_san` inbound, `upstream_peer_uri_san` outbound). An
//! absent value is `-`, as in the text format. Values follow Envoy 1.40 (observed): bytes are
//! body bytes, `duration` and `upstream_service_time` milliseconds.
//!
//! Nothing is captured unless a subscriber enables the target: with access logs off, the
//! request path pays one cached callsite check.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Request, Uri, Version};

use super::stats::Finished;

/// `tracing` target of access log events (enable with e.g. `RUST_LOG=mesh::access_log=info`).
pub const ACCESS_LOG_TARGET: &str = "mesh::access_log";

/// Whether a subscriber wants access log events.
pub(crate) fn enabled() -> bool {
    tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO)
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for a response that came from the upstream.
pub(crate) const VIA_UPSTREAM: &str = "via_upstream";

/// What is fixed for a connection.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    pub(crate) downstream_local: Option<SocketAddr>,
    pub(crate) downstream_remote: SocketAddr,
    pub(crate) requested_server_name: Option<String>,
    pub(crate) upstream_cluster: Arc<str>,
    pub(crate) source_principal: Option<String>,
}

/// The request's part of an access log line, captured when the request arrives (after
/// `x-request-id` is set, as Envoy logs it).
#[derive(Debug)]
pub(crate) struct RequestFields {
    start_time: SystemTime,
    method: Method,
    path: String,
    protocol: Version,
    x_forwarded_for: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    authority: Option<String>,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl RequestFields {
    /// The fields of a request head.
    pub(crate) fn from_head(
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
    ) -> Self {
        RequestFields {
            start_time: SystemTime::now(),
            method: method.clone(),
            path: header(headers, "x-envoy-original-path").unwrap_or_else(|| {
                uri.path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".to_owned())
            }),
            protocol: version,
            x_forwarded_for: header(headers, "x-forwarded-for"),
            user_agent: header(headers, "user-agent"),
            request_id: header(headers, "x-request-id"),
            // `:authority`, i.e. the `Host` header as the client sent it, else the URI's.
            authority: header(headers, "host")
                .or_else(|| uri.authority().map(|a| a.as_str().to_owned())),
        }
    }
}

/// One access log line: the request's fields and what the response and the upstream made of
/// it. `None` prints as `-`.
#[derive(Debug, Default)]
pub(crate) struct Line<'a> {
    pub(crate) response_code: u16,
    pub(crate) response_flags: &'a str,
    pub(crate) response_code_details: Option<&'a str>,
    pub(crate) connection_termination_details: Option<&'a str>,
    pub(crate) upstream_transport_failure_reason: Option<&'a str>,
    pub(crate) bytes_received: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) duration: Duration,
    pub(crate) upstream_service_time: Option<Duration>,
    pub(crate) upstream_host: Option<SocketAddr>,
    pub(crate) upstream_cluster: Option<&'a str>,
    pub(crate) upstream_local_address: Option<SocketAddr>,
    pub(crate) downstream_local_address: Option<SocketAddr>,
    pub(crate) downstream_remote_address: Option<SocketAddr>,
    pub(crate) requested_server_name: Option<&'a str>,
    pub(crate) route_name: Option<&'a str>,
    pub(crate) downstream_peer_uri_san: Option<&'a str>,
    pub(crate) upstream_peer_uri_san: Option<&'a str>,
}

/// An optional value as the text format prints it: the value, or `-`.
struct Dash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl Line<'_> {
    /// Emits the event for `request`.
    pub(crate) fn emit(&self, request: &RequestFields) {
        let r = request;
        let start_time = humantime_rfc3339(r.start_time);
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            start_time = %start_time,
            method = %r.method,
            path = %r.path,
            protocol = super::tracing_headers::protocol(r.protocol),
            response_code = self.response_code,
            response_flags = self.response_flags,
            response_code_details = %Dash(self.response_code_details),
            connection_termination_details = %Dash(self.connection_termination_details),
            upstream_transport_failure_reason = %Dash(self.upstream_transport_failure_reason),
            bytes_received = self.bytes_received,
            bytes_sent = self.bytes_sent,
            duration = self.duration.as_millis() as u64,
            upstream_service_time = %Dash(self.upstream_service_time.map(|d| d.as_millis())),
            x_forwarded_for = %Dash(r.x_forwarded_for.as_deref()),
            user_agent = %Dash(r.user_agent.as_deref()),
            request_id = %Dash(r.request_id.as_deref()),
            authority = %Dash(r.authority.as_deref()),
            upstream_host = %Dash(self.upstream_host),
            upstream_cluster = %Dash(self.upstream_cluster),
            upstream_local_address = %Dash(self.upstream_local_address),
            downstream_local_address = %Dash(self.downstream_local_address),
            downstream_remote_address = %Dash(self.downstream_remote_address),
            requested_server_name = %Dash(self.requested_server_name),
            route_name = %Dash(self.route_name),
            downstream_peer_uri_san = %Dash(self.downstream_peer_uri_san),
            upstream_peer_uri_san = %Dash(self.upstream_peer_uri_san),
            "access"
        );
    }
}

/// An inbound request's access log, captured when it arrives and emitted when its response
/// ends.
#[derive(Debug)]
pub(crate) struct AccessLog {
    conn: Arc<ConnectionInfo>,
    request: RequestFields,
}

impl AccessLog {
    pub(crate) fn from_request<B>(req: &Request<B>, conn: Arc<ConnectionInfo>) -> Self {
        AccessLog {
            conn,
            request: RequestFields::from_head(
                req.method(),
                req.uri(),
                req.version(),
                req.headers(),
            ),
        }
    }

    pub(crate) fn emit(&self, finished: &Finished) {
        let c = &self.conn;
        Line {
            response_code: finished.response_code,
            response_flags: finished.response_flags,
            // The application (the inbound cluster's upstream) answered unless mesh did.
            response_code_details: (finished.response_flags == "-").then_some(VIA_UPSTREAM),
            bytes_received: finished.request_bytes,
            bytes_sent: finished.response_bytes,
            duration: finished.started.elapsed(),
            upstream_host: c.downstream_local,
            upstream_cluster: Some(&c.upstream_cluster),
            downstream_local_address: c.downstream_local,
            downstream_remote_address: Some(c.downstream_remote),
            requested_server_name: c.requested_server_name.as_deref(),
            route_name: Some("default"),
            downstream_peer_uri_san: c.source_principal.as_deref(),
            ..Line::default()
        }
        .emit(&self.request);
    }
}

/// `%START_TIME%` default format: RFC 3339 UTC with milliseconds (`2024-11-22T09:05:49.123Z`).
fn humantime_rfc3339(t: SystemTime) -> String {
    mesh_core::time::rfc3339_millis(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn start_time_is_rfc3339_utc_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_732_266_349_123);
        assert_eq!(humantime_rfc3339(t), "2024-11-22T09:05:49.123Z");
        assert_eq!(
            humantime_rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
