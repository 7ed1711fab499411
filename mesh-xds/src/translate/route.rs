//! RDS `RouteConfiguration` → [`mesh_core::route::RouteConfig`].

use envoy_types::pb::envoy::config::core::v3::data_source;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher as PbHeaderMatcher, RetryPolicy as PbRetryPolicy, Route as PbRoute,
    RouteConfiguration, header_matcher, redirect_action, route, route_action, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use mesh_core::route::{
    HeaderMatcher, HeaderValueMatch, PathMatch, RetryPolicy, Route, RouteAction, RouteConfig,
    RouteMatch, VirtualHost, WeightedCluster, WeightedClusters,
};

use super::{TranslateError, duration};

const KIND: &str = "RouteConfiguration";

/// Translates one route configuration: virtual hosts and their domains, route matches
/// (prefix, path, anchored safe_regex, case sensitivity, headers) and actions (cluster,
/// weighted clusters, direct response, redirect) with timeout and retry policy.
pub fn translate_route(rc: &RouteConfiguration) -> Result<RouteConfig, TranslateError> {
    let name = &rc.name;
    if name.is_empty() {
        return Err(TranslateError::new(KIND, "", "name is empty"));
    }
    let err = |reason: String| TranslateError::new(KIND, name.clone(), reason);
    let mut vhosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (ri, r) in vh.routes.iter().enumerate() {
            let field = format!("virtual_hosts[{vi}] ({:?}).routes[{ri}]", vh.name);
            routes.push(
                translate_one(r, vh.retry_policy.as_ref())
                    .map_err(|e| err(format!("{field}.{e}")))?,
            );
        }
        vhosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.clone(),
            routes,
        });
    }
    RouteConfig::new(name.clone(), vhosts)
        .map(|c| c.with_ignore_port_in_host_matching(rc.ignore_port_in_host_matching))
        .map_err(|e| err(e.to_string()))
}

fn translate_one(r: &PbRoute, vh_retry: Option<&PbRetryPolicy>) -> Result<Route, String> {
    let m = r.r#match.as_ref().ok_or("match: missing")?;
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(re)) => PathMatch::Regex(
            anchored(&re.regex, !case_sensitive).map_err(|e| format!("match.safe_regex: {e}"))?,
        ),
        Some(route_match::PathSpecifier::PathSeparatedPrefix(_)) => {
            return Err("match.path_separated_prefix is not supported".into());
        }
        Some(_) => return Err("match: unsupported path specifier".into()),
        None => return Err("match: no path specifier".into()),
    };
    if !m.query_parameters.is_empty() {
        return Err("match.query_parameters is not supported".into());
    }
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(
            header_matcher(h).map_err(|e| format!("match.headers[{i}] ({:?}): {e}", h.name))?,
        );
    }
    let matcher = RouteMatch {
        path,
        case_sensitive,
        headers,
    };
    let (action, timeout, retry) = match &r.action {
        Some(route::Action::Route(ra)) => {
            let action = match &ra.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                    RouteAction::Cluster(c.clone())
                }
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    let mut clusters = Vec::with_capacity(w.clusters.len());
                    for (i, c) in w.clusters.iter().enumerate() {
                        if c.name.is_empty() {
                            return Err(format!(
                                "route.weighted_clusters.clusters[{i}].name: empty"
                            ));
                        }
                        clusters.push(WeightedCluster {
                            name: c.name.clone(),
                            weight: c.weight.as_ref().map(|w| w.value).unwrap_or(0),
                        });
                    }
                    let mut wc = WeightedClusters::new(clusters);
                    #[allow(deprecated)]
                    if let Some(t) = &w.total_weight {
                        if u64::from(t.value) < wc.total {
                            return Err("route.weighted_clusters.total_weight: less than the sum of weights".into());
                        }
                        wc.total = u64::from(t.value);
                    }
                    if wc.total == 0 {
                        return Err("route.weighted_clusters: total weight is 0".into());
                    }
                    RouteAction::Weighted(wc)
                }
                Some(route_action::ClusterSpecifier::Cluster(_)) => {
                    return Err("route.cluster: empty".into());
                }
                Some(_) => return Err("route: unsupported cluster specifier".into()),
                None => return Err("route: no cluster specifier".into()),
            };
            let timeout = match &ra.timeout {
                Some(d) => Some(duration(d).map_err(|e| format!("route.timeout: {e}"))?),
                None => None,
            };
            let retry = match ra.retry_policy.as_ref().or(vh_retry) {
                Some(p) => Some(retry_policy(p)?),
                None => None,
            };
            (action, timeout, retry)
        }
        Some(route::Action::Redirect(rd)) => {
            let status = match redirect_action::RedirectResponseCode::try_from(rd.response_code) {
                Ok(redirect_action::RedirectResponseCode::MovedPermanently) => 301,
                Ok(redirect_action::RedirectResponseCode::Found) => 302,
                Ok(redirect_action::RedirectResponseCode::SeeOther) => 303,
                Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => 307,
                Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => 308,
                Err(_) => {
                    return Err(format!(
                        "redirect.response_code: unknown value {}",
                        rd.response_code
                    ));
                }
            };
            let path = match &rd.path_rewrite_specifier {
                Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
                Some(_) => return Err("redirect: only path_redirect is supported".into()),
                None => None,
            };
            let host = Some(rd.host_redirect.clone()).filter(|h| !h.is_empty());
            (RouteAction::Redirect { status, host, path }, None, None)
        }
        Some(route::Action::DirectResponse(d)) => {
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .ok_or_else(|| {
                    format!("direct_response.status: {} is not an HTTP status", d.status)
                })?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(data_source::Specifier::InlineString(s)) => Some(s.clone()),
                Some(data_source::Specifier::InlineBytes(b)) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                Some(_) => {
                    return Err("direct_response.body: only inline bodies are supported".into());
                }
                None => None,
            };
            (RouteAction::DirectResponse { status, body }, None, None)
        }
        Some(_) => return Err("action: unsupported route action".into()),
        None => return Err("action: missing".into()),
    };
    Ok(Route {
        name: r.name.clone(),
        matcher,
        action,
        timeout,
        retry,
    })
}

fn retry_policy(p: &PbRetryPolicy) -> Result<RetryPolicy, String> {
    let mut codes = Vec::with_capacity(p.retriable_status_codes.len());
    for c in &p.retriable_status_codes {
        codes.push(
            u16::try_from(*c)
                .map_err(|_| format!("retry_policy.retriable_status_codes: {c} out of range"))?,
        );
    }
    Ok(RetryPolicy {
        retry_on: p
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        // Envoy's default when num_retries is unset is 1.
        num_retries: p.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
        per_try_timeout: match &p.per_try_timeout {
            Some(d) => Some(duration(d).map_err(|e| format!("retry_policy.per_try_timeout: {e}"))?),
            None => None,
        },
        retriable_status_codes: codes,
    })
}

/// Compiles `re` so it must match the whole input, as Envoy's safe_regex does.
fn anchored(re: &str, ignore_case: bool) -> Result<regex::Regex, String> {
    let flags = if ignore_case { "(?i)" } else { "" };
    regex::Regex::new(&format!("{flags}^(?:{re})$"))
        .map_err(|e| format!("invalid regex {re:?}: {e}"))
}

fn header_matcher(h: &PbHeaderMatcher) -> Result<HeaderMatcher, String> {
    #[allow(deprecated)]
    let value = match &h.header_match_specifier {
        None => HeaderValueMatch::Present,
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)) => HeaderValueMatch::Present,
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(false)) => {
            // present_match: false matches when the header is absent.
            return Ok(HeaderMatcher {
                name: h.name.to_ascii_lowercase(),
                value: HeaderValueMatch::Present,
                invert: !h.invert_match,
            });
        }
        Some(header_matcher::HeaderMatchSpecifier::ExactMatch(s)) => {
            HeaderValueMatch::Exact(s.clone())
        }
        Some(header_matcher::HeaderMatchSpecifier::PrefixMatch(s)) => {
            HeaderValueMatch::Prefix(s.clone())
        }
        Some(header_matcher::HeaderMatchSpecifier::SuffixMatch(s)) => {
            HeaderValueMatch::Suffix(s.clone())
        }
        Some(header_matcher::HeaderMatchSpecifier::ContainsMatch(s)) => {
            HeaderValueMatch::Contains(s.clone())
        }
        Some(header_matcher::HeaderMatchSpecifier::SafeRegexMatch(re)) => {
            HeaderValueMatch::Regex(anchored(&re.regex, false)?)
        }
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => string_match(sm)?,
        Some(header_matcher::HeaderMatchSpecifier::RangeMatch(_)) => {
            return Err("range_match is not supported".into());
        }
    };
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
    })
}

fn string_match(sm: &StringMatcher) -> Result<HeaderValueMatch, String> {
    let pattern = sm.match_pattern.as_ref().ok_or("string_match: empty")?;
    if sm.ignore_case {
        // Case-insensitive literal forms become case-insensitive anchored regexes.
        let re = match pattern {
            string_matcher::MatchPattern::Exact(s) => regex::escape(s).to_string(),
            string_matcher::MatchPattern::Prefix(s) => format!("{}.*", regex::escape(s)),
            string_matcher::MatchPattern::Suffix(s) => format!(".*{}", regex::escape(s)),
            string_matcher::MatchPattern::Contains(s) => format!(".*{}.*", regex::escape(s)),
            string_matcher::MatchPattern::SafeRegex(r) => r.regex.clone(),
            string_matcher::MatchPattern::Custom(_) => {
                return Err("string_match.custom is not supported".into());
            }
        };
        return Ok(HeaderValueMatch::Regex(anchored(&re, true)?));
    }
    Ok(match pattern {
        string_matcher::MatchPattern::Exact(s) => HeaderValueMatch::Exact(s.clone()),
        string_matcher::MatchPattern::Prefix(s) => HeaderValueMatch::Prefix(s.clone()),
        string_matcher::MatchPattern::Suffix(s) => HeaderValueMatch::Suffix(s.clone()),
        string_matcher::MatchPattern::Contains(s) => HeaderValueMatch::Contains(s.clone()),
        string_matcher::MatchPattern::SafeRegex(r) => {
            HeaderValueMatch::Regex(anchored(&r.regex, false)?)
        }
        string_matcher::MatchPattern::Custom(_) => {
            return Err("string_match.custom is not supported".into());
        }
    })
}
