//! A real SDS server on a Unix socket for tests (feature `testkit`): serves `default` and
//! `ROOTCA` the way istio-agent's and SPIRE's SDS servers do, pushes updates to every open
//! stream, and records the requests (ACKs and NACKs) it receives.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::DataSource;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::sds::SECRET_TYPE_URL;
use super::{SDS_DEFAULT_RESOURCE, SDS_ROOT_RESOURCE};

/// What the server currently serves.
#[derive(Clone, Debug, Default)]
struct Served {
    version: u64,
    /// `default`: (chain PEM, key PEM).
    default: Option<(Vec<u8>, Vec<u8>)>,
    /// `ROOTCA`: roots PEM.
    roots: Option<Vec<u8>>,
}

/// One request the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdsRequestRecord {
    /// `node.id` (empty when absent).
    pub node_id: String,
    /// `resource_names`.
    pub resource_names: Vec<String>,
    /// `version_info`.
    pub version_info: String,
    /// `response_nonce`.
    pub response_nonce: String,
    /// `error_detail.message` for a NACK.
    pub error: Option<String>,
}

#[derive(Clone)]
struct Service {
    served: watch::Receiver<Served>,
    requests: Arc<Mutex<Vec<SdsRequestRecord>>>,
}

/// A running SDS server on a Unix socket; stops when dropped.
#[derive(Debug)]
pub struct TestSdsServer {
    socket: PathBuf,
    served: watch::Sender<Served>,
    requests: Arc<Mutex<Vec<SdsRequestRecord>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestSdsServer {
    /// Binds `socket` (its directory is created) and serves until dropped.
    pub fn start(socket: &Path) -> std::io::Result<TestSdsServer> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)?;
        let (served, rx) = watch::channel(Served::default());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let service = Service {
            served: rx,
            requests: requests.clone(),
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(SecretDiscoveryServiceServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop.await;
                })
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "test SDS server stopped");
            }
        });
        Ok(TestSdsServer {
            socket: socket.to_owned(),
            served,
            requests,
            shutdown: Some(shutdown),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serves `default` (chain and key PEM) and `ROOTCA` (roots PEM) in one push.
    pub fn set_secrets(&self, chain_pem: &[u8], key_pem: &[u8], roots_pem: &[u8]) {
        self.served.send_modify(|s| {
            s.version += 1;
            s.default = Some((chain_pem.to_vec(), key_pem.to_vec()));
            s.roots = Some(roots_pem.to_vec());
        });
    }

    /// Serves a new `default` only (rotation without a root change).
    pub fn set_default(&self, chain_pem: &[u8], key_pem: &[u8]) {
        self.served.send_modify(|s| {
            s.version += 1;
            s.default = Some((chain_pem.to_vec(), key_pem.to_vec()));
        });
    }

    /// Serves a new `ROOTCA` only (trust bundle change).
    pub fn set_roots(&self, roots_pem: &[u8]) {
        self.served.send_modify(|s| {
            s.version += 1;
            s.roots = Some(roots_pem.to_vec());
        });
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<SdsRequestRecord> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops serving (open streams end).
    pub fn stop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for TestSdsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

fn response(served: &Served, names: &[String]) -> DiscoveryResponse {
    let mut resources = Vec::new();
    for name in names {
        let secret = match name.as_str() {
            SDS_DEFAULT_RESOURCE => served.default.as_ref().map(|(chain, key)| Secret {
                name: name.clone(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(chain),
                    private_key: inline(key),
                    ..Default::default()
                })),
            }),
            SDS_ROOT_RESOURCE => served.roots.as_ref().map(|roots| Secret {
                name: name.clone(),
                r#type: Some(secret::Type::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: inline(roots),
                        ..Default::default()
                    },
                )),
            }),
            _ => None,
        };
        if let Some(secret) = secret {
            resources.push(Any {
                type_url: SECRET_TYPE_URL.into(),
                value: secret.encode_to_vec(),
            });
        }
    }
    DiscoveryResponse {
        version_info: served.version.to_string(),
        resources,
        type_url: SECRET_TYPE_URL.into(),
        nonce: format!("nonce-{}", served.version),
        ..Default::default()
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type DeltaSecretsStream = Stream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Stream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "the test SDS server speaks StreamSecrets only",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let mut served = self.served.clone();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            let mut names: Vec<String> = Vec::new();
            let mut first = true;
            loop {
                tokio::select! {
                    msg = incoming.message() => {
                        let Ok(Some(req)) = msg else { return };
                        if first && req.node.as_ref().is_none_or(|n| n.id.is_empty()) {
                            let _ = tx.send(Err(Status::invalid_argument("missing node information"))).await;
                            return;
                        }
                        if let Ok(mut r) = requests.lock() {
                            r.push(SdsRequestRecord {
                                node_id: req.node.as_ref().map(|n| n.id.clone()).unwrap_or_default(),
                                resource_names: req.resource_names.clone(),
                                version_info: req.version_info.clone(),
                                response_nonce: req.response_nonce.clone(),
                                error: req.error_detail.as_ref().map(|e| e.message.clone()),
                            });
                        }
                        let names_changed = req.resource_names != names;
                        names = req.resource_names;
                        if first || names_changed {
                            first = false;
                            let current = served.borrow_and_update().clone();
                            if current.version > 0 && tx.send(Ok(response(&current, &names))).await.is_err() {
                                return;
                            }
                        }
                    }
                    changed = served.changed() => {
                        if changed.is_err() { return; }
                        if first { continue; }
                        let current = served.borrow_and_update().clone();
                        if tx.send(Ok(response(&current, &names))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        let current = self.served.borrow().clone();
        Ok(Response::new(response(&current, &req.resource_names)))
    }
}
