//! Authorization on the inbound path, as Envoy's inbound filter chains run it: the HTTP
//! connection manager's path normalization, then the RBAC (and ext_authz) HTTP filters once per
//! request; or the network RBAC filter once per connection on TCP chains.
//!
//! The chain for a connection is taken from the snapshot when the connection is accepted (a
//! filter chain is fixed for a connection's life in Envoy too). Ports without a policy carry
//! no chain, so a request pays only for [`is_normalized`]'s scan of its path.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};
use mesh_core::authz::{
    AuthzChain, AuthzDecision, AuthzRequest, DynamicMetadata, NormalizedPath, PathNormalization,
    is_normalized, normalize_path,
};

#[path = "ext_authz.rs"]
pub mod ext_authz;

pub(crate) use ext_authz::PendingExtAuthz;

/// Response flag Envoy sets when RBAC denies a request (`RBAC`).
pub const RBAC_FLAG: &str = "RBAC";
/// Response flag Envoy sets when the external authorization service denies (`UAEX`).
pub const UAEX_FLAG: &str = "UAEX";

/// The connection's facts the RBAC filters match on, fixed when the connection is accepted.
#[derive(Debug)]
pub(crate) struct ConnectionAuthz {
    pub(crate) chain: Arc<AuthzChain>,
    pub(crate) source: SocketAddr,
    /// The original destination: the local IP with the application port.
    pub(crate) destination: Option<SocketAddr>,
    pub(crate) sni: Option<String>,
    pub(crate) peer_principal: Option<String>,
    pub(crate) peer_authenticated: bool,
    pub(crate) local_principal: Option<String>,
    /// The CUSTOM action's provider client ([`super::InboundConfig::ext_authz`]).
    pub(crate) ext_authz: Option<Arc<dyn mesh_core::authz::ext_authz::ExternalAuthorizer>>,
}

/// What the inbound path answers instead of calling the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalReply {
    pub(crate) status: u16,
    pub(crate) body: std::borrow::Cow<'static, str>,
    pub(crate) location: Option<String>,
    /// `www-authenticate` (JWT refusals).
    pub(crate) www_authenticate: Option<String>,
    pub(crate) flags: &'static str,
    /// Further response headers (an ext_authz provider's `denied_response.headers`).
    pub(crate) headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Normalizes the request's path in place (Istio's `BASE` normalization on the inbound HCM);
/// returns the local reply for a path Envoy refuses (400) or redirects (307).
pub(crate) fn normalize_request_path(uri: &mut Uri) -> Option<LocalReply> {
    let pq = uri.path_and_query()?;
    let mode = PathNormalization::Base;
    if is_normalized(pq.as_str(), mode) {
        return None;
    }
    match normalize_path(pq.as_str(), mode) {
        NormalizedPath::Forward(p) => {
            let mut parts = std::mem::take(uri).into_parts();
            match p.parse() {
                Ok(pq) => {
                    parts.path_and_query = Some(pq);
                    match Uri::from_parts(parts) {
                        Ok(u) => {
                            *uri = u;
                            None
                        }
                        Err(_) => Some(bad_request()),
                    }
                }
                Err(_) => Some(bad_request()),
            }
        }
        NormalizedPath::Redirect(p) => Some(LocalReply {
            status: 307,
            body: "".into(),
            location: Some(p),
            www_authenticate: None,
            flags: "-",
            headers: Vec::new(),
        }),
        NormalizedPath::Reject => Some(bad_request()),
    }
}

fn bad_request() -> LocalReply {
    tracing::debug!("refusing request: path normalization failed");
    LocalReply {
        status: 400,
        body: "".into(),
        location: None,
        www_authenticate: None,
        flags: "-",
        headers: Vec::new(),
    }
}

pub(crate) fn denied(policy: Option<&str>, filter: usize) -> LocalReply {
    tracing::debug!(
        filter,
        policy = policy.unwrap_or("none"),
        "RBAC: enforced denied request"
    );
    metrics::counter!("mesh_inbound_rbac_denied_total", "layer" => "http").increment(1);
    LocalReply {
        status: 403,
        body: mesh_core::authz::RBAC_DENIED_BODY.into(),
        location: None,
        www_authenticate: None,
        flags: RBAC_FLAG,
        headers: Vec::new(),
    }
}

impl ConnectionAuthz {
    pub(crate) fn request<'a>(
        &'a self,
        headers: Option<&'a HeaderMap>,
        method: &'a str,
        path: &'a str,
        authority: &'a str,
        scheme: &'a str,
    ) -> AuthzRequest<'a> {
        AuthzRequest {
            headers,
            method,
            path,
            authority,
            scheme,
            source: Some(self.source),
            remote_ip: headers.and_then(xff_remote_ip),
            destination: self.destination,
            requested_server_name: self.sni.as_deref(),
            peer_principal: self.peer_principal.as_deref(),
            peer_authenticated: self.peer_authenticated,
            local_principal: self.local_principal.as_deref(),
        }
    }

    /// Runs the HTTP chain from filter `start` on a request, with the dynamic metadata earlier
    /// filters wrote: `Ok(Some(reply))` replaces the application's answer, `Ok(None)` lets the
    /// request through, `Err(pending)` must consult an ext_authz provider first
    /// ([`ext_authz::resume`]).
    pub(crate) fn check_request_from(
        self: &Arc<Self>,
        start: usize,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        tls: bool,
        mut md: DynamicMetadata,
    ) -> Result<Option<LocalReply>, Box<PendingExtAuthz>> {
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let authority = request_authority(uri, headers);
        let scheme = request_scheme(uri, tls);
        let req = self.request(Some(headers), method.as_str(), path, authority, scheme);
        match self.chain.evaluate_from(start, &req, &mut md) {
            AuthzDecision::Allow => Ok(None),
            AuthzDecision::Deny { filter, policy } => Ok(Some(denied(policy.as_deref(), filter))),
            AuthzDecision::CheckExternal { filter } => Err(Box::new(PendingExtAuthz {
                authz: Arc::clone(self),
                filter,
                md,
                tls,
            })),
        }
    }

    /// [`check_request_from`](Self::check_request_from) from the first filter.
    pub(crate) fn check_request(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        tls: bool,
        md: DynamicMetadata,
    ) -> Result<Option<LocalReply>, Box<PendingExtAuthz>> {
        self.check_request_from(0, method, uri, headers, tls, md)
    }

    /// Runs the network chain once for a connection; `false` closes it.
    pub(crate) fn check_connection(&self) -> bool {
        let req = self.request(None, "", "", "", "");
        let mut md = DynamicMetadata::default();
        match self.chain.evaluate(&req, &mut md) {
            AuthzDecision::Allow => true,
            AuthzDecision::Deny { filter, policy } => {
                tracing::debug!(
                    filter,
                    policy = policy.as_deref().unwrap_or("none"),
                    source = %self.source,
                    "RBAC: enforced denied connection"
                );
                metrics::counter!("mesh_inbound_rbac_denied_total", "layer" => "network")
                    .increment(1);
                false
            }
            // Network chains carry no ext_authz filter.
            AuthzDecision::CheckExternal { .. } => false,
        }
    }
}

/// The `remote_ip` Envoy's HCM derives as istiod renders the inbound one
/// (`use_remote_address: false`, `xff_num_trusted_hops: 0`): the last address of
/// `x-forwarded-for` when it is an IP, else (`None`) the connection's peer. Checked against
/// Envoy 1.40: `x-forwarded-for: 1.2.3.4, 10.9.9.9` matches a `remote_ip` of 10.9.9.9, a first
/// entry does not, and an unparsable last entry falls back to the peer.
pub(crate) fn xff_remote_ip(headers: &HeaderMap) -> Option<std::net::IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.to_str().ok()?.rsplit(',').next()?;
    entry.trim().parse().ok()
}

/// `:authority`, or the `host` header.
pub(crate) fn request_authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    match uri.authority() {
        Some(a) => a.as_str(),
        None => headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(""),
    }
}

/// `:scheme`, or what the connection implies.
pub(crate) fn request_scheme(uri: &Uri, tls: bool) -> &str {
    uri.scheme_str()
        .unwrap_or(if tls { "https" } else { "http" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_ip_is_the_last_forwarded_for_address() {
        let mut h = HeaderMap::new();
        assert_eq!(xff_remote_ip(&h), None);
        h.insert("x-forwarded-for", "10.9.9.9, 1.2.3.4".parse().unwrap());
        assert_eq!(xff_remote_ip(&h), Some([1, 2, 3, 4].into()));
        h.insert("x-forwarded-for", "1.2.3.4,  2001:db8::1 ".parse().unwrap());
        assert_eq!(xff_remote_ip(&h), Some("2001:db8::1".parse().unwrap()));
        h.insert("x-forwarded-for", "1.2.3.4, junk".parse().unwrap());
        assert_eq!(xff_remote_ip(&h), None);
    }

    #[test]
    fn normalization_rewrites_redirects_and_rejects() {
        let mut uri: Uri = "/admin/../x?q=1".parse().unwrap();
        assert_eq!(normalize_request_path(&mut uri), None);
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/x?q=1");
        let mut uri: Uri = "http://h/a/./b".parse().unwrap();
        assert_eq!(normalize_request_path(&mut uri), None);
        assert_eq!(uri.to_string(), "http://h/a/b");
        let mut uri: Uri = "/a%zz".parse().unwrap();
        assert_eq!(normalize_request_path(&mut uri).unwrap().status, 400);
        let mut uri: Uri = "/plain/path".parse().unwrap();
        assert_eq!(normalize_request_path(&mut uri), None);
        assert_eq!(uri.path(), "/plain/path");
    }
}
