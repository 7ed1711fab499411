//! The SPIFFE peer verifiers: chain validation against the mesh roots read from the
//! [`CertStore`] at handshake time, then identity checks on the URI SANs. DNS names are never
//! checked (Istio authenticates workloads by SPIFFE ID, not by host name).

use std::sync::Arc;

use mesh_core::CertStore;
use mesh_core::cluster::{SanMatcher, UpstreamTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::material::{self, provider};
use super::uri_sans;

/// Which side of a connection refused the peer; selects Envoy's stat scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// Inbound: we are the server verifying a client (`listener.*.ssl.*`).
    Inbound,
    /// Outbound: we are the client verifying a server (`cluster.*.ssl.*`).
    Outbound,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Inbound => "inbound",
            Side::Outbound => "outbound",
        }
    }
}

/// Why a peer certificate was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Past `notAfter`.
    Expired,
    /// Before `notBefore`.
    NotYetValid,
    /// Does not chain to a root of the trust bundle.
    UnknownCa,
    /// The extended key usage does not allow this use (clientAuth / serverAuth).
    BadKeyUsage,
    /// Chains fine but carries no URI SAN (inbound) or none the SAN matchers accept.
    SanMismatch,
    /// No workload certificate (and so no trust bundle) is loaded.
    NoTrustBundle,
    /// Anything else webpki refused (bad encoding, bad signature, unsupported algorithm).
    Invalid,
}

impl Refusal {
    /// Label value of `mesh_tls_handshake_failures_total{reason}`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::BadKeyUsage => "bad_key_usage",
            Refusal::SanMismatch => "san_mismatch",
            Refusal::NoTrustBundle => "no_trust_bundle",
            Refusal::Invalid => "invalid_certificate",
        }
    }

    fn from_webpki(error: &webpki::Error) -> Self {
        match error {
            webpki::Error::CertExpired { .. } => Refusal::Expired,
            webpki::Error::CertNotValidYet { .. } => Refusal::NotYetValid,
            // A root with the issuer's name whose key did not sign the chain (a rotated or
            // foreign mesh root with the same `O=cluster.local` subject) is an unknown CA too.
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                Refusal::UnknownCa
            }
            webpki::Error::RequiredEkuNotFoundContext(_) | webpki::Error::EmptyEkuExtension => {
                Refusal::BadKeyUsage
            }
            _ => Refusal::Invalid,
        }
    }

    fn to_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(match self {
            Refusal::Expired => CertificateError::Expired,
            Refusal::NotYetValid => CertificateError::NotValidYet,
            Refusal::UnknownCa | Refusal::NoTrustBundle => CertificateError::UnknownIssuer,
            Refusal::BadKeyUsage => CertificateError::InvalidPurpose,
            Refusal::SanMismatch => CertificateError::NotValidForName,
            Refusal::Invalid => CertificateError::ApplicationVerificationFailure,
        })
    }
}

/// Counts a refused peer in Envoy's stat (`ssl.fail_verify_error` / `ssl.fail_verify_san`,
/// scoped `listener` inbound and `cluster` outbound) and in
/// `mesh_tls_handshake_failures_total{side,reason}`. Inbound, the counter carries Istio's
/// `listener_address` tag of the capture listener as the sidecar's does; outbound, the
/// verifier does not know the cluster, so the `cluster_name` tag Envoy would add is missing.
pub(crate) fn count_refusal(side: Side, refusal: Refusal) {
    match (side, refusal) {
        (Side::Inbound, Refusal::SanMismatch) => {
            listener_counter("envoy_listener_ssl_fail_verify_san").increment(1)
        }
        (Side::Inbound, _) => listener_counter("envoy_listener_ssl_fail_verify_error").increment(1),
        (Side::Outbound, Refusal::SanMismatch) => {
            metrics::counter!("envoy_cluster_ssl_fail_verify_san").increment(1)
        }
        (Side::Outbound, _) => {
            metrics::counter!("envoy_cluster_ssl_fail_verify_error").increment(1)
        }
    }
    metrics::counter!(
        "mesh_tls_handshake_failures_total",
        "side" => side.as_str(),
        "reason" => refusal.as_str()
    )
    .increment(1);
}

/// Counts an inbound handshake refused because the client presented no certificate while
/// one was required (Envoy's `listener.*.ssl.fail_verify_no_cert`).
pub(crate) fn count_no_client_cert() {
    listener_counter("envoy_listener_ssl_fail_verify_no_cert").increment(1);
    metrics::counter!(
        "mesh_tls_handshake_failures_total",
        "side" => Side::Inbound.as_str(),
        "reason" => "no_client_certificate"
    )
    .increment(1);
}

/// An inbound listener stat, tagged `listener_address="0.0.0.0_15006"` as the sidecar's is.
fn listener_counter(name: &'static str) -> metrics::Counter {
    metrics::counter!(
        name,
        crate::telemetry::stats_tags::LISTENER_ADDRESS => crate::inbound::INBOUND_LISTENER_ADDRESS
    )
}

fn refuse(side: Side, refusal: Refusal, detail: &dyn std::fmt::Display) -> rustls::Error {
    let peer = match side {
        Side::Inbound => "client",
        Side::Outbound => "server",
    };
    tracing::warn!(
        side = side.as_str(),
        reason = refusal.as_str(),
        "refusing mTLS {peer} certificate: {detail}"
    );
    count_refusal(side, refusal);
    refusal.to_rustls()
}

/// Validates `end_entity` + `intermediates` against the store's current roots for `usage`
/// at `now`, and returns the leaf's URI SANs.
fn verify_chain(
    side: Side,
    store: &CertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<Vec<String>, rustls::Error> {
    let Some(material) = material::current(store) else {
        return Err(refuse(
            side,
            Refusal::NoTrustBundle,
            &"no workload certificate and trust bundle (ROOTCA) loaded yet",
        ));
    };
    if material.anchors.is_empty() {
        return Err(refuse(
            side,
            Refusal::NoTrustBundle,
            &"the trust bundle (ROOTCA) holds no usable root certificate",
        ));
    }
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|error| {
        refuse(
            side,
            Refusal::Invalid,
            &format_args!("peer certificate could not be parsed: {error}"),
        )
    })?;
    let usage = match side {
        Side::Inbound => webpki::KeyUsage::client_auth(),
        Side::Outbound => webpki::KeyUsage::server_auth(),
    };
    let verified = cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &material.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    );
    if let Err(error) = verified {
        let refusal = Refusal::from_webpki(&error);
        let detail = match refusal {
            Refusal::Expired => "certificate has expired".to_owned(),
            Refusal::NotYetValid => "certificate is not valid yet".to_owned(),
            Refusal::BadKeyUsage => {
                let needed = match side {
                    Side::Inbound => "clientAuth",
                    Side::Outbound => "serverAuth",
                };
                format!("certificate's extended key usage does not allow {needed}")
            }
            Refusal::UnknownCa => format!(
                "certificate is not signed by a root in the trust bundle (unknown CA: {error})"
            ),
            _ => format!("certificate chain is invalid: {error}"),
        };
        return Err(refuse(side, refusal, &detail));
    }
    Ok(uri_sans(end_entity))
}

/// Verifies client certificates on the inbound side. Offered on every handshake (so PERMISSIVE
/// peers present theirs), mandatory only for STRICT.
pub(crate) struct SpiffeClientVerifier {
    store: CertStore,
    mandatory: bool,
    peer_sans: Option<super::PeerSanSource>,
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("mandatory", &self.mandatory)
            .field("peer_sans", &self.peer_sans.is_some())
            .finish()
    }
}

impl SpiffeClientVerifier {
    pub(crate) fn new(
        store: CertStore,
        mandatory: bool,
        peer_sans: Option<super::PeerSanSource>,
    ) -> Self {
        SpiffeClientVerifier {
            store,
            mandatory,
            peer_sans,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client sends whatever workload certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let sans = verify_chain(Side::Inbound, &self.store, end_entity, intermediates, now)?;
        if sans.is_empty() {
            return Err(refuse(
                Side::Inbound,
                Refusal::SanMismatch,
                &"certificate has no URI SAN (SPIFFE ID)",
            ));
        }
        if let Some(source) = &self.peer_sans {
            let matchers = source();
            if !SanMatcher::accepts(&matchers, &sans) {
                let detail = format!(
                    "URI SANs {sans:?} match none of the accepted subject alt names {matchers:?} (wrong trust domain?)"
                );
                return Err(refuse(Side::Inbound, Refusal::SanMismatch, &detail));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the server certificate on the outbound side: chain to the mesh roots, then the
/// cluster's SPIFFE SAN matchers (fail closed). The SNI is not compared with DNS SANs.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    store: CertStore,
    tls: Arc<UpstreamTls>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(store: CertStore, tls: UpstreamTls) -> Self {
        SpiffeServerVerifier {
            store,
            tls: Arc::new(tls),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let sans = verify_chain(Side::Outbound, &self.store, end_entity, intermediates, now)?;
        let borrowed: Vec<&str> = sans.iter().map(String::as_str).collect();
        if !self.tls.accepts_peer(&borrowed) {
            let detail = format!(
                "URI SANs {:?} match none of the expected subject alt names {:?} (SNI {})",
                sans, self.tls.san_matchers, self.tls.sni
            );
            return Err(refuse(Side::Outbound, Refusal::SanMismatch, &detail));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Handshake signature checks with the ring provider's algorithms, shared by the inbound and
/// outbound verifiers (only the chain and SAN checks differ between them).
fn handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    tls13: bool,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let algs = &provider().signature_verification_algorithms;
    if tls13 {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    } else {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inbound refusals land in the sidecar's listener stats, tagged with Istio's
    /// `listener_address` (Envoy: `listener.0.0.0.0_15006.ssl.fail_verify_*`).
    #[test]
    fn inbound_refusals_carry_the_listener_address() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            count_no_client_cert();
            count_refusal(Side::Inbound, Refusal::SanMismatch);
            count_refusal(Side::Inbound, Refusal::Expired);
        });
        let text = handle.render();
        for stat in ["no_cert", "san", "error"] {
            let sample = format!(
                "envoy_listener_ssl_fail_verify_{stat}{{listener_address=\"0.0.0.0_15006\"}} 1"
            );
            assert!(text.lines().any(|l| l == sample), "{sample}\n{text}");
        }
    }
}
