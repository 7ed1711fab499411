//! The expanded lookup table pilot-agent's DNS proxy builds from istiod's NDS name table.
//!
//! istiod sends one entry per service FQDN; the agent expands each Kubernetes entry into the
//! names a pod's resolver would ask for (istio:pkg/dns/client/dns.go `BuildAlternateHosts`,
//! `generateAltHosts`):
//!
//! * every registry: the FQDN itself;
//! * Kubernetes entries whose FQDN ends with the proxy's domain (`svc.<cluster domain>`):
//!   `<short>.<ns>`, `<short>` (only when `<ns>` is this workload's namespace),
//!   `<short>.<ns>.svc`, and every `alt_hosts` entry.
//!
//! Lookups are case-insensitive and ignore a trailing dot; a name not in the table is matched
//! against wildcard entries `*.<suffix>`, most specific suffix first
//! (`LookupTable.lookupHost`). Names are compiled once per name table, so a lookup is a hash
//! probe per label and allocates nothing (unless the host has upper-case letters).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::name_table::{NameInfo, NameTable};

/// The registry name istiod gives Kubernetes services in the NDS table.
pub const KUBERNETES_REGISTRY: &str = "Kubernetes";

/// The NDS name table, expanded with the agent's alternate names and ready for lookups.
#[derive(Debug, Default, Clone)]
pub struct NdsLookupTable {
    /// Lower-cased name (no trailing dot) → addresses.
    exact: HashMap<Box<str>, Arc<[IpAddr]>>,
    /// Wildcard entries `*.<suffix>`, keyed by `<suffix>` (lower-cased, no trailing dot).
    wildcard: HashMap<Box<str>, Arc<[IpAddr]>>,
}

impl NdsLookupTable {
    /// Expands `table` for a workload in `namespace` of a cluster whose DNS domain is
    /// `cluster_domain` (e.g. `cluster.local`; empty disables the Kubernetes short names).
    pub fn build(table: &NameTable, namespace: &str, cluster_domain: &str) -> Self {
        let cluster_domain = cluster_domain.trim_matches('.').to_ascii_lowercase();
        // The agent's proxyDomain: "<ns>.svc.<domain>" minus the namespace.
        let proxy_domain = if cluster_domain.is_empty() {
            String::new()
        } else {
            format!("svc.{cluster_domain}")
        };
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        // Sorted so that merged address lists come out the same on every build.
        let mut hosts: Vec<(&String, &NameInfo)> = table.table.iter().collect();
        hosts.sort_by(|a, b| a.0.cmp(b.0));
        for (host, info) in hosts {
            if info.ips.is_empty() {
                continue;
            }
            for name in alternate_hosts(host, info, namespace, &proxy_domain) {
                let ips = names.entry(name).or_default();
                for ip in &info.ips {
                    if !ips.contains(ip) {
                        ips.push(*ip);
                    }
                }
            }
        }
        let mut out = NdsLookupTable::default();
        for (name, ips) in names {
            let ips: Arc<[IpAddr]> = ips.into();
            match name.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() => {
                    out.wildcard.insert(suffix.into(), ips);
                }
                _ => {
                    out.exact.insert(name.into_boxed_str(), ips);
                }
            }
        }
        out
    }

    /// The addresses the agent's DNS proxy would answer for `host`, or `None` when the name
    /// is not in the table (the query would go upstream).
    pub fn lookup(&self, host: &str) -> Option<&Arc<[IpAddr]>> {
        let host = normalize(host);
        let host: &str = &host;
        if host.is_empty() {
            return None;
        }
        if let Some(ips) = self.exact.get(host) {
            return Some(ips);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // `a.b.example.com` tries `*.b.example.com`, then `*.example.com`, then `*.com`.
        host.match_indices('.')
            .map(|(i, _)| &host[i + 1..])
            .filter(|suffix| !suffix.is_empty())
            .find_map(|suffix| self.wildcard.get(suffix))
    }

    /// Number of names (exact and wildcard) in the table.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Whether the table has no names.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every name with its addresses, wildcards written `*.<suffix>`, sorted by name (what
    /// pilot-agent's `/debug/ndsz` shows, generated alternate names included).
    pub fn entries(&self) -> Vec<(String, Arc<[IpAddr]>)> {
        let mut out: Vec<(String, Arc<[IpAddr]>)> = self
            .exact
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(
                self.wildcard
                    .iter()
                    .map(|(k, v)| (format!("*.{k}"), v.clone())),
            )
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Lower-cases (only when needed) and strips one trailing dot.
fn normalize(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// The names one table entry answers to (without trailing dots, lower-cased).
fn alternate_hosts(
    host: &str,
    info: &NameInfo,
    namespace: &str,
    proxy_domain: &str,
) -> Vec<String> {
    let fqdn = normalize(host).into_owned();
    if info.registry != KUBERNETES_REGISTRY
        || proxy_domain.is_empty()
        || !in_domain(&fqdn, proxy_domain)
    {
        return vec![fqdn];
    }
    let short = info.shortname.to_ascii_lowercase();
    let ns = info.namespace.to_ascii_lowercase();
    let mut out = vec![fqdn];
    if short.is_empty() || ns.is_empty() {
        return out;
    }
    out.push(format!("{short}.{ns}"));
    if ns.eq_ignore_ascii_case(namespace) {
        out.push(short.clone());
    }
    // Only the first label of the proxy domain (`svc`), as the agent does.
    let first_label = proxy_domain.split('.').next().unwrap_or("svc");
    out.push(format!("{short}.{ns}.{first_label}"));
    out.extend(
        info.alt_hosts
            .iter()
            .map(|h| normalize(h).into_owned())
            .filter(|h| !h.is_empty()),
    );
    out
}

fn in_domain(fqdn: &str, domain: &str) -> bool {
    fqdn.len() > domain.len()
        && fqdn.ends_with(domain)
        && fqdn.as_bytes()[fqdn.len() - domain.len() - 1] == b'.'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn kube(short: &str, ns: &str, ip: &[&str]) -> NameInfo {
        NameInfo {
            ips: ips(ip),
            registry: KUBERNETES_REGISTRY.into(),
            shortname: short.into(),
            namespace: ns.into(),
            alt_hosts: vec![],
        }
    }

    fn external(ip: &[&str]) -> NameInfo {
        NameInfo {
            ips: ips(ip),
            registry: "External".into(),
            ..NameInfo::default()
        }
    }

    fn table(entries: Vec<(&str, NameInfo)>) -> NameTable {
        NameTable {
            table: entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    fn get(t: &NdsLookupTable, host: &str) -> Option<Vec<IpAddr>> {
        t.lookup(host).map(|ips| ips.to_vec())
    }

    #[test]
    fn kubernetes_short_names_follow_the_namespace_rules() {
        let t = NdsLookupTable::build(
            &table(vec![
                (
                    "reviews.default.svc.cluster.local",
                    kube("reviews", "default", &["10.0.0.1"]),
                ),
                (
                    "ratings.other.svc.cluster.local",
                    kube("ratings", "other", &["10.0.0.2"]),
                ),
            ]),
            "default",
            "cluster.local",
        );
        let r = Some(ips(&["10.0.0.1"]));
        assert_eq!(get(&t, "reviews.default.svc.cluster.local"), r);
        assert_eq!(get(&t, "reviews.default.svc"), r);
        assert_eq!(get(&t, "reviews.default"), r);
        assert_eq!(get(&t, "reviews"), r);
        // Another namespace: no bare short name.
        let o = Some(ips(&["10.0.0.2"]));
        assert_eq!(get(&t, "ratings.other.svc.cluster.local"), o);
        assert_eq!(get(&t, "ratings.other.svc"), o);
        assert_eq!(get(&t, "ratings.other"), o);
        assert_eq!(get(&t, "ratings"), None);
        // Only the `.svc` variant is generated, not `.svc.cluster`.
        assert_eq!(get(&t, "reviews.default.svc.cluster"), None);
        // From the other namespace's point of view.
        let t2 = NdsLookupTable::build(
            &table(vec![(
                "ratings.other.svc.cluster.local",
                kube("ratings", "other", &["10.0.0.2"]),
            )]),
            "other",
            "cluster.local",
        );
        assert_eq!(get(&t2, "ratings"), o);
    }

    #[test]
    fn lookups_ignore_case_and_a_trailing_dot() {
        let t = NdsLookupTable::build(
            &table(vec![(
                "Reviews.Default.svc.cluster.local",
                kube("Reviews", "default", &["10.0.0.1"]),
            )]),
            "default",
            "cluster.local",
        );
        let r = Some(ips(&["10.0.0.1"]));
        assert_eq!(get(&t, "reviews.default.svc.cluster.local."), r);
        assert_eq!(get(&t, "REVIEWS.default.SVC.cluster.local"), r);
        assert_eq!(get(&t, "Reviews."), r);
        assert_eq!(get(&t, ""), None);
        assert_eq!(get(&t, "."), None);
    }

    #[test]
    fn non_kubernetes_and_foreign_domain_entries_get_no_alternate_names() {
        let mut se = external(&["192.0.2.10"]);
        se.shortname = "api".into();
        se.namespace = "default".into();
        se.alt_hosts = vec!["api.alias".into()];
        let t = NdsLookupTable::build(
            &table(vec![
                ("api.example.com", se),
                // A Kubernetes entry from a cluster with another domain.
                (
                    "db.default.svc.remote.local",
                    kube("db", "default", &["10.1.0.1"]),
                ),
            ]),
            "default",
            "cluster.local",
        );
        assert_eq!(get(&t, "api.example.com"), Some(ips(&["192.0.2.10"])));
        assert_eq!(get(&t, "api"), None);
        assert_eq!(get(&t, "api.alias"), None);
        assert_eq!(
            get(&t, "db.default.svc.remote.local"),
            Some(ips(&["10.1.0.1"]))
        );
        assert_eq!(get(&t, "db.default"), None);
        assert_eq!(get(&t, "db"), None);
    }

    #[test]
    fn alt_hosts_are_honoured_for_kubernetes_entries() {
        let mut info = kube("web", "default", &["10.0.0.3"]);
        info.alt_hosts = vec!["web.legacy.".into(), "WWW.Internal".into()];
        let t = NdsLookupTable::build(
            &table(vec![("web.default.svc.cluster.local", info)]),
            "default",
            "cluster.local",
        );
        assert_eq!(get(&t, "web.legacy"), Some(ips(&["10.0.0.3"])));
        assert_eq!(get(&t, "www.internal"), Some(ips(&["10.0.0.3"])));
    }

    #[test]
    fn wildcard_entries_match_the_most_specific_suffix_but_not_the_apex() {
        let t = NdsLookupTable::build(
            &table(vec![
                ("*.example.com", external(&["192.0.2.1"])),
                ("*.eu.example.com", external(&["192.0.2.2"])),
                ("exact.eu.example.com", external(&["192.0.2.3"])),
            ]),
            "default",
            "cluster.local",
        );
        assert_eq!(get(&t, "www.example.com"), Some(ips(&["192.0.2.1"])));
        assert_eq!(get(&t, "a.b.example.com"), Some(ips(&["192.0.2.1"])));
        assert_eq!(get(&t, "a.eu.example.com"), Some(ips(&["192.0.2.2"])));
        assert_eq!(get(&t, "x.y.EU.example.com."), Some(ips(&["192.0.2.2"])));
        assert_eq!(get(&t, "exact.eu.example.com"), Some(ips(&["192.0.2.3"])));
        assert_eq!(get(&t, "example.com"), None);
        assert_eq!(get(&t, "example.org"), None);
        assert_eq!(get(&t, "www.example.com.evil.org"), None);
        let names: Vec<String> = t.entries().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["*.eu.example.com", "*.example.com", "exact.eu.example.com"]
        );
    }

    #[test]
    fn ipv6_and_dual_stack_entries() {
        let t = NdsLookupTable::build(
            &table(vec![
                (
                    "v6.default.svc.cluster.local",
                    kube("v6", "default", &["fd00::1", "fd00::2"]),
                ),
                (
                    "dual.default.svc.cluster.local",
                    kube("dual", "default", &["10.0.0.9", "fd00::9"]),
                ),
            ]),
            "default",
            "cluster.local",
        );
        assert_eq!(get(&t, "v6"), Some(ips(&["fd00::1", "fd00::2"])));
        assert_eq!(get(&t, "dual.default"), Some(ips(&["10.0.0.9", "fd00::9"])));
    }

    #[test]
    fn names_claimed_twice_merge_addresses_and_empty_entries_are_skipped() {
        let t = NdsLookupTable::build(
            &table(vec![
                // A bare name `web` from the Kubernetes short-name expansion ...
                (
                    "web.default.svc.cluster.local",
                    kube("web", "default", &["10.0.0.1"]),
                ),
                // ... and a ServiceEntry host literally called `web`.
                ("web", external(&["192.0.2.7", "10.0.0.1"])),
                ("noaddr.example.com", external(&[])),
            ]),
            "default",
            "cluster.local",
        );
        let mut got = get(&t, "web").unwrap();
        got.sort();
        assert_eq!(got, ips(&["10.0.0.1", "192.0.2.7"]));
        assert_eq!(get(&t, "noaddr.example.com"), None);
    }

    #[test]
    fn empty_cluster_domain_disables_short_names() {
        let t = NdsLookupTable::build(
            &table(vec![(
                "reviews.default.svc.cluster.local",
                kube("reviews", "default", &["10.0.0.1"]),
            )]),
            "default",
            "",
        );
        assert!(get(&t, "reviews.default.svc.cluster.local").is_some());
        assert_eq!(get(&t, "reviews"), None);
        assert_eq!(t.len(), 1);
    }
}
