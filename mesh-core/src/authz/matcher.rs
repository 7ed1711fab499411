//! The matchers RBAC policies are built from: Envoy's `StringMatcher`, `HeaderMatcher`,
//! `MetadataMatcher` (with `ValueMatcher`) and CIDR ranges.

use std::net::IpAddr;

use regex::Regex;
use serde_json::Value;

/// Envoy's `type.matcher.v3.StringMatcher`. Regexes compare equal by pattern.
#[derive(Clone, Debug)]
pub enum StringMatcher {
    /// `exact`.
    Exact(String, bool),
    /// `prefix`.
    Prefix(String, bool),
    /// `suffix`.
    Suffix(String, bool),
    /// `contains`.
    Contains(String, bool),
    /// `safe_regex`: the whole value must match (RE2 full-match semantics).
    Regex(Regex),
}

impl PartialEq for StringMatcher {
    fn eq(&self, other: &Self) -> bool {
        use StringMatcher::*;
        match (self, other) {
            (Exact(a, x), Exact(b, y))
            | (Prefix(a, x), Prefix(b, y))
            | (Suffix(a, x), Suffix(b, y))
            | (Contains(a, x), Contains(b, y)) => a == b && x == y,
            (Regex(a), Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatcher {
    /// A `safe_regex` matcher; the pattern is anchored at both ends as Envoy's full match is.
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(StringMatcher::Regex)
    }

    /// Whether `value` matches. The `bool` of the non-regex forms is `ignore_case`.
    pub fn matches(&self, value: &str) -> bool {
        fn fold(s: &str, ic: bool) -> std::borrow::Cow<'_, str> {
            if ic {
                std::borrow::Cow::Owned(s.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(s)
            }
        }
        match self {
            StringMatcher::Exact(e, ic) => {
                if *ic {
                    value.eq_ignore_ascii_case(e)
                } else {
                    value == e
                }
            }
            StringMatcher::Prefix(p, ic) => {
                value.len() >= p.len()
                    && value.is_char_boundary(p.len())
                    && fold(&value[..p.len()], *ic) == fold(p, *ic)
            }
            StringMatcher::Suffix(s, ic) => {
                value.len() >= s.len()
                    && value.is_char_boundary(value.len() - s.len())
                    && fold(&value[value.len() - s.len()..], *ic) == fold(s, *ic)
            }
            StringMatcher::Contains(c, ic) => fold(value, *ic).contains(fold(c, *ic).as_ref()),
            StringMatcher::Regex(r) => r.is_match(value),
        }
    }
}

/// How a [`HeaderMatcher`] compares the header value.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderMatch {
    /// `string_match` and the deprecated `exact_match`/`prefix_match`/… forms.
    String(StringMatcher),
    /// `present_match`.
    Present(bool),
    /// `range_match`: the value parsed as an integer in `[start, end)`.
    Range(i64, i64),
}

/// Envoy's `config.route.v3.HeaderMatcher` (pseudo-headers `:method`, `:path`, `:authority`
/// included). Several values of one header are joined with `,` before matching.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderMatcher {
    /// Lower-case header name.
    pub name: String,
    /// The comparison.
    pub matcher: HeaderMatch,
    /// `invert_match`.
    pub invert: bool,
    /// `treat_missing_header_as_empty`.
    pub treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    /// Whether the header value (`None` when absent) matches, with Envoy's rules for absent
    /// headers.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            Some(v) => v,
            None if self.treat_missing_as_empty => "",
            None => {
                // Absent header: only `present_match` can say anything.
                return match self.matcher {
                    HeaderMatch::Present(present) => present == self.invert,
                    _ => false,
                };
            }
        };
        let matched = match &self.matcher {
            HeaderMatch::String(m) => m.matches(value),
            HeaderMatch::Present(present) => *present,
            HeaderMatch::Range(start, end) => {
                value.parse::<i64>().is_ok_and(|v| v >= *start && v < *end)
            }
        };
        matched != self.invert
    }
}

/// Envoy's `type.matcher.v3.ValueMatcher` over a dynamic-metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueMatcher {
    /// `null_match`.
    Null,
    /// `double_match` exact.
    Double(f64),
    /// `double_match` range `[start, end)`.
    DoubleRange(f64, f64),
    /// `string_match`.
    String(StringMatcher),
    /// `bool_match`.
    Bool(bool),
    /// `present_match`.
    Present(bool),
    /// `list_match.one_of`: some element of a list matches.
    ListOneOf(Box<ValueMatcher>),
    /// `or_match`.
    Or(Vec<ValueMatcher>),
}

impl ValueMatcher {
    /// Whether `value` (`None`: absent) matches.
    pub fn matches(&self, value: Option<&Value>) -> bool {
        match (self, value) {
            (ValueMatcher::Present(p), v) => v.is_some() == *p,
            (ValueMatcher::Null, v) => v.is_none_or(Value::is_null),
            (_, None) => false,
            (ValueMatcher::Double(d), Some(Value::Number(n))) => n.as_f64() == Some(*d),
            (ValueMatcher::DoubleRange(s, e), Some(Value::Number(n))) => {
                n.as_f64().is_some_and(|x| x >= *s && x < *e)
            }
            (ValueMatcher::String(m), Some(Value::String(s))) => m.matches(s),
            (ValueMatcher::Bool(b), Some(Value::Bool(x))) => b == x,
            (ValueMatcher::ListOneOf(m), Some(Value::Array(items))) => {
                items.iter().any(|i| m.matches(Some(i)))
            }
            (ValueMatcher::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
            _ => false,
        }
    }
}

/// Envoy's `type.matcher.v3.MetadataMatcher`: the value at `path` under `filter` in the
/// request's dynamic metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct MetadataMatcher {
    /// The filter namespace (`istio_authn`, `envoy.filters.http.jwt_authn`).
    pub filter: String,
    /// Keys into nested structs.
    pub path: Vec<String>,
    /// The comparison.
    pub value: ValueMatcher,
    /// `invert`.
    pub invert: bool,
}

impl MetadataMatcher {
    /// Whether the metadata (filter name → struct) matches.
    pub fn matches(&self, metadata: &serde_json::Map<String, Value>) -> bool {
        let mut at = metadata.get(&self.filter);
        for key in &self.path {
            at = at.and_then(|v| v.get(key));
        }
        self.value.matches(at) != self.invert
    }
}

/// An IP range (`core.v3.CidrRange`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub address: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `ip` is inside the range (an IPv4 address never matches an IPv6 range and the
    /// other way round, except IPv4-mapped IPv6 addresses, compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let len = u32::from(self.prefix_len.min(32));
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let len = u32::from(self.prefix_len.min(128));
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}
