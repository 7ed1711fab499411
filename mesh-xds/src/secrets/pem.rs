//! PEM certificate material → [`WorkloadCertificate`].
//!
//! Keys may be PKCS#8 (`PRIVATE KEY`, istio-agent with `PKCS8_KEY=true`, SPIRE), PKCS#1
//! (`RSA PRIVATE KEY`, istio-agent's default RSA keys) or SEC1 (`EC PRIVATE KEY`); the store
//! holds PKCS#8, so the other two are wrapped. The key must belong to the leaf: a chain and key
//! from two different rotations (a half-written directory) are refused, not installed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::{SpiffeId, WorkloadCertificate};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use super::SecretError;

fn invalid(what: &'static str, reason: impl Into<String>) -> SecretError {
    SecretError::Invalid {
        what,
        reason: reason.into(),
    }
}

/// The standard base64 alphabet (RFC 4648 §4), as PEM uses it.
pub(crate) const BASE64: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 of `data` in `alphabet`, `=`-padded when `pad`.
pub(crate) fn base64_encode(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..chunk.len() + 1 {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
    }
    out
}

/// One PEM block (`-----BEGIN <label>-----`, 64-column base64).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der, BASE64, true);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A workload certificate as the three PEM files istio-agent writes: `cert-chain.pem`
/// (leaf first), `key.pem` (PKCS#8) and `root-cert.pem`.
pub fn workload_certificate_to_pem(cert: &WorkloadCertificate) -> (String, String, String) {
    let chain = cert
        .chain
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    let roots = cert
        .roots
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    (chain, pem_encode("PRIVATE KEY", &cert.private_key), roots)
}

/// Every certificate in a PEM bundle, as DER.
pub fn certificates_from_pem(pem: &[u8], what: &'static str) -> Result<Vec<Vec<u8>>, SecretError> {
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| invalid(what, format!("not PEM: {e}")))?;
        out.push(der.as_ref().to_vec());
    }
    if out.is_empty() {
        return Err(invalid(what, "holds no certificate"));
    }
    Ok(out)
}

/// A PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) as PKCS#8 DER.
pub fn private_key_pkcs8_from_pem(pem: &[u8]) -> Result<Vec<u8>, SecretError> {
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| invalid("private key", format!("no usable PEM private key: {e}")))?;
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Pkcs1(k) => Ok(pkcs8_wrap(RSA_ALGORITHM, k.secret_pkcs1_der())),
        PrivateKeyDer::Sec1(k) => {
            let der = k.secret_sec1_der();
            let curve = sec1_curve(der).ok_or_else(|| {
                invalid("private key", "EC key on a curve other than P-256 or P-384")
            })?;
            let mut algorithm = EC_PUBLIC_KEY_OID.to_vec();
            algorithm.extend_from_slice(curve);
            Ok(pkcs8_wrap(&der_tlv(0x30, &algorithm), der))
        }
        _ => Err(invalid("private key", "unsupported private key encoding")),
    }
}

/// `SEQUENCE { OID rsaEncryption, NULL }`.
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// OID id-ecPublicKey.
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// OID prime256v1.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// OID secp384r1.
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// `PrivateKeyInfo { version 0, algorithm, OCTET STRING key }`.
fn pkcs8_wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm);
    body.extend_from_slice(&der_tlv(0x04, key));
    der_tlv(0x30, &body)
}

/// The named curve of a SEC1 `ECPrivateKey`: its `[0]` parameters when present, else the
/// private key's length.
fn sec1_curve(der: &[u8]) -> Option<&'static [u8]> {
    if der.windows(P256_OID.len()).any(|w| w == P256_OID) {
        return Some(P256_OID);
    }
    if der.windows(P384_OID.len()).any(|w| w == P384_OID) {
        return Some(P384_OID);
    }
    // SEQUENCE { INTEGER 1, OCTET STRING d, ... }: find the OCTET STRING length.
    let pos = der.iter().position(|b| *b == 0x04)?;
    match der.get(pos + 1)? {
        32 => Some(P256_OID),
        48 => Some(P384_OID),
        _ => None,
    }
}

fn system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Builds a [`WorkloadCertificate`] from PEM: `chain_pem` (leaf first, intermediates after),
/// `key_pem` (the leaf's private key) and `roots_pem` (the trust bundle, one or more roots).
///
/// The leaf must carry an Istio SPIFFE URI SAN and `key_pem` must be the leaf's key.
pub fn workload_certificate_from_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
    roots_pem: &[u8],
) -> Result<WorkloadCertificate, SecretError> {
    let chain = certificates_from_pem(chain_pem, "certificate chain")?;
    let roots = certificates_from_pem(roots_pem, "trust bundle")?;
    let private_key = private_key_pkcs8_from_pem(key_pem)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| invalid("certificate chain", format!("leaf: {e}")))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        private_key.clone().into(),
    ))
    .map_err(|e| invalid("private key", e.to_string()))?;
    if let Some(spki) = signing_key.public_key()
        && spki.as_ref() != leaf.tbs_certificate.subject_pki.raw
    {
        return Err(invalid(
            "private key",
            "does not belong to the leaf certificate (chain and key from different rotations?)",
        ));
    }
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .map_err(|e| invalid("certificate chain", format!("leaf subjectAltName: {e}")))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let identity: SpiffeId = uris.iter().find_map(|u| u.parse().ok()).ok_or_else(|| {
        invalid(
            "certificate chain",
            format!("the leaf has no Istio SPIFFE URI SAN (URIs: {uris:?})"),
        )
    })?;
    let validity = leaf.validity();
    Ok(WorkloadCertificate {
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        chain,
        private_key,
        roots,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_long_form_above_127() {
        assert_eq!(der_tlv(0x04, &[0; 3]), vec![0x04, 3, 0, 0, 0]);
        let long = der_tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    const RSA_KEY: &[u8] = include_bytes!("testdata/rsa-pkcs1-key.pem");
    const RSA_CERT: &[u8] = include_bytes!("testdata/rsa-cert.pem");
    const EC_KEY: &[u8] = include_bytes!("testdata/ec-sec1-key.pem");
    const EC_CERT: &[u8] = include_bytes!("testdata/ec-cert.pem");

    #[test]
    fn pkcs1_rsa_keys_are_wrapped_and_match_their_leaf() {
        let cert = workload_certificate_from_pem(RSA_CERT, RSA_KEY, RSA_CERT).unwrap();
        assert_eq!(
            cert.identity,
            SpiffeId::new("cluster.local", "legacy", "rsa")
        );
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots.len(), 1);
        assert!(cert.not_after > SystemTime::now());
        assert!(
            rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
                cert.private_key.into()
            ))
            .is_ok()
        );
    }

    #[test]
    fn sec1_ec_keys_are_wrapped_and_match_their_leaf() {
        let cert = workload_certificate_from_pem(EC_CERT, EC_KEY, EC_CERT).unwrap();
        assert_eq!(
            cert.identity,
            SpiffeId::new("cluster.local", "legacy", "ec")
        );
    }

    #[test]
    fn a_key_of_another_leaf_is_refused() {
        let err = workload_certificate_from_pem(EC_CERT, RSA_KEY, EC_CERT).unwrap_err();
        assert!(
            err.to_string().contains("does not belong to the leaf"),
            "{err}"
        );
        let err = workload_certificate_from_pem(RSA_CERT, EC_KEY, RSA_CERT).unwrap_err();
        assert!(
            err.to_string().contains("does not belong to the leaf"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_refused_with_the_part_named() {
        let err = workload_certificate_from_pem(b"nope", b"nope", b"nope").unwrap_err();
        assert!(err.to_string().contains("certificate chain"), "{err}");
        let err =
            private_key_pkcs8_from_pem(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
                .unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
    }
}
