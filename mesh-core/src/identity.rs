//! SPIFFE identities and the workload's node identity as istio-agent presents it to istiod.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

/// A SPIFFE ID in Istio's shape: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    // Shared strings: a SPIFFE ID is cloned into every request's extensions on the inbound
    // side, and a clone must not allocate.
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

/// Why a string is not an Istio SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The URI does not start with `spiffe://`.
    #[error("not a SPIFFE ID (missing spiffe:// scheme): {0:?}")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE ID {0:?} does not have Istio's /ns/<namespace>/sa/<service-account> path")]
    Path(String),
}

impl SpiffeId {
    /// Builds the identity istiod issues to a pod's service account.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let mut parts = rest.split('/');
        let td = parts.next().filter(|t| !t.is_empty());
        match (
            td,
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !ns.is_empty() && !sa.is_empty() =>
            {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(SpiffeIdError::Path(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The identity of the peer on an mTLS connection, put into request extensions by the inbound
/// side (`req.extensions().get::<PeerIdentity>()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer certificate's URI SAN, if it is an Istio SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// The raw URI SANs of the peer certificate (shared: cloning the identity into each
    /// request does not copy them).
    pub uri_sans: Arc<[String]>,
}

/// Who this workload is, as istio-agent tells istiod: the pieces of `node.id` and the node
/// metadata (FACTS.md c.2, c.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Proxy type, first part of `node.id` (`sidecar`).
    pub proxy_type: String,
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`.
    pub namespace: String,
    /// `INSTANCE_IP`.
    pub instance_ip: IpAddr,
    /// `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// `TRUST_DOMAIN` (default `cluster.local`).
    pub trust_domain: String,
    /// `ISTIO_META_CLUSTER_ID` (default `Kubernetes`).
    pub cluster_id: String,
    /// Cluster DNS suffix (default `cluster.local`).
    pub cluster_domain: String,
    /// Workload name (`ISTIO_META_WORKLOAD_NAME`, default the pod name's deployment part).
    pub workload_name: String,
    /// Pod labels (`ISTIO_METAJSON_LABELS` / builder).
    pub labels: BTreeMap<String, String>,
    /// Every other metadata key (`ISTIO_META_<KEY>`), as strings the way istio-agent sends them.
    pub metadata: BTreeMap<String, String>,
}

impl NodeIdentity {
    /// A node identity with Istio's defaults for everything but the pod's own facts.
    pub fn new(
        pod_name: &str,
        namespace: &str,
        instance_ip: IpAddr,
        service_account: &str,
    ) -> Self {
        NodeIdentity {
            proxy_type: "sidecar".into(),
            pod_name: pod_name.into(),
            namespace: namespace.into(),
            instance_ip,
            service_account: service_account.into(),
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            cluster_domain: "cluster.local".into(),
            workload_name: workload_name_from_pod(pod_name),
            labels: BTreeMap::new(),
            metadata: BTreeMap::new(),
        }
    }

    /// `node.id` exactly as istio-agent builds it:
    /// `sidecar~<ip>~<pod>.<ns>~<ns>.svc.<cluster-domain>`.
    pub fn node_id(&self) -> String {
        format!(
            "{}~{}~{}.{}~{}.svc.{}",
            self.proxy_type,
            self.instance_ip,
            self.pod_name,
            self.namespace,
            self.namespace,
            self.cluster_domain
        )
    }

    /// The SPIFFE ID istiod's CA will issue to this workload.
    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// `service.istio.io/canonical-name`, falling back to `app`, then the workload name, as
    /// Istio computes the canonical service.
    pub fn canonical_service(&self) -> &str {
        self.labels
            .get("service.istio.io/canonical-name")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .or_else(|| self.labels.get("app"))
            .map(String::as_str)
            .unwrap_or(&self.workload_name)
    }

    /// `service.istio.io/canonical-revision`, falling back to `version`, then `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.labels
            .get("service.istio.io/canonical-revision")
            .or_else(|| self.labels.get("app.kubernetes.io/version"))
            .or_else(|| self.labels.get("version"))
            .map(String::as_str)
            .unwrap_or("latest")
    }
}

/// Strips the ReplicaSet and pod hashes from a pod name (`reviews-v1-7f99c7d8b5-abcde` →
/// `reviews-v1`), the way Istio derives a workload name when none is given.
pub fn workload_name_from_pod(pod: &str) -> String {
    let parts: Vec<&str> = pod.split('-').collect();
    if parts.len() >= 3 {
        let hash = parts[parts.len() - 2];
        let suffix = parts[parts.len() - 1];
        let is_hash = |s: &str, lo: usize, hi: usize| {
            (lo..=hi).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric())
        };
        if is_hash(hash, 8, 10) && is_hash(suffix, 5, 5) {
            return parts[..parts.len() - 2].join("-");
        }
    }
    pod.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn spiffe_rejects_other_shapes() {
        assert!(matches!(
            "https://cluster.local/ns/a/sa/b".parse::<SpiffeId>(),
            Err(SpiffeIdError::Scheme(_))
        ));
        for bad in [
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/sa/a/ns/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn node_id_matches_istio_agent() {
        let n = NodeIdentity::new(
            "reviews-v1-7f99c7d8b5-abcde",
            "default",
            "10.1.2.3".parse().unwrap(),
            "bookinfo-reviews",
        );
        assert_eq!(
            n.node_id(),
            "sidecar~10.1.2.3~reviews-v1-7f99c7d8b5-abcde.default~default.svc.cluster.local"
        );
        assert_eq!(n.workload_name, "reviews-v1");
        assert_eq!(
            n.spiffe_id().to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        );
        assert_eq!(n.canonical_revision(), "latest");
    }
}
