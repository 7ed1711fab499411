//! RDS `RouteConfiguration` → [`mesh_core::route::RouteConfig`].

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValueOption as PbHeaderValueOption, data_source,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher as PbHeaderMatcher, QueryParameterMatcher as PbQueryParameterMatcher,
    RetryPolicy as PbRetryPolicy, Route as PbRoute, RouteConfiguration,
    VirtualHost as PbVirtualHost, header_matcher, query_parameter_matcher, redirect_action, route,
    route_action, route_match,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use mesh_core::headers::{
    AppendAction, HeaderFormat, HeaderMutationLevel, HeaderMutations, HeaderToAdd,
};
use mesh_core::retry::{RetryBackOff, RetryOn};
use mesh_core::route::{
    Forwarding, Fraction, HashPolicy, HashPolicyKind, HeaderMatcher, HeaderSource,
    HeaderValueMatch, HostRewrite, MirrorPolicy, PathMatch, PathRewrite, QueryParameterMatcher,
    Redirect, RedirectPath, RetryPolicy, Route, RouteAction, RouteConfig, RouteMatch, StringMatch,
    StringPattern, VirtualHost, WeightedCluster, WeightedClusters,
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
            routes.push(translate_one(r, vh, rc).map_err(|e| err(format!("{field}.{e}")))?);
        }
        vhosts.push(VirtualHost {
            name: vh.name.as_str().into(),
            domains: vh.domains.clone(),
            routes,
        });
    }
    RouteConfig::new(name.clone(), vhosts)
        .map(|c| c.with_ignore_port_in_host_matching(rc.ignore_port_in_host_matching))
        .map_err(|e| err(e.to_string()))
}

fn translate_one(
    r: &PbRoute,
    vh: &PbVirtualHost,
    rc: &RouteConfiguration,
) -> Result<Route, String> {
    let vh_retry = vh.retry_policy.as_ref();
    let m = r.r#match.as_ref().ok_or("match: missing")?;
    let matcher = route_match(m)?;
    let mut hash_policy = Vec::new();
    let mut path_rewrite = None;
    let mut host_rewrite = None;
    let mut mirrors = Vec::new();
    let mut idle_timeout = None;
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
                Some(route_action::ClusterSpecifier::ClusterHeader(h)) => {
                    let name = http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("route.cluster_header: {h:?} is not a header name"))?;
                    RouteAction::ClusterHeader(name)
                }
                Some(_) => return Err("route: unsupported cluster specifier".into()),
                None => return Err("route: no cluster specifier".into()),
            };
            let timeout = match &ra.timeout {
                Some(d) => Some(duration(d).map_err(|e| format!("route.timeout: {e}"))?),
                None => None,
            };
            idle_timeout = match &ra.idle_timeout {
                Some(d) => Some(duration(d).map_err(|e| format!("route.idle_timeout: {e}"))?),
                None => None,
            };
            let retry = match ra.retry_policy.as_ref().or(vh_retry) {
                Some(p) => Some(retry_policy(p)?),
                None => None,
            };
            hash_policy = hash_policies(&ra.hash_policy)?;
            let policies = if ra.request_mirror_policies.is_empty() {
                &vh.request_mirror_policies
            } else {
                &ra.request_mirror_policies
            };
            for (i, m) in policies.iter().enumerate() {
                if m.cluster.is_empty() {
                    return Err(format!(
                        "route.request_mirror_policies[{i}]: only a fixed cluster is supported"
                    ));
                }
                mirrors.push(MirrorPolicy {
                    cluster: m.cluster.clone(),
                    fraction: match m.runtime_fraction.as_ref().and_then(|r| r.default_value.as_ref()) {
                        None => None,
                        Some(f) => Some(Fraction {
                            numerator: f.numerator,
                            denominator: match DenominatorType::try_from(f.denominator) {
                                Ok(DenominatorType::Hundred) => 100,
                                Ok(DenominatorType::TenThousand) => 10_000,
                                Ok(DenominatorType::Million) => 1_000_000,
                                Err(_) => {
                                    return Err(format!(
                                        "route.request_mirror_policies[{i}].runtime_fraction: unknown denominator {}",
                                        f.denominator
                                    ));
                                }
                            },
                        }),
                    },
                    disable_shadow_host_suffix_append: m.disable_shadow_host_suffix_append,
                });
            }
            path_rewrite = match (&ra.prefix_rewrite, &ra.regex_rewrite) {
                (p, Some(_)) if !p.is_empty() => {
                    return Err(
                        "route: prefix_rewrite and regex_rewrite are mutually exclusive".into(),
                    );
                }
                (p, None) if !p.is_empty() => Some(PathRewrite::Prefix(p.clone())),
                (_, Some(rw)) => {
                    let re = rw
                        .pattern
                        .as_ref()
                        .ok_or("route.regex_rewrite.pattern: missing")?;
                    let re = regex::Regex::new(&re.regex)
                        .map_err(|e| format!("route.regex_rewrite.pattern: {e}"))?;
                    Some(PathRewrite::Regex(re, substitution(&rw.substitution)))
                }
                _ => None,
            };
            host_rewrite = match &ra.host_rewrite_specifier {
                Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h))
                    if !h.is_empty() =>
                {
                    Some(HostRewrite::Literal(h.clone()))
                }
                Some(route_action::HostRewriteSpecifier::AutoHostRewrite(b)) if b.value => {
                    Some(HostRewrite::Auto)
                }
                Some(
                    route_action::HostRewriteSpecifier::HostRewriteLiteral(_)
                    | route_action::HostRewriteSpecifier::AutoHostRewrite(_),
                )
                | None => None,
                Some(_) => {
                    return Err(
                        "route: host_rewrite_header and host_rewrite_path_regex are not supported"
                            .into(),
                    );
                }
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
                Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => {
                    RedirectPath::Path(p.clone())
                }
                Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(p)) => {
                    RedirectPath::Prefix(p.clone())
                }
                Some(redirect_action::PathRewriteSpecifier::RegexRewrite(rw)) => {
                    let re = rw
                        .pattern
                        .as_ref()
                        .ok_or("redirect.regex_rewrite.pattern: missing")?;
                    let re = regex::Regex::new(&re.regex)
                        .map_err(|e| format!("redirect.regex_rewrite.pattern: {e}"))?;
                    RedirectPath::Regex(re, substitution(&rw.substitution))
                }
                Some(_) => return Err("redirect: unsupported path rewrite".into()),
                None => RedirectPath::Keep,
            };
            let scheme = match &rd.scheme_rewrite_specifier {
                Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                    Some("https".to_owned())
                }
                Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s))
                    if !s.is_empty() =>
                {
                    Some(s.to_ascii_lowercase())
                }
                _ => None,
            };
            let port = match rd.port_redirect {
                0 => None,
                p => Some(
                    u16::try_from(p)
                        .map_err(|_| format!("redirect.port_redirect: {p} out of range"))?,
                ),
            };
            let host = Some(rd.host_redirect.clone()).filter(|h| !h.is_empty());
            let redirect = Redirect {
                status,
                scheme,
                host,
                port,
                path,
                strip_query: rd.strip_query,
            };
            (RouteAction::Redirect(redirect), None, None)
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
        name: r.name.as_str().into(),
        matcher,
        action,
        timeout,
        idle_timeout,
        retry: retry.map(std::sync::Arc::new),
        per_request_buffer_limit_bytes: buffer_limit(r, vh),
        include_request_attempt_count: vh.include_request_attempt_count,
        include_attempt_count_in_response: vh.include_attempt_count_in_response,
        hash_policy,
        forwarding: forwarding(r, vh, rc, path_rewrite, host_rewrite, mirrors)?,
        fault: fault(r, vh)?,
    })
}

/// The name of the fault filter in `typed_per_filter_config`.
const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// Type URL of the fault filter config (the HCM filter and its per-route config).
pub const HTTP_FAULT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
/// Type URL of the per-route `FilterConfig` wrapper (`disabled`, `is_optional`).
pub const FILTER_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

/// The route's (else the virtual host's) `envoy.filters.http.fault` per-filter config.
fn fault(
    r: &PbRoute,
    vh: &PbVirtualHost,
) -> Result<Option<std::sync::Arc<mesh_core::fault::Fault>>, String> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
    use mesh_core::fault::{Fault, FaultAbort, FaultAbortKind, FaultDelay, FaultDelayKind};
    let Some(any) = r
        .typed_per_filter_config
        .get(FAULT_FILTER)
        .or_else(|| vh.typed_per_filter_config.get(FAULT_FILTER))
    else {
        return Ok(None);
    };
    let field = format!("typed_per_filter_config[{FAULT_FILTER:?}]");
    let any = if any.type_url == FILTER_CONFIG_TYPE {
        let fc: envoy_types::pb::envoy::config::route::v3::FilterConfig =
            super::from_any(any).map_err(|e| format!("{field}: {e}"))?;
        if fc.disabled {
            return Ok(None);
        }
        fc.config.ok_or(format!("{field}.config: missing"))?
    } else {
        any.clone()
    };
    let f: HttpFault = super::from_any(&any).map_err(|e| format!("{field}: {e}"))?;
    let pct = |p: &Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent>| {
        p.as_ref().map_or(
            Ok(Fraction {
                numerator: 100,
                denominator: 100,
            }),
            |p| {
                Ok::<_, String>(Fraction {
                    numerator: p.numerator,
                    denominator: match DenominatorType::try_from(p.denominator) {
                        Ok(DenominatorType::Hundred) => 100,
                        Ok(DenominatorType::TenThousand) => 10_000,
                        Ok(DenominatorType::Million) => 1_000_000,
                        Err(_) => {
                            return Err(format!(
                                "{field}: unknown percentage denominator {}",
                                p.denominator
                            ));
                        }
                    },
                })
            },
        )
    };
    let delay = match &f.delay {
        None => None,
        Some(d) => Some(FaultDelay {
            kind: match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => FaultDelayKind::Fixed(
                    duration(t).map_err(|e| format!("{field}.delay.fixed_delay: {e}"))?,
                ),
                Some(fault_delay::FaultDelaySecifier::HeaderDelay(_)) => FaultDelayKind::Header,
                None => return Err(format!("{field}.delay: no delay specified")),
            },
            percentage: pct(&d.percentage)?,
        }),
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => Some(FaultAbort {
            kind: match &a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(s)) => FaultAbortKind::Http(
                    u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or(format!(
                            "{field}.abort.http_status: {s} is not in [200, 600)"
                        ))?,
                ),
                Some(fault_abort::ErrorType::GrpcStatus(s)) => FaultAbortKind::Grpc(*s),
                Some(fault_abort::ErrorType::HeaderAbort(_)) => FaultAbortKind::Header,
                None => return Err(format!("{field}.abort: no error type")),
            },
            percentage: pct(&a.percentage)?,
            body: Some(a.response_body.clone()).filter(|b| !b.is_empty()),
        }),
    };
    let mut headers = Vec::with_capacity(f.headers.len());
    for (i, h) in f.headers.iter().enumerate() {
        headers.push(header_matcher(h).map_err(|e| format!("{field}.headers[{i}]: {e}"))?);
    }
    Ok(Some(std::sync::Arc::new(Fault {
        delay,
        abort,
        headers,
        upstream_cluster: Some(f.upstream_cluster).filter(|c| !c.is_empty()),
    })))
}

/// Rewrites and the header mutations of the route, its virtual host and the configuration.
fn forwarding(
    r: &PbRoute,
    vh: &PbVirtualHost,
    rc: &RouteConfiguration,
    path_rewrite: Option<PathRewrite>,
    host_rewrite: Option<HostRewrite>,
    mirrors: Vec<MirrorPolicy>,
) -> Result<Option<std::sync::Arc<Forwarding>>, String> {
    let levels = |which: [(&[PbHeaderValueOption], &[String], &str); 3]| {
        let mut out = HeaderMutations::default();
        for (add, remove, field) in which {
            let level = header_level(add, remove).map_err(|e| format!("{field}{e}"))?;
            if level != HeaderMutationLevel::default() {
                out.levels.push(level);
            }
        }
        Ok::<_, String>(out)
    };
    let f = Forwarding {
        mirrors,
        path_rewrite,
        host_rewrite,
        request_headers: levels([
            (
                &r.request_headers_to_add,
                &r.request_headers_to_remove,
                "request_headers",
            ),
            (
                &vh.request_headers_to_add,
                &vh.request_headers_to_remove,
                "(virtual host) request_headers",
            ),
            (
                &rc.request_headers_to_add,
                &rc.request_headers_to_remove,
                "(route configuration) request_headers",
            ),
        ])?,
        response_headers: levels([
            (
                &r.response_headers_to_add,
                &r.response_headers_to_remove,
                "response_headers",
            ),
            (
                &vh.response_headers_to_add,
                &vh.response_headers_to_remove,
                "(virtual host) response_headers",
            ),
            (
                &rc.response_headers_to_add,
                &rc.response_headers_to_remove,
                "(route configuration) response_headers",
            ),
        ])?,
    };
    Ok((!f.is_empty()).then(|| std::sync::Arc::new(f)))
}

fn header_level(
    add: &[PbHeaderValueOption],
    remove: &[String],
) -> Result<HeaderMutationLevel, String> {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    let name = |n: &str, field: &str| {
        http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{field}: {n:?} is not a header name"))
    };
    let mut level = HeaderMutationLevel::default();
    for (i, n) in remove.iter().enumerate() {
        level.remove.push(name(n, &format!("_to_remove[{i}]"))?);
    }
    for (i, o) in add.iter().enumerate() {
        let field = format!("_to_add[{i}]");
        let h = o
            .header
            .as_ref()
            .ok_or(format!("{field}.header: missing"))?;
        let value = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8(h.raw_value.clone())
                .map_err(|_| format!("{field}.header.raw_value: not UTF-8"))?
        };
        #[allow(deprecated)]
        let action = match (&o.append, HeaderAppendAction::try_from(o.append_action)) {
            (Some(_), Ok(a)) if a != HeaderAppendAction::AppendIfExistsOrAdd => {
                return Err(format!(
                    "{field}: append and append_action are mutually exclusive"
                ));
            }
            (Some(b), _) if b.value => AppendAction::AppendIfExistsOrAdd,
            (Some(_), _) => AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => {
                AppendAction::AppendIfExistsOrAdd
            }
            (None, Ok(HeaderAppendAction::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => {
                AppendAction::OverwriteIfExistsOrAdd
            }
            (None, Ok(HeaderAppendAction::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => {
                return Err(format!(
                    "{field}.append_action: unknown value {}",
                    o.append_action
                ));
            }
        };
        level.add.push(HeaderToAdd {
            name: name(&h.key, &format!("{field}.header.key"))?,
            value: HeaderFormat::parse(&value).map_err(|e| format!("{field}.header.value: {e}"))?,
            action,
            keep_empty_value: o.keep_empty_value,
        });
    }
    Ok(level)
}

/// `route.hash_policy`. Filter-state hashing has nothing to read in mesh and is skipped, as
/// Envoy skips a policy that yields no value.
fn hash_policies(list: &[route_action::HashPolicy]) -> Result<Vec<HashPolicy>, String> {
    use route_action::hash_policy::PolicySpecifier;
    let mut out = Vec::with_capacity(list.len());
    for (i, h) in list.iter().enumerate() {
        let kind = match &h.policy_specifier {
            Some(PolicySpecifier::Header(hd)) => {
                if hd.regex_rewrite.is_some() {
                    return Err(format!(
                        "route.hash_policy[{i}].header.regex_rewrite is not supported"
                    ));
                }
                HashPolicyKind::Header(
                    http::HeaderName::from_bytes(hd.header_name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| {
                            format!(
                                "route.hash_policy[{i}].header.header_name: {:?} is not a header name",
                                hd.header_name
                            )
                        })?,
                )
            }
            Some(PolicySpecifier::Cookie(c)) => match &c.ttl {
                None => HashPolicyKind::Cookie(c.name.clone()),
                Some(ttl) => HashPolicyKind::GeneratedCookie(std::sync::Arc::new(
                    mesh_core::route::GeneratedCookie {
                        name: c.name.clone(),
                        ttl: duration(ttl)
                            .map_err(|e| format!("route.hash_policy[{i}].cookie.ttl: {e}"))?,
                        path: c.path.clone(),
                        attributes: c
                            .attributes
                            .iter()
                            .map(|a| (a.name.clone(), a.value.clone()))
                            .collect(),
                    },
                )),
            },
            Some(PolicySpecifier::ConnectionProperties(cp)) if cp.source_ip => {
                HashPolicyKind::SourceIp
            }
            Some(PolicySpecifier::QueryParameter(q)) => {
                HashPolicyKind::QueryParameter(q.name.clone())
            }
            Some(PolicySpecifier::ConnectionProperties(_) | PolicySpecifier::FilterState(_))
            | None => continue,
        };
        out.push(HashPolicy {
            kind,
            terminal: h.terminal,
        });
    }
    Ok(out)
}

/// The request body buffer limit for retries: `request_body_buffer_limit`, else
/// `per_request_buffer_limit_bytes`, of the route, else of the virtual host.
#[allow(deprecated)]
fn buffer_limit(r: &PbRoute, vh: &PbVirtualHost) -> Option<u32> {
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    r.request_body_buffer_limit
        .as_ref()
        .map(|v| clamp(v.value))
        .or(r.per_request_buffer_limit_bytes.as_ref().map(|v| v.value))
        .or(vh
            .request_body_buffer_limit
            .as_ref()
            .map(|v| clamp(v.value)))
        .or(vh.per_request_buffer_limit_bytes.as_ref().map(|v| v.value))
}

fn retry_policy(p: &PbRetryPolicy) -> Result<RetryPolicy, String> {
    let mut codes = Vec::with_capacity(p.retriable_status_codes.len());
    for c in &p.retriable_status_codes {
        codes.push(
            u16::try_from(*c)
                .map_err(|_| format!("retry_policy.retriable_status_codes: {c} out of range"))?,
        );
    }
    let (retry_on, unknown) = RetryOn::parse(&p.retry_on);
    if !unknown.is_empty() {
        tracing::debug!(
            ?unknown,
            "retry_policy.retry_on: ignoring unknown conditions"
        );
    }
    let mut previous_hosts = false;
    for (i, h) in p.retry_host_predicate.iter().enumerate() {
        match h.name.as_str() {
            "envoy.retry_host_predicates.previous_hosts" => previous_hosts = true,
            // Canary and omit-host-metadata predicates select hosts mesh does not model.
            other => tracing::debug!(
                predicate = other,
                "retry_policy.retry_host_predicate[{i}]: not supported, ignored"
            ),
        }
    }
    let back_off = match &p.retry_back_off {
        None => RetryBackOff::default(),
        Some(b) => {
            let base = b
                .base_interval
                .as_ref()
                .ok_or("retry_policy.retry_back_off.base_interval: missing")?;
            let base = duration(base)
                .map_err(|e| format!("retry_policy.retry_back_off.base_interval: {e}"))?;
            if base.is_zero() {
                return Err("retry_policy.retry_back_off.base_interval: must be > 0".into());
            }
            let max = match &b.max_interval {
                Some(m) => Some(
                    duration(m)
                        .map_err(|e| format!("retry_policy.retry_back_off.max_interval: {e}"))?,
                ),
                None => None,
            };
            if max.is_some_and(|m| m < base) {
                return Err(
                    "retry_policy.retry_back_off.max_interval: less than base_interval".into(),
                );
            }
            RetryBackOff::new(base, max)
        }
    };
    let matchers = |list: &[PbHeaderMatcher], field: &str| -> Result<Vec<HeaderMatcher>, String> {
        list.iter()
            .enumerate()
            .map(|(i, h)| {
                header_matcher(h)
                    .map_err(|e| format!("retry_policy.{field}[{i}] ({:?}): {e}", h.name))
            })
            .collect()
    };
    let opt_duration = |d: &Option<envoy_types::pb::google::protobuf::Duration>, field: &str| {
        d.as_ref()
            .map(|d| duration(d).map_err(|e| format!("retry_policy.{field}: {e}")))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    Ok(RetryPolicy {
        retry_on,
        // Envoy's default when num_retries is unset is 1.
        num_retries: p.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
        per_try_timeout: opt_duration(&p.per_try_timeout, "per_try_timeout")?,
        per_try_idle_timeout: opt_duration(&p.per_try_idle_timeout, "per_try_idle_timeout")?,
        retriable_status_codes: codes,
        retriable_headers: matchers(&p.retriable_headers, "retriable_headers")?,
        retriable_request_headers: matchers(
            &p.retriable_request_headers,
            "retriable_request_headers",
        )?,
        back_off,
        previous_hosts,
        host_selection_retry_max_attempts: u32::try_from(p.host_selection_retry_max_attempts)
            .unwrap_or(0)
            .max(1),
    })
}

/// RE2 `\\1` back-references in a substitution become the regex crate's `${1}`.
fn substitution(sub: &str) -> String {
    let mut out = String::with_capacity(sub.len());
    let mut chars = sub.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str("${");
                out.push(*d);
                out.push('}');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            (c, _) => out.push(c),
        }
    }
    out
}

fn route_match(
    m: &envoy_types::pb::envoy::config::route::v3::RouteMatch,
) -> Result<RouteMatch, String> {
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        // Envoy ignores case_sensitive for regexes.
        Some(route_match::PathSpecifier::SafeRegex(re)) => {
            PathMatch::Regex(anchored(&re.regex).map_err(|e| format!("match.safe_regex: {e}"))?)
        }
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.is_empty() || !p.starts_with('/') || p.ends_with('/') || p.contains(['?', '#']) {
                return Err(format!(
                    "match.path_separated_prefix: {p:?} must start with '/', not end with '/' \
                     and contain no '?' or '#'"
                ));
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(_) => return Err("match: unsupported path specifier".into()),
        None => return Err("match: no path specifier".into()),
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(
            header_matcher(h).map_err(|e| format!("match.headers[{i}] ({:?}): {e}", h.name))?,
        );
    }
    let mut query_parameters = Vec::with_capacity(m.query_parameters.len());
    for (i, q) in m.query_parameters.iter().enumerate() {
        query_parameters.push(
            query_matcher(q)
                .map_err(|e| format!("match.query_parameters[{i}] ({:?}): {e}", q.name))?,
        );
    }
    if !m.cookies.is_empty() {
        return Err("match.cookies is not supported".into());
    }
    if m.tls_context.is_some() {
        return Err("match.tls_context is not supported".into());
    }
    if !m.dynamic_metadata.is_empty() {
        return Err("match.dynamic_metadata is not supported".into());
    }
    if !m.filter_state.is_empty() {
        return Err("match.filter_state is not supported".into());
    }
    let runtime_fraction = match m
        .runtime_fraction
        .as_ref()
        .and_then(|r| r.default_value.as_ref())
    {
        None => None,
        Some(f) => Some(Fraction {
            numerator: f.numerator,
            denominator: match DenominatorType::try_from(f.denominator) {
                Ok(DenominatorType::Hundred) => 100,
                Ok(DenominatorType::TenThousand) => 10_000,
                Ok(DenominatorType::Million) => 1_000_000,
                Err(_) => {
                    return Err(format!(
                        "match.runtime_fraction.default_value.denominator: unknown value {}",
                        f.denominator
                    ));
                }
            },
        }),
    };
    Ok(RouteMatch {
        path,
        case_sensitive,
        headers,
        query_parameters,
        grpc: m.grpc.is_some(),
        runtime_fraction,
    })
}

/// Compiles `re` so it must match the whole input, as Envoy's safe_regex does.
fn anchored(re: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("invalid regex {re:?}: {e}"))
}

fn header_matcher(h: &PbHeaderMatcher) -> Result<HeaderMatcher, String> {
    #[allow(deprecated)]
    let value = match &h.header_match_specifier {
        None => HeaderValueMatch::Present(true),
        Some(header_matcher::HeaderMatchSpecifier::PresentMatch(p)) => {
            HeaderValueMatch::Present(*p)
        }
        Some(header_matcher::HeaderMatchSpecifier::ExactMatch(s)) => {
            literal(StringPattern::Exact(s.clone()))
        }
        Some(header_matcher::HeaderMatchSpecifier::PrefixMatch(s)) => {
            literal(StringPattern::Prefix(s.clone()))
        }
        Some(header_matcher::HeaderMatchSpecifier::SuffixMatch(s)) => {
            literal(StringPattern::Suffix(s.clone()))
        }
        Some(header_matcher::HeaderMatchSpecifier::ContainsMatch(s)) => {
            literal(StringPattern::Contains(s.clone()))
        }
        Some(header_matcher::HeaderMatchSpecifier::SafeRegexMatch(re)) => {
            literal(StringPattern::Regex(anchored(&re.regex)?))
        }
        Some(header_matcher::HeaderMatchSpecifier::StringMatch(sm)) => {
            HeaderValueMatch::String(string_match(sm)?)
        }
        Some(header_matcher::HeaderMatchSpecifier::RangeMatch(r)) => HeaderValueMatch::Range {
            start: r.start,
            end: r.end,
        },
    };
    let source = HeaderSource::for_name(&h.name)
        .ok_or_else(|| format!("name {:?} is not a header name", h.name))?;
    Ok(HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        source,
        value,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn literal(p: StringPattern) -> HeaderValueMatch {
    HeaderValueMatch::String(StringMatch::new(p))
}

fn query_matcher(q: &PbQueryParameterMatcher) -> Result<QueryParameterMatcher, String> {
    if q.name.is_empty() {
        return Err("name: empty".into());
    }
    let value = match &q.query_parameter_match_specifier {
        Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(sm)) => {
            Some(string_match(sm)?)
        }
        Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(_)) | None => None,
    };
    Ok(QueryParameterMatcher {
        name: q.name.clone(),
        value,
    })
}

fn string_match(sm: &StringMatcher) -> Result<StringMatch, String> {
    let pattern = sm.match_pattern.as_ref().ok_or("string_match: empty")?;
    let pattern = match pattern {
        string_matcher::MatchPattern::Exact(s) => StringPattern::Exact(s.clone()),
        string_matcher::MatchPattern::Prefix(s) => StringPattern::Prefix(s.clone()),
        string_matcher::MatchPattern::Suffix(s) => StringPattern::Suffix(s.clone()),
        string_matcher::MatchPattern::Contains(s) => StringPattern::Contains(s.clone()),
        string_matcher::MatchPattern::SafeRegex(r) => {
            if sm.ignore_case {
                // Envoy refuses the config: "ignore_case has no effect for safe_regex."
                return Err("string_match: ignore_case has no effect for safe_regex".into());
            }
            StringPattern::Regex(anchored(&r.regex)?)
        }
        string_matcher::MatchPattern::Custom(_) => {
            return Err("string_match.custom is not supported".into());
        }
    };
    Ok(StringMatch {
        pattern,
        ignore_case: sm.ignore_case,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::{RouteAction as PbRouteAction, retry_policy};
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

    #[allow(deprecated)]
    fn rc(
        route_retry: Option<PbRetryPolicy>,
        vh_retry: Option<PbRetryPolicy>,
    ) -> RouteConfiguration {
        RouteConfiguration {
            name: "9080".into(),
            virtual_hosts: vec![PbVirtualHost {
                name: "svc:9080".into(),
                domains: vec!["svc".into()],
                retry_policy: vh_retry,
                include_request_attempt_count: true,
                per_request_buffer_limit_bytes: Some(UInt32Value { value: 4096 }),
                routes: vec![PbRoute {
                    name: "default".into(),
                    r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(PbRouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        retry_policy: route_retry,
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn istiod_default() -> PbRetryPolicy {
        PbRetryPolicy {
            retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                .into(),
            num_retries: Some(UInt32Value { value: 2 }),
            retry_host_predicate: vec![retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: None,
            }],
            host_selection_retry_max_attempts: 5,
            retriable_status_codes: vec![503],
            ..Default::default()
        }
    }

    #[test]
    fn istiods_default_retry_policy_translates_to_the_istio_default() {
        let out = translate_route(&rc(Some(istiod_default()), None)).unwrap();
        let r = &out.virtual_hosts[0].routes[0];
        let p = r.retry.as_deref().unwrap();
        let want = RetryPolicy::istio_default();
        assert_eq!(p.retry_on, want.retry_on);
        assert_eq!(p.num_retries, 2);
        assert_eq!(p.retriable_status_codes, vec![503]);
        assert!(p.previous_hosts);
        assert_eq!(p.host_selection_retry_max_attempts, 5);
        assert_eq!(p.back_off, RetryBackOff::default());
        assert!(r.include_request_attempt_count);
        assert!(!r.include_attempt_count_in_response);
        assert_eq!(r.per_request_buffer_limit_bytes, Some(4096));
    }

    #[test]
    fn virtual_host_policy_applies_when_the_route_has_none_and_back_off_is_checked() {
        let mut vh = istiod_default();
        vh.num_retries = None;
        vh.per_try_timeout = Some(PbDuration {
            seconds: 1,
            nanos: 0,
        });
        vh.retry_back_off = Some(retry_policy::RetryBackOff {
            base_interval: Some(PbDuration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            max_interval: None,
        });
        let out = translate_route(&rc(None, Some(vh.clone()))).unwrap();
        let p = out.virtual_hosts[0].routes[0].retry.clone().unwrap();
        assert_eq!(p.num_retries, 1);
        assert_eq!(p.per_try_timeout, Some(std::time::Duration::from_secs(1)));
        assert_eq!(p.back_off.max, std::time::Duration::from_secs(1));
        vh.retry_back_off = Some(retry_policy::RetryBackOff {
            base_interval: Some(PbDuration {
                seconds: 1,
                nanos: 0,
            }),
            max_interval: Some(PbDuration {
                seconds: 0,
                nanos: 1,
            }),
        });
        let e = translate_route(&rc(None, Some(vh))).unwrap_err();
        assert!(e.to_string().contains("max_interval"), "{e}");
    }

    #[test]
    fn route_idle_timeout_is_read() {
        let with = |d: Option<PbDuration>| {
            let mut config = rc(None, None);
            if let Some(route::Action::Route(ra)) = &mut config.virtual_hosts[0].routes[0].action {
                ra.idle_timeout = d;
            }
            translate_route(&config).map(|c| c.virtual_hosts[0].routes[0].idle_timeout)
        };
        assert_eq!(with(None).unwrap(), None);
        assert_eq!(
            with(Some(PbDuration {
                seconds: 0,
                nanos: 250_000_000,
            }))
            .unwrap(),
            Some(std::time::Duration::from_millis(250))
        );
        let e = with(Some(PbDuration {
            seconds: -1,
            nanos: 0,
        }))
        .unwrap_err();
        assert!(e.to_string().contains("route.idle_timeout"), "{e}");
    }
}

#[cfg(test)]
mod forwarding_tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue as PbHeaderValue;
    use envoy_types::pb::envoy::config::route::v3::RouteAction as PbRouteAction;

    fn hvo(key: &str, value: &str, action: i32) -> PbHeaderValueOption {
        PbHeaderValueOption {
            header: Some(PbHeaderValue {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }),
            append_action: action,
            ..Default::default()
        }
    }

    #[test]
    fn rewrites_and_header_levels_translate() {
        let rc = RouteConfiguration {
            name: "80".into(),
            request_headers_to_add: vec![hvo("x-level", "rc", 2)],
            virtual_hosts: vec![PbVirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                request_headers_to_remove: vec!["X-Secret".into()],
                routes: vec![PbRoute {
                    r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/v1/".into())),
                        ..Default::default()
                    }),
                    request_headers_to_add: vec![hvo("x-level", "%REQ(x-a)%", 1)],
                    response_headers_to_add: vec![hvo("x-resp", "1", 0)],
                    action: Some(route::Action::Route(PbRouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        prefix_rewrite: "/v2/".into(),
                        host_rewrite_specifier: Some(
                            route_action::HostRewriteSpecifier::HostRewriteLiteral("b".into()),
                        ),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = translate_route(&rc).unwrap();
        let f = out.virtual_hosts[0].routes[0].forwarding.clone().unwrap();
        assert!(matches!(&f.path_rewrite, Some(PathRewrite::Prefix(p)) if p == "/v2/"));
        assert_eq!(f.host_rewrite, Some(HostRewrite::Literal("b".into())));
        let levels = &f.request_headers.levels;
        assert_eq!(levels.len(), 3);
        assert_eq!(levels[0].add[0].action, AppendAction::AddIfAbsent);
        assert_eq!(levels[1].remove[0].as_str(), "x-secret");
        assert_eq!(
            levels[2].add[0].action,
            AppendAction::OverwriteIfExistsOrAdd
        );
        assert_eq!(f.response_headers.levels.len(), 1);

        // A formatter Envoy does not know: the route configuration is refused, as Envoy does.
        let mut bad = rc.clone();
        bad.request_headers_to_add = vec![hvo("x-id", "%REQUEST_ID%", 0)];
        let e = translate_route(&bad).unwrap_err().to_string();
        assert!(
            e.contains("request_headers_to_add")
                && e.contains("Not supported field in StreamInfo: REQUEST_ID"),
            "{e}"
        );

        // Istio's VirtualService fault, as a per-route filter config.
        {
            use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
                FaultDelay, fault_delay,
            };
            use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
                FaultAbort, HttpFault, fault_abort,
            };
            use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
            use prost::{Message, Name};
            let f = HttpFault {
                delay: Some(FaultDelay {
                    fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(
                        envoy_types::pb::google::protobuf::Duration {
                            seconds: 2,
                            nanos: 0,
                        },
                    )),
                    percentage: Some(FractionalPercent {
                        numerator: 500_000,
                        denominator: 2,
                    }),
                }),
                abort: Some(FaultAbort {
                    error_type: Some(fault_abort::ErrorType::HttpStatus(503)),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut with_fault = rc.clone();
            with_fault.virtual_hosts[0].routes[0]
                .typed_per_filter_config
                .insert(
                    FAULT_FILTER.into(),
                    envoy_types::pb::google::protobuf::Any {
                        type_url: HttpFault::type_url(),
                        value: f.encode_to_vec(),
                    },
                );
            let out = translate_route(&with_fault).unwrap();
            let fault = out.virtual_hosts[0].routes[0].fault.clone().unwrap();
            let d = fault.delay.as_ref().unwrap();
            assert_eq!(
                d.kind,
                mesh_core::fault::FaultDelayKind::Fixed(std::time::Duration::from_secs(2))
            );
            assert_eq!(d.percentage.denominator, 1_000_000);
            let a = fault.abort.as_ref().unwrap();
            assert_eq!(a.kind, mesh_core::fault::FaultAbortKind::Http(503));
            assert_eq!(a.percentage.numerator, 100);
        }

        let mut bad = rc.clone();
        bad.request_headers_to_add[0].append_action = 9;
        let e = translate_route(&bad).unwrap_err();
        assert!(e.to_string().contains("append_action"), "{e}");
    }
}
