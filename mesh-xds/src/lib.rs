//! # mesh-xds
//!
//! Everything mesh speaks with istiod:
//!
//! * [`ads`]: the ADS client (delta first, state-of-the-world behind the same interface) that
//!   subscribes CDS→EDS and LDS→RDS (+NDS), ACKs and NACKs, and reconnects with backoff.
//! * [`translate`]: Envoy resources → mesh-core's model, one translator per resource type; a
//!   failure names the resource and the reason and becomes the NACK's `error_detail`.
//! * [`ca`]: the Istio CA client and the secret manager that keeps the workload certificate
//!   fresh in a [`mesh_core::CertStore`].
//! * [`istio_proto`]: the two small Istio-only protos (NDS `NameTable`, the CA service).
//! * `testkit` (cargo feature `testkit`): a real gRPC control plane serving ADS and the CA.
//!
//! Protobuf types stay inside this crate.

pub mod ads;
pub mod auth;
pub mod ca;
pub mod check;
pub mod dump;
pub mod extensions;
pub mod fuzzing;
pub mod istio_proto;
pub mod node;
pub mod secrets;
pub mod translate;

#[cfg(feature = "testkit")]
pub mod testkit;
