//! pilot-agent's merged `/stats/prometheus` (FACTS.md e.2): the agent's own `istio_agent_*`
//! families, then the proxy's (`envoy_*`, `istio_*`), then the application's — its in-process
//! `metrics` facade families, then what its endpoint named in `ISTIO_PROMETHEUS_ANNOTATIONS`
//! answers, in the format it chose. OpenMetrics bodies lose their `# EOF`; one is appended last.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// Text exposition format 0.0.4.
pub const FMT_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// OpenMetrics 1.0.0.
pub const FMT_OPENMETRICS_1: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// OpenMetrics 0.0.1.
pub const FMT_OPENMETRICS_0: &str = "application/openmetrics-text; version=0.0.1; charset=utf-8";

/// Largest application body read (pilot-agent: 10 MiB).
pub const MAX_APP_BODY: usize = 10 * 1024 * 1024;

/// Ports pilot-agent refuses to scrape as "application" metrics.
pub const RESERVED_PORTS: [u16; 9] = [
    15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090,
];

/// `ISTIO_PROMETHEUS_ANNOTATIONS` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeConfigError {
    /// Not the JSON the injector writes.
    #[error("ISTIO_PROMETHEUS_ANNOTATIONS is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A port that is not a number.
    #[error("ISTIO_PROMETHEUS_ANNOTATIONS port {0:?} is not a port number")]
    Port(String),
}

#[derive(Debug, Deserialize)]
struct Annotations {
    #[serde(default)]
    scrape: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    targets: Vec<TargetJson>,
}

#[derive(Debug, Deserialize)]
struct TargetJson {
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    path: Option<String>,
}

/// One application metrics endpoint on localhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// Port.
    pub port: u16,
    /// Path (default `/metrics`).
    pub path: String,
}

/// The application endpoints to merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppScrape {
    /// Targets (reserved ports left out).
    pub targets: Vec<ScrapeTarget>,
}

impl AppScrape {
    /// Parses `{"scrape":"true","path":"/metrics","port":"8080","targets":[{"port":..,"path":..}]}`.
    /// `scrape` other than `true` scrapes nothing.
    pub fn from_json(json: &str) -> Result<Self, ScrapeConfigError> {
        let a: Annotations = serde_json::from_str(json)?;
        if a.scrape
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("true"))
        {
            return Ok(AppScrape::default());
        }
        let parse_port = |p: Option<&str>| -> Result<u16, ScrapeConfigError> {
            match p.filter(|p| !p.is_empty()) {
                None => Ok(80),
                Some(p) => p.parse().map_err(|_| ScrapeConfigError::Port(p.to_owned())),
            }
        };
        let norm_path = |p: Option<&str>| match p.filter(|p| !p.is_empty()) {
            None => "/metrics".to_owned(),
            Some(p) if p.starts_with('/') => p.to_owned(),
            Some(p) => format!("/{p}"),
        };
        let mut targets = Vec::new();
        if a.targets.is_empty() {
            targets.push(ScrapeTarget {
                port: parse_port(a.port.as_deref())?,
                path: norm_path(a.path.as_deref()),
            });
        } else {
            for t in &a.targets {
                targets.push(ScrapeTarget {
                    port: parse_port(t.port.as_deref().or(a.port.as_deref()))?,
                    path: norm_path(t.path.as_deref().or(a.path.as_deref())),
                });
            }
        }
        targets.retain(|t| {
            let ok = !RESERVED_PORTS.contains(&t.port);
            if !ok {
                tracing::warn!(
                    port = t.port,
                    "not scraping application metrics on a reserved port"
                );
            }
            ok
        });
        Ok(AppScrape { targets })
    }
}

/// The `Accept` header sent to the application: only text and OpenMetrics media ranges,
/// `*/*` → text 0.0.4, `application/*` → OpenMetrics 0.0.1.
pub fn negotiate_accept(accept: Option<&str>) -> String {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return "text/plain;version=0.0.4".to_owned();
    };
    let mut out = Vec::new();
    for range in accept.split(',') {
        let range = range.trim();
        let media = range.split(';').next().unwrap_or("").trim();
        let params = range.get(media.len()..).unwrap_or("");
        let q = params
            .split(';')
            .map(str::trim)
            .find(|p| p.starts_with("q="))
            .map(|q| format!(";{q}"))
            .unwrap_or_default();
        match media {
            "*" | "*/*" => out.push(format!("text/plain;version=0.0.4{q}")),
            "application/*" => out.push(format!("application/openmetrics-text;version=0.0.1{q}")),
            m if m.starts_with("text/") || m == "application/openmetrics-text" => {
                out.push(range.to_owned())
            }
            _ => {}
        }
    }
    if out.is_empty() {
        "text/plain;version=0.0.4".to_owned()
    } else {
        out.join(",")
    }
}

/// The format of a scraped body from its `Content-Type`.
fn format_of(content_type: Option<&HeaderValue>) -> &'static str {
    let ct = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    if ct.starts_with("application/openmetrics-text") {
        if ct.contains("version=1.0.0") {
            FMT_OPENMETRICS_1
        } else {
            FMT_OPENMETRICS_0
        }
    } else {
        FMT_TEXT
    }
}

/// Scrapes one target; `None` on any failure (counted by the caller).
async fn scrape(
    target: &ScrapeTarget,
    accept: &str,
    forward: &HeaderMap,
    deadline: Duration,
) -> Option<(Bytes, &'static str)> {
    let fetch = async {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, target.port));
        let tcp = TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        let mut req = Request::get(target.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, accept);
        for name in ["user-agent", "x-prometheus-scrape-timeout-seconds"] {
            if let Some(v) = forward.get(name) {
                req = req.header(name, v);
            }
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).ok()?)
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let format = format_of(resp.headers().get(http::header::CONTENT_TYPE));
        let body = Limited::new(resp.into_body(), MAX_APP_BODY)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some((body, format))
    };
    tokio::time::timeout(deadline, fetch).await.ok().flatten()
}

/// Scrapes every target concurrently. Returns the bodies (EOF stripped) and the response
/// format: OpenMetrics only if every body was; mixed formats downgrade to text.
pub(crate) async fn scrape_app(
    app: &AppScrape,
    headers: &HeaderMap,
) -> (Vec<Bytes>, &'static str, usize) {
    if app.targets.is_empty() {
        return (Vec::new(), FMT_TEXT, 0);
    }
    let accept = negotiate_accept(
        headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let deadline = headers
        .get("x-prometheus-scrape-timeout-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(120));
    let results = futures_util::future::join_all(
        app.targets
            .iter()
            .map(|t| scrape(t, &accept, headers, deadline)),
    )
    .await;
    let mut failures = 0;
    let mut bodies = Vec::new();
    let mut format: Option<&'static str> = None;
    for r in results {
        match r {
            Some((body, f)) => {
                format = Some(match format {
                    None => f,
                    Some(prev) if prev == f => f,
                    Some(_) => FMT_TEXT,
                });
                bodies.push(strip_eof(body));
            }
            None => failures += 1,
        }
    }
    (bodies, format.unwrap_or(FMT_TEXT), failures)
}

fn strip_eof(body: Bytes) -> Bytes {
    let text = String::from_utf8_lossy(&body);
    if !text.contains("# EOF") {
        return body;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|l| l.trim_end() != "# EOF") {
        out.push_str(line);
        out.push('\n');
    }
    Bytes::from(out)
}

/// Which part of the merged output a family belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// `istio_agent_*`.
    Agent,
    /// `envoy_*` and `istio_*` (what Envoy's 15090 would show).
    Proxy,
    /// Everything else: the application's in-process metrics.
    App,
}

fn part_of(name: &str) -> Part {
    if name.starts_with("istio_agent_") {
        Part::Agent
    } else if name.starts_with("envoy_") || name.starts_with("istio_") {
        Part::Proxy
    } else {
        Part::App
    }
}

fn family_name(line: &str) -> Option<&str> {
    if let Some(rest) = line
        .strip_prefix("# TYPE ")
        .or_else(|| line.strip_prefix("# HELP "))
    {
        return rest.split_whitespace().next();
    }
    None
}

/// Splits a rendered text exposition into the three parts, keeping each family's lines
/// together and in order.
pub(crate) fn split_parts(rendered: &str) -> [String; 3] {
    let mut parts: [String; 3] = Default::default();
    let mut current_family = String::new();
    let mut current = Part::App;
    for line in rendered.lines() {
        if let Some(name) = family_name(line) {
            if name != current_family {
                current_family = name.to_owned();
                current = part_of(name);
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if !name.starts_with(current_family.as_str()) || current_family.is_empty() {
                current_family = name.to_owned();
                current = part_of(name);
            }
        }
        let idx = match current {
            Part::Agent => 0,
            Part::Proxy => 1,
            Part::App => 2,
        };
        if line.trim().is_empty() {
            continue;
        }
        parts[idx].push_str(line);
        parts[idx].push('\n');
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_parse_with_pilot_agents_defaults() {
        let a = AppScrape::from_json(r#"{"scrape":"true","port":"8080"}"#).unwrap();
        assert_eq!(
            a.targets,
            vec![ScrapeTarget {
                port: 8080,
                path: "/metrics".into()
            }]
        );
        let a = AppScrape::from_json(r#"{"scrape":"true","path":"/m","port":"15090"}"#).unwrap();
        assert!(a.targets.is_empty(), "reserved port");
        let a = AppScrape::from_json(r#"{"scrape":"false","port":"8080"}"#).unwrap();
        assert!(a.targets.is_empty());
        let a =
            AppScrape::from_json(r#"{"targets":[{"port":"1"},{"port":"2","path":"x"}]}"#).unwrap();
        assert_eq!(
            a.targets[1],
            ScrapeTarget {
                port: 2,
                path: "/x".into()
            }
        );
        assert!(AppScrape::from_json(r#"{"port":"http"}"#).is_err());
    }

    #[test]
    fn accept_keeps_only_text_and_openmetrics() {
        assert_eq!(
            negotiate_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/json;q=0.9,*/*;q=0.1"
            )),
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.1"
        );
        assert_eq!(negotiate_accept(None), "text/plain;version=0.0.4");
        assert_eq!(
            negotiate_accept(Some("application/*")),
            "application/openmetrics-text;version=0.0.1"
        );
    }

    #[test]
    fn families_split_into_agent_proxy_and_app() {
        let text = "# TYPE app_hits counter\napp_hits 1\n\n# TYPE envoy_server_live gauge\nenvoy_server_live 1\n# TYPE istio_agent_scrapes_total counter\nistio_agent_scrapes_total 3\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"b\"} 2\n";
        let [agent, proxy, app] = split_parts(text);
        assert_eq!(
            agent,
            "# TYPE istio_agent_scrapes_total counter\nistio_agent_scrapes_total 3\n"
        );
        assert!(proxy.contains("envoy_server_live 1") && proxy.contains("istio_requests_total{"));
        assert_eq!(app, "# TYPE app_hits counter\napp_hits 1\n");
        assert_eq!(strip_eof(Bytes::from("a 1\n# EOF\n")), Bytes::from("a 1\n"));
    }
}
