//! The hosts of `STRICT_DNS` / `LOGICAL_DNS` clusters, as Envoy keeps them: resolved in the
//! background (every `dns_refresh_rate`, or when the answer's TTL runs out with
//! `respect_dns_ttl`), published whole into an [`ArcSwapOption`] that the request path reads
//! without locking. A request never waits on DNS except, bounded, for a cluster's very first
//! answers.
//!
//! - `STRICT_DNS`: every address of every target is a host with the target's endpoint settings
//!   (weight, locality, priority, metadata); a target's repeated addresses count once; an empty
//!   answer (NXDOMAIN, NODATA) leaves the target without hosts; a failed resolution keeps the
//!   target's last hosts.
//! - `LOGICAL_DNS`: one host, at the first address of the latest non-empty answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use mesh_core::cluster::{Cluster, DnsDiscovery, DnsMode};
use mesh_core::endpoint::{Endpoint, EndpointSet};
use mesh_core::resolve::{Resolve, ResolveError, ResolveFuture};
use tokio::sync::watch;

/// Bound on one resolution of one target (beyond it the resolution counts as failed).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A DNS cluster's resolved hosts. Dropping it stops its resolution task.
pub(super) struct DnsHosts {
    /// The hosts of the latest answers; `None` until every target was asked once.
    current: ArcSwapOption<EndpointSet>,
    /// `true` once `current` is set.
    ready: watch::Sender<bool>,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for DnsHosts {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl DnsHosts {
    /// Starts resolving `cluster`'s targets with `resolver` (a no-op outside a Tokio runtime:
    /// the cluster then has no hosts).
    pub(super) fn start(
        cluster: &Arc<Cluster>,
        dns: &Arc<DnsDiscovery>,
        resolver: Arc<dyn Resolve>,
    ) -> Arc<DnsHosts> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Arc::new(DnsHosts {
                current: ArcSwapOption::empty(),
                ready: watch::channel(false).0,
                task: None,
            });
        };
        Arc::new_cyclic(|weak: &Weak<DnsHosts>| {
            let task = rt.spawn(resolve_loop(
                weak.clone(),
                cluster.name.clone(),
                dns.clone(),
                resolver,
            ));
            DnsHosts {
                current: ArcSwapOption::empty(),
                ready: watch::channel(false).0,
                task: Some(task.abort_handle()),
            }
        })
    }

    /// The cluster's hosts now; before the first answers, waits for them up to `wait`. `None`
    /// when there are still none (Envoy: no healthy upstream).
    pub(super) async fn endpoints(&self, wait: Duration) -> Option<Arc<EndpointSet>> {
        if let Some(set) = self.current.load_full() {
            return Some(set);
        }
        let mut ready = self.ready.subscribe();
        let _ = tokio::time::timeout(wait, ready.wait_for(|r| *r)).await;
        self.current.load_full()
    }

    fn publish(&self, set: EndpointSet) {
        let unchanged = self
            .current
            .load()
            .as_ref()
            .is_some_and(|cur| cur.endpoints == set.endpoints);
        if !unchanged {
            tracing::debug!(
                cluster = %set.cluster_name,
                hosts = set.endpoints.len(),
                "DNS cluster hosts changed"
            );
            self.current.store(Some(Arc::new(set)));
        }
        self.ready.send_replace(true);
    }
}

/// What one target last resolved to: `None` before its first answer.
type Slot = Option<Vec<IpAddr>>;

/// Resolves every target on its own schedule; each answer republishes the cluster's hosts
/// (once every target was asked once). Ends when the [`DnsHosts`] is gone.
async fn resolve_loop(
    hosts: Weak<DnsHosts>,
    cluster: String,
    dns: Arc<DnsDiscovery>,
    resolver: Arc<dyn Resolve>,
) {
    let slots: Mutex<Vec<Slot>> = Mutex::new(vec![None; dns.targets.len()]);
    let asked: Mutex<Vec<bool>> = Mutex::new(vec![false; dns.targets.len()]);
    if dns.targets.is_empty() {
        if let Some(h) = hosts.upgrade() {
            h.publish(build(&cluster, &dns, &[]));
        }
        return;
    }
    let loops = dns.targets.iter().enumerate().map(|(i, target)| {
        let (hosts, cluster, dns, resolver) = (&hosts, &cluster, &dns, &resolver);
        let (slots, asked) = (&slots, &asked);
        async move {
            loop {
                let answer = tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    resolver.lookup(&target.host, dns.lookup_family),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ResolveError {
                        host: target.host.clone(),
                        reason: format!("no answer within {RESOLVE_TIMEOUT:?}"),
                    })
                });
                let next = match answer {
                    Ok(resolved) => {
                        let mut slots = lock(slots);
                        match dns.mode {
                            DnsMode::Strict => {
                                let mut addrs = resolved.addrs;
                                let mut seen = Vec::with_capacity(addrs.len());
                                addrs.retain(|a| {
                                    let new = !seen.contains(a);
                                    seen.push(*a);
                                    new
                                });
                                slots[i] = Some(addrs);
                            }
                            // An empty answer keeps the logical host where it was.
                            DnsMode::Logical => {
                                if let Some(first) = resolved.addrs.first() {
                                    slots[i] = Some(vec![*first]);
                                }
                            }
                        }
                        dns.next_refresh(resolved.ttl)
                    }
                    Err(e) => {
                        tracing::debug!(cluster = %cluster, host = %target.host, error = %e, "DNS resolution failed; keeping the last hosts");
                        dns.refresh_rate
                    }
                };
                let all_asked = {
                    let mut asked = lock(asked);
                    asked[i] = true;
                    asked.iter().all(|a| *a)
                };
                let Some(h) = hosts.upgrade() else { return };
                if all_asked {
                    let set = build(cluster, dns, &lock(slots));
                    h.publish(set);
                }
                drop(h);
                tokio::time::sleep(next).await;
            }
        }
    });
    futures_util::future::join_all(loops).await;
}

/// The cluster's hosts from its targets' latest answers.
fn build(cluster: &str, dns: &DnsDiscovery, slots: &[Slot]) -> EndpointSet {
    let endpoints: Vec<Endpoint> = dns
        .targets
        .iter()
        .zip(slots)
        .flat_map(|(t, slot)| {
            slot.iter().flatten().map(|ip| Endpoint {
                address: SocketAddr::new(*ip, t.port),
                ..t.endpoint.clone()
            })
        })
        .collect();
    EndpointSet::new(cluster, endpoints).with_overprovisioning_factor(dns.overprovisioning_factor)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The system resolver (`getaddrinfo`), for DNS clusters and passthrough destinations of an
/// [`Outbound`](super::Outbound) given no resolver.
#[derive(Debug)]
pub(super) struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            match tokio::net::lookup_host((host, 0)).await {
                Ok(addrs) => Ok(addrs.map(|a| a.ip()).collect()),
                Err(e) => Err(ResolveError {
                    host: host.to_owned(),
                    reason: e.to_string(),
                }),
            }
        })
    }
}
