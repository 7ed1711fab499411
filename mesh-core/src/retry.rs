//! Envoy's router retry policy, compiled, and the I/O-free retry decisions.
//!
//! Semantics follow Envoy 1.40's router (`retry_state_impl`):
//! - a reset or connection failure is retried by `5xx`, `gateway-error` and `reset`;
//!   `connect-failure` retries only connection failures, `refused-stream` only an HTTP/2
//!   `REFUSED_STREAM` reset;
//! - a per-try timeout is retried by `5xx`, `gateway-error` and `reset`;
//! - a response is retried by `5xx` (any 5xx), `gateway-error` (502/503/504),
//!   `retriable-4xx` (409), `retriable-status-codes` (the configured codes),
//!   `retriable-headers` (a configured header matcher matches a response header) and the gRPC
//!   conditions (`cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8, `internal` 13,
//!   `unavailable` 14 from a `grpc-status` response header); never when the upstream said
//!   `x-envoy-overloaded`;
//! - back-off is Envoy's fully jittered exponential back-off: the n-th retry waits a random
//!   time in `[0, base·2^(n-1))`, capped at `max` (default base 25 ms, max 10 × base).

use std::time::Duration;

use http::HeaderMap;

use crate::route::{HeaderMatcher, RequestView};

/// The `retry_on` conditions, as a bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct RetryOn(u32);

impl RetryOn {
    /// `5xx`.
    pub const HTTP_5XX: RetryOn = RetryOn(1);
    /// `gateway-error`.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// `reset`.
    pub const RESET: RetryOn = RetryOn(1 << 2);
    /// `connect-failure`.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    /// `retriable-4xx` (409).
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 4);
    /// `refused-stream`.
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 5);
    /// `retriable-status-codes`.
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 6);
    /// `retriable-headers`.
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 7);
    /// `reset-before-request`: a reset before any request byte reached the upstream.
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 8);
    /// gRPC `cancelled`.
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 9);
    /// gRPC `deadline-exceeded`.
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 10);
    /// gRPC `internal`.
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 11);
    /// gRPC `resource-exhausted`.
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 12);
    /// gRPC `unavailable`.
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 13);
    /// `envoy-ratelimited`.
    pub const ENVOY_RATELIMITED: RetryOn = RetryOn(1 << 14);
    /// `http3-post-connect-failure` (accepted, never triggers: mesh speaks no HTTP/3).
    pub const HTTP3_POST_CONNECT_FAILURE: RetryOn = RetryOn(1 << 15);

    /// No condition.
    pub const NONE: RetryOn = RetryOn(0);

    /// One condition by its Envoy name; `None` for a name Envoy does not know.
    pub fn condition(name: &str) -> Option<RetryOn> {
        Some(match name {
            "5xx" => Self::HTTP_5XX,
            "gateway-error" => Self::GATEWAY_ERROR,
            "reset" => Self::RESET,
            "connect-failure" => Self::CONNECT_FAILURE,
            "retriable-4xx" => Self::RETRIABLE_4XX,
            "refused-stream" => Self::REFUSED_STREAM,
            "retriable-status-codes" => Self::RETRIABLE_STATUS_CODES,
            "retriable-headers" => Self::RETRIABLE_HEADERS,
            "reset-before-request" => Self::RESET_BEFORE_REQUEST,
            "cancelled" => Self::GRPC_CANCELLED,
            "deadline-exceeded" => Self::GRPC_DEADLINE_EXCEEDED,
            "internal" => Self::GRPC_INTERNAL,
            "resource-exhausted" => Self::GRPC_RESOURCE_EXHAUSTED,
            "unavailable" => Self::GRPC_UNAVAILABLE,
            "envoy-ratelimited" => Self::ENVOY_RATELIMITED,
            "http3-post-connect-failure" => Self::HTTP3_POST_CONNECT_FAILURE,
            _ => return None,
        })
    }

    /// Parses Envoy's comma-separated `retry_on`. Unknown names are ignored, as Envoy ignores
    /// them; they are returned so the caller can log them.
    pub fn parse(list: &str) -> (RetryOn, Vec<String>) {
        let mut set = RetryOn::NONE;
        let mut unknown = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match RetryOn::condition(name) {
                Some(c) => set = set | c,
                None => unknown.push(name.to_owned()),
            }
        }
        (set, unknown)
    }

    /// Whether any condition of `other` is set.
    pub fn any(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no condition is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, rhs: RetryOn) -> RetryOn {
        RetryOn(self.0 | rhs.0)
    }
}

/// `retry_back_off`: Envoy's fully jittered exponential back-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackOff {
    /// `base_interval` (default 25 ms).
    pub base: Duration,
    /// `max_interval` (default 10 × base).
    pub max: Duration,
}

impl Default for RetryBackOff {
    fn default() -> Self {
        RetryBackOff::new(Duration::from_millis(25), None)
    }
}

impl RetryBackOff {
    /// A back-off with `base` and `max` (10 × base when `None`).
    pub fn new(base: Duration, max: Option<Duration>) -> Self {
        RetryBackOff {
            base,
            max: max.unwrap_or(base * 10),
        }
    }

    /// The wait before retry number `retry` (1 for the first retry) given a uniformly random
    /// `random`: `random % (base · 2^(retry-1))` milliseconds, capped at `max`.
    pub fn delay(&self, retry: u32, random: u64) -> Duration {
        let base = self.base.as_millis().max(1) as u64;
        let max = self.max.as_millis().max(1) as u64;
        let mut interval = base;
        for _ in 1..retry {
            interval = if interval > max / 2 {
                max
            } else {
                interval * 2
            };
        }
        Duration::from_millis((random % interval).min(max))
    }
}

/// How one attempt ended, as far as retrying is concerned.
#[derive(Clone, Copy, Debug)]
pub enum AttemptOutcome<'a> {
    /// Response headers arrived.
    Response {
        /// Status code.
        status: u16,
        /// Response headers.
        headers: &'a HeaderMap,
    },
    /// No connection could be made (`UF`).
    ConnectFailure,
    /// The stream was reset (or the connection closed) before response headers (`UC`).
    Reset {
        /// Whether the upstream refused the stream (HTTP/2 `REFUSED_STREAM`).
        refused_stream: bool,
    },
    /// The per-try timeout fired before response headers.
    PerTryTimeout,
    /// The connection pool refused the request (`max_pending_requests`): never retried, as
    /// in Envoy.
    Overflow,
}

/// A route's `retry_policy`.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// `retry_on`.
    pub retry_on: RetryOn,
    /// `num_retries` (Envoy's default is 1).
    pub num_retries: u32,
    /// `per_try_timeout`.
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`.
    pub per_try_idle_timeout: Option<Duration>,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
    /// `retriable_headers`: response header matchers.
    pub retriable_headers: Vec<HeaderMatcher>,
    /// `retriable_request_headers`: the request must match one of these for any retry.
    pub retriable_request_headers: Vec<HeaderMatcher>,
    /// `retry_back_off`.
    pub back_off: RetryBackOff,
    /// `retry_host_predicate` `envoy.retry_host_predicates.previous_hosts`.
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1).
    pub host_selection_retry_max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_on: RetryOn::NONE,
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
            back_off: RetryBackOff::default(),
            previous_hosts: false,
            host_selection_retry_max_attempts: 1,
        }
    }
}

/// `x-envoy-overloaded`, parsed once.
const X_ENVOY_OVERLOADED: http::HeaderName = http::HeaderName::from_static("x-envoy-overloaded");
/// `x-envoy-ratelimited`, parsed once.
const X_ENVOY_RATELIMITED: http::HeaderName = http::HeaderName::from_static("x-envoy-ratelimited");
/// `grpc-status`, parsed once.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

impl RetryPolicy {
    /// istiod's default outbound route policy (no VirtualService retries configured):
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` on 503,
    /// 2 retries, `previous_hosts`, 5 host selection attempts.
    pub fn istio_default() -> Self {
        RetryPolicy {
            retry_on: RetryOn::CONNECT_FAILURE
                | RetryOn::REFUSED_STREAM
                | RetryOn::GRPC_UNAVAILABLE
                | RetryOn::GRPC_CANCELLED
                | RetryOn::RETRIABLE_STATUS_CODES,
            num_retries: 2,
            retriable_status_codes: vec![503],
            previous_hosts: true,
            host_selection_retry_max_attempts: 5,
            ..RetryPolicy::default()
        }
    }

    /// Whether retries are possible at all for this request (conditions set, retries left,
    /// `retriable_request_headers` satisfied).
    pub fn enabled_for(&self, req: &RequestView<'_>) -> bool {
        self.num_retries > 0
            && !self.retry_on.is_empty()
            && (self.retriable_request_headers.is_empty()
                || self
                    .retriable_request_headers
                    .iter()
                    .any(|m| m.matches(req)))
    }

    /// Whether the response needs a response-based retry check at all (so callers can skip
    /// keeping a copy of the request when only connection failures are retried).
    pub fn retries_responses(&self) -> bool {
        self.retry_on.any(
            RetryOn::HTTP_5XX
                | RetryOn::GATEWAY_ERROR
                | RetryOn::RETRIABLE_4XX
                | RetryOn::RETRIABLE_STATUS_CODES
                | RetryOn::RETRIABLE_HEADERS
                | RetryOn::GRPC_CANCELLED
                | RetryOn::GRPC_DEADLINE_EXCEEDED
                | RetryOn::GRPC_INTERNAL
                | RetryOn::GRPC_RESOURCE_EXHAUSTED
                | RetryOn::GRPC_UNAVAILABLE
                | RetryOn::ENVOY_RATELIMITED
                | RetryOn::RESET
                | RetryOn::REFUSED_STREAM,
        )
    }

    /// Whether an attempt that ended with `outcome` is retriable under this policy (retry
    /// counts are the caller's business).
    pub fn would_retry(&self, outcome: &AttemptOutcome<'_>) -> bool {
        let on = self.retry_on;
        match *outcome {
            AttemptOutcome::Overflow => false,
            AttemptOutcome::ConnectFailure => on.any(
                RetryOn::HTTP_5XX
                    | RetryOn::GATEWAY_ERROR
                    | RetryOn::RESET
                    | RetryOn::CONNECT_FAILURE
                    | RetryOn::RESET_BEFORE_REQUEST,
            ),
            AttemptOutcome::Reset { refused_stream } => {
                on.any(RetryOn::HTTP_5XX | RetryOn::GATEWAY_ERROR | RetryOn::RESET)
                    || (refused_stream && on.any(RetryOn::REFUSED_STREAM))
            }
            AttemptOutcome::PerTryTimeout => {
                on.any(RetryOn::HTTP_5XX | RetryOn::GATEWAY_ERROR | RetryOn::RESET)
            }
            AttemptOutcome::Response { status, headers } => {
                // `x-envoy-overloaded: true` vetoes a retry; looked up only when the
                // response would otherwise be retried (most responses are not).
                self.would_retry_response(status, headers)
                    && headers
                        .get(X_ENVOY_OVERLOADED)
                        .is_none_or(|v| v.as_bytes() != b"true")
            }
        }
    }

    fn would_retry_response(&self, status: u16, headers: &http::HeaderMap) -> bool {
        let on = self.retry_on;
        if on.any(RetryOn::HTTP_5XX) && (500..600).contains(&status) {
            return true;
        }
        if on.any(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504) {
            return true;
        }
        if on.any(RetryOn::RETRIABLE_4XX) && status == 409 {
            return true;
        }
        if on.any(RetryOn::ENVOY_RATELIMITED) && headers.contains_key(X_ENVOY_RATELIMITED) {
            return true;
        }
        if on.any(RetryOn::RETRIABLE_STATUS_CODES) && self.retriable_status_codes.contains(&status)
        {
            return true;
        }
        if on.any(RetryOn::RETRIABLE_HEADERS) && !self.retriable_headers.is_empty() {
            let view = RequestView::new("", "", headers);
            if self.retriable_headers.iter().any(|m| m.matches(&view)) {
                return true;
            }
        }
        let grpc = RetryOn::GRPC_CANCELLED
            | RetryOn::GRPC_DEADLINE_EXCEEDED
            | RetryOn::GRPC_INTERNAL
            | RetryOn::GRPC_RESOURCE_EXHAUSTED
            | RetryOn::GRPC_UNAVAILABLE;
        if on.any(grpc)
            && let Some(code) = headers
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u32>().ok())
        {
            let want = match code {
                1 => RetryOn::GRPC_CANCELLED,
                4 => RetryOn::GRPC_DEADLINE_EXCEEDED,
                8 => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                13 => RetryOn::GRPC_INTERNAL,
                14 => RetryOn::GRPC_UNAVAILABLE,
                _ => RetryOn::NONE,
            };
            return on.any(want);
        }
        false
    }
}

/// Envoy's default request buffer limit for retries when neither the route nor the virtual host
/// sets `per_request_buffer_limit_bytes`: the listener's `per_connection_buffer_limit_bytes`
/// default, 1 MiB.
pub const DEFAULT_RETRY_BUFFER_LIMIT: u32 = 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{HeaderValueMatch, StringMatch, StringPattern};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn resp(status: u16, h: &HeaderMap) -> AttemptOutcome<'_> {
        AttemptOutcome::Response { status, headers: h }
    }

    #[test]
    fn parses_istio_retry_on() {
        let (on, unknown) = RetryOn::parse(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes,bogus",
        );
        assert_eq!(on, RetryPolicy::istio_default().retry_on);
        assert_eq!(unknown, vec!["bogus".to_owned()]);
    }

    #[test]
    fn istio_default_retries_connect_failures_and_503_only() {
        let p = RetryPolicy::istio_default();
        let none = HeaderMap::new();
        assert!(p.would_retry(&AttemptOutcome::ConnectFailure));
        assert!(p.would_retry(&AttemptOutcome::Reset {
            refused_stream: true
        }));
        assert!(!p.would_retry(&AttemptOutcome::Reset {
            refused_stream: false
        }));
        assert!(!p.would_retry(&AttemptOutcome::PerTryTimeout));
        assert!(p.would_retry(&resp(503, &none)));
        assert!(!p.would_retry(&resp(502, &none)));
        assert!(!p.would_retry(&resp(500, &none)));
        let grpc = |c: &str| headers(&[("grpc-status", c)]);
        assert!(p.would_retry(&resp(200, &grpc("14"))));
        assert!(p.would_retry(&resp(200, &grpc("1"))));
        assert!(!p.would_retry(&resp(200, &grpc("13"))));
        assert!(!p.would_retry(&resp(200, &grpc("0"))));
        let overloaded = headers(&[("x-envoy-overloaded", "true")]);
        assert!(!p.would_retry(&resp(503, &overloaded)));
    }

    #[test]
    fn five_xx_gateway_error_and_4xx() {
        let none = HeaderMap::new();
        let p = |on: RetryOn| RetryPolicy {
            retry_on: on,
            ..RetryPolicy::default()
        };
        let five = p(RetryOn::HTTP_5XX);
        assert!(five.would_retry(&resp(500, &none)));
        assert!(five.would_retry(&AttemptOutcome::PerTryTimeout));
        assert!(five.would_retry(&AttemptOutcome::Reset {
            refused_stream: false
        }));
        assert!(!five.would_retry(&resp(499, &none)));
        let gw = p(RetryOn::GATEWAY_ERROR);
        assert!(gw.would_retry(&resp(504, &none)));
        assert!(!gw.would_retry(&resp(500, &none)));
        let cf = p(RetryOn::CONNECT_FAILURE);
        assert!(!cf.would_retry(&AttemptOutcome::Reset {
            refused_stream: false
        }));
        assert!(!cf.would_retry(&resp(503, &none)));
        let r4 = p(RetryOn::RETRIABLE_4XX);
        assert!(r4.would_retry(&resp(409, &none)));
        assert!(!r4.would_retry(&resp(404, &none)));
    }

    #[test]
    fn retriable_headers_match_response_headers() {
        let m = HeaderMatcher::new(
            "x-retry-me",
            HeaderValueMatch::String(StringMatch::new(StringPattern::Exact("yes".into()))),
        )
        .unwrap();
        let p = RetryPolicy {
            retry_on: RetryOn::RETRIABLE_HEADERS,
            retriable_headers: vec![m],
            ..RetryPolicy::default()
        };
        assert!(p.would_retry(&resp(200, &headers(&[("x-retry-me", "yes")]))));
        assert!(!p.would_retry(&resp(200, &headers(&[("x-retry-me", "no")]))));
    }

    #[test]
    fn back_off_is_fully_jittered_and_capped() {
        let b = RetryBackOff::default();
        assert_eq!(b.max, Duration::from_millis(250));
        // First retry: [0, 25) ms.
        assert_eq!(b.delay(1, 24), Duration::from_millis(24));
        assert_eq!(b.delay(1, 25), Duration::ZERO);
        // Second: [0, 50); third [0, 100); then capped at 250.
        assert_eq!(b.delay(2, 49), Duration::from_millis(49));
        assert_eq!(b.delay(3, 99), Duration::from_millis(99));
        assert_eq!(
            b.delay(10, u64::MAX - 1),
            Duration::from_millis((u64::MAX - 1) % 250)
        );
        assert!(b.delay(30, 1_000_000_007) < Duration::from_millis(250));
    }
}
