//! The RBAC and ext_authz filters istiod rendered for real AuthorizationPolicies
//! (testdata/istio/istioctl-authz_configdump.yaml: an ALLOW policy `httpbin` and a CUSTOM
//! policy `ext-authz` on the same rules), translated into mesh-core's authz chain and evaluated
//! against concrete requests.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use mesh_core::authz::{
    AuthzChain, AuthzDecision, AuthzFilter, AuthzRequest, DynamicMetadata, RbacAction,
};
use mesh_xds::dump::{ConfigDump, LISTENER};
use mesh_xds::translate::from_any;
use mesh_xds::translate::rbac::{
    translate_http_authz_filters, translate_http_rbac, translate_network_authz_filters,
};
use prost::Message;

const DUMP: &str = "../testdata/istio/istioctl-authz_configdump.yaml";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const GOOGLE: &str = "https://accounts.google.com";

fn virtual_inbound() -> Listener {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DUMP);
    let dump = ConfigDump::load(&path).expect("authz config dump loads");
    let res = dump
        .of_type(LISTENER)
        .find(|r| r.name == "virtualInbound")
        .expect("virtualInbound in the dump");
    Listener::decode(res.resource.value.as_slice()).unwrap()
}

fn http_chain(listener: &Listener, chain_name: &str) -> AuthzChain {
    let fc = listener
        .filter_chains
        .iter()
        .find(|fc| fc.name == chain_name)
        .unwrap_or_else(|| panic!("filter chain {chain_name}"));
    let hcm = fc
        .filters
        .iter()
        .find_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any))
                if any.type_url.ends_with("HttpConnectionManager") =>
            {
                Some(from_any::<HttpConnectionManager>(any).unwrap())
            }
            _ => None,
        })
        .expect("an HCM");
    translate_http_authz_filters(&hcm.http_filters).expect("RBAC filters translate")
}

struct Call {
    method: &'static str,
    path: &'static str,
    peer: Option<&'static str>,
    issuer: Option<&'static str>,
}

fn evaluate(chain: &AuthzChain, c: &Call) -> (AuthzDecision, DynamicMetadata) {
    let headers = http::HeaderMap::new();
    let mut md = DynamicMetadata::default();
    if let Some(iss) = c.issuer {
        md.set(
            "istio_authn",
            "request.auth.claims",
            serde_json::json!({ "iss": [iss] }),
        );
    }
    let req = AuthzRequest {
        headers: Some(&headers),
        method: c.method,
        path: c.path,
        authority: "httpbin.default.svc.cluster.local:8000",
        scheme: "http",
        source: Some("10.244.0.7:40000".parse().unwrap()),
        remote_ip: None,
        destination: Some("10.244.0.9:80".parse().unwrap()),
        requested_server_name: None,
        peer_principal: c.peer,
        peer_authenticated: c.peer.is_some(),
        local_principal: Some("spiffe://cluster.local/ns/default/sa/httpbin"),
    };
    let decision = chain.evaluate(&req, &mut md);
    (decision, md)
}

#[test]
fn the_http_chain_has_allow_then_custom_shadow_then_ext_authz() {
    let listener = virtual_inbound();
    for name in ["0.0.0.0_80", "virtualInbound-catchall-http"] {
        let chain = http_chain(&listener, name);
        assert_eq!(chain.filters.len(), 3, "{name}: {chain:?}");
        let AuthzFilter::Rbac(allow) = &chain.filters[0] else {
            panic!("first filter is RBAC")
        };
        let rules = allow.rules.as_ref().unwrap();
        assert_eq!(rules.action, RbacAction::Allow);
        assert_eq!(
            rules.policies.keys().collect::<Vec<_>>(),
            vec!["ns[default]-policy[httpbin]-rule[0]"]
        );
        assert_eq!(allow.shadow_rules_stat_prefix, "istio_dry_run_allow_");
        let AuthzFilter::Rbac(custom) = &chain.filters[1] else {
            panic!("second filter is RBAC")
        };
        assert!(custom.rules.is_none());
        assert_eq!(
            custom.shadow_rules.as_ref().unwrap().action,
            RbacAction::Deny
        );
        assert_eq!(custom.shadow_rules_stat_prefix, "istio_ext_authz_");
        let AuthzFilter::ExtAuthz(ext) = &chain.filters[2] else {
            panic!("third filter is ext_authz")
        };
        assert_eq!(ext.cluster, "outbound|9191||sample-ext-authz-grpc");
        assert_eq!(
            ext.authority.as_deref(),
            Some("sample-ext-authz-grpc.local")
        );
        assert_eq!(ext.timeout, Some(Duration::from_secs(600)));
        assert_eq!(ext.max_request_bytes, Some(8000));
        assert!(!ext.failure_mode_allow);
        assert_eq!(ext.status_on_error, 403);
    }
}

#[test]
fn requests_the_policies_allow_go_to_the_custom_provider() {
    let chain = http_chain(&virtual_inbound(), "0.0.0.0_80");
    for c in [
        Call {
            method: "GET",
            path: "/info",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
        Call {
            method: "GET",
            path: "/info/more?x=1",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
        Call {
            method: "POST",
            path: "/data",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
        // Namespace `test`, any service account (istiod's `.*/ns/test/.*` regex).
        Call {
            method: "GET",
            path: "/info",
            peer: Some("spiffe://cluster.local/ns/test/sa/anyone"),
            issuer: Some(GOOGLE),
        },
    ] {
        let (decision, md) = evaluate(&chain, &c);
        assert_eq!(
            decision,
            AuthzDecision::CheckExternal { filter: 2 },
            "{} {} {:?}",
            c.method,
            c.path,
            c.peer
        );
        assert_eq!(
            md.get(
                "envoy.filters.http.rbac",
                "istio_ext_authz_shadow_effective_policy_id"
            ),
            Some(&serde_json::json!(
                "istio-ext-authz-ns[default]-policy[ext-authz]-rule[0]"
            ))
        );
        // The provider allowed: the rest of the chain allows.
        let mut md = md;
        let headers = http::HeaderMap::new();
        let req = AuthzRequest {
            headers: Some(&headers),
            method: c.method,
            path: c.path,
            ..Default::default()
        };
        assert_eq!(chain.evaluate_from(3, &req, &mut md), AuthzDecision::Allow);
    }
}

#[test]
fn requests_outside_the_allow_policy_are_denied_with_no_provider_call() {
    let chain = http_chain(&virtual_inbound(), "0.0.0.0_80");
    for c in [
        // Valid peer but no JWT (request principal) → denied.
        Call {
            method: "GET",
            path: "/info",
            peer: Some(SLEEP),
            issuer: None,
        },
        // Wrong issuer.
        Call {
            method: "GET",
            path: "/info",
            peer: Some(SLEEP),
            issuer: Some("https://evil.example"),
        },
        // The right JWT but the wrong workload identity for the ALLOW rule.
        Call {
            method: "GET",
            path: "/info",
            peer: Some("spiffe://cluster.local/ns/default/sa/not-sleep"),
            issuer: Some(GOOGLE),
        },
        // The namespace regex must match the whole principal's /ns/ segment.
        Call {
            method: "GET",
            path: "/info",
            peer: Some("spiffe://cluster.local/ns/testing/sa/x"),
            issuer: Some(GOOGLE),
        },
        // Plaintext (no peer certificate).
        Call {
            method: "GET",
            path: "/info",
            peer: None,
            issuer: Some(GOOGLE),
        },
        // Method/path pairs the policy does not list.
        Call {
            method: "POST",
            path: "/info",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
        Call {
            method: "GET",
            path: "/data",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
        Call {
            method: "POST",
            path: "/data/x",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
        Call {
            method: "GET",
            path: "/admin",
            peer: Some(SLEEP),
            issuer: Some(GOOGLE),
        },
    ] {
        let (decision, _) = evaluate(&chain, &c);
        assert_eq!(
            decision,
            AuthzDecision::Deny {
                filter: 0,
                policy: None
            },
            "{} {} {:?} {:?}",
            c.method,
            c.path,
            c.peer,
            c.issuer
        );
    }
}

#[test]
fn tcp_chains_of_an_http_only_allow_policy_deny_every_connection() {
    let listener = virtual_inbound();
    let fc = listener
        .filter_chains
        .iter()
        .find(|fc| fc.name == "virtualInbound")
        .unwrap();
    let chain = translate_network_authz_filters(&fc.filters).unwrap();
    assert_eq!(chain.filters.len(), 1);
    let req = AuthzRequest {
        peer_principal: Some(SLEEP),
        peer_authenticated: true,
        source: Some("10.244.0.7:40000".parse().unwrap()),
        destination: Some("10.244.0.9:9000".parse().unwrap()),
        ..Default::default()
    };
    assert_eq!(
        chain.evaluate(&req, &mut DynamicMetadata::default()),
        AuthzDecision::Deny {
            filter: 0,
            policy: None
        }
    );
}

#[test]
fn unsupported_fields_are_refused_naming_the_field() {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    let policy = rbac::Policy {
        permissions: vec![rbac::Permission {
            rule: Some(rbac::permission::Rule::Any(true)),
        }],
        principals: vec![rbac::Principal {
            identifier: Some(rbac::principal::Identifier::Any(true)),
        }],
        condition: Some(Default::default()),
        ..Default::default()
    };
    let cfg = HttpRbac {
        rules: Some(rbac::Rbac {
            action: rbac::rbac::Action::Deny as i32,
            policies: [("p".to_owned(), policy)].into_iter().collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = translate_http_rbac(&cfg).unwrap_err();
    assert!(err.contains("rules.policies[\"p\"].condition"), "{err}");

    let bad_regex = rbac::Permission {
        rule: Some(rbac::permission::Rule::RequestedServerName(
            envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher {
                match_pattern: Some(
                    envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::SafeRegex(
                        envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                            regex: "(".into(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            },
        )),
    };
    let cfg = HttpRbac {
        rules: Some(rbac::Rbac {
            action: rbac::rbac::Action::Allow as i32,
            policies: [(
                "q".to_owned(),
                rbac::Policy {
                    permissions: vec![bad_regex],
                    principals: vec![],
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = translate_http_rbac(&cfg).unwrap_err();
    assert!(
        err.contains("permissions[0].requested_server_name.safe_regex"),
        "{err}"
    );
}

#[test]
fn uri_templates_match_segments() {
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
    let template = |t: &str| rbac::Permission {
        rule: Some(rbac::permission::Rule::UriTemplate(TypedExtensionConfig {
            name: "uri-template".into(),
            typed_config: Some(mesh_xds::translate::to_any(&UriTemplateMatchConfig {
                path_template: t.into(),
            })),
        })),
    };
    let cfg = HttpRbac {
        rules: Some(rbac::Rbac {
            action: rbac::rbac::Action::Allow as i32,
            policies: [(
                "t".to_owned(),
                rbac::Policy {
                    permissions: vec![template("/store/{*}/items/{**}")],
                    principals: vec![rbac::Principal {
                        identifier: Some(rbac::principal::Identifier::Any(true)),
                    }],
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let chain = AuthzChain {
        filters: vec![AuthzFilter::Rbac(translate_http_rbac(&cfg).unwrap())],
    };
    let headers = http::HeaderMap::new();
    let check = |path: &str| {
        let req = AuthzRequest {
            headers: Some(&headers),
            method: "GET",
            path,
            ..Default::default()
        };
        chain.evaluate(&req, &mut DynamicMetadata::default()) == AuthzDecision::Allow
    };
    assert!(check("/store/a/items/x/y?z=1"));
    assert!(check("/store/a/items/"));
    assert!(!check("/store/a/b/items/x"));
    assert!(!check("/store//items/x"));
    assert!(!check("/storeX/a/items/x"));
}
