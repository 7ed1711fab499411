//! The CUSTOM action's provider client: Envoy's `envoy.service.auth.v3.Authorization/Check`
//! over gRPC, behind [`mesh_core::authz::ext_authz::ExternalAuthorizer`] so the inbound path
//! (mesh-tower) never sees protobuf.
//!
//! [`GrpcExtAuthorizer`] resolves the ext_authz filter's `grpc_service.envoy_grpc` cluster
//! (`outbound|<port>||<host>`, as istiod renders `envoyExtAuthzGrpc` providers) in the current
//! snapshot, calls one routable endpoint (round robin) over plaintext HTTP/2 with the
//! cluster's `authority` as `:authority`, and keeps one channel per endpoint address.
//! [`check_request`] and [`check_response`] are the protobuf mapping, public for tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::address::Address as PbAddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address as PbAddress, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest as PbCheckRequest, CheckResponse as PbCheckResponse,
};
use mesh_core::SnapshotCell;
use mesh_core::authz::ExtAuthz;
use mesh_core::authz::ext_authz::{
    CheckFuture, CheckRequest, CheckResponse, ExtAuthzError, ExternalAuthorizer, HeaderToAdd,
};
use tonic::transport::{Channel, Endpoint};

/// gRPC `OK`.
const GRPC_OK: i32 = 0;

/// Channels by endpoint address and `:authority`.
type Channels = HashMap<(SocketAddr, Option<String>), Channel>;

/// Calls ext_authz providers named by cluster, resolving them in a [`SnapshotCell`].
#[derive(Clone, Debug)]
pub struct GrpcExtAuthorizer {
    cell: SnapshotCell,
    channels: Arc<Mutex<Channels>>,
}

impl GrpcExtAuthorizer {
    /// A client resolving provider clusters in `cell`.
    pub fn new(cell: SnapshotCell) -> Self {
        GrpcExtAuthorizer {
            cell,
            channels: Arc::default(),
        }
    }

    fn resolve(&self, cluster: &str) -> Result<SocketAddr, ExtAuthzError> {
        let snapshot = self.cell.load_guard();
        snapshot
            .cluster(cluster)
            .and_then(|(_, endpoints)| endpoints)
            .and_then(|set| set.pick_round_robin().map(|e| e.address))
            .ok_or_else(|| ExtAuthzError::NoEndpoint {
                cluster: cluster.to_owned(),
            })
    }

    fn channel(
        &self,
        address: SocketAddr,
        authority: Option<&str>,
        cluster: &str,
    ) -> Result<Channel, ExtAuthzError> {
        let key = (address, authority.map(str::to_owned));
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let mut endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| {
            ExtAuthzError::Call {
                cluster: cluster.to_owned(),
                message: e.to_string(),
            }
        })?;
        if let Some(authority) = authority {
            let uri =
                format!("http://{authority}")
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| ExtAuthzError::Call {
                        cluster: cluster.to_owned(),
                        message: format!("authority {authority:?}: {e}"),
                    })?;
            endpoint = endpoint.origin(uri);
        }
        let channel = endpoint.connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

impl ExternalAuthorizer for GrpcExtAuthorizer {
    fn check(&self, filter: &ExtAuthz, request: CheckRequest) -> CheckFuture {
        let cluster = filter.cluster.clone();
        let channel = self
            .resolve(&cluster)
            .and_then(|addr| self.channel(addr, filter.authority.as_deref(), &cluster));
        Box::pin(async move {
            let mut client = AuthorizationClient::new(channel?);
            let response = client
                .check(check_request(&request))
                .await
                .map_err(|status| ExtAuthzError::Call {
                    cluster: cluster.clone(),
                    message: format!("{:?}: {}", status.code(), status.message()),
                })?;
            Ok(check_response(&response.into_inner()))
        })
    }
}

fn address(addr: SocketAddr) -> PbAddress {
    PbAddress {
        address: Some(PbAddressKind::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

/// The `CheckRequest` Envoy's ext_authz filter sends for `request`.
pub fn check_request(request: &CheckRequest) -> PbCheckRequest {
    let peer = |addr: Option<SocketAddr>, principal: &Option<String>| Peer {
        address: addr.map(address),
        principal: principal.clone().unwrap_or_default(),
        ..Default::default()
    };
    let query = request.path.split_once('?').map_or("", |(_, q)| q);
    PbCheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(request.source, &request.source_principal)),
            destination: Some(peer(request.destination, &request.destination_principal)),
            request: Some(Request {
                time: Some(now()),
                http: Some(HttpRequest {
                    id: request.id.clone(),
                    method: request.method.clone(),
                    headers: request.headers.iter().cloned().collect(),
                    // Envoy sends the request target as received: path and query.
                    path: request.path.clone(),
                    host: request.host.clone(),
                    scheme: request.scheme.clone(),
                    query: query.to_owned(),
                    protocol: request.protocol.clone(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn now() -> envoy_types::pb::google::protobuf::Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    envoy_types::pb::google::protobuf::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The decision in a provider's `CheckResponse`: `status.code == OK` allows (with
/// `ok_response`'s header changes); anything else denies with `denied_response` (403 when it
/// names no status, as Envoy answers). `ok_response.headers[].append` (deprecated, still what
/// Envoy reads here) defaults to replacing.
#[allow(deprecated)]
pub fn check_response(response: &PbCheckResponse) -> CheckResponse {
    let code = response.status.as_ref().map_or(GRPC_OK, |s| s.code);
    if code == GRPC_OK {
        let (headers_to_add, headers_to_remove) = match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) => (
                ok.headers
                    .iter()
                    .filter_map(|h| {
                        let header = h.header.as_ref()?;
                        Some(HeaderToAdd {
                            name: header.key.to_ascii_lowercase(),
                            value: header_value(header),
                            append: h.append.as_ref().is_some_and(|a| a.value),
                        })
                    })
                    .collect(),
                ok.headers_to_remove
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            ),
            _ => (Vec::new(), Vec::new()),
        };
        return CheckResponse::Allow {
            headers_to_add,
            headers_to_remove,
        };
    }
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => CheckResponse::Deny {
            status: denied
                .status
                .as_ref()
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| (200..600).contains(c))
                .unwrap_or(403),
            body: denied.body.clone(),
            headers: denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.to_ascii_lowercase(), header_value(h)))
                .collect(),
        },
        _ => CheckResponse::Deny {
            status: 403,
            body: String::new(),
            headers: Vec::new(),
        },
    }
}

fn header_value(h: &envoy_types::pb::envoy::config::core::v3::HeaderValue) -> String {
    if h.value.is_empty() && !h.raw_value.is_empty() {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    } else {
        h.value.clone()
    }
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
    use envoy_types::pb::envoy::service::auth::v3::{DeniedHttpResponse, OkHttpResponse};
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::google::protobuf::BoolValue;
    use envoy_types::pb::google::rpc::Status;

    fn hvo(k: &str, v: &str, append: Option<bool>) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append: append.map(|value| BoolValue { value }),
            ..Default::default()
        }
    }

    #[test]
    fn check_request_carries_envoys_attributes() {
        let req = CheckRequest {
            source: Some("10.0.0.1:5555".parse().unwrap()),
            source_principal: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
            destination: Some("10.0.0.2:8080".parse().unwrap()),
            destination_principal: Some("spiffe://cluster.local/ns/default/sa/app".into()),
            method: "POST".into(),
            path: "/a/b?x=1".into(),
            host: "app:8080".into(),
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            headers: vec![("x-user".into(), "alice".into())],
            ..Default::default()
        };
        let pb = check_request(&req);
        let a = pb.attributes.unwrap();
        let src = a.source.unwrap();
        assert_eq!(src.principal, "spiffe://cluster.local/ns/default/sa/sleep");
        let Some(PbAddressKind::SocketAddress(s)) = src.address.unwrap().address else {
            panic!("socket address")
        };
        assert_eq!(
            (s.address.as_str(), s.port_specifier),
            ("10.0.0.1", Some(PortSpecifier::PortValue(5555)))
        );
        let http = a.request.unwrap().http.unwrap();
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/a/b?x=1");
        assert_eq!(http.query, "x=1");
        assert_eq!(http.host, "app:8080");
        assert_eq!(
            http.headers.get("x-user").map(String::as_str),
            Some("alice")
        );
        assert_eq!(
            a.destination.unwrap().principal,
            "spiffe://cluster.local/ns/default/sa/app"
        );
    }

    #[test]
    fn check_response_maps_ok_denied_and_defaults() {
        let ok = PbCheckResponse {
            status: Some(Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![hvo("X-Auth", "yes", None), hvo("x-tag", "b", Some(true))],
                headers_to_remove: vec!["X-Secret".into()],
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            check_response(&ok),
            CheckResponse::Allow {
                headers_to_add: vec![
                    HeaderToAdd {
                        name: "x-auth".into(),
                        value: "yes".into(),
                        append: false
                    },
                    HeaderToAdd {
                        name: "x-tag".into(),
                        value: "b".into(),
                        append: true
                    }
                ],
                headers_to_remove: vec!["x-secret".into()],
            }
        );
        let denied = PbCheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                headers: vec![hvo("x-why", "nope", None)],
                body: "denied by provider".into(),
            })),
            ..Default::default()
        };
        assert_eq!(
            check_response(&denied),
            CheckResponse::Deny {
                status: 401,
                body: "denied by provider".into(),
                headers: vec![("x-why".into(), "nope".into())],
            }
        );
        // A non-OK status without a denied_response: Envoy's 403.
        let bare = PbCheckResponse {
            status: Some(Status {
                code: 16,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            check_response(&bare),
            CheckResponse::Deny { status: 403, .. }
        ));
    }

    /// istiod's CUSTOM rendering (testkit) translates into a shadow RBAC and an ext_authz
    /// filter that runs exactly for the requests the CUSTOM rules cover.
    #[cfg(feature = "testkit")]
    #[test]
    fn custom_rendering_translates_and_gates_ext_authz() {
        use crate::testkit::authz::{
            AuthorizationPolicySpec, ExtAuthzProviderSpec, PolicyAction, RuleSpec,
            http_rbac_filters,
        };
        use mesh_core::authz::{AuthzDecision, AuthzFilter, AuthzRequest, DynamicMetadata};
        let provider = ExtAuthzProviderSpec::new("ext-authz.foo.svc.cluster.local", 9000);
        let policies = [
            AuthorizationPolicySpec::new("ext", "foo", PolicyAction::Custom)
                .provider(provider)
                .rule(RuleSpec::default().path("/admin*")),
            AuthorizationPolicySpec::new("deny", "foo", PolicyAction::Deny)
                .rule(RuleSpec::default().path("/admin/secret")),
        ];
        let chain = super::super::rbac::translate_http_authz_filters(&http_rbac_filters(&policies))
            .unwrap();
        assert_eq!(chain.filters.len(), 3);
        let AuthzFilter::Rbac(shadow) = &chain.filters[0] else {
            panic!("shadow RBAC first")
        };
        assert!(shadow.rules.is_none());
        assert_eq!(shadow.shadow_rules_stat_prefix, "istio_ext_authz_");
        assert!(
            shadow
                .shadow_rules
                .as_ref()
                .unwrap()
                .policies
                .contains_key("istio-ext-authz-ns[foo]-policy[ext]-rule[0]")
        );
        let AuthzFilter::ExtAuthz(ext) = &chain.filters[1] else {
            panic!("ext_authz second")
        };
        assert_eq!(
            ext.cluster,
            "outbound|9000||ext-authz.foo.svc.cluster.local"
        );
        assert_eq!(
            ext.authority.as_deref(),
            Some("ext-authz.foo.svc.cluster.local")
        );
        assert_eq!((ext.status_on_error, ext.failure_mode_allow), (403, false));
        assert_eq!(ext.effective_timeout(), ExtAuthz::DEFAULT_TIMEOUT);
        let headers = http::HeaderMap::new();
        let req = |path| AuthzRequest {
            headers: Some(&headers),
            method: "GET",
            path,
            ..Default::default()
        };
        let mut md = DynamicMetadata::default();
        assert_eq!(
            chain.evaluate(&req("/admin/x"), &mut md),
            AuthzDecision::CheckExternal { filter: 1 }
        );
        // After the provider allows, DENY still applies.
        assert!(matches!(
            chain.evaluate_from(2, &req("/admin/secret"), &mut md),
            AuthzDecision::Deny { filter: 2, .. }
        ));
        let mut md = DynamicMetadata::default();
        assert_eq!(
            chain.evaluate(&req("/public"), &mut md),
            AuthzDecision::Allow
        );
    }
}
