//! The resolver seam: mesh-dns implements it (NDS table first, then upstream DNS); the
//! outbound side uses it for hosts outside the mesh.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

/// A name could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot resolve {host}: {reason}")]
pub struct ResolveError {
    /// Host asked for.
    pub host: String,
    /// Why.
    pub reason: String,
}

/// The future a resolver returns.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Resolves a host name to addresses.
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// Addresses for `host`.
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a>;
}
