//! `envoy.filters.http.jwt_authn` (`extensions.filters.http.jwt_authn.v3.JwtAuthentication`,
//! what istiod renders for RequestAuthentication) → [`mesh_core::authz::jwt::JwtAuthn`].
//!
//! istiod's shape: one provider per `jwtRules[]` entry named `origins-<i>` (sorted by issuer)
//! with `issuer`, `audiences`, `forward`, `forward_payload_header`, `payload_in_metadata:
//! payload`, `normalize_payload_in_metadata.space_delimited_claims`, `claim_to_headers`,
//! `from_headers`/`from_params`, and either `local_jwks.inline_string` (istiod fetched the keys)
//! or `remote_jwks {http_uri {uri, cluster, timeout}, cache_duration: 300s}`; one rule
//! `prefix: "/"` requiring `requires_any {provider, allow_missing}` (several issuers: the OR of
//! each provider and the AND of their `{provider OR allow_missing}`); `bypass_cors_preflight`.
//!
//! An invalid inline JWKS is accepted (every token then fails, as in Envoy). Settings that
//! would change what is enforced and mesh does not implement (`subjects`, `max_lifetime`,
//! `require_expiration`, `from_cookies`, named requirements, filter-state rules, non-path rule
//! matches) are rejected with the field named; the rest is accepted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::route::v3::RouteMatch;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::jwt_provider::JwksSourceSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::jwt_requirement::RequiresType;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::requirement_rule::RequirementType;
use http::HeaderName;
use mesh_core::authz::StringMatcher;
use mesh_core::authz::jwt::{
    DEFAULT_JWKS_CACHE_DURATION, Jwks, JwksSource, JwtAuthn, JwtHeaderLocation, JwtProvider,
    JwtRequirement, RemoteJwks, RequirementRule, RuleMatch,
};

use super::duration;

/// Type URL of the JWT filter config.
pub const JWT_AUTHN_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
/// Type URL of Istio's legacy `istio_authn` HTTP filter (older istiod put it after jwt_authn).
pub const ISTIO_AUTHN_TYPE: &str =
    "type.googleapis.com/istio.envoy.config.filter.http.authn.v2alpha1.FilterConfig";
/// The `http_uri.timeout` used when none is given (istiod's default is 5 s).
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

fn header_name(field: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{field}: invalid header name {name:?}"))
}

fn provider(name: &str, p: &pb::JwtProvider) -> Result<JwtProvider, String> {
    let at = |f: &str| format!("providers[{name:?}].{f}");
    if p.subjects.is_some() {
        return Err(format!("{}: not supported", at("subjects")));
    }
    if p.max_lifetime.is_some() || p.require_expiration {
        return Err(format!(
            "{}: not supported",
            at("max_lifetime / require_expiration")
        ));
    }
    if !p.from_cookies.is_empty() {
        return Err(format!("{}: not supported", at("from_cookies")));
    }
    let jwks = match &p.jwks_source_specifier {
        None => return Err(format!("{}: missing", at("jwks_source_specifier"))),
        Some(JwksSourceSpecifier::LocalJwks(ds)) => {
            let text = match &ds.specifier {
                Some(Specifier::InlineString(s)) => s.clone(),
                Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(_) => {
                    return Err(format!(
                        "{}: only inline_string / inline_bytes are supported",
                        at("local_jwks")
                    ));
                }
                None => return Err(format!("{}: empty data source", at("local_jwks"))),
            };
            match Jwks::parse(&text) {
                Ok(k) => JwksSource::Local(Some(Arc::new(k))),
                Err(status) => {
                    tracing::warn!(provider = name, issuer = %p.issuer, %status, "invalid inline jwks; tokens of this provider will fail");
                    JwksSource::Local(None)
                }
            }
        }
        Some(JwksSourceSpecifier::RemoteJwks(r)) => {
            let uri = r
                .http_uri
                .as_ref()
                .ok_or_else(|| format!("{}: missing", at("remote_jwks.http_uri")))?;
            if uri.uri.is_empty() {
                return Err(format!("{}: empty", at("remote_jwks.http_uri.uri")));
            }
            let cluster = match &uri.http_upstream_type {
                Some(
                    envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                        c,
                    ),
                ) => c.clone(),
                None => String::new(),
            };
            JwksSource::Remote(RemoteJwks {
                uri: uri.uri.clone(),
                cluster,
                timeout: uri
                    .timeout
                    .as_ref()
                    .map(duration)
                    .transpose()
                    .map_err(|e| format!("{}: {e}", at("remote_jwks.http_uri.timeout")))?
                    .unwrap_or(DEFAULT_FETCH_TIMEOUT),
                cache_duration: r
                    .cache_duration
                    .as_ref()
                    .map(duration)
                    .transpose()
                    .map_err(|e| format!("{}: {e}", at("remote_jwks.cache_duration")))?
                    .filter(|d| !d.is_zero())
                    .unwrap_or(DEFAULT_JWKS_CACHE_DURATION),
            })
        }
    };
    let mut out = JwtProvider::new(name, &p.issuer, jwks);
    out.audiences = p.audiences.clone();
    for (i, h) in p.from_headers.iter().enumerate() {
        out.from_headers.push(JwtHeaderLocation {
            name: header_name(&at(&format!("from_headers[{i}].name")), &h.name)?,
            value_prefix: h.value_prefix.clone(),
        });
    }
    out.from_params = p.from_params.clone();
    out.forward = p.forward;
    if !p.forward_payload_header.is_empty() {
        out.forward_payload_header = Some(header_name(
            &at("forward_payload_header"),
            &p.forward_payload_header,
        )?);
    }
    out.pad_forward_payload_header = p.pad_forward_payload_header;
    out.payload_in_metadata =
        (!p.payload_in_metadata.is_empty()).then(|| p.payload_in_metadata.clone());
    out.header_in_metadata =
        (!p.header_in_metadata.is_empty()).then(|| p.header_in_metadata.clone());
    out.space_delimited_claims = p
        .normalize_payload_in_metadata
        .as_ref()
        .map(|n| n.space_delimited_claims.clone())
        .unwrap_or_default();
    for (i, c) in p.claim_to_headers.iter().enumerate() {
        if !c.claim_path.is_empty() {
            return Err(format!(
                "{}: not supported",
                at(&format!("claim_to_headers[{i}].claim_path"))
            ));
        }
        out.claim_to_headers.push((
            header_name(
                &at(&format!("claim_to_headers[{i}].header_name")),
                &c.header_name,
            )?,
            c.claim_name.clone(),
        ));
    }
    out.clock_skew_seconds = u64::from(p.clock_skew_seconds);
    Ok(out)
}

fn requirement(
    r: &pb::JwtRequirement,
    providers: &BTreeMap<String, JwtProvider>,
    at: &str,
) -> Result<JwtRequirement, String> {
    let known = |name: &str| {
        if providers.contains_key(name) {
            Ok(())
        } else {
            // Envoy: "Required provider ['x'] is not configured."
            Err(format!(
                "{at}: required provider [{name:?}] is not configured"
            ))
        }
    };
    Ok(match &r.requires_type {
        None => JwtRequirement::AllowAll,
        Some(RequiresType::ProviderName(n)) => {
            known(n)?;
            JwtRequirement::Provider(n.clone())
        }
        Some(RequiresType::ProviderAndAudiences(pa)) => {
            known(&pa.provider_name)?;
            JwtRequirement::ProviderAndAudiences {
                provider: pa.provider_name.clone(),
                audiences: pa.audiences.clone(),
            }
        }
        Some(RequiresType::RequiresAny(l)) => JwtRequirement::Any(
            l.requirements
                .iter()
                .enumerate()
                .map(|(i, c)| requirement(c, providers, &format!("{at}.requires_any[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(RequiresType::RequiresAll(l)) => JwtRequirement::All(
            l.requirements
                .iter()
                .enumerate()
                .map(|(i, c)| requirement(c, providers, &format!("{at}.requires_all[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(RequiresType::AllowMissing(_)) => JwtRequirement::AllowMissing,
        Some(RequiresType::AllowMissingOrFailed(_)) => JwtRequirement::AllowMissingOrFailed,
        Some(RequiresType::ExtractOnlyWithoutValidation(_)) => {
            return Err(format!(
                "{at}.extract_only_without_validation: not supported"
            ));
        }
    })
}

fn rule_match(m: Option<&RouteMatch>, at: &str) -> Result<RuleMatch, String> {
    let Some(m) = m else {
        return Err(format!("{at}.match: missing"));
    };
    if !m.headers.is_empty()
        || !m.query_parameters.is_empty()
        || !m.cookies.is_empty()
        || m.grpc.is_some()
        || m.tls_context.is_some()
        || !m.dynamic_metadata.is_empty()
        || !m.filter_state.is_empty()
        || m.runtime_fraction.is_some()
    {
        return Err(format!("{at}.match: only path matches are supported"));
    }
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err(format!("{at}.match.case_sensitive: false is not supported"));
    }
    Ok(match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => RuleMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => RuleMatch::Path(p.clone()),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => RuleMatch::PathSeparatedPrefix(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => RuleMatch::Regex(
            StringMatcher::regex(&r.regex).map_err(|e| format!("{at}.match.safe_regex: {e}"))?,
        ),
        _ => return Err(format!("{at}.match: unsupported path specifier")),
    })
}

/// `envoy.filters.http.jwt_authn`; `istio_authn`: a legacy `istio_authn` filter follows it.
pub fn translate_jwt_authn(
    cfg: &pb::JwtAuthentication,
    istio_authn: bool,
) -> Result<JwtAuthn, String> {
    if cfg.filter_state_rules.is_some() {
        return Err("filter_state_rules: not supported".into());
    }
    let mut providers = BTreeMap::new();
    for (name, p) in &cfg.providers {
        providers.insert(name.clone(), provider(name, p)?);
    }
    let mut rules = Vec::new();
    for (i, r) in cfg.rules.iter().enumerate() {
        let at = format!("rules[{i}]");
        let requires = match &r.requirement_type {
            None => JwtRequirement::AllowAll,
            Some(RequirementType::Requires(req)) => {
                requirement(req, &providers, &format!("{at}.requires"))?
            }
            Some(RequirementType::RequirementName(n)) => {
                let req = cfg.requirement_map.get(n).ok_or_else(|| {
                    format!("{at}.requirement_name: {n:?} is not in requirement_map")
                })?;
                requirement(req, &providers, &format!("requirement_map[{n:?}]"))?
            }
        };
        rules.push(RequirementRule {
            matcher: rule_match(r.r#match.as_ref(), &at)?,
            requires,
        });
    }
    Ok(JwtAuthn {
        providers,
        rules,
        bypass_cors_preflight: cfg.bypass_cors_preflight,
        istio_authn,
    })
}

/// The JWT filter among an HCM's `http_filters` (the first one), if any.
pub fn translate_http_jwt_filter(
    filters: &[envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter],
) -> Result<Option<JwtAuthn>, String> {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
    let istio_authn = filters.iter().any(|f| {
        matches!(&f.config_type, Some(ConfigType::TypedConfig(a)) if a.type_url == ISTIO_AUTHN_TYPE)
    });
    for (i, f) in filters.iter().enumerate() {
        let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        if any.type_url == JWT_AUTHN_TYPE {
            let at = |e: String| format!("http_filters[{i}] ({}): {e}", f.name);
            let cfg: pb::JwtAuthentication = super::from_any(any).map_err(at)?;
            return translate_jwt_authn(&cfg, istio_authn).map(Some).map_err(at);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{DataSource, HttpUri, http_uri};
    use envoy_types::pb::google::protobuf::Duration as PbDuration;

    fn istiod_provider(jwks: JwksSourceSpecifier) -> pb::JwtProvider {
        pb::JwtProvider {
            issuer: "https://example.com".into(),
            audiences: vec!["bookinfo".into()],
            forward: true,
            forward_payload_header: "x-jwt-payload".into(),
            payload_in_metadata: "payload".into(),
            normalize_payload_in_metadata: Some(pb::jwt_provider::NormalizePayload {
                space_delimited_claims: vec!["permission".into(), "scope".into()],
            }),
            claim_to_headers: vec![pb::JwtClaimToHeader {
                header_name: "X-Jwt-Sub".into(),
                claim_name: "sub".into(),
                ..Default::default()
            }],
            from_headers: vec![pb::JwtHeader {
                name: "x-token".into(),
                value_prefix: "Token ".into(),
            }],
            from_params: vec!["tok".into()],
            jwks_source_specifier: Some(jwks),
            ..Default::default()
        }
    }

    fn istiod_config(p: pb::JwtProvider) -> pb::JwtAuthentication {
        pb::JwtAuthentication {
            providers: [("origins-0".to_owned(), p)].into_iter().collect(),
            rules: vec![pb::RequirementRule {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                requirement_type: Some(RequirementType::Requires(pb::JwtRequirement {
                    requires_type: Some(RequiresType::RequiresAny(pb::JwtRequirementOrList {
                        requirements: vec![
                            pb::JwtRequirement {
                                requires_type: Some(RequiresType::ProviderName("origins-0".into())),
                            },
                            pb::JwtRequirement {
                                requires_type: Some(RequiresType::AllowMissing(Default::default())),
                            },
                        ],
                    })),
                })),
            }],
            bypass_cors_preflight: true,
            ..Default::default()
        }
    }

    #[test]
    fn istiod_shapes_translate() {
        let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"k"}]}"#;
        let local = JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(Specifier::InlineString(jwks.into())),
            ..Default::default()
        });
        let j = translate_jwt_authn(&istiod_config(istiod_provider(local)), false).unwrap();
        let p = &j.providers["origins-0"];
        assert_eq!(p.issuer, "https://example.com");
        assert!(matches!(&p.jwks, JwksSource::Local(Some(k)) if k.len() == 1));
        assert_eq!(p.from_headers[0].name.as_str(), "x-token");
        assert_eq!(p.claim_to_headers[0].0.as_str(), "x-jwt-sub");
        assert_eq!(p.payload_in_metadata.as_deref(), Some("payload"));
        assert!(p.forward);
        assert_eq!(
            j.rules[0].requires,
            JwtRequirement::Any(vec![
                JwtRequirement::Provider("origins-0".into()),
                JwtRequirement::AllowMissing
            ])
        );
        assert_eq!(j.rules[0].matcher, RuleMatch::Prefix("/".into()));

        let remote = JwksSourceSpecifier::RemoteJwks(pb::RemoteJwks {
            http_uri: Some(HttpUri {
                uri: "https://example.com/jwks".into(),
                timeout: Some(PbDuration {
                    seconds: 5,
                    nanos: 0,
                }),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(
                    "outbound|443||example.com".into(),
                )),
            }),
            cache_duration: Some(PbDuration {
                seconds: 300,
                nanos: 0,
            }),
            ..Default::default()
        });
        let j = translate_jwt_authn(&istiod_config(istiod_provider(remote)), false).unwrap();
        match &j.providers["origins-0"].jwks {
            JwksSource::Remote(r) => {
                assert_eq!(r.cache_duration, Duration::from_secs(300));
                assert_eq!(r.cluster, "outbound|443||example.com");
            }
            other => panic!("{other:?}"),
        }

        // An invalid inline JWKS is accepted (tokens fail at request time).
        let bad = JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(Specifier::InlineString("not json".into())),
            ..Default::default()
        });
        let j = translate_jwt_authn(&istiod_config(istiod_provider(bad)), false).unwrap();
        assert!(matches!(
            &j.providers["origins-0"].jwks,
            JwksSource::Local(None)
        ));
    }

    #[test]
    fn malformed_configs_are_rejected_with_the_field() {
        let local = || {
            JwksSourceSpecifier::LocalJwks(DataSource {
                specifier: Some(Specifier::InlineString("{}".into())),
                ..Default::default()
            })
        };
        // Unknown provider in a requirement.
        let mut c = istiod_config(istiod_provider(local()));
        c.providers = [("other".to_owned(), istiod_provider(local()))]
            .into_iter()
            .collect();
        let e = translate_jwt_authn(&c, false).unwrap_err();
        assert!(
            e.contains("\"origins-0\"") && e.contains("not configured"),
            "{e}"
        );
        // No key source.
        let mut p = istiod_provider(local());
        p.jwks_source_specifier = None;
        let e = translate_jwt_authn(&istiod_config(p), false).unwrap_err();
        assert!(e.contains("jwks_source_specifier"), "{e}");
        // Remote without a URI.
        let p = istiod_provider(JwksSourceSpecifier::RemoteJwks(pb::RemoteJwks::default()));
        let e = translate_jwt_authn(&istiod_config(p), false).unwrap_err();
        assert!(e.contains("remote_jwks.http_uri"), "{e}");
        // A header-matching rule.
        let mut c = istiod_config(istiod_provider(local()));
        if let Some(m) = c.rules[0].r#match.as_mut() {
            m.headers.push(Default::default());
        }
        let e = translate_jwt_authn(&c, false).unwrap_err();
        assert!(e.contains("rules[0].match"), "{e}");
        // Unsupported enforcement settings.
        let mut p = istiod_provider(local());
        p.from_cookies = vec!["session".into()];
        let e = translate_jwt_authn(&istiod_config(p), false).unwrap_err();
        assert!(e.contains("from_cookies"), "{e}");
    }
}
