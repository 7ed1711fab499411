//! RequestAuthentication on the inbound path: runs the port's `jwt_authn` filter
//! ([`mesh_core::authz::jwt::JwtAuthn`]) before the RBAC filters, and keeps the remote JWKS
//! cache Envoy keeps per provider.
//!
//! Remote keys (`remote_jwks`) are fetched over HTTP or HTTPS with hyper when a request
//! carrying a token needs them and they are absent or older than the provider's
//! `cache_duration` (Envoy's lazy fetch: no background timer, the next request after expiry
//! refetches). A fetch is bounded by the provider's `http_uri.timeout`; a failed fetch fails the
//! request's tokens with `Jwks remote fetch is failed` and is not cached, so the next request
//! tries again. Concurrent requests for the same URI share one fetch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use mesh_core::authz::DynamicMetadata;
use mesh_core::authz::jwt::{
    Jwks, JwtAuthn, JwtRequest, JwtStatus, RemoteJwks, RemoteKeys, realm_uri,
};
use tokio::net::TcpStream;

use super::authz::LocalReply;

/// Largest JWKS document accepted (1 MiB).
const MAX_JWKS_BYTES: usize = 1 << 20;

#[derive(Debug)]
struct Cached {
    jwks: Arc<Jwks>,
    fetched: Instant,
}

/// Why a JWKS fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum JwksFetchError {
    /// The URI cannot be fetched (scheme, host).
    #[error("bad jwks uri {0:?}")]
    Uri(String),
    /// Connecting, TLS, or the HTTP exchange failed.
    #[error("fetching {uri}: {reason}")]
    Io {
        /// The URI.
        uri: String,
        /// What failed.
        reason: String,
    },
    /// The server answered something other than 200.
    #[error("fetching {uri}: status {status}")]
    Status {
        /// The URI.
        uri: String,
        /// The status.
        status: u16,
    },
    /// The document is not a usable JWKS.
    #[error("fetching {uri}: {status}")]
    Jwks {
        /// The URI.
        uri: String,
        /// The JWKS parse status.
        status: JwtStatus,
    },
    /// `http_uri.timeout` elapsed.
    #[error("fetching {0}: timed out")]
    Timeout(String),
}

/// The remote JWKS of one inbound listener, by URI.
#[derive(Debug, Default)]
pub struct JwksCache {
    entries: ArcSwap<HashMap<String, Arc<Cached>>>,
    fetching: tokio::sync::Mutex<()>,
}

impl JwksCache {
    /// An empty cache.
    pub fn new() -> Self {
        JwksCache::default()
    }

    /// The keys for `remote` if cached and younger than its `cache_duration`.
    pub fn lookup(&self, remote: &RemoteJwks) -> RemoteKeys {
        match self.entries.load().get(&remote.uri) {
            Some(c) if c.fetched.elapsed() < remote.cache_duration => {
                RemoteKeys::Ready(Arc::clone(&c.jwks))
            }
            _ => RemoteKeys::Unavailable,
        }
    }

    /// Which of `wanted` must be fetched first.
    pub fn stale(&self, wanted: &[&RemoteJwks]) -> Vec<RemoteJwks> {
        wanted
            .iter()
            .filter(|r| matches!(self.lookup(r), RemoteKeys::Unavailable))
            .map(|r| (*r).clone())
            .collect()
    }

    /// Fetches every stale entry of `list` (one fetch at a time per cache; a request that
    /// waited finds the keys another fetched). Every fetch is bounded by its timeout.
    pub async fn refresh(&self, list: &[RemoteJwks]) {
        for remote in list {
            // Bounded: at most this fetch's timeout behind other fetches' timeouts.
            let Ok(_guard) = tokio::time::timeout(remote.timeout, self.fetching.lock()).await
            else {
                continue;
            };
            if matches!(self.lookup(remote), RemoteKeys::Ready(_)) {
                continue;
            }
            match tokio::time::timeout(remote.timeout, fetch_jwks(&remote.uri)).await {
                Ok(Ok(jwks)) => {
                    let mut next = HashMap::clone(&self.entries.load());
                    next.insert(
                        remote.uri.clone(),
                        Arc::new(Cached {
                            jwks: Arc::new(jwks),
                            fetched: Instant::now(),
                        }),
                    );
                    self.entries.store(Arc::new(next));
                    metrics::counter!("mesh_jwks_fetch_total", "result" => "success").increment(1);
                }
                Ok(Err(error)) => {
                    metrics::counter!("mesh_jwks_fetch_total", "result" => "failed").increment(1);
                    tracing::warn!(%error, cluster = %remote.cluster, "jwks fetch failed; tokens of this provider fail until a fetch succeeds");
                }
                Err(_) => {
                    metrics::counter!("mesh_jwks_fetch_total", "result" => "failed").increment(1);
                    tracing::warn!(error = %JwksFetchError::Timeout(remote.uri.clone()), "jwks fetch failed");
                }
            }
        }
    }
}

/// GETs a JWKS document over HTTP(S) and parses it. Not time-bounded itself: callers wrap it
/// in the provider's timeout.
pub async fn fetch_jwks(uri: &str) -> Result<Jwks, JwksFetchError> {
    let parsed: Uri = uri.parse().map_err(|_| JwksFetchError::Uri(uri.into()))?;
    let host = parsed
        .host()
        .ok_or_else(|| JwksFetchError::Uri(uri.into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = match parsed.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(JwksFetchError::Uri(uri.into())),
    };
    let port = parsed.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let io = |e: &dyn std::fmt::Display| JwksFetchError::Io {
        uri: uri.into(),
        reason: e.to_string(),
    };
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| io(&e))?;
    let authority = parsed
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = parsed
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let req = Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| io(&e))?;
    let response = if tls {
        let config = client_tls().map_err(|e| io(&e))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| io(&e))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| io(&e))?;
        send(TokioIo::new(stream), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
    .map_err(|e| io(&e))?;
    if response.status() != http::StatusCode::OK {
        return Err(JwksFetchError::Status {
            uri: uri.into(),
            status: response.status().as_u16(),
        });
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| io(&e))?
        .to_bytes();
    Jwks::parse(&String::from_utf8_lossy(&body)).map_err(|status| JwksFetchError::Jwks {
        uri: uri.into(),
        status,
    })
}

async fn send<I>(
    io: I,
    req: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

/// A TLS client trusting the system roots (`SSL_CERT_FILE`, else the usual bundle paths).
fn client_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let candidates = std::env::var("SSL_CERT_FILE").into_iter().chain(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .map(String::from),
    );
    for path in candidates {
        if let Ok(iter) = CertificateDer::pem_file_iter(&path) {
            for cert in iter.flatten() {
                let _ = roots.add(cert);
            }
            if !roots.is_empty() {
                break;
            }
        }
    }
    if roots.is_empty() {
        return Err("no system root certificates found".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Runs `jwt` on a request whose remote keys are in `cache` (or unavailable): the metadata
/// for the RBAC filters, or Envoy's local reply (401/403, `www-authenticate`).
pub(crate) fn check<B>(
    jwt: &JwtAuthn,
    cache: &JwksCache,
    req: &mut Request<B>,
    tls: bool,
) -> Result<DynamicMetadata, LocalReply> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let lookup = |r: &RemoteJwks| cache.lookup(r);
    let result = {
        let headers = req.headers_mut();
        let mut jr = JwtRequest {
            headers,
            path: &path,
            method: &method,
            now,
        };
        jwt.authenticate(&mut jr, &lookup)
    };
    match result {
        Ok(verified) => {
            if let Some(p) = verified.principal {
                req.extensions_mut().insert(p);
            }
            Ok(DynamicMetadata(verified.metadata))
        }
        Err(status) => {
            let host = authority(req.uri(), req.headers());
            let scheme = req
                .headers()
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_else(|| if tls { "https" } else { "http" }.to_owned());
            let realm = realm_uri(&scheme, &host, &path);
            tracing::debug!(%status, details = %status.details(), "jwt_authn: request refused");
            metrics::counter!("mesh_inbound_jwt_denied_total").increment(1);
            Err(LocalReply {
                status: status.http_status(),
                body: status.to_string().into(),
                location: None,
                www_authenticate: Some(status.www_authenticate(&realm)),
                flags: "-",
                headers: Vec::new(),
            })
        }
    }
}

fn authority(uri: &Uri, headers: &HeaderMap) -> String {
    match uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => headers
            .get(http::header::HOST)
            .and_then(|h: &HeaderValue| h.to_str().ok())
            .unwrap_or("")
            .to_owned(),
    }
}
