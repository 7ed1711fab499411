use super::*;

fn exact(s: &str) -> StringMatcher {
    StringMatcher::Exact(s.into(), false)
}

fn method(m: &str) -> Permission {
    Permission::Header(HeaderMatcher {
        name: ":method".into(),
        matcher: HeaderMatch::String(exact(m)),
        invert: false,
        treat_missing_as_empty: false,
    })
}

fn principal(p: &str) -> Principal {
    Principal::Authenticated(Some(exact(p)))
}

fn rules(action: RbacAction, policies: Vec<(&str, Policy)>) -> RbacRules {
    RbacRules {
        action,
        policies: policies
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect(),
    }
}

fn filter(r: RbacRules) -> AuthzFilter {
    AuthzFilter::Rbac(RbacFilter {
        rules: Some(r),
        shadow_rules: None,
        shadow_rules_stat_prefix: String::new(),
    })
}

struct Req {
    headers: http::HeaderMap,
    method: String,
    path: String,
    peer: Option<String>,
    source: SocketAddr,
    destination: SocketAddr,
}

impl Req {
    fn new(method: &str, path: &str, peer: Option<&str>) -> Self {
        Req {
            headers: http::HeaderMap::new(),
            method: method.into(),
            path: path.into(),
            peer: peer.map(str::to_owned),
            source: "10.1.2.3:5555".parse().unwrap(),
            destination: "10.9.9.9:8080".parse().unwrap(),
        }
    }
    fn view(&self) -> AuthzRequest<'_> {
        AuthzRequest {
            headers: Some(&self.headers),
            method: &self.method,
            path: &self.path,
            authority: "httpbin.default.svc.cluster.local",
            scheme: "http",
            source: Some(self.source),
            remote_ip: None,
            destination: Some(self.destination),
            requested_server_name: None,
            peer_principal: self.peer.as_deref(),
            peer_authenticated: self.peer.is_some(),
            local_principal: None,
        }
    }
}

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn allow_get_from_sleep() -> AuthzChain {
    AuthzChain {
        filters: vec![filter(rules(
            RbacAction::Allow,
            vec![(
                "ns[default]-policy[httpbin]-rule[0]",
                Policy {
                    permissions: vec![Permission::And(vec![
                        method("GET"),
                        Permission::UrlPath(StringMatcher::Prefix("/info".into(), false)),
                    ])],
                    principals: vec![principal(SLEEP)],
                },
            )],
        ))],
    }
}

#[test]
fn allow_policy_allows_only_matching_requests() {
    let chain = allow_get_from_sleep();
    let mut md = DynamicMetadata::default();
    assert_eq!(
        chain.evaluate(&Req::new("GET", "/info?x=1", Some(SLEEP)).view(), &mut md),
        AuthzDecision::Allow
    );
    // Wrong identity, wrong method, wrong path, plaintext.
    for req in [
        Req::new(
            "GET",
            "/info",
            Some("spiffe://cluster.local/ns/default/sa/other"),
        ),
        Req::new("POST", "/info", Some(SLEEP)),
        Req::new("GET", "/admin", Some(SLEEP)),
        Req::new("GET", "/info", None),
    ] {
        assert_eq!(
            chain.evaluate(&req.view(), &mut md),
            AuthzDecision::Deny {
                filter: 0,
                policy: None
            },
            "{} {} {:?}",
            req.method,
            req.path,
            req.peer
        );
    }
}

#[test]
fn empty_allow_denies_everything_and_empty_deny_allows() {
    let mut md = DynamicMetadata::default();
    let req = Req::new("GET", "/", Some(SLEEP));
    let deny_all = AuthzChain {
        filters: vec![filter(rules(RbacAction::Allow, vec![]))],
    };
    assert!(matches!(
        deny_all.evaluate(&req.view(), &mut md),
        AuthzDecision::Deny { .. }
    ));
    let allow_all = AuthzChain {
        filters: vec![filter(rules(RbacAction::Deny, vec![]))],
    };
    assert_eq!(
        allow_all.evaluate(&req.view(), &mut md),
        AuthzDecision::Allow
    );
}

#[test]
fn deny_runs_before_allow_and_names_the_policy() {
    let chain = AuthzChain {
        filters: vec![
            filter(rules(
                RbacAction::Deny,
                vec![(
                    "ns[default]-policy[deny-admin]-rule[0]",
                    Policy {
                        permissions: vec![Permission::UrlPath(StringMatcher::Prefix(
                            "/admin".into(),
                            false,
                        ))],
                        principals: vec![Principal::Any],
                    },
                )],
            )),
            filter(rules(
                RbacAction::Allow,
                vec![(
                    "allow-all",
                    Policy {
                        permissions: vec![Permission::Any],
                        principals: vec![Principal::Any],
                    },
                )],
            )),
        ],
    };
    let mut md = DynamicMetadata::default();
    assert_eq!(
        chain.evaluate(&Req::new("GET", "/admin/x", Some(SLEEP)).view(), &mut md),
        AuthzDecision::Deny {
            filter: 0,
            policy: Some("ns[default]-policy[deny-admin]-rule[0]".into())
        }
    );
    assert_eq!(
        chain.evaluate(&Req::new("GET", "/public", None).view(), &mut md),
        AuthzDecision::Allow
    );
}

#[test]
fn log_never_denies_and_policies_are_tried_in_name_order() {
    let any = || Policy {
        permissions: vec![Permission::Any],
        principals: vec![Principal::Any],
    };
    let r = rules(RbacAction::Log, vec![("b", any()), ("a", any())]);
    let req = Req::new("GET", "/", None);
    let md = DynamicMetadata::default();
    assert_eq!(r.evaluate(&req.view(), &md), (true, Some("a".into())));
}

#[test]
fn shadow_rules_record_metadata_that_enables_ext_authz() {
    let custom = RbacFilter {
        rules: None,
        shadow_rules: Some(rules(
            RbacAction::Deny,
            vec![(
                "istio-ext-authz-ns[default]-policy[ext-authz]-rule[0]",
                Policy {
                    permissions: vec![Permission::UrlPath(StringMatcher::Prefix(
                        "/info".into(),
                        false,
                    ))],
                    principals: vec![Principal::Any],
                },
            )],
        )),
        shadow_rules_stat_prefix: "istio_ext_authz_".into(),
    };
    let ext = ExtAuthz {
        cluster: "outbound|9191||ext-authz".into(),
        authority: None,
        timeout: None,
        filter_enabled_metadata: Some(MetadataMatcher {
            filter: RBAC_METADATA_NAMESPACE.into(),
            path: vec!["istio_ext_authz_shadow_effective_policy_id".into()],
            value: ValueMatcher::String(StringMatcher::Prefix("istio-ext-authz".into(), false)),
            invert: false,
        }),
        failure_mode_allow: false,
        status_on_error: 403,
        max_request_bytes: None,
    };
    let chain = AuthzChain {
        filters: vec![AuthzFilter::Rbac(custom), AuthzFilter::ExtAuthz(ext)],
    };
    let mut md = DynamicMetadata::default();
    assert_eq!(
        chain.evaluate(&Req::new("GET", "/info", None).view(), &mut md),
        AuthzDecision::CheckExternal { filter: 1 }
    );
    assert_eq!(
        md.get(
            RBAC_METADATA_NAMESPACE,
            "istio_ext_authz_shadow_engine_result"
        ),
        Some(&Value::String("denied".into()))
    );
    assert_eq!(
        chain.evaluate_from(2, &Req::new("GET", "/info", None).view(), &mut md),
        AuthzDecision::Allow
    );
    // Not covered by the CUSTOM policy: ext_authz is skipped.
    let mut md = DynamicMetadata::default();
    assert_eq!(
        chain.evaluate(&Req::new("GET", "/other", None).view(), &mut md),
        AuthzDecision::Allow
    );
}

#[test]
fn principals_cover_istio_forms() {
    let mut req = Req::new("GET", "/", Some(SLEEP));
    req.headers
        .append("x-token", http::HeaderValue::from_static("a"));
    req.headers
        .append("x-token", http::HeaderValue::from_static("b"));
    let md = DynamicMetadata::default();
    let view = req.view();
    // Namespace as istiod renders it: a regex over the principal.
    let ns = Principal::Authenticated(Some(StringMatcher::regex(".*/ns/default/.*").unwrap()));
    assert!(ns.matches(&view, &md));
    let other_ns = Principal::Authenticated(Some(StringMatcher::regex(".*/ns/test/.*").unwrap()));
    assert!(!other_ns.matches(&view, &md));
    assert!(Principal::Not(Box::new(other_ns)).matches(&view, &md));
    // filter_state peer principal (newer istiod).
    let fs = Principal::FilterState {
        key: PEER_PRINCIPAL_FILTER_STATE.into(),
        matcher: StringMatcher::Suffix("/sa/sleep".into(), false),
    };
    assert!(fs.matches(&view, &md));
    // CIDRs.
    let cidr = |s: &str, l| Cidr {
        address: s.parse().unwrap(),
        prefix_len: l,
    };
    assert!(Principal::DirectRemoteIp(cidr("10.1.0.0", 16)).matches(&view, &md));
    assert!(!Principal::DirectRemoteIp(cidr("10.2.0.0", 16)).matches(&view, &md));
    assert!(Principal::RemoteIp(cidr("10.1.2.3", 32)).matches(&view, &md));
    assert!(!Principal::RemoteIp(cidr("::", 0)).matches(&view, &md));
    // Multi-valued headers are joined with ','.
    let h = Principal::Header(HeaderMatcher {
        name: "x-token".into(),
        matcher: HeaderMatch::String(exact("a,b")),
        invert: false,
        treat_missing_as_empty: false,
    });
    assert!(h.matches(&view, &md));
    // and/or
    assert!(Principal::And(vec![Principal::Any, principal(SLEEP)]).matches(&view, &md));
    assert!(!Principal::And(vec![Principal::Any, principal("x")]).matches(&view, &md));
    assert!(Principal::Or(vec![principal("x"), principal(SLEEP)]).matches(&view, &md));
    // Authenticated without matcher: any peer certificate; never plaintext.
    assert!(Principal::Authenticated(None).matches(&view, &md));
    let plain = Req::new("GET", "/", None);
    assert!(!Principal::Authenticated(None).matches(&plain.view(), &md));
}

#[test]
fn request_principals_come_from_jwt_metadata() {
    let mut md = DynamicMetadata::default();
    md.set(
        "istio_authn",
        "request.auth.claims",
        serde_json::json!({"iss": ["https://accounts.google.com"], "sub": ["u1"]}),
    );
    let m = Principal::Metadata(MetadataMatcher {
        filter: "istio_authn".into(),
        path: vec!["request.auth.claims".into(), "iss".into()],
        value: ValueMatcher::ListOneOf(Box::new(ValueMatcher::String(exact(
            "https://accounts.google.com",
        )))),
        invert: false,
    });
    let req = Req::new("GET", "/", None);
    assert!(m.matches(&req.view(), &md));
    assert!(!m.matches(&req.view(), &DynamicMetadata::default()));
}

#[test]
fn permissions_cover_ports_hosts_sni_and_not() {
    let req = Req::new("GET", "/a", Some(SLEEP));
    let md = DynamicMetadata::default();
    let v = req.view();
    assert!(Permission::DestinationPort(8080).matches(&v, &md));
    assert!(!Permission::DestinationPort(9080).matches(&v, &md));
    assert!(Permission::DestinationPortRange(8000, 8081).matches(&v, &md));
    assert!(!Permission::DestinationPortRange(8000, 8080).matches(&v, &md));
    let host = Permission::Header(HeaderMatcher {
        name: ":authority".into(),
        matcher: HeaderMatch::String(StringMatcher::Exact(
            "HTTPBIN.default.svc.cluster.local".into(),
            true,
        )),
        invert: false,
        treat_missing_as_empty: false,
    });
    assert!(host.matches(&v, &md));
    assert!(!Permission::Not(Box::new(host)).matches(&v, &md));
    assert!(!Permission::RequestedServerName(exact("x")).matches(&v, &md));
    // Header permissions never match without headers (network filter).
    let mut net = req.view();
    net.headers = None;
    assert!(!method("GET").matches(&net, &md));
    assert!(Permission::DestinationPort(8080).matches(&net, &md));
}

#[test]
fn absent_headers_follow_envoy_rules() {
    let present = |p, invert| HeaderMatcher {
        name: "x".into(),
        matcher: HeaderMatch::Present(p),
        invert,
        treat_missing_as_empty: false,
    };
    assert!(!present(true, false).matches(None));
    assert!(present(false, false).matches(None));
    assert!(present(true, true).matches(None));
    assert!(present(true, false).matches(Some("")));
    let ex = HeaderMatcher {
        name: "x".into(),
        matcher: HeaderMatch::String(exact("")),
        invert: true,
        treat_missing_as_empty: false,
    };
    // Inverted string match on an absent header does not match.
    assert!(!ex.matches(None));
}

#[test]
fn string_matchers() {
    assert!(StringMatcher::Prefix("/API".into(), true).matches("/api/x"));
    assert!(!StringMatcher::Prefix("/API".into(), false).matches("/api/x"));
    assert!(StringMatcher::Suffix(".JSON".into(), true).matches("/a.json"));
    assert!(StringMatcher::Contains("mid".into(), false).matches("amidb"));
    // Regexes are full matches.
    assert!(!StringMatcher::regex("admin").unwrap().matches("/admin"));
    assert!(
        StringMatcher::regex("/admin.*")
            .unwrap()
            .matches("/admin/x")
    );
    // Multi-byte input does not panic.
    assert!(!StringMatcher::Prefix("ab".into(), true).matches("é"));
}

#[test]
fn path_bypass_attempts_are_caught_after_normalization() {
    let deny_admin = AuthzChain {
        filters: vec![filter(rules(
            RbacAction::Deny,
            vec![(
                "deny-admin",
                Policy {
                    permissions: vec![Permission::UrlPath(StringMatcher::Prefix(
                        "/admin".into(),
                        false,
                    ))],
                    principals: vec![Principal::Any],
                },
            )],
        ))],
    };
    for (raw, mode) in [
        ("/public/../admin", PathNormalization::Base),
        ("/%61dmin", PathNormalization::Base),
        ("/./admin", PathNormalization::Base),
        ("//admin", PathNormalization::MergeSlashes),
        (
            "/public%2F..%2Fadmin",
            PathNormalization::DecodeAndMergeSlashes,
        ),
    ] {
        let path = match normalize_path(raw, mode) {
            NormalizedPath::Forward(p) | NormalizedPath::Redirect(p) => p,
            NormalizedPath::Reject => panic!("{raw} rejected"),
        };
        let req = Req::new("GET", &path, None);
        assert!(
            matches!(
                deny_admin.evaluate(&req.view(), &mut DynamicMetadata::default()),
                AuthzDecision::Deny { .. }
            ),
            "{raw} → {path} was not denied"
        );
    }
}
