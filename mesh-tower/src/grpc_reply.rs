//! Envoy's local replies to gRPC requests: Envoy answers a request whose `content-type` is
//! gRPC with a trailers-only response whatever produced the reply (HTTP 200,
//! `content-type: application/grpc`, `grpc-status`, the reply's text as `grpc-message`),
//! as Envoy 1.40 does (the root crate's `grpc_local_replies` test compares them).

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `grpc-status`.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// What a request's `content-type` says about gRPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grpc {
    /// Not gRPC.
    No,
    /// `application/grpc…` but not gRPC to Envoy's local replies (e.g. `application/grpc-web`,
    /// `application/grpc;…`): gRPC to telemetry.
    Like,
    /// `application/grpc` or `application/grpc+…` (Envoy's `Grpc::Common::hasGrpcContentType`,
    /// case-sensitive): Envoy's local replies take their gRPC form, without `grpc-message` for
    /// a `HEAD` request.
    Request {
        /// The method is `HEAD`.
        head: bool,
    },
}

impl Grpc {
    /// The request's kind by its `content-type` (and method).
    pub(crate) fn of(method: &Method, headers: &HeaderMap) -> Grpc {
        let head = method == Method::HEAD;
        let Some(ct) = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes) else {
            return Grpc::No;
        };
        match ct.strip_prefix(b"application/grpc") {
            None => Grpc::No,
            Some(b"") => Grpc::Request { head },
            Some(rest) if rest.starts_with(b"+") => Grpc::Request { head },
            Some(_) => Grpc::Like,
        }
    }

    /// gRPC to telemetry (`request_protocol="grpc"`, message counts): any `application/grpc…`.
    pub(crate) fn telemetry(self) -> bool {
        self != Grpc::No
    }

    /// Envoy's local replies to the request take their gRPC form.
    pub(crate) fn replies(self) -> bool {
        matches!(self, Grpc::Request { .. })
    }
}

/// Turns a local reply's headers into Envoy's gRPC form: `content-type: application/grpc`,
/// `grpc-status`, `grpc-message` (the reply's text, percent-encoded, when there is one), no
/// `content-length`. The caller answers HTTP 200 without a body.
pub(crate) fn set_headers(headers: &mut HeaderMap, grpc: Grpc, grpc_status: u32, text: &[u8]) {
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS, HeaderValue::from(grpc_status));
    if !text.is_empty() && grpc != (Grpc::Request { head: true }) {
        headers.insert(GRPC_MESSAGE, message(text));
    }
}

/// `grpc-message` for a local reply's text, percent-encoded as Envoy does
/// (`Http::Utility::PercentEncoding::encode`): `%` and every byte outside printable ASCII.
fn message(text: &[u8]) -> HeaderValue {
    let mut s = String::with_capacity(text.len());
    for &b in text {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    // Printable ASCII only.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let kind = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            Grpc::of(&Method::POST, &h)
        };
        let request = Grpc::Request { head: false };
        assert_eq!(kind("application/grpc"), request);
        assert_eq!(kind("application/grpc+proto"), request);
        assert_eq!(kind("application/grpc-web"), Grpc::Like);
        assert_eq!(kind("application/grpc;charset=utf-8"), Grpc::Like);
        assert_eq!(kind("Application/gRPC"), Grpc::No);
        assert_eq!(Grpc::of(&Method::POST, &HeaderMap::new()), Grpc::No);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            message(b"50% off, caf\xc3\xa9\t\n"),
            "50%25 off, caf%C3%A9%09%0A"
        );
    }
}
