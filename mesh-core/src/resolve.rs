//! The resolver seam: mesh-dns implements it (NDS table first, then upstream DNS); the
//! outbound side uses it for hosts outside the mesh (PassthroughCluster) and for the hosts of
//! `STRICT_DNS` / `LOGICAL_DNS` clusters.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

/// A name could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot resolve {host}: {reason}")]
pub struct ResolveError {
    /// Host asked for.
    pub host: String,
    /// Why.
    pub reason: String,
}

/// The future a resolver returns.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Envoy's `dns_lookup_family`: which address families a DNS cluster asks for and keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum LookupFamily {
    /// `AUTO` (the cluster field's default): IPv6 addresses, or IPv4 when there are none.
    #[default]
    Auto,
    /// `V4_ONLY` (what istiod renders for IPv4-only proxies).
    V4Only,
    /// `V6_ONLY`.
    V6Only,
    /// `V4_PREFERRED`: IPv4 addresses, or IPv6 when there are none.
    V4Preferred,
    /// `ALL`: IPv4 and IPv6 addresses (IPv4 first).
    All,
}

impl LookupFamily {
    /// The addresses of a mixed answer this family keeps, in Envoy's order (for `AUTO` and
    /// `V4_PREFERRED` the preferred family only, when it has any).
    pub fn select(self, addrs: &[IpAddr]) -> Vec<IpAddr> {
        let v4 = || addrs.iter().copied().filter(IpAddr::is_ipv4);
        let v6 = || addrs.iter().copied().filter(IpAddr::is_ipv6);
        match self {
            LookupFamily::V4Only => v4().collect(),
            LookupFamily::V6Only => v6().collect(),
            LookupFamily::Auto if v6().next().is_some() => v6().collect(),
            LookupFamily::Auto => v4().collect(),
            LookupFamily::V4Preferred if v4().next().is_some() => v4().collect(),
            LookupFamily::V4Preferred => v6().collect(),
            LookupFamily::All => v4().chain(v6()).collect(),
        }
    }
}

/// A DNS cluster's answer for one host name.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resolved {
    /// The addresses, in the answer's order; empty when the name exists nowhere or has no
    /// address of the family asked for (NXDOMAIN / NODATA: a successful, empty answer, as
    /// Envoy treats them).
    pub addrs: Vec<IpAddr>,
    /// How long the answer may be cached (the records' smallest TTL); `None` when the answer
    /// did not come from DNS (an IP literal, the NDS name table).
    pub ttl: Option<Duration>,
}

/// The future of [`Resolve::lookup`].
pub type LookupFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Resolved, ResolveError>> + Send + 'a>>;

/// Resolves a host name to addresses.
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// Addresses for `host`.
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;

    /// What a DNS cluster asks: the addresses of `family` for `host`, with the answer's TTL.
    /// `Ok` with no addresses means the name has none (NXDOMAIN, NODATA); `Err` means the
    /// resolution failed (timeout, SERVFAIL, no resolver), and a DNS cluster keeps its hosts.
    ///
    /// The default asks [`resolve`](Self::resolve) and keeps `family`'s addresses, with no
    /// TTL; its failures are all `Err`.
    fn lookup<'a>(&'a self, host: &'a str, family: LookupFamily) -> LookupFuture<'a> {
        Box::pin(async move {
            let addrs = self.resolve(host).await?;
            Ok(Resolved {
                addrs: family.select(&addrs),
                ttl: None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn lookup_families_keep_what_envoy_keeps() {
        let mixed = ips(&["10.0.0.1", "fd00::1", "10.0.0.2", "fd00::2"]);
        let v4 = ips(&["10.0.0.1", "10.0.0.2"]);
        let v6 = ips(&["fd00::1", "fd00::2"]);
        assert_eq!(LookupFamily::V4Only.select(&mixed), v4);
        assert_eq!(LookupFamily::V6Only.select(&mixed), v6);
        assert_eq!(LookupFamily::Auto.select(&mixed), v6);
        assert_eq!(LookupFamily::Auto.select(&v4), v4);
        assert_eq!(LookupFamily::V4Preferred.select(&mixed), v4);
        assert_eq!(LookupFamily::V4Preferred.select(&v6), v6);
        assert_eq!(
            LookupFamily::All.select(&mixed),
            ips(&["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"])
        );
        assert!(LookupFamily::V6Only.select(&v4).is_empty());
    }
}
