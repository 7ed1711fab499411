//! [`MeshResolver`]: IP literals, then the NDS table, then upstream DNS.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{RData, RecordType};
use mesh_core::SnapshotCell;
use mesh_core::name_table::NameTable;
use mesh_core::resolve::{
    LookupFamily, LookupFuture, Resolve, ResolveError, ResolveFuture, Resolved,
};
use tokio::task::JoinHandle;

use crate::table::NdsLookupTable;

/// Errors setting up the resolver.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The system resolver configuration could not be read.
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(#[source] hickory_resolver::net::NetError),
    /// The upstream resolver could not be built.
    #[error("cannot build the upstream DNS resolver: {0}")]
    Upstream(#[source] hickory_resolver::net::NetError),
}

/// Resolves host names the way a pod with Istio's DNS proxy sees them: IP literals as they
/// are, names in istiod's NDS table (with the agent's short-name expansion) from the table,
/// everything else through upstream DNS.
///
/// The table is read from the [`SnapshotCell`]'s current snapshot and expanded once per
/// published name table (see [`NdsLookupTable`]); a lookup is an atomic load, a pointer
/// comparison and hash probes. Cloning is cheap and shares the compiled table.
#[derive(Clone)]
pub struct MeshResolver {
    inner: Arc<Inner>,
}

struct Inner {
    cell: SnapshotCell,
    namespace: String,
    cluster_domain: String,
    upstream: Option<TokioResolver>,
    compiled: ArcSwapOption<Compiled>,
}

/// One expansion of one name table.
struct Compiled {
    /// Version of the snapshot the table was compiled for (informational).
    version: u64,
    /// The name table it was compiled from; kept alive so pointer identity is a safe key.
    source: Arc<NameTable>,
    table: Arc<NdsLookupTable>,
}

impl fmt::Debug for MeshResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let compiled = self.inner.compiled.load();
        f.debug_struct("MeshResolver")
            .field("namespace", &self.inner.namespace)
            .field("cluster_domain", &self.inner.cluster_domain)
            .field("upstream", &self.inner.upstream.is_some())
            .field("compiled_version", &compiled.as_ref().map(|c| c.version))
            .finish()
    }
}

impl MeshResolver {
    /// A resolver for a workload in `namespace` of a cluster with DNS domain `cluster_domain`
    /// (`cluster.local` by default in Kubernetes), reading the NDS table from `cell`. It has no
    /// upstream DNS until [`with_upstream`](Self::with_upstream) or
    /// [`with_system_upstream`](Self::with_system_upstream).
    pub fn new(
        cell: SnapshotCell,
        namespace: impl Into<String>,
        cluster_domain: impl Into<String>,
    ) -> Self {
        MeshResolver {
            inner: Arc::new(Inner {
                cell,
                namespace: namespace.into(),
                cluster_domain: cluster_domain.into(),
                upstream: None,
                compiled: ArcSwapOption::empty(),
            }),
        }
    }

    /// [`new`](Self::new) with upstream DNS from the system configuration (`/etc/resolv.conf`:
    /// nameservers, search list, ndots), as pilot-agent forwards.
    pub fn from_system_conf(
        cell: SnapshotCell,
        namespace: impl Into<String>,
        cluster_domain: impl Into<String>,
    ) -> Result<Self, DnsError> {
        MeshResolver::new(cell, namespace, cluster_domain).with_system_upstream()
    }

    /// Uses `upstream` for names not in the NDS table.
    pub fn with_upstream(self, upstream: TokioResolver) -> Self {
        self.map_inner(|inner| inner.upstream = Some(upstream))
    }

    /// Uses the system's resolver configuration (`/etc/resolv.conf`) for names not in the
    /// NDS table.
    pub fn with_system_upstream(self) -> Result<Self, DnsError> {
        let upstream = TokioResolver::builder_tokio()
            .map_err(DnsError::SystemConfig)?
            .build()
            .map_err(DnsError::Upstream)?;
        Ok(self.with_upstream(upstream))
    }

    /// Uses the DNS servers `servers` (UDP and TCP, hickory's default options) for names not
    /// in the NDS table.
    pub fn with_upstream_servers(self, servers: &[std::net::SocketAddr]) -> Result<Self, DnsError> {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig};
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                for c in &mut ns.connections {
                    c.port = s.port();
                }
                ns
            })
            .collect();
        let upstream = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        )
        .build()
        .map_err(DnsError::Upstream)?;
        Ok(self.with_upstream(upstream))
    }

    fn map_inner(self, f: impl FnOnce(&mut Inner)) -> Self {
        let old = &self.inner;
        let mut inner = Inner {
            cell: old.cell.clone(),
            namespace: old.namespace.clone(),
            cluster_domain: old.cluster_domain.clone(),
            upstream: old.upstream.clone(),
            compiled: ArcSwapOption::new(old.compiled.load_full()),
        };
        f(&mut inner);
        MeshResolver {
            inner: Arc::new(inner),
        }
    }

    /// The namespace short names are expanded for.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The expanded NDS table of the current snapshot (compiled now if it changed).
    pub fn table(&self) -> Arc<NdsLookupTable> {
        let snapshot = self.inner.cell.load_guard();
        let current = self.inner.compiled.load();
        if let Some(c) = current.as_ref() {
            if Arc::ptr_eq(&c.source, &snapshot.name_table) {
                return c.table.clone();
            }
            // A new snapshot that carries an equal name table: keep the expansion.
            if *c.source == *snapshot.name_table {
                let table = c.table.clone();
                self.inner.compiled.store(Some(Arc::new(Compiled {
                    version: snapshot.version,
                    source: snapshot.name_table.clone(),
                    table: table.clone(),
                })));
                return table;
            }
        }
        let table = Arc::new(NdsLookupTable::build(
            &snapshot.name_table,
            &self.inner.namespace,
            &self.inner.cluster_domain,
        ));
        tracing::debug!(
            version = snapshot.version,
            names = table.len(),
            "compiled the NDS lookup table"
        );
        self.inner.compiled.store(Some(Arc::new(Compiled {
            version: snapshot.version,
            source: snapshot.name_table.clone(),
            table: table.clone(),
        })));
        table
    }

    /// The snapshot version the cached table was compiled for, if any.
    pub fn compiled_version(&self) -> Option<u64> {
        self.inner.compiled.load().as_ref().map(|c| c.version)
    }

    /// The addresses the NDS table has for `host` (no upstream DNS).
    pub fn lookup_table(&self, host: &str) -> Option<Vec<IpAddr>> {
        self.table().lookup(host).map(|ips| ips.to_vec())
    }

    /// Compiles the table for every snapshot published to the cell, so that no lookup pays
    /// for the expansion. The task ends when the cell is dropped; abort the handle to stop it
    /// earlier. Must be called inside a Tokio runtime.
    pub fn spawn_refresh(&self) -> JoinHandle<()> {
        let resolver = self.clone();
        let mut changes = self.inner.cell.subscribe();
        tokio::spawn(async move {
            resolver.table();
            while changes.changed().await.is_ok() {
                resolver.table();
            }
        })
    }

    async fn upstream_lookup(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let Some(upstream) = &self.inner.upstream else {
            return Err(ResolveError {
                host: host.to_owned(),
                reason: "not in the mesh name table and no upstream DNS is configured".into(),
            });
        };
        match upstream.lookup_ip(host).await {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    Err(ResolveError {
                        host: host.to_owned(),
                        reason: "not in the mesh name table; upstream DNS returned no addresses"
                            .into(),
                    })
                } else {
                    Ok(ips)
                }
            }
            Err(e) => Err(ResolveError {
                host: host.to_owned(),
                reason: format!("not in the mesh name table; upstream DNS: {e}"),
            }),
        }
    }
}

impl MeshResolver {
    /// One upstream query for `host`'s `A` or `AAAA` records: `Ok` with the addresses and the
    /// answer's TTL, empty for NXDOMAIN / NODATA; `Err` for a failed resolution.
    async fn upstream_query(
        &self,
        upstream: &TokioResolver,
        host: &str,
        record_type: RecordType,
    ) -> Result<Resolved, ResolveError> {
        match upstream.lookup(host, record_type).await {
            Ok(lookup) => {
                let addrs = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) if record_type == RecordType::A => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) if record_type == RecordType::AAAA => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                // The records' smallest TTL, as the answer carried it.
                let ttl = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == record_type)
                    .map(|r| r.ttl)
                    .min()
                    .map(|s| std::time::Duration::from_secs(s.into()));
                Ok(Resolved { addrs, ttl })
            }
            Err(e) if e.is_no_records_found() => Ok(Resolved::default()),
            Err(e) => Err(ResolveError {
                host: host.to_owned(),
                reason: format!("not in the mesh name table; upstream DNS ({record_type}): {e}"),
            }),
        }
    }

    /// [`Resolve::lookup`] through upstream DNS: the queries `family` asks for, the second
    /// only when the preferred family has no address (`AUTO`, `V4_PREFERRED`).
    async fn upstream_family(
        &self,
        host: &str,
        family: LookupFamily,
    ) -> Result<Resolved, ResolveError> {
        let Some(upstream) = &self.inner.upstream else {
            return Err(ResolveError {
                host: host.to_owned(),
                reason: "not in the mesh name table and no upstream DNS is configured".into(),
            });
        };
        let (first, second) = match family {
            LookupFamily::V4Only => (RecordType::A, None),
            LookupFamily::V6Only => (RecordType::AAAA, None),
            LookupFamily::Auto => (RecordType::AAAA, Some(RecordType::A)),
            LookupFamily::V4Preferred | LookupFamily::All => {
                (RecordType::A, Some(RecordType::AAAA))
            }
        };
        let mut answer = self.upstream_query(upstream, host, first).await?;
        if let Some(second) = second
            && (family == LookupFamily::All || answer.addrs.is_empty())
        {
            let more = self.upstream_query(upstream, host, second).await?;
            answer.addrs.extend(more.addrs);
            answer.ttl = match (answer.ttl, more.ttl) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(answer)
    }
}

/// `10.0.0.1`, `fd00::1` or `[fd00::1]`.
fn ip_literal(host: &str) -> Option<IpAddr> {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    h.parse().ok()
}

impl Resolve for MeshResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Some(ip) = ip_literal(host) {
                return Ok(vec![ip]);
            }
            if let Some(ips) = self.lookup_table(host) {
                return Ok(ips);
            }
            self.upstream_lookup(host).await
        })
    }

    /// IP literals as they are, the NDS table's addresses of `family` (no TTL), then upstream
    /// DNS with `A` / `AAAA` queries as `family` says.
    fn lookup<'a>(&'a self, host: &'a str, family: LookupFamily) -> LookupFuture<'a> {
        Box::pin(async move {
            if let Some(ip) = ip_literal(host) {
                return Ok(Resolved {
                    addrs: vec![ip],
                    ttl: None,
                });
            }
            if let Some(ips) = self.table().lookup(host) {
                return Ok(Resolved {
                    addrs: family.select(ips),
                    ttl: None,
                });
            }
            self.upstream_family(host, family).await
        })
    }
}
