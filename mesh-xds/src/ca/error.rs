//! Errors of the CA client and the secret manager.

use std::path::PathBuf;

/// Why a workload certificate could not be obtained from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA address is not a usable `host:port`.
    #[error("invalid CA address {address:?}: {reason}")]
    InvalidAddress {
        /// The configured address.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS is on but no root certificate file was configured.
    #[error(
        "TLS to the CA at {address} needs a root certificate file (CA_ROOT_CA, default ./var/run/secrets/istio/root-cert.pem)"
    )]
    MissingRootCert {
        /// The CA address.
        address: String,
    },
    /// The `PROV_CERT` client certificate or key is missing or unusable.
    #[error("cannot use the provisioned certificate in {dir} (PROV_CERT): {reason}")]
    ProvisionedCert {
        /// The `PROV_CERT` directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The root certificate file could not be read or holds no certificate.
    #[error("cannot use root certificate file {path}: {reason}")]
    RootCert {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A configured CA header (`CA_HEADER_*`) is not valid gRPC metadata.
    #[error("invalid CA header {name:?}: {reason}")]
    InvalidHeader {
        /// Header name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The token file could not be read.
    #[error("cannot read the CA token file {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// istiod rejected the caller's credentials.
    #[error(
        "the CA at {address} rejected this workload's credentials ({message}); check that {token_hint}"
    )]
    Unauthenticated {
        /// The CA address.
        address: String,
        /// istiod's message, e.g. "request authenticate failure".
        message: String,
        /// What to check.
        token_hint: String,
    },
    /// The CA could not be reached.
    #[error("the CA at {address} is unavailable: {message}")]
    Unavailable {
        /// The CA address.
        address: String,
        /// Details from the transport or server.
        message: String,
    },
    /// Any other gRPC failure.
    #[error("CreateCertificate at {address} failed with {code:?}: {message}")]
    Rpc {
        /// The CA address.
        address: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The response chain does not have a leaf and a root.
    #[error("the CA returned {0} certificate(s); expected at least 2 (leaf first, root last)")]
    ShortChain(usize),
    /// A certificate in the response (or the key) could not be used.
    #[error("the CA returned an unusable certificate: {0}")]
    InvalidCertificate(String),
    /// The leaf's URI SAN is not the identity that was requested.
    #[error(
        "the CA issued a certificate for {issued} but this workload is {requested}; check the service account of the token"
    )]
    IdentityMismatch {
        /// The workload's identity.
        requested: String,
        /// The URI SAN(s) in the leaf.
        issued: String,
    },
    /// The CSR could not be generated.
    #[error("cannot generate the certificate signing request: {0}")]
    Csr(String),
}
