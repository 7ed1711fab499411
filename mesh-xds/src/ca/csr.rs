//! CSR generation for a workload identity (FACTS.md b.5): ECDSA P-256 with SHA-256, a single
//! URI SAN marked critical, and an empty subject, as ztunnel generates it. istiod only uses the
//! CSR's public key (and checks its signature); the issued SAN comes from the caller's token.

use mesh_core::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use super::CaError;

/// A freshly generated private key and the CSR that carries its public key.
pub struct GeneratedCsr {
    /// PEM `CERTIFICATE REQUEST`.
    pub csr_pem: String,
    /// The private key, PKCS#8 DER.
    pub private_key_pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for GeneratedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("GeneratedCsr")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// Generates a new ECDSA P-256 key and a PEM CSR requesting `identity` as its only (critical)
/// URI SAN, with an empty subject.
pub fn generate_csr(identity: &SpiffeId) -> Result<GeneratedCsr, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Csr(format!("generating the ECDSA P-256 key: {e}")))?;
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e| CaError::Csr(format!("identity {identity} is not a valid URI SAN: {e}")))?;
    let mut params = CertificateParams::default();
    // An empty subject makes rcgen mark the SAN extension critical (RFC 5280 4.2.1.6).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CaError::Csr(format!("signing the CSR: {e}")))?;
    let csr_pem = csr
        .pem()
        .map_err(|e| CaError::Csr(format!("encoding the CSR as PEM: {e}")))?;
    Ok(GeneratedCsr {
        csr_pem,
        private_key_pkcs8_der: key.serialize_der(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    #[test]
    fn csr_has_single_critical_uri_san_and_empty_subject() {
        let id = SpiffeId::new("cluster.local", "default", "reviews");
        let generated = generate_csr(&id).unwrap();
        let pem = rustls_pki_types::pem::PemObject::from_pem_slice(generated.csr_pem.as_bytes());
        let der: rustls_pki_types::CertificateSigningRequestDer<'static> = pem.unwrap();
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        csr.verify_signature().unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        let exts: Vec<_> = csr.requested_extensions().unwrap().collect();
        assert_eq!(exts.len(), 1);
        match exts[0] {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert_eq!(
                    san.general_names,
                    vec![GeneralName::URI(
                        "spiffe://cluster.local/ns/default/sa/reviews"
                    )]
                );
            }
            other => panic!("unexpected extension {other:?}"),
        }
        // The key is PKCS#8 and usable by rustls.
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(generated.private_key_pkcs8_der.into());
        assert!(rustls::crypto::ring::sign::any_supported_type(&key).is_ok());
    }
}
