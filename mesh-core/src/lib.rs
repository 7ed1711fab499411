//! # mesh-core
//!
//! The data model every other mesh crate meets at, and every decision that needs no I/O.
//!
//! * [`snapshot`]: the immutable [`Snapshot`](snapshot::Snapshot) of listeners, route
//!   configurations, clusters and endpoints that istiod's xDS translates into, and the
//!   [`SnapshotCell`](snapshot::SnapshotCell) it is published through (lock-free reads).
//! * [`route`], [`cluster`], [`listener`], [`endpoint`]: the compiled form of RDS, CDS, LDS and
//!   EDS resources, with the route matcher and the load balancer.
//! * [`identity`]: SPIFFE IDs and the workload's [`NodeIdentity`](identity::NodeIdentity).
//! * [`config`]: reading the environment Istio's injector sets, through an injectable
//!   [`Strings`](config::Strings) source.
//! * [`cert`]: the [`CertStore`](cert::CertStore) that holds the workload certificate.
//! * [`flags`]: Envoy's response flags. [`telemetry`]: Istio's standard metric names and labels.
//! * [`name_table`]: the NDS name table. [`resolve`]: the resolver trait mesh-dns implements.
//! * [`lb`]: load balancers (round robin, least request, random, ring hash, Maglev) with priorities.
//! * [`retry`]: Envoy's router retry policy and retry decisions.
//! * [`peer_metadata`]: the `x-envoy-peer-metadata` headers sidecars exchange;
//!   [`metadata_exchange`]: the same metadata framed for TCP (ALPN `istio-peer-exchange`).
//!
//! Protobuf types never appear here: mesh-xds translates them into these types.

pub mod authz;
pub mod cert;
pub mod cluster;
pub mod config;
pub mod endpoint;
pub mod fault;
pub mod flags;
pub mod headers;
pub mod identity;
pub mod lb;
pub mod listener;
pub mod metadata_exchange;
pub mod name_table;
pub mod outlier;
pub mod peer_metadata;
pub mod readiness;
pub mod resolve;
pub mod retry;
pub mod route;
pub mod snapshot;
pub mod telemetry;
pub mod time;

pub use cert::{CertStore, WorkloadCertificate};
pub use identity::{NodeIdentity, SpiffeId};
pub use snapshot::{Snapshot, SnapshotCell};
