//! Workload certificate sources other than istiod's CA, behind the same
//! [`mesh_core::CertStore`] (FACTS.md b.7; pilot-agent's `agent.go`):
//!
//! * [`sds`]: an SDS client (`envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets`)
//!   over the Unix socket SPIRE or istio-agent serves at
//!   `./var/run/secrets/workload-spiffe-uds/socket`, resource names `default` and `ROOTCA`.
//! * [`file`]: file-mounted certificates (`cert-chain.pem`, `key.pem`, `root-cert.pem`), polled
//!   and reloaded with a debounce.
//! * [`source`]: which source pilot-agent would use, decided from the same signals.
//! * `testing` (feature `testkit`): a real SDS server on a Unix socket for tests.
//!
//! [`pem`] turns PEM text (any of the private-key encodings Istio and SPIRE write) into a
//! [`mesh_core::WorkloadCertificate`].

pub mod file;
pub mod output;
pub mod pem;
pub mod sds;
pub mod source;
#[cfg(feature = "testkit")]
pub mod testing;

pub use file::FileCertificateWatcher;
pub use output::{run_output_certs, write_output_certs};
pub use pem::workload_certificate_from_pem;
pub use sds::SdsClient;
pub use source::{CertificateSource, SourceSignals, select_certificate_source};

/// SDS resource name of the workload key and certificate chain.
pub const SDS_DEFAULT_RESOURCE: &str = "default";
/// SDS resource name of the trust bundle.
pub const SDS_ROOT_RESOURCE: &str = "ROOTCA";
/// The workload SDS socket path, relative to `/` (`WorkloadIdentitySocketPath`).
pub const WORKLOAD_SDS_SOCKET: &str = "var/run/secrets/workload-spiffe-uds/socket";
/// Directory of workload credentials a CSI driver may mount (`WorkloadIdentityCredentialsPath`).
pub const WORKLOAD_CREDENTIALS_DIR: &str = "var/run/secrets/workload-spiffe-credentials";
/// Directory of `FILE_MOUNTED_CERTS` certificates (`./etc/certs`).
pub const FILE_MOUNTED_CERTS_DIR: &str = "etc/certs";
/// Certificate chain file name (leaf first).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Private key file name.
pub const KEY_FILE: &str = "key.pem";
/// Trust bundle file name.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Counter of certificate loads from SDS or files, labelled `source` = `sds` | `file` and
/// `result` = `success` | `failure`.
pub const SECRET_UPDATES_METRIC: &str = "mesh_secret_updates_total";

/// Why a certificate from SDS or files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate material is unusable (named part and reason).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which part (`certificate chain`, `private key`, `trust bundle`, `secret default`).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The SDS server could not be reached or the stream failed.
    #[error("SDS server at {socket}: {reason}")]
    Sds {
        /// The socket path.
        socket: String,
        /// Why.
        reason: String,
    },
}
