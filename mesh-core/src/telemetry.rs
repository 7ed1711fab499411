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

#[cfg(test)]
mod tests {
    use super::*;

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
}
