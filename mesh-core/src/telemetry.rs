//! Istio's standard metrics: names, label names in emission order, and value rules
//! (FACTS.md f). The request path builds label values from [`WorkloadLabels`] of both peers.

/// `istio_requests_total`.
pub const REQUESTS_TOTAL: &str = "istio_requests_total";
/// `istio_request_duration_milliseconds`.
pub const REQUEST_DURATION_MS: &str = "istio_request_duration_milliseconds";
/// `istio_request_bytes`.
pub const REQUEST_BYTES: &str = "istio_request_bytes";
/// `istio_response_bytes`.
pub const RESPONSE_BYTES: &str = "istio_response_bytes";

/// `istio_tcp_connections_opened_total`.
pub const TCP_CONNECTIONS_OPENED_TOTAL: &str = "istio_tcp_connections_opened_total";
/// `istio_tcp_connections_closed_total`.
pub const TCP_CONNECTIONS_CLOSED_TOTAL: &str = "istio_tcp_connections_closed_total";
/// `istio_tcp_sent_bytes_total` (bytes sent to the downstream peer).
pub const TCP_SENT_BYTES_TOTAL: &str = "istio_tcp_sent_bytes_total";
/// `istio_tcp_received_bytes_total` (bytes received from the downstream peer).
pub const TCP_RECEIVED_BYTES_TOTAL: &str = "istio_tcp_received_bytes_total";
/// How often Istio's stats filter reports the byte counters of an open TCP connection
/// (`tcp_reporting_duration`, 5 s by default); the rest is reported at close.
pub const TCP_REPORTING_DURATION: std::time::Duration = std::time::Duration::from_secs(5);

/// Envoy's default histogram buckets, used by Istio for ms and byte histograms.
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Value Istio uses for anything it does not know.
pub const UNKNOWN: &str = "unknown";

/// Which side records the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// Client side (outbound): `reporter="source"`.
    Source,
    /// Server side (inbound): `reporter="destination"`.
    Destination,
}

impl Reporter {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// One side's workload labels, as read from node metadata (own side) or peer metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// `*_workload`.
    pub workload: String,
    /// `*_workload_namespace`.
    pub namespace: String,
    /// `*_principal` (SPIFFE URI).
    pub principal: String,
    /// `*_app`.
    pub app: String,
    /// `*_version`.
    pub version: String,
    /// `*_canonical_service`.
    pub canonical_service: String,
    /// `*_canonical_revision`.
    pub canonical_revision: String,
    /// `*_cluster`.
    pub cluster: String,
}

impl Default for WorkloadLabels {
    fn default() -> Self {
        let u = || UNKNOWN.to_owned();
        WorkloadLabels {
            workload: u(),
            namespace: u(),
            principal: u(),
            app: u(),
            version: u(),
            canonical_service: u(),
            canonical_revision: "latest".into(),
            cluster: u(),
        }
    }
}

impl WorkloadLabels {
    /// This workload's own labels from its node identity.
    pub fn from_node(node: &crate::identity::NodeIdentity) -> Self {
        let or_unknown = |v: Option<&String>| v.cloned().unwrap_or_else(|| UNKNOWN.to_owned());
        WorkloadLabels {
            workload: node.workload_name.clone(),
            namespace: node.namespace.clone(),
            principal: node.spiffe_id().to_string(),
            app: or_unknown(node.labels.get("app")),
            version: or_unknown(node.labels.get("version")),
            canonical_service: node.canonical_service().to_owned(),
            canonical_revision: node.canonical_revision().to_owned(),
            cluster: node.cluster_id.clone(),
        }
    }
}

/// The destination service as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationService {
    /// `destination_service` (FQDN).
    pub host: String,
    /// `destination_service_name`.
    pub name: String,
    /// `destination_service_namespace`.
    pub namespace: String,
}

impl Default for DestinationService {
    fn default() -> Self {
        DestinationService {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }
}

impl DestinationService {
    /// What istiod puts in the `inbound|<port>||` cluster's `istio.services` metadata (the
    /// server side's `destination_service*`), rebuilt from the outbound view for a snapshot
    /// without that cluster: the service (lowest host first) in `node`'s namespace with an
    /// endpoint at the node's instance IP and `port`, as istiod selects services for a pod's
    /// inbound port. `None` when no such service exists; Istio then reports `unknown` (it
    /// does not fall back to the Host header on the inbound side).
    pub fn inbound_from_outbound(
        snapshot: &crate::snapshot::Snapshot,
        node: &crate::identity::NodeIdentity,
        port: u16,
    ) -> Option<Self> {
        let mut best: Option<&crate::cluster::ServiceMetadata> = None;
        for cluster in snapshot.clusters.values() {
            let Some(service) = cluster.service.as_ref() else {
                continue;
            };
            if service.namespace != node.namespace
                || best.is_some_and(|b| b.host.as_str() <= service.host.as_str())
            {
                continue;
            }
            let selects_us = snapshot.endpoints_of(cluster).is_some_and(|set| {
                set.endpoints
                    .iter()
                    .any(|e| e.address.port() == port && e.address.ip() == node.instance_ip)
            });
            if selects_us {
                best = Some(service);
            }
        }
        best.map(|s| DestinationService {
            host: s.host.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        })
    }
}

/// The per-request values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// HTTP status (`0` if none).
    pub response_code: u16,
    /// gRPC status, empty when not gRPC.
    pub grpc_status: String,
    /// Envoy response flags (`-` when none).
    pub response_flags: &'static str,
    /// `mutual_tls`, `none` or `unknown`.
    pub connection_security_policy: &'static str,
}

/// Labels for `istio_requests_total` & co, in Istio's exact emission order.
pub fn request_labels(
    reporter: Reporter,
    source: &WorkloadLabels,
    destination: &WorkloadLabels,
    service: &DestinationService,
    outcome: &RequestOutcome,
) -> Vec<(&'static str, String)> {
    vec![
        ("reporter", reporter.as_str().to_owned()),
        ("source_workload", source.workload.clone()),
        ("source_canonical_service", source.canonical_service.clone()),
        (
            "source_canonical_revision",
            source.canonical_revision.clone(),
        ),
        ("source_workload_namespace", source.namespace.clone()),
        ("source_principal", source.principal.clone()),
        ("source_app", source.app.clone()),
        ("source_version", source.version.clone()),
        ("source_cluster", source.cluster.clone()),
        ("destination_workload", destination.workload.clone()),
        (
            "destination_workload_namespace",
            destination.namespace.clone(),
        ),
        ("destination_principal", destination.principal.clone()),
        ("destination_app", destination.app.clone()),
        ("destination_version", destination.version.clone()),
        ("destination_service", service.host.clone()),
        (
            "destination_canonical_service",
            destination.canonical_service.clone(),
        ),
        (
            "destination_canonical_revision",
            destination.canonical_revision.clone(),
        ),
        ("destination_service_name", service.name.clone()),
        ("destination_service_namespace", service.namespace.clone()),
        ("destination_cluster", destination.cluster.clone()),
        ("request_protocol", outcome.protocol.to_owned()),
        ("response_code", outcome.response_code.to_string()),
        ("grpc_response_status", outcome.grpc_status.clone()),
        ("response_flags", outcome.response_flags.to_owned()),
        (
            "connection_security_policy",
            outcome.connection_security_policy.to_owned(),
        ),
    ]
}

/// Labels for the `istio_tcp_*` counters, in Istio's emission order: the request labels
/// without `response_code` and `grpc_response_status`, `request_protocol="tcp"`.
pub fn tcp_labels(
    reporter: Reporter,
    source: &WorkloadLabels,
    destination: &WorkloadLabels,
    service: &DestinationService,
    response_flags: &'static str,
    connection_security_policy: &'static str,
) -> Vec<(&'static str, String)> {
    let outcome = RequestOutcome {
        protocol: "tcp",
        response_code: 0,
        grpc_status: String::new(),
        response_flags,
        connection_security_policy,
    };
    let mut labels = request_labels(reporter, source, destination, service, &outcome);
    labels.retain(|(k, _)| !matches!(*k, "response_code" | "grpc_response_status"));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_service_is_the_service_selecting_this_workload_port() {
        use crate::cluster::{Cluster, ServiceMetadata};
        use crate::endpoint::{Endpoint, EndpointSet};
        use std::sync::Arc;
        let node = crate::identity::NodeIdentity::new(
            "ratings-v1-0",
            "default",
            "10.0.0.7".parse().unwrap(),
            "ratings",
        );
        let mut snapshot = crate::snapshot::Snapshot::default();
        let mut add = |host: &str, ns: &str, addr: &str| {
            let name = format!("outbound|9080||{host}");
            let mut c = Cluster::eds(name.clone());
            c.service = Some(ServiceMetadata {
                host: host.into(),
                name: host.split('.').next().unwrap().into(),
                namespace: ns.into(),
            });
            snapshot.clusters.insert(name.clone(), Arc::new(c));
            let set = EndpointSet::new(name.clone(), vec![Endpoint::new(addr.parse().unwrap())]);
            snapshot.endpoints.insert(name, Arc::new(set));
        };
        add(
            "reviews.default.svc.cluster.local",
            "default",
            "10.0.0.8:9080",
        );
        add("ratings.other.svc.cluster.local", "other", "10.0.0.7:9080");
        add(
            "ratings.default.svc.cluster.local",
            "default",
            "10.0.0.7:9080",
        );
        add("zz.default.svc.cluster.local", "default", "10.0.0.7:9080");
        let s = DestinationService::inbound_from_outbound(&snapshot, &node, 9080).unwrap();
        assert_eq!(s.host, "ratings.default.svc.cluster.local");
        assert_eq!(s.name, "ratings");
        assert_eq!(s.namespace, "default");
        assert_eq!(
            DestinationService::inbound_from_outbound(&snapshot, &node, 9081),
            None
        );
    }

    #[test]
    fn label_order_is_istios() {
        let l = request_labels(
            Reporter::Source,
            &WorkloadLabels::default(),
            &WorkloadLabels::default(),
            &DestinationService::default(),
            &RequestOutcome {
                protocol: "http",
                response_code: 200,
                grpc_status: String::new(),
                response_flags: "-",
                connection_security_policy: "unknown",
            },
        );
        let names: Vec<_> = l.iter().map(|(k, _)| *k).collect();
        assert_eq!(names[0], "reporter");
        assert_eq!(names[9], "destination_workload");
        assert_eq!(names[14], "destination_service");
        assert_eq!(names.last(), Some(&"connection_security_policy"));
        assert_eq!(l[3].1, "latest");
    }

    #[test]
    fn tcp_label_order_is_istios() {
        // istio/proxy testdata/metric/tcp_client_connection_open.yaml.tmpl, server reporter.
        let l = tcp_labels(
            Reporter::Destination,
            &WorkloadLabels::default(),
            &WorkloadLabels::default(),
            &DestinationService::default(),
            "-",
            "none",
        );
        let names: Vec<_> = l.iter().map(|(k, _)| *k).collect();
        assert_eq!(names.len(), 23);
        assert_eq!(names[0], "reporter");
        assert_eq!(
            &names[19..],
            &[
                "destination_cluster",
                "request_protocol",
                "response_flags",
                "connection_security_policy"
            ]
        );
        assert_eq!(l[20].1, "tcp");
        assert_eq!(l[0].1, "destination");
    }
}
