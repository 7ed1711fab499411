//! Envoy's admin `/stats`: the proxy's `envoy_*` families under Envoy's dotted stat names.
//!
//! mesh records its Envoy stats as an Istio sidecar's Prometheus output shows them: the
//! tag-extracted name (`cluster.upstream_rq`) sanitized with an `envoy_` prefix, the tags
//! (Istio's bootstrap `stats_tags`, [`crate::telemetry::stats_tags`]) as labels. `/stats`
//! inverts that: the dots come back from the scopes Envoy names (`cluster_manager.cds.`,
//! `circuit_breakers.default.`, …), and each tag value goes back where its regex took it from —
//! `cluster.<cluster_name>;.`, `http.<http_conn_manager_prefix>;.`,
//! `listener.<listener_address>.`, and `_<response_code>` / `_<response_code_class>` after
//! `_rq` — so `envoy_cluster_upstream_rq{cluster_name="c",response_code="200"}` reads
//! `cluster.c;.upstream_rq_200`.
//!
//! Output as Envoy's `StatsRequest` writes it: counters and gauges together sorted by name,
//! then histograms sorted by name (`P0(interval,cumulative) … P100(…)`, or `No recorded
//! values`); `?filter=<regex>` (matched anywhere in the dotted name), `?usedonly`,
//! `?type=Counters|Gauges|Histograms|TextReadouts|All`, `?format=json`.
//!
//! What the Prometheus recorder cannot tell, approximated: a counter is "used" once non-zero
//! and a gauge always (Envoy marks both on first write); histogram quantiles are interpolated
//! in the recorded buckets (Envoy's come from its exact log-linear histogram), and there is no
//! flush interval, so the interval value is `nan` (JSON `null`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use regex::Regex;

use crate::telemetry::stats_tags::{
    CLUSTER_NAME, HTTP_CONN_MANAGER_PREFIX, LISTENER_ADDRESS, RESPONSE_CODE, RESPONSE_CODE_CLASS,
};

/// Envoy's histogram quantiles, in percent (`supported_quantiles`).
pub const SUPPORTED_QUANTILES: [f64; 10] =
    [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

/// Output format of `/stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `name: value` lines.
    Text,
    /// `{"stats":[{"name":…,"value":…},…,{"histograms":…}]}`.
    Json,
    /// The Prometheus exposition (served by the caller).
    Prometheus,
}

/// Which stat types `?type=` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatType {
    /// `All` (the default).
    All,
    /// `Counters`.
    Counters,
    /// `Gauges`.
    Gauges,
    /// `Histograms`.
    Histograms,
    /// `TextReadouts` (mesh has none).
    TextReadouts,
}

/// A `/stats` query Envoy would refuse, with Envoy's 400 body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    /// `?format=` other than Envoy's.
    #[error("usage: /stats?format=(html|active-html|json|prometheus|text)\n\n")]
    Format,
    /// `?type=` other than Envoy's.
    #[error("invalid &type= param")]
    Type,
    /// `?filter=` that does not compile.
    #[error("Invalid re2 regex: {0}")]
    Filter(String),
}

/// A parsed `/stats` query.
#[derive(Clone, Debug)]
pub struct StatsQuery {
    /// `?format=`.
    pub format: Format,
    /// `?usedonly`.
    pub used_only: bool,
    /// `?filter=`.
    pub filter: Option<Regex>,
    /// `?type=`.
    pub stat_type: StatType,
}

impl StatsQuery {
    /// Parses the query string as Envoy's admin does: percent-decoded (`+` stays `+`, it is
    /// a regex operator), the first of repeated parameters wins.
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut params: BTreeMap<String, String> = BTreeMap::new();
        for kv in query
            .unwrap_or_default()
            .split('&')
            .filter(|kv| !kv.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            params
                .entry(percent_decode(k))
                .or_insert_with(|| percent_decode(v));
        }
        let format = match params.get("format").map(String::as_str) {
            None | Some("text") => Format::Text,
            Some("json") => Format::Json,
            Some("prometheus") => Format::Prometheus,
            Some(_) => return Err(QueryError::Format),
        };
        let stat_type = match params.get("type").map(String::as_str) {
            None | Some("All") => StatType::All,
            Some("Counters") => StatType::Counters,
            Some("Gauges") => StatType::Gauges,
            Some("Histograms") => StatType::Histograms,
            Some("TextReadouts") => StatType::TextReadouts,
            Some(_) => return Err(QueryError::Type),
        };
        let filter = match params.get("filter").filter(|f| !f.is_empty()) {
            Some(f) => Some(Regex::new(f).map_err(|e| QueryError::Filter(e.to_string()))?),
            None => None,
        };
        Ok(StatsQuery {
            format,
            used_only: params.contains_key("usedonly"),
            filter,
            stat_type,
        })
    }

    fn keeps(&self, name: &str, kind: Kind) -> bool {
        let typed = matches!(
            (self.stat_type, kind),
            (StatType::All, _)
                | (StatType::Counters, Kind::Counter)
                | (StatType::Gauges, Kind::Gauge)
                | (StatType::Histograms, Kind::Histogram)
        );
        typed && self.filter.as_ref().is_none_or(|f| f.is_match(name))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One histogram's cumulative buckets (upper bound, count at or below it) and sample count.
#[derive(Debug, Default)]
struct Buckets {
    bounds: Vec<(f64, f64)>,
    count: f64,
}

impl Buckets {
    /// The value at `percent`, interpolated linearly inside the bucket holding that rank
    /// (the first bucket starts at 0); `None` without samples. Ranks in the `+Inf` bucket
    /// read as the largest finite bound.
    fn quantile(&self, percent: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = (percent / 100.0 * self.count).max(f64::MIN_POSITIVE);
        let mut prev = (0.0, 0.0);
        for &(bound, cum) in &self.bounds {
            if cum >= rank {
                if bound.is_infinite() {
                    return Some(prev.0);
                }
                let inside = cum - prev.1;
                let frac = if inside > 0.0 {
                    (rank - prev.1) / inside
                } else {
                    1.0
                };
                return Some(prev.0 + (bound - prev.0) * frac);
            }
            prev = (bound, cum);
        }
        Some(prev.0)
    }
}

/// The Envoy stats of a Prometheus exposition, by dotted name.
#[derive(Debug, Default)]
pub struct EnvoyStats {
    scalars: BTreeMap<String, (Kind, f64)>,
    histograms: BTreeMap<String, Buckets>,
}

impl EnvoyStats {
    /// Reads the `envoy_*` counters, gauges and histograms of `prometheus` (the text
    /// exposition) under their dotted names; other families are left out.
    pub fn from_prometheus(prometheus: &str) -> Self {
        let mut types: BTreeMap<&str, &str> = BTreeMap::new();
        let mut out = EnvoyStats::default();
        for line in prometheus.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, ty)) = rest.split_once(' ') {
                    types.insert(name, ty.trim());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((name, labels, value)) = parse_sample(line) else {
                continue;
            };
            if !name.starts_with("envoy_") {
                continue;
            }
            let (family, part) = match types.get(name) {
                Some(&"counter") => (name, Part::Counter),
                Some(&"gauge") => (name, Part::Gauge),
                _ => match histogram_part(name) {
                    Some((family, part)) if types.get(family) == Some(&"histogram") => {
                        (family, part)
                    }
                    _ => continue,
                },
            };
            let mut labels = labels;
            let le = match part {
                Part::Bucket => match labels.iter().position(|(k, _)| k == "le") {
                    Some(i) => Some(labels.remove(i).1),
                    None => continue,
                },
                _ => None,
            };
            let Some(dotted) = dotted_name(family, &labels) else {
                continue;
            };
            match part {
                Part::Counter => {
                    out.scalars.insert(dotted, (Kind::Counter, value));
                }
                Part::Gauge => {
                    out.scalars.insert(dotted, (Kind::Gauge, value));
                }
                Part::Bucket => {
                    let bound = match le.as_deref() {
                        Some("+Inf") => f64::INFINITY,
                        Some(b) => match b.parse() {
                            Ok(b) => b,
                            Err(_) => continue,
                        },
                        None => continue,
                    };
                    out.histograms
                        .entry(dotted)
                        .or_default()
                        .bounds
                        .push((bound, value));
                }
                Part::Count => out.histograms.entry(dotted).or_default().count = value,
                Part::Sum => {
                    out.histograms.entry(dotted).or_default();
                }
            }
        }
        for h in out.histograms.values_mut() {
            h.bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        out
    }

    /// The dotted names of the counters and gauges, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.scalars.keys().map(String::as_str)
    }

    /// The dotted names of the histograms, sorted.
    pub fn histogram_names(&self) -> impl Iterator<Item = &str> {
        self.histograms.keys().map(String::as_str)
    }

    fn kept_scalars<'a>(&'a self, q: &'a StatsQuery) -> impl Iterator<Item = (&'a str, f64)> {
        self.scalars
            .iter()
            .filter_map(move |(name, &(kind, value))| {
                let used = kind == Kind::Gauge || value != 0.0;
                (q.keeps(name, kind) && (used || !q.used_only)).then_some((name.as_str(), value))
            })
    }

    fn kept_histograms<'a>(
        &'a self,
        q: &'a StatsQuery,
    ) -> impl Iterator<Item = (&'a str, &'a Buckets)> {
        self.histograms.iter().filter_map(move |(name, h)| {
            (q.keeps(name, Kind::Histogram) && (h.count > 0.0 || !q.used_only))
                .then_some((name.as_str(), h))
        })
    }

    /// Envoy's text form: `name: value` lines, then histogram lines.
    pub fn text(&self, q: &StatsQuery) -> String {
        let mut out = String::new();
        for (name, value) in self.kept_scalars(q) {
            let _ = writeln!(out, "{name}: {}", number(value));
        }
        for (name, h) in self.kept_histograms(q) {
            let _ = write!(out, "{name}:");
            if h.count <= 0.0 {
                out.push_str(" No recorded values");
            }
            for p in SUPPORTED_QUANTILES {
                if let Some(v) = h.quantile(p) {
                    let _ = write!(out, " P{}(nan,{})", number(p), number(v));
                }
            }
            out.push('\n');
        }
        out
    }

    /// Envoy's `?format=json`: `{"stats":[{"name","value"}…]}`, histograms as a last element
    /// `{"histograms":{"supported_quantiles":[…],"computed_quantiles":[{"name","values":
    /// [{"cumulative","interval"}…]}…]}}` when any is kept. Compact, keys in Envoy's order.
    pub fn json(&self, q: &StatsQuery) -> String {
        let quote = |s: &str| serde_json::Value::from(s).to_string();
        let mut items: Vec<String> = self
            .kept_scalars(q)
            .map(|(name, value)| {
                format!("{{\"name\":{},\"value\":{}}}", quote(name), number(value))
            })
            .collect();
        let hists: Vec<String> = self
            .kept_histograms(q)
            .map(|(name, h)| {
                let values: Vec<String> = SUPPORTED_QUANTILES
                    .iter()
                    .map(|&p| {
                        let c = h.quantile(p).map_or("null".to_owned(), number);
                        format!("{{\"cumulative\":{c},\"interval\":null}}")
                    })
                    .collect();
                format!(
                    "{{\"name\":{},\"values\":[{}]}}",
                    quote(name),
                    values.join(",")
                )
            })
            .collect();
        if !hists.is_empty() {
            let supported: Vec<String> = SUPPORTED_QUANTILES.iter().map(|&p| number(p)).collect();
            items.push(format!(
                "{{\"histograms\":{{\"supported_quantiles\":[{}],\"computed_quantiles\":[{}]}}}}",
                supported.join(","),
                hists.join(",")
            ));
        }
        format!("{{\"stats\":[{}]}}", items.join(","))
    }
}

/// A number as Envoy prints it: integers without a fraction, others in shortest form.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e17 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Counter,
    Gauge,
    Bucket,
    Count,
    Sum,
}

fn histogram_part(name: &str) -> Option<(&str, Part)> {
    [
        ("_bucket", Part::Bucket),
        ("_count", Part::Count),
        ("_sum", Part::Sum),
    ]
    .into_iter()
    .find_map(|(suffix, part)| name.strip_suffix(suffix).map(|f| (f, part)))
}

/// A sample's labels, in the order written.
type Labels = Vec<(String, String)>;

/// `name{l="v",…} value` → parts; label values unescaped.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches([',', ' ']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = s.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_owned(), value));
            s = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// Sanitized scope prefixes back to Envoy's dotted ones: the root scope, then the sub-scopes
/// Envoy names inside it (longest first within each root).
const ROOTS: [(&str, &[(&str, &str)]); 8] = [
    ("cluster_manager_", &[("cds_", "cds.")]),
    ("listener_manager_", &[("lds_", "lds.")]),
    ("control_plane_", &[]),
    (
        "cluster_",
        &[
            ("circuit_breakers_default_", "circuit_breakers.default."),
            ("circuit_breakers_high_", "circuit_breakers.high."),
            ("outlier_detection_", "outlier_detection."),
            ("retry_upstream_rq", "retry.upstream_rq"),
            ("ssl_", "ssl."),
        ],
    ),
    ("listener_", &[("ssl_", "ssl.")]),
    ("http_", &[]),
    ("server_", &[]),
    ("tcp_", &[]),
];

/// The dotted name Envoy gives the stat Prometheus shows as `family{labels}` (with Istio's
/// tags), or `None` for a family outside Envoy's scopes or a label no tag regex makes.
fn dotted_name(family: &str, labels: &[(String, String)]) -> Option<String> {
    let rest = family.strip_prefix("envoy_")?;
    let (root, subs) = ROOTS.iter().find(|(root, _)| rest.starts_with(root))?;
    let root = &root[..root.len() - 1];
    let mut stat = rest[root.len() + 1..].to_owned();
    if let Some((from, to)) = subs.iter().find(|(from, _)| stat.starts_with(from)) {
        stat = format!("{to}{}", &stat[from.len()..]);
    }
    let mut scope_tag = None;
    for (key, value) in labels {
        match key.as_str() {
            k if k == RESPONSE_CODE || k == RESPONSE_CODE_CLASS => {
                if !stat.ends_with("_rq") {
                    return None;
                }
                stat = format!("{stat}_{value}");
            }
            k if (k == CLUSTER_NAME && root == "cluster")
                || (k == HTTP_CONN_MANAGER_PREFIX && root == "http") =>
            {
                scope_tag = Some(format!("{value};"));
            }
            k if k == LISTENER_ADDRESS && root == "listener" => scope_tag = Some(value.clone()),
            _ => return None,
        }
    }
    Some(match scope_tag {
        Some(tag) => format!("{root}.{tag}.{stat}"),
        None => format!("{root}.{stat}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# TYPE envoy_cluster_upstream_rq counter
envoy_cluster_upstream_rq{cluster_name="outbound|9080||r.default.svc.cluster.local",response_code="200"} 3
envoy_cluster_upstream_rq{response_code_class="2xx",cluster_name="outbound|9080||r.default.svc.cluster.local"} 3
# TYPE envoy_cluster_upstream_rq_total counter
envoy_cluster_upstream_rq_total{cluster_name="outbound|9080||r.default.svc.cluster.local"} 3
# TYPE envoy_cluster_upstream_rq_timeout counter
envoy_cluster_upstream_rq_timeout{cluster_name="outbound|9080||r.default.svc.cluster.local"} 0
# TYPE envoy_cluster_circuit_breakers_default_rq_open gauge
envoy_cluster_circuit_breakers_default_rq_open{cluster_name="outbound|9080||r.default.svc.cluster.local"} 0
# TYPE envoy_cluster_outlier_detection_ejections_active gauge
envoy_cluster_outlier_detection_ejections_active{cluster_name="c"} 1
# TYPE envoy_cluster_retry_upstream_rq counter
envoy_cluster_retry_upstream_rq{cluster_name="c",response_code="503"} 1
# TYPE envoy_http_downstream_rq counter
envoy_http_downstream_rq{response_code_class="2xx",http_conn_manager_prefix="inbound_0.0.0.0_8080"} 3
# TYPE envoy_listener_downstream_cx_total counter
envoy_listener_downstream_cx_total{listener_address="0.0.0.0_15006"} 2
# TYPE envoy_listener_manager_lds_update_success counter
envoy_listener_manager_lds_update_success 4
# TYPE envoy_cluster_manager_cds_update_success counter
envoy_cluster_manager_cds_update_success 4
# TYPE envoy_control_plane_connected_state gauge
envoy_control_plane_connected_state 1
# TYPE envoy_server_live gauge
envoy_server_live 1
# TYPE istio_requests_total counter
istio_requests_total{reporter="source"} 3
# TYPE envoy_cluster_upstream_rq_time histogram
envoy_cluster_upstream_rq_time_bucket{cluster_name="c",le="0.5"} 0
envoy_cluster_upstream_rq_time_bucket{cluster_name="c",le="1"} 2
envoy_cluster_upstream_rq_time_bucket{cluster_name="c",le="5"} 4
envoy_cluster_upstream_rq_time_bucket{cluster_name="c",le="+Inf"} 4
envoy_cluster_upstream_rq_time_sum{cluster_name="c"} 7
envoy_cluster_upstream_rq_time_count{cluster_name="c"} 4
envoy_cluster_upstream_rq_time_bucket{cluster_name="d",le="0.5"} 0
envoy_cluster_upstream_rq_time_bucket{cluster_name="d",le="+Inf"} 0
envoy_cluster_upstream_rq_time_sum{cluster_name="d"} 0
envoy_cluster_upstream_rq_time_count{cluster_name="d"} 0
"#;

    fn q(query: &str) -> StatsQuery {
        StatsQuery::parse(Some(query)).expect("valid query")
    }

    #[test]
    fn prometheus_names_read_back_as_envoys_dotted_names() {
        let s = EnvoyStats::from_prometheus(SAMPLE);
        let r = "cluster.outbound|9080||r.default.svc.cluster.local;";
        let names: Vec<&str> = s.names().collect();
        let want = [
            "cluster.c;.outlier_detection.ejections_active".to_owned(),
            "cluster.c;.retry.upstream_rq_503".to_owned(),
            format!("{r}.circuit_breakers.default.rq_open"),
            format!("{r}.upstream_rq_200"),
            format!("{r}.upstream_rq_2xx"),
            format!("{r}.upstream_rq_timeout"),
            format!("{r}.upstream_rq_total"),
            "cluster_manager.cds.update_success".to_owned(),
            "control_plane.connected_state".to_owned(),
            "http.inbound_0.0.0.0_8080;.downstream_rq_2xx".to_owned(),
            "listener.0.0.0.0_15006.downstream_cx_total".to_owned(),
            "listener_manager.lds.update_success".to_owned(),
            "server.live".to_owned(),
        ];
        assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            s.histogram_names().collect::<Vec<_>>(),
            ["cluster.c;.upstream_rq_time", "cluster.d;.upstream_rq_time"]
        );
    }

    #[test]
    fn text_json_filter_usedonly_and_type() {
        let s = EnvoyStats::from_prometheus(SAMPLE);
        let text = s.text(&q("filter=upstream_rq_t"));
        assert_eq!(
            text,
            "cluster.outbound|9080||r.default.svc.cluster.local;.upstream_rq_timeout: 0\n\
             cluster.outbound|9080||r.default.svc.cluster.local;.upstream_rq_total: 3\n\
             cluster.c;.upstream_rq_time: P0(nan,0.5) P25(nan,0.75) P50(nan,1) P75(nan,3) \
             P90(nan,4.2) P95(nan,4.6) P99(nan,4.92) P99.5(nan,4.96) P99.9(nan,4.992000000000001) P100(nan,5)\n\
             cluster.d;.upstream_rq_time: No recorded values\n"
        );
        // usedonly: zero counters and empty histograms go; gauges stay.
        let used = s.text(&q("usedonly&filter=rq_(timeout|total|open|time)"));
        assert!(!used.contains("upstream_rq_timeout"), "{used}");
        assert!(!used.contains("cluster.d;"), "{used}");
        assert!(used.contains("rq_open: 0\n"), "{used}");
        assert!(used.contains("upstream_rq_total: 3\n"), "{used}");
        // Percent-decoded, `+` kept as the regex operator.
        assert_eq!(s.text(&q("filter=%5Eserver%2Eliv+")), "server.live: 1\n");
        assert_eq!(
            s.text(&q("type=Gauges&filter=^(server|control)"))
                .lines()
                .count(),
            2
        );
        assert_eq!(s.text(&q("type=Histograms")).lines().count(), 2);
        assert_eq!(s.text(&q("type=TextReadouts")), "");
        assert_eq!(
            s.json(&q("filter=^server")),
            r#"{"stats":[{"name":"server.live","value":1}]}"#
        );
        assert_eq!(s.json(&q("filter=nothing")), r#"{"stats":[]}"#);
        let j: serde_json::Value =
            serde_json::from_str(&s.json(&q("filter=rq_time$"))).expect("json");
        let h = &j["stats"][0]["histograms"];
        assert_eq!(h["supported_quantiles"][7], serde_json::json!(99.5));
        assert_eq!(
            h["computed_quantiles"][0]["values"][2]["cumulative"],
            serde_json::json!(1)
        );
        assert_eq!(
            h["computed_quantiles"][1]["values"][2]["cumulative"],
            serde_json::Value::Null
        );
        for (bad, err) in [
            ("format=xml", QueryError::Format),
            ("type=Foo", QueryError::Type),
        ] {
            assert_eq!(StatsQuery::parse(Some(bad)).unwrap_err(), err);
        }
        assert!(matches!(
            StatsQuery::parse(Some("filter=(((")),
            Err(QueryError::Filter(_))
        ));
    }
}
