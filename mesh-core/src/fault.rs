//! Fault injection (`envoy.filters.http.fault` per-route config, as Istio's VirtualService
//! `fault` renders it): a delay, then an abort, each for a share of requests, optionally
//! controlled by the `x-envoy-fault-*` request headers.

use std::time::Duration;

use crate::route::{Fraction, HeaderMatcher, RequestView};

/// How long a delay fault waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultDelayKind {
    /// `fixed_delay`.
    Fixed(Duration),
    /// `header_delay`: milliseconds from `x-envoy-fault-delay-request`.
    Header,
}

/// A delay fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultDelay {
    /// How long.
    pub kind: FaultDelayKind,
    /// For which share of requests.
    pub percentage: Fraction,
}

/// What an abort fault answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAbortKind {
    /// `http_status`.
    Http(u16),
    /// `grpc_status`: HTTP 200 with this `grpc-status`.
    Grpc(u32),
    /// `header_abort`: from `x-envoy-fault-abort-request` (HTTP) or
    /// `x-envoy-fault-abort-grpc-request` (gRPC).
    Header,
}

/// An abort fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultAbort {
    /// What to answer.
    pub kind: FaultAbortKind,
    /// For which share of requests.
    pub percentage: Fraction,
    /// `response_body` (Envoy's default is `fault filter abort`).
    pub body: Option<String>,
}

/// The abort to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(u16),
    /// HTTP 200 with this gRPC status.
    Grpc(u32),
}

impl Abort {
    /// How Envoy answers the abort: (HTTP status, gRPC status). A gRPC request gets HTTP 200
    /// and a `grpc-status` (the configured one, else mapped from the HTTP status); any other
    /// request gets the HTTP status (200 for a `grpc_status` abort) and no gRPC status.
    pub fn reply(&self, grpc_request: bool) -> (u16, Option<u32>) {
        match (*self, grpc_request) {
            (Abort::Http(s), false) => (s, None),
            (Abort::Http(s), true) => (200, Some(http_to_grpc_status(s))),
            (Abort::Grpc(_), false) => (200, None),
            (Abort::Grpc(c), true) => (200, Some(c)),
        }
    }
}

/// The gRPC status Envoy's local reply to a gRPC request carries for an HTTP status
/// (`Grpc::Utility::httpToGrpcStatus`, the gRPC HTTP-to-gRPC mapping).
pub fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// A route's fault injection.
#[derive(Clone, Debug, Default)]
pub struct Fault {
    /// `delay`.
    pub delay: Option<FaultDelay>,
    /// `abort`.
    pub abort: Option<FaultAbort>,
    /// `headers`: the fault applies only to requests matching all of them.
    pub headers: Vec<HeaderMatcher>,
    /// `upstream_cluster`: the fault applies only to requests for this cluster.
    pub upstream_cluster: Option<String>,
}

/// Envoy's default abort body.
pub const FAULT_ABORT_BODY: &str = "fault filter abort";

fn header<'a>(req: &RequestView<'a>, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The configured share, lowered by a `…-percentage` header if it asks for less.
fn share(configured: Fraction, req: &RequestView<'_>, header_name: &str) -> Fraction {
    match header(req, header_name).and_then(|v| v.trim().parse::<u32>().ok()) {
        Some(n) => Fraction {
            numerator: n.min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

impl Fault {
    /// Whether the fault applies to this request at all (`headers`, `upstream_cluster`).
    pub fn applies(&self, req: &RequestView<'_>, cluster: &str) -> bool {
        self.upstream_cluster
            .as_deref()
            .is_none_or(|c| c == cluster)
            && self.headers.iter().all(|m| m.matches(req))
    }

    /// The delay to inject, given a uniformly random `random`.
    pub fn delay_for(&self, req: &RequestView<'_>, random: u64) -> Option<Duration> {
        let d = self.delay.as_ref()?;
        let p = share(d.percentage, req, "x-envoy-fault-delay-request-percentage");
        if !p.hit(random) {
            return None;
        }
        match &d.kind {
            FaultDelayKind::Fixed(t) => Some(*t),
            FaultDelayKind::Header => header(req, "x-envoy-fault-delay-request")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis),
        }
        .filter(|t| !t.is_zero())
    }

    /// The abort to answer with, given a uniformly random `random`.
    pub fn abort_for(&self, req: &RequestView<'_>, random: u64) -> Option<Abort> {
        let a = self.abort.as_ref()?;
        let p = share(a.percentage, req, "x-envoy-fault-abort-request-percentage");
        if !p.hit(random) {
            return None;
        }
        match &a.kind {
            FaultAbortKind::Http(s) => Some(Abort::Http(*s)),
            FaultAbortKind::Grpc(s) => Some(Abort::Grpc(*s)),
            FaultAbortKind::Header => {
                if let Some(s) = header(req, "x-envoy-fault-abort-request")
                    .and_then(|v| v.trim().parse::<u16>().ok())
                    .filter(|s| (200..600).contains(s))
                {
                    return Some(Abort::Http(s));
                }
                header(req, "x-envoy-fault-abort-grpc-request")
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .map(Abort::Grpc)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn aborts_answer_grpc_requests_in_grpc() {
        // As Envoy 1.40 answers them (tests/fault_oracle.rs).
        assert_eq!(Abort::Http(503).reply(false), (503, None));
        assert_eq!(Abort::Http(503).reply(true), (200, Some(14)));
        assert_eq!(Abort::Http(418).reply(true), (200, Some(2)));
        assert_eq!(Abort::Grpc(14).reply(true), (200, Some(14)));
        assert_eq!(Abort::Grpc(14).reply(false), (200, None));
    }

    fn all() -> Fraction {
        Fraction {
            numerator: 100,
            denominator: 100,
        }
    }

    #[test]
    fn fixed_faults_follow_their_percentage() {
        let f = Fault {
            delay: Some(FaultDelay {
                kind: FaultDelayKind::Fixed(Duration::from_millis(5)),
                percentage: Fraction {
                    numerator: 30,
                    denominator: 100,
                },
            }),
            abort: Some(FaultAbort {
                kind: FaultAbortKind::Http(418),
                percentage: all(),
                body: None,
            }),
            ..Fault::default()
        };
        let h = HeaderMap::new();
        let req = RequestView::new("h", "/", &h);
        let delayed = (0..100u64)
            .filter(|r| f.delay_for(&req, *r).is_some())
            .count();
        assert_eq!(delayed, 30);
        assert_eq!(f.abort_for(&req, 99), Some(Abort::Http(418)));
        // A percentage header can only lower the share.
        let mut h = HeaderMap::new();
        h.insert(
            "x-envoy-fault-delay-request-percentage",
            "10".parse().unwrap(),
        );
        let req = RequestView::new("h", "/", &h);
        assert_eq!(
            (0..100u64)
                .filter(|r| f.delay_for(&req, *r).is_some())
                .count(),
            10
        );
        h.insert(
            "x-envoy-fault-delay-request-percentage",
            "90".parse().unwrap(),
        );
        let req = RequestView::new("h", "/", &h);
        assert_eq!(
            (0..100u64)
                .filter(|r| f.delay_for(&req, *r).is_some())
                .count(),
            30
        );
    }

    #[test]
    fn header_controlled_faults() {
        let f = Fault {
            delay: Some(FaultDelay {
                kind: FaultDelayKind::Header,
                percentage: all(),
            }),
            abort: Some(FaultAbort {
                kind: FaultAbortKind::Header,
                percentage: all(),
                body: None,
            }),
            upstream_cluster: Some("c".into()),
            ..Fault::default()
        };
        let mut h = HeaderMap::new();
        let req = RequestView::new("h", "/", &h);
        assert_eq!(f.delay_for(&req, 0), None);
        assert_eq!(f.abort_for(&req, 0), None);
        h.insert("x-envoy-fault-delay-request", "250".parse().unwrap());
        h.insert("x-envoy-fault-abort-request", "503".parse().unwrap());
        let req = RequestView::new("h", "/", &h);
        assert_eq!(f.delay_for(&req, 0), Some(Duration::from_millis(250)));
        assert_eq!(f.abort_for(&req, 0), Some(Abort::Http(503)));
        assert!(f.applies(&req, "c") && !f.applies(&req, "d"));
        h.insert("x-envoy-fault-abort-request", "700".parse().unwrap());
        h.insert("x-envoy-fault-abort-grpc-request", "14".parse().unwrap());
        let req = RequestView::new("h", "/", &h);
        assert_eq!(f.abort_for(&req, 0), Some(Abort::Grpc(14)));
    }
}
