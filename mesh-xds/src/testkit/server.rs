//! The testkit ADS server: per-stream delta and SotW engines over the model's resources.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::ca::TestCa;
use super::model::{MeshModel, ResourceSet};
use crate::ads::types::is_wildcard;

/// What happened on the control plane's streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdsEvent {
    /// A stream's first request arrived.
    StreamOpened {
        /// `node.id`.
        node_id: String,
        /// Delta or SotW.
        delta: bool,
        /// `initial_resource_versions` sizes per type in the first request of each type
        /// (delta only; reported in [`XdsEvent::Subscribed`]).
        authorization: Option<String>,
    },
    /// A client subscribed to a type for the first time on a stream.
    Subscribed {
        /// Type URL.
        type_url: String,
        /// Names in the delta `initial_resource_versions`.
        initial_resource_versions: BTreeMap<String, String>,
    },
    /// ACK.
    Ack {
        /// Type URL.
        type_url: String,
        /// SotW version (empty for delta).
        version: String,
        /// Nonce.
        nonce: String,
    },
    /// NACK.
    Nack {
        /// Type URL.
        type_url: String,
        /// Nonce.
        nonce: String,
        /// `error_detail.message`.
        message: String,
    },
    /// A stream ended.
    StreamClosed,
    /// A response was sent (including injected ones).
    Sent {
        /// Type URL.
        type_url: String,
        /// Its nonce.
        nonce: String,
        /// Names of the resources it carried (SotW: as the testkit keys them).
        names: Vec<String>,
    },
    /// A request arrived (every one, ACK, NACK or subscription change).
    Request {
        /// Type URL.
        type_url: String,
        /// `response_nonce`.
        response_nonce: String,
        /// Whether it carried `error_detail`.
        nack: bool,
    },
}

/// A response sent as given, outside the streams' own bookkeeping.
#[derive(Clone, Debug)]
pub(crate) struct Injected {
    pub type_url: String,
    pub resources: Vec<(String, Any)>,
    pub nonce: String,
}

pub(crate) struct Shared {
    pub model: Mutex<MeshModel>,
    pub fixed: Mutex<Option<ResourceSet>>,
    pub raw: Mutex<BTreeMap<String, BTreeMap<String, Any>>>,
    pub held: Mutex<BTreeMap<String, BTreeSet<String>>>,
    pub inject: broadcast::Sender<Injected>,
    pub generation: watch::Sender<u64>,
    pub cut: watch::Sender<u64>,
    pub events: broadcast::Sender<XdsEvent>,
    pub nonce: AtomicU64,
    /// Abort the stream that sends the next push, right after sending it.
    pub cut_after_push: AtomicBool,
    pub ca: Option<TestCa>,
    pub require_token: bool,
    pub serve: ServeOptions,
}

/// What the served resource sets get done to them for a real Envoy client.
#[derive(Default)]
pub(crate) struct ServeOptions {
    pub bind_loopback: bool,
    pub strip_istio_proxy_extensions: bool,
    /// SDS secrets added to every set (empty: none).
    pub secrets: BTreeMap<String, Any>,
}

impl Shared {
    pub(crate) fn resources(&self, ns: &str) -> ResourceSet {
        let fixed = self.fixed.lock().ok().and_then(|f| f.clone());
        let mut set = match fixed {
            Some(set) => set,
            None => self
                .model
                .lock()
                .map(|m| m.generate(ns))
                .unwrap_or_default(),
        };
        if let Ok(raw) = self.raw.lock() {
            for (t, items) in raw.iter() {
                if let Some(k) = set.keys().find(|k| **k == t.as_str()).copied() {
                    let entry = set.entry(k).or_default();
                    for (n, a) in items {
                        entry.insert(n.clone(), a.clone());
                    }
                }
            }
        }
        if let Ok(held) = self.held.lock() {
            for (t, names) in held.iter() {
                if let Some(items) = set
                    .iter_mut()
                    .find(|(k, _)| **k == t.as_str())
                    .map(|(_, v)| v)
                {
                    items.retain(|n, _| !names.contains(n));
                }
            }
        }
        if self.serve.bind_loopback {
            super::envoy::bind_loopback(&mut set);
        }
        if self.serve.strip_istio_proxy_extensions {
            super::envoy::strip_istio_proxy_extensions(&mut set);
        }
        if !self.serve.secrets.is_empty() {
            set.entry(crate::dump::SECRET)
                .or_default()
                .extend(self.serve.secrets.clone());
        }
        set
    }

    fn emit_request(&self, type_url: &str, nonce: &str, nack: bool) {
        self.emit(XdsEvent::Request {
            type_url: type_url.to_owned(),
            response_nonce: nonce.to_owned(),
            nack,
        });
    }

    fn emit_sent(&self, type_url: &str, nonce: &str, names: Vec<String>) {
        self.emit(XdsEvent::Sent {
            type_url: type_url.to_owned(),
            nonce: nonce.to_owned(),
            names,
        });
    }

    fn nonce(&self) -> String {
        format!("n{}", self.nonce.fetch_add(1, Ordering::Relaxed))
    }

    fn emit(&self, e: XdsEvent) {
        let _ = self.events.send(e);
    }

    fn check_auth<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if self.require_token {
            let ca = self
                .ca
                .as_ref()
                .ok_or_else(|| Status::internal("no CA to check tokens"))?;
            let token = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
            ca.authenticate(token).map_err(Status::unauthenticated)?;
        }
        Ok(auth)
    }
}

fn version_of(a: &Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.value.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn namespace_of(node: &envoy_types::pb::envoy::config::core::v3::Node) -> String {
    crate::node::metadata_string(node, "NAMESPACE")
        .map(str::to_owned)
        .or_else(|| {
            node.id
                .split('~')
                .nth(2)
                .and_then(|p| p.split('.').nth(1))
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

pub(crate) struct Ads(pub Arc<Shared>);

type RespStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let auth = self.0.check_auth(&req)?;
        let (tx, rx) = mpsc::channel(64);
        let shared = self.0.clone();
        tokio::spawn(async move {
            let r = run_stream::<Sotw>(shared.clone(), req.into_inner(), tx.clone(), auth).await;
            if let Err(s) = r {
                let _ = tx.send(Err(s)).await;
            }
            shared.emit(XdsEvent::StreamClosed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let auth = self.0.check_auth(&req)?;
        let (tx, rx) = mpsc::channel(64);
        let shared = self.0.clone();
        tokio::spawn(async move {
            let r = run_stream::<Delta>(shared.clone(), req.into_inner(), tx.clone(), auth).await;
            if let Err(s) = r {
                let _ = tx.send(Err(s)).await;
            }
            shared.emit(XdsEvent::StreamClosed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// istio-agent's SDS on the same port: the same SotW and delta engines as ADS, over the
/// resources' `Secret` type (a client asks for names, as over ADS).
#[tonic::async_trait]
impl SecretDiscoveryService for Ads {
    type DeltaSecretsStream = RespStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = RespStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        AggregatedDiscoveryService::delta_aggregated_resources(self, req).await
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        AggregatedDiscoveryService::stream_aggregated_resources(self, req).await
    }

    async fn fetch_secrets(
        &self,
        _req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "FetchSecrets: use StreamSecrets or DeltaSecrets",
        ))
    }
}

/// What differs between the state-of-the-world and the incremental (delta) protocol;
/// [`run_stream`] is everything they share.
trait XdsVariant: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// What the stream remembers per type URL.
    type State: Default + Send;
    const DELTA: bool;
    fn node(req: &Self::Request) -> Option<&Node>;
    /// Records one request (ACK, NACK, subscription change) and answers it when it needs an
    /// answer now.
    fn on_request(
        shared: &Shared,
        ns: &str,
        types: &mut BTreeMap<String, Self::State>,
        req: Self::Request,
    ) -> Option<Self::Response>;
    /// The response that brings one type up to `set`, if it changed (or always with `force`).
    fn respond(
        shared: &Shared,
        t: &str,
        st: &mut Self::State,
        set: &ResourceSet,
        force: bool,
    ) -> Option<Self::Response>;
    /// A test-injected response, sent as it is.
    fn injected(i: Injected) -> Self::Response;
}

/// One ADS/SDS stream: opens it with the first request's node, answers requests, pushes
/// every new generation, sends injected responses and obeys the test's cuts.
async fn run_stream<V: XdsVariant>(
    shared: Arc<Shared>,
    mut inbound: Streaming<V::Request>,
    tx: mpsc::Sender<Result<V::Response, Status>>,
    authorization: Option<String>,
) -> Result<(), Status> {
    let mut gen_rx = shared.generation.subscribe();
    let mut cut_rx = shared.cut.subscribe();
    let mut inj_rx = shared.inject.subscribe();
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    let ns = open_stream(&shared, V::node(&first), V::DELTA, authorization)?;
    let mut types: BTreeMap<String, V::State> = BTreeMap::new();
    let mut next = Some(first);
    loop {
        if let Some(req) = next.take()
            && let Some(r) = V::on_request(&shared, &ns, &mut types, req)
        {
            tx.send(Ok(r))
                .await
                .map_err(|_| Status::cancelled("client gone"))?;
        }
        tokio::select! {
            m = inbound.message() => match m? {
                Some(r) => next = Some(r),
                None => return Ok(()),
            },
            c = gen_rx.changed() => {
                if c.is_err() { return Ok(()) }
                let set = shared.resources(&ns);
                let mut pushed = false;
                for (t, st) in types.iter_mut() {
                    if let Some(r) = V::respond(&shared, t, st, &set, false) {
                        tx.send(Ok(r)).await.map_err(|_| Status::cancelled("client gone"))?;
                        pushed = true;
                    }
                }
                if pushed && shared.cut_after_push.swap(false, Ordering::SeqCst) {
                    return Err(Status::unavailable("stream cut by the test control plane after a push"));
                }
            }
            i = inj_rx.recv() => {
                if let Ok(i) = i {
                    shared.emit_sent(&i.type_url, &i.nonce, i.resources.iter().map(|(n, _)| n.clone()).collect());
                    tx.send(Ok(V::injected(i))).await.map_err(|_| Status::cancelled("client gone"))?;
                }
            }
            _ = cut_rx.changed() => return Err(Status::unavailable("stream cut by the test control plane")),
        }
    }
}

/// The incremental protocol (`DeltaAggregatedResources`, `DeltaSecrets`).
struct Delta;

#[derive(Default)]
struct DeltaType {
    wildcard: bool,
    names: BTreeSet<String>,
    sent: HashMap<String, String>,
}

impl XdsVariant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type State = DeltaType;
    const DELTA: bool = true;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn on_request(
        shared: &Shared,
        ns: &str,
        types: &mut BTreeMap<String, DeltaType>,
        req: DeltaDiscoveryRequest,
    ) -> Option<DeltaDiscoveryResponse> {
        let t = req.type_url.clone();
        shared.emit_request(&t, &req.response_nonce, req.error_detail.is_some());
        if let Some(e) = &req.error_detail {
            shared.emit(XdsEvent::Nack {
                type_url: t.clone(),
                nonce: req.response_nonce.clone(),
                message: e.message.clone(),
            });
        } else if !req.response_nonce.is_empty() {
            shared.emit(XdsEvent::Ack {
                type_url: t.clone(),
                version: String::new(),
                nonce: req.response_nonce.clone(),
            });
        }
        let initial = !types.contains_key(&t);
        let st = types.entry(t.clone()).or_default();
        if initial {
            st.wildcard = is_wildcard(&t) && req.resource_names_subscribe.is_empty();
            st.sent = req.initial_resource_versions.clone();
            shared.emit(XdsEvent::Subscribed {
                type_url: t.clone(),
                initial_resource_versions: req
                    .initial_resource_versions
                    .clone()
                    .into_iter()
                    .collect(),
            });
        }
        let subscribing = !req.resource_names_subscribe.is_empty();
        st.names
            .extend(req.resource_names_subscribe.iter().cloned());
        for n in &req.resource_names_unsubscribe {
            st.names.remove(n);
            st.sent.remove(n);
        }
        if initial || subscribing {
            let set = shared.resources(ns);
            return Self::respond(shared, &t, st, &set, initial);
        }
        None
    }

    fn respond(
        shared: &Shared,
        t: &str,
        st: &mut DeltaType,
        set: &ResourceSet,
        force: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut resources = Vec::new();
        let mut current = BTreeSet::new();
        for (name, any) in resources_of(set, t) {
            if !(st.wildcard || st.names.contains(name)) {
                continue;
            }
            current.insert(name.clone());
            let v = version_of(any);
            if st.sent.get(name) != Some(&v) {
                st.sent.insert(name.clone(), v.clone());
                resources.push(Resource {
                    name: name.clone(),
                    version: v,
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = st
            .sent
            .keys()
            .filter(|n| !current.contains(*n))
            .cloned()
            .collect();
        for n in &removed {
            st.sent.remove(n);
        }
        if resources.is_empty() && removed.is_empty() && !force {
            return None;
        }
        let nonce = shared.nonce();
        shared.emit_sent(
            t,
            &nonce,
            resources.iter().map(|r| r.name.clone()).collect(),
        );
        Some(DeltaDiscoveryResponse {
            system_version_info: shared.generation.borrow().to_string(),
            resources,
            type_url: t.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }

    fn injected(i: Injected) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: "injected".into(),
            resources: i
                .resources
                .into_iter()
                .map(|(name, any)| Resource {
                    version: version_of(&any),
                    name,
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            type_url: i.type_url,
            nonce: i.nonce,
            ..Default::default()
        }
    }
}

/// The resources of type `t` in `set` (none when the set has no such type).
fn resources_of<'a>(set: &'a ResourceSet, t: &str) -> impl Iterator<Item = (&'a String, &'a Any)> {
    set.iter()
        .find(|(k, _)| **k == t)
        .into_iter()
        .flat_map(|(_, v)| v.iter())
}

/// The first request of a stream must carry the node (istiod answers `InvalidArgument
/// "missing node information"` otherwise); announces the stream and returns the client's
/// namespace, which selects what is generated for it.
fn open_stream(
    shared: &Shared,
    node: Option<&Node>,
    delta: bool,
    authorization: Option<String>,
) -> Result<String, Status> {
    let node = node
        .filter(|n| !n.id.is_empty())
        .ok_or_else(|| Status::invalid_argument("missing node information"))?;
    shared.emit(XdsEvent::StreamOpened {
        node_id: node.id.clone(),
        delta,
        authorization,
    });
    Ok(namespace_of(node))
}

/// The state-of-the-world protocol (`StreamAggregatedResources`, `StreamSecrets`).
struct Sotw;

#[derive(Default)]
struct SotwType {
    names: Vec<String>,
    last_nonce: String,
    last_sent: Option<Vec<(String, String)>>,
}

impl XdsVariant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type State = SotwType;
    const DELTA: bool = false;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn on_request(
        shared: &Shared,
        ns: &str,
        types: &mut BTreeMap<String, SotwType>,
        req: DiscoveryRequest,
    ) -> Option<DiscoveryResponse> {
        let t = req.type_url.clone();
        shared.emit_request(&t, &req.response_nonce, req.error_detail.is_some());
        let initial = !types.contains_key(&t);
        let st = types.entry(t.clone()).or_default();
        if let Some(e) = &req.error_detail {
            shared.emit(XdsEvent::Nack {
                type_url: t.clone(),
                nonce: req.response_nonce.clone(),
                message: e.message.clone(),
            });
        } else if !req.response_nonce.is_empty() && req.response_nonce == st.last_nonce {
            shared.emit(XdsEvent::Ack {
                type_url: t.clone(),
                version: req.version_info.clone(),
                nonce: req.response_nonce.clone(),
            });
        }
        if initial {
            shared.emit(XdsEvent::Subscribed {
                type_url: t.clone(),
                initial_resource_versions: BTreeMap::new(),
            });
        }
        let names_changed = st.names != req.resource_names;
        st.names = req.resource_names.clone();
        if req.error_detail.is_none() && (initial || req.response_nonce.is_empty() || names_changed)
        {
            let set = shared.resources(ns);
            return Self::respond(shared, &t, st, &set, true);
        }
        None
    }

    fn respond(
        shared: &Shared,
        t: &str,
        st: &mut SotwType,
        set: &ResourceSet,
        force: bool,
    ) -> Option<DiscoveryResponse> {
        let wildcard = is_wildcard(t);
        let chosen: Vec<(&String, &Any)> = resources_of(set, t)
            .filter(|(n, _)| wildcard || st.names.contains(n))
            .collect();
        let fingerprint: Vec<(String, String)> = chosen
            .iter()
            .map(|(n, a)| ((*n).clone(), version_of(a)))
            .collect();
        if !force && st.last_sent.as_ref() == Some(&fingerprint) {
            return None;
        }
        st.last_nonce = shared.nonce();
        shared.emit_sent(
            t,
            &st.last_nonce,
            fingerprint.iter().map(|(n, _)| n.clone()).collect(),
        );
        st.last_sent = Some(fingerprint);
        Some(DiscoveryResponse {
            version_info: shared.generation.borrow().to_string(),
            resources: chosen.into_iter().map(|(_, a)| a.clone()).collect(),
            type_url: t.to_owned(),
            nonce: st.last_nonce.clone(),
            ..Default::default()
        })
    }

    fn injected(i: Injected) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: "injected".into(),
            resources: i.resources.into_iter().map(|(_, a)| a).collect(),
            type_url: i.type_url,
            nonce: i.nonce,
            ..Default::default()
        }
    }
}

/// Starts serving on `listen`; returns the address and a shutdown handle.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tls: Option<(String, String)>,
    listen: SocketAddr,
) -> Result<(SocketAddr, oneshot::Sender<()>), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some((chain, key)) = tls {
        let identity = tonic::transport::Identity::from_pem(chain, key);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        // Like istiod's :15012: a client certificate from the mesh's root is optional and,
        // when present, authenticates the caller to the CA (PROV_CERT on VMs).
        if let Some(ca) = &shared.ca {
            config = config
                .client_ca_root(tonic::transport::Certificate::from_pem(ca.root_pem()))
                .client_auth_optional(true);
        }
        builder = builder.tls_config(config).map_err(std::io::Error::other)?;
    }
    let ca = shared.ca.as_ref().map(|c| c.service());
    let router = builder
        .add_service(
            AggregatedDiscoveryServiceServer::new(Ads(shared.clone()))
                .max_decoding_message_size(256 * 1024 * 1024),
        )
        .add_service(SecretDiscoveryServiceServer::new(Ads(shared)))
        .add_optional_service(ca);
    tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "testkit control plane stopped");
        }
    });
    Ok((addr, stop_tx))
}
