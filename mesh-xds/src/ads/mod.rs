//! The ADS client: one stream to istiod carrying CDS → EDS → LDS → RDS (+ NDS), delta
//! (`DeltaAggregatedResources`, istiod's default) or state-of-the-world
//! (`StreamAggregatedResources`), with per-resource validation, ACK/NACK, and reconnection
//! with jittered exponential backoff.
//!
//! Responses already received are applied together and one whole [`mesh_core::Snapshot`] is
//! then published to the [`SnapshotCell`], before their ACKs leave. Clusters and listeners warm
//! as in Envoy: a new or changed EDS cluster is used only once its `ClusterLoadAssignment` is
//! held, an HTTP listener only once its `RouteConfiguration` is, or when
//! [`AdsConfig::initial_fetch_timeout`] expires (then without it: no endpoints, or no route
//! configuration); meanwhile the previous version keeps serving, so no snapshot is ever
//! half-applied. The cell is marked synced once CDS and LDS have each been ACKed and everything
//! has warmed.
//!
//! Requests wait in a queue holding at most one request per type ([`RequestQueueStats`]):
//! a flood of pushes is coalesced, never queued without bound.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures_util::{FutureExt, StreamExt};
use mesh_core::config::ControlPlaneAddress;
use mesh_core::{NodeIdentity, SnapshotCell};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

mod outbox;
mod retained;
pub(crate) mod state;
pub mod types;

use outbox::Outbox;
pub use outbox::RequestQueueStats;
pub use retained::{ConfigDumpSource, RetainedResource, RetainedResources};
use state::{Incoming, XdsState};
pub use types::{CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE};

/// gRPC code Envoy puts in a NACK's `error_detail` (INTERNAL).
const NACK_CODE: i32 = 13;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// At most this many already-received responses are applied before a snapshot is published.
const MAX_BATCH: usize = 64;

/// How to reach istiod and who we are.
#[derive(Clone, Debug)]
pub struct AdsConfig {
    /// istiod's xDS address (plaintext like :15010, or TLS like :15012).
    pub address: ControlPlaneAddress,
    /// The workload's identity; becomes the `Node`.
    pub node: NodeIdentity,
    /// JWT sent as `authorization: Bearer <token>`, re-read on every connect.
    pub token_path: Option<PathBuf>,
    /// Use delta xDS (istiod's default) rather than state-of-the-world.
    pub delta: bool,
    /// Extra gRPC metadata (`XDS_HEADER_*`).
    pub headers: Vec<(String, String)>,
    /// How long a new or changed cluster waits for its endpoints, and a listener for its
    /// route configuration, before it is used without them (Envoy's `initial_fetch_timeout`,
    /// default [`AdsConfig::DEFAULT_INITIAL_FETCH_TIMEOUT`]).
    pub initial_fetch_timeout: Duration,
}

impl AdsConfig {
    /// Envoy's default `initial_fetch_timeout`: 15 s.
    pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

    /// Delta xDS (istiod's default) to `address` as `node`, no token, no extra headers, the
    /// default initial fetch timeout.
    pub fn new(address: ControlPlaneAddress, node: NodeIdentity) -> Self {
        AdsConfig {
            address,
            node,
            token_path: None,
            delta: true,
            headers: Vec::new(),
            initial_fetch_timeout: Self::DEFAULT_INITIAL_FETCH_TIMEOUT,
        }
    }
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
pub enum AdsError {
    /// Could not build or open the channel.
    #[error("connecting to {address}: {source}")]
    Connect {
        /// The address.
        address: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The configuration cannot work (bad root file, bad header, unreadable token).
    #[error("xDS client configuration: {0}")]
    Config(String),
    /// The server ended the stream or refused it.
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
    /// The server closed the stream without an error.
    #[error("xDS stream closed by the server")]
    Closed,
}

/// The ADS client. Build it with [`AdsClient::new`] and drive it with [`AdsClient::run`].
#[derive(Debug)]
pub struct AdsClient {
    config: AdsConfig,
    cell: SnapshotCell,
    state: XdsState,
    node: Node,
    queue: RequestQueueStats,
    /// Something changed since the last published snapshot.
    dirty: bool,
}

/// What the client has asked for on the current stream.
#[derive(Default)]
struct StreamSubs {
    node_sent: bool,
    requested: BTreeSet<&'static str>,
    endpoints: BTreeSet<String>,
    routes: BTreeSet<String>,
    /// SotW: last nonce seen per type.
    nonces: BTreeMap<&'static str, String>,
    cds_answered: bool,
    delivered: bool,
}

enum Sender {
    Delta(Outbox<DeltaDiscoveryRequest>),
    Sotw(Outbox<DiscoveryRequest>),
}

impl Sender {
    fn hold(&self) {
        match self {
            Sender::Delta(o) => o.hold(),
            Sender::Sotw(o) => o.hold(),
        }
    }

    fn release(&self) {
        match self {
            Sender::Delta(o) => o.release(),
            Sender::Sotw(o) => o.release(),
        }
    }

    fn close(&self) {
        match self {
            Sender::Delta(o) => o.close(),
            Sender::Sotw(o) => o.close(),
        }
    }
}

impl AdsClient {
    /// A client that publishes into `cell`.
    pub fn new(config: AdsConfig, cell: SnapshotCell) -> Self {
        let node = crate::node::envoy_node(&config.node);
        let state = XdsState {
            initial_fetch_timeout: config.initial_fetch_timeout,
            ..XdsState::default()
        };
        AdsClient {
            config,
            cell,
            state,
            node,
            queue: RequestQueueStats::default(),
            dirty: false,
        }
    }

    /// Keeps every accepted resource as received, for the admin listener's `/config_dump`,
    /// and returns the handle that renders it. Off unless called: the raw resources cost
    /// about as much memory again as the compiled configuration. Call before
    /// [`AdsClient::run`].
    pub fn retain_config_dump(&mut self) -> ConfigDumpSource {
        let source = self
            .state
            .retained
            .get_or_insert_with(ConfigDumpSource::default)
            .clone();
        source.lock().node = Some(self.node.clone());
        source
    }

    /// A handle on the request queue's depth (pending requests, high-water mark), valid
    /// across reconnects; take it before [`AdsClient::run`].
    pub fn request_queue(&self) -> RequestQueueStats {
        self.queue.clone()
    }

    /// Runs forever: connect, subscribe, apply, and reconnect with jittered exponential
    /// backoff (100ms doubling to 15s, reset after a stream that delivered configuration).
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        loop {
            let mut subs = StreamSubs::default();
            let result = self.run_stream(&mut subs).await;
            metrics::gauge!("envoy_control_plane_connected_state").set(0.0);
            match result {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, address = %self.config.address.address, "xDS stream ended")
                }
            }
            if subs.delivered {
                backoff = BACKOFF_START;
            }
            let jitter = rand::random_range(0.5..1.0);
            self.serving_deadlines(tokio::time::sleep(backoff.mul_f64(jitter)))
                .await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Awaits `fut` while serving warming deadlines: `initial_fetch_timeout` runs from the
    /// moment a cluster or listener starts waiting for its dependency, connected or not (as
    /// Envoy's timer does), so a warming resource is used without its dependency on time even
    /// while the stream is down or reconnecting.
    async fn serving_deadlines<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            let deadline = self.state.next_deadline();
            let timer = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut fut => return out,
                _ = timer => {
                    if self.state.promote(tokio::time::Instant::now()) {
                        self.state.prune();
                        self.dirty = true;
                    }
                    self.publish_if_dirty();
                }
            }
        }
    }

    async fn channel(address: ControlPlaneAddress) -> Result<Channel, AdsError> {
        let addr = &address;
        let scheme = if addr.tls { "https" } else { "http" };
        let connect_err = |source| AdsError::Connect {
            address: addr.address.clone(),
            source,
        };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{}", addr.address))
            .map_err(connect_err)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if addr.tls {
            let mut tls = ClientTlsConfig::new().domain_name(addr.tls_server_name());
            if let Some(root) = &addr.root_cert {
                let pem = std::fs::read(root).map_err(|e| {
                    AdsError::Config(format!("reading root certificate {}: {e}", root.display()))
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(connect_err)?;
        }
        ep.connect().await.map_err(connect_err)
    }

    fn request<T>(&self, body: T) -> Result<tonic::Request<T>, AdsError> {
        let mut req = tonic::Request::new(body);
        let md = req.metadata_mut();
        if let Some(v) = crate::auth::bearer(self.config.token_path.as_deref())
            .map_err(|e| AdsError::Config(e.to_string()))?
        {
            md.insert("authorization", v);
        }
        let cluster = self
            .config
            .node
            .cluster_id
            .parse()
            .map_err(|_| AdsError::Config("cluster id is not a valid header value".into()))?;
        md.insert("clusterid", cluster);
        for (k, v) in &self.config.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| AdsError::Config(format!("invalid header name {k:?}")))?;
            let val = v
                .parse()
                .map_err(|_| AdsError::Config(format!("invalid value for header {k:?}")))?;
            md.insert(key, val);
        }
        Ok(req)
    }

    async fn run_stream(&mut self, subs: &mut StreamSubs) -> Result<(), AdsError> {
        let channel = self
            .serving_deadlines(Self::channel(self.config.address.clone()))
            .await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024);
        if self.config.delta {
            let outbox = Outbox::new(self.queue.clone());
            let sender = Sender::Delta(outbox.clone());
            // Requests are queued before the call so the first one travels with the headers.
            self.subscribe(&sender, subs);
            let req = self.request(outbox.stream())?;
            let mut stream = self
                .serving_deadlines(client.delta_aggregated_resources(req))
                .await?
                .into_inner();
            metrics::gauge!("envoy_control_plane_connected_state").set(1.0);
            tracing::info!(address = %self.config.address.address, "delta xDS stream open");
            let r = self.drive(&mut stream, &sender, subs, Self::on_delta).await;
            sender.close();
            r
        } else {
            let outbox = Outbox::new(self.queue.clone());
            let sender = Sender::Sotw(outbox.clone());
            self.subscribe(&sender, subs);
            let req = self.request(outbox.stream())?;
            let mut stream = self
                .serving_deadlines(client.stream_aggregated_resources(req))
                .await?
                .into_inner();
            metrics::gauge!("envoy_control_plane_connected_state").set(1.0);
            tracing::info!(address = %self.config.address.address, "SotW xDS stream open");
            let r = self.drive(&mut stream, &sender, subs, Self::on_sotw).await;
            sender.close();
            r
        }
    }

    /// Reads responses until the stream ends. Responses already received are applied as one
    /// batch (up to [`MAX_BATCH`]), then one snapshot is published, then the batch's ACKs and
    /// subscription changes leave. Warming deadlines are served in between.
    async fn drive<R>(
        &mut self,
        stream: &mut tonic::Streaming<R>,
        sender: &Sender,
        subs: &mut StreamSubs,
        on: fn(&mut Self, R, &Sender, &mut StreamSubs),
    ) -> Result<(), AdsError> {
        loop {
            let deadline = self.state.next_deadline();
            let timer = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = stream.next() => {
                    let mut next = Some(m.ok_or(AdsError::Closed)?);
                    sender.hold();
                    let mut n = 0;
                    let mut ended = None;
                    while let Some(m) = next.take() {
                        match m {
                            Ok(resp) => on(self, resp, sender, subs),
                            Err(status) => {
                                ended = Some(AdsError::Stream(status));
                                break;
                            }
                        }
                        n += 1;
                        if n >= MAX_BATCH {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(Some(m)) => next = Some(m),
                            Some(None) => {
                                ended = Some(AdsError::Closed);
                                break;
                            }
                            None => {}
                        }
                    }
                    self.publish_if_dirty();
                    sender.release();
                    if let Some(e) = ended {
                        return Err(e);
                    }
                }
                _ = timer => {
                    if self.state.promote(tokio::time::Instant::now()) {
                        self.state.prune();
                        self.dirty = true;
                    }
                    sender.hold();
                    self.publish_if_dirty();
                    self.subscribe(sender, subs);
                    sender.release();
                }
            }
        }
    }

    /// Publishes a snapshot when something changed, or when the first full configuration
    /// just became complete.
    fn publish_if_dirty(&mut self) {
        let synced = self.state.synced();
        if !(self.dirty || (synced && !self.cell.is_synced())) {
            return;
        }
        self.dirty = false;
        if let Some(r) = &self.state.retained {
            let mut r = r.lock();
            r.type_versions.clone_from(&self.state.type_versions);
            r.warming = self
                .state
                .warming_clusters
                .keys()
                .chain(self.state.warming_listeners.keys())
                .cloned()
                .collect();
        }
        let snapshot = self.state.snapshot();
        tracing::debug!(
            version = snapshot.version,
            synced,
            warming = self.state.warming(),
            "publishing snapshot"
        );
        self.cell.publish(snapshot, synced);
    }

    fn node_once(&self, subs: &mut StreamSubs) -> Option<Node> {
        if subs.node_sent {
            None
        } else {
            subs.node_sent = true;
            Some(self.node.clone())
        }
    }

    /// Sends whatever subscription is due, in Envoy's order: CDS, then (after CDS answered,
    /// or at once when reconnecting with held config) EDS, LDS, NDS, RDS.
    fn subscribe(&self, sender: &Sender, subs: &mut StreamSubs) {
        if !subs.requested.contains(CLUSTER) {
            self.send_initial(sender, subs, CLUSTER, Vec::new());
        }
        let resuming = self.state.cds_acked;
        if !(subs.cds_answered || resuming) {
            return;
        }
        let eps = self.state.wanted_endpoints();
        self.send_named(sender, subs, ENDPOINT, eps);
        if !subs.requested.contains(LISTENER) {
            self.send_initial(sender, subs, LISTENER, Vec::new());
            self.send_initial(sender, subs, NAME_TABLE, Vec::new());
        }
        let rts = self.state.wanted_routes();
        self.send_named(sender, subs, ROUTE, rts);
    }

    fn send_initial(
        &self,
        sender: &Sender,
        subs: &mut StreamSubs,
        type_url: &'static str,
        names: Vec<String>,
    ) {
        subs.requested.insert(type_url);
        let node = self.node_once(subs);
        match sender {
            Sender::Delta(tx) => {
                tx.push(DeltaDiscoveryRequest {
                    node,
                    type_url: type_url.to_owned(),
                    resource_names_subscribe: names,
                    initial_resource_versions: self.state.versions(type_url),
                    ..Default::default()
                });
            }
            Sender::Sotw(tx) => {
                tx.push(DiscoveryRequest {
                    node,
                    version_info: self
                        .state
                        .type_versions
                        .get(type_url)
                        .cloned()
                        .unwrap_or_default(),
                    type_url: type_url.to_owned(),
                    resource_names: names,
                    ..Default::default()
                });
            }
        }
    }

    /// Brings the EDS/RDS subscription of this stream to `wanted`.
    fn send_named(
        &self,
        sender: &Sender,
        subs: &mut StreamSubs,
        type_url: &'static str,
        wanted: BTreeSet<String>,
    ) {
        let current = if type_url == ENDPOINT {
            &subs.endpoints
        } else {
            &subs.routes
        };
        if subs.requested.contains(type_url) && *current == wanted {
            return;
        }
        if !subs.requested.contains(type_url) && wanted.is_empty() {
            return;
        }
        let first = !subs.requested.contains(type_url);
        let added: Vec<String> = wanted.difference(current).cloned().collect();
        let removed: Vec<String> = current.difference(&wanted).cloned().collect();
        if type_url == ENDPOINT {
            subs.endpoints = wanted.clone();
        } else {
            subs.routes = wanted.clone();
        }
        if first {
            self.send_initial(sender, subs, type_url, wanted.into_iter().collect());
            return;
        }
        match sender {
            Sender::Delta(tx) => {
                tx.push(DeltaDiscoveryRequest {
                    type_url: type_url.to_owned(),
                    resource_names_subscribe: added,
                    resource_names_unsubscribe: removed,
                    ..Default::default()
                });
            }
            Sender::Sotw(tx) => {
                tx.push(DiscoveryRequest {
                    version_info: self
                        .state
                        .type_versions
                        .get(type_url)
                        .cloned()
                        .unwrap_or_default(),
                    type_url: type_url.to_owned(),
                    resource_names: wanted.into_iter().collect(),
                    response_nonce: subs.nonces.get(type_url).cloned().unwrap_or_default(),
                    ..Default::default()
                });
            }
        }
    }

    fn on_delta(&mut self, resp: DeltaDiscoveryResponse, sender: &Sender, subs: &mut StreamSubs) {
        let Some(type_url) = subscribed_type(&resp.type_url, subs) else {
            return;
        };
        let incoming: Vec<Incoming> = resp
            .resources
            .into_iter()
            .map(|r| Incoming {
                name: r.name,
                version: r.version,
                resource: r.resource,
            })
            .collect();
        let errors = self.apply(
            type_url,
            &incoming,
            &resp.removed_resources,
            &resp.system_version_info,
            subs,
        );
        if let Sender::Delta(tx) = sender {
            tx.push(DeltaDiscoveryRequest {
                type_url: type_url.to_owned(),
                response_nonce: resp.nonce,
                error_detail: nack_detail(&errors),
                ..Default::default()
            });
        }
        self.subscribe(sender, subs);
    }

    fn on_sotw(&mut self, resp: DiscoveryResponse, sender: &Sender, subs: &mut StreamSubs) {
        let Some(type_url) = subscribed_type(&resp.type_url, subs) else {
            return;
        };
        let incoming: Vec<Incoming> = resp
            .resources
            .into_iter()
            .map(|a| Incoming {
                name: String::new(),
                // SotW has no per-resource versions and `version_info` is only unique per
                // server (a restarted istiod starts over): a resource is unchanged when its
                // bytes are, as Envoy decides by hashing the message.
                version: content_version(&a.value),
                resource: Some(a),
            })
            .collect();
        // CDS and LDS responses are the full set: whatever is absent is removed.
        let removed: Vec<String> = if type_url == CLUSTER || type_url == LISTENER {
            let names = sotw_names(type_url, &incoming);
            self.state
                .versions(type_url)
                .into_keys()
                .filter(|n| !names.contains(n))
                .collect()
        } else {
            Vec::new()
        };
        let errors = self.apply(type_url, &incoming, &removed, &resp.version_info, subs);
        subs.nonces.insert(type_url, resp.nonce.clone());
        let names = match type_url {
            ENDPOINT => subs.endpoints.iter().cloned().collect(),
            ROUTE => subs.routes.iter().cloned().collect(),
            _ => Vec::new(),
        };
        if let Sender::Sotw(tx) = sender {
            tx.push(DiscoveryRequest {
                // A NACK carries the last accepted version, an ACK the new one.
                version_info: self
                    .state
                    .type_versions
                    .get(type_url)
                    .cloned()
                    .unwrap_or_default(),
                type_url: type_url.to_owned(),
                resource_names: names,
                response_nonce: resp.nonce,
                error_detail: nack_detail(&errors),
                ..Default::default()
            });
        }
        self.subscribe(sender, subs);
    }

    /// Applies one response, publishes a snapshot if anything changed, and returns the
    /// rejection reasons (empty = ACK).
    fn apply(
        &mut self,
        type_url: &'static str,
        incoming: &[Incoming],
        removed: &[String],
        version: &str,
        subs: &mut StreamSubs,
    ) -> Vec<String> {
        let applied = self.state.apply(type_url, incoming, removed);
        let mut changed = applied.changed;
        changed |= self.state.promote(tokio::time::Instant::now());
        if changed {
            self.state.prune();
        }
        let short = types::short_name(type_url);
        let result = if applied.errors.is_empty() {
            "accepted"
        } else {
            "rejected"
        };
        metrics::counter!("mesh_xds_updates_total", "type" => short, "result" => result)
            .increment(1);
        if applied.errors.is_empty() {
            // Envoy's `<subscription>.version` stat: a hash of the last accepted version text.
            metrics::gauge!("mesh_xds_acked_version", "type" => short).set(version_hash(version));
            let previous = self
                .state
                .type_versions
                .insert(type_url.to_owned(), version.to_owned());
            changed |= previous.as_deref() != Some(version);
            match type_url {
                CLUSTER => {
                    self.state.cds_acked = true;
                    metrics::counter!("envoy_cluster_manager_cds_update_success").increment(1);
                }
                LISTENER => {
                    self.state.lds_acked = true;
                    metrics::counter!("envoy_listener_manager_lds_update_success").increment(1);
                }
                _ => {}
            }
        } else {
            match type_url {
                CLUSTER => {
                    metrics::counter!("envoy_cluster_manager_cds_update_rejected").increment(1)
                }
                LISTENER => {
                    metrics::counter!("envoy_listener_manager_lds_update_rejected").increment(1)
                }
                _ => {}
            }
            tracing::warn!(type_url = short, rejected = %applied.errors.join("; "), "NACK: rejecting xDS resources");
        }
        if type_url == CLUSTER {
            subs.cds_answered = true;
        }
        if changed || applied.errors.is_empty() {
            subs.delivered = true;
        }
        // Published by the caller once the batch of received responses is applied.
        self.dirty |= changed;
        applied.errors
    }
}

/// FNV-1a: stable across processes and releases, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A 53-bit hash of a version string (exact in a float gauge), as Envoy's `version` stat.
pub fn version_hash(version: &str) -> f64 {
    (fnv1a(version.as_bytes()) >> 11) as f64
}

/// The version a SotW resource is held at: a hash of its encoded bytes.
fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

fn sotw_names(type_url: &str, incoming: &[Incoming]) -> BTreeSet<String> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    incoming
        .iter()
        .filter_map(|r| r.resource.as_ref())
        .filter_map(|a| match type_url {
            CLUSTER => crate::translate::from_any::<Cluster>(a)
                .ok()
                .map(|c| c.name),
            _ => crate::translate::from_any::<Listener>(a)
                .ok()
                .map(|l| l.name),
        })
        .collect()
}

/// The type of a response the client asked for on this stream; any other response (unknown
/// type, or a type not subscribed) is ignored without ACK or NACK, as Envoy does.
fn subscribed_type(t: &str, subs: &StreamSubs) -> Option<&'static str> {
    let known = [CLUSTER, ENDPOINT, LISTENER, ROUTE, NAME_TABLE]
        .into_iter()
        .find(|k| *k == t);
    match known {
        Some(k) if subs.requested.contains(k) => Some(k),
        _ => {
            tracing::warn!(type_url = %t, "ignoring a response of a type this client did not subscribe to");
            metrics::counter!("mesh_xds_unrequested_responses_total").increment(1);
            None
        }
    }
}

fn nack_detail(errors: &[String]) -> Option<RpcStatus> {
    if errors.is_empty() {
        return None;
    }
    Some(RpcStatus {
        code: NACK_CODE,
        message: errors.join("\n"),
        details: Vec::new(),
    })
}
