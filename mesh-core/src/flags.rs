//! Envoy's response flags, as they appear in access logs and in Istio's `response_flags` label.
//!
//! A response can carry several flags (after exhausted retries on connection failures Envoy
//! logs `URX,UF`), so [`ResponseFlags`] is a small bitset. Its constants carry Envoy's flag
//! names (`ResponseFlags::UpstreamConnectionFailure`, …); sets render comma-joined in the
//! order Envoy sets them. [`ResponseFlag`] is the same type under its older, singular name.

use std::fmt;
use std::sync::OnceLock;

/// A set of Envoy response flags; `Copy` and one word wide. Only the flags mesh can produce
/// exist; the empty set prints `-` ([`ResponseFlags::None`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ResponseFlags(u16);

/// The older name of [`ResponseFlags`]: one flag is a set of one.
pub type ResponseFlag = ResponseFlags;

/// Rendering order and short names: bit `i` of a set is `ORDER[i]`, so iterating the bits in
/// ascending order renders them. Envoy 1.40 logs flags in the order it set them, and along the
/// request path that order is fixed: fault injection (`DI`, `FI`) and authorization before the
/// router; then the retry verdict (`URX`, or `UO` when the retry breaker is full) before the
/// cause of the failure (`UH`, `UT`, `UF`, `UC`, …). A real Envoy 1.40 logs `URX,UF` for a
/// connection failure after exhausted retries (tests/routing_oracle.rs checks it). The
/// connection manager's stream idle timer (`SI`) fires after whatever the router had set.
const ORDER: [&str; 15] = [
    "DI", "FI", "UAEX", "RBAC", "URX", "UO", "UH", "UT", "UF", "UC", "SI", "NR", "NC", "DC", "DPE",
];

#[allow(non_upper_case_globals)]
impl ResponseFlags {
    /// No flag: `-`.
    pub const None: ResponseFlags = ResponseFlags(0);
    /// `UH`: no healthy upstream host (503).
    pub const NoHealthyUpstream: ResponseFlags = ResponseFlags(1 << 6);
    /// `UT`: upstream request timeout (504).
    pub const UpstreamRequestTimeout: ResponseFlags = ResponseFlags(1 << 7);
    /// `UF`: upstream connection failure (503).
    pub const UpstreamConnectionFailure: ResponseFlags = ResponseFlags(1 << 8);
    /// `UC`: upstream connection terminated (503).
    pub const UpstreamConnectionTermination: ResponseFlags = ResponseFlags(1 << 9);
    /// `UO`: upstream overflow, circuit breaker open (503).
    pub const UpstreamOverflow: ResponseFlags = ResponseFlags(1 << 5);
    /// `NR`: no route configured for the request (404).
    pub const NoRouteFound: ResponseFlags = ResponseFlags(1 << 11);
    /// `DI`: request delayed by fault injection.
    pub const DelayInjected: ResponseFlags = ResponseFlags(1 << 0);
    /// `FI`: request aborted by fault injection.
    pub const FaultInjected: ResponseFlags = ResponseFlags(1 << 1);
    /// `UAEX`: denied by external authorization.
    pub const UnauthorizedExternalService: ResponseFlags = ResponseFlags(1 << 2);
    /// `DC`: downstream connection terminated.
    pub const DownstreamConnectionTermination: ResponseFlags = ResponseFlags(1 << 13);
    /// `URX`: upstream retry limit exceeded.
    pub const UpstreamRetryLimitExceeded: ResponseFlags = ResponseFlags(1 << 4);
    /// `DPE`: downstream protocol error.
    pub const DownstreamProtocolError: ResponseFlags = ResponseFlags(1 << 14);
    /// `NC`: the route's cluster does not exist (503).
    pub const NoClusterFound: ResponseFlags = ResponseFlags(1 << 12);
    /// `SI`: the stream idle timeout fired (504 `stream timeout`, or 408 while the request
    /// was still arriving).
    pub const StreamIdleTimeout: ResponseFlags = ResponseFlags(1 << 10);
    /// `RBAC`: denied by the RBAC filter (403 `RBAC: access denied`).
    pub const RbacAccessDenied: ResponseFlags = ResponseFlags(1 << 3);

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// This set with the flags of `other` added.
    #[must_use]
    pub fn with(self, other: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | other.0)
    }

    /// Adds the flags of `other`.
    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    /// The flags one by one, in Envoy's order.
    pub fn iter(self) -> impl Iterator<Item = ResponseFlags> {
        (0..ORDER.len())
            .map(|i| ResponseFlags(1 << i))
            .filter(move |f| self.contains(*f))
    }

    /// The form Envoy prints: `-`, `UF`, `URX,UF`. Allocation-free: single flags and sets of
    /// up to three flags come from a table built once; a larger set (mesh never produces
    /// one) prints its first three flags here and all of them through `Display`.
    pub fn as_str(self) -> &'static str {
        if self.0 == 0 {
            return "-";
        }
        if self.0.is_power_of_two() {
            return ORDER[self.0.trailing_zeros() as usize];
        }
        let table = combinations();
        let mut key = self.0;
        while key.count_ones() > 3 {
            // Drop the last flags in Envoy's order.
            key &= !(1 << (15 - key.leading_zeros()));
        }
        table
            .binary_search_by_key(&key, |e| e.0)
            .map_or("-", |i| table[i].1.as_str())
    }

    /// The status code Envoy answers with when it produces this flag itself (the most
    /// telling flag of a set decides: retry exhaustion keeps its cause's status).
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        if self.contains(ResponseFlags::NoRouteFound) {
            S::NOT_FOUND
        } else if self.contains(ResponseFlags::UpstreamRequestTimeout)
            || self.contains(ResponseFlags::StreamIdleTimeout)
        {
            S::GATEWAY_TIMEOUT
        } else if self.contains(ResponseFlags::RbacAccessDenied)
            || self.contains(ResponseFlags::UnauthorizedExternalService)
        {
            S::FORBIDDEN
        } else if self.contains(ResponseFlags::DownstreamProtocolError) {
            S::BAD_REQUEST
        } else if (self.0 & !ResponseFlags::DelayInjected.0) == 0 {
            S::OK
        } else {
            S::SERVICE_UNAVAILABLE
        }
    }
}

/// Every set of two or three flags with its rendering, sorted by bits; built on first use.
#[allow(clippy::needless_range_loop)] // the indices are the bits
fn combinations() -> &'static [(u16, String)] {
    static TABLE: OnceLock<Vec<(u16, String)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let n = ORDER.len();
        let mut v = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                v.push((1u16 << a | 1 << b, format!("{},{}", ORDER[a], ORDER[b])));
                for c in b + 1..n {
                    v.push((
                        1u16 << a | 1 << b | 1 << c,
                        format!("{},{},{}", ORDER[a], ORDER[b], ORDER[c]),
                    ));
                }
            }
        }
        v.sort_unstable_by_key(|e| e.0);
        v
    })
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        self.with(rhs)
    }
}

impl std::ops::BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: ResponseFlags) {
        self.insert(rhs);
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.count_ones() <= 3 {
            return f.write_str(self.as_str());
        }
        for (i, flag) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(flag.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::ResponseFlags as F;

    #[test]
    fn sets_render_in_envoys_order() {
        assert_eq!(F::None.as_str(), "-");
        assert_eq!(F::UpstreamConnectionFailure.as_str(), "UF");
        let exhausted = F::UpstreamRetryLimitExceeded | F::UpstreamConnectionFailure;
        assert_eq!(exhausted.as_str(), "URX,UF");
        assert_eq!(exhausted.to_string(), "URX,UF");
        assert_eq!(
            (F::UpstreamRequestTimeout | F::UpstreamRetryLimitExceeded).as_str(),
            "URX,UT"
        );
        assert_eq!(
            (F::DelayInjected | F::UpstreamConnectionTermination | F::UpstreamRetryLimitExceeded)
                .as_str(),
            "DI,URX,UC"
        );
        assert_eq!(
            (F::UpstreamConnectionFailure | F::UpstreamOverflow).as_str(),
            "UO,UF"
        );
        let four = F::NoHealthyUpstream | F::DelayInjected | F::FaultInjected | F::NoClusterFound;
        assert_eq!(four.to_string(), "DI,FI,UH,NC");
        assert_eq!(four.as_str(), "DI,FI,UH");
        assert!(exhausted.contains(F::UpstreamConnectionFailure));
        assert!(!exhausted.contains(F::UpstreamOverflow));
        assert_eq!(exhausted.iter().count(), 2);
        assert_eq!(std::mem::size_of::<F>(), 2);
    }

    #[test]
    fn status_follows_the_cause() {
        assert_eq!(F::NoRouteFound.status(), 404);
        assert_eq!(
            (F::UpstreamRequestTimeout | F::UpstreamRetryLimitExceeded).status(),
            504
        );
        assert_eq!(
            (F::UpstreamConnectionFailure | F::UpstreamRetryLimitExceeded).status(),
            503
        );
        assert_eq!(F::DelayInjected.status(), 200);
        assert_eq!(F::None.status(), 200);
        assert_eq!(F::RbacAccessDenied.status(), 403);
        assert_eq!(F::UpstreamOverflow.status(), 503);
        assert_eq!(F::StreamIdleTimeout.status(), 504);
    }

    #[test]
    fn every_flag_has_its_own_bit_and_name() {
        let all = [
            (F::DelayInjected, "DI"),
            (F::FaultInjected, "FI"),
            (F::UnauthorizedExternalService, "UAEX"),
            (F::RbacAccessDenied, "RBAC"),
            (F::UpstreamRetryLimitExceeded, "URX"),
            (F::UpstreamOverflow, "UO"),
            (F::NoHealthyUpstream, "UH"),
            (F::UpstreamRequestTimeout, "UT"),
            (F::UpstreamConnectionFailure, "UF"),
            (F::UpstreamConnectionTermination, "UC"),
            (F::StreamIdleTimeout, "SI"),
            (F::NoRouteFound, "NR"),
            (F::NoClusterFound, "NC"),
            (F::DownstreamConnectionTermination, "DC"),
            (F::DownstreamProtocolError, "DPE"),
        ];
        for (f, name) in all {
            assert_eq!(f.as_str(), name);
        }
        assert_eq!(
            (F::StreamIdleTimeout | F::UpstreamRetryLimitExceeded | F::DelayInjected).as_str(),
            "DI,URX,SI"
        );
    }
}
