//! [`Mesh`]: the running runtime — handles to the snapshot and certificate store, the xDS and
//! certificate tasks, the pod-facing listeners, and the drain sequence.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::readiness::Readiness;
use mesh_core::{CertStore, Snapshot, SnapshotCell};
use mesh_tower::inbound::InboundConfig;
use mesh_tower::outbound::Outbound;
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
    /// `true` once listeners must stop accepting.
    stop: watch::Sender<bool>,
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
        let (stop, _) = watch::channel(false);
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
        // `/drain` asks for the graceful drain; a task below runs it once the Mesh exists.
        let (drain_req, mut drain_rx) = watch::channel(false);
        let status_ctx = {
            let mut ctx = mesh_tower::status::StatusContext::new(readiness.clone())
                .with_env(|k| std::env::var(k).ok());
            ctx.metrics = metrics.clone();
            ctx.snapshot = Some(cell.clone());
            ctx.node = Some(config.node.clone());
            if let Some(source) = config_dump {
                ctx.config_dump = Some(Arc::new(move || source.render()));
            }
            // `/quitquitquit`: no drain period; readiness fails and listeners stop now
            // (in-flight requests still finish).
            let quit_tx = stop.clone();
            let quit_readiness = readiness.clone();
            ctx.on_quit = Some(Arc::new(move || {
                quit_readiness.start_draining();
                let _ = quit_tx.send(true);
            }));
            ctx.on_drain = Some(Arc::new(move || {
                let _ = drain_req.send(true);
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
            let stop_rx = stop.subscribe();
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

        // PassthroughCluster hosts resolve through the NDS table first, then the pod's DNS,
        // as pilot-agent's DNS proxy answers them.
        let resolver = mesh_dns::MeshResolver::new(
            cell.clone(),
            config.node.namespace.clone(),
            config.node.cluster_domain.clone(),
        );
        let resolver = match resolver.clone().with_system_upstream() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "no upstream DNS from /etc/resolv.conf; only the NDS table resolves");
                resolver
            }
        };
        tasks.push(resolver.spawn_refresh());
        let outbound = Outbound::new(cell.clone(), certs.clone(), config.node.clone())
            .with_resolver(Arc::new(resolver));
        let mesh = Mesh {
            inner: Arc::new(Inner {
                builder,
                cell,
                certs,
                readiness,
                outbound,
                stop,
                status_addrs,
                tasks: Mutex::new(tasks),
                ext_authz,
            }),
        };
        {
            // Holds the runtime weakly: a pending `/drain` must not keep a dropped Mesh alive.
            let weak = Arc::downgrade(&mesh.inner);
            let t = tokio::spawn(async move {
                if drain_rx.wait_for(|d| *d).await.is_ok()
                    && let Some(inner) = weak.upgrade()
                {
                    tracing::info!("handling /drain: draining");
                    Mesh { inner }.drain().await;
                }
            });
            mesh.push_task(t);
        }
        if mesh.inner.builder.handle_signals {
            let m = mesh.clone();
            let t = tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("received SIGTERM: draining");
                m.drain().await;
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
            drain: Some(self.inner.readiness.clone()),
            ext_authz: Some(Arc::clone(&self.inner.ext_authz)),
        };
        mesh_tower::inbound::serve(
            listener,
            app,
            self.inner.cell.clone(),
            self.inner.certs.clone(),
            config,
            stopped(self.inner.stop.subscribe()),
        )
        .await
        .map_err(MeshError::Serve)
    }

    /// Graceful drain as pilot-agent does it on SIGTERM: readiness turns 503 at once; the
    /// listeners keep accepting for `terminationDrainDuration` — or, with
    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS=true`, for `MINIMUM_DRAIN_DURATION` (default 5s) and
    /// then until no inbound connection is open (checked every second) — then stop
    /// accepting and let in-flight requests finish.
    pub async fn drain(&self) {
        self.inner.readiness.start_draining();
        let env_true = |k: &str| {
            std::env::var(k)
                .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
                .unwrap_or(false)
        };
        if env_true("EXIT_ON_ZERO_ACTIVE_CONNECTIONS") {
            let minimum = std::env::var("MINIMUM_DRAIN_DURATION")
                .ok()
                .and_then(|v| mesh_core::config::parse_duration(&v).ok())
                .unwrap_or(Duration::from_secs(5));
            tokio::time::sleep(minimum).await;
            loop {
                let active = mesh_tower::inbound::active_connections();
                if active == 0 {
                    break;
                }
                tracing::info!(active, "draining: waiting for inbound connections to close");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        } else {
            tokio::time::sleep(self.inner.builder.config.termination_drain).await;
        }
        let _ = self.inner.stop.send(true);
    }

    /// Stops the listeners now (no drain period).
    pub fn shutdown(&self) {
        self.inner.readiness.start_draining();
        let _ = self.inner.stop.send(true);
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

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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
