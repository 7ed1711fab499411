//! RequestAuthentication as istiod renders it: Envoy's `envoy.filters.http.jwt_authn` filter,
//! compiled by mesh-xds into [`JwtAuthn`] and evaluated here without I/O.
//!
//! Envoy's semantics, kept exactly (`source/extensions/filters/http/jwt_authn` and
//! `jwt_verify_lib`):
//! * The first rule whose `match` covers the request path picks the requirement; no rule
//!   matching means no verification.
//! * Requirements: `provider_name`, `provider_and_audiences`, `requires_any`, `requires_all`,
//!   `allow_missing`, `allow_missing_or_failed`, unset (allow all). istiod renders
//!   `requires_any {provider, allow_missing}` per issuer: a missing token passes (RBAC's
//!   request principals then decide), an invalid one is refused.
//! * Tokens come from each provider's `from_headers` (value prefix searched anywhere in the
//!   comma-joined header values, then the run of base64url characters after it) and
//!   `from_params`; with neither, from `Authorization: Bearer …` and `?access_token=`. Every
//!   extracted token must verify.
//! * Per token: parse, issuer, `exp`/`nbf` with a 60 s clock skew, audiences (`https://` and a
//!   trailing `/` ignored), then the signature against the provider's JWKS (RS256/384/512,
//!   PS256/384/512, ES256/ES384 through `ring`; `alg: none` and HMAC are refused).
//! * On success: `forward_payload_header`, `claim_to_headers`, the token header removed unless
//!   `forward`, and the payload under `payload_in_metadata` in the request's dynamic metadata
//!   (namespace [`JWT_AUTHN_FILTER`]), space-delimited claims split into lists — which is what
//!   istiod's RBAC request-principal and `request.auth.claims[...]` matchers read.
//! * Failure answers 401 (403 for audiences) with the status text as body, e.g.
//!   `Jwt verification fails`, and `www-authenticate: Bearer realm="<uri>", error="invalid_token"`
//!   ([`JwtStatus`]).
//!
//! Remote JWKS are fetched by the caller (mesh-tower); [`JwtAuthn::remote_jwks_wanted`] says
//! which a request needs and [`JwtAuthn::authenticate`] takes a lookup for them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, general_purpose};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::StringMatcher;

/// Dynamic-metadata namespace the JWT filter writes (`envoy.filters.http.jwt_authn`).
pub const JWT_AUTHN_FILTER: &str = "envoy.filters.http.jwt_authn";
/// Dynamic-metadata namespace of Istio's legacy authn filter (`istio_authn`).
pub const ISTIO_AUTHN_FILTER: &str = "istio_authn";
/// Envoy's default clock skew for `exp`/`nbf` (`kClockSkewInSecond`).
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;
/// Envoy's default `remote_jwks.cache_duration` (10 minutes).
pub const DEFAULT_JWKS_CACHE_DURATION: Duration = Duration::from_secs(600);
/// Envoy's header and query parameter used when a provider names no location.
pub const DEFAULT_HEADER_PREFIX: &str = "Bearer ";
/// The default query parameter (`access_token`).
pub const DEFAULT_QUERY_PARAM: &str = "access_token";
/// Envoy caps the path in the `www-authenticate` realm at 256 bytes.
const MAXIMUM_URI_LENGTH: usize = 256;

const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a request's JWT was refused: `jwt_verify_lib`'s status, whose text Envoy sends as the
/// 401 (403) body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)]
pub enum JwtStatus {
    #[error("Jwt is missing")]
    Missing,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBadBase64,
    #[error("Jwt header is an invalid JSON")]
    HeaderBadJson,
    #[error("Jwt header [alg] field is required and must be a string")]
    HeaderBadAlg,
    #[error("Jwt header [alg] is not supported")]
    HeaderNotImplementedAlg,
    #[error("Jwt header [kid] field is not a string")]
    HeaderBadKid,
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBadBase64,
    #[error("Jwt payload is an invalid JSON")]
    PayloadBadJson,
    #[error("Jwt payload [iss] field is not a string")]
    IssNotString,
    #[error("Jwt payload [sub] field is not a string")]
    SubNotString,
    #[error("Jwt payload [iat] field is not an integer")]
    IatNotInteger,
    #[error("Jwt payload [iat] field is not a positive integer")]
    IatNotPositive,
    #[error("Jwt payload [nbf] field is not an integer")]
    NbfNotInteger,
    #[error("Jwt payload [nbf] field is not a positive integer")]
    NbfNotPositive,
    #[error("Jwt payload [exp] field is not an integer")]
    ExpNotInteger,
    #[error("Jwt payload [exp] field is not a positive integer")]
    ExpNotPositive,
    #[error("Jwt payload [jti] field is not a string")]
    JtiNotString,
    #[error("Jwt payload [aud] field is not a string or string list")]
    AudNotString,
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBadBase64,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    #[error("Jwt verification fails")]
    VerificationFail,
    #[error("Jwks is an invalid JSON")]
    JwksParseError,
    #[error("Jwks does not have [keys] field")]
    JwksNoKeys,
    #[error("[keys] in Jwks is not an array")]
    JwksBadKeys,
    #[error("Jwks doesn't have any valid public key")]
    JwksNoValidKeys,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    JwksKidAlgMismatch,
    #[error("Jwks remote fetch is failed")]
    JwksFetchFail,
}

impl JwtStatus {
    /// The status Envoy answers with: 403 for [`JwtStatus::AudienceNotAllowed`], else 401.
    pub fn http_status(self) -> u16 {
        if self == JwtStatus::AudienceNotAllowed {
            403
        } else {
            401
        }
    }

    /// Envoy's `www-authenticate` value for a request to `uri` (scheme://host/path):
    /// `Bearer realm="<uri>"`, plus `, error="invalid_token"` unless the token is missing.
    pub fn www_authenticate(self, uri: &str) -> String {
        let mut v = format!("Bearer realm=\"{uri}\"");
        if self != JwtStatus::Missing {
            v.push_str(", error=\"invalid_token\"");
        }
        v
    }

    /// Envoy's response code details (`jwt_authn_access_denied{<text with _>}`).
    pub fn details(self) -> String {
        format!(
            "jwt_authn_access_denied{{{}}}",
            self.to_string().replace(' ', "_")
        )
    }
}

/// The realm URI Envoy puts into `www-authenticate`: `<scheme>://<host><path>`, the path
/// (query included) cut at 256 bytes.
pub fn realm_uri(scheme: &str, host: &str, path_and_query: &str) -> String {
    let mut end = path_and_query.len().min(MAXIMUM_URI_LENGTH);
    while !path_and_query.is_char_boundary(end) {
        end -= 1;
    }
    format!("{scheme}://{host}{}", &path_and_query[..end])
}

// ---------------------------------------------------------------------------------------------
// Model.

/// `JwtHeader`: a header a token is read from, with its value prefix (`Bearer `).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtHeaderLocation {
    /// Lower-case header name.
    pub name: HeaderName,
    /// `value_prefix` (empty: the whole value).
    pub value_prefix: String,
}

/// `RemoteJwks`: where a provider's keys are fetched from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteJwks {
    /// `http_uri.uri`.
    pub uri: String,
    /// `http_uri.cluster` (the Envoy cluster istiod names; mesh fetches the URI directly).
    pub cluster: String,
    /// `http_uri.timeout`.
    pub timeout: Duration,
    /// `cache_duration` (default 10 minutes).
    pub cache_duration: Duration,
}

/// Where a provider's keys come from.
#[derive(Clone, Debug, PartialEq)]
pub enum JwksSource {
    /// `local_jwks` (istiod inlines fetched keys here); `None`: the inline JWKS was invalid, so
    /// every token fails (`Jwks doesn't have any valid public key`), as in Envoy.
    Local(Option<Arc<Jwks>>),
    /// `remote_jwks`.
    Remote(RemoteJwks),
}

/// `JwtProvider`.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtProvider {
    /// The provider's name in `providers` (istiod: `origins-<n>`).
    pub name: String,
    /// `issuer` (empty: any issuer).
    pub issuer: String,
    /// `audiences` (empty: any audience).
    pub audiences: Vec<String>,
    /// The keys.
    pub jwks: JwksSource,
    /// `from_headers`.
    pub from_headers: Vec<JwtHeaderLocation>,
    /// `from_params`.
    pub from_params: Vec<String>,
    /// `forward`: keep the token header for the application.
    pub forward: bool,
    /// `forward_payload_header`.
    pub forward_payload_header: Option<HeaderName>,
    /// `pad_forward_payload_header`.
    pub pad_forward_payload_header: bool,
    /// `payload_in_metadata` (istiod: `payload`).
    pub payload_in_metadata: Option<String>,
    /// `header_in_metadata`.
    pub header_in_metadata: Option<String>,
    /// `normalize_payload_in_metadata.space_delimited_claims`.
    pub space_delimited_claims: Vec<String>,
    /// `claim_to_headers` (istiod's `outputClaimToHeaders`): (header, claim path `a.b`).
    pub claim_to_headers: Vec<(HeaderName, String)>,
    /// `clock_skew_seconds` (0: the default 60).
    pub clock_skew_seconds: u64,
}

impl JwtProvider {
    /// A provider for `issuer` with inline keys and the default token locations.
    pub fn new(name: &str, issuer: &str, jwks: JwksSource) -> Self {
        JwtProvider {
            name: name.into(),
            issuer: issuer.into(),
            audiences: Vec::new(),
            jwks,
            from_headers: Vec::new(),
            from_params: Vec::new(),
            forward: false,
            forward_payload_header: None,
            pad_forward_payload_header: false,
            payload_in_metadata: None,
            header_in_metadata: None,
            space_delimited_claims: Vec::new(),
            claim_to_headers: Vec::new(),
            clock_skew_seconds: 0,
        }
    }

    fn skew(&self) -> u64 {
        if self.clock_skew_seconds > 0 {
            self.clock_skew_seconds
        } else {
            DEFAULT_CLOCK_SKEW_SECONDS
        }
    }

    fn sanitized_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.forward_payload_header
            .iter()
            .chain(self.claim_to_headers.iter().map(|(h, _)| h))
    }
}

/// `JwtRequirement`.
#[derive(Clone, Debug, PartialEq)]
pub enum JwtRequirement {
    /// `provider_name`.
    Provider(String),
    /// `provider_and_audiences`.
    ProviderAndAudiences {
        /// The provider.
        provider: String,
        /// Audiences replacing the provider's.
        audiences: Vec<String>,
    },
    /// `requires_any`.
    Any(Vec<JwtRequirement>),
    /// `requires_all`.
    All(Vec<JwtRequirement>),
    /// `allow_missing`.
    AllowMissing,
    /// `allow_missing_or_failed`.
    AllowMissingOrFailed,
    /// Unset: every request passes.
    AllowAll,
}

/// The `match` of a `RequirementRule` (path forms only).
#[derive(Clone, Debug, PartialEq)]
pub enum RuleMatch {
    /// `prefix`.
    Prefix(String),
    /// `path` (exact).
    Path(String),
    /// `path_separated_prefix`.
    PathSeparatedPrefix(String),
    /// `safe_regex` over the path.
    Regex(StringMatcher),
}

impl RuleMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            RuleMatch::Prefix(p) => path.starts_with(p.as_str()),
            RuleMatch::Path(p) => path == p,
            RuleMatch::PathSeparatedPrefix(p) => {
                path == p || (path.starts_with(p.as_str()) && path[p.len()..].starts_with('/'))
            }
            RuleMatch::Regex(m) => m.matches(path),
        }
    }
}

/// `RequirementRule`.
#[derive(Clone, Debug, PartialEq)]
pub struct RequirementRule {
    /// `match`.
    pub matcher: RuleMatch,
    /// `requires` (unset: allow all).
    pub requires: JwtRequirement,
}

/// One `envoy.filters.http.jwt_authn` filter (`JwtAuthentication`).
#[derive(Clone, Debug, PartialEq)]
pub struct JwtAuthn {
    /// `providers`, by name (Envoy iterates them in map order; names sort).
    pub providers: BTreeMap<String, JwtProvider>,
    /// `rules`, in order.
    pub rules: Vec<RequirementRule>,
    /// `bypass_cors_preflight`.
    pub bypass_cors_preflight: bool,
    /// Istio's legacy `istio_authn` HTTP filter follows in the chain: also write its
    /// `request.auth.*` attributes.
    pub istio_authn: bool,
}

// Structural comparison; the only non-`Eq` leaf is a compiled regex compared by pattern.
impl Eq for JwtAuthn {}

impl JwtAuthn {
    /// What istiod renders for a RequestAuthentication with one issuer: `provider` on every
    /// path (`prefix: /`), requiring `{provider OR allow_missing}`, CORS preflights bypassed.
    pub fn istio_single(provider: JwtProvider) -> Self {
        let name = provider.name.clone();
        JwtAuthn {
            providers: BTreeMap::from([(name.clone(), provider)]),
            rules: vec![RequirementRule {
                matcher: RuleMatch::Prefix("/".into()),
                requires: JwtRequirement::Any(vec![
                    JwtRequirement::Provider(name),
                    JwtRequirement::AllowMissing,
                ]),
            }],
            bypass_cors_preflight: true,
            istio_authn: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens and keys.

/// A parsed (not yet verified) JWT.
#[derive(Clone, Debug)]
pub struct Jwt {
    /// Header `alg`.
    pub alg: String,
    /// Header `kid`.
    pub kid: Option<String>,
    /// `iss` (empty when absent).
    pub iss: String,
    /// `sub` (empty when absent).
    pub sub: String,
    /// `aud`, as a list.
    pub audiences: Vec<String>,
    /// `exp` (0: none).
    pub exp: u64,
    /// `nbf` (0: none).
    pub nbf: u64,
    /// The decoded header.
    pub header: Map<String, Value>,
    /// The decoded payload (the claims).
    pub payload: Map<String, Value>,
    signing_input_len: usize,
    payload_range: (usize, usize),
    signature: Vec<u8>,
    token: String,
}

const SUPPORTED_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "HS256",
    "HS384", "HS512", "EdDSA",
];

fn uint_claim(
    payload: &Map<String, Value>,
    key: &str,
    not_int: JwtStatus,
    not_pos: JwtStatus,
) -> Result<u64, JwtStatus> {
    match payload.get(key) {
        None => Ok(0),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(v),
            (None, Some(f)) if f >= 0.0 => Ok(f as u64),
            (None, Some(_)) => Err(not_pos),
            _ => Err(not_int),
        },
        Some(_) => Err(not_int),
    }
}

impl Jwt {
    /// Parses a compact JWS (`header.payload.signature`) with `jwt_verify_lib`'s checks.
    pub fn parse(token: &str) -> Result<Jwt, JwtStatus> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtStatus::BadFormat);
        };
        let header_bytes = BASE64URL
            .decode(h)
            .map_err(|_| JwtStatus::HeaderBadBase64)?;
        let header: Map<String, Value> =
            serde_json::from_slice(&header_bytes).map_err(|_| JwtStatus::HeaderBadJson)?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a.clone(),
            _ => return Err(JwtStatus::HeaderBadAlg),
        };
        if !SUPPORTED_ALGS.contains(&alg.as_str()) {
            return Err(JwtStatus::HeaderNotImplementedAlg);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(JwtStatus::HeaderBadKid),
        };
        let payload_bytes = BASE64URL
            .decode(p)
            .map_err(|_| JwtStatus::PayloadBadBase64)?;
        let payload: Map<String, Value> =
            serde_json::from_slice(&payload_bytes).map_err(|_| JwtStatus::PayloadBadJson)?;
        let string_claim = |key: &str, err| match payload.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(err),
        };
        let iss = string_claim("iss", JwtStatus::IssNotString)?;
        let sub = string_claim("sub", JwtStatus::SubNotString)?;
        string_claim("jti", JwtStatus::JtiNotString)?;
        uint_claim(
            &payload,
            "iat",
            JwtStatus::IatNotInteger,
            JwtStatus::IatNotPositive,
        )?;
        let nbf = uint_claim(
            &payload,
            "nbf",
            JwtStatus::NbfNotInteger,
            JwtStatus::NbfNotPositive,
        )?;
        let exp = uint_claim(
            &payload,
            "exp",
            JwtStatus::ExpNotInteger,
            JwtStatus::ExpNotPositive,
        )?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned).ok_or(JwtStatus::AudNotString))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(JwtStatus::AudNotString),
        };
        let signature = BASE64URL
            .decode(s)
            .map_err(|_| JwtStatus::SignatureBadBase64)?;
        Ok(Jwt {
            alg,
            kid,
            iss,
            sub,
            audiences,
            exp,
            nbf,
            header,
            payload,
            signing_input_len: h.len() + 1 + p.len(),
            payload_range: (h.len() + 1, h.len() + 1 + p.len()),
            signature,
            token: token.to_owned(),
        })
    }

    /// The payload as sent (base64url, no padding).
    pub fn payload_base64url(&self) -> &str {
        &self.token[self.payload_range.0..self.payload_range.1]
    }

    /// `exp`/`nbf` against `now` (Unix seconds) with `skew` seconds of tolerance.
    pub fn verify_time(&self, now: u64, skew: u64) -> Result<(), JwtStatus> {
        if now.saturating_add(skew) < self.nbf {
            return Err(JwtStatus::NotYetValid);
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Err(JwtStatus::Expired);
        }
        Ok(())
    }

    /// Verifies the signature with a key of `jwks` (keys whose `kid` or `alg` differ from the
    /// token's are skipped): `JwksKidAlgMismatch` when none was eligible, `VerificationFail`
    /// when none verified.
    pub fn verify_signature(&self, jwks: &Jwks) -> Result<(), JwtStatus> {
        let message = &self.token.as_bytes()[..self.signing_input_len];
        let mut matched = false;
        for jwk in &jwks.keys {
            if let (Some(tk), Some(kk)) = (&self.kid, &jwk.kid)
                && tk != kk
            {
                continue;
            }
            if jwk.alg.as_ref().is_some_and(|a| *a != self.alg) {
                continue;
            }
            matched = true;
            if jwk.verify(&self.alg, message, &self.signature) {
                return Ok(());
            }
        }
        Err(if matched {
            JwtStatus::VerificationFail
        } else {
            JwtStatus::JwksKidAlgMismatch
        })
    }
}

/// An elliptic curve of an `EC` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EcCurve {
    P256,
    P384,
    /// Parsed but not verifiable here (`ring` has no P-521): tokens fail.
    P521,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum JwkKey {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec { curve: EcCurve, point: Vec<u8> },
}

/// One public key of a [`Jwks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwk {
    kid: Option<String>,
    alg: Option<String>,
    key: JwkKey,
}

impl Jwk {
    fn verify(&self, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature as sig;
        match &self.key {
            JwkKey::Rsa { n, e } => {
                let params: &sig::RsaParameters = match alg {
                    "RS256" => &sig::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &sig::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &sig::RSA_PKCS1_2048_8192_SHA512,
                    "PS256" => &sig::RSA_PSS_2048_8192_SHA256,
                    "PS384" => &sig::RSA_PSS_2048_8192_SHA384,
                    "PS512" => &sig::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                sig::RsaPublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                }
                .verify(params, message, signature)
                .is_ok()
            }
            JwkKey::Ec { curve, point } => {
                let algorithm: &dyn sig::VerificationAlgorithm = match (alg, curve) {
                    ("ES256", EcCurve::P256) => &sig::ECDSA_P256_SHA256_FIXED,
                    ("ES384", EcCurve::P384) => &sig::ECDSA_P384_SHA384_FIXED,
                    _ => return false,
                };
                sig::UnparsedPublicKey::new(algorithm, point)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

/// A JSON Web Key Set: the RSA and EC public keys usable for verification.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

fn b64_field(key: &Map<String, Value>, name: &str) -> Option<Vec<u8>> {
    let v = key.get(name)?.as_str()?;
    BASE64URL.decode(v).ok()
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros.min(v.len().saturating_sub(1)));
    v
}

fn parse_jwk(key: &Map<String, Value>) -> Option<Jwk> {
    let kid = match key.get("kid") {
        Some(Value::String(k)) => Some(k.clone()),
        _ => None,
    };
    let alg = match key.get("alg") {
        Some(Value::String(a)) => Some(a.clone()),
        None => None,
        Some(_) => return None,
    };
    let parsed = match key.get("kty")?.as_str()? {
        "RSA" => {
            if alg
                .as_deref()
                .is_some_and(|a| !a.starts_with("RS") && !a.starts_with("PS"))
            {
                return None;
            }
            let n = strip_leading_zeros(b64_field(key, "n")?);
            let e = strip_leading_zeros(b64_field(key, "e")?);
            if n.is_empty() || e.is_empty() {
                return None;
            }
            JwkKey::Rsa { n, e }
        }
        "EC" => {
            if alg.as_deref().is_some_and(|a| !a.starts_with("ES")) {
                return None;
            }
            let crv = match key.get("crv") {
                Some(Value::String(c)) => c.as_str(),
                None => match alg.as_deref() {
                    Some("ES384") => "P-384",
                    Some("ES512") => "P-521",
                    _ => "P-256",
                },
                Some(_) => return None,
            };
            let (curve, len) = match crv {
                "P-256" => (EcCurve::P256, 32),
                "P-384" => (EcCurve::P384, 48),
                "P-521" => (EcCurve::P521, 66),
                _ => return None,
            };
            let x = b64_field(key, "x")?;
            let y = b64_field(key, "y")?;
            if x.len() != len || y.len() != len {
                return None;
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            JwkKey::Ec { curve, point }
        }
        // `oct` (HMAC) and `OKP` (EdDSA) keys are not supported by mesh: skipped.
        _ => return None,
    };
    Some(Jwk {
        kid,
        alg,
        key: parsed,
    })
}

impl Jwks {
    /// Parses `{"keys": [...]}`; keys mesh cannot use are skipped; an error when none is left.
    pub fn parse(json: &str) -> Result<Jwks, JwtStatus> {
        let v: Value = serde_json::from_str(json).map_err(|_| JwtStatus::JwksParseError)?;
        let keys = match v.get("keys") {
            None => return Err(JwtStatus::JwksNoKeys),
            Some(Value::Array(k)) => k,
            Some(_) => return Err(JwtStatus::JwksBadKeys),
        };
        let keys: Vec<Jwk> = keys
            .iter()
            .filter_map(|k| k.as_object().and_then(parse_jwk))
            .collect();
        if keys.is_empty() {
            return Err(JwtStatus::JwksNoValidKeys);
        }
        Ok(Jwks { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no usable keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Extraction.

/// Which issuers may use a token location (an empty issuer allows all).
#[derive(Clone, Debug, Default)]
struct IssuerChecker {
    allow_all: bool,
    issuers: Vec<String>,
}

impl IssuerChecker {
    fn add(&mut self, issuer: &str) {
        if issuer.is_empty() {
            self.allow_all = true;
        } else if !self.issuers.iter().any(|i| i == issuer) {
            self.issuers.push(issuer.to_owned());
        }
    }

    fn allows(&self, issuer: &str) -> bool {
        self.allow_all || self.issuers.iter().any(|i| i == issuer)
    }
}

#[derive(Debug)]
struct TokenAt {
    token: String,
    issuers: IssuerChecker,
    /// The header to remove when the token is not forwarded.
    header: Option<HeaderName>,
}

const JWT_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";

/// The run of base64url characters (and dots) at or after `after`; the whole value if none.
fn extract_jwt(value: &str, after: usize) -> &str {
    let bytes = value.as_bytes();
    let Some(start) = (after..bytes.len()).find(|&i| JWT_CHARS.contains(&bytes[i])) else {
        return value;
    };
    let end = (start..bytes.len())
        .find(|&i| !JWT_CHARS.contains(&bytes[i]))
        .unwrap_or(bytes.len());
    &value[start..end]
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The first value of each query parameter, percent-decoded.
fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Token locations of a set of providers (Envoy's `Extractor`).
#[derive(Debug, Default)]
struct Locations {
    /// (header + prefix) → (header, prefix, issuers), in key order as Envoy's `std::map`.
    headers: BTreeMap<String, (HeaderName, String, IssuerChecker)>,
    params: BTreeMap<String, IssuerChecker>,
    sanitize: Vec<HeaderName>,
}

impl Locations {
    fn add(&mut self, p: &JwtProvider) {
        let mut add_header = |name: &HeaderName, prefix: &str| {
            self.headers
                .entry(format!("{}{prefix}", name.as_str()))
                .or_insert_with(|| (name.clone(), prefix.to_owned(), IssuerChecker::default()))
                .2
                .add(&p.issuer);
        };
        for h in &p.from_headers {
            add_header(&h.name, &h.value_prefix);
        }
        if p.from_headers.is_empty() && p.from_params.is_empty() {
            add_header(&http::header::AUTHORIZATION, DEFAULT_HEADER_PREFIX);
            self.params
                .entry(DEFAULT_QUERY_PARAM.to_owned())
                .or_default()
                .add(&p.issuer);
        }
        for q in &p.from_params {
            self.params.entry(q.clone()).or_default().add(&p.issuer);
        }
        self.sanitize.extend(p.sanitized_headers().cloned());
    }

    fn extract(&self, headers: &HeaderMap, path: &str) -> Vec<TokenAt> {
        let mut out = Vec::new();
        for (name, prefix, issuers) in self.headers.values() {
            let mut values = headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                continue;
            }
            let joined = values
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(",");
            let token = if prefix.is_empty() {
                joined
            } else {
                match joined.find(prefix.as_str()) {
                    None => continue,
                    Some(pos) => extract_jwt(&joined, pos + prefix.len()).to_owned(),
                }
            };
            out.push(TokenAt {
                token,
                issuers: issuers.clone(),
                header: Some(name.clone()),
            });
        }
        if !self.params.is_empty() {
            for (param, issuers) in &self.params {
                if let Some(token) = query_param(path, param) {
                    out.push(TokenAt {
                        token,
                        issuers: issuers.clone(),
                        header: None,
                    });
                }
            }
        }
        out
    }

    fn sanitize(&self, headers: &mut HeaderMap) {
        for h in &self.sanitize {
            headers.remove(h);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification.

/// The keys a remote provider has right now (the caller's cache).
#[derive(Clone, Debug)]
pub enum RemoteKeys {
    /// Fetched and fresh.
    Ready(Arc<Jwks>),
    /// Not fetched, expired, or the fetch failed: tokens fail with `Jwks remote fetch is failed`.
    Unavailable,
}

/// A verified token's identity: Istio's request principal `<iss>/<sub>` and the claims.
/// mesh-tower puts it into the request's extensions for the application.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestPrincipal {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// The payload.
    pub claims: Arc<Map<String, Value>>,
}

impl RequestPrincipal {
    /// `<iss>/<sub>`, as AuthorizationPolicy `requestPrincipals` name it.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }
}

/// What a passed request carries on: the dynamic metadata the filter wrote (namespace →
/// struct) and the principal of the last verified token.
#[derive(Clone, Debug, Default)]
pub struct JwtVerified {
    /// `envoy.filters.http.jwt_authn` (and `istio_authn`) metadata.
    pub metadata: Map<String, Value>,
    /// The last verified token's principal.
    pub principal: Option<RequestPrincipal>,
}

/// The request as the JWT filter sees it.
#[derive(Debug)]
pub struct JwtRequest<'a> {
    /// Request headers (tokens are removed and payload/claim headers added in place).
    pub headers: &'a mut HeaderMap,
    /// `:path` with query.
    pub path: &'a str,
    /// `:method`.
    pub method: &'a http::Method,
    /// Now, Unix seconds.
    pub now: u64,
}

struct Ctx<'r, 'a, 'k> {
    req: &'r mut JwtRequest<'a>,
    remote: &'k dyn Fn(&RemoteJwks) -> RemoteKeys,
    extracted: Map<String, Value>,
    principal: Option<RequestPrincipal>,
}

fn sanitize_audience(a: &str) -> &str {
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

fn audiences_allowed(config: &[String], jwt: &[String]) -> bool {
    config.is_empty()
        || jwt.iter().any(|j| {
            config
                .iter()
                .any(|c| sanitize_audience(c) == sanitize_audience(j))
        })
}

/// A claim at `a.b.c` in the payload.
fn claim_at<'v>(payload: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let mut parts = path.split('.');
    let mut at = payload.get(parts.next()?)?;
    for p in parts {
        at = at.as_object()?.get(p)?;
    }
    Some(at)
}

/// A claim rendered for `claim_to_headers`: strings as they are, integral numbers without a
/// fraction, booleans, and structs/lists as base64 of their JSON.
fn claim_header_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(f)) => format!("{f:.6}"),
            _ => n.to_string(),
        }),
        Value::Bool(b) => Some(b.to_string()),
        Value::Object(_) | Value::Array(_) => {
            serde_json::to_vec(v).ok().map(|j| STANDARD.encode(j))
        }
        Value::Null => None,
    }
    .filter(|s| !s.is_empty())
}

impl JwtAuthn {
    /// The requirement for a request path (query ignored); `None`: no rule matches.
    pub fn requirement_for(&self, path: &str) -> Option<&JwtRequirement> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        self.rules
            .iter()
            .find(|r| r.matcher.matches(path))
            .map(|r| &r.requires)
    }

    /// The remote JWKS a request will need: those of remote providers with a token at one
    /// of their locations. The caller makes them available (fetching when not cached) before
    /// [`JwtAuthn::authenticate`].
    pub fn remote_jwks_wanted(&self, headers: &HeaderMap, path: &str) -> Vec<&RemoteJwks> {
        if self.requirement_for(path).is_none() {
            return Vec::new();
        }
        self.providers
            .values()
            .filter_map(|p| match &p.jwks {
                JwksSource::Remote(r) => {
                    let mut l = Locations::default();
                    l.add(p);
                    (!l.extract(headers, path).is_empty()).then_some(r)
                }
                JwksSource::Local(_) => None,
            })
            .collect()
    }

    /// Runs the filter on a request. `Ok`: the request goes on with the metadata written;
    /// `Err`: Envoy's local reply status.
    pub fn authenticate(
        &self,
        req: &mut JwtRequest<'_>,
        remote: &dyn Fn(&RemoteJwks) -> RemoteKeys,
    ) -> Result<JwtVerified, JwtStatus> {
        if self.bypass_cors_preflight
            && req.method == http::Method::OPTIONS
            && req.headers.contains_key(http::header::ORIGIN)
            && req
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Ok(JwtVerified::default());
        }
        let Some(requirement) = self.requirement_for(req.path) else {
            return Ok(JwtVerified::default());
        };
        let mut ctx = Ctx {
            req,
            remote,
            extracted: Map::new(),
            principal: None,
        };
        let status = self.verify(requirement, &mut ctx);
        let mut metadata = Map::new();
        if !ctx.extracted.is_empty() {
            if self.istio_authn
                && let Some(p) = &ctx.principal
            {
                metadata.insert(ISTIO_AUTHN_FILTER.to_owned(), istio_authn_attributes(p));
            }
            metadata.insert(JWT_AUTHN_FILTER.to_owned(), Value::Object(ctx.extracted));
        }
        match status {
            None => Ok(JwtVerified {
                metadata,
                principal: ctx.principal,
            }),
            Some(s) => Err(s),
        }
    }

    /// `None`: OK.
    fn verify(&self, r: &JwtRequirement, ctx: &mut Ctx<'_, '_, '_>) -> Option<JwtStatus> {
        match r {
            JwtRequirement::AllowAll => None,
            JwtRequirement::Provider(name) => self.provider_verify(name, None, ctx),
            JwtRequirement::ProviderAndAudiences {
                provider,
                audiences,
            } => self.provider_verify(provider, Some(audiences), ctx),
            JwtRequirement::AllowMissing => self.any_provider_verify(false, true, ctx),
            JwtRequirement::AllowMissingOrFailed => self.any_provider_verify(true, false, ctx),
            JwtRequirement::All(children) => children.iter().find_map(|c| self.verify(c, ctx)),
            JwtRequirement::Any(children) => {
                let allow_failed = children.contains(&JwtRequirement::AllowMissingOrFailed);
                let allow_missing = children.contains(&JwtRequirement::AllowMissing);
                let verifiers: Vec<&JwtRequirement> = children
                    .iter()
                    .filter(|c| {
                        !matches!(
                            c,
                            JwtRequirement::AllowMissing | JwtRequirement::AllowMissingOrFailed
                        )
                    })
                    .collect();
                if verifiers.is_empty() {
                    if allow_failed {
                        return self.any_provider_verify(true, false, ctx);
                    }
                    if allow_missing {
                        return self.any_provider_verify(false, true, ctx);
                    }
                    return Some(JwtStatus::Missing);
                }
                let mut final_status = JwtStatus::Missing;
                for v in verifiers {
                    match self.verify(v, ctx) {
                        None => return None,
                        Some(s) => {
                            if (s != JwtStatus::Missing && s != JwtStatus::UnknownIssuer)
                                || final_status == JwtStatus::Missing
                            {
                                final_status = s;
                            }
                        }
                    }
                }
                if allow_failed || (allow_missing && final_status == JwtStatus::Missing) {
                    None
                } else {
                    Some(final_status)
                }
            }
        }
    }

    fn provider_verify(
        &self,
        name: &str,
        audiences: Option<&Vec<String>>,
        ctx: &mut Ctx<'_, '_, '_>,
    ) -> Option<JwtStatus> {
        // Translation checks every named provider exists; a missing one verifies nothing.
        let Some(provider) = self.providers.get(name) else {
            return Some(JwtStatus::UnknownIssuer);
        };
        let mut locations = Locations::default();
        locations.add(provider);
        locations.sanitize(ctx.req.headers);
        let mut tokens = locations.extract(ctx.req.headers, ctx.req.path);
        if tokens.is_empty() {
            return Some(JwtStatus::Missing);
        }
        while let Some(token) = tokens.pop() {
            let aud = audiences.map(Vec::as_slice);
            if let Err(s) = self.verify_token(&token, Some(provider), aud, ctx) {
                return Some(s);
            }
        }
        None
    }

    fn any_provider_verify(
        &self,
        allow_failed: bool,
        allow_missing: bool,
        ctx: &mut Ctx<'_, '_, '_>,
    ) -> Option<JwtStatus> {
        let mut locations = Locations::default();
        for p in self.providers.values() {
            locations.add(p);
        }
        locations.sanitize(ctx.req.headers);
        let mut tokens = locations.extract(ctx.req.headers, ctx.req.path);
        let mut status = Err(JwtStatus::Missing);
        while let Some(token) = tokens.pop() {
            status = self.verify_token(&token, None, None, ctx);
        }
        match status {
            Ok(()) => None,
            Err(_) if allow_failed => None,
            Err(JwtStatus::Missing) if allow_missing => None,
            Err(s) => Some(s),
        }
    }

    fn find_by_issuer(&self, iss: &str) -> Option<&JwtProvider> {
        self.providers
            .values()
            .find(|p| p.issuer == iss)
            .or_else(|| self.providers.values().find(|p| p.issuer.is_empty()))
    }

    fn verify_token(
        &self,
        at: &TokenAt,
        provider: Option<&JwtProvider>,
        audiences: Option<&[String]>,
        ctx: &mut Ctx<'_, '_, '_>,
    ) -> Result<(), JwtStatus> {
        let jwt = Jwt::parse(&at.token)?;
        if !at.issuers.allows(&jwt.iss) {
            return Err(JwtStatus::UnknownIssuer);
        }
        let provider = match provider {
            Some(p) => p,
            None => self
                .find_by_issuer(&jwt.iss)
                .ok_or(JwtStatus::UnknownIssuer)?,
        };
        jwt.verify_time(ctx.req.now, provider.skew())?;
        if !audiences_allowed(audiences.unwrap_or(&provider.audiences), &jwt.audiences) {
            return Err(JwtStatus::AudienceNotAllowed);
        }
        match &provider.jwks {
            JwksSource::Local(None) => return Err(JwtStatus::JwksNoValidKeys),
            JwksSource::Local(Some(keys)) => jwt.verify_signature(keys)?,
            JwksSource::Remote(r) => match (ctx.remote)(r) {
                RemoteKeys::Ready(keys) => jwt.verify_signature(&keys)?,
                RemoteKeys::Unavailable => return Err(JwtStatus::JwksFetchFail),
            },
        }
        self.good_jwt(jwt, at, provider, ctx);
        Ok(())
    }

    fn good_jwt(&self, jwt: Jwt, at: &TokenAt, provider: &JwtProvider, ctx: &mut Ctx<'_, '_, '_>) {
        let headers = &mut *ctx.req.headers;
        if let Some(h) = &provider.forward_payload_header {
            let mut payload = jwt.payload_base64url().to_owned();
            if provider.pad_forward_payload_header {
                while !payload.len().is_multiple_of(4) {
                    payload.push('=');
                }
            }
            if let Ok(v) = HeaderValue::from_str(&payload) {
                headers.append(h.clone(), v);
            }
        }
        for (header, claim) in &provider.claim_to_headers {
            if let Some(v) = claim_at(&jwt.payload, claim)
                .and_then(claim_header_value)
                .and_then(|v| HeaderValue::from_str(&v).ok())
            {
                headers.append(header.clone(), v);
            }
        }
        if !provider.forward
            && let Some(h) = &at.header
        {
            headers.remove(h);
        }
        if let Some(key) = &provider.header_in_metadata {
            ctx.extracted
                .insert(key.clone(), Value::Object(jwt.header.clone()));
        }
        let mut payload = jwt.payload;
        if let Some(key) = &provider.payload_in_metadata {
            let mut normalized = payload.clone();
            for claim in &provider.space_delimited_claims {
                if let Some(Value::String(s)) = payload.get(claim) {
                    let list = s
                        .split(' ')
                        .filter(|p| !p.is_empty())
                        .map(|p| Value::String(p.to_owned()))
                        .collect();
                    normalized.insert(claim.clone(), Value::Array(list));
                }
            }
            ctx.extracted.insert(key.clone(), Value::Object(normalized));
        }
        ctx.principal = Some(RequestPrincipal {
            issuer: jwt.iss,
            subject: jwt.sub,
            claims: Arc::new(std::mem::take(&mut payload)),
        });
    }
}

/// The attributes Istio's legacy `istio_authn` filter derived from the origin JWT:
/// `request.auth.principal` (`iss/sub`), `request.auth.audiences`, `request.auth.presenter`,
/// `request.auth.claims` (each claim as a list of strings) and `request.auth.raw_claims`.
fn istio_authn_attributes(p: &RequestPrincipal) -> Value {
    let mut out = Map::new();
    out.insert(
        "request.auth.principal".into(),
        Value::String(p.principal()),
    );
    let mut claims = Map::new();
    for (k, v) in p.claims.iter() {
        let list: Vec<Value> = match v {
            Value::String(s) => vec![Value::String(s.clone())],
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(|s| Value::String(s.to_owned())))
                .collect(),
            _ => continue,
        };
        claims.insert(k.clone(), Value::Array(list));
    }
    if let Some(Value::Array(aud)) = claims.get("aud")
        && let Some(Value::String(first)) = aud.first()
    {
        out.insert(
            "request.auth.audiences".into(),
            Value::String(first.clone()),
        );
    }
    if let Some(Value::String(azp)) = p.claims.get("azp") {
        out.insert("request.auth.presenter".into(), Value::String(azp.clone()));
    }
    out.insert(
        "request.auth.raw_claims".into(),
        Value::String(serde_json::to_string(&*p.claims).unwrap_or_default()),
    );
    out.insert("request.auth.claims".into(), Value::Object(claims));
    Value::Object(out)
}

/// Base64url without padding, as JWTs encode their parts (for building tokens in tests and
/// tooling).
pub fn base64url(data: &[u8]) -> String {
    general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Signs JWTs (RS256/384/512, PS256/384/512 with an RSA PKCS#8 key; ES256/ES384 with a
/// generated ECDSA key) and publishes the matching JWK: for the testkit, tests and
/// benchmarks. mesh itself only verifies.
pub struct JwtSigner {
    key: SignerKey,
    kid: String,
    alg: &'static str,
}

enum SignerKey {
    Rsa(
        ring::rsa::KeyPair,
        &'static dyn ring::signature::RsaEncoding,
    ),
    Ec(ring::signature::EcdsaKeyPair),
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// An RSA signer from a PKCS#8 PEM private key; `alg` is `RS256`…`PS512`.
    pub fn rsa_from_pkcs8_pem(pem: &str, kid: &str, alg: &str) -> Result<Self, String> {
        use ring::signature as sig;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body.trim()).map_err(|e| e.to_string())?;
        let kp = ring::rsa::KeyPair::from_pkcs8(&der).map_err(|e| e.to_string())?;
        let (alg, enc): (&'static str, &'static dyn sig::RsaEncoding) = match alg {
            "RS256" => ("RS256", &sig::RSA_PKCS1_SHA256),
            "RS384" => ("RS384", &sig::RSA_PKCS1_SHA384),
            "RS512" => ("RS512", &sig::RSA_PKCS1_SHA512),
            "PS256" => ("PS256", &sig::RSA_PSS_SHA256),
            "PS384" => ("PS384", &sig::RSA_PSS_SHA384),
            "PS512" => ("PS512", &sig::RSA_PSS_SHA512),
            other => return Err(format!("not an RSA algorithm: {other}")),
        };
        Ok(JwtSigner {
            key: SignerKey::Rsa(kp, enc),
            kid: kid.into(),
            alg,
        })
    }

    /// A fresh ECDSA signer; `alg` is `ES256` or `ES384`.
    pub fn ec_generate(kid: &str, alg: &str) -> Result<Self, String> {
        use ring::signature as sig;
        let (alg, scheme): (&'static str, &'static sig::EcdsaSigningAlgorithm) = match alg {
            "ES256" => ("ES256", &sig::ECDSA_P256_SHA256_FIXED_SIGNING),
            "ES384" => ("ES384", &sig::ECDSA_P384_SHA384_FIXED_SIGNING),
            other => return Err(format!("not an EC algorithm mesh signs: {other}")),
        };
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(scheme, &rng).map_err(|e| e.to_string())?;
        let kp = sig::EcdsaKeyPair::from_pkcs8(scheme, pkcs8.as_ref(), &rng)
            .map_err(|e| e.to_string())?;
        Ok(JwtSigner {
            key: SignerKey::Ec(kp),
            kid: kid.into(),
            alg,
        })
    }

    /// The algorithm (`RS256`, `ES256`, …).
    pub fn alg(&self) -> &str {
        self.alg
    }

    /// The public JWK (`kty`, `kid`, `alg`, `n`/`e` or `crv`/`x`/`y`).
    pub fn jwk(&self) -> Value {
        use ring::signature::KeyPair;
        match &self.key {
            SignerKey::Rsa(kp, _) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = kp.public().into();
                serde_json::json!({"kty": "RSA", "kid": self.kid, "alg": self.alg,
                    "n": base64url(&c.n), "e": base64url(&c.e)})
            }
            SignerKey::Ec(kp) => {
                let point = kp.public_key().as_ref();
                let len = (point.len() - 1) / 2;
                let crv = if len == 32 { "P-256" } else { "P-384" };
                serde_json::json!({"kty": "EC", "kid": self.kid, "alg": self.alg, "crv": crv,
                    "x": base64url(&point[1..1 + len]), "y": base64url(&point[1 + len..])})
            }
        }
    }

    /// A JWKS document with the signers' public keys.
    pub fn jwks(signers: &[&JwtSigner]) -> String {
        serde_json::json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
    }

    /// A token over `claims` with the header `{"alg", "kid", "typ": "JWT"}`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = serde_json::json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"});
        self.sign_with_header(&header, claims)
    }

    /// A token over `claims` with an arbitrary header (signed with this key regardless of the
    /// header's `alg`: for refusal tests).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(claims.to_string().as_bytes())
        );
        let rng = ring::rand::SystemRandom::new();
        let sig = match &self.key {
            SignerKey::Rsa(kp, enc) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                if kp.sign(*enc, &rng, input.as_bytes(), &mut sig).is_err() {
                    sig.clear();
                }
                sig
            }
            SignerKey::Ec(kp) => kp
                .sign(&rng, input.as_bytes())
                .map(|s| s.as_ref().to_vec())
                .unwrap_or_default(),
        };
        format!("{input}.{}", base64url(&sig))
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
