//! # mesh — the Istio sidecar, in-process
//!
//! Add one dependency, wrap your app in [`serve`], and your pod gets from istiod what Envoy
//! and pilot-agent would have given it: xDS configuration, a SPIFFE workload certificate and
//! mTLS, outbound routing, Istio's metrics, and the pod ports 15020/15021/15090.
//!
//! ```no_run
//! # async fn app() -> Result<(), mesh::MeshError> {
//! use http::{Request, Response};
//! let app = tower::service_fn(|_req: Request<mesh::Body>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(bytes::Bytes::from("hello"))))
//! });
//! // Reads POD_NAME, POD_NAMESPACE, INSTANCE_IP, ... as the Istio injector sets them.
//! mesh::serve(app).await
//! # }
//! ```
//!
//! For outbound calls, [`Mesh::http_client`] returns a `tower::Service` that routes like the
//! sidecar's outbound listener (route → cluster → endpoint, auto-mTLS).

mod builder;
mod error;
#[cfg(feature = "otel")]
pub mod otel;
mod runtime;

pub use builder::{CertificateSource, MeshBuilder};
pub use error::MeshError;
pub use runtime::{Mesh, serve};

pub use mesh_core::identity::{NodeIdentity, PeerIdentity, SpiffeId};
pub use mesh_core::listener::InboundTlsMode;
pub use mesh_tower::outbound::{Outbound, OutboundTcpStream, TcpConnectError};

/// The request body the application receives: hyper's `Incoming`, read through mesh so the
/// inbound side counts a gRPC request's messages (`istio_request_messages_total`) as Envoy
/// does. It implements [`http_body::Body`] with `Data = Bytes` and `Error = hyper::Error`;
/// axum's `Router` and tonic's servers accept it as they accept `Incoming`.
pub type Body = mesh_tower::inbound::RequestBody;

/// Re-exports of the parts crates, for users who need the lower layers.
pub mod parts {
    pub use mesh_core as core;
    pub use mesh_dns as dns;
    pub use mesh_tower as tower;
    pub use mesh_xds as xds;
}
