//! Kubernetes probes rewritten by Istio's injector (FACTS.md e.3): `ISTIO_KUBE_APP_PROBERS`
//! maps `/app-health/<container>/{livez,readyz,startupz}` to the pod's original `httpGet`,
//! `tcpSocket` or `grpc` probe, which the status port runs against the application.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};

/// Largest application probe body relayed (pilot-agent: 10 KiB).
pub const MAX_PROBE_BODY: usize = 10 * 1024;

/// Source address of probe connections, so they are told apart from real traffic (Istio's
/// inbound capture bypass address).
pub const PROBE_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// `ISTIO_KUBE_APP_PROBERS` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbersError {
    /// Not the JSON map the injector writes.
    #[error("ISTIO_KUBE_APP_PROBERS is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A key is not an `/app-health/...` or `/app-lifecycle/...` path.
    #[error(
        "ISTIO_KUBE_APP_PROBERS has an invalid path {0:?}: want /app-health/<container>/(livez|readyz|startupz)"
    )]
    Path(String),
}

/// One rewritten probe.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Prober {
    /// The original `httpGet`.
    pub http_get: Option<HttpGet>,
    /// The original `tcpSocket`.
    pub tcp_socket: Option<TcpSocketProbe>,
    /// The original `grpc`.
    pub grpc: Option<GrpcProbe>,
    /// `timeoutSeconds` (Kubernetes default 1).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// Kubernetes `HTTPGetAction`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    /// Path (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// Port (a number; named ports are resolved by the injector).
    pub port: PortValue,
    /// Host override.
    #[serde(default)]
    pub host: Option<String>,
    /// `HTTP` or `HTTPS`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
}

/// A probe header.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct HttpHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// An `IntOrString` port.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortValue {
    /// A number.
    Number(u16),
    /// A string (numeric strings are accepted).
    Name(String),
}

impl PortValue {
    fn number(&self) -> Option<u16> {
        match self {
            PortValue::Number(n) => Some(*n),
            PortValue::Name(s) => s.parse().ok(),
        }
    }
}

/// Kubernetes `TCPSocketAction`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TcpSocketProbe {
    /// Port.
    pub port: PortValue,
    /// Host override.
    #[serde(default)]
    pub host: Option<String>,
}

/// Kubernetes `GRPCAction`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GrpcProbe {
    /// Port.
    pub port: u16,
    /// `service` in the health check request.
    #[serde(default)]
    pub service: Option<String>,
}

/// The parsed `ISTIO_KUBE_APP_PROBERS`.
#[derive(Debug, Clone, Default)]
pub struct AppProbers {
    probers: HashMap<String, Prober>,
}

fn valid_path(p: &str) -> bool {
    let mut parts = p.split('/');
    parts.next() == Some("")
        && matches!(parts.next(), Some("app-health" | "app-lifecycle"))
        && parts.next().is_some_and(|c| !c.is_empty())
        && matches!(
            parts.next(),
            Some("livez" | "readyz" | "startupz" | "prestopz" | "poststartz")
        )
        && parts.next().is_none()
}

impl AppProbers {
    /// Parses the injector's JSON (`{"/app-health/app/livez": {"httpGet": {...}, "timeoutSeconds": 1}}`).
    pub fn from_json(json: &str) -> Result<Self, ProbersError> {
        let probers: HashMap<String, Prober> = serde_json::from_str(json)?;
        if let Some(bad) = probers.keys().find(|p| !valid_path(p)) {
            return Err(ProbersError::Path(bad.clone()));
        }
        Ok(AppProbers { probers })
    }

    /// Whether any probe is configured.
    pub fn is_empty(&self) -> bool {
        self.probers.is_empty()
    }

    /// The probe for a status-port path.
    pub fn get(&self, path: &str) -> Option<&Prober> {
        self.probers.get(path)
    }
}

/// The result of a probe, as the status port answers it.
#[derive(Debug)]
pub(crate) struct ProbeAnswer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

impl ProbeAnswer {
    fn code(status: StatusCode) -> Self {
        ProbeAnswer {
            status,
            body: Bytes::new(),
        }
    }
}

async fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let (socket, source) = match target.ip() {
        IpAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(PROBE_SOURCE_V4)),
        IpAddr::V6(_) => (
            TcpSocket::new_v6()?,
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        ),
    };
    // 127.0.0.6 only exists where loopback is a /8 (Linux); elsewhere use any source.
    if target.ip().is_loopback() && socket.bind(SocketAddr::new(source, 0)).is_err() {
        let socket = match target.ip() {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        return socket.connect(target).await;
    }
    socket.connect(target).await
}

fn target(host: Option<&str>, default_host: IpAddr, port: u16) -> Option<SocketAddr> {
    let ip = match host.filter(|h| !h.is_empty()) {
        None => default_host,
        Some("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(h) => h.parse().ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

/// Runs `prober`, forwarding `incoming` headers for HTTP probes.
pub(crate) async fn run(
    prober: &Prober,
    default_host: IpAddr,
    incoming: &HeaderMap,
) -> ProbeAnswer {
    let timeout = Duration::from_secs(prober.timeout_seconds.unwrap_or(1).max(1));
    let probe = async {
        if let Some(h) = &prober.http_get {
            http_probe(h, default_host, incoming).await
        } else if let Some(t) = &prober.tcp_socket {
            let Some(addr) = t
                .port
                .number()
                .and_then(|p| target(t.host.as_deref(), default_host, p))
            else {
                return ProbeAnswer::code(StatusCode::INTERNAL_SERVER_ERROR);
            };
            match connect(addr).await {
                Ok(_) => ProbeAnswer::code(StatusCode::OK),
                Err(_) => ProbeAnswer::code(StatusCode::INTERNAL_SERVER_ERROR),
            }
        } else if let Some(g) = &prober.grpc {
            grpc_probe(g, default_host).await
        } else {
            ProbeAnswer::code(StatusCode::INTERNAL_SERVER_ERROR)
        }
    };
    tokio::time::timeout(timeout, probe)
        .await
        .unwrap_or_else(|_| ProbeAnswer::code(StatusCode::INTERNAL_SERVER_ERROR))
}

async fn http_probe(h: &HttpGet, default_host: IpAddr, incoming: &HeaderMap) -> ProbeAnswer {
    let fail = || ProbeAnswer::code(StatusCode::INTERNAL_SERVER_ERROR);
    if h.scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"))
    {
        // HTTPS probes need a TLS client without verification; not supported yet.
        tracing::warn!("HTTPS app probes are not supported; failing the probe");
        return fail();
    }
    let Some(addr) = h
        .port
        .number()
        .and_then(|p| target(h.host.as_deref(), default_host, p))
    else {
        return fail();
    };
    let Ok(tcp) = connect(addr).await else {
        return fail();
    };
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
    else {
        return fail();
    };
    tokio::spawn(conn);
    let path = h.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
    let mut req = Request::get(path);
    for (k, v) in incoming {
        if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
            req = req.header(k, v);
        }
    }
    req = req.header(http::header::HOST, addr.to_string());
    for hh in &h.http_headers {
        req = req.header(hh.name.as_str(), hh.value.as_str());
    }
    let Ok(req) = req.body(Empty::<Bytes>::new()) else {
        return fail();
    };
    let Ok(resp) = send.send_request(req).await else {
        return fail();
    };
    let mut status = resp.status();
    if status.is_redirection() {
        // pilot-agent follows kube's rules; a redirect counts as success.
        status = StatusCode::OK;
    }
    let body = Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    ProbeAnswer { status, body }
}

/// `grpc.health.v1.Health/Check` over h2c: SERVING (1) is 200, anything else 500.
async fn grpc_probe(g: &GrpcProbe, default_host: IpAddr) -> ProbeAnswer {
    let fail = || ProbeAnswer::code(StatusCode::INTERNAL_SERVER_ERROR);
    let Some(addr) = target(None, default_host, g.port) else {
        return fail();
    };
    let Ok(tcp) = connect(addr).await else {
        return fail();
    };
    let Ok((mut send, conn)) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await
    else {
        return fail();
    };
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; } in a gRPC frame.
    let service = g.service.as_deref().unwrap_or("").as_bytes();
    let mut msg = Vec::new();
    if !service.is_empty() && service.len() < 128 {
        msg.push(0x0a);
        msg.push(service.len() as u8);
        msg.extend_from_slice(service);
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)));
    let Ok(req) = req else { return fail() };
    let Ok(resp) = send.send_request(req).await else {
        return fail();
    };
    let Ok(collected) = Limited::new(resp.into_body(), MAX_PROBE_BODY)
        .collect()
        .await
    else {
        return fail();
    };
    let grpc_ok = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .is_none_or(|s| s == "0");
    let body = collected.to_bytes();
    // HealthCheckResponse { ServingStatus status = 1; } — SERVING = 1.
    let serving = grpc_ok && body.len() >= 7 && body[5..] == [0x08, 0x01];
    if serving {
        ProbeAnswer::code(StatusCode::OK)
    } else {
        fail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injectors_json_and_checks_paths() {
        let p = AppProbers::from_json(
            r#"{"/app-health/app/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP"},"timeoutSeconds":3},
                "/app-health/app/readyz":{"tcpSocket":{"port":8080}},
                "/app-health/app/startupz":{"grpc":{"port":9090,"service":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(
            p.get("/app-health/app/livez").unwrap().timeout_seconds,
            Some(3)
        );
        assert!(
            p.get("/app-health/app/readyz")
                .unwrap()
                .tcp_socket
                .is_some()
        );
        assert!(p.get("/app-health/other/readyz").is_none());
        assert!(matches!(
            AppProbers::from_json(r#"{"/bad/app/livez":{"tcpSocket":{"port":1}}}"#),
            Err(ProbersError::Path(_))
        ));
        assert!(AppProbers::from_json("nope").is_err());
    }
}
