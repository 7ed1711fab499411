//! The Istio CA client and secret manager (FACTS.md b.1–b.7).
//!
//! * [`csr`]: a fresh ECDSA P-256 key and a PEM CSR for the workload's SPIFFE ID, shaped like
//!   ztunnel's (single critical URI SAN, empty subject).
//! * [`client`]: [`CaClient`], the unary `CreateCertificate` call to istiod's CA on :15012,
//!   authenticated with the projected service-account token.
//! * [`secret_manager`]: [`SecretManager`], which keeps a valid [`mesh_core::WorkloadCertificate`]
//!   in a [`mesh_core::CertStore`], rotating at half its lifetime like pilot-agent.
//! * `service` (feature `testkit`): server plumbing that mounts an Istio CA implementation on a
//!   `tonic::transport::Server`.

pub mod client;
pub mod csr;
mod error;
pub mod secret_manager;
#[cfg(feature = "testkit")]
pub mod service;

pub use client::{
    CaClient, NUM_FAILED_OUTGOING_REQUESTS_METRIC, NUM_OUTGOING_REQUESTS_METRIC,
    OUTGOING_LATENCY_METRIC,
};
pub use csr::{GeneratedCsr, generate_csr};
pub use error::CaError;
pub use secret_manager::{SecretManager, parse_certificate_chain};

/// Counter of certificate fetches by the secret manager, labelled `result` = `success` |
/// `failure`.
pub const CERTIFICATE_RENEWALS_METRIC: &str = "mesh_certificate_renewals_total";
/// Gauge: the current workload certificate's `notAfter` as a Unix timestamp in seconds.
pub const CERTIFICATE_EXPIRY_METRIC: &str = "mesh_certificate_expiry_seconds";
