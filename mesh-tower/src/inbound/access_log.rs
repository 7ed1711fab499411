//! Access logs as `tracing` events: one event per finished request on target
//! [`ACCESS_LOG_TARGET`] at INFO, with the fields of Istio's default text format
//! (`[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
//! %RESPONSE_CODE% %RESPONSE_FLAGS% ... %BYTES_RECEIVED% %BYTES_SENT% %DURATION% ...
//! "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%"
//! "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%
//! %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%`), named after the Envoy
//! command operators in snake case.
//!
//! Nothing is captured unless a subscriber enables the target: with access logs off, the
//! request path pays one cached callsite check.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::Request;

use super::stats::Finished;

/// `tracing` target of access log events (enable with e.g. `RUST_LOG=mesh::access_log=info`).
pub const ACCESS_LOG_TARGET: &str = "mesh::access_log";

/// Whether a subscriber wants access log events.
pub(crate) fn enabled() -> bool {
    tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO)
}

/// What is fixed for a connection.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    pub(crate) downstream_local: Option<SocketAddr>,
    pub(crate) downstream_remote: SocketAddr,
    pub(crate) requested_server_name: Option<String>,
    pub(crate) upstream_cluster: Arc<str>,
    pub(crate) source_principal: Option<String>,
}

/// What an access log line needs from a request, captured when it arrives.
#[derive(Debug)]
pub(crate) struct AccessLog {
    conn: Arc<ConnectionInfo>,
    start_time: SystemTime,
    method: http::Method,
    path: String,
    protocol: http::Version,
    x_forwarded_for: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    authority: Option<String>,
}

fn header(req: &Request<impl Sized>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl AccessLog {
    pub(crate) fn from_request<B>(req: &Request<B>, conn: Arc<ConnectionInfo>) -> Self {
        AccessLog {
            conn,
            start_time: SystemTime::now(),
            method: req.method().clone(),
            path: header(req, "x-envoy-original-path").unwrap_or_else(|| {
                req.uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".to_owned())
            }),
            protocol: req.version(),
            x_forwarded_for: header(req, "x-forwarded-for"),
            user_agent: header(req, "user-agent"),
            request_id: header(req, "x-request-id"),
            authority: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| header(req, "host")),
        }
    }

    pub(crate) fn emit(&self, finished: &Finished) {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        let start_time = humantime_rfc3339(self.start_time);
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            start_time = %start_time,
            method = %self.method,
            path = %self.path,
            protocol = super::tracing_headers::protocol(self.protocol),
            response_code = finished.response_code,
            response_flags = finished.response_flags,
            bytes_received = finished.request_bytes,
            bytes_sent = finished.response_bytes,
            duration = finished.started.elapsed().as_millis() as u64,
            x_forwarded_for = %dash(&self.x_forwarded_for),
            user_agent = %dash(&self.user_agent),
            request_id = %dash(&self.request_id),
            authority = %dash(&self.authority),
            upstream_host = %self.conn.downstream_local.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            upstream_cluster = %self.conn.upstream_cluster,
            downstream_local_address = %self.conn.downstream_local.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            downstream_remote_address = %self.conn.downstream_remote,
            requested_server_name = %dash(&self.conn.requested_server_name),
            downstream_peer_uri_san = %dash(&self.conn.source_principal),
            route_name = "default",
            "access"
        );
    }
}

/// `%START_TIME%` default format: RFC 3339 UTC with milliseconds (`2024-11-22T09:05:49.123Z`).
fn humantime_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
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
