//! The `tracing_subscriber` layer: collects a request span's fields while it is open and
//! queues the finished OTLP span when it closes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::Counters;
use crate::proto::{self, KeyValue, any_value::Value};

/// Turns closed request spans into OTLP spans on the exporter's queue. Build it with
/// [`crate::layer`].
pub struct OtelLayer {
    queue: mpsc::Sender<proto::Span>,
    counters: Arc<Counters>,
}

impl fmt::Debug for OtelLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelLayer")
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl OtelLayer {
    pub(crate) fn new(queue: mpsc::Sender<proto::Span>, counters: Arc<Counters>) -> Self {
        OtelLayer { queue, counters }
    }
}

/// What an open span has recorded so far.
#[derive(Debug, Default)]
struct SpanData {
    name: Option<String>,
    kind: i32,
    start_unix_nano: u64,
    trace_id: Option<[u8; 16]>,
    span_id: Option<[u8; 8]>,
    parent_span_id: Option<[u8; 8]>,
    sampled: bool,
    status_code: Option<i64>,
    attributes: Vec<KeyValue>,
}

fn now_unix_nano() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `N` bytes from exactly `2 * N` hex digits.
fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = (digit(s[2 * i])? << 4) | digit(s[2 * i + 1])?;
    }
    Some(out)
}

impl SpanData {
    fn set_str(&mut self, name: &str, value: &str) {
        match name {
            "trace_id" => self.trace_id = parse_hex(value),
            "span_id" => self.span_id = parse_hex(value),
            "parent_span_id" => self.parent_span_id = parse_hex(value),
            "operation" | "otel.name" => self.name = Some(value.to_owned()),
            "otel.kind" => {
                self.kind = match value {
                    "server" => proto::SPAN_KIND_SERVER,
                    "client" => proto::SPAN_KIND_CLIENT,
                    _ => proto::SPAN_KIND_INTERNAL,
                }
            }
            _ => {
                if name == "http.status_code" {
                    self.status_code = value.parse().ok();
                }
                self.set(name, Value::StringValue(value.to_owned()))
            }
        }
    }

    fn set(&mut self, name: &str, value: Value) {
        if name == "http.status_code"
            && let Value::IntValue(code) = value
        {
            self.status_code = Some(code);
        }
        match self.attributes.iter_mut().find(|kv| kv.key == name) {
            Some(kv) => kv.value = Some(proto::AnyValue { value: Some(value) }),
            None => self.attributes.push(KeyValue::new(name, value)),
        }
    }

    fn into_span(self) -> Option<proto::Span> {
        let (trace_id, span_id) = (self.trace_id?, self.span_id?);
        if !self.sampled {
            return None;
        }
        // Envoy marks 5xx (and requests that got no response) as errors.
        let status = self
            .status_code
            .filter(|c| *c == 0 || *c >= 500)
            .map(|_| proto::Status {
                message: String::new(),
                code: proto::STATUS_CODE_ERROR,
            });
        Some(proto::Span {
            trace_id: trace_id.to_vec(),
            span_id: span_id.to_vec(),
            trace_state: String::new(),
            parent_span_id: self.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            kind: self.kind,
            start_time_unix_nano: self.start_unix_nano,
            end_time_unix_nano: now_unix_nano(),
            attributes: self.attributes,
            status,
            flags: 1,
        })
    }
}

impl Visit for SpanData {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set_str(field.name(), value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "sampled" {
            self.sampled = value;
        } else {
            self.set(field.name(), Value::BoolValue(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), Value::IntValue(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(
            field.name(),
            Value::IntValue(i64::try_from(value).unwrap_or(i64::MAX)),
        );
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), Value::DoubleValue(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `display(..)` values arrive here: their Debug is their Display.
        self.set_str(field.name(), &format!("{value:?}"));
    }
}

impl<S> Layer<S> for OtelLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut data = SpanData {
            start_unix_nano: now_unix_nano(),
            ..SpanData::default()
        };
        attrs.record(&mut data);
        if data.name.is_none() {
            data.name = Some(attrs.metadata().name().to_owned());
        }
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(data) = span.extensions_mut().get_mut::<SpanData>() {
            values.record(data);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(data) = span.extensions_mut().remove::<SpanData>() else {
            return;
        };
        let Some(otlp) = data.into_span() else { return };
        match self.queue.try_send(otlp) {
            Ok(()) => self.counters.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_parse_exactly() {
        assert_eq!(
            parse_hex::<8>("00f067aa0ba902b7"),
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_eq!(parse_hex::<8>("00f067aa0ba902b"), None);
        assert_eq!(parse_hex::<8>("00f067aa0ba902bz"), None);
    }

    #[test]
    fn unsampled_or_idless_spans_are_not_exported() {
        let mut d = SpanData::default();
        d.set_str("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
        d.set_str("span_id", "00f067aa0ba902b7");
        assert!(d.into_span().is_none(), "not sampled");
        let mut d = SpanData {
            sampled: true,
            ..SpanData::default()
        };
        d.set_str("span_id", "00f067aa0ba902b7");
        assert!(d.into_span().is_none(), "no trace id");
    }

    #[test]
    fn server_errors_set_the_error_status() {
        let mut d = SpanData {
            sampled: true,
            ..SpanData::default()
        };
        d.set_str("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
        d.set_str("span_id", "00f067aa0ba902b7");
        d.set_str("otel.kind", "client");
        d.set("http.status_code", Value::IntValue(503));
        let s = d.into_span().unwrap();
        assert_eq!(s.kind, proto::SPAN_KIND_CLIENT);
        assert_eq!(s.status.unwrap().code, proto::STATUS_CODE_ERROR);
        assert!(s.parent_span_id.is_empty());
    }
}
