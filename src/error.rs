//! Errors of the mesh runtime.

/// Why mesh could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The environment or builder configuration is incomplete or invalid.
    #[error(transparent)]
    Config(#[from] mesh_core::config::ConfigError),
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving the application failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The workload certificate could not be obtained.
    #[error("workload certificate: {0}")]
    Certificate(String),
}
