//! Envoy's response flags, as they appear in access logs and in Istio's `response_flags` label.

use std::fmt;

/// One Envoy response flag. Only the flags mesh can produce are listed; `-` is
/// [`ResponseFlag::None`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// No flag: `-`.
    None,
    /// `NR`: no route configured for the request (404).
    NoRouteFound,
    /// `NC`: the route's cluster does not exist (503).
    NoClusterFound,
    /// `UH`: no healthy upstream host (503).
    NoHealthyUpstream,
    /// `UF`: upstream connection failure (503).
    UpstreamConnectionFailure,
    /// `UO`: upstream overflow, circuit breaker open (503).
    UpstreamOverflow,
    /// `UT`: upstream request timeout (504).
    UpstreamRequestTimeout,
    /// `UC`: upstream connection terminated (503).
    UpstreamConnectionTermination,
    /// `URX`: upstream retry limit exceeded.
    UpstreamRetryLimitExceeded,
    /// `DC`: downstream connection terminated.
    DownstreamConnectionTermination,
    /// `DI`: request delayed by fault injection.
    DelayInjected,
    /// `FI`: request aborted by fault injection.
    FaultInjected,
    /// `UAEX`: denied by external authorization.
    UnauthorizedExternalService,
    /// `RBAC`: denied by the RBAC filter (403 `RBAC: access denied`).
    RbacAccessDenied,
    /// `DPE`: downstream protocol error.
    DownstreamProtocolError,
}

impl ResponseFlag {
    /// The short form Envoy prints (`UF`, `NR`, `-`).
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::UnauthorizedExternalService => "UAEX",
            ResponseFlag::RbacAccessDenied => "RBAC",
            ResponseFlag::DownstreamProtocolError => "DPE",
        }
    }

    /// The status code Envoy answers with when it produces this flag itself.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ResponseFlag::NoRouteFound => S::NOT_FOUND,
            ResponseFlag::UpstreamRequestTimeout => S::GATEWAY_TIMEOUT,
            ResponseFlag::RbacAccessDenied | ResponseFlag::UnauthorizedExternalService => {
                S::FORBIDDEN
            }
            ResponseFlag::DownstreamProtocolError => S::BAD_REQUEST,
            ResponseFlag::None | ResponseFlag::DelayInjected => S::OK,
            _ => S::SERVICE_UNAVAILABLE,
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
