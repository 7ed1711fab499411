//! RDS route configurations, compiled for lookup: virtual hosts indexed by domain (exact hash
//! lookup, then the longest `*.suffix`, the longest `prefix*`, then `*`, as Envoy orders
//! them) and routes matched first-wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;

/// How a route matches the path.
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// `prefix`.
    Prefix(String),
    /// `path` (exact).
    Exact(String),
    /// `safe_regex`, anchored to match the whole path (RE2 semantics, linear time).
    Regex(regex::Regex),
}

/// How a header matcher compares a value.
#[derive(Clone, Debug)]
pub enum HeaderValueMatch {
    /// `present_match: true`.
    Present,
    /// `string_match.exact`.
    Exact(String),
    /// `string_match.prefix`.
    Prefix(String),
    /// `string_match.suffix`.
    Suffix(String),
    /// `string_match.contains`.
    Contains(String),
    /// `string_match.safe_regex` (whole value).
    Regex(regex::Regex),
}

/// A header matcher of a route.
#[derive(Clone, Debug)]
pub struct HeaderMatcher {
    /// Header name, lower case.
    pub name: String,
    /// Comparison.
    pub value: HeaderValueMatch,
    /// `invert_match`.
    pub invert: bool,
}

impl HeaderMatcher {
    /// Envoy joins repeated headers with `,` before comparing.
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(self.name.as_str()).iter();
        let hit = match values.next() {
            None => false,
            Some(first) => {
                let joined;
                let v: &str = match values.next() {
                    None => first.to_str().unwrap_or(""),
                    Some(second) => {
                        let mut s = String::from(first.to_str().unwrap_or(""));
                        for x in std::iter::once(second).chain(values) {
                            s.push(',');
                            s.push_str(x.to_str().unwrap_or(""));
                        }
                        joined = s;
                        &joined
                    }
                };
                match &self.value {
                    HeaderValueMatch::Present => true,
                    HeaderValueMatch::Exact(e) => v == e,
                    HeaderValueMatch::Prefix(p) => v.starts_with(p.as_str()),
                    HeaderValueMatch::Suffix(p) => v.ends_with(p.as_str()),
                    HeaderValueMatch::Contains(p) => v.contains(p.as_str()),
                    HeaderValueMatch::Regex(r) => r.is_match(v),
                }
            }
        };
        hit != self.invert
    }
}

/// A route's match.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// `case_sensitive` (default true).
    pub case_sensitive: bool,
    /// Header conditions (all must hold).
    pub headers: Vec<HeaderMatcher>,
}

impl RouteMatch {
    /// `prefix: "/"`: matches everything.
    pub fn any() -> Self {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            case_sensitive: true,
            headers: Vec::new(),
        }
    }

    /// Whether a request with this path (query excluded) and headers matches.
    pub fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => {
                if self.case_sensitive {
                    path.starts_with(p.as_str())
                } else {
                    path.len() >= p.len()
                        && path.is_char_boundary(p.len())
                        && path[..p.len()].eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok && self.headers.iter().all(|h| h.matches(headers))
    }
}

/// One weighted destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedCluster {
    /// Cluster name.
    pub name: String,
    /// Weight.
    pub weight: u32,
}

/// `weighted_clusters`: weights and their running total, picked by a per-route counter spread
/// over the total.
#[derive(Debug)]
pub struct WeightedClusters {
    /// Destinations with non-zero weight.
    pub clusters: Vec<WeightedCluster>,
    /// Sum of weights (or `total_weight` when given).
    pub total: u64,
}

impl Clone for WeightedClusters {
    fn clone(&self) -> Self {
        WeightedClusters {
            clusters: self.clusters.clone(),
            total: self.total,
        }
    }
}

impl WeightedClusters {
    /// Builds from destinations; zero weights are dropped as istiod drops them.
    pub fn new(clusters: Vec<WeightedCluster>) -> Self {
        let clusters: Vec<_> = clusters.into_iter().filter(|c| c.weight > 0).collect();
        let total = clusters.iter().map(|c| u64::from(c.weight)).sum();
        WeightedClusters { clusters, total }
    }

    /// Picks the destination for `value` in `0..total` (Envoy draws a random value).
    pub fn pick(&self, value: u64) -> Option<&str> {
        if self.total == 0 {
            return None;
        }
        let mut v = value % self.total;
        for c in &self.clusters {
            let w = u64::from(c.weight);
            if v < w {
                return Some(&c.name);
            }
            v -= w;
        }
        self.clusters.last().map(|c| c.name.as_str())
    }
}

/// What a matched route does.
#[derive(Clone, Debug)]
pub enum RouteAction {
    /// Send to one cluster.
    Cluster(String),
    /// Split across clusters by weight.
    Weighted(WeightedClusters),
    /// Answer directly (`direct_response`), e.g. istiod's `block_all` 502.
    DirectResponse {
        /// Status code.
        status: u16,
        /// Body.
        body: Option<String>,
    },
    /// Redirect (`redirect`).
    Redirect {
        /// Status code (301 by default).
        status: u16,
        /// New host, if replaced.
        host: Option<String>,
        /// New path, if replaced.
        path: Option<String>,
    },
}

/// A retry policy (issue 4 deepens it: only the count and the conditions are carried now).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RetryPolicy {
    /// `retry_on` conditions as istiod writes them.
    pub retry_on: Vec<String>,
    /// `num_retries`.
    pub num_retries: u32,
    /// `per_try_timeout`.
    pub per_try_timeout: Option<Duration>,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
}

/// One route.
#[derive(Clone, Debug)]
pub struct Route {
    /// Route name (istiod names VirtualService routes; the default is `default`).
    pub name: String,
    /// Match.
    pub matcher: RouteMatch,
    /// Action.
    pub action: RouteAction,
    /// Route timeout; `None` or zero = no timeout (istiod's default `0s`).
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<RetryPolicy>,
}

/// A virtual host.
#[derive(Clone, Debug)]
pub struct VirtualHost {
    /// Name, e.g. `reviews.default.svc.cluster.local:9080`.
    pub name: String,
    /// Domains as RDS sent them.
    pub domains: Vec<String>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

/// A route configuration with its domain index.
#[derive(Debug)]
pub struct RouteConfig {
    /// Name (`"9080"` for istiod's per-port outbound routes).
    pub name: String,
    /// Virtual hosts.
    pub virtual_hosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    suffixes: Vec<(String, usize)>,
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
    ignore_port_in_host_matching: bool,
    weighted_draws: AtomicU64,
}

/// Why a virtual host's domains cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteConfigError {
    /// Two virtual hosts claim the same domain (Envoy rejects this).
    #[error("route config {config:?}: domain {domain:?} appears in more than one virtual host")]
    DuplicateDomain {
        /// Route configuration.
        config: String,
        /// The domain.
        domain: String,
    },
    /// A domain has a wildcard in the middle.
    #[error("route config {config:?}: invalid wildcard domain {domain:?}")]
    InvalidWildcard {
        /// Route configuration.
        config: String,
        /// The domain.
        domain: String,
    },
}

/// The outcome of looking a request up in a route configuration.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatchResult<'a> {
    /// The virtual host selected by authority.
    pub virtual_host: &'a VirtualHost,
    /// The first route that matched.
    pub route: &'a Route,
}

impl RouteConfig {
    /// Indexes the virtual hosts' domains. Domains are compared lower-case, as Envoy does.
    pub fn new(name: impl Into<String>, virtual_hosts: Vec<VirtualHost>) -> Result<Self, RouteConfigError> {
        let name = name.into();
        let mut exact = HashMap::new();
        let mut suffixes = Vec::new();
        let mut prefixes = Vec::new();
        let mut any = None;
        let mut seen = std::collections::HashSet::new();
        for (i, vh) in virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if !seen.insert(d.clone()) {
                    return Err(RouteConfigError::DuplicateDomain {
                        config: name,
                        domain: d,
                    });
                }
                let stars = d.matches('*').count();
                if d == "*" {
                    any = Some(i);
                } else if stars == 0 {
                    exact.insert(d, i);
                } else if stars == 1 && d.starts_with('*') {
                    suffixes.push((d[1..].to_owned(), i));
                } else if stars == 1 && d.ends_with('*') {
                    prefixes.push((d[..d.len() - 1].to_owned(), i));
                } else {
                    return Err(RouteConfigError::InvalidWildcard {
                        config: name,
                        domain: d,
                    });
                }
            }
        }
        // Longest wildcard wins; stable sort keeps configuration order among equals.
        suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        Ok(RouteConfig {
            name,
            virtual_hosts,
            exact,
            suffixes,
            prefixes,
            any,
            ignore_port_in_host_matching: false,
            weighted_draws: AtomicU64::new(0),
        })
    }

    /// `ignore_port_in_host_matching`: match the authority without its port (istiod sets it
    /// and lists domains without ports).
    pub fn with_ignore_port_in_host_matching(mut self, ignore: bool) -> Self {
        self.ignore_port_in_host_matching = ignore;
        self
    }

    /// The virtual host for an authority (`host` or `host:port`).
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let authority = if self.ignore_port_in_host_matching {
            strip_port(authority)
        } else {
            authority
        };
        let idx = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            self.lookup(&authority.to_ascii_lowercase())
        } else {
            self.lookup(authority)
        };
        idx.map(|i| &self.virtual_hosts[i])
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        // Envoy requires the wildcard to match at least one character.
        for (suffix, i) in &self.suffixes {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefixes {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(*i);
            }
        }
        self.any
    }

    /// Selects virtual host and first matching route. `path` may include a query, which is
    /// ignored for matching.
    pub fn route(&self, authority: &str, path: &str, headers: &HeaderMap) -> Option<RouteMatchResult<'_>> {
        let vh = self.virtual_host(authority)?;
        let path = path.split_once('?').map(|(p, _)| p).unwrap_or(path);
        let route = vh.routes.iter().find(|r| r.matcher.matches(path, headers))?;
        Some(RouteMatchResult {
            virtual_host: vh,
            route,
        })
    }

    /// Picks a cluster for a weighted action. Draws are spread evenly over the weight total
    /// (a deterministic stride rather than Envoy's random draw, so small samples already show
    /// the configured split).
    pub fn pick_weighted<'a>(&self, w: &'a WeightedClusters) -> Option<&'a str> {
        // Golden-ratio stride over 0..total.
        let n = self.weighted_draws.fetch_add(1, Ordering::Relaxed);
        let total = w.total.max(1);
        let stride = ((total as f64) * 0.618_033_988_75).round() as u64;
        let stride = if stride == 0 || gcd(stride, total) != 1 { coprime_near(stride.max(1), total) } else { stride };
        w.pick(n.wrapping_mul(stride) % total)
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`; anything else unchanged.
fn strip_port(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i)
            if authority[i + 1..].bytes().all(|b| b.is_ascii_digit())
                && (!authority.contains('[') || authority[..i].ends_with(']'))
                && (authority.contains('[') || authority.matches(':').count() == 1) =>
        {
            &authority[..i]
        }
        _ => authority,
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn coprime_near(mut s: u64, total: u64) -> u64 {
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str], cluster: &str) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![Route {
                name: "default".into(),
                matcher: RouteMatch::any(),
                action: RouteAction::Cluster(cluster.into()),
                timeout: None,
                retry: None,
            }],
        }
    }

    fn cluster_of(rc: &RouteConfig, authority: &str) -> Option<String> {
        rc.route(authority, "/", &HeaderMap::new()).map(|m| match &m.route.action {
            RouteAction::Cluster(c) => c.clone(),
            _ => unreachable!(),
        })
    }

    #[test]
    fn domain_precedence_is_envoys() {
        let rc = RouteConfig::new(
            "80",
            vec![
                vh("any", &["*"], "any"),
                vh("suffix-short", &["*.com"], "short"),
                vh("suffix-long", &["*.foo.com"], "long"),
                vh("prefix", &["foo.*"], "prefix"),
                vh("exact", &["foo.com", "foo.com:80"], "exact"),
            ],
        )
        .unwrap();
        assert_eq!(cluster_of(&rc, "foo.com").unwrap(), "exact");
        assert_eq!(cluster_of(&rc, "FOO.com:80").unwrap(), "exact");
        assert_eq!(cluster_of(&rc, "a.foo.com").unwrap(), "long");
        assert_eq!(cluster_of(&rc, "a.bar.com").unwrap(), "short");
        assert_eq!(cluster_of(&rc, "foo.org").unwrap(), "prefix");
        assert_eq!(cluster_of(&rc, "bar.org").unwrap(), "any");
        // A wildcard must cover at least one character.
        assert_eq!(cluster_of(&rc, ".foo.com").unwrap(), "short");
    }

    #[test]
    fn port_can_be_ignored_in_host_matching() {
        let rc = RouteConfig::new("80", vec![vh("r", &["reviews", "[::1]"], "r")]).unwrap();
        assert!(cluster_of(&rc, "reviews:9080").is_none());
        let rc = rc.with_ignore_port_in_host_matching(true);
        assert_eq!(cluster_of(&rc, "reviews:9080").unwrap(), "r");
        assert_eq!(cluster_of(&rc, "reviews").unwrap(), "r");
        assert_eq!(cluster_of(&rc, "[::1]:80").unwrap(), "r");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn duplicate_domains_are_rejected() {
        let e = RouteConfig::new("80", vec![vh("a", &["x"], "a"), vh("b", &["X"], "b")]).unwrap_err();
        assert!(matches!(e, RouteConfigError::DuplicateDomain { .. }));
        let e = RouteConfig::new("80", vec![vh("a", &["a*b"], "a")]).unwrap_err();
        assert!(matches!(e, RouteConfigError::InvalidWildcard { .. }));
    }

    #[test]
    fn first_matching_route_wins() {
        let mut v = vh("h", &["h"], "fallback");
        v.routes.insert(
            0,
            Route {
                name: "api".into(),
                matcher: RouteMatch {
                    path: PathMatch::Prefix("/API".into()),
                    case_sensitive: false,
                    headers: vec![HeaderMatcher {
                        name: "x-user".into(),
                        value: HeaderValueMatch::Exact("a,b".into()),
                        invert: false,
                    }],
                },
                action: RouteAction::Cluster("api".into()),
                timeout: None,
                retry: None,
            },
        );
        let rc = RouteConfig::new("80", vec![v]).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(rc.route("h", "/api/x?q=1", &h).unwrap().route.name, "default");
        h.append("x-user", "a".parse().unwrap());
        h.append("x-user", "b".parse().unwrap());
        assert_eq!(rc.route("h", "/api/x?q=1", &h).unwrap().route.name, "api");
        assert!(rc.route("nohost", "/", &h).is_none());
    }

    #[test]
    fn weighted_split_follows_weights() {
        let rc = RouteConfig::new("80", vec![]).unwrap();
        let w = WeightedClusters::new(vec![
            WeightedCluster { name: "v1".into(), weight: 90 },
            WeightedCluster { name: "v2".into(), weight: 10 },
            WeightedCluster { name: "v3".into(), weight: 0 },
        ]);
        let mut v1 = 0;
        for _ in 0..100 {
            if rc.pick_weighted(&w) == Some("v1") {
                v1 += 1;
            }
        }
        assert_eq!(v1, 90);
        assert_eq!(w.clusters.len(), 2);
    }
}
