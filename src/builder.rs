//! [`MeshBuilder`]: the same configuration `Mesh::from_env()` reads, set from code.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::WorkloadCertificate;
use mesh_core::config::{ControlPlaneAddress, MeshConfig, ProcessEnv, Strings};
use mesh_core::identity::NodeIdentity;
use mesh_core::listener::InboundTlsMode;

use crate::error::MeshError;
use crate::runtime::Mesh;

/// Where the workload certificate comes from.
#[derive(Debug, Clone)]
pub enum CertificateSource {
    /// The default: what pilot-agent would pick from the same signals — the workload SDS
    /// socket (`/var/run/secrets/workload-spiffe-uds/socket`, SPIRE or an external
    /// istio-agent), else the workload credentials directory
    /// (`/var/run/secrets/workload-spiffe-credentials/`), else `/etc/certs/` when
    /// `FILE_MOUNTED_CERTS=true`, else istiod's CA.
    Auto,
    /// istiod's CA, at the configured CA address.
    IstioCa,
    /// File-mounted certificates: `cert-chain.pem`, `key.pem`, `root-cert.pem` in this
    /// directory, watched and reloaded when they change.
    Files(std::path::PathBuf),
    /// An SDS server on this Unix socket (resources `default` and `ROOTCA`).
    Sds(std::path::PathBuf),
    /// A certificate supplied by the caller (tests, or certificates provisioned elsewhere).
    Static(Box<WorkloadCertificate>),
    /// No certificate: plaintext only (mTLS endpoints will fail with `UF`).
    None,
}

/// Builds a [`Mesh`]. Start from [`Mesh::builder`] (explicit node identity) or
/// [`Mesh::from_env`] (the environment the Istio injector sets), override what you need, then
/// [`MeshBuilder::start`].
#[derive(Debug, Clone)]
pub struct MeshBuilder {
    pub(crate) config: MeshConfig,
    pub(crate) certificate: CertificateSource,
    pub(crate) app_port: u16,
    pub(crate) inbound_mode: Option<InboundTlsMode>,
    pub(crate) handle_signals: bool,
    pub(crate) dns_servers: Option<Vec<std::net::SocketAddr>>,
}

/// The port `mesh::serve` binds when nothing names one (`ISTIO_META_POD_PORTS` or
/// `MESH_APP_PORT`).
pub const DEFAULT_APP_PORT: u16 = 8080;

impl MeshBuilder {
    /// A builder for `node` with pilot-agent's defaults: istiod at
    /// `istiod.istio-system.svc:15012` (TLS), CA at the same address, delta xDS, ports
    /// 15020/15021/15090 on 0.0.0.0.
    pub fn new(node: NodeIdentity) -> Self {
        MeshBuilder {
            config: MeshConfig::for_node(node),
            certificate: CertificateSource::Auto,
            app_port: DEFAULT_APP_PORT,
            inbound_mode: None,
            handle_signals: false,
            dns_servers: None,
        }
    }

    /// Reads the configuration from any [`Strings`] source (the process environment in
    /// production, a map in tests).
    pub fn from_strings(source: &dyn Strings) -> Result<Self, MeshError> {
        let config = MeshConfig::from_strings(source)?;
        let app_port = app_port_from(source).unwrap_or(DEFAULT_APP_PORT);
        Ok(MeshBuilder {
            config,
            certificate: CertificateSource::Auto,
            app_port,
            inbound_mode: None,
            handle_signals: false,
            dns_servers: None,
        })
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, MeshError> {
        let mut b = Self::from_strings(&ProcessEnv)?;
        b.handle_signals = true;
        Ok(b)
    }

    /// istiod's xDS address; `tls` with `root_cert` like :15012, plaintext like :15010.
    pub fn discovery_address(
        mut self,
        address: impl Into<String>,
        tls: bool,
        root_cert: Option<PathBuf>,
    ) -> Self {
        self.config.discovery = ControlPlaneAddress {
            address: address.into(),
            tls,
            root_cert,
            server_name: None,
        };
        self
    }

    /// The CA address (defaults to the discovery address).
    pub fn ca_address(
        mut self,
        address: impl Into<String>,
        tls: bool,
        root_cert: Option<PathBuf>,
    ) -> Self {
        self.config.ca = Some(ControlPlaneAddress {
            address: address.into(),
            tls,
            root_cert,
            server_name: None,
        });
        self
    }

    /// The TLS server name istiod's certificate must carry (default derived from the address).
    pub fn control_plane_server_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.config.discovery.server_name = Some(name.clone());
        if let Some(ca) = &mut self.config.ca {
            ca.server_name = Some(name);
        }
        self
    }

    /// The service-account token file sent as `authorization: Bearer`.
    pub fn token_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.token_path = Some(path.into());
        self
    }

    /// Where the workload certificate comes from.
    pub fn certificate(mut self, source: CertificateSource) -> Self {
        self.certificate = source;
        self
    }

    /// Requested workload certificate lifetime (`SECRET_TTL`).
    pub fn secret_ttl(mut self, ttl: Duration) -> Self {
        self.config.secret_ttl = ttl;
        self
    }

    /// When the workload certificate is renewed: at `grace_period_ratio` (± `jitter`) of its
    /// lifetime left (`SECRET_GRACE_PERIOD_RATIO`, `SECRET_GRACE_PERIOD_RATIO_JITTER`; both
    /// clamped to `0..=1`).
    pub fn secret_grace_period_ratio(mut self, grace_period_ratio: f64, jitter: f64) -> Self {
        self.config.secret_rotation = mesh_core::config::SecretRotation {
            grace_period_ratio: grace_period_ratio.clamp(0.0, 1.0),
            grace_period_ratio_jitter: jitter.clamp(0.0, 1.0),
        };
        self
    }

    /// `PROV_CERT`: authenticate to istiod's CA with the TLS client certificate in `dir`
    /// (`cert-chain.pem`, `key.pem`) instead of only the token, as pilot-agent does on VMs.
    /// Needs a TLS CA address.
    pub fn provisioned_certs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.ca_certificate_dirs.prov_cert = Some(dir.into());
        self
    }

    /// `OUTPUT_CERTS`: also write each certificate issued by istiod's CA to `dir` as
    /// `cert-chain.pem`, `key.pem` and `root-cert.pem`.
    pub fn output_certs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.ca_certificate_dirs.output_certs = Some(dir.into());
        self
    }

    /// Delta xDS (default) or state-of-the-world.
    pub fn delta_xds(mut self, delta: bool) -> Self {
        self.config.delta_xds = delta;
        self
    }

    /// Ports of the pod-facing listeners: `None` turns one off, `Some(0)` picks a free port
    /// (see [`Mesh::status_addr`]).
    pub fn status_ports(
        mut self,
        agent: Option<u16>,
        readiness: Option<u16>,
        prometheus: Option<u16>,
    ) -> Self {
        self.config.status_port = agent;
        self.config.readiness_port = readiness;
        self.config.prometheus_port = prometheus;
        self
    }

    /// The optional admin listener (Envoy's 15000, always on 127.0.0.1): `/config_dump` in
    /// Envoy's admin JSON with every accepted xDS resource in full, `/clusters`, `/ready`,
    /// `/server_info`, `/stats`. `None` (the default) turns it off, and the raw resources
    /// `/config_dump` needs are then not kept; `Some(0)` picks a free port (see
    /// [`Mesh::status_addr`](crate::Mesh::status_addr) with `StatusPort::Admin`). Also set by
    /// `MESH_ADMIN_PORT`.
    pub fn admin_port(mut self, port: Option<u16>) -> Self {
        self.config.admin_port = port;
        self
    }

    /// Address the pod-facing listeners and the app listener bind (0.0.0.0 in a pod).
    pub fn bind_address(mut self, ip: IpAddr) -> Self {
        self.config.admin_bind = ip;
        self
    }

    /// The port [`Mesh::serve`] binds for the application (`0`: a free port).
    pub fn app_port(mut self, port: u16) -> Self {
        self.app_port = port;
        self
    }

    /// The DNS servers names outside the NDS table go to (PassthroughCluster hosts, the hosts
    /// of `STRICT_DNS` / `LOGICAL_DNS` clusters), instead of `/etc/resolv.conf`'s.
    pub fn dns_servers(mut self, servers: Vec<std::net::SocketAddr>) -> Self {
        self.dns_servers = Some(servers);
        self
    }

    /// Overrides the inbound PeerAuthentication mode istiod sends.
    pub fn inbound_mode(mut self, mode: InboundTlsMode) -> Self {
        self.inbound_mode = Some(mode);
        self
    }

    /// `terminationDrainDuration`: how long after SIGTERM listeners keep accepting.
    pub fn termination_drain(mut self, d: Duration) -> Self {
        self.config.termination_drain = d;
        self
    }

    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` and `MINIMUM_DRAIN_DURATION`: with `exit_on_zero`,
    /// the drain lasts `minimum`, then until no inbound connection is open (checked every
    /// second), instead of `terminationDrainDuration`.
    pub fn drain_on_zero_active_connections(
        mut self,
        exit_on_zero: bool,
        minimum: Duration,
    ) -> Self {
        self.config.drain = mesh_core::config::DrainConfig {
            exit_on_zero_active_connections: exit_on_zero,
            minimum,
        };
        self
    }

    /// Whether SIGTERM/SIGINT start a graceful drain (on for [`MeshBuilder::from_env`]).
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.handle_signals = on;
        self
    }

    /// The configuration as it stands.
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// Starts the runtime: certificate, xDS stream, status listeners.
    pub async fn start(self) -> Result<Mesh, MeshError> {
        Mesh::start(self).await
    }
}

/// `MESH_APP_PORT`, else the first container port in `ISTIO_META_POD_PORTS` (the injector's
/// JSON list `[{"containerPort":9080,...}]`).
fn app_port_from(s: &dyn Strings) -> Option<u16> {
    if let Some(p) = s.get("MESH_APP_PORT").and_then(|v| v.parse().ok()) {
        return Some(p);
    }
    let ports = s.get("ISTIO_META_POD_PORTS")?;
    let key = "\"containerPort\":";
    let at = ports.find(key)? + key.len();
    let digits: String = ports[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn app_port_from_injected_pod_ports() {
        let mut env: HashMap<String, String> = [
            ("POD_NAME", "a-1"),
            ("POD_NAMESPACE", "ns"),
            ("INSTANCE_IP", "10.0.0.1"),
            (
                "ISTIO_META_POD_PORTS",
                r#"[{"name":"http","containerPort":9080,"protocol":"TCP"}]"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(MeshBuilder::from_strings(&env).unwrap().app_port, 9080);
        env.insert("MESH_APP_PORT".into(), "7070".into());
        assert_eq!(MeshBuilder::from_strings(&env).unwrap().app_port, 7070);
        env.remove("POD_NAME");
        assert!(MeshBuilder::from_strings(&env).is_err());
    }
}
