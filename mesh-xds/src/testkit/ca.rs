//! The testkit CA: a real Istio CA (`istio.v1.auth.IstioCertificateService`) in memory, with a
//! self-signed ECDSA P-256 root `O=<trust domain>` like istiod's, projected-token-shaped JWTs
//! for callers, and helpers that issue certificates directly for tests.
//!
//! It follows istiod (FACTS.md b.3, b.6): the caller is authenticated from
//! `authorization: Bearer <token>` (missing or invalid → `Unauthenticated` "request
//! authenticate failure"), the issued SAN is the token's identity (the CSR's SANs are ignored;
//! its signature is checked), leaves get KeyUsage DigitalSignature|KeyEncipherment, EKU
//! serverAuth+clientAuth, `notBefore = now − 2 min`, `notAfter = now + ttl` (ttl ≤ 0 → 24h;
//! more than 90d → error), a critical URI SAN and an empty subject, and the response is
//! `[leaf, root]`, each PEM ending in `"\n"`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::{SpiffeId, WorkloadCertificate};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::ca::service::{CertificateAuthority, IstioCertificateServiceServer};
use crate::istio_proto::{IstioCertificateRequest, IstioCertificateResponse};

/// istiod's `ClockSkewGracePeriod`: leaves start this long before they are issued.
pub const CLOCK_SKEW_GRACE_PERIOD: Duration = Duration::from_secs(120);
/// `DEFAULT_WORKLOAD_CERT_TTL`: used when a request asks for `validity_duration <= 0`.
pub const DEFAULT_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// `MAX_WORKLOAD_CERT_TTL`: longer requests are rejected.
pub const MAX_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Root lifetime (`CITADEL_SELF_SIGNED_CA_CERT_TTL`, 10 years).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Audience of the projected token istio-agent sends.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// Lifetime of tokens from [`TestCa::token_for`] (the injector's `expirationSeconds`).
const TOKEN_TTL: Duration = Duration::from_secs(43200);

/// One `CreateCertificate` request the testkit CA received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaRequestRecord {
    /// The authenticated caller (`None` when authentication failed).
    pub identity: Option<SpiffeId>,
    /// The requested `validity_duration`, in seconds, as sent.
    pub validity_duration: i64,
    /// The `clusterid` metadata, if sent.
    pub cluster_id: Option<String>,
    /// The `CertSigner` entry of the request metadata, if sent.
    pub cert_signer: Option<String>,
    /// The URI SANs the CSR asked for (ignored for issuing, as istiod does).
    pub csr_uri_sans: Vec<String>,
    /// Every other ASCII request header (lower-case name → value), e.g. `CA_HEADER_*`
    /// extras; `authorization` is left out.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The gRPC outcome: `Ok` or the error code.
    pub outcome: tonic::Code,
}

/// A certificate issued directly by [`TestCa::issue`] / [`TestCa::issue_with_validity`].
#[derive(Clone)]
pub struct IssuedCert {
    /// Leaf PEM followed by the root PEM.
    pub chain_pem: String,
    /// Leaf PEM.
    pub leaf_pem: String,
    /// The leaf's PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Leaf DER.
    pub leaf_der: Vec<u8>,
    /// The leaf's PKCS#8 private key, DER.
    pub key_der: Vec<u8>,
    /// The root, DER.
    pub root_der: Vec<u8>,
    /// The identity in the leaf's URI SAN.
    pub identity: SpiffeId,
    /// Leaf `notBefore` (second precision).
    pub not_before: SystemTime,
    /// Leaf `notAfter` (second precision).
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity.to_string())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An in-memory Istio CA for tests. Cheap to clone; clones share the root, the token secret,
/// the request log and the failing switch.
#[derive(Clone)]
pub struct TestCa {
    inner: Arc<Inner>,
}

struct Inner {
    trust_domain: String,
    root_key: KeyPair,
    root_params: CertificateParams,
    root_der: Vec<u8>,
    root_pem: String,
    root_not_after: SystemTime,
    token_secret: [u8; 32],
    requests: Mutex<Vec<CaRequestRecord>>,
    failing: AtomicBool,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.inner.trust_domain)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn to_system_time(t: OffsetDateTime) -> SystemTime {
    SystemTime::from(t)
}

/// Truncates to whole seconds (X.509 time precision).
fn whole_seconds(t: SystemTime) -> OffsetDateTime {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    };
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl TestCa {
    /// A CA with a fresh self-signed ECDSA P-256 root, subject `O=<trust_domain>`, valid from
    /// an hour ago for ten years.
    pub fn new(trust_domain: &str) -> TestCa {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .expect("testkit CA: generating an ECDSA P-256 key cannot fail");
        let mut root_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        root_params.distinguished_name = dn;
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        root_params.not_before = whole_seconds(now - Duration::from_secs(3600));
        root_params.not_after = whole_seconds(now + ROOT_TTL);
        root_params.serial_number = Some(random_serial());
        let root = root_params
            .self_signed(&root_key)
            .expect("testkit CA: self-signing the root cannot fail");
        let mut token_secret = [0u8; 32];
        rand::rng().fill_bytes(&mut token_secret);
        TestCa {
            inner: Arc::new(Inner {
                trust_domain: trust_domain.to_owned(),
                root_not_after: to_system_time(root_params.not_after),
                root_der: root.der().as_ref().to_vec(),
                root_pem: root.pem(),
                root_key,
                root_params,
                token_secret,
                requests: Mutex::new(Vec::new()),
                failing: AtomicBool::new(false),
            }),
        }
    }

    /// The trust domain (root subject `O=`).
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The root certificate, PEM (what `istio-ca-root-cert` / `root-cert.pem` would hold).
    pub fn root_pem(&self) -> String {
        self.inner.root_pem.clone()
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> Vec<u8> {
        self.inner.root_der.clone()
    }

    /// A JWT shaped like a projected Kubernetes service-account token for
    /// `system:serviceaccount:<namespace>:<service_account>` with audience `istio-ca`, valid
    /// for 12 hours. Its signature is an HMAC-SHA256 only this CA (and its clones) verifies.
    pub fn token_for(&self, namespace: &str, service_account: &str) -> String {
        self.token_with(
            namespace,
            service_account,
            TOKEN_AUDIENCE,
            SystemTime::now() + TOKEN_TTL,
        )
    }

    /// Like [`TestCa::token_for`] with a chosen audience and expiry (for tests of rejected
    /// tokens).
    pub fn token_with(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        expires: SystemTime,
    ) -> String {
        let now = unix(SystemTime::now());
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "mesh-testkit"});
        let payload = serde_json::json!({
            "aud": [audience],
            "exp": unix(expires),
            "iat": now,
            "nbf": now,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account},
            },
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        });
        let signing_input = format!(
            "{}.{}",
            base64url_encode(header.to_string().as_bytes()),
            base64url_encode(payload.to_string().as_bytes())
        );
        let sig = self.hmac(signing_input.as_bytes());
        format!("{signing_input}.{}", base64url_encode(&sig))
    }

    fn hmac(&self, msg: &[u8]) -> Vec<u8> {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        match suite.tls13() {
            Some(s) => {
                let key = rustls::crypto::tls13::OkmBlock::new(&self.inner.token_secret);
                s.hkdf_provider.hmac_sign(&key, msg).as_ref().to_vec()
            }
            None => Vec::new(),
        }
    }

    /// Verifies a token from [`TestCa::token_for`] and returns the identity it authenticates.
    pub fn authenticate(&self, token: &str) -> Result<SpiffeId, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT (expected header.payload.signature)".into());
        };
        let sig = base64url_decode(s).ok_or("signature is not base64url")?;
        let expected = self.hmac(format!("{h}.{p}").as_bytes());
        if expected.is_empty() || !constant_time_eq(&sig, &expected) {
            return Err("signature does not verify".into());
        }
        let payload = base64url_decode(p).ok_or("payload is not base64url")?;
        let claims: serde_json::Value =
            serde_json::from_slice(&payload).map_err(|e| format!("payload is not JSON: {e}"))?;
        let aud_ok = match &claims["aud"] {
            serde_json::Value::String(a) => a == TOKEN_AUDIENCE,
            serde_json::Value::Array(a) => a.iter().any(|v| v == TOKEN_AUDIENCE),
            _ => false,
        };
        if !aud_ok {
            return Err(format!("audience is not {TOKEN_AUDIENCE}"));
        }
        let exp = claims["exp"].as_i64().ok_or("no exp claim")?;
        if exp <= unix(SystemTime::now()) {
            return Err("token expired".into());
        }
        let sub = claims["sub"].as_str().ok_or("no sub claim")?;
        let rest = sub
            .strip_prefix("system:serviceaccount:")
            .ok_or("sub is not a service account")?;
        let (ns, sa) = rest
            .split_once(':')
            .ok_or("sub is not system:serviceaccount:<ns>:<sa>")?;
        if ns.is_empty() || sa.is_empty() || sa.contains(':') {
            return Err("sub is not system:serviceaccount:<ns>:<sa>".into());
        }
        Ok(SpiffeId::new(&self.inner.trust_domain, ns, sa))
    }

    /// The gRPC service to mount on a `tonic::transport::Server`.
    pub fn service(&self) -> IstioCertificateServiceServer {
        IstioCertificateServiceServer::new(self.clone())
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<CaRequestRecord> {
        self.inner
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// While `true`, every request is answered `Unavailable` (a CA outage).
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.inner.root_params, &self.inner.root_key)
    }

    fn leaf_params(
        &self,
        sans: Vec<SanType>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertificateParams {
        let mut params = CertificateParams::default();
        // Empty subject: rcgen then marks the SAN extension critical, as istiod does.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = whole_seconds(not_before);
        params.not_after = whole_seconds(not_after.min(self.inner.root_not_after));
        params
    }

    fn uri_san(identity: &SpiffeId) -> Vec<SanType> {
        // SpiffeId's Display is ASCII, so this only drops a SAN for exotic input.
        identity
            .to_string()
            .try_into()
            .ok()
            .map(SanType::URI)
            .into_iter()
            .collect()
    }

    /// Issues a leaf for `identity` valid from 2 minutes ago for `ttl` (no TTL limit), with a
    /// fresh ECDSA P-256 key.
    pub fn issue(&self, identity: &SpiffeId, ttl: Duration) -> IssuedCert {
        let now = SystemTime::now();
        self.issue_with_validity(identity, now - CLOCK_SKEW_GRACE_PERIOD, now + ttl)
    }

    /// Issues a leaf for `identity` with an explicit validity window (for expired or
    /// not-yet-valid certificates).
    pub fn issue_with_validity(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> IssuedCert {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .expect("testkit CA: generating an ECDSA P-256 key cannot fail");
        let params = self.leaf_params(Self::uri_san(identity), not_before, not_after);
        let leaf = params
            .signed_by(&key, &self.issuer())
            .expect("testkit CA: signing a leaf with the root cannot fail");
        let leaf_pem = leaf.pem();
        IssuedCert {
            chain_pem: format!("{leaf_pem}{}", self.inner.root_pem),
            leaf_pem,
            key_pem: key.serialize_pem(),
            leaf_der: leaf.der().as_ref().to_vec(),
            key_der: key.serialize_der(),
            root_der: self.inner.root_der.clone(),
            identity: identity.clone(),
            not_before: to_system_time(params.not_before),
            not_after: to_system_time(params.not_after),
        }
    }

    /// A ready [`WorkloadCertificate`] for `identity` valid for `ttl`, chaining to this CA's
    /// root (for running a mesh without a CA round-trip).
    pub fn workload_certificate(&self, identity: &SpiffeId, ttl: Duration) -> WorkloadCertificate {
        let issued = self.issue(identity, ttl);
        WorkloadCertificate {
            chain: vec![issued.leaf_der],
            private_key: issued.key_der,
            roots: vec![issued.root_der],
            identity: issued.identity,
            not_before: issued.not_before,
            not_after: issued.not_after,
        }
    }

    /// A server certificate for `dns_names` (e.g. `istiod.istio-system.svc`) signed by this
    /// root: `(certificate chain PEM (leaf, root), PKCS#8 private key PEM)`, so a testkit
    /// control plane can serve TLS like istiod's :15012.
    pub fn server_identity(&self, dns_names: &[&str]) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .expect("testkit CA: generating an ECDSA P-256 key cannot fail");
        let sans = dns_names
            .iter()
            .filter_map(|n| (*n).try_into().ok().map(SanType::DnsName))
            .collect();
        let now = SystemTime::now();
        let params = self.leaf_params(sans, now - CLOCK_SKEW_GRACE_PERIOD, now + ROOT_TTL);
        let leaf = params
            .signed_by(&key, &self.issuer())
            .expect("testkit CA: signing a leaf with the root cannot fail");
        (
            format!("{}{}", leaf.pem(), self.inner.root_pem),
            key.serialize_pem(),
        )
    }

    fn record(&self, record: CaRequestRecord) {
        if let Ok(mut r) = self.inner.requests.lock() {
            r.push(record);
        }
    }

    fn sign_csr(
        &self,
        identity: &SpiffeId,
        csr: &CertificateSigningRequestParams,
        ttl: Duration,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let now = SystemTime::now();
        let params = self.leaf_params(
            Self::uri_san(identity),
            now - CLOCK_SKEW_GRACE_PERIOD,
            now + ttl,
        );
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer())
            .map_err(|e| tonic::Status::internal(format!("CSR signing error ({e})")))?;
        Ok(IstioCertificateResponse {
            cert_chain: vec![ensure_newline(leaf.pem()), ensure_newline(self.root_pem())],
        })
    }
}

fn ensure_newline(mut pem: String) -> String {
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem
}

fn csr_uri_sans(csr: &CertificateSigningRequestParams) -> Vec<String> {
    csr.params
        .subject_alt_names
        .iter()
        .filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID in the URI SAN of the verified TLS client certificate, if the caller
/// presented one (istiod's `ClientCertAuthenticator`).
fn client_certificate_identity<T>(request: &tonic::Request<T>) -> Option<SpiffeId> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri.parse::<SpiffeId>().ok(),
        _ => None,
    })
}

impl CertificateAuthority for TestCa {
    fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, tonic::Status> {
        let md = request.metadata();
        let cluster_id = md
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // istiod's authenticator order: the TLS client certificate (verified against the
        // root by the server) first, then the bearer token.
        let identity = client_certificate_identity(&request).map(Ok).or_else(|| {
            md.get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| self.authenticate(t.trim()))
        });
        let message = request.get_ref();
        let cert_signer = message
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("CertSigner"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let csr = CertificateSigningRequestParams::from_pem(&message.csr);
        let mut record = CaRequestRecord {
            identity: None,
            validity_duration: message.validity_duration,
            cluster_id,
            cert_signer,
            csr_uri_sans: csr.as_ref().map(csr_uri_sans).unwrap_or_default(),
            headers: md
                .iter()
                .filter_map(|kv| match kv {
                    tonic::metadata::KeyAndValueRef::Ascii(k, v)
                        if k.as_str() != "authorization" =>
                    {
                        v.to_str()
                            .ok()
                            .map(|v| (k.as_str().to_owned(), v.to_owned()))
                    }
                    _ => None,
                })
                .collect(),
            outcome: tonic::Code::Ok,
        };
        let result = (|| {
            if self.inner.failing.load(Ordering::SeqCst) {
                return Err(tonic::Status::unavailable(
                    "testkit CA is failing (set_failing)",
                ));
            }
            let identity = match identity {
                Some(Ok(id)) => id,
                Some(Err(reason)) => {
                    tracing::debug!(%reason, "testkit CA rejected the token");
                    return Err(tonic::Status::unauthenticated(
                        "request authenticate failure",
                    ));
                }
                None => {
                    return Err(tonic::Status::unauthenticated(
                        "request authenticate failure",
                    ));
                }
            };
            record.identity = Some(identity.clone());
            let csr = csr.map_err(|e| {
                tonic::Status::invalid_argument(format!("CSR signing error (invalid CSR: {e})"))
            })?;
            let ttl = if message.validity_duration <= 0 {
                DEFAULT_WORKLOAD_CERT_TTL
            } else {
                Duration::from_secs(message.validity_duration.unsigned_abs())
            };
            if ttl > MAX_WORKLOAD_CERT_TTL {
                return Err(tonic::Status::invalid_argument(format!(
                    "CSR signing error (requested TTL {}s is greater than the max allowed TTL {}s)",
                    ttl.as_secs(),
                    MAX_WORKLOAD_CERT_TTL.as_secs()
                )));
            }
            self.sign_csr(&identity, &csr, ttl)
        })();
        if let Err(status) = &result {
            record.outcome = status.code();
        }
        self.record(record);
        result
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(data: &[u8]) -> String {
    crate::secrets::pem::base64_encode(data, B64URL, false)
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = B64URL.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_roundtrip() {
        for len in 0..20 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
            assert_eq!(base64url_decode(&base64url_encode(&data)).unwrap(), data);
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
    }

    #[test]
    fn tokens_verify_only_with_their_ca() {
        let ca = TestCa::new("cluster.local");
        let token = ca.token_for("default", "reviews");
        assert_eq!(
            ca.authenticate(&token).unwrap(),
            SpiffeId::new("cluster.local", "default", "reviews")
        );
        let other = TestCa::new("cluster.local");
        assert!(other.authenticate(&token).is_err());
        let wrong_aud = ca.token_with("default", "reviews", "api", SystemTime::now() + TOKEN_TTL);
        assert!(ca.authenticate(&wrong_aud).is_err());
        let expired = ca.token_with(
            "default",
            "reviews",
            TOKEN_AUDIENCE,
            SystemTime::now() - Duration::from_secs(10),
        );
        assert!(ca.authenticate(&expired).is_err());
        // Tampering with the payload breaks the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = base64url_encode(
            br#"{"aud":["istio-ca"],"exp":99999999999,"sub":"system:serviceaccount:default:admin"}"#,
        );
        parts[1] = &forged;
        assert!(ca.authenticate(&parts.join(".")).is_err());
    }

    #[test]
    fn workload_certificate_is_self_consistent() {
        let ca = TestCa::new("example.org");
        let id = SpiffeId::new("example.org", "ns1", "sa1");
        let cert = ca.workload_certificate(&id, Duration::from_secs(3600));
        assert_eq!(cert.identity, id);
        assert_eq!(cert.roots, vec![ca.root_der()]);
        let life = cert.not_after.duration_since(cert.not_before).unwrap();
        assert!(life >= Duration::from_secs(3600 + 119) && life <= Duration::from_secs(3600 + 121));
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&cert.roots[0]).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(root.subject().to_string(), "O=example.org");
        assert_eq!(leaf.subject().iter().count(), 0);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
    }
}
