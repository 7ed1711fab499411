use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::json;

use super::*;

const RSA_PEM: &str = include_str!("../../testdata/jwt-rsa2048.pk8.pem");
const ISS: &str = "https://issuer.example";
const NOW: u64 = 1_700_000_000;

fn rsa() -> JwtSigner {
    JwtSigner::rsa_from_pkcs8_pem(RSA_PEM, "rsa-1", "RS256").unwrap()
}

/// `token` with another payload under the original signature (a forged claim set).
fn tamper(token: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = base64url(
        json!({"iss": ISS, "sub": "mallory", "exp": NOW + 3600})
            .to_string()
            .as_bytes(),
    );
    parts[1] = &forged;
    parts.join(".")
}

fn claims() -> serde_json::Value {
    json!({"iss": ISS, "sub": "alice", "aud": "bookinfo", "exp": NOW + 3600, "scope": "read write"})
}

/// istiod's rendering for one issuer: `requires_any {origins-0, allow_missing}`.
fn istio_filter(jwks: &str) -> JwtAuthn {
    let mut p = JwtProvider::new(
        "origins-0",
        ISS,
        JwksSource::Local(Jwks::parse(jwks).ok().map(Arc::new)),
    );
    p.payload_in_metadata = Some("payload".into());
    p.space_delimited_claims = vec!["permission".into(), "scope".into()];
    p.claim_to_headers = vec![(HeaderName::from_static("x-jwt-sub"), "sub".into())];
    JwtAuthn::istio_single(p)
}

fn run(f: &JwtAuthn, headers: &mut HeaderMap, path: &str) -> Result<JwtVerified, JwtStatus> {
    let method = Method::GET;
    let mut req = JwtRequest {
        headers,
        path,
        method: &method,
        now: NOW,
    };
    f.authenticate(&mut req, &|_| RemoteKeys::Unavailable)
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

#[test]
fn valid_rs256_and_es256_tokens_pass_and_fill_metadata() {
    let r = rsa();
    let e = JwtSigner::ec_generate("ec-1", "ES256").unwrap();
    let f = istio_filter(&JwtSigner::jwks(&[&r, &e]));
    for signer in [&r, &e] {
        let mut h = bearer(&signer.sign(&claims()));
        h.insert("x-jwt-sub", HeaderValue::from_static("spoofed"));
        let v = run(&f, &mut h, "/x?y=1").unwrap_or_else(|s| panic!("{}: {s}", signer.alg()));
        // Token removed (forward: false); claim header replaced by the verified one.
        assert!(h.get(http::header::AUTHORIZATION).is_none());
        assert_eq!(h.get_all("x-jwt-sub").iter().collect::<Vec<_>>(), ["alice"]);
        let payload = &v.metadata[JWT_AUTHN_FILTER]["payload"];
        assert_eq!(payload["iss"], ISS);
        assert_eq!(payload["scope"], json!(["read", "write"]));
        assert_eq!(v.principal.unwrap().principal(), format!("{ISS}/alice"));
    }
}

#[test]
fn every_refusal_has_envoys_status() {
    let r = rsa();
    let f = istio_filter(&JwtSigner::jwks(&[&r]));
    let other = JwtSigner::ec_generate("rsa-1", "ES256").unwrap();
    let mut c = claims();
    let cases: Vec<(String, JwtStatus)> = vec![
        (tamper(&r.sign(&claims())), JwtStatus::VerificationFail),
        // Another key type under the same kid: the RSA key's alg excludes it.
        (other.sign(&claims()), JwtStatus::JwksKidAlgMismatch),
        (
            r.sign(&{
                c["exp"] = json!(NOW - 61);
                c.clone()
            }),
            JwtStatus::Expired,
        ),
        (
            r.sign(&json!({"iss": ISS, "sub": "a", "nbf": NOW + 61})),
            JwtStatus::NotYetValid,
        ),
        (
            r.sign(&json!({"iss": "https://evil", "sub": "a"})),
            JwtStatus::UnknownIssuer,
        ),
        (
            r.sign_with_header(&json!({"alg": "none"}), &claims()),
            JwtStatus::HeaderNotImplementedAlg,
        ),
        ("a.b".into(), JwtStatus::BadFormat),
        (
            "eyJhbGciOiJSUzI1NiJ9.e30.a".into(),
            JwtStatus::SignatureBadBase64,
        ),
        // A HS256 token against RSA keys: the key's alg differs → no key eligible.
        (
            r.sign_with_header(&json!({"alg": "HS256", "kid": "rsa-1"}), &claims()),
            JwtStatus::JwksKidAlgMismatch,
        ),
    ];
    for (token, want) in cases {
        let mut h = bearer(&token);
        assert_eq!(run(&f, &mut h, "/").unwrap_err(), want, "{token}");
        assert!(h.get(http::header::AUTHORIZATION).is_some());
    }
    // Clock skew: 59 s late/early still passes.
    let mut c = claims();
    c["exp"] = json!(NOW - 59);
    c["nbf"] = json!(NOW + 59);
    assert!(run(&f, &mut bearer(&r.sign(&c)), "/").is_ok());
}

#[test]
fn audiences_are_checked_with_envoys_normalization() {
    let r = rsa();
    let mut f = istio_filter(&JwtSigner::jwks(&[&r]));
    if let Some(p) = f.providers.get_mut("origins-0") {
        p.audiences = vec!["https://bookinfo/".into()];
    }
    assert!(run(&f, &mut bearer(&r.sign(&claims())), "/").is_ok());
    let mut c = claims();
    c["aud"] = json!(["other"]);
    let s = run(&f, &mut bearer(&r.sign(&c)), "/").unwrap_err();
    assert_eq!(s, JwtStatus::AudienceNotAllowed);
    assert_eq!(s.http_status(), 403);
    assert_eq!(s.to_string(), "Audiences in Jwt are not allowed");
}

#[test]
fn missing_tokens_pass_allow_missing_but_not_a_bare_provider() {
    let r = rsa();
    let mut f = istio_filter(&JwtSigner::jwks(&[&r]));
    let v = run(&f, &mut HeaderMap::new(), "/").unwrap();
    assert!(v.metadata.is_empty() && v.principal.is_none());
    f.rules[0].requires = JwtRequirement::Provider("origins-0".into());
    let s = run(&f, &mut HeaderMap::new(), "/").unwrap_err();
    assert_eq!(s, JwtStatus::Missing);
    assert_eq!(
        s.www_authenticate("http://h/"),
        "Bearer realm=\"http://h/\""
    );
    assert_eq!(
        JwtStatus::VerificationFail.www_authenticate("http://h/"),
        "Bearer realm=\"http://h/\", error=\"invalid_token\""
    );
    // No rule for the path: nothing verified.
    f.rules[0].matcher = RuleMatch::Path("/only".into());
    assert!(run(&f, &mut HeaderMap::new(), "/").is_ok());
}

#[test]
fn tokens_come_from_params_and_smuggled_headers_are_handled_as_envoy() {
    let r = rsa();
    let f = istio_filter(&JwtSigner::jwks(&[&r]));
    let good = r.sign(&claims());
    let forged = tamper(&good);
    // ?access_token= is a default location.
    assert!(run(&f, &mut HeaderMap::new(), &format!("/?access_token={good}")).is_ok());
    assert_eq!(
        run(
            &f,
            &mut HeaderMap::new(),
            &format!("/?access_token={forged}")
        )
        .unwrap_err(),
        JwtStatus::VerificationFail
    );
    // A token in the header and another in the query: both must verify.
    assert_eq!(
        run(&f, &mut bearer(&good), &format!("/?access_token={forged}")).unwrap_err(),
        JwtStatus::VerificationFail
    );
    // Two Authorization headers: joined with ',', the first token after "Bearer " counts.
    let mut h = HeaderMap::new();
    h.append(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {forged}")).unwrap(),
    );
    h.append(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {good}")).unwrap(),
    );
    assert_eq!(
        run(&f, &mut h, "/").unwrap_err(),
        JwtStatus::VerificationFail
    );
    // Good first: passes, and every Authorization value is removed so the forged one never
    // reaches the application.
    let mut h = HeaderMap::new();
    h.append(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {good}")).unwrap(),
    );
    h.append(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {forged}")).unwrap(),
    );
    assert!(run(&f, &mut h, "/").is_ok());
    assert!(h.get(http::header::AUTHORIZATION).is_none());
}

#[test]
fn remote_keys_come_from_the_lookup_and_fail_when_unavailable() {
    let r = rsa();
    let remote = RemoteJwks {
        uri: "http://127.0.0.1:1/jwks".into(),
        cluster: "outbound|80||jwks".into(),
        timeout: Duration::from_secs(1),
        cache_duration: DEFAULT_JWKS_CACHE_DURATION,
    };
    let mut f = istio_filter("{}");
    if let Some(p) = f.providers.get_mut("origins-0") {
        p.jwks = JwksSource::Remote(remote.clone());
    }
    let mut h = bearer(&r.sign(&claims()));
    assert_eq!(f.remote_jwks_wanted(&h, "/"), vec![&remote]);
    assert!(f.remote_jwks_wanted(&HeaderMap::new(), "/").is_empty());
    let keys = Arc::new(Jwks::parse(&JwtSigner::jwks(&[&r])).unwrap());
    let method = Method::GET;
    let mut req = JwtRequest {
        headers: &mut h,
        path: "/",
        method: &method,
        now: NOW,
    };
    assert!(
        f.authenticate(&mut req, &|_| RemoteKeys::Ready(keys.clone()))
            .is_ok()
    );
    let s = run(&f, &mut bearer(&r.sign(&claims())), "/").unwrap_err();
    assert_eq!(s.to_string(), "Jwks remote fetch is failed");
}

#[test]
fn invalid_inline_jwks_fails_every_token() {
    assert_eq!(Jwks::parse("nope"), Err(JwtStatus::JwksParseError));
    assert_eq!(Jwks::parse("{}"), Err(JwtStatus::JwksNoKeys));
    assert_eq!(
        Jwks::parse(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#),
        Err(JwtStatus::JwksNoValidKeys)
    );
    let f = istio_filter("{}");
    assert_eq!(
        run(&f, &mut bearer(&rsa().sign(&claims())), "/").unwrap_err(),
        JwtStatus::JwksNoValidKeys
    );
}

#[test]
fn multi_issuer_requirement_and_cors_preflight() {
    let r = rsa();
    let e = JwtSigner::ec_generate("ec", "ES256").unwrap();
    let mut f = istio_filter(&JwtSigner::jwks(&[&r]));
    let mut p2 = JwtProvider::new(
        "origins-1",
        "https://second",
        JwksSource::Local(Some(Arc::new(
            Jwks::parse(&JwtSigner::jwks(&[&e])).unwrap(),
        ))),
    );
    p2.payload_in_metadata = Some("payload".into());
    f.providers.insert("origins-1".into(), p2);
    let inner = |n: &str| {
        JwtRequirement::Any(vec![
            JwtRequirement::Provider(n.into()),
            JwtRequirement::AllowMissing,
        ])
    };
    f.rules[0].requires = JwtRequirement::Any(vec![
        JwtRequirement::Provider("origins-0".into()),
        JwtRequirement::Provider("origins-1".into()),
        JwtRequirement::All(vec![inner("origins-0"), inner("origins-1")]),
    ]);
    assert!(run(&f, &mut bearer(&r.sign(&claims())), "/").is_ok());
    let second = e.sign(&json!({"iss": "https://second", "sub": "bob"}));
    let v = run(&f, &mut bearer(&second), "/").unwrap();
    assert_eq!(v.principal.unwrap().principal(), "https://second/bob");
    assert!(run(&f, &mut HeaderMap::new(), "/").is_ok());
    let forged = tamper(&r.sign(&claims()));
    assert_eq!(
        run(&f, &mut bearer(&forged), "/").unwrap_err(),
        JwtStatus::VerificationFail
    );
    // CORS preflight bypasses verification.
    let mut h = bearer("garbage");
    h.insert(http::header::ORIGIN, HeaderValue::from_static("http://a"));
    h.insert(
        http::header::ACCESS_CONTROL_REQUEST_METHOD,
        HeaderValue::from_static("GET"),
    );
    let method = Method::OPTIONS;
    let mut req = JwtRequest {
        headers: &mut h,
        path: "/",
        method: &method,
        now: NOW,
    };
    assert!(
        f.authenticate(&mut req, &|_| RemoteKeys::Unavailable)
            .is_ok()
    );
}

#[test]
fn claims_feed_the_rbac_engine() {
    use crate::authz::{
        AuthzRequest, DynamicMetadata, MetadataMatcher, Principal, StringMatcher, ValueMatcher,
    };
    let r = rsa();
    let mut f = istio_filter(&JwtSigner::jwks(&[&r]));
    f.istio_authn = true;
    let v = run(&f, &mut bearer(&r.sign(&claims())), "/").unwrap();
    let md = DynamicMetadata(v.metadata);
    // istiod's request principal: iss and sub under the jwt_authn payload.
    let principal = Principal::And(vec![
        Principal::Metadata(MetadataMatcher {
            filter: JWT_AUTHN_FILTER.into(),
            path: vec!["payload".into(), "iss".into()],
            value: ValueMatcher::String(StringMatcher::Exact(ISS.into(), false)),
            invert: false,
        }),
        Principal::Metadata(MetadataMatcher {
            filter: JWT_AUTHN_FILTER.into(),
            path: vec!["payload".into(), "sub".into()],
            value: ValueMatcher::String(StringMatcher::Exact("alice".into(), false)),
            invert: false,
        }),
    ]);
    let req = AuthzRequest::default();
    assert!(principal.matches(&req, &md));
    // request.auth.claims[scope] as istiod's extended matcher: string or list element.
    let scope = Principal::Metadata(MetadataMatcher {
        filter: JWT_AUTHN_FILTER.into(),
        path: vec!["payload".into(), "scope".into()],
        value: ValueMatcher::Or(vec![
            ValueMatcher::String(StringMatcher::Exact("write".into(), false)),
            ValueMatcher::ListOneOf(Box::new(ValueMatcher::String(StringMatcher::Exact(
                "write".into(),
                false,
            )))),
        ]),
        invert: false,
    });
    assert!(scope.matches(&req, &md));
    // Legacy istio_authn attributes.
    let legacy = Principal::Metadata(MetadataMatcher {
        filter: ISTIO_AUTHN_FILTER.into(),
        path: vec!["request.auth.principal".into()],
        value: ValueMatcher::String(StringMatcher::Exact(format!("{ISS}/alice"), false)),
        invert: false,
    });
    assert!(legacy.matches(&req, &md));
    assert!(!legacy.matches(&req, &DynamicMetadata::default()));
}

#[test]
fn extraction_details() {
    assert_eq!(extract_jwt("Bearer  abc.def.ghi, x", 7), "abc.def.ghi");
    assert_eq!(extract_jwt("Bearer ", 7), "Bearer ");
    assert_eq!(
        query_param("/p?a=1&access_token=x%2Ey&access_token=z", "access_token").as_deref(),
        Some("x.y")
    );
    assert_eq!(query_param("/p", "access_token"), None);
    assert_eq!(
        realm_uri("https", "h", &format!("/{}", "a".repeat(300))).len(),
        "https://h".len() + 256
    );
    assert_eq!(
        JwtStatus::Expired.details(),
        "jwt_authn_access_denied{Jwt_is_expired}"
    );
}
