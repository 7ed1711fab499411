//! Authorization as istiod expresses it in the inbound listener: the chain of Envoy RBAC
//! filters (`envoy.filters.http.rbac`, `envoy.filters.network.rbac`) and the CUSTOM action's
//! `envoy.filters.http.ext_authz`, compiled from the protos by mesh-xds and evaluated here
//! without I/O.
//!
//! Envoy's semantics, kept exactly:
//! * Filters run in listener order; istiod emits CUSTOM (a shadow `DENY` RBAC whose policy
//!   ids start with `istio-ext-authz`, then `ext_authz` enabled by that shadow result),
//!   AUDIT (`LOG`), DENY and ALLOW as separate filters.
//! * A rule set's policies are tried in name order (Envoy keeps them in a sorted map); the
//!   first match is the effective policy. `ALLOW`: allowed iff a policy matches (an empty
//!   `ALLOW` denies everything — istiod renders that for TCP chains of HTTP-only ALLOW
//!   policies); `DENY`: allowed iff none matches; `LOG`: always allowed.
//! * A policy matches when any permission and any principal match.
//! * Shadow rules are evaluated and only recorded in dynamic metadata
//!   (`<shadow_rules_stat_prefix>shadow_effective_policy_id` / `…shadow_engine_result` under
//!   `envoy.filters.http.rbac`), which the ext_authz filter reads to decide whether it runs.
//! * A denied HTTP request is answered 403 with body `RBAC: access denied`
//!   ([`RBAC_DENIED_BODY`]), response flag `RBAC`; a denied connection is closed.
//!
//! Request paths are normalized first ([`path::normalize_path`]), by the caller, as Envoy's
//! HTTP connection manager does before any filter runs.

pub mod ext_authz;
pub mod jwt;
pub mod matcher;
pub mod path;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::{Map, Value};

pub use matcher::{Cidr, HeaderMatch, HeaderMatcher, MetadataMatcher, StringMatcher, ValueMatcher};
pub use path::{NormalizedPath, PathNormalization, is_normalized, normalize_path};

/// Body of Envoy's RBAC denial (status 403).
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";
/// Dynamic-metadata namespace the RBAC filter writes its shadow results under.
pub const RBAC_METADATA_NAMESPACE: &str = "envoy.filters.http.rbac";
/// Filter-state key Istio matches the peer's principal under.
pub const PEER_PRINCIPAL_FILTER_STATE: &str = "io.istio.peer_principal";
/// Filter-state key of this workload's own principal.
pub const LOCAL_PRINCIPAL_FILTER_STATE: &str = "io.istio.local_principal";

/// `config.rbac.v3.RBAC.Action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbacAction {
    /// `ALLOW`.
    Allow,
    /// `DENY`.
    Deny,
    /// `LOG` (Istio's AUDIT).
    Log,
}

/// A principal (`config.rbac.v3.Principal`): who is asking.
#[derive(Clone, Debug, PartialEq)]
pub enum Principal {
    /// `any`.
    Any,
    /// `and_ids`.
    And(Vec<Principal>),
    /// `or_ids`.
    Or(Vec<Principal>),
    /// `not_id`.
    Not(Box<Principal>),
    /// `authenticated`: the peer certificate's URI SAN (first), `None` = any peer certificate.
    Authenticated(Option<StringMatcher>),
    /// `source_ip` / `direct_remote_ip`: the connection's peer address.
    DirectRemoteIp(Cidr),
    /// `remote_ip`: the original client address (XFF-derived when trusted).
    RemoteIp(Cidr),
    /// `header`.
    Header(HeaderMatcher),
    /// `url_path`.
    UrlPath(StringMatcher),
    /// `metadata` (request dynamic metadata, e.g. `istio_authn` JWT claims).
    Metadata(MetadataMatcher),
    /// `filter_state` with a string matcher.
    FilterState {
        /// The key (`io.istio.peer_principal`).
        key: String,
        /// The comparison.
        matcher: StringMatcher,
    },
}

/// A permission (`config.rbac.v3.Permission`): what is asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Permission {
    /// `any`.
    Any,
    /// `and_rules`.
    And(Vec<Permission>),
    /// `or_rules`.
    Or(Vec<Permission>),
    /// `not_rule`.
    Not(Box<Permission>),
    /// `header`.
    Header(HeaderMatcher),
    /// `url_path` (the path without query).
    UrlPath(StringMatcher),
    /// `destination_ip`.
    DestinationIp(Cidr),
    /// `destination_port`.
    DestinationPort(u16),
    /// `destination_port_range` `[start, end)`.
    DestinationPortRange(u16, u16),
    /// `metadata`.
    Metadata(MetadataMatcher),
    /// `requested_server_name` (SNI).
    RequestedServerName(StringMatcher),
}

/// A policy: matches when any permission and any principal match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// `permissions`.
    pub permissions: Vec<Permission>,
    /// `principals`.
    pub principals: Vec<Principal>,
}

/// A rule set (`config.rbac.v3.RBAC`).
#[derive(Clone, Debug, PartialEq)]
pub struct RbacRules {
    /// The action.
    pub action: RbacAction,
    /// Policies by name; tried in name order.
    pub policies: BTreeMap<String, Policy>,
}

/// One RBAC filter instance.
#[derive(Clone, Debug, PartialEq)]
pub struct RbacFilter {
    /// Enforced rules; `None` enforces nothing.
    pub rules: Option<RbacRules>,
    /// Evaluated and recorded only.
    pub shadow_rules: Option<RbacRules>,
    /// `shadow_rules_stat_prefix` (`istio_dry_run_allow_`, `istio_ext_authz_`).
    pub shadow_rules_stat_prefix: String,
}

/// The CUSTOM action's ext_authz filter.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtAuthz {
    /// gRPC target: the Envoy cluster name (`outbound|9191||ext-authz.foo.svc.cluster.local`).
    pub cluster: String,
    /// `:authority` to send, when set.
    pub authority: Option<String>,
    /// Call timeout.
    pub timeout: Option<std::time::Duration>,
    /// Runs only when this metadata matches (Istio: the CUSTOM shadow policy id prefix).
    pub filter_enabled_metadata: Option<MetadataMatcher>,
    /// `failure_mode_allow`: allow when the provider cannot be reached.
    pub failure_mode_allow: bool,
    /// Status to answer when the provider cannot be reached (default 403).
    pub status_on_error: u16,
    /// `with_request_body.max_request_bytes`, when the body is sent.
    pub max_request_bytes: Option<u32>,
}

impl ExtAuthz {
    /// Envoy's ext_authz default call timeout when `grpc_service.timeout` is unset (200 ms).
    pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

    /// The call timeout in effect.
    pub fn effective_timeout(&self) -> std::time::Duration {
        self.timeout.unwrap_or(Self::DEFAULT_TIMEOUT)
    }
}

/// One step of the authorization chain.
#[derive(Clone, Debug, PartialEq)]
pub enum AuthzFilter {
    /// An RBAC filter.
    Rbac(RbacFilter),
    /// An ext_authz filter.
    ExtAuthz(ExtAuthz),
}

/// The authorization filters of one inbound filter chain, in listener order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthzChain {
    /// The filters.
    pub filters: Vec<AuthzFilter>,
}

/// What a request or connection looks like to the RBAC filters.
#[derive(Clone, Debug, Default)]
pub struct AuthzRequest<'a> {
    /// Request headers (`None` for the network filter: header, path and metadata-of-request
    /// matchers then never match).
    pub headers: Option<&'a http::HeaderMap>,
    /// `:method`.
    pub method: &'a str,
    /// `:path` after normalization, query included.
    pub path: &'a str,
    /// `:authority` (Host).
    pub authority: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// The connection's peer address.
    pub source: Option<SocketAddr>,
    /// The original client IP (`remote_ip`); the peer address when no trusted XFF.
    pub remote_ip: Option<IpAddr>,
    /// The local address the connection arrived on.
    pub destination: Option<SocketAddr>,
    /// TLS SNI.
    pub requested_server_name: Option<&'a str>,
    /// The peer certificate's first URI SAN (`None`: plaintext or no client certificate).
    pub peer_principal: Option<&'a str>,
    /// Whether the peer presented a verified certificate.
    pub peer_authenticated: bool,
    /// This workload's principal (for `io.istio.local_principal`).
    pub local_principal: Option<&'a str>,
}

/// The chain's outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum AuthzDecision {
    /// Allowed; proceed to the application.
    Allow,
    /// Denied by an RBAC filter: 403 `RBAC: access denied` (or close the connection).
    Deny {
        /// Index of the denying filter in the chain.
        filter: usize,
        /// The effective policy (`None` when an ALLOW matched nothing).
        policy: Option<String>,
    },
    /// The ext_authz filter at `filter` must be consulted; if it allows, resume with
    /// [`AuthzChain::evaluate_from`] at `filter + 1`.
    CheckExternal {
        /// Index of the ext_authz filter.
        filter: usize,
    },
}

/// Per-request state the chain writes and reads: Envoy's dynamic metadata (filter name →
/// struct), pre-filled by earlier filters (JWT claims under `istio_authn`).
#[derive(Clone, Debug, Default)]
pub struct DynamicMetadata(pub Map<String, Value>);

impl DynamicMetadata {
    /// Sets `namespace.key = value`.
    pub fn set(&mut self, namespace: &str, key: &str, value: Value) {
        let entry = self
            .0
            .entry(namespace.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(key.to_owned(), value);
        }
    }

    /// `namespace.key`, if set.
    pub fn get(&self, namespace: &str, key: &str) -> Option<&Value> {
        self.0.get(namespace).and_then(|n| n.get(key))
    }
}

impl AuthzRequest<'_> {
    /// The header's value as Envoy's RBAC matcher sees it: pseudo-headers from the request
    /// line, repeated headers joined with `,` (borrowed unless joining is needed).
    fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        let headers = self.headers?;
        match name {
            ":method" => return Some(Cow::Borrowed(self.method)),
            ":path" => return Some(Cow::Borrowed(self.path)),
            ":authority" | "host" => return Some(Cow::Borrowed(self.authority)),
            ":scheme" => return Some(Cow::Borrowed(self.scheme)),
            _ => {}
        }
        let mut values = headers.get_all(name).iter();
        let first = values.next()?.to_str().unwrap_or("");
        let Some(second) = values.next() else {
            return Some(Cow::Borrowed(first));
        };
        let mut joined = String::from(first);
        for v in std::iter::once(second).chain(values) {
            joined.push(',');
            joined.push_str(v.to_str().unwrap_or(""));
        }
        Some(Cow::Owned(joined))
    }

    fn filter_state(&self, key: &str) -> Option<&str> {
        match key {
            PEER_PRINCIPAL_FILTER_STATE => self.peer_principal,
            LOCAL_PRINCIPAL_FILTER_STATE => self.local_principal,
            _ => None,
        }
    }
}

impl Principal {
    /// Whether this principal matches.
    pub fn matches(&self, req: &AuthzRequest<'_>, md: &DynamicMetadata) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(ids) => ids.iter().all(|p| p.matches(req, md)),
            Principal::Or(ids) => ids.iter().any(|p| p.matches(req, md)),
            Principal::Not(p) => !p.matches(req, md),
            Principal::Authenticated(m) => {
                req.peer_authenticated
                    && match m {
                        None => true,
                        Some(m) => req.peer_principal.is_some_and(|p| m.matches(p)),
                    }
            }
            Principal::DirectRemoteIp(c) => req.source.is_some_and(|s| c.contains(s.ip())),
            Principal::RemoteIp(c) => req
                .remote_ip
                .or(req.source.map(|s| s.ip()))
                .is_some_and(|ip| c.contains(ip)),
            Principal::Header(h) => {
                req.headers.is_some() && h.matches(req.header(&h.name).as_deref())
            }
            Principal::UrlPath(m) => {
                req.headers.is_some() && m.matches(path::path_without_query(req.path))
            }
            Principal::Metadata(m) => m.matches(&md.0),
            Principal::FilterState { key, matcher } => {
                req.filter_state(key).is_some_and(|v| matcher.matches(v))
            }
        }
    }
}

impl Permission {
    /// Whether this permission matches.
    pub fn matches(&self, req: &AuthzRequest<'_>, md: &DynamicMetadata) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(rules) => rules.iter().all(|p| p.matches(req, md)),
            Permission::Or(rules) => rules.iter().any(|p| p.matches(req, md)),
            Permission::Not(p) => !p.matches(req, md),
            Permission::Header(h) => {
                req.headers.is_some() && h.matches(req.header(&h.name).as_deref())
            }
            Permission::UrlPath(m) => {
                req.headers.is_some() && m.matches(path::path_without_query(req.path))
            }
            Permission::DestinationIp(c) => req.destination.is_some_and(|d| c.contains(d.ip())),
            Permission::DestinationPort(p) => req.destination.is_some_and(|d| d.port() == *p),
            Permission::DestinationPortRange(s, e) => req
                .destination
                .is_some_and(|d| d.port() >= *s && d.port() < *e),
            Permission::Metadata(m) => m.matches(&md.0),
            Permission::RequestedServerName(m) => {
                m.matches(req.requested_server_name.unwrap_or(""))
            }
        }
    }
}

impl Policy {
    /// Any permission and any principal.
    pub fn matches(&self, req: &AuthzRequest<'_>, md: &DynamicMetadata) -> bool {
        self.permissions.iter().any(|p| p.matches(req, md))
            && self.principals.iter().any(|p| p.matches(req, md))
    }
}

impl RbacRules {
    /// The first matching policy (in name order), if any.
    pub fn effective_policy(&self, req: &AuthzRequest<'_>, md: &DynamicMetadata) -> Option<&str> {
        self.policies
            .iter()
            .find(|(_, p)| p.matches(req, md))
            .map(|(name, _)| name.as_str())
    }

    /// `(allowed, effective policy)` per the action.
    pub fn evaluate(&self, req: &AuthzRequest<'_>, md: &DynamicMetadata) -> (bool, Option<String>) {
        let matched = self.effective_policy(req, md).map(str::to_owned);
        let allowed = match self.action {
            RbacAction::Allow => matched.is_some(),
            RbacAction::Deny => matched.is_none(),
            RbacAction::Log => true,
        };
        (allowed, matched)
    }
}

impl AuthzChain {
    /// Whether the chain has nothing to enforce.
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs the chain from the start. See [`AuthzChain::evaluate_from`].
    pub fn evaluate(&self, req: &AuthzRequest<'_>, md: &mut DynamicMetadata) -> AuthzDecision {
        self.evaluate_from(0, req, md)
    }

    /// Runs the filters from index `start`: records shadow results into `md`, stops at the
    /// first denial, or at an enabled ext_authz filter the caller must consult.
    pub fn evaluate_from(
        &self,
        start: usize,
        req: &AuthzRequest<'_>,
        md: &mut DynamicMetadata,
    ) -> AuthzDecision {
        for (index, filter) in self.filters.iter().enumerate().skip(start) {
            match filter {
                AuthzFilter::Rbac(rbac) => {
                    if let Some(shadow) = &rbac.shadow_rules {
                        let (allowed, policy) = shadow.evaluate(req, md);
                        let prefix = &rbac.shadow_rules_stat_prefix;
                        if let Some(policy) = policy {
                            md.set(
                                RBAC_METADATA_NAMESPACE,
                                &format!("{prefix}shadow_effective_policy_id"),
                                Value::String(policy),
                            );
                        }
                        md.set(
                            RBAC_METADATA_NAMESPACE,
                            &format!("{prefix}shadow_engine_result"),
                            Value::String(if allowed { "allowed" } else { "denied" }.into()),
                        );
                    }
                    if let Some(rules) = &rbac.rules {
                        let (allowed, policy) = rules.evaluate(req, md);
                        if !allowed {
                            return AuthzDecision::Deny {
                                filter: index,
                                policy,
                            };
                        }
                    }
                }
                AuthzFilter::ExtAuthz(ext) => {
                    let enabled = ext
                        .filter_enabled_metadata
                        .as_ref()
                        .is_none_or(|m| m.matches(&md.0));
                    if enabled {
                        return AuthzDecision::CheckExternal { filter: index };
                    }
                }
            }
        }
        AuthzDecision::Allow
    }
}

#[cfg(test)]
mod tests;
