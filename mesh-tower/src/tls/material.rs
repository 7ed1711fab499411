//! The parsed form of the workload certificate that handshakes use: the signing key wrapped in
//! a rustls [`CertifiedKey`] and the trust bundle as webpki trust anchors.
//!
//! Parsing a private key costs far more than a handshake's other bookkeeping, so the parsed
//! form is cached, keyed by the identity of the [`WorkloadCertificate`] the store currently
//! holds (`Arc` pointer equality). [`CertStore::set`] stores a new `Arc`, so the first
//! handshake after a rotation parses the new certificate once and every later handshake reuses
//! it. The cache is lock-free (an `ArcSwap` of a short list) and shared by every configuration
//! in the process, so configurations built per connection still parse the key once.

use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use mesh_core::{CertStore, WorkloadCertificate};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, TrustAnchor};

/// How many distinct certificates (from different stores, or just rotated) stay parsed.
const CACHE_ENTRIES: usize = 8;

/// The process-wide rustls crypto provider (ring), with its cipher suites in Envoy's order.
pub(crate) fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
        let mut provider = rustls::crypto::ring::default_provider();
        envoy_cipher_order(&mut provider.cipher_suites);
        Arc::new(provider)
    });
    &PROVIDER
}

/// Orders `suites` as an Envoy sidecar offers and prefers them: AES-128-GCM, then
/// AES-256-GCM, then ChaCha20-Poly1305 within TLS 1.3 (BoringSSL hard-codes that order; Envoy
/// cannot configure it), and AES-128-GCM first within TLS 1.2 too, as Envoy's default cipher
/// list has it; rustls's order stays otherwise (TLS 1.3 first, ECDSA before RSA). rustls alone
/// offers AES-256 first, so a mesh-to-mesh connection would pay 14 AES rounds per block
/// instead of 10, and the negotiated cipher (Envoy's `ssl.ciphers.*` stats) would differ from
/// an Envoy pair's.
fn envoy_cipher_order(suites: &mut [rustls::SupportedCipherSuite]) {
    use rustls::CipherSuite::*;
    suites.sort_by_key(|s| {
        let version = match s {
            rustls::SupportedCipherSuite::Tls13(_) => 0,
            _ => 1,
        };
        let bulk = match s.suite() {
            TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            TLS13_AES_256_GCM_SHA384
            | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        };
        (version, bulk)
    });
}

/// One workload certificate, parsed for handshakes.
pub(crate) struct Material {
    /// The certificate this was parsed from (kept alive so the pointer key stays unique).
    cert: Arc<WorkloadCertificate>,
    /// Chain and signing key; `None` when the private key could not be loaded.
    pub(crate) key: Option<Arc<CertifiedKey>>,
    /// The `ROOTCA` bundle as trust anchors (roots that fail to parse are skipped).
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("identity", &self.cert.identity.to_string())
            .field("key_loaded", &self.key.is_some())
            .field("anchors", &self.anchors.len())
            .finish()
    }
}

static CACHE: LazyLock<ArcSwap<Vec<Arc<Material>>>> =
    LazyLock::new(|| ArcSwap::from_pointee(Vec::new()));

/// The parsed form of the store's current certificate, or `None` when none is loaded.
pub(crate) fn current(store: &CertStore) -> Option<Arc<Material>> {
    let cert = store.current()?;
    if let Some(hit) = CACHE.load().iter().find(|m| Arc::ptr_eq(&m.cert, &cert)) {
        return Some(Arc::clone(hit));
    }
    let parsed = Arc::new(parse(cert));
    CACHE.rcu(|entries| {
        let mut next = Vec::with_capacity(CACHE_ENTRIES);
        next.push(Arc::clone(&parsed));
        next.extend(
            entries
                .iter()
                .filter(|m| !Arc::ptr_eq(&m.cert, &parsed.cert))
                .take(CACHE_ENTRIES - 1)
                .cloned(),
        );
        next
    });
    Some(parsed)
}

fn parse(cert: Arc<WorkloadCertificate>) -> Material {
    let chain: Vec<CertificateDer<'static>> = cert
        .chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.private_key.clone()));
    let key = match provider().key_provider.load_private_key(key_der) {
        Ok(signing_key) if !chain.is_empty() => {
            Some(Arc::new(CertifiedKey::new(chain, signing_key)))
        }
        Ok(_) => {
            tracing::warn!(
                identity = %cert.identity,
                "workload certificate has an empty chain; TLS handshakes cannot present it"
            );
            None
        }
        Err(error) => {
            tracing::warn!(
                identity = %cert.identity,
                %error,
                "workload private key could not be loaded; TLS handshakes cannot present the certificate"
            );
            None
        }
    };
    let mut anchors = Vec::with_capacity(cert.roots.len());
    for (index, root) in cert.roots.iter().enumerate() {
        let der = CertificateDer::from(root.as_slice());
        match webpki::anchor_from_trusted_cert(&der) {
            Ok(anchor) => anchors.push(anchor.to_owned()),
            Err(error) => tracing::warn!(
                index,
                %error,
                "root certificate in the trust bundle (ROOTCA) could not be parsed; skipping it"
            ),
        }
    }
    Material { cert, key, anchors }
}

#[cfg(test)]
mod tests {
    use rustls::CipherSuite::*;

    #[test]
    fn suites_are_in_envoys_order() {
        let order: Vec<_> = super::provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            order[..3],
            [
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        assert_eq!(
            order[3..5],
            [
                TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            ]
        );
        // Nothing is dropped or added: only the order changes.
        assert_eq!(
            order.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }
}
