//! rustls configurations for Istio mTLS.
//!
//! Both sides read the workload certificate and the trust bundle from
//! [`mesh_core::CertStore`] at handshake time, so a rotated certificate is used by the next
//! handshake while established connections continue. The parsed key and trust anchors are
//! cached per stored certificate, so a handshake does not re-parse the key.
//!
//! Peers are authenticated the way Istio does it: the chain must lead to a root of the trust
//! bundle (`ROOTCA`) and be valid now, with the right extended key usage; then the SPIFFE URI
//! SAN decides. DNS names in certificates are never checked. Every refusal logs one
//! `tracing::warn!` line naming the reason and bumps Envoy's counter
//! (`envoy_listener_ssl_fail_verify_error` / `_san` / `_no_cert` inbound,
//! `envoy_cluster_ssl_fail_verify_error` / `_san` outbound) and
//! `mesh_tls_handshake_failures_total{side,reason}`.

mod material;
mod verify;

use std::sync::Arc;

use mesh_core::CertStore;
use mesh_core::cluster::{SanMatcher, UpstreamTls};
use mesh_core::identity::PeerIdentity;
use mesh_core::metadata_exchange::ALPN_PEER_EXCHANGE;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, ServerName};

pub(crate) use verify::count_no_client_cert;

/// ALPN values the inbound side accepts, in preference order: Istio's HTTP-over-mTLS values
/// (which the client sidecar's `istio.alpn` filter sets), then plain ones.
pub const INBOUND_ALPN: &[&[u8]] = &[
    b"istio-h2",
    b"istio-http/1.1",
    b"istio-http/1.0",
    b"h2",
    b"http/1.1",
    b"istio",
];

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No workload certificate is loaded yet.
    #[error("no workload certificate loaded yet")]
    NoCertificate,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The SNI is not a valid DNS name for the TLS ClientHello.
    #[error("SNI {0:?} is not a valid TLS server name")]
    InvalidServerName(String),
}

/// Server configuration for the inbound side: presents the current workload certificate,
/// requires (when `require_client_cert`) a client certificate chaining to the mesh roots.
///
/// Client authentication is always *offered*, so that PERMISSIVE peers (real Envoy sidecars
/// included) present their certificate; with `require_client_cert == false` a client without
/// one is accepted, a client with an invalid one is refused. Building the configuration does
/// not need a loaded certificate: handshakes made before one is loaded fail.
pub fn server_config(
    certs: &CertStore,
    require_client_cert: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with_peer_sans(certs, require_client_cert, None)
}

/// Where the inbound verifier reads, at handshake time, the URI SAN matchers a client
/// certificate must satisfy (istiod's `match_subject_alt_names` on the inbound mTLS chains:
/// prefix `spiffe://<trust domain>/` for the trust domain and each alias). An empty list
/// accepts any SPIFFE identity the roots vouch for.
pub type PeerSanSource = Arc<dyn Fn() -> Vec<SanMatcher> + Send + Sync>;

/// [`server_config`] that also checks the client's URI SANs against `peer_sans` (read per
/// handshake, so policy updates apply to the next handshake). A client whose SANs match none
/// is refused during the handshake (`envoy_listener_ssl_fail_verify_san`,
/// `mesh_tls_handshake_failures_total{reason="san_mismatch"}`), as Envoy does.
pub fn server_config_with_peer_sans(
    certs: &CertStore,
    require_client_cert: bool,
    peer_sans: Option<PeerSanSource>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = Arc::new(verify::SpiffeClientVerifier::new(
        certs.clone(),
        require_client_cert,
        peer_sans,
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(StoreCertResolver {
            store: certs.clone(),
        }));
    config.alpn_protocols = INBOUND_ALPN.iter().map(|p| p.to_vec()).collect();
    // No session resumption: every connection is authenticated against the current trust
    // bundle and presents the current certificate (a resumed session would carry identities
    // verified before a rotation). Mesh connections are long-lived and pooled.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// `config` for an inbound TCP port: `istio-peer-exchange` preferred, then
/// [`INBOUND_ALPN`]. Istio's TCP mTLS filter chains negotiate it (`ALPNDownstreamWithMxc`)
/// so that the TCP metadata exchange runs ([`crate::peer_exchange`]); HTTP ports never offer
/// it.
pub fn with_peer_exchange(config: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut config = config.clone();
    config.alpn_protocols = std::iter::once(ALPN_PEER_EXCHANGE.as_bytes())
        .chain(INBOUND_ALPN.iter().copied())
        .map(<[u8]>::to_vec)
        .collect();
    Arc::new(config)
}

/// Client configuration towards an endpoint using `tls` (SNI, ALPN, SPIFFE SAN matchers),
/// presenting the current workload certificate. `alpn` overrides `tls.alpn` (HTTP traffic
/// offers `istio-http/1.1` or `istio-h2`, as Envoy's `istio.alpn` filter does).
///
/// The server's chain is validated against the store's roots at handshake time (DNS names
/// ignored), then `tls.accepts_peer(uri_sans)` must hold. The caller connects with
/// [`server_name`]`(tls)` as the SNI. Session resumption is disabled, so building one
/// configuration per cluster (or per connection) and reusing it is equally correct. Fails with [`TlsError::NoCertificate`] while no
/// workload certificate (and so no trust bundle) is loaded.
pub fn client_config(
    certs: &CertStore,
    tls: &UpstreamTls,
    alpn: Option<&[&[u8]]>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if certs.current().is_none() {
        return Err(TlsError::NoCertificate);
    }
    let verifier = Arc::new(verify::SpiffeServerVerifier::new(
        certs.clone(),
        tls.clone(),
    ));
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StoreCertResolver {
            store: certs.clone(),
        }));
    config.alpn_protocols = match alpn {
        Some(protocols) => protocols.iter().map(|p| p.to_vec()).collect(),
        None => tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
    };
    // No session resumption (see `server_config`): each handshake verifies the server against
    // the current trust bundle and SAN matchers and presents the current certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SNI to send towards an endpoint using `tls`, as a rustls [`ServerName`].
///
/// Istio's SNIs (`outbound_.9080_.v1_.reviews.default.svc.cluster.local`) contain `_`;
/// rustls-pki-types accepts underscores in DNS names, so they are sent verbatim.
pub fn server_name(tls: &UpstreamTls) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(tls.sni.clone()).map_err(|_| TlsError::InvalidServerName(tls.sni.clone()))
}

/// The peer identity (URI SANs, SPIFFE ID) from a verified peer chain (leaf first).
///
/// `spiffe_id` is the first URI SAN that is an Istio SPIFFE ID. An empty or unparsable chain
/// gives an identity with no SANs.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> PeerIdentity {
    let uri_sans = chain.first().map(uri_sans).unwrap_or_default();
    let spiffe_id = uri_sans.iter().find_map(|san| san.parse().ok());
    PeerIdentity {
        spiffe_id,
        uri_sans: uri_sans.into(),
    }
}

/// The URI SANs of a DER certificate (empty when it cannot be parsed or has none).
fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::clone(material::provider())
}

/// Presents the store's current certificate, on either side of a handshake.
#[derive(Debug)]
struct StoreCertResolver {
    store: CertStore,
}

impl StoreCertResolver {
    fn current_key(&self) -> Option<Arc<CertifiedKey>> {
        let material = material::current(&self.store);
        let key = material.as_ref().and_then(|m| m.key.clone());
        if key.is_none() {
            tracing::warn!(
                "no usable workload certificate loaded; the TLS handshake proceeds without one"
            );
        }
        key
    }
}

impl ResolvesServerCert for StoreCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current_key()
    }
}

impl ResolvesClientCert for StoreCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
