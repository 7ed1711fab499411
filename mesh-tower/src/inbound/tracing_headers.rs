//! Request-id and trace-context headers, and the request spans, shared by the inbound and
//! outbound paths: each proxy hop behaves as the sidecar's HTTP connection manager with a
//! tracer configured (Istio's default mesh config configures one).
//!
//! * `x-request-id`: kept when present, else a fresh UUID v4 (inbound: what the application
//!   sees; outbound: what the upstream sees, the same id on every retry and mirror).
//! * W3C `traceparent` (`00-<trace-id>-<parent-id>-<flags>`): when valid, the hop's span
//!   becomes the child of the received one: same trace id and flags, the hop's new span id as
//!   the parent id. `tracestate` passes through untouched. Invalid values are left alone.
//! * B3 multi-header (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`) and
//!   B3 single (`b3: <trace>-<span>[-<sampled>[-<parent>]]`): the same child-span step — the
//!   received span id becomes the parent span id and the hop's span id replaces it.
//! * No context received: a new trace is started (a `traceparent` with a fresh trace id, as
//!   Envoy's OpenTelemetry tracer injects) only when trace starting is on
//!   ([`start_traces`], which `mesh::otel::layer` turns on); otherwise none is started.
//!
//! Every format present gets the same new span id, and the hop's span ids
//! ([`SpanContext`]) go onto its `tracing` span ([`REQUEST_SPAN_TARGET`], `inbound` or
//! `outbound`), so that an exporter reports it with exactly the ids the peers saw.

use std::sync::atomic::{AtomicU32, Ordering};

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
/// B3 multi: sampling decision.
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// B3 multi: debug flag (`1` implies sampled).
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// `tracing` target of the per-request spans (`inbound` and `outbound`, at INFO).
pub const REQUEST_SPAN_TARGET: &str = "mesh::request";

/// The trace identifiers of one hop's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace id (a 64-bit B3 trace id sits in the low half).
    pub trace_id: u128,
    /// This hop's span id (the one sent on, as the next hop's parent).
    pub span_id: u64,
    /// The span id received from the caller; `None` when this hop started the trace.
    pub parent_span_id: Option<u64>,
    /// The sampling decision (`traceparent` flag `01`, `x-b3-sampled: 1`, B3 debug).
    pub sampled: bool,
}

/// Trace starting: `u32::MAX` = off, else the sampling probability in millionths.
static START: AtomicU32 = AtomicU32::new(u32::MAX);

/// Starts a new trace for requests that arrive without a trace context, sampling
/// `sampling_percentage` (0–100) of them, as Envoy does with a tracer configured
/// (`random_sampling`); `None` turns trace starting off (the default). Process-wide, like the
/// `tracing` subscriber whose exporter needs it.
pub fn start_traces(sampling_percentage: Option<f64>) {
    let v = match sampling_percentage {
        None => u32::MAX,
        Some(p) if p.is_nan() => 0,
        Some(p) => (p.clamp(0.0, 100.0) * 10_000.0).round() as u32,
    };
    START.store(v, Ordering::Relaxed);
}

/// Whether a subscriber wants request spans.
pub(crate) fn spans_enabled() -> bool {
    tracing::enabled!(target: REQUEST_SPAN_TARGET, tracing::Level::INFO)
}

/// Applies the request-id and trace-context rules to a request's headers (inbound: as they
/// reach the application; outbound: as they leave for the upstream), returning the hop's span
/// ids when the request carries (or now starts) a trace.
pub(crate) fn on_request(headers: &mut HeaderMap) -> Option<SpanContext> {
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
    if !(traceparent || b3_multi || b3_single) {
        return start_trace(headers);
    }
    let span = nonzero(rand::random());
    let mut ctx = None;
    if traceparent
        && let Some(tp) = headers.get_mut(TRACEPARENT)
        && let Some((child, received)) = traceparent_child(tp.as_bytes(), span)
    {
        *tp = child;
        ctx = Some(received);
    }
    if b3_single
        && let Some(b3) = headers.get_mut(B3)
        && let Some((child, received)) = b3_single_child(b3.as_bytes(), span)
    {
        *b3 = child;
        ctx = ctx.or(received);
    }
    if b3_multi && let Some(received) = b3_multi_context(headers, span) {
        let parent = headers.get(B3_SPAN_ID).cloned();
        if let Some(parent) = parent {
            headers.insert(B3_PARENT_SPAN_ID, parent);
        }
        headers.insert(B3_SPAN_ID, hex_value(&span.to_be_bytes()));
        ctx = ctx.or(Some(received));
    }
    // Nothing valid received: the tracer starts a trace (replacing an invalid traceparent).
    ctx.or_else(|| start_trace(headers))
}

/// A new trace with `traceparent` when trace starting is on.
fn start_trace(headers: &mut HeaderMap) -> Option<SpanContext> {
    let millionths = START.load(Ordering::Relaxed);
    if millionths == u32::MAX {
        return None;
    }
    let sampled = millionths >= 1_000_000 || rand::random_range(0..1_000_000) < millionths;
    let ctx = SpanContext {
        trace_id: rand::random::<u128>().max(1),
        span_id: nonzero(rand::random()),
        parent_span_id: None,
        sampled,
    };
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(b"00-");
    push_hex(&mut out, &ctx.trace_id.to_be_bytes());
    out.push(b'-');
    push_hex(&mut out, &ctx.span_id.to_be_bytes());
    out.extend_from_slice(if sampled { b"-01" } else { b"-00" });
    if let Ok(v) = HeaderValue::from_bytes(&out) {
        headers.insert(TRACEPARENT, v);
    }
    Some(ctx)
}

fn nonzero(span: u64) -> u64 {
    if span == 0 { 1 } else { span }
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
    // A shared buffer (one allocation): the outbound retry copy of the request head clones
    // the value by reference count, where a copied value is re-allocated as shared on its
    // first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

fn hex_value(bytes: &[u8]) -> HeaderValue {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn is_hex(v: &[u8], lens: &[usize]) -> bool {
    lens.contains(&v.len()) && v.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lower-case hex (already checked with [`is_hex`]) as a number.
fn parse_hex(v: &[u8]) -> u128 {
    v.iter().fold(0u128, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            _ => c - b'a' + 10,
        };
        (acc << 4) | u128::from(d)
    })
}

/// `00-<32 hex trace>-<16 hex parent>-<2 hex flags>` with `span` as the new parent id, and
/// the hop's ids; `None` when the value is not a valid version-00 traceparent (all-zero ids
/// are invalid).
fn traceparent_child(v: &[u8], span: u64) -> Option<(HeaderValue, SpanContext)> {
    if v.len() != 55 || &v[..3] != b"00-" || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (trace, parent, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !is_hex(trace, &[32]) || !is_hex(parent, &[16]) || !is_hex(flags, &[2]) {
        return None;
    }
    let (trace_id, parent_id) = (parse_hex(trace), parse_hex(parent) as u64);
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(&v[..36]);
    push_hex(&mut out, &span.to_be_bytes());
    out.extend_from_slice(&v[52..]);
    let ctx = SpanContext {
        trace_id,
        span_id: span,
        parent_span_id: Some(parent_id),
        sampled: parse_hex(flags) & 1 == 1,
    };
    Some((HeaderValue::from_bytes(&out).ok()?, ctx))
}

/// B3's sampling state: `1`/`true`/`d` (debug) sample, `0`/`false` deny, absent defers to
/// this hop (which samples).
fn b3_sampled(v: Option<&[u8]>) -> bool {
    !matches!(v, Some(b"0" | b"false"))
}

/// `<trace>-<span>[-<sampled>[-<parent>]]` → `<trace>-<new span>[-<sampled>]-<span>`; `None`
/// for the deny-only form (`0`/`1`/`d`) or anything malformed.
fn b3_single_child(v: &[u8], span: u64) -> Option<(HeaderValue, Option<SpanContext>)> {
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
    push_hex(&mut out, &span.to_be_bytes());
    if let Some(s) = sampled {
        out.push(b'-');
        out.extend_from_slice(s);
    }
    out.push(b'-');
    out.extend_from_slice(old_span);
    let (trace_id, parent) = (parse_hex(trace), parse_hex(old_span) as u64);
    let ctx = (trace_id != 0 && parent != 0).then_some(SpanContext {
        trace_id,
        span_id: span,
        parent_span_id: Some(parent),
        sampled: b3_sampled(sampled),
    });
    Some((HeaderValue::from_bytes(&out).ok()?, ctx))
}

/// The hop's ids from valid B3 multi headers (trace id and a 16-hex span id).
fn b3_multi_context(headers: &HeaderMap, span: u64) -> Option<SpanContext> {
    let parent = headers.get(B3_SPAN_ID)?.as_bytes();
    let trace = headers.get(B3_TRACE_ID)?.as_bytes();
    if !is_hex(parent, &[16]) || !is_hex(trace, &[16, 32]) {
        return None;
    }
    let debug = headers.get(B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
    Some(SpanContext {
        trace_id: parse_hex(trace),
        span_id: span,
        parent_span_id: Some(parse_hex(parent) as u64),
        sampled: debug || b3_sampled(headers.get(B3_SAMPLED).map(HeaderValue::as_bytes)),
    })
}

/// A request span: name, `otel.kind`, and every field mesh records on it.
macro_rules! request_span {
    ($name:literal, $kind:literal) => {
        tracing::info_span!(
            target: REQUEST_SPAN_TARGET,
            $name,
            otel.kind = $kind,
            component = "proxy",
            operation = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
            sampled = tracing::field::Empty,
            "guid:x-request-id" = tracing::field::Empty,
            http.method = tracing::field::Empty,
            http.url = tracing::field::Empty,
            http.protocol = tracing::field::Empty,
            http.status_code = tracing::field::Empty,
            upstream_cluster = tracing::field::Empty,
            response_flags = tracing::field::Empty,
            peer.principal = tracing::field::Empty,
            peer.address = tracing::field::Empty,
        )
    };
}

/// The span of one inbound request (`otel.kind = server`), disabled unless a subscriber
/// wants [`REQUEST_SPAN_TARGET`] at INFO.
pub fn inbound_span() -> tracing::Span {
    request_span!("inbound", "server")
}

/// The span of one outbound request (`otel.kind = client`), disabled unless a subscriber
/// wants [`REQUEST_SPAN_TARGET`] at INFO.
pub fn outbound_span() -> tracing::Span {
    request_span!("outbound", "client")
}

/// Lower-case hex of `N` bytes, formatted only when a subscriber records it.
struct Hex<const N: usize>([u8; N]);

impl<const N: usize> std::fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Records the request's fields on an enabled `span` (a no-op on a disabled one).
pub(crate) fn record_request(
    span: &tracing::Span,
    ctx: Option<&SpanContext>,
    head: (&http::Method, &http::Uri, http::Version, &HeaderMap),
) {
    if span.is_disabled() {
        return;
    }
    let (method, uri, version, headers) = head;
    if let Some(c) = ctx {
        span.record(
            "trace_id",
            tracing::field::display(Hex(c.trace_id.to_be_bytes())),
        );
        span.record(
            "span_id",
            tracing::field::display(Hex(c.span_id.to_be_bytes())),
        );
        if let Some(p) = c.parent_span_id {
            span.record(
                "parent_span_id",
                tracing::field::display(Hex(p.to_be_bytes())),
            );
        }
        span.record("sampled", c.sampled);
    }
    let authority = uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    // Envoy's operation name without a route decorator: `ingress <host>` / `egress <host>`.
    let direction = if span.metadata().is_some_and(|m| m.name() == "outbound") {
        "egress"
    } else {
        "ingress"
    };
    span.record(
        "operation",
        tracing::field::display(format_args!("{direction} {authority}")),
    );
    if let Some(id) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        span.record("guid:x-request-id", id);
    }
    span.record("http.method", method.as_str());
    span.record(
        "http.url",
        tracing::field::display(format_args!(
            "http://{authority}{}",
            uri.path_and_query().map_or("/", |p| p.as_str())
        )),
    );
    span.record("http.protocol", protocol(version));
}

/// The span of an inbound request with its request fields and the connection's (upstream
/// cluster `inbound|<port>||`, the peer's SPIFFE id and address) recorded.
pub(crate) fn inbound_request_span<B>(
    req: &http::Request<B>,
    ctx: Option<&SpanContext>,
    conn: Option<&super::access_log::ConnectionInfo>,
) -> tracing::Span {
    let span = inbound_span();
    if span.is_disabled() {
        return span;
    }
    record_request(
        &span,
        ctx,
        (req.method(), req.uri(), req.version(), req.headers()),
    );
    if let Some(c) = conn {
        span.record("upstream_cluster", &*c.upstream_cluster);
        span.record("peer.address", tracing::field::display(c.downstream_remote));
        if let Some(p) = &c.source_principal {
            span.record("peer.principal", p.as_str());
        }
    }
    span
}

/// Records the routed cluster on the current span when it is an `outbound` request span.
pub(crate) fn record_upstream_cluster(name: &str) {
    if !spans_enabled() {
        return;
    }
    let span = tracing::Span::current();
    if span
        .metadata()
        .is_some_and(|m| m.target() == REQUEST_SPAN_TARGET && m.name() == "outbound")
    {
        span.record("upstream_cluster", name);
    }
}

/// Records an outbound response (status, Envoy's response flags, the upstream's SPIFFE id)
/// on an enabled `span`.
pub(crate) fn record_outbound_response<B>(span: &tracing::Span, resp: &http::Response<B>) {
    if span.is_disabled() {
        return;
    }
    let flags = resp
        .extensions()
        .get::<mesh_core::flags::ResponseFlags>()
        .copied()
        .unwrap_or_default();
    let principal = resp
        .extensions()
        .get::<crate::outbound::UpstreamPrincipal>()
        .map(|p| &*p.0);
    record_response(
        span,
        resp.status().as_u16(),
        flags.as_str(),
        None,
        principal,
    );
}

/// Records the outcome on an enabled `span` (a no-op on a disabled one).
pub(crate) fn record_response(
    span: &tracing::Span,
    status: u16,
    response_flags: &str,
    upstream_cluster: Option<&str>,
    peer_principal: Option<&str>,
) {
    if span.is_disabled() {
        return;
    }
    // A string, as Envoy's tracers tag it.
    span.record("http.status_code", tracing::field::display(status));
    span.record("response_flags", response_flags);
    if let Some(c) = upstream_cluster {
        span.record("upstream_cluster", c);
    }
    if let Some(p) = peer_principal {
        span.record("peer.principal", p);
    }
}

/// `%PROTOCOL%`.
pub(crate) fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Serializes the tests that read or change the process-wide trace starting.
    static START_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        START_LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn request_id_is_a_uuid_v4_and_kept_when_sent() {
        let _l = lock();
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
        assert_eq!(on_request(&mut h), None);
        assert_eq!(h[REQUEST_ID].len(), 36);
        assert!(!h.contains_key(TRACEPARENT), "no trace is started");
        let mut again = HeaderMap::new();
        on_request(&mut again);
        assert_ne!(h[REQUEST_ID], again[REQUEST_ID], "a fresh id per request");
    }

    #[test]
    fn traceparent_gets_a_new_parent_id() {
        let (child, ctx) = traceparent_child(TP.as_bytes(), 0x1122334455667788).unwrap();
        assert_eq!(
            child,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01"
        );
        assert_eq!(
            ctx,
            SpanContext {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x1122334455667788,
                parent_span_id: Some(0x00f067aa0ba902b7),
                sampled: true,
            }
        );
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!traceparent_child(unsampled, 5).unwrap().1.sampled);
        assert!(
            traceparent_child(
                b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                1
            )
            .is_none()
        );
        assert!(
            traceparent_child(
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
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
    fn on_request_steps_traceparent_and_keeps_tracestate() {
        let _l = lock();
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        let ctx = on_request(&mut h).expect("a span context");
        let tp = h[TRACEPARENT].to_str().unwrap().to_owned();
        assert_eq!(&tp[..36], &TP[..36], "same version and trace id");
        assert_eq!(&tp[52..], "-01", "same flags");
        assert_eq!(
            tp[36..52],
            format!("{:016x}", ctx.span_id),
            "the hop's span id is sent on"
        );
        assert_eq!(ctx.parent_span_id, Some(0x00f067aa0ba902b7));
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
    }

    #[test]
    fn invalid_traceparent_is_left_alone_unless_traces_start() {
        let _l = lock();
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-zz-yy-01"));
        assert_eq!(on_request(&mut h), None);
        assert_eq!(h[TRACEPARENT], "00-zz-yy-01");

        start_traces(Some(100.0));
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-zz-yy-01"));
        let started = on_request(&mut h);
        let mut fresh = HeaderMap::new();
        let fresh_ctx = on_request(&mut fresh);
        start_traces(Some(0.0));
        let mut unsampled = HeaderMap::new();
        let unsampled_ctx = on_request(&mut unsampled);
        start_traces(None);

        let ctx = started.expect("a new trace replaces the invalid one");
        assert_eq!(ctx.parent_span_id, None);
        assert!(ctx.sampled);
        let tp = h[TRACEPARENT].to_str().unwrap();
        assert_eq!(
            tp,
            format!("00-{:032x}-{:016x}-01", ctx.trace_id, ctx.span_id)
        );
        let fresh_ctx = fresh_ctx.expect("a trace starts without a context");
        assert_ne!(fresh_ctx.trace_id, ctx.trace_id);
        assert!(fresh[TRACEPARENT].to_str().unwrap().starts_with("00-"));
        let unsampled_ctx = unsampled_ctx.expect("an unsampled trace still starts");
        assert!(!unsampled_ctx.sampled);
        assert!(unsampled[TRACEPARENT].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn b3_multi_headers_get_a_child_span() {
        let _l = lock();
        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE_ID,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7"),
        );
        h.insert(B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("0"));
        let ctx = on_request(&mut h).expect("a span context");
        assert_eq!(h[B3_PARENT_SPAN_ID], "e457b5a2e4d86bd1");
        assert_ne!(h[B3_SPAN_ID], "e457b5a2e4d86bd1");
        assert_eq!(h[B3_SPAN_ID], format!("{:016x}", ctx.span_id));
        assert_eq!(h[B3_TRACE_ID], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(ctx.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(ctx.parent_span_id, Some(0xe457b5a2e4d86bd1));
        assert!(!ctx.sampled, "x-b3-sampled: 0");

        // A 64-bit trace id sits in the low half; a bad span id leaves everything alone.
        let mut h = HeaderMap::new();
        h.insert(B3_TRACE_ID, HeaderValue::from_static("64fe8b2a57d3eff7"));
        h.insert(B3_SPAN_ID, HeaderValue::from_static("e457b5a2e4d86bd1"));
        assert_eq!(on_request(&mut h).unwrap().trace_id, 0x64fe8b2a57d3eff7);
        let mut h = HeaderMap::new();
        h.insert(B3_TRACE_ID, HeaderValue::from_static("64fe8b2a57d3eff7"));
        h.insert(B3_SPAN_ID, HeaderValue::from_static("nothex"));
        assert_eq!(on_request(&mut h), None);
        assert_eq!(h[B3_SPAN_ID], "nothex");
        assert!(!h.contains_key(B3_PARENT_SPAN_ID));
    }

    #[test]
    fn b3_single_gets_a_child_span() {
        let _l = lock();
        let (single, ctx) = b3_single_child(
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
            0xaa,
        )
        .unwrap();
        assert_eq!(
            single,
            "80f198ee56343ba864fe8b2a57d3eff7-00000000000000aa-1-e457b5a2e4d86bd1"
        );
        let ctx = ctx.unwrap();
        assert_eq!(ctx.parent_span_id, Some(0xe457b5a2e4d86bd1));
        assert!(ctx.sampled);
        assert!(b3_single_child(b"0", 1).is_none());

        let mut h = HeaderMap::new();
        h.insert(
            B3,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1"),
        );
        let ctx = on_request(&mut h).expect("a span context");
        assert_eq!(
            h[B3],
            format!(
                "80f198ee56343ba864fe8b2a57d3eff7-{:016x}-e457b5a2e4d86bd1",
                ctx.span_id
            )
        );
        assert!(ctx.sampled, "a deferred decision samples");
    }

    #[test]
    fn all_formats_present_share_the_hops_span_id() {
        let _l = lock();
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(
            B3_TRACE_ID,
            HeaderValue::from_static("4bf92f3577b34da6a3ce929d0e0e4736"),
        );
        h.insert(B3_SPAN_ID, HeaderValue::from_static("00f067aa0ba902b7"));
        h.insert(
            B3,
            HeaderValue::from_static("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"),
        );
        let ctx = on_request(&mut h).unwrap();
        let span = format!("{:016x}", ctx.span_id);
        assert_eq!(&h[TRACEPARENT].to_str().unwrap()[36..52], span);
        assert_eq!(h[B3_SPAN_ID], span.as_str());
        assert!(h[B3].to_str().unwrap().contains(&span));
    }
}

#[cfg(test)]
mod span_tests {
    #[test]
    fn request_spans_declare_every_recorded_field() {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for span in [super::inbound_span(), super::outbound_span()] {
                assert!(!span.is_disabled());
                let names: Vec<String> = span
                    .metadata()
                    .unwrap()
                    .fields()
                    .iter()
                    .map(|f| f.name().to_owned())
                    .collect();
                for f in [
                    "trace_id",
                    "span_id",
                    "parent_span_id",
                    "sampled",
                    "operation",
                    "guid:x-request-id",
                    "http.status_code",
                    "upstream_cluster",
                    "response_flags",
                    "peer.principal",
                ] {
                    assert!(names.iter().any(|n| n == f), "{f} in {names:?}");
                }
            }
        });
    }
}
