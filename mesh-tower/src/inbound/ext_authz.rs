//! The CUSTOM action on the inbound path: Envoy's `envoy.filters.http.ext_authz` filter.
//!
//! When the authorization chain reaches an enabled ext_authz filter (istiod enables it through
//! the CUSTOM shadow rules' `istio_ext_authz_shadow_effective_policy_id`), the request waits
//! for the provider: an allow applies the provider's header changes and resumes the chain
//! after the filter; a deny answers with the provider's status, body and headers (flag
//! `UAEX`); no answer within the filter's timeout, or a failed call, answers
//! `status_on_error` (403 by default) — or lets the request through with
//! `failure_mode_allow`.
//!
//! The provider client comes from [`super::super::InboundConfig::ext_authz`]: the gRPC
//! `Authorization/Check` client lives in mesh-xds behind [`ExternalAuthorizer`] (protobuf stays
//! there), and each `mesh` runtime hands its listeners one that resolves provider clusters in
//! its own snapshot. Without one, every check fails as a provider that cannot be reached.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request};
use mesh_core::authz::ext_authz::{CheckRequest, CheckResponse, ExtAuthzError, ExternalAuthorizer};
use mesh_core::authz::{AuthzFilter, DynamicMetadata, ExtAuthz};

use super::{ConnectionAuthz, LocalReply, UAEX_FLAG, denied, request_authority, request_scheme};

/// A request stopped at an enabled ext_authz filter.
#[derive(Debug)]
pub(crate) struct PendingExtAuthz {
    pub(crate) authz: Arc<ConnectionAuthz>,
    /// Index of the ext_authz filter in the chain.
    pub(crate) filter: usize,
    /// Dynamic metadata so far (the shadow results that enabled the filter).
    pub(crate) md: DynamicMetadata,
    pub(crate) tls: bool,
}

/// The attributes Envoy sends for `req` on this connection.
fn check_request<B>(authz: &ConnectionAuthz, req: &Request<B>, tls: bool) -> CheckRequest {
    let uri = req.uri();
    let headers = req.headers();
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let host = request_authority(uri, headers).to_owned();
    let mut pairs: Vec<(String, String)> = vec![
        (":authority".into(), host.clone()),
        (":method".into(), req.method().as_str().to_owned()),
        (":path".into(), path.to_owned()),
    ];
    for name in headers.keys() {
        let joined: Vec<&str> = headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .collect();
        pairs.push((name.as_str().to_owned(), joined.join(",")));
    }
    CheckRequest {
        source: Some(authz.source),
        source_principal: authz.peer_principal.clone(),
        destination: authz.destination,
        destination_principal: authz.local_principal.clone(),
        id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        method: req.method().as_str().to_owned(),
        path: path.to_owned(),
        host,
        scheme: request_scheme(uri, tls).to_owned(),
        protocol: match req.version() {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .to_owned(),
        headers: pairs,
    }
}

async fn call(
    authorizer: Option<&Arc<dyn ExternalAuthorizer>>,
    ext: &ExtAuthz,
    request: CheckRequest,
) -> Result<CheckResponse, ExtAuthzError> {
    let check = async {
        match authorizer {
            Some(a) => a.check(ext, request).await,
            None => Err(ExtAuthzError::NoClient),
        }
    };
    match tokio::time::timeout(ext.effective_timeout(), check).await {
        Ok(result) => result,
        Err(_) => Err(ExtAuthzError::Timeout {
            cluster: ext.cluster.clone(),
        }),
    }
}

fn apply_ok<B>(
    req: &mut Request<B>,
    add: Vec<mesh_core::authz::ext_authz::HeaderToAdd>,
    remove: Vec<String>,
) {
    let headers = req.headers_mut();
    for name in remove {
        // Envoy never lets the provider remove pseudo-headers or `host`.
        if name.starts_with(':') || name == "host" {
            continue;
        }
        headers.remove(name.as_str());
    }
    for h in add {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&h.value),
        ) else {
            tracing::debug!(header = %h.name, "ext_authz: ignoring an invalid header to add");
            continue;
        };
        if h.append {
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
}

fn provider_denied(status: u16, body: String, headers: Vec<(String, String)>) -> LocalReply {
    metrics::counter!("mesh_inbound_ext_authz_denied_total").increment(1);
    LocalReply {
        status,
        body: body.into(),
        location: None,
        www_authenticate: None,
        flags: UAEX_FLAG,
        headers: headers
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(&v).ok()?,
                ))
            })
            .collect(),
    }
}

/// Consults the provider(s) for a request stopped at an ext_authz filter and finishes the
/// chain: the request back (with the provider's header changes), and the local reply replacing
/// the application's answer, if any.
pub(crate) async fn resume<B>(
    pending: Box<PendingExtAuthz>,
    mut req: Request<B>,
) -> (Request<B>, Option<LocalReply>) {
    let PendingExtAuthz {
        authz,
        mut filter,
        md,
        tls,
    } = *pending;
    let mut md = Some(md);
    loop {
        let Some(AuthzFilter::ExtAuthz(ext)) = authz.chain.filters.get(filter) else {
            return (req, Some(denied(None, filter)));
        };
        match call(
            authz.ext_authz.as_ref(),
            ext,
            check_request(&authz, &req, tls),
        )
        .await
        {
            Ok(CheckResponse::Allow {
                headers_to_add,
                headers_to_remove,
            }) => {
                metrics::counter!("mesh_inbound_ext_authz_ok_total").increment(1);
                apply_ok(&mut req, headers_to_add, headers_to_remove);
            }
            Ok(CheckResponse::Deny {
                status,
                body,
                headers,
            }) => {
                tracing::debug!(cluster = %ext.cluster, status, "ext_authz: provider denied request");
                return (req, Some(provider_denied(status, body, headers)));
            }
            Err(error) => {
                metrics::counter!("mesh_inbound_ext_authz_error_total").increment(1);
                if !ext.failure_mode_allow {
                    tracing::warn!(%error, "ext_authz: provider unavailable; request refused");
                    return (
                        req,
                        Some(LocalReply {
                            status: ext.status_on_error,
                            body: "".into(),
                            location: None,
                            www_authenticate: None,
                            flags: UAEX_FLAG,
                            headers: Vec::new(),
                        }),
                    );
                }
                tracing::warn!(%error, "ext_authz: provider unavailable; allowed by failure_mode_allow");
            }
        }
        let next = authz.check_request_from(
            filter + 1,
            req.method(),
            req.uri(),
            req.headers(),
            tls,
            md.take().unwrap_or_default(),
        );
        match next {
            Ok(local) => return (req, local),
            Err(more) => {
                filter = more.filter;
                md = Some(more.md);
            }
        }
    }
}

/// Runs the whole HTTP chain on an owned request, consulting providers as needed.
pub(crate) async fn authorize<B>(
    authz: Arc<ConnectionAuthz>,
    req: Request<B>,
    tls: bool,
    md: DynamicMetadata,
) -> (Request<B>, Option<LocalReply>) {
    match authz.check_request(req.method(), req.uri(), req.headers(), tls, md) {
        Ok(local) => (req, local),
        Err(pending) => resume(pending, req).await,
    }
}
