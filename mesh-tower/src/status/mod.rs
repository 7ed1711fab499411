//! Pod-facing status listeners: 15020, 15021, 15090.
//!
//! * 15020 is pilot-agent's status server: `/healthz/ready`, `/stats/prometheus` and
//!   `/metrics`, `/quitquitquit` (POST, loopback only). Unknown paths get Go's
//!   `404 page not found`.
//! * 15021 is Envoy's readiness listener: only paths starting with `/healthz/ready` (which
//!   Envoy proxies to the agent); everything else is Envoy's empty 404.
//! * 15090 is Envoy's Prometheus listener: only paths starting with `/stats/prometheus`;
//!   everything else is Envoy's empty 404.
//!
//! Not served yet: `/drain`, `/app-health/...` probe rewriting, `/debug/*`, gzip.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::readiness::Readiness;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// Prometheus text exposition format, as pilot-agent labels it.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which pod port a status listener plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusPort {
    /// pilot-agent's status port, 15020.
    Agent,
    /// Envoy's readiness port, 15021.
    Readiness,
    /// Envoy's Prometheus port, 15090.
    Prometheus,
}

impl StatusPort {
    /// The port Istio uses for it.
    pub fn default_port(self) -> u16 {
        match self {
            StatusPort::Agent => 15020,
            StatusPort::Readiness => 15021,
            StatusPort::Prometheus => 15090,
        }
    }
}

/// What a status listener answers from.
struct State {
    port: StatusPort,
    readiness: Readiness,
    metrics: Option<PrometheusHandle>,
    on_quit: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Serves one status listener on `listener` (HTTP/1.1) until `shutdown` completes; requests in
/// flight then get up to one second to finish.
///
/// `readiness` answers `/healthz/ready`, `metrics` renders `/stats/prometheus` (an empty body
/// when `None`), and `on_quit` is called by a loopback `POST /quitquitquit` (port 15020).
pub async fn serve_status(
    listener: TcpListener,
    port: StatusPort,
    readiness: Readiness,
    metrics: Option<PrometheusHandle>,
    on_quit: Option<Arc<dyn Fn() + Send + Sync>>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let state = Arc::new(State {
        port,
        readiness,
        metrics,
        on_quit,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, ?port, "status listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = respond(&state, req.method(), req.uri().path(), remote);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "status connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(1), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            ?port,
            "status connections still open after shutdown grace period"
        );
    }
    Ok(())
}

fn respond(
    state: &State,
    method: &Method,
    path: &str,
    remote: SocketAddr,
) -> Response<Full<Bytes>> {
    match state.port {
        StatusPort::Agent => match path {
            "/healthz/ready" => ready(state),
            "/stats/prometheus" | "/metrics" => {
                if method == Method::GET || method == Method::HEAD {
                    prometheus(state)
                } else {
                    go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
                }
            }
            "/quitquitquit" => quit(state, method, remote),
            _ => go_error(StatusCode::NOT_FOUND, "404 page not found"),
        },
        StatusPort::Readiness if path.starts_with("/healthz/ready") => ready(state),
        StatusPort::Prometheus if path.starts_with("/stats/prometheus") => prometheus(state),
        StatusPort::Readiness | StatusPort::Prometheus => envoy_not_found(),
    }
}

fn ready(state: &State) -> Response<Full<Bytes>> {
    match state.readiness.check() {
        Ok(()) => empty(StatusCode::OK),
        Err(reason) => {
            tracing::debug!(%reason, "readiness probe failed");
            empty(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

fn prometheus(state: &State) -> Response<Full<Bytes>> {
    let text = state
        .metrics
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
    );
    r
}

fn quit(state: &State, method: &Method, remote: SocketAddr) -> Response<Full<Bytes>> {
    if !is_loopback(remote.ip()) {
        return go_error(
            StatusCode::FORBIDDEN,
            "Only requests from localhost are allowed",
        );
    }
    if method != Method::POST {
        return go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    tracing::info!("handling /quitquitquit, exiting");
    if let Some(f) = &state.on_quit {
        f();
    }
    let mut r = Response::new(Full::new(Bytes::from_static(b"OK")));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// pilot-agent's notion of localhost: the peer address is a loopback address (IPv4-mapped
/// IPv6 included).
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// Go's `http.Error`: the message and a newline, as `text/plain; charset=utf-8`.
fn go_error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Envoy's answer when no route matches: 404 with an empty body.
fn envoy_not_found() -> Response<Full<Bytes>> {
    empty(StatusCode::NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mesh_core::SnapshotCell;

    use super::*;

    fn state(quits: Arc<AtomicUsize>) -> State {
        State {
            port: StatusPort::Agent,
            readiness: Readiness::new(SnapshotCell::new(), None),
            metrics: None,
            on_quit: Some(Arc::new(move || {
                quits.fetch_add(1, Ordering::SeqCst);
            })),
        }
    }

    #[test]
    fn quit_from_a_remote_peer_is_forbidden() {
        let quits = Arc::new(AtomicUsize::new(0));
        let s = state(quits.clone());
        let remote: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let r = respond(&s, &Method::POST, "/quitquitquit", remote);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // The localhost check comes before the method check, as in pilot-agent.
        let r = respond(&s, &Method::GET, "/quitquitquit", remote);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(quits.load(Ordering::SeqCst), 0);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        let r = respond(&s, &Method::POST, "/quitquitquit", mapped);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(quits.load(Ordering::SeqCst), 1);
    }
}
