//! `x-forwarded-client-cert` as istiod configures the inbound HTTP connection manager:
//! `forward_client_cert_details: APPEND_FORWARD` with `set_current_client_cert_details
//! {subject, dns, uri}`.
//!
//! * mTLS request (client certificate presented): the element
//!   `By=<our URI SAN>;Hash=<sha256 of the client leaf, hex>;Subject="<subject>";URI=<client
//!   URI SAN>;DNS=<client DNS SAN>…` is appended to any XFCC the client sent (`,`-separated).
//! * Any other request: a client-supplied XFCC is removed (Envoy forwards it only from mTLS
//!   peers), so a plaintext peer cannot spoof an identity to the application.
//!
//! The element is computed once per connection.

use http::HeaderValue;
use http::header::HeaderMap;
use rustls::SupportedCipherSuite;
use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;

/// The XFCC header name.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// The element this hop adds for a client presenting `leaf` (DER), `by` being our URI SAN.
pub(crate) fn client_cert_element(by: Option<&str>, leaf: &[u8]) -> Option<HeaderValue> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let mut out = String::new();
    if let Some(by) = by {
        out.push_str("By=");
        out.push_str(by);
        out.push(';');
    }
    out.push_str("Hash=");
    for b in sha256(leaf) {
        out.push_str(&format!("{b:02x}"));
    }
    let subject = parsed.subject().to_string();
    out.push_str(";Subject=\"");
    out.push_str(&subject.replace('"', "\\\""));
    out.push('"');
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                out.push_str(";URI=");
                out.push_str(uri);
            }
        }
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                out.push_str(";DNS=");
                out.push_str(dns);
            }
        }
    }
    HeaderValue::from_str(&out).ok()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    match TLS13_AES_128_GCM_SHA256 {
        SupportedCipherSuite::Tls13(suite) => {
            suite.common.hash_provider.hash(data).as_ref().to_vec()
        }
        SupportedCipherSuite::Tls12(suite) => {
            suite.common.hash_provider.hash(data).as_ref().to_vec()
        }
    }
}

/// Applies APPEND_FORWARD: appends `element` (mTLS) or strips the header (no client cert).
pub(crate) fn apply(headers: &mut HeaderMap, element: Option<&HeaderValue>) {
    // Parsed once: a `&str` name would be parsed on every call.
    const XFCC: http::HeaderName = http::HeaderName::from_static(XFCC_HEADER);
    match element {
        None => {
            // A name scan is cheaper than a hashed remove of an absent header.
            if headers.keys().any(|k| *k == XFCC) {
                headers.remove(XFCC);
            }
        }
        Some(element) => {
            let mut existing = headers.get_all(&XFCC).iter().peekable();
            if existing.peek().is_none() {
                headers.insert(XFCC, element.clone());
                return;
            }
            let mut joined = Vec::new();
            for v in existing {
                joined.extend_from_slice(v.as_bytes());
                joined.push(b',');
            }
            joined.extend_from_slice(element.as_bytes());
            match HeaderValue::from_bytes(&joined) {
                Ok(v) => {
                    headers.insert(XFCC, v);
                }
                Err(_) => {
                    headers.insert(XFCC, element.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_sha256() {
        let h = sha256(b"abc");
        assert_eq!(
            h.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn plaintext_strips_and_mtls_appends() {
        let mut h = HeaderMap::new();
        h.insert(
            XFCC_HEADER,
            HeaderValue::from_static("URI=spiffe://evil/ns/x/sa/y"),
        );
        apply(&mut h, None);
        assert!(h.get(XFCC_HEADER).is_none());
        let ours = HeaderValue::from_static("By=a;Hash=00;URI=b");
        h.insert(XFCC_HEADER, HeaderValue::from_static("By=x;URI=y"));
        apply(&mut h, Some(&ours));
        assert_eq!(h[XFCC_HEADER], "By=x;URI=y,By=a;Hash=00;URI=b");
        let mut h = HeaderMap::new();
        apply(&mut h, Some(&ours));
        assert_eq!(h[XFCC_HEADER], "By=a;Hash=00;URI=b");
    }
}
