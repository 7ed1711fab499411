//! Which certificate source pilot-agent would use, from the same signals (pilot-agent's
//! `agent.go` and `options/security.go`):
//!
//! 1. A socket at `./var/run/secrets/workload-spiffe-uds/socket` (SPIRE's CSI driver, or an
//!    external istio-agent): the agent starts no SDS server and no CA client; Envoy reads
//!    `default` / `ROOTCA` from that socket → [`CertificateSource::Sds`].
//! 2. All three of `cert-chain.pem`, `key.pem`, `root-cert.pem` in
//!    `./var/run/secrets/workload-spiffe-credentials/` → file-mounted certificates from there.
//! 3. `FILE_MOUNTED_CERTS=true` → file-mounted certificates from `./etc/certs/`.
//! 4. Otherwise istiod's CA at `CA_ADDR` (default: the discovery address), authenticating
//!    with the certificates in `PROV_CERT` when set (VMs) and writing issued certificates to
//!    `OUTPUT_CERTS` when set.

use std::path::{Path, PathBuf};

use super::{
    CERT_CHAIN_FILE, FILE_MOUNTED_CERTS_DIR, KEY_FILE, ROOT_CERT_FILE, WORKLOAD_CREDENTIALS_DIR,
    WORKLOAD_SDS_SOCKET,
};

/// Where the workload certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateSource {
    /// An SDS server on a Unix socket.
    Sds {
        /// The socket path.
        socket: PathBuf,
    },
    /// Certificate files, watched and reloaded.
    Files {
        /// The directory holding `cert-chain.pem`, `key.pem`, `root-cert.pem`.
        dir: PathBuf,
    },
    /// istiod's CA (CSR over gRPC).
    IstioCa {
        /// `CA_ADDR`, or the discovery address when unset.
        address: String,
        /// `PROV_CERT`: certificates authenticating this workload to the CA, if set.
        provisioned_certs: Option<PathBuf>,
        /// `OUTPUT_CERTS`: where issued certificates are also written, if set.
        output_certs: Option<PathBuf>,
    },
}

/// The inputs of [`select_certificate_source`]: environment values and which well-known
/// files exist. [`SourceSignals::gather`] reads them; tests build them directly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSignals {
    /// The filesystem root the well-known relative paths are resolved against (`/` in a pod).
    pub root: PathBuf,
    /// Whether the workload SDS socket exists.
    pub sds_socket_exists: bool,
    /// Whether all three workload credential files exist.
    pub workload_credentials_exist: bool,
    /// `FILE_MOUNTED_CERTS` is `true`.
    pub file_mounted_certs: bool,
    /// `CA_ADDR`, when set and non-empty.
    pub ca_addr: Option<String>,
    /// The discovery address (`discoveryAddress`, e.g. `istiod.istio-system.svc:15012`).
    pub discovery_address: String,
    /// `PROV_CERT`, when set and non-empty.
    pub prov_cert: Option<PathBuf>,
    /// `OUTPUT_CERTS`, when set and non-empty.
    pub output_certs: Option<PathBuf>,
}

impl SourceSignals {
    /// Reads the signals: `env` looks up an environment variable, `root` is the filesystem
    /// root (`/` in a pod), `discovery_address` the control plane address.
    pub fn gather(
        root: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        discovery_address: &str,
    ) -> Self {
        let non_empty = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        let creds = root.join(WORKLOAD_CREDENTIALS_DIR);
        SourceSignals {
            root: root.to_owned(),
            sds_socket_exists: is_socket(&root.join(WORKLOAD_SDS_SOCKET)),
            workload_credentials_exist: [CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE]
                .iter()
                .all(|f| creds.join(f).is_file()),
            file_mounted_certs: non_empty("FILE_MOUNTED_CERTS")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1"),
            ca_addr: non_empty("CA_ADDR"),
            discovery_address: discovery_address.to_owned(),
            prov_cert: non_empty("PROV_CERT").map(PathBuf::from),
            output_certs: non_empty("OUTPUT_CERTS").map(PathBuf::from),
        }
    }
}

#[cfg(unix)]
fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(not(unix))]
fn is_socket(_path: &Path) -> bool {
    false
}

/// Decides the certificate source from `signals`, in pilot-agent's order (module docs).
pub fn select_certificate_source(signals: &SourceSignals) -> CertificateSource {
    if signals.sds_socket_exists {
        return CertificateSource::Sds {
            socket: signals.root.join(WORKLOAD_SDS_SOCKET),
        };
    }
    if signals.workload_credentials_exist {
        return CertificateSource::Files {
            dir: signals.root.join(WORKLOAD_CREDENTIALS_DIR),
        };
    }
    if signals.file_mounted_certs {
        return CertificateSource::Files {
            dir: signals.root.join(FILE_MOUNTED_CERTS_DIR),
        };
    }
    CertificateSource::IstioCa {
        address: signals
            .ca_addr
            .clone()
            .unwrap_or_else(|| signals.discovery_address.clone()),
        provisioned_certs: signals.prov_cert.clone(),
        output_certs: signals.output_certs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals() -> SourceSignals {
        SourceSignals {
            root: PathBuf::from("/"),
            discovery_address: "istiod.istio-system.svc:15012".into(),
            ..Default::default()
        }
    }

    #[test]
    fn default_is_the_istio_ca_at_the_discovery_address() {
        assert_eq!(
            select_certificate_source(&signals()),
            CertificateSource::IstioCa {
                address: "istiod.istio-system.svc:15012".into(),
                provisioned_certs: None,
                output_certs: None,
            }
        );
    }

    #[test]
    fn ca_addr_prov_cert_and_output_certs_are_carried() {
        let s = SourceSignals {
            ca_addr: Some("ca.example:15012".into()),
            prov_cert: Some("/etc/certs".into()),
            output_certs: Some("/var/lib/istio/data".into()),
            ..signals()
        };
        assert_eq!(
            select_certificate_source(&s),
            CertificateSource::IstioCa {
                address: "ca.example:15012".into(),
                provisioned_certs: Some("/etc/certs".into()),
                output_certs: Some("/var/lib/istio/data".into()),
            }
        );
    }

    #[test]
    fn sds_socket_wins_over_everything() {
        let s = SourceSignals {
            sds_socket_exists: true,
            workload_credentials_exist: true,
            file_mounted_certs: true,
            ca_addr: Some("x:1".into()),
            ..signals()
        };
        assert_eq!(
            select_certificate_source(&s),
            CertificateSource::Sds {
                socket: "/var/run/secrets/workload-spiffe-uds/socket".into()
            }
        );
    }

    #[test]
    fn workload_credentials_then_file_mounted_certs() {
        let s = SourceSignals {
            workload_credentials_exist: true,
            file_mounted_certs: true,
            ..signals()
        };
        assert_eq!(
            select_certificate_source(&s),
            CertificateSource::Files {
                dir: "/var/run/secrets/workload-spiffe-credentials".into()
            }
        );
        let s = SourceSignals {
            file_mounted_certs: true,
            ..signals()
        };
        assert_eq!(
            select_certificate_source(&s),
            CertificateSource::Files {
                dir: "/etc/certs".into()
            }
        );
    }

    #[test]
    fn gather_reads_env_and_files() {
        let dir = std::env::temp_dir().join(format!("mesh-source-{}", std::process::id()));
        let creds = dir.join(WORKLOAD_CREDENTIALS_DIR);
        std::fs::create_dir_all(&creds).unwrap();
        for f in [CERT_CHAIN_FILE, KEY_FILE] {
            std::fs::write(creds.join(f), "x").unwrap();
        }
        let env = |k: &str| match k {
            "FILE_MOUNTED_CERTS" => Some("true".to_owned()),
            "CA_ADDR" => Some(String::new()),
            _ => None,
        };
        let s = SourceSignals::gather(&dir, &env, "istiod:15012");
        // Two of three credential files: not enough.
        assert!(!s.workload_credentials_exist);
        assert!(s.file_mounted_certs);
        assert_eq!(s.ca_addr, None);
        assert!(!s.sds_socket_exists);
        std::fs::write(creds.join(ROOT_CERT_FILE), "x").unwrap();
        let s = SourceSignals::gather(&dir, &env, "istiod:15012");
        assert!(s.workload_credentials_exist);
        // A regular file at the socket path is not a socket.
        let sock = dir.join(WORKLOAD_SDS_SOCKET);
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        std::fs::write(&sock, "x").unwrap();
        assert!(!SourceSignals::gather(&dir, &env, "i:1").sds_socket_exists);
        std::fs::remove_file(&sock).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(SourceSignals::gather(&dir, &env, "i:1").sds_socket_exists);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
