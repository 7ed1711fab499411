//! What Envoy's HTTP codec refuses before any filter runs and hyper lets through: request
//! headers over Envoy's limits ([`MAX_REQUEST_HEADERS_BYTES`], [`MAX_HEADERS_COUNT`]) and, on
//! HTTP/1.1, framing a request smuggler relies on (more than one `content-length`,
//! `content-length` with `transfer-encoding`, transfer codings other than `chunked`) or a
//! request without a `host`. The request is answered as Envoy answers it and never reaches the
//! application.

use http::{HeaderMap, Request, Version};

use super::authz::LocalReply;
use super::{MAX_HEADERS_COUNT, MAX_REQUEST_HEADERS_BYTES};

/// Response flag Envoy sets when the downstream codec refuses a request (`DPE`).
pub const DPE_FLAG: &str = "DPE";

/// The h2 pseudo-headers Envoy's header map holds besides the regular ones (`:method`,
/// `:scheme`, `:authority`, `:path`), counted against [`MAX_HEADERS_COUNT`].
const H2_PSEUDO_HEADERS: usize = 4;

/// Envoy's local reply for a request the codec refuses, or `None` to serve it.
pub(crate) fn check<B>(req: &Request<B>) -> Option<LocalReply> {
    let h1 = req.version() <= Version::HTTP_11;
    let headers = req.headers();
    let (count, size) = if h1 {
        (headers.len(), header_bytes(headers))
    } else {
        let uri = req.uri();
        let pseudo = req.method().as_str().len()
            + uri.scheme_str().map_or(0, str::len)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(0, |p| p.as_str().len());
        (
            headers.len() + H2_PSEUDO_HEADERS,
            header_bytes(headers) + pseudo,
        )
    };
    if count > MAX_HEADERS_COUNT || size > MAX_REQUEST_HEADERS_BYTES {
        tracing::debug!(
            count,
            size,
            "refusing request: headers over Envoy's limits (max_headers_count {MAX_HEADERS_COUNT}, max_request_headers_kb {})",
            MAX_REQUEST_HEADERS_BYTES / 1024
        );
        return Some(reply(h1, 431, "Request Header Fields Too Large"));
    }
    if h1 {
        let content_lengths = headers.get_all(http::header::CONTENT_LENGTH).iter().count();
        let mut codings = headers.get_all(http::header::TRANSFER_ENCODING).iter();
        // Envoy refuses any repeated content-length, equal or not, and content-length with
        // transfer-encoding, with its codec's 400.
        if content_lengths > 1
            || (content_lengths == 1 && headers.contains_key(http::header::TRANSFER_ENCODING))
        {
            tracing::debug!("refusing request: ambiguous content-length");
            return Some(reply(h1, 400, "Bad Request"));
        }
        // The only transfer coding Envoy accepts is a single `chunked`; others are 501.
        if let Some(first) = codings.next()
            && (codings.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked"))
        {
            tracing::debug!("refusing request: unsupported transfer-encoding");
            return Some(reply(h1, 501, "Not Implemented"));
        }
        // An HTTP/1.1 request needs a host (RFC 9112 §3.2); Envoy answers 400 with no body.
        if req.version() == Version::HTTP_11
            && req.uri().authority().is_none()
            && !headers.contains_key(http::header::HOST)
        {
            tracing::debug!("refusing request: HTTP/1.1 without host");
            return Some(reply(h1, 400, ""));
        }
    }
    None
}

/// Envoy's measure of the headers against `max_request_headers_kb`: names and values.
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// A codec refusal: Envoy closes an HTTP/1.1 connection after it.
fn reply(h1: bool, status: u16, body: &'static str) -> LocalReply {
    LocalReply {
        status,
        body: body.into(),
        location: None,
        www_authenticate: None,
        flags: DPE_FLAG,
        headers: if h1 {
            vec![(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            )]
        } else {
            Vec::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(version: Version, headers: &[(&str, String)]) -> Request<()> {
        let mut req = Request::get("/x").version(version);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        req.body(()).unwrap()
    }

    #[test]
    fn limits_are_envoys_defaults() {
        let host = ("host", "a".to_owned());
        let mut hundred = vec![host.clone()];
        hundred.extend((0..99).map(|i| ("x-h", i.to_string())));
        assert_eq!(check(&get(Version::HTTP_11, &hundred)), None);
        hundred.push(("x-h", "one more".to_owned()));
        let refused = check(&get(Version::HTTP_11, &hundred)).unwrap();
        assert_eq!(
            (refused.status, &*refused.body),
            (431, "Request Header Fields Too Large")
        );
        // h2 counts the four pseudo-headers too: 96 regular headers are the most.
        let h2: Vec<_> = (0..96).map(|i| ("x-h", i.to_string())).collect();
        assert_eq!(check(&get(Version::HTTP_2, &h2)), None);
        let h2: Vec<_> = (0..97).map(|i| ("x-h", i.to_string())).collect();
        assert_eq!(check(&get(Version::HTTP_2, &h2)).unwrap().status, 431);

        let big = |n| vec![host.clone(), ("x-big", "a".repeat(n))];
        assert_eq!(check(&get(Version::HTTP_11, &big(59 * 1024))), None);
        assert_eq!(
            check(&get(Version::HTTP_11, &big(61 * 1024)))
                .unwrap()
                .status,
            431
        );
    }

    #[test]
    fn repeated_content_length_and_missing_host_are_refused_on_http1() {
        let cl = |v: &str| ("content-length", v.to_owned());
        let host = ("host", "a".to_owned());
        let twice = [host.clone(), cl("4"), cl("4")];
        let refused = check(&get(Version::HTTP_11, &twice)).unwrap();
        assert_eq!((refused.status, &*refused.body), (400, "Bad Request"));
        assert_eq!(
            check(&get(Version::HTTP_11, &[host.clone(), cl("4")])),
            None
        );
        let te = |v: &str| ("transfer-encoding", v.to_owned());
        let both = [host.clone(), cl("4"), te("chunked")];
        assert_eq!(check(&get(Version::HTTP_11, &both)).unwrap().status, 400);
        let gzip = [host.clone(), te("gzip, chunked")];
        let refused = check(&get(Version::HTTP_11, &gzip)).unwrap();
        assert_eq!((refused.status, &*refused.body), (501, "Not Implemented"));
        assert_eq!(check(&get(Version::HTTP_11, &[host, te("Chunked")])), None);
        assert_eq!(check(&get(Version::HTTP_11, &[])).unwrap().status, 400);
        // HTTP/1.0 needs no host.
        assert_eq!(check(&get(Version::HTTP_10, &[])), None);
    }
}
