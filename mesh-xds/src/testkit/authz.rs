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

/// `AuthorizationPolicy.action` (CUSTOM is not modelled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
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
        }
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
        },
        ..Default::default()
    };
    for p in selected {
        for (i, r) in p.rules.iter().enumerate() {
            if !http && action == PolicyAction::Allow && r.has_http_fields() {
                continue;
            }
            out.policies.insert(
                format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name),
                rule_policy(r, http),
            );
        }
    }
    Some(out)
}

/// The `envoy.filters.http.rbac` filters for `policies` (AUDIT, DENY, ALLOW), without the
/// router.
pub fn http_rbac_filters(policies: &[AuthorizationPolicySpec]) -> Vec<HttpFilter> {
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

/// [`inbound_http_connection_manager`] with the `jwt_authn` filter istiod renders for
/// `jwt_rules` first (none when empty).
pub fn inbound_http_connection_manager_with_jwt(
    policies: &[AuthorizationPolicySpec],
    jwt_rules: &[JwtRuleSpec],
) -> Filter {
    let mut http_filters: Vec<HttpFilter> = jwt_authn_filter(jwt_rules).into_iter().collect();
    http_filters.extend(http_rbac_filters(policies));
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
            &Router::default(),
        ))),
        ..Default::default()
    });
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
/// blackhole becomes an HTTP chain (`http`) or a TCP chain with network RBAC, and every mTLS
/// chain accepts only peers of the model's trust domain
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
    let generated = model.generate("default");
    let mut listener = generated
        .get(LISTENER)
        .and_then(|ls| ls.get("virtualInbound"))
        .and_then(|any| Listener::decode(any.value.as_slice()).ok())
        .unwrap_or_default();
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
                v.match_subject_alt_names = vec![StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Prefix(format!(
                        "spiffe://{}/",
                        model.trust_domain
                    ))),
                    ignore_case: false,
                }];
            }
            *any = to_any(&ctx);
        }
    }
    (listener.name.clone(), to_any(&listener))
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
