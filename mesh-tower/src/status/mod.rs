//! Pod-facing status listeners: 15020, 15021, 15090 and the optional 15000 admin.
//!
//! * 15020 is pilot-agent's status server: `/healthz/ready`; `/stats/prometheus` and
//!   `/metrics` merged as pilot-agent merges them ([`merge`]); `/app-health/<container>/...`
//!   rewritten probes from `ISTIO_KUBE_APP_PROBERS` ([`probers`]); `/quitquitquit` and
//!   `/drain` (POST, loopback only); `/debug/ndsz`, `/debug/syncz`, `/debug/config_dump`
//!   (loopback only). Unknown paths get Go's `404 page not found`.
//! * 15021 is Envoy's readiness listener: only paths starting with `/healthz/ready` (which
//!   Envoy proxies to the agent); everything else is Envoy's empty 404.
//! * 15090 is Envoy's Prometheus listener: only paths starting with `/stats/prometheus`, and
//!   only the proxy's families (`envoy_*`, `istio_*` but not `istio_agent_*`).
//! * 15000 is Envoy's admin (loopback peers only): `/config_dump`, `/clusters`, `/stats`,
//!   `/stats/prometheus`, `/ready`, `/server_info`.
//!
//! Not served: gzip, `/debug/pprof`, `/app-lifecycle` hooks other than as probes, HTTPS app
//! probes.

pub mod debug;
pub mod envoy_stats;
pub mod merge;
pub mod probers;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::SnapshotCell;
use mesh_core::identity::NodeIdentity;
use mesh_core::readiness::Readiness;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

pub use merge::AppScrape;
pub use probers::AppProbers;

/// Prometheus text exposition format, as pilot-agent labels it.
pub const PROMETHEUS_CONTENT_TYPE: &str = merge::FMT_TEXT;

/// Which pod port a status listener plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusPort {
    /// pilot-agent's status port, 15020.
    Agent,
    /// Envoy's readiness port, 15021.
    Readiness,
    /// Envoy's Prometheus port, 15090.
    Prometheus,
    /// Envoy's admin port, 15000 (answers loopback peers only).
    Admin,
}

impl StatusPort {
    /// The port Istio uses for it.
    pub fn default_port(self) -> u16 {
        match self {
            StatusPort::Agent => 15020,
            StatusPort::Readiness => 15021,
            StatusPort::Prometheus => 15090,
            StatusPort::Admin => 15000,
        }
    }
}

/// A callback the status server runs (quit, drain).
pub type StatusHook = Arc<dyn Fn() + Send + Sync>;

/// Renders the admin `/config_dump` (Envoy's `envoy.admin.v3.*ConfigDump` JSON with full
/// resource bodies); the runtime wires it to the xDS client's retained resources.
pub type ConfigDumpProvider = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Everything the status listeners answer from. Build with [`StatusContext::new`], then set
/// the optional parts; share one `Arc` between the listeners.
pub struct StatusContext {
    /// Answers `/healthz/ready`.
    pub readiness: Readiness,
    /// Renders the metrics (`None`: empty bodies).
    pub metrics: Option<PrometheusHandle>,
    /// Run by a loopback `POST /quitquitquit`: exit now, without a drain period.
    pub on_quit: Option<StatusHook>,
    /// Run by a loopback `POST /drain`: start the graceful drain.
    pub on_drain: Option<StatusHook>,
    /// Run just before metrics render, to set gauges computed at scrape time (pilot-agent's
    /// derived gauges, e.g. `istio_agent_cert_expiry_seconds`).
    pub before_render: Option<StatusHook>,
    /// The configuration for `/debug/*`, `/config_dump`, `/clusters`.
    pub snapshot: Option<SnapshotCell>,
    /// This workload, for `/config_dump` and `/server_info`.
    pub node: Option<NodeIdentity>,
    /// Full-body `/config_dump` (`None`: a dump naming what the snapshot holds).
    pub config_dump: Option<ConfigDumpProvider>,
    /// `ISTIO_KUBE_APP_PROBERS`.
    pub app_probers: AppProbers,
    /// `ISTIO_PROMETHEUS_ANNOTATIONS`.
    pub app_scrape: AppScrape,
    /// Where HTTP/TCP/gRPC app probes connect when the probe names no host (pilot-agent uses
    /// the pod IP; mesh's application shares the process, so loopback by default).
    pub probe_host: IpAddr,
    /// `METRICS_LOCALHOST_ACCESS_ONLY`: metrics only for loopback peers.
    pub metrics_localhost_only: bool,
    /// Process start, for `envoy_server_uptime` and `/server_info`.
    pub started: Instant,
}

impl std::fmt::Debug for StatusContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusContext")
            .field("readiness", &self.readiness)
            .field("app_probers", &self.app_probers)
            .field("app_scrape", &self.app_scrape)
            .field("probe_host", &self.probe_host)
            .finish_non_exhaustive()
    }
}

impl StatusContext {
    /// A context answering readiness only; everything else off or empty.
    pub fn new(readiness: Readiness) -> Self {
        StatusContext {
            readiness,
            metrics: None,
            on_quit: None,
            on_drain: None,
            before_render: None,
            snapshot: None,
            node: None,
            config_dump: None,
            app_probers: AppProbers::default(),
            app_scrape: AppScrape::default(),
            probe_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            metrics_localhost_only: false,
            started: Instant::now(),
        }
    }

    /// Reads `ISTIO_KUBE_APP_PROBERS`, `ISTIO_PROMETHEUS_ANNOTATIONS` and
    /// `METRICS_LOCALHOST_ACCESS_ONLY` through `get` (e.g. `|k| std::env::var(k).ok()`).
    /// Unreadable values are logged and ignored, as pilot-agent logs and carries on.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(json) = get("ISTIO_KUBE_APP_PROBERS").filter(|v| !v.is_empty()) {
            match AppProbers::from_json(&json) {
                Ok(p) => self.app_probers = p,
                Err(e) => tracing::error!(error = %e, "ignoring ISTIO_KUBE_APP_PROBERS"),
            }
        }
        if let Some(json) = get("ISTIO_PROMETHEUS_ANNOTATIONS").filter(|v| !v.is_empty()) {
            match AppScrape::from_json(&json) {
                Ok(a) => self.app_scrape = a,
                Err(e) => tracing::error!(error = %e, "ignoring ISTIO_PROMETHEUS_ANNOTATIONS"),
            }
        }
        if let Some(v) = get("METRICS_LOCALHOST_ACCESS_ONLY") {
            self.metrics_localhost_only = v.eq_ignore_ascii_case("true") || v == "1";
        }
        self
    }
}

type Reply = Response<Full<Bytes>>;

/// Serves one status listener on `listener` (HTTP/1.1) until `shutdown` completes; requests in
/// flight then get up to one second to finish.
pub async fn serve_status(
    listener: TcpListener,
    port: StatusPort,
    ctx: Arc<StatusContext>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
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
        let ctx = ctx.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(respond(&ctx, port, &req, remote).await) }
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

async fn respond<B>(
    ctx: &StatusContext,
    port: StatusPort,
    req: &Request<B>,
    remote: SocketAddr,
) -> Reply {
    let path = req.uri().path();
    let method = req.method();
    let local = is_loopback(remote.ip());
    match port {
        StatusPort::Agent => match path {
            "/healthz/ready" => ready(ctx),
            "/stats/prometheus" | "/metrics" => {
                if ctx.metrics_localhost_only && !local {
                    return forbidden();
                }
                if method != Method::GET && method != Method::HEAD {
                    return go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
                }
                merged_metrics(ctx, req.headers()).await
            }
            "/quitquitquit" => hook(ctx.on_quit.as_ref(), method, local, "/quitquitquit"),
            "/drain" => hook(ctx.on_drain.as_ref(), method, local, "/drain"),
            "/debug/ndsz" | "/debug/syncz" | "/debug/config_dump" if !local => forbidden(),
            "/debug/ndsz" => match ctx.snapshot.as_ref().and_then(|c| debug::ndsz(&c.load())) {
                Some(v) => json(StatusCode::OK, &v),
                None => json(StatusCode::NOT_FOUND, &serde_json::json!({})),
            },
            "/debug/syncz" => match &ctx.snapshot {
                Some(c) => json(StatusCode::OK, &debug::syncz(&c.load(), c.is_synced())),
                None => json(StatusCode::NOT_FOUND, &serde_json::json!({})),
            },
            "/debug/config_dump" => config_dump(ctx),
            p if p.starts_with("/app-health/") || p.starts_with("/app-lifecycle/") => {
                match ctx.app_probers.get(p) {
                    Some(prober) => {
                        let a = probers::run(prober, ctx.probe_host, req.headers()).await;
                        let mut r = Response::new(Full::new(a.body));
                        *r.status_mut() = a.status;
                        r
                    }
                    None => go_error(
                        StatusCode::BAD_REQUEST,
                        &format!("app prober config does not exists for {p}"),
                    ),
                }
            }
            _ => go_error(StatusCode::NOT_FOUND, "404 page not found"),
        },
        StatusPort::Readiness if path.starts_with("/healthz/ready") => ready(ctx),
        StatusPort::Prometheus if path.starts_with("/stats/prometheus") => proxy_metrics(ctx),
        StatusPort::Readiness | StatusPort::Prometheus => envoy_not_found(),
        StatusPort::Admin if !local => go_error(
            StatusCode::FORBIDDEN,
            "Only requests from localhost are allowed",
        ),
        StatusPort::Admin => match path {
            "/config_dump" => config_dump_full(ctx, req.uri().query()),
            "/clusters" => text(
                ctx.snapshot
                    .as_ref()
                    .map(|c| debug::clusters_text(&c.load()))
                    .unwrap_or_default(),
            ),
            "/stats/prometheus" => proxy_metrics(ctx),
            "/stats" => envoy_stats(ctx, req.uri().query()),
            "/ready" => {
                let state = ServerState::of(&ctx.readiness);
                let mut r = text(format!("{}\n", state.name()));
                if state != ServerState::Live {
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                r
            }
            "/server_info" => json(
                StatusCode::OK,
                &debug::server_info(ctx.node.as_ref(), ctx.started, !ctx.readiness.is_draining()),
            ),
            _ => envoy_not_found(),
        },
    }
}

fn forbidden() -> Reply {
    go_error(
        StatusCode::FORBIDDEN,
        "Only requests from localhost are allowed",
    )
}

fn config_dump(ctx: &StatusContext) -> Reply {
    match &ctx.snapshot {
        Some(c) => json(
            StatusCode::OK,
            &debug::config_dump(&c.load(), ctx.node.as_ref()),
        ),
        None => json(StatusCode::OK, &serde_json::json!({"configs": []})),
    }
}

/// The admin port's `/config_dump`: full bodies when a provider is wired. As Envoy, the
/// `EndpointsConfigDump` is included only with `?include_eds`.
fn config_dump_full(ctx: &StatusContext, query: Option<&str>) -> Reply {
    let Some(provider) = &ctx.config_dump else {
        return config_dump(ctx);
    };
    let mut v = provider();
    let include_eds = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.split('=').next() == Some("include_eds"))
    });
    if !include_eds && let Some(configs) = v.get_mut("configs").and_then(|c| c.as_array_mut()) {
        configs.retain(|c| {
            c.get("@type").and_then(|t| t.as_str())
                != Some("type.googleapis.com/envoy.admin.v3.EndpointsConfigDump")
        });
    }
    json(StatusCode::OK, &v)
}

fn json(status: StatusCode, v: &serde_json::Value) -> Reply {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

/// Envoy's admin `/stats` ([`envoy_stats`]): dotted names, text or JSON; the Prometheus
/// exposition for `?format=prometheus`; Envoy's 400 answers for queries it refuses.
fn envoy_stats(ctx: &StatusContext, query: Option<&str>) -> Reply {
    let q = match envoy_stats::StatsQuery::parse(query) {
        Ok(q) => q,
        Err(e) => {
            let mut r = text(e.to_string());
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    };
    if q.format == envoy_stats::Format::Prometheus {
        return proxy_metrics(ctx);
    }
    let stats = envoy_stats::EnvoyStats::from_prometheus(&render(ctx)[1]);
    match q.format {
        envoy_stats::Format::Json => {
            let mut r = Response::new(Full::new(Bytes::from(stats.json(&q))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(stats.text(&q)),
    }
}

/// Envoy's `server.state` (`envoy.admin.v3.ServerInfo.State`): `INITIALIZING` until the
/// first full configuration (and certificate) is in, as Envoy's init manager waits for its
/// first CDS/LDS and secrets; then `LIVE`; `DRAINING` once shutdown begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    Live = 0,
    Draining = 1,
    Initializing = 3,
}

impl ServerState {
    fn of(readiness: &Readiness) -> Self {
        if readiness.is_draining() {
            ServerState::Draining
        } else if readiness.check().is_ok() {
            ServerState::Live
        } else {
            ServerState::Initializing
        }
    }

    fn name(self) -> &'static str {
        match self {
            ServerState::Live => "LIVE",
            ServerState::Draining => "DRAINING",
            ServerState::Initializing => "INITIALIZING",
        }
    }
}

/// Sets the server gauges and renders the recorder split into agent / proxy / app parts.
fn render(ctx: &StatusContext) -> [String; 3] {
    let live = !ctx.readiness.is_draining();
    let state = ServerState::of(&ctx.readiness);
    metrics::gauge!("envoy_server_state").set(state as u8 as f64);
    // Envoy starts its workers when initialization completes (and keeps them while draining).
    metrics::gauge!("envoy_listener_manager_workers_started").set(
        if state == ServerState::Initializing {
            0.0
        } else {
            1.0
        },
    );
    metrics::gauge!("envoy_server_live").set(if live { 1.0 } else { 0.0 });
    metrics::gauge!("envoy_server_uptime").set(ctx.started.elapsed().as_secs() as f64);
    if let Some(f) = &ctx.before_render {
        f();
    }
    let rendered = ctx
        .metrics
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    merge::split_parts(&rendered)
}

fn proxy_metrics(ctx: &StatusContext) -> Reply {
    let [_, proxy, _] = render(ctx);
    let mut r = Response::new(Full::new(Bytes::from(proxy)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
    );
    r
}

async fn merged_metrics(ctx: &StatusContext, headers: &HeaderMap) -> Reply {
    metrics::counter!("istio_agent_scrapes_total").increment(1);
    let (app_bodies, format, failures) = merge::scrape_app(&ctx.app_scrape, headers).await;
    if failures > 0 {
        metrics::counter!("istio_agent_scrape_failures_total", "type" => "application")
            .increment(failures as u64);
    }
    let [agent, proxy, app] = render(ctx);
    let mut body = String::with_capacity(agent.len() + proxy.len() + app.len() + 64);
    body.push_str(&agent);
    body.push_str(&proxy);
    body.push_str(&app);
    let mut bytes = body.into_bytes();
    for b in app_bodies {
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(&b);
    }
    if format != merge::FMT_TEXT {
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(b"# EOF\n");
    }
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(format));
    r
}

fn ready(ctx: &StatusContext) -> Reply {
    match ctx.readiness.check() {
        Ok(()) => empty(StatusCode::OK),
        Err(reason) => {
            tracing::debug!(%reason, "readiness probe failed");
            empty(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}

fn hook(f: Option<&StatusHook>, method: &Method, local: bool, what: &str) -> Reply {
    if !local {
        return forbidden();
    }
    if method != Method::POST {
        return go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    tracing::info!("handling {what}");
    if let Some(f) = f {
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

    use super::*;

    fn ctx(quits: Arc<AtomicUsize>) -> StatusContext {
        let mut c = StatusContext::new(Readiness::new(SnapshotCell::new(), None));
        c.on_quit = Some(Arc::new(move || {
            quits.fetch_add(1, Ordering::SeqCst);
        }));
        c
    }

    fn req(method: Method, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn quit_from_a_remote_peer_is_forbidden() {
        let quits = Arc::new(AtomicUsize::new(0));
        let c = ctx(quits.clone());
        let remote: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let r = respond(
            &c,
            StatusPort::Agent,
            &req(Method::POST, "/quitquitquit"),
            remote,
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // The localhost check comes before the method check, as in pilot-agent.
        let r = respond(
            &c,
            StatusPort::Agent,
            &req(Method::GET, "/quitquitquit"),
            remote,
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(quits.load(Ordering::SeqCst), 0);
        // `/drain` and the debug views are localhost-only too, whatever the method.
        for (method, path) in [
            (Method::POST, "/drain"),
            (Method::GET, "/drain"),
            (Method::GET, "/debug/ndsz"),
            (Method::GET, "/debug/syncz"),
        ] {
            let r = respond(&c, StatusPort::Agent, &req(method, path), remote).await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        let r = respond(
            &c,
            StatusPort::Agent,
            &req(Method::POST, "/quitquitquit"),
            mapped,
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(quits.load(Ordering::SeqCst), 1);
        let r = respond(
            &c,
            StatusPort::Agent,
            &req(Method::GET, "/debug/config_dump"),
            remote,
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = respond(
            &c,
            StatusPort::Admin,
            &req(Method::GET, "/config_dump"),
            remote,
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    /// Envoy's admin `/ready`: `INITIALIZING` (503) before the first configuration, `DRAINING`
    /// (503) once shutdown begins; `server.state` in `/stats` follows (3, then 1).
    #[tokio::test]
    async fn admin_ready_reports_envoys_server_state() {
        let c = ctx(Arc::new(AtomicUsize::new(0)));
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let body = |r: Reply| async move {
            use http_body_util::BodyExt;
            let status = r.status();
            let b = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(b.to_vec()).unwrap())
        };
        assert_eq!(
            body(respond(&c, StatusPort::Admin, &req(Method::GET, "/ready"), local).await).await,
            (StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n".to_owned())
        );
        assert_eq!(ServerState::of(&c.readiness) as u8, 3);
        c.readiness.start_draining();
        assert_eq!(
            body(respond(&c, StatusPort::Admin, &req(Method::GET, "/ready"), local).await).await,
            (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n".to_owned())
        );
        assert_eq!(ServerState::of(&c.readiness) as u8, 1);
        let (status, _) = body(
            respond(
                &c,
                StatusPort::Admin,
                &req(Method::GET, "/stats?filter=((("),
                local,
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
