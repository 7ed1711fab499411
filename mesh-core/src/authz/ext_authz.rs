//! The seam between the inbound path and an external authorization provider (Istio's CUSTOM
//! action, `envoy.filters.http.ext_authz`): what is asked ([`CheckRequest`], the attributes
//! Envoy puts into `service.auth.v3.CheckRequest`), what comes back ([`CheckResponse`]) and
//! who answers ([`ExternalAuthorizer`]). The gRPC client lives in mesh-xds (protobuf stays
//! there); the inbound path in mesh-tower only sees this trait.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use super::ExtAuthz;

/// The request attributes Envoy's ext_authz filter sends (`AttributeContext`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckRequest {
    /// `source.address`: the downstream connection's peer address.
    pub source: Option<SocketAddr>,
    /// `source.principal`: the peer certificate's URI SAN.
    pub source_principal: Option<String>,
    /// `destination.address`: the local address the request arrived on.
    pub destination: Option<SocketAddr>,
    /// `destination.principal`: this workload's URI SAN.
    pub destination_principal: Option<String>,
    /// `request.http.id` (`x-request-id`, when present).
    pub id: String,
    /// `request.http.method`.
    pub method: String,
    /// `request.http.path` (normalized, query included).
    pub path: String,
    /// `request.http.host`.
    pub host: String,
    /// `request.http.scheme`.
    pub scheme: String,
    /// `request.http.protocol` (`HTTP/1.1`, `HTTP/2`).
    pub protocol: String,
    /// `request.http.headers`: lower-case names, repeated values joined with `,`.
    pub headers: Vec<(String, String)>,
}

/// One header the provider asks to add to the request (`HeaderValueOption`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderToAdd {
    /// Lower-case header name.
    pub name: String,
    /// The value.
    pub value: String,
    /// `true` appends to existing values; `false` (Envoy's default here) replaces them.
    pub append: bool,
}

/// The provider's answer (`service.auth.v3.CheckResponse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResponse {
    /// `status.code == OK`: the request continues with these header changes.
    Allow {
        /// `ok_response.headers`.
        headers_to_add: Vec<HeaderToAdd>,
        /// `ok_response.headers_to_remove`.
        headers_to_remove: Vec<String>,
    },
    /// Any other status: answer the client with `denied_response`.
    Deny {
        /// `denied_response.status` (403 when unset).
        status: u16,
        /// `denied_response.body`.
        body: String,
        /// `denied_response.headers`.
        headers: Vec<(String, String)>,
    },
}

/// Why the provider gave no answer: Envoy then applies `failure_mode_allow` /
/// `status_on_error`.
#[derive(Debug, thiserror::Error)]
pub enum ExtAuthzError {
    /// The provider's cluster has no endpoint to call.
    #[error("ext_authz cluster {cluster} has no routable endpoint")]
    NoEndpoint {
        /// The Envoy cluster name.
        cluster: String,
    },
    /// The call failed (connection refused, gRPC error status other than a decision).
    #[error("ext_authz call to {cluster} failed: {message}")]
    Call {
        /// The Envoy cluster name.
        cluster: String,
        /// What went wrong.
        message: String,
    },
    /// The call did not finish within the filter's timeout.
    #[error("ext_authz call to {cluster} timed out")]
    Timeout {
        /// The Envoy cluster name.
        cluster: String,
    },
    /// No provider client is installed in this process.
    #[error("no external authorization client is installed")]
    NoClient,
}

/// The future an [`ExternalAuthorizer`] returns.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<CheckResponse, ExtAuthzError>> + Send>>;

/// Calls the provider an ext_authz filter names (its `grpc_service` cluster).
pub trait ExternalAuthorizer: Send + Sync + std::fmt::Debug {
    /// Asks the provider of `filter` about `request`. The caller bounds the call with the
    /// filter's timeout.
    fn check(&self, filter: &ExtAuthz, request: CheckRequest) -> CheckFuture;
}
