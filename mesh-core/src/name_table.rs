//! The NDS name table istiod pushes (`istio.networking.nds.v1.NameTable`), in mesh's model.

use std::collections::HashMap;
use std::net::IpAddr;

/// One host's entry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NameInfo {
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// `Kubernetes` or `External`.
    pub registry: String,
    /// Kubernetes service name.
    pub shortname: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Extra names (deprecated in the proto but still honoured).
    pub alt_hosts: Vec<String>,
}

/// Host → addresses, keyed by FQDN without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NameTable {
    /// Entries.
    pub table: HashMap<String, NameInfo>,
}
