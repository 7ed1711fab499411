//! [`Mesh`]: the running runtime — handles to the snapshot and certificate store, the xDS and
//! certificate tasks, the pod-facing listeners, and the drain sequence.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mesh_core::readiness::Readiness;
use mesh_core::{CertStore, Snapshot, SnapshotCell};
use mesh_tower::inbound::InboundConfig;
use mesh_tower::outbound::{Outbound, OutboundTcpStream, TcpConnectError};
use mesh_tower::status::StatusPort;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::builder::{CertificateSource, MeshBuilder};
use crate::error::MeshError;

/// A running mesh: what pilot-agent and Envoy are for one workload. Cheap to clone; the
/// background tasks stop when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    builder: MeshBuilder,
    cell: SnapshotCell,
    certs: CertStore,
    readiness: Readiness,
    outbound: Outbound,
    /// The drain sequence every trigger (SIGTERM, `/drain`, `/quitquitquit`, the API) runs.
    shutdown: Arc<Shutdown>,
    status_addrs: Vec<(StatusPort, SocketAddr)>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The CUSTOM action's provider client, given to every inbound listener of this mesh.
    ext_authz: Arc<dyn mesh_core::authz::ext_authz::ExternalAuthorizer>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = match self.tasks.get_mut() {
            Ok(t) => std::mem::take(t),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        for t in tasks {
            t.abort();
        }
    }
}

impl Mesh {
    /// A builder with an explicit node identity and pilot-agent's defaults.
    pub fn builder(node: mesh_core::NodeIdentity) -> MeshBuilder {
        MeshBuilder::new(node)
    }

    /// A builder from the environment the Istio injector sets (`POD_NAME`, `POD_NAMESPACE`,
    /// `INSTANCE_IP`, `SERVICE_ACCOUNT`, `ISTIO_META_*`, `CA_ADDR`, ...); SIGTERM drains.
    pub fn from_env() -> Result<MeshBuilder, MeshError> {
        MeshBuilder::from_env()
    }

    pub(crate) async fn start(builder: MeshBuilder) -> Result<Mesh, MeshError> {
        let metrics = mesh_tower::telemetry::prometheus_handle();
        let cell = SnapshotCell::new();
        let certs = CertStore::new();
        let config = &builder.config;
        let mtls = !matches!(builder.certificate, CertificateSource::None);
        let readiness = Readiness::new(cell.clone(), mtls.then(|| certs.clone()));
        let shutdown = Arc::new(Shutdown {
            readiness: readiness.clone(),
            stop: watch::channel(false).0,
            termination_drain: config.termination_drain,
            drain: config.drain,
            began: OnceLock::new(),
        });
        let mut tasks = Vec::new();

        match resolve_certificate_source(&builder.certificate, config) {
            ResolvedSource::Static(cert) => certs.set(cert),
            ResolvedSource::None => {}
            ResolvedSource::IstioCa(dirs) => {
                if let Some(ca) = config.ca.clone() {
                    if let Some(out) = dirs.output_certs.clone() {
                        tracing::info!(dir = %out.display(), "writing issued certificates to OUTPUT_CERTS");
                        tasks.push(tokio::spawn(mesh_xds::secrets::run_output_certs(
                            out,
                            certs.clone(),
                        )));
                    }
                    tasks.push(tokio::spawn(run_certificates(
                        ca,
                        config.token_path.clone(),
                        dirs.prov_cert,
                        config.node.clone(),
                        config.secret_ttl,
                        config.secret_rotation,
                        certs.clone(),
                    )));
                }
            }
            ResolvedSource::Files(dir) => {
                tracing::info!(dir = %dir.display(), "workload certificate from mounted files");
                let watcher = mesh_xds::secrets::FileCertificateWatcher::new(dir, certs.clone());
                if let Err(error) = watcher.load_into_store() {
                    tracing::warn!(%error, "mounted certificates not loadable yet; watching for them");
                }
                tasks.push(tokio::spawn(watcher.run()));
            }
            ResolvedSource::Sds(socket) => {
                tracing::info!(socket = %socket.display(), "workload certificate from the SDS socket");
                let client =
                    mesh_xds::secrets::SdsClient::new(socket, config.node.node_id(), certs.clone());
                tasks.push(tokio::spawn(client.run()));
            }
        }

        // The CUSTOM action's provider client (ext_authz over gRPC), resolving provider
        // clusters in this mesh's snapshot.
        let ext_authz: Arc<dyn mesh_core::authz::ext_authz::ExternalAuthorizer> = Arc::new(
            mesh_xds::translate::ext_authz::GrpcExtAuthorizer::new(cell.clone()),
        );

        let mut ads = mesh_xds::ads::AdsClient::new(
            mesh_xds::ads::AdsConfig {
                address: config.discovery.clone(),
                node: config.node.clone(),
                token_path: config.token_path.clone(),
                delta: config.delta_xds,
                headers: Vec::new(),
                initial_fetch_timeout: mesh_xds::ads::AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT,
            },
            cell.clone(),
        );
        // Raw resources are kept only for the admin listener's `/config_dump`.
        let config_dump = config.admin_port.map(|_| ads.retain_config_dump());
        tasks.push(tokio::spawn(ads.run()));

        let mut status_addrs = Vec::new();
        let agent_gauges = Arc::new(AgentGauges {
            started: std::time::Instant::now(),
            startup: OnceLock::new(),
            readiness: readiness.clone(),
            certs: certs.clone(),
        });
        let status_ctx = {
            let mut ctx = mesh_tower::status::StatusContext::new(readiness.clone())
                .with_env(|k| std::env::var(k).ok());
            ctx.metrics = metrics.clone();
            ctx.snapshot = Some(cell.clone());
            ctx.node = Some(config.node.clone());
            if let Some(source) = config_dump {
                ctx.config_dump = Some(Arc::new(move || source.render()));
            }
            let gauges = Arc::clone(&agent_gauges);
            ctx.before_render = Some(Arc::new(move || gauges.before_render()));
            let quit = Arc::clone(&shutdown);
            ctx.on_quit = Some(Arc::new(move || {
                quit.quit();
            }));
            let drain = Arc::clone(&shutdown);
            ctx.on_drain = Some(Arc::new(move || {
                let drain = Arc::clone(&drain);
                tokio::spawn(async move { drain.drain(Trigger::DrainEndpoint).await });
            }));
            Arc::new(ctx)
        };
        for (kind, port, what) in [
            (StatusPort::Agent, config.status_port, "status port (15020)"),
            (
                StatusPort::Readiness,
                config.readiness_port,
                "readiness port (15021)",
            ),
            (
                StatusPort::Prometheus,
                config.prometheus_port,
                "Prometheus port (15090)",
            ),
            (StatusPort::Admin, config.admin_port, "admin port (15000)"),
        ] {
            let Some(port) = port else { continue };
            // The admin listener answers loopback peers only and binds loopback only.
            let ip = match kind {
                StatusPort::Admin => std::net::IpAddr::from([127, 0, 0, 1]),
                _ => config.admin_bind,
            };
            let addr = SocketAddr::new(ip, port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| MeshError::Bind { what, addr, source })?;
            let bound = listener.local_addr().map_err(MeshError::Serve)?;
            status_addrs.push((kind, bound));
            let stop_rx = shutdown.stop.subscribe();
            tasks.push(tokio::spawn({
                let ctx = status_ctx.clone();
                async move {
                    if let Err(e) =
                        mesh_tower::status::serve_status(listener, kind, ctx, stopped(stop_rx))
                            .await
                    {
                        tracing::error!(error = %e, "status listener failed");
                    }
                }
            }));
        }

        // PassthroughCluster hosts and the hosts of DNS clusters resolve through the NDS table
        // first, then the pod's DNS, as pilot-agent's DNS proxy answers them.
        let resolver = mesh_dns::MeshResolver::new(
            cell.clone(),
            config.node.namespace.clone(),
            config.node.cluster_domain.clone(),
        );
        let upstream = match &builder.dns_servers {
            Some(servers) => resolver.clone().with_upstream_servers(servers),
            None => resolver.clone().with_system_upstream(),
        };
        let resolver = match upstream {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "no upstream DNS; only the NDS table resolves");
                resolver
            }
        };
        tasks.push(resolver.spawn_refresh());
        let outbound = Outbound::new(cell.clone(), certs.clone(), config.node.clone())
            .with_resolver(Arc::new(resolver));
        tasks.push(outbound.spawn_dns_refresh());
        let mesh = Mesh {
            inner: Arc::new(Inner {
                builder,
                cell,
                certs,
                readiness,
                outbound,
                shutdown,
                status_addrs,
                tasks: Mutex::new(tasks),
                ext_authz,
            }),
        };
        mesh.push_task(tokio::spawn(async move {
            agent_gauges.readiness.ready().await;
            agent_gauges.mark_ready();
        }));
        if mesh.inner.builder.handle_signals {
            let shutdown = Arc::clone(&mesh.inner.shutdown);
            // Registered before `start` returns: a SIGTERM from then on drains.
            let signal = termination_signal();
            let t = tokio::spawn(async move {
                signal.await;
                tracing::info!("received SIGTERM: draining");
                shutdown.drain(Trigger::Signal).await;
            });
            mesh.push_task(t);
        }
        Ok(mesh)
    }

    fn push_task(&self, t: JoinHandle<()>) {
        match self.inner.tasks.lock() {
            Ok(mut v) => v.push(t),
            Err(p) => p.into_inner().push(t),
        }
    }

    /// Waits until the first full xDS configuration and (with mTLS) a certificate are in: what
    /// `/healthz/ready` reports.
    pub async fn ready(&self) {
        self.inner.readiness.ready().await;
    }

    /// Whether `/healthz/ready` would answer 200 now.
    pub fn is_ready(&self) -> bool {
        self.inner.readiness.check().is_ok()
    }

    /// The outbound client: a `tower::Service<http::Request<B>>` that routes like the sidecar's
    /// outbound listener.
    pub fn http_client(&self) -> Outbound {
        self.inner.outbound.clone()
    }

    /// Opens a TCP connection to `authority` (`host:port`) as the sidecar's outbound TCP proxy
    /// listener would carry it: the service VIP's TCP listener picks the cluster (else
    /// `PassthroughCluster`, or refusal under `REGISTRY_ONLY`), Istio mTLS to meshed
    /// endpoints, plaintext otherwise; the connection reports `istio_tcp_*` with
    /// `reporter="source"`.
    pub async fn tcp_connect(&self, authority: &str) -> Result<OutboundTcpStream, TcpConnectError> {
        self.inner.outbound.connect_tcp(authority).await
    }

    /// The current configuration snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.cell.load()
    }

    /// The snapshot cell (for lower-level wiring).
    pub fn snapshot_cell(&self) -> &SnapshotCell {
        &self.inner.cell
    }

    /// The workload certificate store.
    pub fn certificates(&self) -> &CertStore {
        &self.inner.certs
    }

    /// Where a pod-facing listener is bound, if it is on.
    pub fn status_addr(&self, port: StatusPort) -> Option<SocketAddr> {
        self.inner
            .status_addrs
            .iter()
            .find(|(k, _)| *k == port)
            .map(|(_, a)| *a)
    }

    /// Binds the application port and serves `app` behind mesh's inbound side until drained.
    pub async fn serve<S, B>(&self, app: S) -> Result<(), MeshError>
    where
        S: tower::Service<http::Request<crate::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let addr = SocketAddr::new(
            self.inner.builder.config.admin_bind,
            self.inner.builder.app_port,
        );
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MeshError::Bind {
                what: "application port",
                addr,
                source,
            })?;
        self.serve_on(listener, app).await
    }

    /// Serves `app` on an already bound listener until drained.
    pub async fn serve_on<S, B>(&self, listener: TcpListener, app: S) -> Result<(), MeshError>
    where
        S: tower::Service<http::Request<crate::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let port = listener.local_addr().map_err(MeshError::Serve)?.port();
        let config = InboundConfig {
            port,
            mode: self.inner.builder.inbound_mode,
            node: self.inner.builder.config.node.clone(),
            header_read_timeout: None,
            idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
            drain: Some(self.inner.readiness.clone()),
            ext_authz: Some(Arc::clone(&self.inner.ext_authz)),
        };
        mesh_tower::inbound::serve(
            listener,
            app,
            self.inner.cell.clone(),
            self.inner.certs.clone(),
            config,
            stopped(self.inner.shutdown.stop.subscribe()),
        )
        .await
        .map_err(MeshError::Serve)
    }

    /// Graceful drain as pilot-agent does it on SIGTERM: readiness turns 503 at once; the
    /// listeners keep accepting for `terminationDrainDuration` — or, with
    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, for `MINIMUM_DRAIN_DURATION` and then until no
    /// inbound connection is open (checked every second) — then stop accepting and let
    /// in-flight requests finish. Returns when the listeners have been told to stop; a drain
    /// already under way (SIGTERM, `/drain`) is joined, not restarted.
    pub async fn drain(&self) {
        self.inner.shutdown.drain(Trigger::Api).await;
    }

    /// What `/quitquitquit` does: readiness fails and the listeners stop now, without a drain
    /// period (pilot-agent skips the drain for `/quitquitquit` since Istio 1.26); in-flight
    /// requests still finish. Ends a drain under way.
    pub fn shutdown(&self) {
        self.inner.shutdown.quit();
    }
}

/// pilot-agent's gauge of the seconds from start to first ready.
pub const STARTUP_DURATION_METRIC: &str = "istio_agent_startup_duration_seconds";
/// pilot-agent's gauge of the seconds left before the workload certificate expires (negative
/// once expired), labelled `resource_name="default"`; computed when 15020 is scraped.
pub const CERT_EXPIRY_METRIC: &str = "istio_agent_cert_expiry_seconds";

/// pilot-agent's own gauges that mesh computes rather than records.
#[derive(Debug)]
struct AgentGauges {
    started: std::time::Instant,
    /// Seconds from start to the first time readiness passed.
    startup: OnceLock<f64>,
    readiness: Readiness,
    certs: CertStore,
}

impl AgentGauges {
    /// Records [`STARTUP_DURATION_METRIC`] the first time it is called.
    fn mark_ready(&self) {
        let secs = *self
            .startup
            .get_or_init(|| self.started.elapsed().as_secs_f64());
        metrics::gauge!(STARTUP_DURATION_METRIC).set(secs);
    }

    /// At scrape time: the certificate's time left ([`CERT_EXPIRY_METRIC`]), and the startup
    /// duration if readiness passes but the task watching it has not run yet.
    fn before_render(&self) {
        if self.readiness.check().is_ok() || self.startup.get().is_some() {
            self.mark_ready();
        }
        let Some(cert) = self.certs.current() else {
            return;
        };
        let left = match cert.not_after.duration_since(std::time::SystemTime::now()) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        metrics::gauge!(CERT_EXPIRY_METRIC, "resource_name" => "default").set(left);
    }
}

/// What started the shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// SIGTERM or SIGINT.
    Signal,
    /// A loopback `POST /drain` (the native sidecar's preStop).
    DrainEndpoint,
    /// [`Mesh::drain`].
    Api,
    /// A loopback `POST /quitquitquit`, or [`Mesh::shutdown`].
    Quit,
}

/// pilot-agent's shutdown sequence (its `envoy.Agent.terminate`, FACTS.md g), shared by every
/// trigger so SIGTERM, `/drain`, `/quitquitquit` and the API cannot diverge.
#[derive(Debug)]
struct Shutdown {
    readiness: Readiness,
    /// `true` once listeners must stop accepting.
    stop: watch::Sender<bool>,
    termination_drain: Duration,
    drain: mesh_core::config::DrainConfig,
    /// The first trigger; later ones join its drain.
    began: OnceLock<Trigger>,
}

impl Shutdown {
    /// Readiness fails and the listeners stop now.
    fn quit(&self) {
        self.readiness.start_draining();
        let _ = self.began.set(Trigger::Quit);
        self.stop.send_replace(true);
    }

    /// Readiness fails at once; the first trigger waits out the drain period (cut short by a
    /// quit) and then stops the listeners; later triggers wait for that. SIGTERM after a
    /// `/drain` stops at once, as pilot-agent exits at once once `/drain` has drained Envoy.
    async fn drain(&self, trigger: Trigger) {
        self.readiness.start_draining();
        let first = self.began.set(trigger).is_ok();
        if trigger == Trigger::Signal && self.began.get() == Some(&Trigger::DrainEndpoint) {
            self.quit();
            return;
        }
        if first {
            tokio::select! {
                () = self.period() => {}
                () = stopped(self.stop.subscribe()) => {}
            }
            self.stop.send_replace(true);
        } else {
            stopped(self.stop.subscribe()).await;
        }
    }

    /// How long listeners keep accepting once the drain began.
    async fn period(&self) {
        if !self.drain.exit_on_zero_active_connections {
            tracing::info!(period = ?self.termination_drain, "graceful termination period starting");
            tokio::time::sleep(self.termination_drain).await;
            return;
        }
        tracing::info!(minimum = ?self.drain.minimum, "draining, then waiting for active connections to end");
        tokio::time::sleep(self.drain.minimum).await;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let active = mesh_tower::inbound::active_connections();
            if active == 0 {
                tracing::info!("no more active connections; stopping");
                return;
            }
            tracing::info!(active, "draining: inbound connections still open");
        }
    }
}

/// Runs an app behind mesh configured from the environment the Istio injector sets, until
/// SIGTERM has drained it. The application port is `MESH_APP_PORT`, else the first container
/// port in `ISTIO_META_POD_PORTS`, else 8080.
pub async fn serve<S, B>(app: S) -> Result<(), MeshError>
where
    S: tower::Service<http::Request<crate::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mesh = Mesh::from_env()?.start().await?;
    mesh.serve(app).await
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Resolves on SIGTERM or SIGINT; the handlers are installed when this is called.
fn termination_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match streams {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A [`CertificateSource`] with `Auto` decided.
#[derive(Debug)]
enum ResolvedSource {
    Static(mesh_core::WorkloadCertificate),
    None,
    /// istiod's CA, with `PROV_CERT` / `OUTPUT_CERTS`.
    IstioCa(mesh_core::config::CaCertificateDirs),
    Files(std::path::PathBuf),
    Sds(std::path::PathBuf),
}

/// Decides `Auto` as pilot-agent does (mesh-xds `select_certificate_source` over the process
/// environment and the well-known paths under `/`).
fn resolve_certificate_source(
    source: &CertificateSource,
    config: &mesh_core::config::MeshConfig,
) -> ResolvedSource {
    match source {
        CertificateSource::Static(cert) => ResolvedSource::Static((**cert).clone()),
        CertificateSource::None => ResolvedSource::None,
        CertificateSource::IstioCa => ResolvedSource::IstioCa(config.ca_certificate_dirs.clone()),
        CertificateSource::Files(dir) => ResolvedSource::Files(dir.clone()),
        CertificateSource::Sds(socket) => ResolvedSource::Sds(socket.clone()),
        CertificateSource::Auto => {
            let signals = mesh_xds::secrets::SourceSignals::gather(
                std::path::Path::new("/"),
                &|k| std::env::var(k).ok(),
                &config.discovery.address,
            );
            match mesh_xds::secrets::select_certificate_source(&signals) {
                mesh_xds::secrets::CertificateSource::Sds { socket } => ResolvedSource::Sds(socket),
                mesh_xds::secrets::CertificateSource::Files { dir } => ResolvedSource::Files(dir),
                // The CA address (CA_ADDR or the discovery address) is already in the config;
                // PROV_CERT / OUTPUT_CERTS from the configuration, else from the environment.
                mesh_xds::secrets::CertificateSource::IstioCa {
                    provisioned_certs,
                    output_certs,
                    ..
                } => {
                    let configured = &config.ca_certificate_dirs;
                    ResolvedSource::IstioCa(mesh_core::config::CaCertificateDirs {
                        prov_cert: configured.prov_cert.clone().or(provisioned_certs),
                        output_certs: configured.output_certs.clone().or(output_certs),
                    })
                }
            }
        }
    }
}

/// Obtains and rotates the workload certificate from istiod's CA, reconnecting with backoff
/// while the CA is unreachable; the store keeps the current certificate meanwhile.
async fn run_certificates(
    ca: mesh_core::config::ControlPlaneAddress,
    token_path: Option<std::path::PathBuf>,
    prov_cert: Option<std::path::PathBuf>,
    node: mesh_core::NodeIdentity,
    ttl: Duration,
    rotation: mesh_core::config::SecretRotation,
    certs: CertStore,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let client = match &prov_cert {
            // PROV_CERT: authenticate to the CA with the provisioned client certificate.
            Some(dir) => {
                mesh_xds::ca::CaClient::connect_with_provisioned_certs(
                    &ca,
                    dir,
                    token_path.clone(),
                    node.cluster_id.clone(),
                    Vec::new(),
                )
                .await
            }
            None => {
                mesh_xds::ca::CaClient::connect(
                    &ca,
                    token_path.clone(),
                    node.cluster_id.clone(),
                    Vec::new(),
                )
                .await
            }
        };
        match client {
            Ok(client) => {
                mesh_xds::ca::SecretManager::new(client, node.spiffe_id(), ttl, certs.clone())
                    .with_grace_period_ratio(
                        rotation.grace_period_ratio,
                        rotation.grace_period_ratio_jitter,
                    )
                    .run()
                    .await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, ca = %ca.address, "cannot reach the CA; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shutdown sequence with an hour-long `terminationDrainDuration`, its `/drain` already
    /// under way.
    async fn draining_for_an_hour() -> (Arc<Shutdown>, JoinHandle<()>) {
        let shutdown = Arc::new(Shutdown {
            readiness: Readiness::new(SnapshotCell::new(), None),
            stop: watch::channel(false).0,
            termination_drain: Duration::from_secs(3600),
            drain: mesh_core::config::DrainConfig::default(),
            began: OnceLock::new(),
        });
        let endpoint = tokio::spawn({
            let s = Arc::clone(&shutdown);
            async move { s.drain(Trigger::DrainEndpoint).await }
        });
        for _ in 0..1000 {
            if shutdown.began.get().is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(shutdown.began.get(), Some(&Trigger::DrainEndpoint));
        assert!(shutdown.readiness.is_draining());
        assert!(!*shutdown.stop.borrow(), "stopped inside the drain period");
        (shutdown, endpoint)
    }

    /// pilot-agent exits at once on SIGTERM once `/drain` has drained (FACTS.md g).
    #[tokio::test]
    async fn sigterm_after_drain_endpoint_stops_at_once() {
        let (shutdown, endpoint) = draining_for_an_hour().await;
        tokio::time::timeout(Duration::from_secs(10), shutdown.drain(Trigger::Signal))
            .await
            .expect("SIGTERM after /drain does not wait out the period");
        assert!(*shutdown.stop.borrow());
        tokio::time::timeout(Duration::from_secs(10), endpoint)
            .await
            .expect("the /drain sequence ends with the stop")
            .unwrap();
    }

    /// A second drain trigger joins the first (no second period), and `/quitquitquit` ends a
    /// drain under way.
    #[tokio::test]
    async fn later_triggers_join_the_drain_and_quit_ends_it() {
        let (shutdown, endpoint) = draining_for_an_hour().await;
        let joined = tokio::spawn({
            let s = Arc::clone(&shutdown);
            async move { s.drain(Trigger::Api).await }
        });
        tokio::task::yield_now().await;
        assert!(!joined.is_finished() && !*shutdown.stop.borrow());
        shutdown.quit();
        for task in [endpoint, joined] {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("every waiter ends at the quit")
                .unwrap();
        }
        assert_eq!(shutdown.began.get(), Some(&Trigger::DrainEndpoint));
    }
}
