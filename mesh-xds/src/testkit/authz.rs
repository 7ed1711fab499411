//! AuthorizationPolicies for the testkit: a small declarative form of Istio's
//! `AuthorizationPolicy` and the `virtualInbound` listener istiod renders for it — HTTP
//! chains carrying `envoy.filters.http.rbac` filters in their connection manager (with
//! Istio's inbound HCM settings: `normalize_path`, XFCC `APPEND_FORWARD`), TCP chains carrying
//! `envoy.filters.network.rbac`, and mTLS chains accepting `spiffe://<trust domain>/` peers.
//!
//! ```no_run
//! # fn demo(cp: &mesh_xds::testkit::ControlPlane) {
//! use mesh_xds::testkit::authz::{AuthorizationPolicySpec, PolicyAction, RuleSpec, virtual_inbound_with_authz};
//! let allow = AuthorizationPolicySpec::new("allow-sleep", "default", PolicyAction::Allow)
//!     .rule(RuleSpec::default().principal("cluster.local/ns/default/sa/sleep"));
//! let (name, listener) = virtual_inbound_with_authz(&cp.model(), &[allow], true);
//! cp.push_raw(mesh_xds::ads::LISTENER, vec![(name, listener)]);
//! # }
//! ```

// istiod renders the deprecated forms (`exact_match`, `match_subject_alt_names`).
#![allow(deprecated)]

use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::listener::v3::{Filter, Listener, filter};
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, VirtualHost, header_matcher, route,
    route_action,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    ExtAuthz as PbExtAuthz, ext_authz,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    FilterStateMatcher, PathMatcher, StringMatcher, filter_state_matcher, path_matcher,
    string_matcher,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use prost::Message;

use super::MeshModel;
use crate::ads::LISTENER;
use crate::translate::to_any;

/// The cluster istiod's inbound chains forward to.
const INBOUND_PASSTHROUGH: &str = "InboundPassthroughClusterIpv4";

/// `AuthorizationPolicy.action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// `CUSTOM` (the provider is [`AuthorizationPolicySpec::provider`]): a shadow `DENY` RBAC
    /// filter marking the requests the rules cover, then the provider's ext_authz filter.
    Custom,
    /// `ALLOW`.
    Allow,
    /// `DENY`.
    Deny,
    /// `AUDIT` (rendered as RBAC `LOG`).
    Audit,
}

/// One `rules[]` entry: `from` (principals, namespaces) and `to` (methods, paths, ports). An
/// empty list is "not constrained".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// `from.source.principals` (`cluster.local/ns/default/sa/sleep`, or `*`).
    pub principals: Vec<String>,
    /// `from.source.notPrincipals`.
    pub not_principals: Vec<String>,
    /// `from.source.namespaces`.
    pub namespaces: Vec<String>,
    /// `to.operation.methods`.
    pub methods: Vec<String>,
    /// `to.operation.paths` (exact, `prefix*`, `*suffix`).
    pub paths: Vec<String>,
    /// `to.operation.notPaths`.
    pub not_paths: Vec<String>,
    /// `from.source.requestPrincipals` (`<iss>/<sub>`, or `*`).
    pub request_principals: Vec<String>,
    /// `when: [{key: request.auth.claims[<claim>], values: [...]}]`.
    pub claims: Vec<(String, Vec<String>)>,
    /// `from.source.ipBlocks` (`1.2.3.4` or `1.2.3.0/24`): the peer address, rendered as
    /// `direct_remote_ip` principals.
    pub ip_blocks: Vec<String>,
    /// `from.source.notIpBlocks`.
    pub not_ip_blocks: Vec<String>,
    /// `from.source.remoteIpBlocks`: the client address the HCM derives (the last
    /// `x-forwarded-for` entry on the sidecar's inbound HCM, else the peer), rendered as
    /// `remote_ip` principals.
    pub remote_ip_blocks: Vec<String>,
    /// `from.source.notRemoteIpBlocks`.
    pub not_remote_ip_blocks: Vec<String>,
}

impl RuleSpec {
    /// Adds a principal.
    pub fn principal(mut self, p: &str) -> Self {
        self.principals.push(p.into());
        self
    }
    /// Adds a not-principal.
    pub fn not_principal(mut self, p: &str) -> Self {
        self.not_principals.push(p.into());
        self
    }
    /// Adds a source namespace.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespaces.push(ns.into());
        self
    }
    /// Adds a method.
    pub fn method(mut self, m: &str) -> Self {
        self.methods.push(m.into());
        self
    }
    /// Adds a path.
    pub fn path(mut self, p: &str) -> Self {
        self.paths.push(p.into());
        self
    }
    /// Adds a not-path.
    pub fn not_path(mut self, p: &str) -> Self {
        self.not_paths.push(p.into());
        self
    }

    /// Adds a request principal (`<iss>/<sub>`, `*`).
    pub fn request_principal(mut self, p: &str) -> Self {
        self.request_principals.push(p.into());
        self
    }
    /// Adds a `request.auth.claims[<claim>]` condition.
    pub fn claim(mut self, claim: &str, values: &[&str]) -> Self {
        self.claims.push((
            claim.into(),
            values.iter().map(|v| (*v).to_owned()).collect(),
        ));
        self
    }

    /// Adds an `ipBlocks` entry.
    pub fn ip_block(mut self, cidr: &str) -> Self {
        self.ip_blocks.push(cidr.into());
        self
    }
    /// Adds a `notIpBlocks` entry.
    pub fn not_ip_block(mut self, cidr: &str) -> Self {
        self.not_ip_blocks.push(cidr.into());
        self
    }
    /// Adds a `remoteIpBlocks` entry.
    pub fn remote_ip_block(mut self, cidr: &str) -> Self {
        self.remote_ip_blocks.push(cidr.into());
        self
    }
    /// Adds a `notRemoteIpBlocks` entry.
    pub fn not_remote_ip_block(mut self, cidr: &str) -> Self {
        self.not_remote_ip_blocks.push(cidr.into());
        self
    }

    fn has_http_fields(&self) -> bool {
        !(self.methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.request_principals.is_empty()
            && self.claims.is_empty())
    }
}

/// An `AuthorizationPolicy` applying to the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicySpec {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `action`.
    pub action: PolicyAction,
    /// `rules`.
    pub rules: Vec<RuleSpec>,
    /// `provider` (the mesh config's `extensionProviders[]` entry) of a CUSTOM policy.
    pub provider: Option<ExtAuthzProviderSpec>,
}

/// A mesh config `extensionProviders[].envoyExtAuthzGrpc` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtAuthzProviderSpec {
    /// `service` (`ext-authz.foo.svc.cluster.local`).
    pub service: String,
    /// `port`.
    pub port: u16,
    /// `timeout` (`None`: Envoy's ext_authz default, 200 ms).
    pub timeout: Option<std::time::Duration>,
    /// `failOpen` (`failure_mode_allow`).
    pub fail_open: bool,
    /// `statusOnError` (istiod's default: 403).
    pub status_on_error: Option<u16>,
}

impl ExtAuthzProviderSpec {
    /// A provider at `service:port`, failing closed.
    pub fn new(service: &str, port: u16) -> Self {
        ExtAuthzProviderSpec {
            service: service.into(),
            port,
            timeout: None,
            fail_open: false,
            status_on_error: None,
        }
    }

    /// The Envoy cluster istiod points the filter at: `outbound|<port>||<service>`.
    pub fn cluster(&self) -> String {
        format!("outbound|{}||{}", self.port, self.service)
    }
}

impl AuthorizationPolicySpec {
    /// A policy without rules (ALLOW without rules allows nothing; DENY without rules denies
    /// nothing).
    pub fn new(name: &str, namespace: &str, action: PolicyAction) -> Self {
        AuthorizationPolicySpec {
            name: name.into(),
            namespace: namespace.into(),
            action,
            rules: Vec::new(),
            provider: None,
        }
    }

    /// Sets the CUSTOM action's provider.
    pub fn provider(mut self, provider: ExtAuthzProviderSpec) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Adds a rule.
    pub fn rule(mut self, r: RuleSpec) -> Self {
        self.rules.push(r);
        self
    }
}

fn string_match(pattern: &str) -> StringMatcher {
    let p = if pattern == "*" {
        string_matcher::MatchPattern::SafeRegex(
            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: ".+".into(),
                ..Default::default()
            },
        )
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        string_matcher::MatchPattern::Prefix(prefix.into())
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        string_matcher::MatchPattern::Suffix(suffix.into())
    } else {
        string_matcher::MatchPattern::Exact(pattern.into())
    };
    StringMatcher {
        match_pattern: Some(p),
        ignore_case: false,
    }
}

fn or_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::OrRules(rbac::permission::Set {
            rules,
        })),
    }
}

fn or_ids(ids: Vec<rbac::Principal>) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::OrIds(rbac::principal::Set {
            ids,
        })),
    }
}

fn peer_principal(m: StringMatcher) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::FilterState(
            FilterStateMatcher {
                key: mesh_core::authz::PEER_PRINCIPAL_FILTER_STATE.into(),
                matcher: Some(filter_state_matcher::Matcher::StringMatch(m)),
            },
        )),
    }
}

/// istiod's IP principal: `direct_remote_ip` (`ipBlocks`) or `remote_ip` (`remoteIpBlocks`)
/// with the block as a CIDR range (a bare address is `/32` or `/128`).
fn ip_principal(block: &str, remote: bool) -> rbac::Principal {
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::google::protobuf::UInt32Value;
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => (a, l.parse().unwrap_or(0)),
        None => (block, if block.contains(':') { 128 } else { 32 }),
    };
    let range = CidrRange {
        address_prefix: addr.into(),
        prefix_len: Some(UInt32Value { value: len }),
    };
    rbac::Principal {
        identifier: Some(if remote {
            rbac::principal::Identifier::RemoteIp(range)
        } else {
            rbac::principal::Identifier::DirectRemoteIp(range)
        }),
    }
}

fn principal_matcher(p: &str) -> StringMatcher {
    if p == "*" {
        string_match("*")
    } else {
        string_match(&format!("spiffe://{p}"))
    }
}

fn path_rule(p: &str) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string_match(p))),
        })),
    }
}

fn method_rule(m: &str) -> rbac::Permission {
    let header = HeaderMatcher {
        name: ":method".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::ExactMatch(m.into())),
        ..Default::default()
    };
    rbac::Permission {
        rule: Some(rbac::permission::Rule::Header(header)),
    }
}

/// A metadata principal on the JWT payload istiod's `jwt_authn` writes
/// (`envoy.filters.http.jwt_authn` → `payload` → `claims…`), matching a string claim or any
/// element of a list claim (istiod's extended JWT matcher).
fn jwt_claim(claims: &[&str], m: StringMatcher) -> rbac::Principal {
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        ListMatcher, MetadataMatcher, OrMatcher, ValueMatcher, list_matcher,
        metadata_matcher::{PathSegment, path_segment},
        value_matcher,
    };
    let string = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::StringMatch(m)),
    };
    let value = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::OrMatch(OrMatcher {
            value_matchers: vec![
                ValueMatcher {
                    match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(
                        ListMatcher {
                            match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(
                                string.clone(),
                            ))),
                        },
                    ))),
                },
                string,
            ],
        })),
    };
    let path = std::iter::once("payload")
        .chain(claims.iter().copied())
        .map(|k| PathSegment {
            segment: Some(path_segment::Segment::Key(k.into())),
        })
        .collect();
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Metadata(MetadataMatcher {
            filter: mesh_core::authz::jwt::JWT_AUTHN_FILTER.into(),
            path,
            value: Some(value),
            invert: false,
        })),
    }
}

/// istiod's request principal: `iss` and `sub` of the payload (split at the last `/`), each
/// `.+` for `*`.
fn request_principal(p: &str) -> rbac::Principal {
    let (iss, sub) = match p.rsplit_once('/') {
        _ if p == "*" => ("*", "*"),
        Some((i, s)) => (i, s),
        None => (p, "*"),
    };
    let one = |claim: &str, v: &str| {
        use envoy_types::pb::envoy::r#type::matcher::v3::{
            MetadataMatcher, ValueMatcher,
            metadata_matcher::{PathSegment, path_segment},
            value_matcher,
        };
        rbac::Principal {
            identifier: Some(rbac::principal::Identifier::Metadata(MetadataMatcher {
                filter: mesh_core::authz::jwt::JWT_AUTHN_FILTER.into(),
                path: ["payload", claim]
                    .iter()
                    .map(|k| PathSegment {
                        segment: Some(path_segment::Segment::Key((*k).into())),
                    })
                    .collect(),
                value: Some(ValueMatcher {
                    match_pattern: Some(value_matcher::MatchPattern::StringMatch(string_match(v))),
                }),
                invert: false,
            })),
        }
    };
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::AndIds(rbac::principal::Set {
            ids: vec![one("iss", iss), one("sub", sub)],
        })),
    }
}

/// The RBAC policy istiod renders for one rule; `http: false` drops HTTP-only fields (TCP
/// chains).
fn rule_policy(r: &RuleSpec, http: bool) -> rbac::Policy {
    let mut perms = Vec::new();
    if http {
        if !r.methods.is_empty() {
            perms.push(or_rules(r.methods.iter().map(|m| method_rule(m)).collect()));
        }
        if !r.paths.is_empty() {
            perms.push(or_rules(r.paths.iter().map(|p| path_rule(p)).collect()));
        }
        if !r.not_paths.is_empty() {
            perms.push(rbac::Permission {
                rule: Some(rbac::permission::Rule::NotRule(Box::new(or_rules(
                    r.not_paths.iter().map(|p| path_rule(p)).collect(),
                )))),
            });
        }
    }
    let permission = if perms.is_empty() {
        rbac::Permission {
            rule: Some(rbac::permission::Rule::Any(true)),
        }
    } else {
        rbac::Permission {
            rule: Some(rbac::permission::Rule::AndRules(rbac::permission::Set {
                rules: perms,
            })),
        }
    };
    let mut ids = Vec::new();
    if !r.principals.is_empty() {
        ids.push(or_ids(
            r.principals
                .iter()
                .map(|p| peer_principal(principal_matcher(p)))
                .collect(),
        ));
    }
    if !r.not_principals.is_empty() {
        ids.push(rbac::Principal {
            identifier: Some(rbac::principal::Identifier::NotId(Box::new(or_ids(
                r.not_principals
                    .iter()
                    .map(|p| peer_principal(principal_matcher(p)))
                    .collect(),
            )))),
        });
    }
    if !r.namespaces.is_empty() {
        ids.push(or_ids(
            r.namespaces
                .iter()
                .map(|ns| {
                    peer_principal(StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(
                            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                                regex: format!(".*/ns/{ns}/.*"),
                                ..Default::default()
                            },
                        )),
                        ignore_case: false,
                    })
                })
                .collect(),
        ));
    }
    let blocks = [
        (&r.ip_blocks, false, false),
        (&r.not_ip_blocks, false, true),
        (&r.remote_ip_blocks, true, false),
        (&r.not_remote_ip_blocks, true, true),
    ];
    for (cidrs, remote, not) in blocks {
        if cidrs.is_empty() {
            continue;
        }
        let any_of = or_ids(cidrs.iter().map(|c| ip_principal(c, remote)).collect());
        ids.push(if not {
            rbac::Principal {
                identifier: Some(rbac::principal::Identifier::NotId(Box::new(any_of))),
            }
        } else {
            any_of
        });
    }
    if http && !r.request_principals.is_empty() {
        ids.push(or_ids(
            r.request_principals
                .iter()
                .map(|p| request_principal(p))
                .collect(),
        ));
    }
    if http {
        for (claim, values) in &r.claims {
            ids.push(or_ids(
                values
                    .iter()
                    .map(|v| jwt_claim(&[claim.as_str()], string_match(v)))
                    .collect(),
            ));
        }
    }
    let principal = if ids.is_empty() {
        rbac::Principal {
            identifier: Some(rbac::principal::Identifier::Any(true)),
        }
    } else {
        rbac::Principal {
            identifier: Some(rbac::principal::Identifier::AndIds(rbac::principal::Set {
                ids,
            })),
        }
    };
    rbac::Policy {
        permissions: vec![permission],
        principals: vec![principal],
        ..Default::default()
    }
}

/// The rule set of one action, as istiod renders it (`None`: no policy with that action).
/// On TCP chains an ALLOW rule with HTTP-only fields is dropped (it can never match) and a
/// DENY rule loses its HTTP-only fields (so it denies more), as istiod does.
fn rules_for(
    policies: &[AuthorizationPolicySpec],
    action: PolicyAction,
    http: bool,
) -> Option<rbac::Rbac> {
    let selected: Vec<&AuthorizationPolicySpec> =
        policies.iter().filter(|p| p.action == action).collect();
    if selected.is_empty() {
        return None;
    }
    let mut out = rbac::Rbac {
        action: match action {
            PolicyAction::Allow => rbac::rbac::Action::Allow as i32,
            PolicyAction::Deny => rbac::rbac::Action::Deny as i32,
            PolicyAction::Audit => rbac::rbac::Action::Log as i32,
            // The CUSTOM shadow rules mark the requests to send to the provider.
            PolicyAction::Custom => rbac::rbac::Action::Deny as i32,
        },
        ..Default::default()
    };
    for p in selected {
        for (i, r) in p.rules.iter().enumerate() {
            if !http && action == PolicyAction::Allow && r.has_http_fields() {
                continue;
            }
            let prefix = if action == PolicyAction::Custom {
                CUSTOM_POLICY_PREFIX
            } else {
                ""
            };
            out.policies.insert(
                format!("{prefix}ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name),
                rule_policy(r, http),
            );
        }
    }
    Some(out)
}

/// Prefix istiod gives CUSTOM policies' shadow rule names (and the ext_authz filter's
/// `filter_enabled_metadata` matches).
pub const CUSTOM_POLICY_PREFIX: &str = "istio-ext-authz-";

/// The CUSTOM filters istiod renders for `policies`' CUSTOM entries: an
/// `envoy.filters.http.rbac` with only `shadow_rules` (action DENY, stat prefix
/// `istio_ext_authz_`) and the provider's `envoy.filters.http.ext_authz`, enabled by
/// `envoy.filters.http.rbac/istio_ext_authz_shadow_effective_policy_id` starting with
/// `istio-ext-authz`. Empty without CUSTOM policies.
pub fn http_custom_filters(policies: &[AuthorizationPolicySpec]) -> Vec<HttpFilter> {
    let Some(shadow) = rules_for(policies, PolicyAction::Custom, true) else {
        return Vec::new();
    };
    let Some(provider) = policies
        .iter()
        .filter(|p| p.action == PolicyAction::Custom)
        .find_map(|p| p.provider.as_ref())
    else {
        return Vec::new();
    };
    vec![
        HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(to_any(&HttpRbac {
                shadow_rules: Some(shadow),
                shadow_rules_stat_prefix: "istio_ext_authz_".into(),
                ..Default::default()
            }))),
            ..Default::default()
        },
        HttpFilter {
            name: "envoy.filters.http.ext_authz".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
                &ext_authz_filter(provider),
            ))),
            ..Default::default()
        },
    ]
}

/// The `envoy.filters.http.ext_authz` config istiod renders for an `envoyExtAuthzGrpc`
/// provider.
pub fn ext_authz_filter(provider: &ExtAuthzProviderSpec) -> PbExtAuthz {
    use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    use envoy_types::pb::envoy::r#type::matcher::v3::{MetadataMatcher, ValueMatcher};
    use envoy_types::pb::envoy::r#type::matcher::v3::{metadata_matcher, value_matcher};
    PbExtAuthz {
        services: Some(ext_authz::Services::GrpcService(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: provider.cluster(),
                    authority: provider.service.clone(),
                    ..Default::default()
                },
            )),
            timeout: provider
                .timeout
                .map(|t| envoy_types::pb::google::protobuf::Duration {
                    seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
                }),
            ..Default::default()
        })),
        transport_api_version: envoy_types::pb::envoy::config::core::v3::ApiVersion::V3 as i32,
        failure_mode_allow: provider.fail_open,
        status_on_error: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus {
            code: i32::from(provider.status_on_error.unwrap_or(403)),
        }),
        include_peer_certificate: true,
        filter_enabled_metadata: Some(MetadataMatcher {
            filter: "envoy.filters.http.rbac".into(),
            path: vec![metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(
                    "istio_ext_authz_shadow_effective_policy_id".into(),
                )),
            }],
            value: Some(ValueMatcher {
                match_pattern: Some(value_matcher::MatchPattern::StringMatch(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Prefix(
                        "istio-ext-authz".into(),
                    )),
                    ignore_case: false,
                })),
            }),
            invert: false,
        }),
        ..Default::default()
    }
}

/// The `envoy.filters.http.rbac` filters for `policies` (AUDIT, DENY, ALLOW), without the
/// router, after the CUSTOM filters ([`http_custom_filters`]) when there are CUSTOM policies.
pub fn http_rbac_filters(policies: &[AuthorizationPolicySpec]) -> Vec<HttpFilter> {
    let custom = http_custom_filters(policies);
    custom
        .into_iter()
        .chain(http_rbac_only_filters(policies))
        .collect()
}

fn http_rbac_only_filters(policies: &[AuthorizationPolicySpec]) -> Vec<HttpFilter> {
    [PolicyAction::Audit, PolicyAction::Deny, PolicyAction::Allow]
        .into_iter()
        .filter_map(|a| rules_for(policies, a, true))
        .map(|rules| HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(to_any(&HttpRbac {
                rules: Some(rules),
                shadow_rules_stat_prefix: "istio_dry_run_allow_".into(),
                ..Default::default()
            }))),
            ..Default::default()
        })
        .collect()
}

/// The `envoy.filters.network.rbac` filters for `policies` (AUDIT, DENY, ALLOW).
pub fn network_rbac_filters(policies: &[AuthorizationPolicySpec]) -> Vec<Filter> {
    [PolicyAction::Audit, PolicyAction::Deny, PolicyAction::Allow]
        .into_iter()
        .filter_map(|a| rules_for(policies, a, false))
        .map(|rules| Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(filter::ConfigType::TypedConfig(to_any(&NetworkRbac {
                rules: Some(rules),
                stat_prefix: "tcp.".into(),
                shadow_rules_stat_prefix: "istio_dry_run_allow_".into(),
                ..Default::default()
            }))),
        })
        .collect()
}

/// The inbound HTTP connection manager istiod renders (`inbound_0.0.0.0_<port>`), with the
/// authorization filters and the router to `InboundPassthroughClusterIpv4`.
pub fn inbound_http_connection_manager(policies: &[AuthorizationPolicySpec]) -> Filter {
    inbound_http_connection_manager_with_jwt(policies, &[])
}

/// `envoy.filters.http.router`, the last HTTP filter of every connection manager istiod
/// renders.
pub(crate) fn router_http_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

/// [`inbound_http_connection_manager`] with the `jwt_authn` filter istiod renders for
/// `jwt_rules` first (none when empty).
pub fn inbound_http_connection_manager_with_jwt(
    policies: &[AuthorizationPolicySpec],
    jwt_rules: &[JwtRuleSpec],
) -> Filter {
    let mut http_filters: Vec<HttpFilter> = jwt_authn_filter(jwt_rules).into_iter().collect();
    http_filters.extend(http_rbac_filters(policies));
    http_filters.push(router_http_filter());
    let hcm = HttpConnectionManager {
        stat_prefix: "inbound_0.0.0.0_80".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: "inbound|http|0".into(),
                virtual_hosts: vec![VirtualHost {
                    name: "inbound|http|0".into(),
                    domains: vec!["*".into()],
                    routes: vec![Route {
                        r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                            path_specifier: Some(
                                envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix("/".into()),
                            ),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                INBOUND_PASSTHROUGH.into(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters,
        forward_client_cert_details:
            http_connection_manager::ForwardClientCertDetails::AppendForward as i32,
        set_current_client_cert_details: Some(
            http_connection_manager::SetCurrentClientCertDetails {
                subject: Some(BoolValue { value: true }),
                dns: true,
                uri: true,
                ..Default::default()
            },
        ),
        normalize_path: Some(BoolValue { value: true }),
        path_with_escaped_slashes_action:
            http_connection_manager::PathWithEscapedSlashesAction::KeepUnchanged as i32,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(to_any(&hcm))),
    }
}

/// `model`'s `virtualInbound` listener with `policies` applied: every chain but the 15006
/// blackhole becomes an HTTP chain (`http`) or a TCP chain with network RBAC (the HTTP chains
/// of sniffed ports are dropped: every port is then a TCP port, reporting `istio_tcp_*`), and
/// every mTLS chain accepts only peers of the model's trust domain
/// (`match_subject_alt_names: [{prefix: "spiffe://<td>/"}]`). Returns the name and the
/// resource for [`super::ControlPlane::push_raw`] under the listener type URL.
pub fn virtual_inbound_with_authz(
    model: &MeshModel,
    policies: &[AuthorizationPolicySpec],
    http: bool,
) -> (String, Any) {
    virtual_inbound_with_policies(model, policies, &[], http)
}

/// [`virtual_inbound_with_authz`] with RequestAuthentication `jwt_rules` rendered into every
/// HTTP chain (`jwt_authn` before the RBAC filters, as istiod orders them).
pub fn virtual_inbound_with_policies(
    model: &MeshModel,
    policies: &[AuthorizationPolicySpec],
    jwt_rules: &[JwtRuleSpec],
    http: bool,
) -> (String, Any) {
    let policies = &with_trust_domain_aliases(model, policies);
    let generated = model.generate("default");
    let mut listener = generated
        .get(LISTENER)
        .and_then(|ls| ls.get("virtualInbound"))
        .and_then(|any| Listener::decode(any.value.as_slice()).ok())
        .unwrap_or_default();
    if !http {
        // Network RBAC sits on TCP chains: the port is served as a TCP port (istiod's HTTP
        // chains of a sniffed port would carry HTTP RBAC instead).
        listener.filter_chains.retain(|fc| {
            !fc.filters
                .iter()
                .any(|f| f.name == "envoy.filters.network.http_connection_manager")
        });
    }
    for fc in &mut listener.filter_chains {
        let blackhole = fc
            .filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port)
            .is_some_and(|p| p.value == 15006);
        if blackhole {
            continue;
        }
        fc.filters = if http {
            vec![inbound_http_connection_manager_with_jwt(
                policies, jwt_rules,
            )]
        } else {
            let mut filters = network_rbac_filters(policies);
            filters.append(&mut fc.filters);
            filters
        };
        if let Some(ts) = &mut fc.transport_socket
            && let Some(transport_socket::ConfigType::TypedConfig(any)) = &mut ts.config_type
            && let Ok(mut ctx) = DownstreamTlsContext::decode(any.value.as_slice())
        {
            if let Some(common) = &mut ctx.common_tls_context
                && let Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
                    &mut common.validation_context_type
            {
                let v = c
                    .default_validation_context
                    .get_or_insert_with(Default::default);
                v.match_subject_alt_names = model.inbound_peer_san_matchers();
            }
            *any = to_any(&ctx);
        }
    }
    (listener.name.clone(), to_any(&listener))
}

/// `policies` with their source principals and not-principals rewritten for the model's
/// trust-domain bundle, as istiod's `MigrateTrustDomain` does before rendering.
fn with_trust_domain_aliases(
    model: &MeshModel,
    policies: &[AuthorizationPolicySpec],
) -> Vec<AuthorizationPolicySpec> {
    let bundle = model.trust_domains();
    let mut out = policies.to_vec();
    for rule in out.iter_mut().flat_map(|p| p.rules.iter_mut()) {
        rule.principals = replace_trust_domain_aliases(&bundle, &rule.principals);
        rule.not_principals = replace_trust_domain_aliases(&bundle, &rule.not_principals);
    }
    out
}

/// istiod's `trustdomain.Bundle.ReplaceTrustDomainAliases`: a principal
/// `<td>/ns/<ns>/sa/<sa>` whose trust domain is in `bundle` (the trust domain, then its
/// aliases) or is `cluster.local` (which stands for the local trust domain) becomes one
/// principal per trust domain of the bundle; `*`, principals with a `*` trust domain or
/// another shape, and foreign trust domains are kept as written.
pub fn replace_trust_domain_aliases(bundle: &[String], principals: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for p in principals {
        let parts: Vec<&str> = p.split('/').collect();
        let enforced = parts.len() == 5 && !parts[0].contains('*');
        if !enforced || !(bundle.iter().any(|td| td == parts[0]) || parts[0] == "cluster.local") {
            out.push(p.clone());
            continue;
        }
        let rest = &p[parts[0].len()..];
        let mut variants: Vec<String> = Vec::new();
        for td in bundle {
            let replaced = format!("{td}{rest}");
            if !variants.contains(&replaced) {
                variants.push(replaced);
            }
        }
        out.append(&mut variants);
    }
    out
}

/// One RequestAuthentication `jwtRules[]` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtRuleSpec {
    /// `issuer`.
    pub issuer: String,
    /// `audiences`.
    pub audiences: Vec<String>,
    /// `jwks` (inline; istiod also inlines keys it fetched from `jwksUri`).
    pub jwks: Option<String>,
    /// `jwksUri` rendered as `remote_jwks` (Envoy fetches it), with its `timeout`.
    pub jwks_uri: Option<(String, std::time::Duration)>,
    /// `fromHeaders` (name, prefix).
    pub from_headers: Vec<(String, String)>,
    /// `fromParams`.
    pub from_params: Vec<String>,
    /// `forwardOriginalToken`.
    pub forward_original_token: bool,
    /// `outputPayloadToHeader`.
    pub output_payload_to_header: Option<String>,
    /// `outputClaimToHeaders` (header, claim).
    pub output_claim_to_headers: Vec<(String, String)>,
    /// The remote JWKS `cache_duration` (istiod always renders 5 minutes; tests shorten it).
    pub jwks_cache_duration: Option<std::time::Duration>,
}

impl JwtRuleSpec {
    /// A rule for `issuer` with inline keys.
    pub fn inline(issuer: &str, jwks: &str) -> Self {
        JwtRuleSpec {
            issuer: issuer.into(),
            jwks: Some(jwks.into()),
            ..Default::default()
        }
    }

    /// A rule for `issuer` whose keys Envoy fetches from `uri`.
    pub fn remote(issuer: &str, uri: &str, timeout: std::time::Duration) -> Self {
        JwtRuleSpec {
            issuer: issuer.into(),
            jwks_uri: Some((uri.into(), timeout)),
            ..Default::default()
        }
    }
}

/// The `envoy.filters.http.jwt_authn` filter istiod renders for RequestAuthentication rules
/// (`pilot/pkg/security/authn/policy_applier.go` `convertToEnvoyJwtConfig`): providers
/// `origins-<i>` in issuer order, `payload_in_metadata: payload` with `permission`/`scope`
/// space-delimited, remote JWKS cached 5 minutes, and the requirement `requires_any {provider,
/// allow_missing}` (several issuers: any provider, or all of `{provider OR allow_missing}`).
pub fn jwt_authn_filter(rules: &[JwtRuleSpec]) -> Option<HttpFilter> {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, HttpUri, data_source, http_uri};
    use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwt;
    use envoy_types::pb::google::protobuf::Duration as PbDuration;
    if rules.is_empty() {
        return None;
    }
    let mut sorted: Vec<&JwtRuleSpec> = rules.iter().collect();
    sorted.sort_by(|a, b| a.issuer.cmp(&b.issuer));
    let req = |t: jwt::jwt_requirement::RequiresType| jwt::JwtRequirement {
        requires_type: Some(t),
    };
    let mut providers = std::collections::HashMap::new();
    let mut inner_and = Vec::new();
    let mut outer_or = Vec::new();
    for (i, r) in sorted.iter().enumerate() {
        let name = format!("origins-{i}");
        let jwks = match &r.jwks_uri {
            Some((uri, timeout)) => {
                jwt::jwt_provider::JwksSourceSpecifier::RemoteJwks(jwt::RemoteJwks {
                    http_uri: Some(HttpUri {
                        uri: uri.clone(),
                        timeout: Some(PbDuration {
                            seconds: timeout.as_secs() as i64,
                            nanos: timeout.subsec_nanos() as i32,
                        }),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(format!(
                            "outbound|80||{}",
                            uri.split("//")
                                .nth(1)
                                .and_then(|h| h.split(['/', ':']).next())
                                .unwrap_or("")
                        ))),
                    }),
                    cache_duration: Some(match r.jwks_cache_duration {
                        Some(d) => PbDuration {
                            seconds: d.as_secs() as i64,
                            nanos: d.subsec_nanos() as i32,
                        },
                        None => PbDuration {
                            seconds: 300,
                            nanos: 0,
                        },
                    }),
                    ..Default::default()
                })
            }
            None => jwt::jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
                specifier: Some(data_source::Specifier::InlineString(
                    r.jwks.clone().unwrap_or_default(),
                )),
                ..Default::default()
            }),
        };
        providers.insert(
            name.clone(),
            jwt::JwtProvider {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                forward: r.forward_original_token,
                forward_payload_header: r.output_payload_to_header.clone().unwrap_or_default(),
                payload_in_metadata: "payload".into(),
                normalize_payload_in_metadata: Some(jwt::jwt_provider::NormalizePayload {
                    space_delimited_claims: vec!["permission".into(), "scope".into()],
                }),
                claim_to_headers: r
                    .output_claim_to_headers
                    .iter()
                    .map(|(h, c)| jwt::JwtClaimToHeader {
                        header_name: h.clone(),
                        claim_name: c.clone(),
                        ..Default::default()
                    })
                    .collect(),
                from_headers: r
                    .from_headers
                    .iter()
                    .map(|(n, p)| jwt::JwtHeader {
                        name: n.clone(),
                        value_prefix: p.clone(),
                    })
                    .collect(),
                from_params: r.from_params.clone(),
                jwks_source_specifier: Some(jwks),
                ..Default::default()
            },
        );
        inner_and.push(req(jwt::jwt_requirement::RequiresType::RequiresAny(
            jwt::JwtRequirementOrList {
                requirements: vec![
                    req(jwt::jwt_requirement::RequiresType::ProviderName(
                        name.clone(),
                    )),
                    req(jwt::jwt_requirement::RequiresType::AllowMissing(
                        Default::default(),
                    )),
                ],
            },
        )));
        outer_or.push(req(jwt::jwt_requirement::RequiresType::ProviderName(name)));
    }
    let requires = if inner_and.len() == 1 {
        inner_and.remove(0)
    } else {
        outer_or.push(req(jwt::jwt_requirement::RequiresType::RequiresAll(
            jwt::JwtRequirementAndList {
                requirements: inner_and,
            },
        )));
        req(jwt::jwt_requirement::RequiresType::RequiresAny(
            jwt::JwtRequirementOrList {
                requirements: outer_or,
            },
        ))
    };
    let cfg = jwt::JwtAuthentication {
        providers,
        rules: vec![jwt::RequirementRule {
            r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                path_specifier: Some(
                    envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(
                        "/".into(),
                    ),
                ),
                ..Default::default()
            }),
            requirement_type: Some(jwt::requirement_rule::RequirementType::Requires(requires)),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    };
    Some(HttpFilter {
        name: "envoy.filters.http.jwt_authn".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(to_any(&cfg))),
        ..Default::default()
    })
}

/// A real `envoy.service.auth.v3.Authorization` gRPC server on 127.0.0.1 for CUSTOM tests:
/// allows a request whose `x-ext-authz` header is `allow` (or, after 10 s, `slow`) (adding
/// `x-ext-authz-check-result: allowed` and removing `x-ext-authz`), denies anything else with
/// 403, body `denied by ext_authz for path <path>` and `x-ext-authz-check-result: denied` —
/// the behaviour of Istio's sample `ext-authz` provider. Every CheckRequest it received is
/// kept for assertions.
#[derive(Debug)]
pub struct ExtAuthzProvider {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<PbCheckRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest as PbCheckRequest, CheckResponse as PbCheckResponse,
};

#[derive(Debug, Clone)]
struct ProviderService {
    received: std::sync::Arc<std::sync::Mutex<Vec<PbCheckRequest>>>,
}

#[tonic::async_trait]
impl envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization
    for ProviderService
{
    async fn check(
        &self,
        request: tonic::Request<PbCheckRequest>,
    ) -> Result<tonic::Response<PbCheckResponse>, tonic::Status> {
        use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
        use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
        use envoy_types::pb::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
        use envoy_types::pb::google::rpc::Status;
        let req = request.into_inner();
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.clone())
            .unwrap_or_default();
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(req);
        let header = |k: &str, v: &str| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let verdict = http.headers.get("x-ext-authz").map(String::as_str);
        if verdict == Some("slow") {
            // Answers (allow) only after any sane ext_authz timeout.
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        }
        let allowed = matches!(verdict, Some("allow" | "slow"));
        let response = if allowed {
            PbCheckResponse {
                status: Some(Status::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![header("x-ext-authz-check-result", "allowed")],
                    headers_to_remove: vec!["x-ext-authz".into()],
                    ..Default::default()
                })),
                ..Default::default()
            }
        } else {
            PbCheckResponse {
                // PERMISSION_DENIED
                status: Some(Status {
                    code: 7,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 403 }),
                    headers: vec![header("x-ext-authz-check-result", "denied")],
                    body: format!("denied by ext_authz for path {}", http.path),
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(response))
    }
}

impl ExtAuthzProvider {
    /// Starts the provider on an ephemeral 127.0.0.1 port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = std::sync::Arc::default();
        let service = ProviderService {
            received: std::sync::Arc::clone(&received),
        };
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let server = envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer::new(service);
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(%error, "ext_authz test provider stopped");
            }
        });
        Ok(ExtAuthzProvider {
            addr,
            received,
            task,
        })
    }

    /// The CheckRequests received so far.
    pub fn received(&self) -> Vec<PbCheckRequest> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops accepting connections (calls on an established connection may still be served).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for ExtAuthzProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::cluster::SanMatcher;
    use mesh_core::listener::ListenerKind;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn principals_get_one_variant_per_trust_domain_of_the_bundle() {
        let bundle = strings(&["cluster.local", "alias.domain"]);
        let out = replace_trust_domain_aliases(
            &bundle,
            &strings(&[
                "cluster.local/ns/x/sa/y",
                "alias.domain/ns/x/sa/z",
                "foreign.org/ns/x/sa/y",
                "*",
                "*/ns/x/sa/y",
                "cluster.local/ns/x/*",
            ]),
        );
        assert_eq!(
            out,
            strings(&[
                "cluster.local/ns/x/sa/y",
                "alias.domain/ns/x/sa/y",
                "cluster.local/ns/x/sa/z",
                "alias.domain/ns/x/sa/z",
                "foreign.org/ns/x/sa/y",
                "*",
                "*/ns/x/sa/y",
                "cluster.local/ns/x/*",
            ])
        );
        // `cluster.local` stands for the local trust domain when the mesh uses another one.
        let out = replace_trust_domain_aliases(
            &strings(&["td2", "td1"]),
            &strings(&["cluster.local/ns/x/sa/y"]),
        );
        assert_eq!(out, strings(&["td2/ns/x/sa/y", "td1/ns/x/sa/y"]));
    }

    #[test]
    fn ip_blocks_render_as_direct_remote_ip_and_remote_ip_blocks_as_remote_ip() {
        let r = RuleSpec::default()
            .ip_block("10.0.0.0/8")
            .remote_ip_block("1.2.3.4")
            .not_remote_ip_block("2001:db8::1");
        let policy = rule_policy(&r, true);
        let Some(rbac::principal::Identifier::AndIds(and)) = &policy.principals[0].identifier
        else {
            panic!("and_ids expected: {policy:?}");
        };
        let one = |p: &rbac::Principal| match &p.identifier {
            Some(rbac::principal::Identifier::OrIds(or)) => or.ids[0].clone(),
            Some(rbac::principal::Identifier::NotId(inner)) => match &inner.identifier {
                Some(rbac::principal::Identifier::OrIds(or)) => or.ids[0].clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let cidr = |p: rbac::Principal| match p.identifier {
            Some(rbac::principal::Identifier::DirectRemoteIp(c)) => {
                ("direct", c.address_prefix, c.prefix_len.unwrap().value)
            }
            Some(rbac::principal::Identifier::RemoteIp(c)) => {
                ("remote", c.address_prefix, c.prefix_len.unwrap().value)
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(cidr(one(&and.ids[0])), ("direct", "10.0.0.0".into(), 8));
        assert_eq!(cidr(one(&and.ids[1])), ("remote", "1.2.3.4".into(), 32));
        assert!(matches!(
            and.ids[2].identifier,
            Some(rbac::principal::Identifier::NotId(_))
        ));
        assert_eq!(
            cidr(one(&and.ids[2])),
            ("remote", "2001:db8::1".into(), 128)
        );
    }

    #[test]
    fn inbound_chains_accept_the_trust_domain_and_its_aliases() {
        let model = MeshModel::default()
            .trust_domain_alias("alias.domain")
            .trust_domain_alias("cluster.local");
        for listener in [
            virtual_inbound_with_authz(&model, &[], true).1,
            model.generate("default")[LISTENER]["virtualInbound"].clone(),
        ] {
            let pb = Listener::decode(listener.value.as_slice()).unwrap();
            let translated = crate::translate::translate_listener(&pb).unwrap();
            let ListenerKind::Inbound(policy) = translated.listener.kind else {
                panic!("inbound policy expected");
            };
            assert_eq!(
                policy.default_peer_sans,
                vec![
                    SanMatcher::Prefix("spiffe://cluster.local/".into()),
                    SanMatcher::Prefix("spiffe://alias.domain/".into()),
                ]
            );
        }
    }
}
