//! Request-id and trace-context headers on the inbound side, as the sidecar's HTTP connection
//! manager and tracer leave them for the application:
//!
//! * `x-request-id`: kept when the caller sent one (Envoy trusts it from mesh peers), else a
//!   fresh UUID v4.
//! * W3C `traceparent` (`00-<trace-id>-<parent-id>-<flags>`): when valid, the sidecar's span
//!   becomes the parent of the application's: same trace id and flags, a new parent id.
//!   `tracestate` passes through untouched. Invalid values are left alone.
//! * B3 multi-header (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`) and
//!   B3 single (`b3: <trace>-<span>[-<sampled>[-<parent>]]`): the same child-span step — the
//!   received span id becomes the parent span id and a new span id is generated.
//!
//! No trace is started when the caller sent none (Envoy does so only with a tracer provider
//! configured, and then samples); the application sees exactly the headers it would behind a
//! sidecar without a tracing provider, plus the child span step when one is present.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// `x-request-id`.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// B3 single header.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi: trace id.
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// B3 multi: span id.
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// B3 multi: parent span id.
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");

/// Applies the request-id and trace-context rules to an incoming request's headers.
pub(crate) fn on_request(headers: &mut HeaderMap) {
    // Names are pre-parsed constants: a `&str` name is parsed and classified on every lookup,
    // which made this function the costliest step of the inbound request path (issue 7).
    // One pass over the names (comparisons only) finds which headers are present: a keyed
    // lookup hashes the name, ~150 instructions each, and most requests carry none of these.
    let (mut request_id, mut traceparent, mut b3_multi, mut b3_single) =
        (false, false, false, false);
    for k in headers.keys() {
        if *k == REQUEST_ID {
            request_id = true;
        } else if *k == TRACEPARENT {
            traceparent = true;
        } else if *k == B3_SPAN_ID {
            b3_multi = true;
        } else if *k == B3 {
            b3_single = true;
        }
    }
    if !request_id {
        headers.insert(REQUEST_ID, new_request_id());
    }
    if traceparent
        && let Some(tp) = headers.get_mut(TRACEPARENT)
        && let Some(child) = traceparent_child(tp.as_bytes(), rand::random())
    {
        *tp = child;
    }
    if b3_multi
        && let Some(span) = headers.get(B3_SPAN_ID)
        && is_hex(span.as_bytes(), &[16])
        && headers.contains_key(B3_TRACE_ID)
    {
        let parent = span.clone();
        headers.insert(B3_PARENT_SPAN_ID, parent);
        headers.insert(B3_SPAN_ID, hex_value(&rand::random::<u64>().to_be_bytes()));
    }
    if b3_single
        && let Some(b3) = headers.get_mut(B3)
        && let Some(child) = b3_single_child(b3.as_bytes(), rand::random())
    {
        *b3 = child;
    }
}

/// A random UUID v4 (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`), as Envoy generates request ids.
pub fn new_request_id() -> HeaderValue {
    uuid_v4(rand::random())
}

fn uuid_v4(random: u128) -> HeaderValue {
    let mut b = random.to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut i = 0;
    for (n, byte) in b.iter().enumerate() {
        if matches!(n, 4 | 6 | 8 | 10) {
            out[i] = b'-';
            i += 1;
        }
        out[i] = HEX[usize::from(byte >> 4)];
        out[i + 1] = HEX[usize::from(byte & 0xf)];
        i += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(bytes: &[u8]) -> HeaderValue {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn is_hex(v: &[u8], lens: &[usize]) -> bool {
    lens.contains(&v.len()) && v.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// `00-<32 hex trace>-<16 hex parent>-<2 hex flags>` with a new parent id; `None` when the
/// value is not a valid version-00 traceparent (all-zero ids are invalid).
fn traceparent_child(v: &[u8], span: u64) -> Option<HeaderValue> {
    if v.len() != 55 || &v[..3] != b"00-" || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (trace, parent, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !is_hex(trace, &[32]) || !is_hex(parent, &[16]) || !is_hex(flags, &[2]) {
        return None;
    }
    if trace.iter().all(|&c| c == b'0') || parent.iter().all(|&c| c == b'0') {
        return None;
    }
    let span = if span == 0 { 1 } else { span };
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(&v[..36]);
    for b in span.to_be_bytes() {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
    out.extend_from_slice(&v[52..]);
    HeaderValue::from_bytes(&out).ok()
}

/// `<trace>-<span>[-<sampled>[-<parent>]]` → `<trace>-<new span>[-<sampled>]-<span>`; `None`
/// for the deny-only form (`0`/`1`/`d`) or anything malformed.
fn b3_single_child(v: &[u8], span: u64) -> Option<HeaderValue> {
    let mut parts = v.split(|&c| c == b'-');
    let trace = parts.next()?;
    let old_span = parts.next()?;
    let sampled = parts.next();
    if !is_hex(trace, &[16, 32]) || !is_hex(old_span, &[16]) {
        return None;
    }
    let mut out = Vec::with_capacity(v.len() + 17);
    out.extend_from_slice(trace);
    out.push(b'-');
    for b in span.to_be_bytes() {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
    if let Some(s) = sampled {
        out.push(b'-');
        out.extend_from_slice(s);
    }
    out.push(b'-');
    out.extend_from_slice(old_span);
    HeaderValue::from_bytes(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_a_uuid_v4_and_kept_when_sent() {
        let id = uuid_v4(u128::MAX);
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(s.matches('-').count(), 4);
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        on_request(&mut h);
        assert_eq!(h[REQUEST_ID], "abc");
        let mut h = HeaderMap::new();
        on_request(&mut h);
        assert_eq!(h[REQUEST_ID].len(), 36);
        assert!(!h.contains_key(TRACEPARENT), "no trace is started");
    }

    #[test]
    fn traceparent_gets_a_new_parent_id() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = traceparent_child(tp, 0x1122334455667788).unwrap();
        assert_eq!(
            child,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01"
        );
        assert!(
            traceparent_child(
                b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                1
            )
            .is_none()
        );
        assert!(traceparent_child(b"garbage", 1).is_none());
        assert!(
            traceparent_child(
                b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                1
            )
            .is_none()
        );
    }

    #[test]
    fn b3_headers_get_a_child_span() {
        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE_ID,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7"),
        );
        h.insert(B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        h.insert("x-b3-sampled", HeaderValue::from_static("1"));
        on_request(&mut h);
        assert_eq!(h[B3_PARENT_SPAN_ID], "e457b5a2e4d86bd1");
        assert_ne!(h[B3_SPAN_ID], "e457b5a2e4d86bd1");
        assert_eq!(h[B3_SPAN_ID].len(), 16);
        assert_eq!(h[B3_TRACE_ID], "80f198ee56343ba864fe8b2a57d3eff7");

        let single = b3_single_child(
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
            0xaa,
        )
        .unwrap();
        assert_eq!(
            single,
            "80f198ee56343ba864fe8b2a57d3eff7-00000000000000aa-1-e457b5a2e4d86bd1"
        );
        assert!(b3_single_child(b"0", 1).is_none());
    }
}
