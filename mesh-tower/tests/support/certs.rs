//! A small rcgen-based test CA issuing Istio-shaped workload certificates: ECDSA P-256 leaves
//! with a SPIFFE URI SAN, plus the broken variants the verifiers must refuse.

use std::time::{Duration, SystemTime};

use mesh_core::{SpiffeId, WorkloadCertificate};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A root CA (`O=cluster.local`, like istiod's self-signed root).
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

/// How a leaf should be broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafKind {
    /// A good leaf valid now, clientAuth + serverAuth.
    Good,
    /// Valid 2000-01-01..2001-01-01.
    Expired,
    /// Valid 2090-01-01..2100-01-01.
    NotYetValid,
    /// Only serverAuth in its extended key usage.
    NoClientAuth,
    /// Only clientAuth in its extended key usage.
    NoServerAuth,
    /// No URI SAN at all (a DNS SAN instead).
    NoUriSan,
}

impl TestCa {
    /// A fresh root.
    pub fn new(org: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, org);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("root key");
        let der = params.self_signed(&key).expect("root").der().to_vec();
        TestCa { params, key, der }
    }

    /// The root in DER.
    pub fn root_der(&self) -> Vec<u8> {
        self.der.clone()
    }

    /// A good workload certificate for `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn workload(&self, ns: &str, sa: &str) -> WorkloadCertificate {
        self.leaf(ns, sa, LeafKind::Good)
    }

    /// A workload certificate broken as `kind` says, trusting this CA's root.
    pub fn leaf(&self, ns: &str, sa: &str, kind: LeafKind) -> WorkloadCertificate {
        let id = SpiffeId::new("cluster.local", ns, sa);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = if kind == LeafKind::NoUriSan {
            vec![SanType::DnsName(
                format!("{sa}.{ns}.svc.cluster.local")
                    .try_into()
                    .expect("dns"),
            )]
        } else {
            vec![SanType::URI(id.to_string().try_into().expect("uri"))]
        };
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match kind {
            LeafKind::NoClientAuth => vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafKind::NoServerAuth => vec![ExtendedKeyUsagePurpose::ClientAuth],
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let now = SystemTime::now();
        let (not_before, not_after) = match kind {
            LeafKind::Expired => (
                rcgen::date_time_ymd(2000, 1, 1),
                rcgen::date_time_ymd(2001, 1, 1),
            ),
            LeafKind::NotYetValid => (
                rcgen::date_time_ymd(2090, 1, 1),
                rcgen::date_time_ymd(2100, 1, 1),
            ),
            _ => (
                rcgen::date_time_ymd(2020, 1, 1),
                rcgen::date_time_ymd(2080, 1, 1),
            ),
        };
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        WorkloadCertificate {
            chain: vec![cert.der().to_vec()],
            private_key: key.serialize_der(),
            roots: vec![self.root_der()],
            identity: id,
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(86400),
        }
    }

    /// A self-signed leaf with a SPIFFE SAN (signed by nobody the mesh trusts), with this CA's
    /// root as its trust bundle.
    pub fn self_signed(&self, ns: &str, sa: &str) -> WorkloadCertificate {
        let other = TestCa::new("self");
        let mut cert = other.workload(ns, sa);
        // Present the leaf self-signed: re-sign its params with its own key.
        let id = SpiffeId::new("cluster.local", ns, sa);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("uri"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        cert.chain = vec![
            params
                .self_signed(&key)
                .expect("self-signed")
                .der()
                .to_vec(),
        ];
        cert.private_key = key.serialize_der();
        cert.roots = vec![self.root_der()];
        cert
    }

    /// A leaf signed by another root, but trusting this CA's root (so it can still verify
    /// peers of this mesh).
    pub fn signed_by_other_root(&self, ns: &str, sa: &str) -> WorkloadCertificate {
        let other = TestCa::new("other.local");
        let mut cert = other.workload(ns, sa);
        cert.roots = vec![self.root_der()];
        cert
    }
}

/// Trusts any server certificate: lets tests play a TLS client with no, broken or foreign
/// certificates that still completes its half of the handshake, and lets benches compare
/// record costs without mesh's verification.
#[derive(Debug)]
pub struct TrustAnything;

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
