//! An SDS client over a Unix socket: `StreamSecrets` for `default` (key + chain) and `ROOTCA`
//! (trust bundle), the two names every istiod-generated TLS context refers to, served by
//! SPIRE's agent or an istio-agent at `./var/run/secrets/workload-spiffe-uds/socket`.
//!
//! Each response is ACKed (`version_info` + nonce) and installed into the [`CertStore`] once
//! both secrets are known; a response that does not parse is NACKed (`error_detail`, code
//! INTERNAL) and the current certificate stays. The stream is reopened with backoff when the
//! server goes away; the store keeps the last good certificate meanwhile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::{DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use hyper_util::rt::TokioIo;
use mesh_core::CertStore;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{
    SDS_DEFAULT_RESOURCE, SDS_ROOT_RESOURCE, SECRET_UPDATES_METRIC, SecretError,
    workload_certificate_from_pem,
};

/// Type URL of SDS secrets.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// gRPC code in a NACK's `error_detail` (INTERNAL), as Envoy sends it.
const NACK_CODE: i32 = 13;

/// Connects a tonic channel to a gRPC server on a Unix socket.
pub async fn connect_unix(socket: &Path) -> Result<Channel, SecretError> {
    let path = socket.to_owned();
    // The URI is required by tonic but unused: the connector ignores it.
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| SecretError::Sds {
            socket: socket.display().to_string(),
            reason: format!("connect: {e}"),
        })
}

/// Streams `default` and `ROOTCA` from an SDS server into a [`CertStore`].
#[derive(Debug, Clone)]
pub struct SdsClient {
    socket: PathBuf,
    node_id: String,
    store: CertStore,
    initial_backoff: Duration,
    max_backoff: Duration,
}

/// The PEM material received so far on one stream.
#[derive(Default)]
struct Received {
    chain: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    roots: Option<Vec<u8>>,
}

impl SdsClient {
    /// A client of the SDS server at `socket`, identifying as `node_id` (the sidecar's
    /// `node.id`; istio-agent's SDS server requires a node on the first request).
    pub fn new(socket: impl Into<PathBuf>, node_id: impl Into<String>, store: CertStore) -> Self {
        SdsClient {
            socket: socket.into(),
            node_id: node_id.into(),
            store,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// Overrides the reconnect backoff (default 500ms doubling to 30s).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.initial_backoff);
        self
    }

    /// The store certificates are written to.
    pub fn store(&self) -> &CertStore {
        &self.store
    }

    /// Runs forever: streams secrets, reopening the stream with backoff when it ends.
    pub async fn run(self) {
        let mut backoff = self.initial_backoff;
        loop {
            match self.stream_once().await {
                Ok(got_any) => {
                    tracing::info!(socket = %self.socket.display(), "SDS stream closed by the server; reconnecting");
                    if got_any {
                        backoff = self.initial_backoff;
                    }
                }
                Err((error, got_any)) => {
                    tracing::warn!(%error, retry_in = ?backoff, "SDS stream failed; keeping the current workload certificate");
                    if got_any {
                        backoff = self.initial_backoff;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    fn request(&self, version: &str, nonce: &str, error: Option<String>) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_owned(),
            node: Some(Node {
                id: self.node_id.clone(),
                ..Default::default()
            }),
            resource_names: vec![SDS_DEFAULT_RESOURCE.into(), SDS_ROOT_RESOURCE.into()],
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.to_owned(),
            error_detail: error.map(|message| RpcStatus {
                code: NACK_CODE,
                message,
                details: vec![],
            }),
            ..Default::default()
        }
    }

    fn sds_error(&self, reason: impl std::fmt::Display) -> SecretError {
        SecretError::Sds {
            socket: self.socket.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// One stream: subscribe, then install/ACK or NACK every response until the stream ends.
    /// Returns whether any response was accepted (`Err` carries it too).
    pub async fn stream_once(&self) -> Result<bool, (SecretError, bool)> {
        let channel = connect_unix(&self.socket).await.map_err(|e| (e, false))?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        // Cannot fail: the receiver is alive.
        let _ = tx.send(self.request("", "", None)).await;
        let mut responses = client
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .map_err(|s| {
                (
                    self.sds_error(format!("StreamSecrets: {}", s.message())),
                    false,
                )
            })?
            .into_inner();
        let mut received = Received::default();
        let mut accepted_any = false;
        let mut accepted_version = String::new();
        loop {
            let response = match responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(accepted_any),
                Err(status) => {
                    return Err((
                        self.sds_error(format!(
                            "stream: {} ({:?})",
                            status.message(),
                            status.code()
                        )),
                        accepted_any,
                    ));
                }
            };
            let reply = match self.apply(&response, &mut received) {
                Ok(()) => {
                    accepted_any = true;
                    accepted_version = response.version_info.clone();
                    self.request(&response.version_info, &response.nonce, None)
                }
                Err(error) => {
                    tracing::warn!(%error, version = %response.version_info, "NACKing SDS response");
                    metrics::counter!(SECRET_UPDATES_METRIC, "source" => "sds", "result" => "failure")
                        .increment(1);
                    self.request(&accepted_version, &response.nonce, Some(error.to_string()))
                }
            };
            if tx.send(reply).await.is_err() {
                return Ok(accepted_any);
            }
        }
    }

    fn apply(
        &self,
        response: &DiscoveryResponse,
        received: &mut Received,
    ) -> Result<(), SecretError> {
        if response.type_url != SECRET_TYPE_URL {
            return Err(SecretError::Invalid {
                what: "SDS response",
                reason: format!("unexpected type URL {:?}", response.type_url),
            });
        }
        // Parse the whole response before changing anything (a NACK changes nothing).
        let mut next = Received {
            chain: received.chain.clone(),
            key: received.key.clone(),
            roots: received.roots.clone(),
        };
        for any in &response.resources {
            let secret =
                Secret::decode(any.value.as_slice()).map_err(|e| SecretError::Invalid {
                    what: "SDS response",
                    reason: format!("resource is not a Secret: {e}"),
                })?;
            match (secret.name.as_str(), secret.r#type) {
                (SDS_DEFAULT_RESOURCE, Some(secret::Type::TlsCertificate(tls))) => {
                    next.chain = Some(data(
                        tls.certificate_chain.as_ref(),
                        "secret default certificate_chain",
                    )?);
                    next.key = Some(data(
                        tls.private_key.as_ref(),
                        "secret default private_key",
                    )?);
                }
                (SDS_ROOT_RESOURCE, Some(secret::Type::ValidationContext(vc))) => {
                    next.roots = Some(data(vc.trusted_ca.as_ref(), "secret ROOTCA trusted_ca")?);
                }
                (name @ (SDS_DEFAULT_RESOURCE | SDS_ROOT_RESOURCE), _) => {
                    return Err(SecretError::Invalid {
                        what: "SDS response",
                        reason: format!("secret {name:?} has the wrong type"),
                    });
                }
                (other, _) => {
                    tracing::debug!(name = other, "ignoring unrequested SDS secret");
                }
            }
        }
        if let (Some(chain), Some(key), Some(roots)) = (&next.chain, &next.key, &next.roots) {
            let cert = workload_certificate_from_pem(chain, key, roots)?;
            tracing::info!(
                socket = %self.socket.display(),
                identity = %cert.identity,
                not_after = ?cert.not_after,
                roots = cert.roots.len(),
                version = %response.version_info,
                "workload certificate from SDS"
            );
            metrics::counter!(SECRET_UPDATES_METRIC, "source" => "sds", "result" => "success")
                .increment(1);
            self.store.set(cert);
        }
        *received = next;
        Ok(())
    }
}

fn data(source: Option<&DataSource>, what: &'static str) -> Result<Vec<u8>, SecretError> {
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(Specifier::Filename(path)) => std::fs::read(path).map_err(|source| SecretError::Io {
            path: path.clone(),
            source,
        }),
        Some(Specifier::EnvironmentVariable(name)) => std::env::var(name)
            .map(String::into_bytes)
            .map_err(|_| SecretError::Invalid {
                what,
                reason: format!("environment variable {name} is not set"),
            }),
        None => Err(SecretError::Invalid {
            what,
            reason: "missing".into(),
        }),
    }
}
