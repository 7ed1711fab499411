//! Configuration from the environment Istio's sidecar injector sets, read through an
//! injectable [`Strings`] source so tests never touch the process environment.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::NodeIdentity;

/// Environment variable names, as Istio's injector and pilot-agent spell them.
pub mod env {
    /// Pod name (downward API).
    pub const POD_NAME: &str = "POD_NAME";
    /// Pod namespace (downward API).
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// Pod IP (downward API).
    pub const INSTANCE_IP: &str = "INSTANCE_IP";
    /// Pod service account (downward API).
    pub const SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
    /// Trust domain of the mesh.
    pub const TRUST_DOMAIN: &str = "TRUST_DOMAIN";
    /// Address of istiod's xDS server (pilot-agent reads it from ProxyConfig `discoveryAddress`).
    pub const DISCOVERY_ADDRESS: &str = "DISCOVERY_ADDRESS";
    /// ztunnel's spelling of the xDS address; accepted too.
    pub const XDS_ADDRESS: &str = "XDS_ADDRESS";
    /// Address of the CA (defaults to the discovery address).
    pub const CA_ADDR: &str = "CA_ADDR";
    /// Root certificate that verifies istiod's xDS server certificate.
    pub const XDS_ROOT_CA: &str = "XDS_ROOT_CA";
    /// Root certificate that verifies the CA's server certificate.
    pub const CA_ROOT_CA: &str = "CA_ROOT_CA";
    /// Path of the projected service-account token sent as `authorization: Bearer`.
    pub const ISTIO_TOKEN_PATH: &str = "ISTIO_TOKEN_PATH";
    /// Requested workload certificate lifetime (Go duration, e.g. `24h`).
    pub const SECRET_TTL: &str = "SECRET_TTL";
    /// Whether to use delta xDS (istiod's default: true).
    pub const ISTIO_DELTA_XDS: &str = "ISTIO_DELTA_XDS";
    /// Prefix of node metadata variables.
    pub const ISTIO_META_PREFIX: &str = "ISTIO_META_";
    /// Pod labels as JSON.
    pub const ISTIO_METAJSON_LABELS: &str = "ISTIO_METAJSON_LABELS";
    /// Cluster id metadata.
    pub const ISTIO_META_CLUSTER_ID: &str = "ISTIO_META_CLUSTER_ID";
    /// Workload name metadata.
    pub const ISTIO_META_WORKLOAD_NAME: &str = "ISTIO_META_WORKLOAD_NAME";
    /// Status port (pilot-agent's 15020).
    pub const STATUS_PORT: &str = "STATUS_PORT";
    /// Termination drain duration.
    pub const TERMINATION_DRAIN_DURATION_SECONDS: &str = "TERMINATION_DRAIN_DURATION_SECONDS";
    /// mesh's own: port of the optional admin listener (Envoy's 15000) on 127.0.0.1; unset
    /// or `0` leaves it off.
    pub const MESH_ADMIN_PORT: &str = "MESH_ADMIN_PORT";

    // Graceful drain (pilot-agent's options.go; FACTS.md g).
    /// `true`: the drain ends once no inbound connection is open (checked every second after
    /// `MINIMUM_DRAIN_DURATION`) instead of after `terminationDrainDuration`.
    pub const EXIT_ON_ZERO_ACTIVE_CONNECTIONS: &str = "EXIT_ON_ZERO_ACTIVE_CONNECTIONS";
    /// With `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, how long the drain lasts at least (Go
    /// duration, default `5s`).
    pub const MINIMUM_DRAIN_DURATION: &str = "MINIMUM_DRAIN_DURATION";
}

/// Default xDS/CA address in an injected pod.
pub const DEFAULT_DISCOVERY_ADDRESS: &str = "istiod.istio-system.svc:15012";
/// Default token path (FACTS.md b.3).
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Default root certificate for istiod (FACTS.md b.4).
pub const DEFAULT_ROOT_CERT_PATH: &str = "/var/run/secrets/istio/root-cert.pem";
/// Default workload certificate lifetime: 24h (`SECRET_TTL`).
pub const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);
/// pilot-agent's status port.
pub const DEFAULT_STATUS_PORT: u16 = 15020;
/// Envoy's readiness port.
pub const DEFAULT_READINESS_PORT: u16 = 15021;
/// Envoy's Prometheus port.
pub const DEFAULT_PROMETHEUS_PORT: u16 = 15090;
/// Envoy's admin port, where mesh's optional admin listener goes when enabled.
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// ProxyConfig `terminationDrainDuration` default.
pub const DEFAULT_TERMINATION_DRAIN: Duration = Duration::from_secs(5);
/// pilot-agent's `MINIMUM_DRAIN_DURATION` default.
pub const DEFAULT_MINIMUM_DRAIN: Duration = Duration::from_secs(5);

/// A source of configuration strings: the process environment, or a map in tests.
pub trait Strings: Send + Sync {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
    /// Every `(key, value)` whose key starts with `prefix`.
    fn with_prefix(&self, prefix: &str) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Strings for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
    fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut v: Vec<_> = std::env::vars()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect();
        v.sort();
        v
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).filter(|v| !v.is_empty()).cloned()
    }
    fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort();
        v
    }
}

impl Strings for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).filter(|v| !v.is_empty()).cloned()
    }
    fn with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{0} is not set (the Istio sidecar injector sets it from the downward API)")]
    Missing(&'static str),
    /// A variable is set but cannot be parsed.
    #[error("{key}={value:?} is invalid: {reason}")]
    Invalid {
        /// Variable name.
        key: String,
        /// Its value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// How mesh reaches istiod for xDS or the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlaneAddress {
    /// `host:port`.
    pub address: String,
    /// Use TLS (verified against `root_cert`); plaintext when false (like :15010).
    pub tls: bool,
    /// PEM file with the roots that verify the server (TLS only).
    pub root_cert: Option<PathBuf>,
    /// Name the server certificate must carry; defaults to the host part, with `localhost*`
    /// mapped to `istiod.istio-system.svc` as pilot-agent does.
    pub server_name: Option<String>,
}

impl ControlPlaneAddress {
    /// The TLS server name to verify: explicit, else the host part (`localhost` →
    /// `istiod.istio-system.svc`).
    pub fn tls_server_name(&self) -> String {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        let host = self
            .address
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.address)
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.starts_with("localhost") {
            "istiod.istio-system.svc".to_owned()
        } else {
            host.to_owned()
        }
    }
}

/// Everything mesh needs to start, as pilot-agent would read it.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Who this workload is.
    pub node: NodeIdentity,
    /// istiod's xDS server.
    pub discovery: ControlPlaneAddress,
    /// istiod's CA (`None`: certificates come from elsewhere, e.g. a builder-supplied one).
    pub ca: Option<ControlPlaneAddress>,
    /// Token file sent as `authorization: Bearer` (re-read on every call).
    pub token_path: Option<PathBuf>,
    /// Requested workload certificate lifetime.
    pub secret_ttl: Duration,
    /// Delta xDS (default) or state-of-the-world.
    pub delta_xds: bool,
    /// 15020 (`None`: off).
    pub status_port: Option<u16>,
    /// 15021 (`None`: off).
    pub readiness_port: Option<u16>,
    /// 15090 (`None`: off).
    pub prometheus_port: Option<u16>,
    /// Address the pod-facing listeners bind (default 0.0.0.0 in a pod; tests use 127.0.0.1).
    pub admin_bind: IpAddr,
    /// The admin listener (Envoy's 15000: `/config_dump`, `/clusters`, `/ready`,
    /// `/server_info`), always on 127.0.0.1; `None` (the default): off, and the raw xDS
    /// resources `/config_dump` needs are not kept.
    pub admin_port: Option<u16>,
    /// `terminationDrainDuration`.
    pub termination_drain: Duration,
    /// How the drain ends (`EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, `MINIMUM_DRAIN_DURATION`).
    pub drain: DrainConfig,
    /// When workload certificates are renewed (`SECRET_GRACE_PERIOD_RATIO` and its jitter).
    pub secret_rotation: SecretRotation,
    /// `PROV_CERT` and `OUTPUT_CERTS`.
    pub ca_certificate_dirs: CaCertificateDirs,
}

/// How pilot-agent's graceful drain ends, besides `terminationDrainDuration` (FACTS.md g).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainConfig {
    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`: end the drain once no inbound connection is open,
    /// checked every second after [`DrainConfig::minimum`], instead of after
    /// `terminationDrainDuration`.
    pub exit_on_zero_active_connections: bool,
    /// `MINIMUM_DRAIN_DURATION`: the drain's length before connections are counted.
    pub minimum: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            exit_on_zero_active_connections: false,
            minimum: DEFAULT_MINIMUM_DRAIN,
        }
    }
}

impl DrainConfig {
    /// Reads `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` (a boolean) and `MINIMUM_DRAIN_DURATION` (a Go
    /// duration) with pilot-agent's defaults (`false`, `5s`).
    pub fn from_strings(s: &dyn Strings) -> Result<DrainConfig, ConfigError> {
        let mut drain = DrainConfig::default();
        if let Some(v) = s.get(env::EXIT_ON_ZERO_ACTIVE_CONNECTIONS) {
            drain.exit_on_zero_active_connections =
                parse_bool(&v).map_err(|e| invalid(env::EXIT_ON_ZERO_ACTIVE_CONNECTIONS, &v, e))?;
        }
        if let Some(v) = s.get(env::MINIMUM_DRAIN_DURATION) {
            drain.minimum =
                parse_duration(&v).map_err(|e| invalid(env::MINIMUM_DRAIN_DURATION, &v, e))?;
        }
        Ok(drain)
    }
}

impl MeshConfig {
    /// pilot-agent's defaults for `node`: istiod and its CA at
    /// `istiod.istio-system.svc:15012` (TLS, root from the mounted `root-cert.pem`), the
    /// projected token, 24h certificates, delta xDS, ports 15020/15021/15090 on 0.0.0.0.
    pub fn for_node(node: NodeIdentity) -> MeshConfig {
        let discovery = parse_address(DEFAULT_DISCOVERY_ADDRESS, None);
        MeshConfig {
            node,
            ca: Some(discovery.clone()),
            discovery,
            token_path: Some(PathBuf::from(DEFAULT_TOKEN_PATH)),
            secret_ttl: DEFAULT_SECRET_TTL,
            delta_xds: true,
            status_port: Some(DEFAULT_STATUS_PORT),
            readiness_port: Some(DEFAULT_READINESS_PORT),
            prometheus_port: Some(DEFAULT_PROMETHEUS_PORT),
            admin_bind: IpAddr::from([0, 0, 0, 0]),
            admin_port: None,
            termination_drain: DEFAULT_TERMINATION_DRAIN,
            drain: DrainConfig::default(),
            secret_rotation: SecretRotation::default(),
            ca_certificate_dirs: CaCertificateDirs::default(),
        }
    }

    /// Reads the configuration the injector sets. `POD_NAME`, `POD_NAMESPACE` and
    /// `INSTANCE_IP` are required; everything else has pilot-agent's default.
    pub fn from_strings(s: &dyn Strings) -> Result<MeshConfig, ConfigError> {
        let pod = s
            .get(env::POD_NAME)
            .ok_or(ConfigError::Missing(env::POD_NAME))?;
        let ns = s
            .get(env::POD_NAMESPACE)
            .ok_or(ConfigError::Missing(env::POD_NAMESPACE))?;
        let ip_s = s
            .get(env::INSTANCE_IP)
            .ok_or(ConfigError::Missing(env::INSTANCE_IP))?;
        let ip: IpAddr = ip_s
            .parse()
            .map_err(|e| invalid(env::INSTANCE_IP, &ip_s, e))?;
        let sa = s
            .get(env::SERVICE_ACCOUNT)
            .unwrap_or_else(|| "default".into());
        let mut node = NodeIdentity::new(&pod, &ns, ip, &sa);
        if let Some(td) = s.get(env::TRUST_DOMAIN) {
            node.trust_domain = td;
        }
        for (k, v) in s.with_prefix(env::ISTIO_META_PREFIX) {
            let key = &k[env::ISTIO_META_PREFIX.len()..];
            match key {
                "CLUSTER_ID" => node.cluster_id = v.clone(),
                "WORKLOAD_NAME" => node.workload_name = v.clone(),
                "DNS_DOMAIN" => {}
                _ => {}
            }
            node.metadata.insert(key.to_owned(), v);
        }
        if let Some(json) = s.get(env::ISTIO_METAJSON_LABELS) {
            let labels: BTreeMap<String, String> = serde_json::from_str(&json)
                .map_err(|e| invalid(env::ISTIO_METAJSON_LABELS, &json, e))?;
            node.labels = labels;
        }
        let discovery_addr = s
            .get(env::DISCOVERY_ADDRESS)
            .or_else(|| s.get(env::XDS_ADDRESS))
            .unwrap_or_else(|| DEFAULT_DISCOVERY_ADDRESS.into());
        // pilot-agent's `FindRootCAForXDS` / `FindRootCAForCA`: with `PROV_CERT`, its
        // `root-cert.pem` (not checked for existence) comes before the mounted default.
        let prov_root = CaCertificateDirs::from_strings(s)
            .prov_cert
            .map(|d| d.join("root-cert.pem").to_string_lossy().into_owned());
        let discovery = parse_address(
            &discovery_addr,
            s.get(env::XDS_ROOT_CA).or(prov_root.clone()),
        );
        let ca_addr = s
            .get(env::CA_ADDR)
            .unwrap_or_else(|| discovery.address.clone());
        let ca = parse_address(
            &ca_addr,
            s.get(env::CA_ROOT_CA)
                .or(prov_root)
                .or(s.get(env::XDS_ROOT_CA)),
        );
        let secret_ttl = match s.get(env::SECRET_TTL) {
            Some(v) => parse_duration(&v).map_err(|e| invalid(env::SECRET_TTL, &v, e))?,
            None => DEFAULT_SECRET_TTL,
        };
        let delta_xds = match s.get(env::ISTIO_DELTA_XDS) {
            Some(v) => parse_bool(&v).map_err(|e| invalid(env::ISTIO_DELTA_XDS, &v, e))?,
            None => true,
        };
        let status_port = match s.get(env::STATUS_PORT) {
            Some(v) => Some(v.parse().map_err(|e| invalid(env::STATUS_PORT, &v, e))?),
            None => Some(DEFAULT_STATUS_PORT),
        };
        let admin_port = match s.get(env::MESH_ADMIN_PORT) {
            Some(v) => Some(
                v.parse::<u16>()
                    .map_err(|e| invalid(env::MESH_ADMIN_PORT, &v, e))?,
            )
            .filter(|p| *p != 0),
            None => None,
        };
        let termination_drain = match s.get(env::TERMINATION_DRAIN_DURATION_SECONDS) {
            Some(v) => Duration::from_secs(
                v.parse()
                    .map_err(|e| invalid(env::TERMINATION_DRAIN_DURATION_SECONDS, &v, e))?,
            ),
            None => DEFAULT_TERMINATION_DRAIN,
        };
        let token_path = Some(
            s.get(env::ISTIO_TOKEN_PATH)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_TOKEN_PATH)),
        );
        Ok(MeshConfig {
            node,
            discovery,
            ca: Some(ca),
            token_path,
            secret_ttl,
            delta_xds,
            status_port: status_port.filter(|p: &u16| *p != 0),
            readiness_port: Some(DEFAULT_READINESS_PORT),
            prometheus_port: Some(DEFAULT_PROMETHEUS_PORT),
            admin_bind: IpAddr::from([0, 0, 0, 0]),
            admin_port,
            termination_drain,
            drain: DrainConfig::from_strings(s)?,
            secret_rotation: SecretRotation::from_strings(s)?,
            ca_certificate_dirs: CaCertificateDirs::from_strings(s),
        })
    }
}

// ---- Workload certificate rotation (pilot-agent `SECRET_GRACE_PERIOD_RATIO*`) ----

/// `SECRET_GRACE_PERIOD_RATIO`: the fraction of a certificate's lifetime left when it is
/// renewed (pilot-agent's default 0.5: at half-life).
pub const SECRET_GRACE_PERIOD_RATIO_ENV: &str = "SECRET_GRACE_PERIOD_RATIO";
/// `SECRET_GRACE_PERIOD_RATIO_JITTER`: the ratio varies by ± U(0, jitter) per rotation.
pub const SECRET_GRACE_PERIOD_RATIO_JITTER_ENV: &str = "SECRET_GRACE_PERIOD_RATIO_JITTER";
/// pilot-agent's default `SECRET_GRACE_PERIOD_RATIO`.
pub const DEFAULT_SECRET_GRACE_PERIOD_RATIO: f64 = 0.5;
/// pilot-agent's default `SECRET_GRACE_PERIOD_RATIO_JITTER`.
pub const DEFAULT_SECRET_GRACE_PERIOD_RATIO_JITTER: f64 = 0.01;

/// When the workload certificate from istiod's CA is renewed: at `expire − grace`, with
/// `grace = (grace_period_ratio ± U(0, grace_period_ratio_jitter)) × lifetime`
/// (pilot-agent's `rotateTime`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SecretRotation {
    /// `SECRET_GRACE_PERIOD_RATIO`, in `0..=1`.
    pub grace_period_ratio: f64,
    /// `SECRET_GRACE_PERIOD_RATIO_JITTER`, in `0..=1`.
    pub grace_period_ratio_jitter: f64,
}

impl Default for SecretRotation {
    fn default() -> Self {
        SecretRotation {
            grace_period_ratio: DEFAULT_SECRET_GRACE_PERIOD_RATIO,
            grace_period_ratio_jitter: DEFAULT_SECRET_GRACE_PERIOD_RATIO_JITTER,
        }
    }
}

impl SecretRotation {
    /// Reads both variables; an unparsable value or one outside `0..=1` is refused.
    pub fn from_strings(s: &dyn Strings) -> Result<SecretRotation, ConfigError> {
        let ratio = |key: &str, default: f64| -> Result<f64, ConfigError> {
            let Some(v) = s.get(key) else {
                return Ok(default);
            };
            let r: f64 = v.trim().parse().map_err(|e| invalid(key, &v, e))?;
            if !(0.0..=1.0).contains(&r) {
                return Err(invalid(key, &v, "must be between 0 and 1"));
            }
            Ok(r)
        };
        Ok(SecretRotation {
            grace_period_ratio: ratio(
                SECRET_GRACE_PERIOD_RATIO_ENV,
                DEFAULT_SECRET_GRACE_PERIOD_RATIO,
            )?,
            grace_period_ratio_jitter: ratio(
                SECRET_GRACE_PERIOD_RATIO_JITTER_ENV,
                DEFAULT_SECRET_GRACE_PERIOD_RATIO_JITTER,
            )?,
        })
    }
}

// ---- end of workload certificate rotation ----

// ---- Certificate directories of the CA client (pilot-agent `PROV_CERT`, `OUTPUT_CERTS`) ----

/// `PROV_CERT`: directory with `cert-chain.pem` / `key.pem` (and `root-cert.pem`) that
/// authenticate this workload to the CA by TLS client certificate (VMs).
pub const PROV_CERT_ENV: &str = "PROV_CERT";
/// `OUTPUT_CERTS`: directory where the certificate issued by the CA is also written.
pub const OUTPUT_CERTS_ENV: &str = "OUTPUT_CERTS";

/// The directories pilot-agent's CA client reads from and writes to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaCertificateDirs {
    /// `PROV_CERT`.
    pub prov_cert: Option<PathBuf>,
    /// `OUTPUT_CERTS`.
    pub output_certs: Option<PathBuf>,
}

impl CaCertificateDirs {
    /// Reads `PROV_CERT` and `OUTPUT_CERTS` (unset or blank: none).
    pub fn from_strings(s: &dyn Strings) -> CaCertificateDirs {
        let dir = |key: &str| {
            s.get(key)
                .filter(|v| !v.trim().is_empty())
                .map(|v| PathBuf::from(v.trim()))
        };
        CaCertificateDirs {
            prov_cert: dir(PROV_CERT_ENV),
            output_certs: dir(OUTPUT_CERTS_ENV),
        }
    }
}

// ---- end of CA client certificate directories ----

/// `host:15010` is istiod's plaintext port; everything else is TLS, as pilot-agent assumes.
fn parse_address(addr: &str, root: Option<String>) -> ControlPlaneAddress {
    let tls = !addr.ends_with(":15010");
    ControlPlaneAddress {
        address: addr.to_owned(),
        tls,
        root_cert: Some(
            root.map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT_CERT_PATH)),
        ),
        server_name: None,
    }
}

fn invalid(key: &str, value: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Ok(true),
        "0" | "f" | "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// Parses a Go duration string (`24h`, `1h30m`, `90s`, `500ms`) as pilot-agent's env vars use.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = v.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in {v:?}"))?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| format!("bad number in {v:?}"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let secs = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(format!("unknown unit {unit:?} in {v:?}")),
        };
        total += Duration::from_secs_f64(n * secs);
        rest = tail;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_injected_environment() {
        let s = strings(&[
            ("POD_NAME", "reviews-v1-7f99c7d8b5-abcde"),
            ("POD_NAMESPACE", "bookinfo"),
            ("INSTANCE_IP", "10.0.0.7"),
            ("SERVICE_ACCOUNT", "reviews"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_MESH_ID", "m1"),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"reviews","version":"v1"}"#,
            ),
            ("CA_ADDR", "istiod.istio-system.svc:15012"),
            ("DISCOVERY_ADDRESS", "istiod.istio-system.svc:15010"),
            ("SECRET_TTL", "12h"),
        ]);
        let c = MeshConfig::from_strings(&s).unwrap();
        assert_eq!(c.node.cluster_id, "east");
        assert_eq!(
            c.node.metadata.get("MESH_ID").map(String::as_str),
            Some("m1")
        );
        assert_eq!(
            c.node.labels.get("app").map(String::as_str),
            Some("reviews")
        );
        assert!(!c.discovery.tls, ":15010 is plaintext");
        assert!(c.ca.as_ref().unwrap().tls);
        assert_eq!(c.secret_ttl, Duration::from_secs(12 * 3600));
        assert!(c.delta_xds);
        assert_eq!(c.ca.unwrap().tls_server_name(), "istiod.istio-system.svc");
        assert_eq!(c.admin_port, None, "the admin listener is off by default");
    }

    #[test]
    fn mesh_admin_port_turns_the_admin_listener_on() {
        let base = [
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "ns"),
            ("INSTANCE_IP", "10.0.0.7"),
        ];
        let with = |v: &str| {
            let mut kv = base.to_vec();
            kv.push(("MESH_ADMIN_PORT", v));
            MeshConfig::from_strings(&strings(&kv))
        };
        assert_eq!(with("15000").unwrap().admin_port, Some(15000));
        assert_eq!(with("0").unwrap().admin_port, None);
        let e = with("admin").unwrap_err().to_string();
        assert!(e.contains("MESH_ADMIN_PORT"), "{e}");
    }

    #[test]
    fn missing_and_invalid_values_are_named() {
        let e = MeshConfig::from_strings(&strings(&[("POD_NAME", "p")])).unwrap_err();
        assert!(e.to_string().contains("POD_NAMESPACE"), "{e}");
        let e = MeshConfig::from_strings(&strings(&[
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("INSTANCE_IP", "not-an-ip"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("INSTANCE_IP=\"not-an-ip\""), "{e}");
    }

    #[test]
    fn secret_grace_period_ratio_and_jitter() {
        let base = [
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "ns"),
            ("INSTANCE_IP", "10.0.0.7"),
        ];
        let with = |kv: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(kv);
            MeshConfig::from_strings(&strings(&all))
        };
        let d = with(&[]).unwrap().secret_rotation;
        assert_eq!(d.grace_period_ratio, 0.5);
        assert_eq!(d.grace_period_ratio_jitter, 0.01);
        let c = with(&[
            ("SECRET_GRACE_PERIOD_RATIO", "0.8"),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
        ])
        .unwrap()
        .secret_rotation;
        assert_eq!(c.grace_period_ratio, 0.8);
        assert_eq!(c.grace_period_ratio_jitter, 0.0);
        for bad in ["1.5", "-0.1", "half"] {
            let e = with(&[("SECRET_GRACE_PERIOD_RATIO", bad)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("SECRET_GRACE_PERIOD_RATIO="), "{e}");
        }
        let e = with(&[("SECRET_GRACE_PERIOD_RATIO_JITTER", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SECRET_GRACE_PERIOD_RATIO_JITTER="), "{e}");
    }

    #[test]
    fn prov_cert_and_output_certs() {
        let mut kv = vec![
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "ns"),
            ("INSTANCE_IP", "10.0.0.7"),
        ];
        let c = MeshConfig::from_strings(&strings(&kv)).unwrap();
        assert_eq!(c.ca_certificate_dirs, CaCertificateDirs::default());
        kv.push(("PROV_CERT", "/var/lib/istio/certs"));
        kv.push(("OUTPUT_CERTS", "/var/lib/istio/out"));
        let c = MeshConfig::from_strings(&strings(&kv)).unwrap();
        // Both roots default to PROV_CERT's root-cert.pem (pilot-agent's FindRootCA*).
        let prov_root = Some(PathBuf::from("/var/lib/istio/certs/root-cert.pem"));
        assert_eq!(c.discovery.root_cert, prov_root);
        assert_eq!(c.ca.as_ref().unwrap().root_cert, prov_root);
        kv.push(("CA_ROOT_CA", "/ca-root.pem"));
        kv.push(("XDS_ROOT_CA", "/xds-root.pem"));
        let explicit = MeshConfig::from_strings(&strings(&kv)).unwrap();
        assert_eq!(
            explicit.discovery.root_cert,
            Some(PathBuf::from("/xds-root.pem"))
        );
        assert_eq!(
            explicit.ca.unwrap().root_cert,
            Some(PathBuf::from("/ca-root.pem"))
        );
        assert_eq!(
            c.ca_certificate_dirs.prov_cert.as_deref(),
            Some(std::path::Path::new("/var/lib/istio/certs"))
        );
        assert_eq!(
            c.ca_certificate_dirs.output_certs.as_deref(),
            Some(std::path::Path::new("/var/lib/istio/out"))
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn localhost_maps_to_istiod_san() {
        let a = ControlPlaneAddress {
            address: "localhost:15012".into(),
            tls: true,
            root_cert: None,
            server_name: None,
        };
        assert_eq!(a.tls_server_name(), "istiod.istio-system.svc");
    }

    #[test]
    fn drain_settings_as_pilot_agent_reads_them() {
        let base = [
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("INSTANCE_IP", "10.0.0.1"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut kv = base.to_vec();
            kv.extend_from_slice(extra);
            MeshConfig::from_strings(&strings(&kv))
        };
        let defaults = with(&[]).unwrap();
        assert_eq!(defaults.termination_drain, Duration::from_secs(5));
        assert_eq!(
            defaults.drain,
            DrainConfig {
                exit_on_zero_active_connections: false,
                minimum: Duration::from_secs(5),
            }
        );
        let set = with(&[
            ("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "true"),
            ("MINIMUM_DRAIN_DURATION", "1500ms"),
            ("TERMINATION_DRAIN_DURATION_SECONDS", "30"),
        ])
        .unwrap();
        assert!(set.drain.exit_on_zero_active_connections);
        assert_eq!(set.drain.minimum, Duration::from_millis(1500));
        assert_eq!(set.termination_drain, Duration::from_secs(30));
        let e = with(&[("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "yes")]).unwrap_err();
        assert!(
            e.to_string().contains("EXIT_ON_ZERO_ACTIVE_CONNECTIONS"),
            "{e}"
        );
        let e = with(&[("MINIMUM_DRAIN_DURATION", "5")]).unwrap_err();
        assert!(e.to_string().contains("MINIMUM_DRAIN_DURATION"), "{e}");
    }
}
