//! # mesh-tower
//!
//! mesh's request path as Tower services and hyper plumbing:
//!
//! * [`outbound`]: route → cluster → endpoint → pooled connection, with Istio auto-mTLS.
//! * [`inbound`]: TLS detection on the first bytes, mTLS termination per PeerAuthentication
//!   mode, the peer's SPIFFE identity in request extensions, HTTP/1.1 and h2.
//! * [`tls`]: rustls configurations that read the workload certificate from
//!   [`mesh_core::CertStore`] on every handshake, and the SPIFFE peer verifiers.
//! * [`status`]: the pod-facing listeners 15020, 15021 and 15090.
//! * [`telemetry`]: Istio's standard metrics recorded through the `metrics` facade.
//! * [`grpc_frames`]: gRPC message counting for Istio's `istio_*_messages_total`.
//! * [`peer_exchange`]: Istio's TCP metadata exchange (ALPN `istio-peer-exchange`) on a
//!   connection.

pub mod grpc_frames;
mod grpc_reply;
pub mod inbound;
pub mod outbound;
pub mod peer_exchange;
pub mod status;
pub mod telemetry;
pub mod tls;
