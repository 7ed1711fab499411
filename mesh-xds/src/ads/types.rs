//! xDS type URLs (FACTS.md c.5).

/// CDS.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// LDS.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RDS.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// NDS.
pub const NAME_TABLE: &str = crate::istio_proto::NAME_TABLE_TYPE_URL;

/// Wildcard types (empty names = everything).
pub fn is_wildcard(type_url: &str) -> bool {
    matches!(type_url, CLUSTER | LISTENER | NAME_TABLE)
}

/// Short name for logs and metrics (`cds`, `eds`, ...).
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER => "cds",
        ENDPOINT => "eds",
        LISTENER => "lds",
        ROUTE => "rds",
        NAME_TABLE => "nds",
        _ => "unknown",
    }
}
