//! RDS route configurations, compiled for lookup: virtual hosts indexed by domain (exact hash
//! lookup, then the longest `*.suffix`, the longest `prefix*`, then `*`, as Envoy orders
//! them) and routes matched first-wins.
//!
//! Matching follows Envoy 1.40 as observed against the real binary (see the root crate's
//! `tests/routing_oracle.rs`):
//! - the path is matched without its query (and fragment); `safe_regex` must match the whole
//!   path and ignores `case_sensitive`; `path_separated_prefix` matches the prefix itself or
//!   the prefix followed by `/`;
//! - a header matcher looks at every value of a repeated header separately and matches if any
//!   value does (values are *not* joined); `invert_match` negates that; a missing header never
//!   matches a value matcher, even inverted, unless `treat_missing_header_as_empty`;
//!   `present_match: false` matches only a missing header;
//! - `host`/`:authority`, `:path`, `:method` and `:scheme` can be matched as headers (the
//!   authority as sent, not lower-cased);
//! - query parameters are compared raw (not percent-decoded), first occurrence only;
//! - `grpc` matches a `content-type` of exactly `application/grpc` or `application/grpc+…`.
//!
//! Matching allocates nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};

/// The parts of a request that route matching reads.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// `:authority` / `Host` as sent (may carry a port).
    pub authority: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    /// `:method`.
    pub method: &'a str,
    /// `:scheme` (`http` for plaintext application traffic).
    pub scheme: &'a str,
    /// The other headers.
    pub headers: &'a HeaderMap,
    /// The request's random value (Envoy's stream id, drawn once per request): every
    /// `runtime_fraction` of the route table and the `weighted_clusters` pick read this one
    /// value, as Envoy's do — so two back-to-back 50 % routes give the second none of the
    /// traffic, and a 50 % route's weighted split is decided by the same draw.
    pub random: u64,
}

impl<'a> RequestView<'a> {
    /// A `GET` over `http` for `authority` and `path` with `headers`.
    pub fn new(authority: &'a str, path: &'a str, headers: &'a HeaderMap) -> Self {
        RequestView {
            authority,
            path,
            method: "GET",
            scheme: "http",
            headers,
            random: rand::random(),
        }
    }

    /// The same request with a given random value (for tests and replays).
    pub fn with_random(mut self, random: u64) -> Self {
        self.random = random;
        self
    }

    /// The same request with another method.
    pub fn with_method(mut self, method: &'a str) -> Self {
        self.method = method;
        self
    }

    /// The path without query and fragment.
    pub fn path_only(&self) -> &'a str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }

    /// The query string (after `?`, before `#`), if any.
    pub fn query(&self) -> Option<&'a str> {
        let q = &self.path[self.path.find('?')? + 1..];
        Some(&q[..q.find('#').unwrap_or(q.len())])
    }
}

/// How a route matches the path.
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// `prefix`.
    Prefix(String),
    /// `path` (exact).
    Exact(String),
    /// `safe_regex`, anchored to match the whole path (RE2 semantics, linear time).
    Regex(regex::Regex),
    /// `path_separated_prefix`: the prefix itself, or the prefix followed by `/`.
    SeparatedPrefix(String),
}

/// A literal or regex comparison of a string, Envoy's `StringMatcher`.
#[derive(Clone, Debug)]
pub enum StringPattern {
    /// `exact`.
    Exact(String),
    /// `prefix`.
    Prefix(String),
    /// `suffix`.
    Suffix(String),
    /// `contains`.
    Contains(String),
    /// `safe_regex`, anchored to the whole value.
    Regex(regex::Regex),
}

/// Envoy's `StringMatcher`: a pattern and `ignore_case` (ASCII, literal patterns only).
#[derive(Clone, Debug)]
pub struct StringMatch {
    /// The pattern.
    pub pattern: StringPattern,
    /// `ignore_case` (Envoy refuses it for `safe_regex`).
    pub ignore_case: bool,
}

impl StringMatch {
    /// A case-sensitive match.
    pub fn new(pattern: StringPattern) -> Self {
        StringMatch {
            pattern,
            ignore_case: false,
        }
    }

    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        let ic = self.ignore_case;
        match &self.pattern {
            StringPattern::Exact(p) => {
                if ic {
                    v.eq_ignore_ascii_case(p)
                } else {
                    v == p
                }
            }
            StringPattern::Prefix(p) => starts_with(v, p, ic),
            StringPattern::Suffix(p) => {
                v.len() >= p.len() && {
                    let tail = &v.as_bytes()[v.len() - p.len()..];
                    if ic {
                        tail.eq_ignore_ascii_case(p.as_bytes())
                    } else {
                        tail == p.as_bytes()
                    }
                }
            }
            StringPattern::Contains(p) => {
                if ic {
                    let (v, p) = (v.as_bytes(), p.as_bytes());
                    p.is_empty() || v.windows(p.len()).any(|w| w.eq_ignore_ascii_case(p))
                } else {
                    v.contains(p.as_str())
                }
            }
            StringPattern::Regex(r) => r.is_match(v),
        }
    }
}

fn starts_with(v: &str, p: &str, ignore_case: bool) -> bool {
    v.len() >= p.len() && {
        let head = &v.as_bytes()[..p.len()];
        if ignore_case {
            head.eq_ignore_ascii_case(p.as_bytes())
        } else {
            head == p.as_bytes()
        }
    }
}

/// How a header matcher compares a value.
#[derive(Clone, Debug)]
pub enum HeaderValueMatch {
    /// `present_match` (`true`: the header is there; `false`: it is missing).
    Present(bool),
    /// `string_match` (and the deprecated `exact_match`, `prefix_match`, … forms).
    String(StringMatch),
    /// `range_match`: the value parses as a signed 64-bit integer in `start..end`.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// Where a header matcher reads its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderSource {
    /// `:authority` or `host`.
    Authority,
    /// `:path`.
    Path,
    /// `:method`.
    Method,
    /// `:scheme`.
    Scheme,
    /// A regular header.
    Header(HeaderName),
}

impl HeaderSource {
    /// The source for a header name as RDS spells it; `None` for a name that is no valid
    /// header name.
    pub fn for_name(name: &str) -> Option<HeaderSource> {
        let lower = name.to_ascii_lowercase();
        Some(match lower.as_str() {
            ":authority" | "host" => HeaderSource::Authority,
            ":path" => HeaderSource::Path,
            ":method" => HeaderSource::Method,
            ":scheme" => HeaderSource::Scheme,
            _ => HeaderSource::Header(HeaderName::from_bytes(lower.as_bytes()).ok()?),
        })
    }
}

/// A header matcher of a route.
#[derive(Clone, Debug)]
pub struct HeaderMatcher {
    /// Header name as configured, lower case.
    pub name: String,
    /// Where the value comes from.
    pub source: HeaderSource,
    /// Comparison.
    pub value: HeaderValueMatch,
    /// `invert_match`.
    pub invert: bool,
    /// `treat_missing_header_as_empty`.
    pub treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    /// A matcher on `name` (lower-cased; `None` if it is no valid header name).
    pub fn new(name: &str, value: HeaderValueMatch) -> Option<Self> {
        Some(HeaderMatcher {
            name: name.to_ascii_lowercase(),
            source: HeaderSource::for_name(name)?,
            value,
            invert: false,
            treat_missing_as_empty: false,
        })
    }

    /// The same matcher with `invert_match` set.
    pub fn inverted(mut self) -> Self {
        self.invert = !self.invert;
        self
    }

    fn value_matches(&self, v: &str) -> bool {
        match &self.value {
            HeaderValueMatch::Present(p) => *p,
            HeaderValueMatch::String(s) => s.matches(v),
            HeaderValueMatch::Range { start, end } => v
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| *start <= n && n < *end),
        }
    }

    /// Envoy's `HeaderUtility::matchHeaders` for one matcher.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let single = match &self.source {
            HeaderSource::Authority => Some(req.authority),
            HeaderSource::Path => Some(req.path),
            HeaderSource::Method => Some(req.method),
            HeaderSource::Scheme => Some(req.scheme),
            HeaderSource::Header(name) => {
                let mut values = req.headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    None
                } else {
                    let any = values.any(|v| self.value_matches(header_str(v)));
                    return any != self.invert;
                }
            }
        };
        match single {
            Some(v) => self.value_matches(v) != self.invert,
            None if self.treat_missing_as_empty => self.value_matches("") != self.invert,
            None => matches!(self.value, HeaderValueMatch::Present(p) if p == self.invert),
        }
    }
}

fn header_str(v: &http::HeaderValue) -> &str {
    // Non-UTF-8 bytes cannot equal a configured (UTF-8) pattern; compare the valid prefix.
    match std::str::from_utf8(v.as_bytes()) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&v.as_bytes()[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// A `query_parameters` matcher: the first occurrence of `name`, compared raw.
#[derive(Clone, Debug)]
pub struct QueryParameterMatcher {
    /// Parameter name (compared raw, case-sensitive).
    pub name: String,
    /// `string_match`, or `None` for `present_match`.
    pub value: Option<StringMatch>,
}

impl QueryParameterMatcher {
    /// Whether the query (without `?`) satisfies this matcher.
    pub fn matches(&self, query: Option<&str>) -> bool {
        let Some(q) = query else {
            return false;
        };
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == self.name {
                return self.value.as_ref().is_none_or(|m| m.matches(v));
            }
        }
        false
    }
}

/// `runtime_fraction`'s default value: `numerator` out of `denominator` requests match
/// (mesh has no runtime layer, so the key is ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fraction {
    /// Numerator.
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000.
    pub denominator: u32,
}

impl Fraction {
    /// Whether a draw of `random` falls inside the fraction (Envoy: `random % d < n`).
    pub fn hit(&self, random: u64) -> bool {
        self.denominator != 0 && random % u64::from(self.denominator) < u64::from(self.numerator)
    }
}

/// A route's match.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// `case_sensitive` (default true; not applied to `safe_regex`).
    pub case_sensitive: bool,
    /// Header conditions (all must hold).
    pub headers: Vec<HeaderMatcher>,
    /// Query parameter conditions (all must hold).
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// `grpc`: only gRPC requests.
    pub grpc: bool,
    /// `runtime_fraction`: only this share of requests.
    pub runtime_fraction: Option<Fraction>,
}

impl RouteMatch {
    /// `prefix: "/"`: matches everything.
    pub fn any() -> Self {
        RouteMatch::path(PathMatch::Prefix("/".into()))
    }

    /// A match on the path only.
    pub fn path(path: PathMatch) -> Self {
        RouteMatch {
            path,
            case_sensitive: true,
            headers: Vec::new(),
            query_parameters: Vec::new(),
            grpc: false,
            runtime_fraction: None,
        }
    }

    /// Whether a request with this path (query excluded) and headers matches (a `GET` over
    /// `http`).
    pub fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        self.matches_request(&RequestView::new("", path, headers))
    }

    /// Whether the request matches, in Envoy's order: path, headers, query, gRPC, fraction.
    pub fn matches_request(&self, req: &RequestView<'_>) -> bool {
        let path = req.path_only();
        let cs = self.case_sensitive;
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, !cs),
            PathMatch::Exact(p) => {
                if cs {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(path, p, !cs)
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        };
        path_ok
            && self.headers.iter().all(|h| h.matches(req))
            && (self.query_parameters.is_empty() || {
                let q = req.query();
                self.query_parameters.iter().all(|m| m.matches(q))
            })
            && (!self.grpc || is_grpc(req.headers))
            && self.runtime_fraction.is_none_or(|f| f.hit(req.random))
    }
}

/// Envoy's `Grpc::Common::hasGrpcContentType`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(GRPC) && (v.len() == GRPC.len() || v[GRPC.len()] == b'+')
    })
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
#[derive(Debug, Clone)]
pub struct WeightedClusters {
    /// Destinations with non-zero weight.
    pub clusters: Vec<WeightedCluster>,
    /// Sum of weights (or `total_weight` when given).
    pub total: u64,
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

/// How a redirect rewrites the path.
#[derive(Clone, Debug, Default)]
pub enum RedirectPath {
    /// Keep the request's path.
    #[default]
    Keep,
    /// `path_redirect`: replace the path (a query in it replaces the request's query).
    Path(String),
    /// `prefix_rewrite`: replace the matched prefix.
    Prefix(String),
    /// `regex_rewrite`: substitute on the path (query excluded).
    Regex(regex::Regex, String),
}

/// A `redirect` action.
#[derive(Clone, Debug)]
pub struct Redirect {
    /// Status code (301 by default).
    pub status: u16,
    /// `scheme_redirect` / `https_redirect`.
    pub scheme: Option<String>,
    /// `host_redirect`.
    pub host: Option<String>,
    /// `port_redirect`.
    pub port: Option<u16>,
    /// Path rewrite.
    pub path: RedirectPath,
    /// `strip_query`.
    pub strip_query: bool,
}

impl Redirect {
    /// A redirect to `host` (or the same host) with `status`.
    pub fn to_host(status: u16, host: Option<String>) -> Self {
        Redirect {
            status,
            scheme: None,
            host,
            port: None,
            path: RedirectPath::Keep,
            strip_query: false,
        }
    }
}

/// What a matched route does.
#[derive(Clone, Debug)]
pub enum RouteAction {
    /// Send to one cluster.
    Cluster(String),
    /// Split across clusters by weight.
    Weighted(WeightedClusters),
    /// `cluster_header`: the cluster named by this request header (503 `NC` if it is missing
    /// or unknown).
    ClusterHeader(HeaderName),
    /// Answer directly (`direct_response`), e.g. istiod's `block_all` 502.
    DirectResponse {
        /// Status code.
        status: u16,
        /// Body.
        body: Option<String>,
    },
    /// Redirect (`redirect`).
    Redirect(Redirect),
}

pub use crate::retry::RetryPolicy;

/// A route's `prefix_rewrite` / `regex_rewrite` applied when forwarding.
#[derive(Clone, Debug)]
pub enum PathRewrite {
    /// `prefix_rewrite`: replaces the matched prefix.
    Prefix(String),
    /// `regex_rewrite`: substitutes on the path (query kept).
    Regex(regex::Regex, String),
}

/// A route's host rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRewrite {
    /// `host_rewrite_literal`.
    Literal(String),
    /// `auto_host_rewrite`: the upstream host's hostname (EDS endpoints without a hostname
    /// leave the host unchanged, as in Envoy).
    Auto,
}

/// One `request_mirror_policies` entry: a fire-and-forget copy of the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorPolicy {
    /// The shadow cluster.
    pub cluster: String,
    /// `runtime_fraction` default value (`None`: every request).
    pub fraction: Option<Fraction>,
    /// `disable_shadow_host_suffix_append`.
    pub disable_shadow_host_suffix_append: bool,
}

/// What a route changes in the request and response when forwarding.
#[derive(Clone, Debug, Default)]
pub struct Forwarding {
    /// Path rewrite.
    pub path_rewrite: Option<PathRewrite>,
    /// Host rewrite.
    pub host_rewrite: Option<HostRewrite>,
    /// Request header mutations (route, virtual host, route configuration).
    pub request_headers: crate::headers::HeaderMutations,
    /// Response header mutations (route, virtual host, route configuration).
    pub response_headers: crate::headers::HeaderMutations,
    /// `request_mirror_policies` (the route's, else the virtual host's).
    pub mirrors: Vec<MirrorPolicy>,
}

impl Forwarding {
    /// Whether the route changes nothing.
    pub fn is_empty(&self) -> bool {
        self.path_rewrite.is_none()
            && self.host_rewrite.is_none()
            && self.request_headers.is_empty()
            && self.response_headers.is_empty()
            && self.mirrors.is_empty()
    }

    /// The rewritten `path?query` for a request that matched `matcher`, if the route rewrites
    /// paths.
    pub fn rewrite_path(&self, matcher: &RouteMatch, req: &RequestView<'_>) -> Option<String> {
        let path = req.path_only();
        let new = match self.path_rewrite.as_ref()? {
            PathRewrite::Prefix(prefix) => {
                let matched = match &matcher.path {
                    PathMatch::Prefix(m) | PathMatch::SeparatedPrefix(m) | PathMatch::Exact(m) => {
                        m.len().min(path.len())
                    }
                    PathMatch::Regex(_) => 0,
                };
                format!("{prefix}{}", &path[matched..])
            }
            PathRewrite::Regex(re, sub) => re.replace_all(path, sub.as_str()).into_owned(),
        };
        Some(match req.path[path.len()..].is_empty() {
            true => new,
            false => format!("{new}{}", &req.path[path.len()..]),
        })
    }
}

/// What one `hash_policy` entry hashes.
#[derive(Clone, Debug)]
pub enum HashPolicyKind {
    /// `header`: the header's values (sorted, chained through xxHash64 as Envoy does).
    Header(HeaderName),
    /// `cookie` without a `ttl`: the named cookie's value.
    Cookie(String),
    /// `cookie` with a `ttl`: the named cookie's value; a request without the cookie gets a
    /// generated value (hashed as if the request carried it), which the response sets.
    GeneratedCookie(Arc<GeneratedCookie>),
    /// `connection_properties.source_ip`.
    SourceIp,
    /// `query_parameter`: the first value of the parameter.
    QueryParameter(String),
}

/// A `hash_policy.cookie` with a `ttl`: what the `Set-Cookie` of a generated value says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedCookie {
    /// `name`.
    pub name: String,
    /// `ttl` (zero: a session cookie, no `Max-Age`).
    pub ttl: Duration,
    /// `path` (empty: no `Path`).
    pub path: String,
    /// `attributes`: (name, value), an empty value rendering the bare name.
    pub attributes: Vec<(String, String)>,
}

impl GeneratedCookie {
    /// The value Envoy generates from a 64-bit number: 16 lowercase hex digits.
    pub fn value(n: u64) -> String {
        format!("{n:016x}")
    }

    /// The `Set-Cookie` header value for `value`, as Envoy renders it:
    /// `name="value"; Max-Age=<ttl>; Path=<path>; <attributes>; HttpOnly`.
    pub fn set_cookie(&self, value: &str) -> String {
        use std::fmt::Write;
        let mut out = format!("{}=\"{value}\"", self.name);
        if !self.ttl.is_zero() {
            let _ = write!(out, "; Max-Age={}", self.ttl.as_secs());
        }
        if !self.path.is_empty() {
            let _ = write!(out, "; Path={}", self.path);
        }
        for (k, v) in &self.attributes {
            match v.is_empty() {
                true => {
                    let _ = write!(out, "; {k}");
                }
                false => {
                    let _ = write!(out, "; {k}={v}");
                }
            }
        }
        out.push_str("; HttpOnly");
        out
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, without the double quotes
/// that may wrap it (as Envoy's `parseCookieValue` reads it).
fn cookie_value<'a>(req: &RequestView<'a>, name: &str) -> Option<&'a str> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| {
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
}

/// One `hash_policy` entry of a route.
#[derive(Clone, Debug)]
pub struct HashPolicy {
    /// What to hash.
    pub kind: HashPolicyKind,
    /// `terminal`: stop at this entry if it produced a hash.
    pub terminal: bool,
}

/// Envoy's request hash for ring hash / Maglev: each policy that yields a value is combined as
/// `rotl(hash, 1) ^ new`, stopping after a terminal one that yielded. A generated cookie
/// missing from the request yields nothing here; see [`request_hash_with`].
pub fn request_hash(
    policies: &[HashPolicy],
    req: &RequestView<'_>,
    source_ip: Option<std::net::IpAddr>,
) -> Option<u64> {
    request_hash_with(policies, req, source_ip, &mut |_| None)
}

/// [`request_hash`], asking `add_cookie` for the value of each generated cookie the request
/// lacks (Envoy's router callback: it remembers the `Set-Cookie` and returns the value, which
/// is then hashed as a cookie value is).
pub fn request_hash_with(
    policies: &[HashPolicy],
    req: &RequestView<'_>,
    source_ip: Option<std::net::IpAddr>,
    add_cookie: &mut dyn FnMut(&GeneratedCookie) -> Option<String>,
) -> Option<u64> {
    use crate::lb::xx_hash64;
    let mut hash: Option<u64> = None;
    for p in policies {
        let new = match &p.kind {
            HashPolicyKind::Header(name) => {
                let mut values = req.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => None,
                    // One value (the usual case): no sorting, no allocation.
                    (Some(v), None) => Some(xx_hash64(v.as_bytes(), 0)),
                    _ => {
                        let mut values: Vec<&[u8]> = req
                            .headers
                            .get_all(name)
                            .iter()
                            .map(|v| v.as_bytes())
                            .collect();
                        values.sort_unstable();
                        Some(values.iter().fold(0u64, |seed, v| xx_hash64(v, seed)))
                    }
                }
            }
            HashPolicyKind::Cookie(name) => {
                cookie_value(req, name).map(|v| xx_hash64(v.as_bytes(), 0))
            }
            HashPolicyKind::GeneratedCookie(c) => match cookie_value(req, &c.name) {
                Some(v) if !v.is_empty() => Some(xx_hash64(v.as_bytes(), 0)),
                _ => add_cookie(c).map(|v| xx_hash64(v.as_bytes(), 0)),
            },
            HashPolicyKind::SourceIp => source_ip.map(|ip| xx_hash64(ip.to_string().as_bytes(), 0)),
            HashPolicyKind::QueryParameter(name) => req.query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                    .next()
                    .map(|v| xx_hash64(v.as_bytes(), 0))
            }),
        };
        if let Some(n) = new {
            hash = Some(match hash {
                Some(h) => h.rotate_left(1) ^ n,
                None => n,
            });
            if p.terminal {
                break;
            }
        }
    }
    hash
}

/// One route.
#[derive(Clone, Debug)]
pub struct Route {
    /// Route name (istiod names VirtualService routes; the default is `default`).
    pub name: Arc<str>,
    /// Match.
    pub matcher: RouteMatch,
    /// Action.
    pub action: RouteAction,
    /// Route timeout; `None` or zero = no timeout (istiod's default `0s`).
    pub timeout: Option<Duration>,
    /// `idle_timeout`: the stream idle timeout for this route (no activity in either
    /// direction for this long ends the stream, Envoy's `SI`); `None` or zero = none (istiod
    /// turns the connection manager's `stream_idle_timeout` off).
    pub idle_timeout: Option<Duration>,
    /// Retry policy (the route's, else the virtual host's).
    pub retry: Option<Arc<RetryPolicy>>,
    /// `per_request_buffer_limit_bytes` (route, else virtual host): how much request body is
    /// kept for retries; `None` is Envoy's listener default
    /// ([`DEFAULT_RETRY_BUFFER_LIMIT`](crate::retry::DEFAULT_RETRY_BUFFER_LIMIT)).
    pub per_request_buffer_limit_bytes: Option<u32>,
    /// The virtual host's `include_request_attempt_count`: send `x-envoy-attempt-count`
    /// upstream.
    pub include_request_attempt_count: bool,
    /// The virtual host's `include_attempt_count_in_response`: return
    /// `x-envoy-attempt-count` downstream.
    pub include_attempt_count_in_response: bool,
    /// `hash_policy`, for ring hash and Maglev clusters.
    pub hash_policy: Vec<HashPolicy>,
    /// Rewrites and header mutations (`None`: none).
    pub forwarding: Option<Arc<Forwarding>>,
    /// Fault injection (`typed_per_filter_config` `envoy.filters.http.fault`).
    pub fault: Option<Arc<crate::fault::Fault>>,
}

impl Route {
    /// A route without timeout or retry policy.
    pub fn new(name: impl Into<Arc<str>>, matcher: RouteMatch, action: RouteAction) -> Self {
        Route {
            name: name.into(),
            matcher,
            action,
            timeout: None,
            idle_timeout: None,
            retry: None,
            per_request_buffer_limit_bytes: None,
            include_request_attempt_count: false,
            include_attempt_count_in_response: false,
            hash_policy: Vec::new(),
            forwarding: None,
            fault: None,
        }
    }

    /// The same route with a retry policy.
    pub fn with_retry(mut self, retry: Option<RetryPolicy>) -> Self {
        self.retry = retry.map(Arc::new);
        self
    }

    /// The same route with a timeout.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A virtual host.
#[derive(Clone, Debug)]
pub struct VirtualHost {
    /// Name, e.g. `reviews.default.svc.cluster.local:9080`.
    pub name: Arc<str>,
    /// Domains as RDS sent them.
    pub domains: Vec<String>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

impl VirtualHost {
    /// A virtual host for `domains` with `routes`.
    pub fn new(name: impl Into<Arc<str>>, domains: &[&str], routes: Vec<Route>) -> Self {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            routes,
        }
    }
}

/// A route configuration with its domain index.
#[derive(Debug)]
pub struct RouteConfig {
    /// Name (`"9080"` for istiod's per-port outbound routes).
    pub name: String,
    /// Virtual hosts.
    pub virtual_hosts: Vec<VirtualHost>,
    exact: HashMap<String, usize, foldhash::fast::RandomState>,
    suffixes: WildcardIndex,
    prefixes: WildcardIndex,
    any: Option<usize>,
    ignore_port_in_host_matching: bool,
}

/// Wildcard domains of one kind (`*suffix` or `prefix*`) by the length of their fixed part,
/// longest first, as Envoy keeps them: finding the longest wildcard that matches a host is at
/// most one hash probe per distinct length shorter than the host, however many wildcard
/// domains there are. Each length also records the bytes its fixed parts have next to the star,
/// so a length whose boundary byte in the host cannot match (e.g. not a `.` for the usual
/// `*.example.com`) is skipped without hashing.
#[derive(Debug)]
struct WildcardIndex {
    /// `*suffix` (the fixed part ends the host) or `prefix*` (it starts the host).
    suffix: bool,
    /// Per fixed-part length, strictly decreasing.
    by_len: Vec<WildcardLength>,
}

#[derive(Debug)]
struct WildcardLength {
    len: usize,
    /// Bitset of the fixed parts' bytes next to the star.
    edge: [u64; 4],
    domains: HashMap<String, usize, foldhash::fast::RandomState>,
}

impl WildcardIndex {
    fn new(suffix: bool) -> Self {
        WildcardIndex {
            suffix,
            by_len: Vec::new(),
        }
    }

    /// The byte of `s` next to the star for a fixed part of `len` bytes (`s` is the fixed part
    /// itself or a host longer than `len`).
    fn edge_byte(&self, s: &str, len: usize) -> u8 {
        let b = s.as_bytes();
        if self.suffix {
            b[b.len() - len]
        } else {
            b[len - 1]
        }
    }

    fn insert(&mut self, fixed: String, vh: usize) {
        let len = fixed.len();
        if len == 0 {
            return;
        }
        let at = self.by_len.partition_point(|l| l.len > len);
        if self.by_len.get(at).is_none_or(|l| l.len != len) {
            self.by_len.insert(
                at,
                WildcardLength {
                    len,
                    edge: [0; 4],
                    domains: HashMap::default(),
                },
            );
        }
        let e = self.edge_byte(&fixed, len);
        let l = &mut self.by_len[at];
        l.edge[usize::from(e >> 6)] |= 1 << (e & 63);
        l.domains.entry(fixed).or_insert(vh);
    }

    /// The virtual host of the longest fixed part that matches `host`, among those shorter
    /// than `host` (Envoy's wildcard matches at least one character).
    fn find(&self, host: &str) -> Option<usize> {
        let from = self.by_len.partition_point(|l| l.len >= host.len());
        self.by_len[from..].iter().find_map(|l| {
            let e = self.edge_byte(host, l.len);
            if l.edge[usize::from(e >> 6)] & (1 << (e & 63)) == 0 {
                return None;
            }
            let part = if self.suffix {
                host.get(host.len() - l.len..)
            } else {
                host.get(..l.len)
            };
            part.and_then(|p| l.domains.get(p)).copied()
        })
    }
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
    pub fn new(
        name: impl Into<String>,
        virtual_hosts: Vec<VirtualHost>,
    ) -> Result<Self, RouteConfigError> {
        let name = name.into();
        let mut exact = HashMap::default();
        let mut suffixes = WildcardIndex::new(true);
        let mut prefixes = WildcardIndex::new(false);
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
                    suffixes.insert(d[1..].to_owned(), i);
                } else if stars == 1 && d.ends_with('*') {
                    prefixes.insert(d[..d.len() - 1].to_owned(), i);
                } else {
                    return Err(RouteConfigError::InvalidWildcard {
                        config: name,
                        domain: d,
                    });
                }
            }
        }
        Ok(RouteConfig {
            name,
            virtual_hosts,
            exact,
            suffixes,
            prefixes,
            any,
            ignore_port_in_host_matching: false,
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
        // Envoy's order: exact, then the longest `*suffix` (a plain string suffix), then the
        // longest `prefix*`, then `*`; a wildcard matches at least one character.
        self.suffixes
            .find(host)
            .or_else(|| self.prefixes.find(host))
            .or(self.any)
    }

    /// Selects virtual host and first matching route for a `GET` over `http`. `path` may
    /// include a query, which is ignored for path matching.
    pub fn route(
        &self,
        authority: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<RouteMatchResult<'_>> {
        self.route_request(&RequestView::new(authority, path, headers))
    }

    /// Selects virtual host and first matching route.
    pub fn route_request(&self, req: &RequestView<'_>) -> Option<RouteMatchResult<'_>> {
        let vh = self.virtual_host(req.authority)?;
        let route = vh.routes.iter().find(|r| r.matcher.matches_request(req))?;
        Some(RouteMatchResult {
            virtual_host: vh,
            route,
        })
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`; anything else unchanged.
pub fn strip_port(authority: &str) -> &str {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str], cluster: &str) -> VirtualHost {
        VirtualHost::new(
            name,
            domains,
            vec![Route::new(
                "default",
                RouteMatch::any(),
                RouteAction::Cluster(cluster.into()),
            )],
        )
    }

    fn cluster_of(rc: &RouteConfig, authority: &str) -> Option<String> {
        rc.route(authority, "/", &HeaderMap::new())
            .map(|m| match &m.route.action {
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
    fn wildcards_are_plain_string_affixes_longest_first() {
        let rc = RouteConfig::new(
            "80",
            vec![
                vh("any", &["*"], "any"),
                vh("dash", &["*-bar.foo.com"], "dash"),
                vh("dot", &["*.foo.com"], "dot"),
                vh("same-len", &["*.baz.com", "*.qux.com"], "same-len"),
                vh("long-prefix", &["baz-bar.foo.*"], "long-prefix"),
                vh("short-prefix", &["api*"], "short-prefix"),
                vh("longer-prefix", &["api-v2.*"], "longer-prefix"),
            ],
        )
        .unwrap();
        // `*-bar.foo.com` is a string suffix: it matches without a dot boundary, and it is
        // longer than `*.foo.com`.
        assert_eq!(cluster_of(&rc, "baz-bar.foo.com").unwrap(), "dash");
        assert_eq!(cluster_of(&rc, "x.bar.foo.com").unwrap(), "dot");
        assert_eq!(cluster_of(&rc, "a.qux.com").unwrap(), "same-len");
        // Any suffix wildcard beats a longer prefix wildcard.
        assert_eq!(cluster_of(&rc, "baz-bar.foo.com").unwrap(), "dash");
        assert_eq!(cluster_of(&rc, "baz-bar.foo.org").unwrap(), "long-prefix");
        // The longest prefix wins.
        assert_eq!(cluster_of(&rc, "api-v2.example").unwrap(), "longer-prefix");
        assert_eq!(cluster_of(&rc, "api-v3.example").unwrap(), "short-prefix");
        // At least one character for the star, on either side.
        assert_eq!(cluster_of(&rc, "-bar.foo.com").unwrap(), "dot");
        assert_eq!(cluster_of(&rc, "api-v2.").unwrap(), "short-prefix");
        assert_eq!(cluster_of(&rc, "api").unwrap(), "any");
        // A host whose bytes at a wildcard's length are not a character boundary.
        assert_eq!(cluster_of(&rc, "é.foo.com").unwrap(), "dot");
        assert_eq!(cluster_of(&rc, "aé.qux.co").unwrap(), "any");
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
        let e =
            RouteConfig::new("80", vec![vh("a", &["x"], "a"), vh("b", &["X"], "b")]).unwrap_err();
        assert!(matches!(e, RouteConfigError::DuplicateDomain { .. }));
        let e = RouteConfig::new("80", vec![vh("a", &["a*b"], "a")]).unwrap_err();
        assert!(matches!(e, RouteConfigError::InvalidWildcard { .. }));
    }

    fn exact(name: &str, v: &str) -> HeaderMatcher {
        HeaderMatcher::new(
            name,
            HeaderValueMatch::String(StringMatch::new(StringPattern::Exact(v.into()))),
        )
        .unwrap()
    }

    #[test]
    fn first_matching_route_wins() {
        let mut v = vh("h", &["h"], "fallback");
        let mut m = RouteMatch::path(PathMatch::Prefix("/API".into()));
        m.case_sensitive = false;
        m.headers.push(exact("x-user", "b"));
        v.routes
            .insert(0, Route::new("api", m, RouteAction::Cluster("api".into())));
        let rc = RouteConfig::new("80", vec![v]).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(
            rc.route("h", "/api/x?q=1", &h).unwrap().route.name.as_ref(),
            "default"
        );
        h.append("x-user", "a".parse().unwrap());
        h.append("x-user", "b".parse().unwrap());
        assert_eq!(
            rc.route("h", "/api/x?q=1", &h).unwrap().route.name.as_ref(),
            "api"
        );
        assert!(rc.route("nohost", "/", &h).is_none());
    }

    #[test]
    fn repeated_header_values_match_one_by_one() {
        let mut h = HeaderMap::new();
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        let req = RequestView::new("h", "/", &h);
        assert!(exact("x-a", "1").matches(&req));
        assert!(exact("x-a", "2").matches(&req));
        assert!(!exact("x-a", "1,2").matches(&req));
        assert!(!exact("x-a", "1").inverted().matches(&req));
        assert!(exact("x-a", "3").inverted().matches(&req));
    }

    #[test]
    fn missing_headers_follow_envoy() {
        let h = HeaderMap::new();
        let req = RequestView::new("h", "/", &h);
        // An inverted value matcher does not match a missing header.
        assert!(!exact("x-b", "z").inverted().matches(&req));
        let absent = HeaderMatcher::new("x-b", HeaderValueMatch::Present(false)).unwrap();
        assert!(absent.matches(&req));
        assert!(!absent.clone().inverted().matches(&req));
        let mut empty = exact("x-b", "");
        assert!(!empty.matches(&req));
        empty.treat_missing_as_empty = true;
        assert!(empty.matches(&req));
    }

    #[test]
    fn pseudo_headers_and_ranges() {
        let mut h = HeaderMap::new();
        h.insert("x-n", "+3".parse().unwrap());
        let req = RequestView::new("Foo.com", "/p?x", &h).with_method("POST");
        assert!(exact(":method", "POST").matches(&req));
        assert!(exact("host", "Foo.com").matches(&req));
        assert!(!exact(":authority", "foo.com").matches(&req));
        assert!(exact(":path", "/p?x").matches(&req));
        let range =
            |start, end| HeaderMatcher::new("x-n", HeaderValueMatch::Range { start, end }).unwrap();
        assert!(range(-5, 10).matches(&req));
        assert!(!range(-5, 3).matches(&req));
        assert!(range(3, 4).matches(&req));
    }

    #[test]
    fn string_match_ignore_case() {
        let m = |p: StringPattern| StringMatch {
            pattern: p,
            ignore_case: true,
        };
        assert!(m(StringPattern::Suffix("Bc".into())).matches("aBC"));
        assert!(m(StringPattern::Contains("XY".into())).matches("axyb"));
        assert!(m(StringPattern::Prefix("AB".into())).matches("abc"));
        assert!(!m(StringPattern::Prefix("AB".into())).matches("a"));
        assert!(m(StringPattern::Exact("AB".into())).matches("ab"));
    }

    #[test]
    fn paths_queries_and_grpc() {
        let h = HeaderMap::new();
        let sep = RouteMatch::path(PathMatch::SeparatedPrefix("/api/v1".into()));
        for (p, want) in [
            ("/api/v1", true),
            ("/api/v1/", true),
            ("/api/v1?x", true),
            ("/api/v1x", false),
            ("/api/V1", false),
        ] {
            assert_eq!(sep.matches(p, &h), want, "{p}");
        }
        let mut q = RouteMatch::any();
        q.query_parameters.push(QueryParameterMatcher {
            name: "k".into(),
            value: Some(StringMatch::new(StringPattern::Exact("v".into()))),
        });
        assert!(q.matches("/?k=v&k=w", &h));
        assert!(!q.matches("/?k=w&k=v", &h));
        assert!(!q.matches("/?k=%76", &h));
        assert!(!q.matches("/", &h));
        q.query_parameters[0].value = None;
        assert!(q.matches("/?x=1&k", &h));
        let mut g = RouteMatch::any();
        g.grpc = true;
        let mut h = HeaderMap::new();
        assert!(!g.matches("/", &h));
        for (ct, want) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc-web", false),
            ("application/grpc;x", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(g.matches("/", &h), want, "{ct}");
        }
        let mut f = RouteMatch::any();
        f.runtime_fraction = Some(Fraction {
            numerator: 0,
            denominator: 100,
        });
        assert!(!f.matches("/", &h));
        f.runtime_fraction = Some(Fraction {
            numerator: 100,
            denominator: 100,
        });
        assert!(f.matches("/", &h));
    }

    #[test]
    fn generated_cookies_render_and_hash_like_envoy() {
        use crate::lb::xx_hash64;
        let c = Arc::new(GeneratedCookie {
            name: "session".into(),
            ttl: Duration::from_secs(3600),
            path: "/app".into(),
            attributes: vec![
                ("SameSite".into(), "Lax".into()),
                ("Secure".into(), "".into()),
            ],
        });
        let v = GeneratedCookie::value(0xab);
        assert_eq!(v, "00000000000000ab");
        assert_eq!(
            c.set_cookie(&v),
            "session=\"00000000000000ab\"; Max-Age=3600; Path=/app; SameSite=Lax; Secure; HttpOnly"
        );
        let bare = GeneratedCookie {
            name: "sid".into(),
            ttl: Duration::ZERO,
            path: String::new(),
            attributes: vec![],
        };
        assert_eq!(bare.set_cookie("x"), "sid=\"x\"; HttpOnly");
        let policy = [HashPolicy {
            kind: HashPolicyKind::GeneratedCookie(c),
            terminal: false,
        }];
        // Without the cookie: the callback's value is hashed.
        let h = HeaderMap::new();
        let mut asked = 0;
        let got = request_hash_with(&policy, &RequestView::new("h", "/", &h), None, &mut |_| {
            asked += 1;
            Some(v.clone())
        });
        assert_eq!((got, asked), (Some(xx_hash64(v.as_bytes(), 0)), 1));
        assert_eq!(
            request_hash(&policy, &RequestView::new("h", "/", &h), None),
            None
        );
        // With it, quoted or not: the value is hashed, nothing generated.
        for cookie in [
            "session=\"00000000000000ab\"",
            "a=1; session=00000000000000ab",
        ] {
            let mut h = HeaderMap::new();
            h.insert(http::header::COOKIE, cookie.parse().unwrap());
            let got =
                request_hash_with(&policy, &RequestView::new("h", "/", &h), None, &mut |_| {
                    panic!("generated although the request has the cookie")
                });
            assert_eq!(got, Some(xx_hash64(v.as_bytes(), 0)), "{cookie}");
        }
    }

    #[test]
    fn request_hashes_combine_like_envoy() {
        use crate::lb::xx_hash64;
        let mut h = HeaderMap::new();
        h.append("x-user", "b".parse().unwrap());
        h.append("x-user", "a".parse().unwrap());
        h.insert(http::header::COOKIE, "k=1; session=abc".parse().unwrap());
        let req = RequestView::new("h", "/p?q=7&q=8", &h);
        let p = |kind, terminal| HashPolicy { kind, terminal };
        let header = p(
            HashPolicyKind::Header(HeaderName::from_static("x-user")),
            false,
        );
        // Sorted values chained through the seed.
        let want = xx_hash64(b"b", xx_hash64(b"a", 0));
        assert_eq!(
            request_hash(std::slice::from_ref(&header), &req, None),
            Some(want)
        );
        let cookie = p(HashPolicyKind::Cookie("session".into()), true);
        let query = p(HashPolicyKind::QueryParameter("q".into()), false);
        assert_eq!(
            request_hash(std::slice::from_ref(&query), &req, None),
            Some(xx_hash64(b"7", 0))
        );
        let combined = request_hash(&[header.clone(), cookie.clone(), query], &req, None);
        assert_eq!(combined, Some(want.rotate_left(1) ^ xx_hash64(b"abc", 0)));
        let missing = p(HashPolicyKind::Cookie("nope".into()), true);
        assert_eq!(
            request_hash(std::slice::from_ref(&missing), &req, None),
            None
        );
        assert_eq!(request_hash(&[missing, header], &req, None), Some(want));
        let ip = p(HashPolicyKind::SourceIp, false);
        assert_eq!(
            request_hash(&[ip], &req, Some("10.0.0.1".parse().unwrap())),
            Some(xx_hash64(b"10.0.0.1", 0))
        );
    }

    #[test]
    fn weighted_split_follows_weights() {
        let w = WeightedClusters::new(vec![
            WeightedCluster {
                name: "v1".into(),
                weight: 90,
            },
            WeightedCluster {
                name: "v2".into(),
                weight: 10,
            },
            WeightedCluster {
                name: "v3".into(),
                weight: 0,
            },
        ]);
        assert_eq!(w.clusters.len(), 2);
        // A random draw per request (seeded here): the split passes a chi-square test at
        // p = 0.001 (one degree of freedom: 10.83).
        use rand::{Rng, SeedableRng};
        for seed in [1u64, 2, 3] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let n = 10_000;
            let v1 = (0..n)
                .filter(|_| w.pick(rng.random()) == Some("v1"))
                .count() as f64;
            let (e1, e2) = (n as f64 * 0.9, n as f64 * 0.1);
            let chi2 = (v1 - e1).powi(2) / e1 + ((n as f64 - v1) - e2).powi(2) / e2;
            assert!(chi2 < 10.83, "seed {seed}: v1 {v1} chi2 {chi2}");
        }
        // Draws are independent, not a fixed pattern: two seeds disagree somewhere early.
        let draws = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..64).map(|_| w.pick(rng.random())).collect::<Vec<_>>()
        };
        assert_ne!(draws(1), draws(2));
        // The value walks the weights in order.
        assert_eq!(w.pick(89), Some("v1"));
        assert_eq!(w.pick(90), Some("v2"));
        assert_eq!(w.pick(100), Some("v1"));
    }
}
