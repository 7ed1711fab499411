//! # mesh-dns
//!
//! mesh's resolver, answering as pilot-agent's DNS proxy does for a pod with Istio DNS
//! capture: IP literals as they are, then istiod's NDS name table (expanded with Kubernetes
//! short names, see [`table`]), then upstream DNS through hickory.
//!
//! [`MeshResolver`] implements [`mesh_core::resolve::Resolve`] and reads the name table from
//! the snapshot the xDS client publishes into the [`SnapshotCell`](mesh_core::SnapshotCell):
//!
//! With the `testkit` feature, [`testkit::DnsServer`] is a real DNS server on 127.0.0.1 whose
//! answers a test changes.
//!
//! ```no_run
//! use mesh_core::SnapshotCell;
//! use mesh_core::resolve::Resolve;
//! use mesh_dns::MeshResolver;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cell = SnapshotCell::new();
//! let resolver = MeshResolver::from_system_conf(cell, "default", "cluster.local")?;
//! let addrs = resolver.resolve("reviews").await?;
//! # let _ = addrs; Ok(()) }
//! ```

pub mod resolver;
pub mod table;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use resolver::{DnsError, MeshResolver};
pub use table::NdsLookupTable;
