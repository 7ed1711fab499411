//! Envoy's RBAC and ext_authz filter configs (as istiod renders AuthorizationPolicies into the
//! inbound listener) → [`mesh_core::authz`].
//!
//! * `envoy.filters.http.rbac` (`extensions.filters.http.rbac.v3.RBAC`) and
//!   `envoy.filters.network.rbac` (`extensions.filters.network.rbac.v3.RBAC`) → [`RbacFilter`].
//! * `envoy.filters.http.ext_authz` with a gRPC service (the CUSTOM action) → [`ExtAuthz`].
//! * [`translate_http_authz_filters`] / [`translate_network_authz_filters`] pick those out of
//!   an HTTP connection manager's `http_filters` / a filter chain's `filters`, in order.
//!
//! Anything the engine cannot evaluate exactly (CEL `condition`, the `matcher` API, custom
//! principals, a non-gRPC ext_authz) is an error naming the field: enforcing a policy only
//! partly would be worse than refusing the listener.

// istiod still renders the deprecated forms (`exact_match`, `metadata`).
#![allow(deprecated)]

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
use envoy_types::pb::envoy::config::listener::v3::Filter as NetworkFilter;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType as NetworkConfigType;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher as PbHeaderMatcher;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::ExtAuthz as PbExtAuthz;
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::ext_authz::Services;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpConfigType;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3 as pbm;
use envoy_types::pb::google::protobuf::Any;
use mesh_core::authz::{
    AuthzChain, AuthzFilter, Cidr, ExtAuthz, HeaderMatch, HeaderMatcher, MetadataMatcher,
    Permission, Policy, Principal, RbacAction, RbacFilter, RbacRules, StringMatcher,
    ValueMatcher,
};

use super::{duration, from_any};

/// Type URL of the HTTP RBAC filter config.
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
/// Type URL of the network RBAC filter config.
pub const NETWORK_RBAC_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
/// Type URL of the ext_authz HTTP filter config.
pub const EXT_AUTHZ_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
/// Type URL of the URI template path matcher (RBAC `url_path`-style `uri_template` permissions).
pub const URI_TEMPLATE_MATCH_TYPE: &str =
    "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig";

/// The authorization filters among an HCM's `http_filters`, in order.
pub fn translate_http_authz_filters(filters: &[HttpFilter]) -> Result<AuthzChain, String> {
    let mut chain = AuthzChain::default();
    for (i, f) in filters.iter().enumerate() {
        let Some(HttpConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        let at = |e: String| format!("http_filters[{i}] ({}): {e}", f.name);
        match any.type_url.as_str() {
            HTTP_RBAC_TYPE => chain.filters.push(AuthzFilter::Rbac(
                translate_http_rbac(&from_any(any).map_err(at)?).map_err(at)?,
            )),
            EXT_AUTHZ_TYPE => chain.filters.push(AuthzFilter::ExtAuthz(
                translate_ext_authz(&from_any(any).map_err(at)?).map_err(at)?,
            )),
            _ => {}
        }
    }
    Ok(chain)
}

/// The network RBAC filters among a filter chain's `filters`, in order.
pub fn translate_network_authz_filters(filters: &[NetworkFilter]) -> Result<AuthzChain, String> {
    let mut chain = AuthzChain::default();
    for (i, f) in filters.iter().enumerate() {
        let Some(NetworkConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        if any.type_url == NETWORK_RBAC_TYPE {
            let at = |e: String| format!("filters[{i}] ({}): {e}", f.name);
            chain.filters.push(AuthzFilter::Rbac(
                translate_network_rbac(&from_any(any).map_err(at)?).map_err(at)?,
            ));
        }
    }
    Ok(chain)
}

/// `envoy.filters.http.rbac`.
pub fn translate_http_rbac(cfg: &HttpRbac) -> Result<RbacFilter, String> {
    if cfg.matcher.is_some() || cfg.shadow_matcher.is_some() {
        return Err("matcher / shadow_matcher (the xDS matcher API) is not supported".into());
    }
    Ok(RbacFilter {
        rules: cfg.rules.as_ref().map(|r| rules(r, "rules")).transpose()?,
        shadow_rules: cfg
            .shadow_rules
            .as_ref()
            .map(|r| rules(r, "shadow_rules"))
            .transpose()?,
        shadow_rules_stat_prefix: cfg.shadow_rules_stat_prefix.clone(),
    })
}

/// `envoy.filters.network.rbac`.
pub fn translate_network_rbac(cfg: &NetworkRbac) -> Result<RbacFilter, String> {
    if cfg.matcher.is_some() || cfg.shadow_matcher.is_some() {
        return Err("matcher / shadow_matcher (the xDS matcher API) is not supported".into());
    }
    Ok(RbacFilter {
        rules: cfg.rules.as_ref().map(|r| rules(r, "rules")).transpose()?,
        shadow_rules: cfg
            .shadow_rules
            .as_ref()
            .map(|r| rules(r, "shadow_rules"))
            .transpose()?,
        shadow_rules_stat_prefix: cfg.shadow_rules_stat_prefix.clone(),
    })
}

/// `envoy.filters.http.ext_authz` (gRPC service only, as istiod renders CUSTOM providers of
/// type `envoyExtAuthzGrpc`).
pub fn translate_ext_authz(cfg: &PbExtAuthz) -> Result<ExtAuthz, String> {
    let Some(Services::GrpcService(grpc)) = &cfg.services else {
        return Err("only a grpc_service ext_authz (envoyExtAuthzGrpc) is supported".into());
    };
    let Some(TargetSpecifier::EnvoyGrpc(target)) = &grpc.target_specifier else {
        return Err("grpc_service.envoy_grpc is required".into());
    };
    Ok(ExtAuthz {
        cluster: target.cluster_name.clone(),
        authority: (!target.authority.is_empty()).then(|| target.authority.clone()),
        timeout: grpc
            .timeout
            .as_ref()
            .map(duration)
            .transpose()
            .map_err(|e| format!("grpc_service.timeout: {e}"))?,
        filter_enabled_metadata: cfg
            .filter_enabled_metadata
            .as_ref()
            .map(|m| metadata(m, "filter_enabled_metadata"))
            .transpose()?,
        failure_mode_allow: cfg.failure_mode_allow,
        status_on_error: cfg
            .status_on_error
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| *c >= 100)
            .unwrap_or(403),
        max_request_bytes: cfg.with_request_body.as_ref().map(|b| b.max_request_bytes),
    })
}

fn rules(r: &rbac::Rbac, at: &str) -> Result<RbacRules, String> {
    let action = match rbac::rbac::Action::try_from(r.action) {
        Ok(rbac::rbac::Action::Allow) => RbacAction::Allow,
        Ok(rbac::rbac::Action::Deny) => RbacAction::Deny,
        Ok(rbac::rbac::Action::Log) => RbacAction::Log,
        Err(_) => return Err(format!("{at}.action: unknown action {}", r.action)),
    };
    let mut policies = std::collections::BTreeMap::new();
    for (name, p) in &r.policies {
        let at = format!("{at}.policies[{name:?}]");
        if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
            return Err(format!("{at}.condition: CEL conditions are not supported"));
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x, &format!("{at}.permissions[{i}]")))
            .collect::<Result<_, _>>()?;
        let principals = p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x, &format!("{at}.principals[{i}]")))
            .collect::<Result<_, _>>()?;
        policies.insert(
            name.clone(),
            Policy {
                permissions,
                principals,
            },
        );
    }
    Ok(RbacRules { action, policies })
}

fn permission(p: &rbac::Permission, at: &str) -> Result<Permission, String> {
    use rbac::permission::Rule;
    let set = |rules: &[rbac::Permission], what: &str| -> Result<Vec<Permission>, String> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| permission(r, &format!("{at}.{what}[{i}]")))
            .collect()
    };
    Ok(match p.rule.as_ref() {
        None => return Err(format!("{at}: empty permission")),
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Any(false)) => return Err(format!("{at}.any: must be true")),
        Some(Rule::AndRules(s)) => Permission::And(set(&s.rules, "and_rules.rules")?),
        Some(Rule::OrRules(s)) => Permission::Or(set(&s.rules, "or_rules.rules")?),
        Some(Rule::NotRule(r)) => {
            Permission::Not(Box::new(permission(r, &format!("{at}.not_rule"))?))
        }
        Some(Rule::Header(h)) => Permission::Header(header(h, &format!("{at}.header"))?),
        Some(Rule::UrlPath(m)) => Permission::UrlPath(path_matcher(m, &format!("{at}.url_path"))?),
        Some(Rule::DestinationIp(c)) => {
            Permission::DestinationIp(cidr(c, &format!("{at}.destination_ip"))?)
        }
        Some(Rule::DestinationPort(port)) => Permission::DestinationPort(
            u16::try_from(*port)
                .map_err(|_| format!("{at}.destination_port: {port} out of range"))?,
        ),
        Some(Rule::DestinationPortRange(r)) => {
            let clamp = |v: i32| u16::try_from(v.clamp(0, 65536)).unwrap_or(u16::MAX);
            Permission::DestinationPortRange(clamp(r.start), clamp(r.end))
        }
        Some(Rule::Metadata(m)) => Permission::Metadata(metadata(m, &format!("{at}.metadata"))?),
        Some(Rule::RequestedServerName(m)) => {
            Permission::RequestedServerName(string(m, &format!("{at}.requested_server_name"))?)
        }
        Some(Rule::UriTemplate(ext)) => {
            let any = ext
                .typed_config
                .as_ref()
                .ok_or_else(|| format!("{at}.uri_template: no typed_config"))?;
            Permission::UrlPath(uri_template(any).map_err(|e| format!("{at}.uri_template: {e}"))?)
        }
        Some(Rule::SourcedMetadata(m)) => {
            Permission::Metadata(sourced_metadata(m, &format!("{at}.sourced_metadata"))?)
        }
        Some(Rule::Matcher(_)) => {
            return Err(format!(
                "{at}.matcher: extension matchers are not supported"
            ));
        }
    })
}

fn principal(p: &rbac::Principal, at: &str) -> Result<Principal, String> {
    use rbac::principal::Identifier;
    let set = |ids: &[rbac::Principal], what: &str| -> Result<Vec<Principal>, String> {
        ids.iter()
            .enumerate()
            .map(|(i, r)| principal(r, &format!("{at}.{what}[{i}]")))
            .collect()
    };
    Ok(match p.identifier.as_ref() {
        None => return Err(format!("{at}: empty principal")),
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::Any(false)) => return Err(format!("{at}.any: must be true")),
        Some(Identifier::AndIds(s)) => Principal::And(set(&s.ids, "and_ids.ids")?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(&s.ids, "or_ids.ids")?),
        Some(Identifier::NotId(p)) => {
            Principal::Not(Box::new(principal(p, &format!("{at}.not_id"))?))
        }
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| string(m, &format!("{at}.authenticated.principal_name")))
                .transpose()?,
        ),
        Some(Identifier::SourceIp(c)) | Some(Identifier::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(cidr(c, &format!("{at}.direct_remote_ip"))?)
        }
        Some(Identifier::RemoteIp(c)) => Principal::RemoteIp(cidr(c, &format!("{at}.remote_ip"))?),
        Some(Identifier::Header(h)) => Principal::Header(header(h, &format!("{at}.header"))?),
        Some(Identifier::UrlPath(m)) => {
            Principal::UrlPath(path_matcher(m, &format!("{at}.url_path"))?)
        }
        Some(Identifier::Metadata(m)) => {
            Principal::Metadata(metadata(m, &format!("{at}.metadata"))?)
        }
        Some(Identifier::FilterState(f)) => match &f.matcher {
            Some(pbm::filter_state_matcher::Matcher::StringMatch(m)) => Principal::FilterState {
                key: f.key.clone(),
                matcher: string(m, &format!("{at}.filter_state.string_match"))?,
            },
            _ => return Err(format!("{at}.filter_state: only string_match is supported")),
        },
        Some(Identifier::SourcedMetadata(m)) => {
            Principal::Metadata(sourced_metadata(m, &format!("{at}.sourced_metadata"))?)
        }
        Some(Identifier::Custom(_)) => return Err(format!("{at}.custom: not supported")),
    })
}

fn string(m: &pbm::StringMatcher, at: &str) -> Result<StringMatcher, String> {
    use pbm::string_matcher::MatchPattern;
    let ic = m.ignore_case;
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatcher::Exact(s.clone(), ic),
        Some(MatchPattern::Prefix(s)) => StringMatcher::Prefix(s.clone(), ic),
        Some(MatchPattern::Suffix(s)) => StringMatcher::Suffix(s.clone(), ic),
        Some(MatchPattern::Contains(s)) => StringMatcher::Contains(s.clone(), ic),
        Some(MatchPattern::SafeRegex(r)) => regex(&r.regex, at)?,
        Some(MatchPattern::Custom(_)) => return Err(format!("{at}.custom: not supported")),
        None => return Err(format!("{at}: empty string matcher")),
    })
}

fn regex(pattern: &str, at: &str) -> Result<StringMatcher, String> {
    StringMatcher::regex(pattern).map_err(|e| format!("{at}.safe_regex {pattern:?}: {e}"))
}

fn path_matcher(m: &pbm::PathMatcher, at: &str) -> Result<StringMatcher, String> {
    match &m.rule {
        Some(pbm::path_matcher::Rule::Path(s)) => string(s, &format!("{at}.path")),
        None => Err(format!("{at}: empty path matcher")),
    }
}

/// Envoy's URI template (`/foo/{*}/bar/{**}`) as an anchored regex over the path.
fn uri_template(any: &Any) -> Result<StringMatcher, String> {
    let cfg: UriTemplateMatchConfig = from_any(any)?;
    let mut pattern = String::new();
    for (i, seg) in cfg.path_template.split('/').enumerate() {
        if i > 0 {
            pattern.push('/');
        }
        match seg {
            "{*}" | "*" => pattern.push_str("[^/]+"),
            "{**}" | "**" => pattern.push_str(".*"),
            lit if lit.contains(['{', '}', '*']) => {
                return Err(format!("path template segment {lit:?} is not supported"));
            }
            lit => pattern.push_str(&regex_escape(lit)),
        }
    }
    StringMatcher::regex(&pattern).map_err(|e| e.to_string())
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn header(h: &PbHeaderMatcher, at: &str) -> Result<HeaderMatcher, String> {
    let ic = false;
    let matcher = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(s)) => {
            HeaderMatch::String(StringMatcher::Exact(s.clone(), ic))
        }
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => {
            HeaderMatch::String(StringMatcher::Prefix(s.clone(), ic))
        }
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => {
            HeaderMatch::String(StringMatcher::Suffix(s.clone(), ic))
        }
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => {
            HeaderMatch::String(StringMatcher::Contains(s.clone(), ic))
        }
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => HeaderMatch::String(regex(&r.regex, at)?),
        Some(HeaderMatchSpecifier::StringMatch(m)) => {
            HeaderMatch::String(string(m, &format!("{at}.string_match"))?)
        }
        Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderMatch::Present(*p),
        Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderMatch::Range(r.start, r.end),
        // No specifier: Envoy treats it as a presence check.
        None => HeaderMatch::Present(true),
    };
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        matcher,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn metadata(m: &pbm::MetadataMatcher, at: &str) -> Result<MetadataMatcher, String> {
    let path = m
        .path
        .iter()
        .map(|s| match &s.segment {
            Some(pbm::metadata_matcher::path_segment::Segment::Key(k)) => Ok(k.clone()),
            None => Err(format!("{at}.path: empty segment")),
        })
        .collect::<Result<_, _>>()?;
    let value = m
        .value
        .as_ref()
        .ok_or_else(|| format!("{at}.value: missing"))?;
    Ok(MetadataMatcher {
        filter: m.filter.clone(),
        path,
        value: value_matcher(value, &format!("{at}.value"))?,
        invert: m.invert,
    })
}

fn sourced_metadata(m: &rbac::SourcedMetadata, at: &str) -> Result<MetadataMatcher, String> {
    if m.metadata_source != rbac::MetadataSource::Dynamic as i32 {
        return Err(format!("{at}.metadata_source: only DYNAMIC is supported"));
    }
    let matcher = m
        .metadata_matcher
        .as_ref()
        .ok_or_else(|| format!("{at}.metadata_matcher: missing"))?;
    metadata(matcher, &format!("{at}.metadata_matcher"))
}

fn value_matcher(v: &pbm::ValueMatcher, at: &str) -> Result<ValueMatcher, String> {
    use pbm::value_matcher::MatchPattern;
    Ok(match &v.match_pattern {
        Some(MatchPattern::NullMatch(_)) => ValueMatcher::Null,
        Some(MatchPattern::DoubleMatch(d)) => match &d.match_pattern {
            Some(pbm::double_matcher::MatchPattern::Exact(x)) => ValueMatcher::Double(*x),
            Some(pbm::double_matcher::MatchPattern::Range(r)) => {
                ValueMatcher::DoubleRange(r.start, r.end)
            }
            None => return Err(format!("{at}.double_match: empty")),
        },
        Some(MatchPattern::StringMatch(s)) => {
            ValueMatcher::String(string(s, &format!("{at}.string_match"))?)
        }
        Some(MatchPattern::BoolMatch(b)) => ValueMatcher::Bool(*b),
        Some(MatchPattern::PresentMatch(p)) => ValueMatcher::Present(*p),
        Some(MatchPattern::ListMatch(l)) => match &l.match_pattern {
            Some(pbm::list_matcher::MatchPattern::OneOf(inner)) => ValueMatcher::ListOneOf(
                Box::new(value_matcher(inner, &format!("{at}.list_match.one_of"))?),
            ),
            None => return Err(format!("{at}.list_match: empty")),
        },
        Some(MatchPattern::OrMatch(o)) => ValueMatcher::Or(
            o.value_matchers
                .iter()
                .enumerate()
                .map(|(i, m)| value_matcher(m, &format!("{at}.or_match[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        None => return Err(format!("{at}: empty value matcher")),
    })
}

fn cidr(c: &CidrRange, at: &str) -> Result<Cidr, String> {
    let address: IpAddr = c.address_prefix.parse().map_err(|_| {
        format!(
            "{at}.address_prefix: {:?} is not an IP address",
            c.address_prefix
        )
    })?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = c.prefix_len.map(|v| v.value).unwrap_or(max);
    if prefix_len > max {
        return Err(format!(
            "{at}.prefix_len: {prefix_len} is longer than {max}"
        ));
    }
    Ok(Cidr {
        address,
        prefix_len: prefix_len as u8,
    })
}
