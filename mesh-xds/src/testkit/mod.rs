//! The testkit control plane: a real tonic gRPC server on 127.0.0.1 serving ADS (delta and
//! SotW) and the Istio CA, fed from a declarative model of services.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_xds::testkit::{ControlPlane, EndpointSpec, MeshModel, Protocol, ServiceSpec};
//! let backend = ServiceSpec::new("backend", "default", "10.96.0.10".parse()?)
//!     .port(80, Protocol::Http)
//!     .endpoint(EndpointSpec::new("127.0.0.1:8081".parse()?).label("version", "v1"))
//!     .endpoint(EndpointSpec::new("127.0.0.1:8082".parse()?).label("version", "v2"))
//!     .subset("v1", "version", "v1")
//!     .subset("v2", "version", "v2")
//!     .weighted(80, &[("v1", 90), ("v2", 10)]);
//! let cp = ControlPlane::builder().model(MeshModel::default().service(backend)).start().await?;
//! println!("xDS at {}", cp.addr());
//! # Ok(()) }
//! ```

pub mod authz;
pub mod ca;
pub mod envoy;
mod model;
mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::google::protobuf::Any;
use tokio::sync::{broadcast, oneshot, watch};

pub use model::{
    DnsResolution, EndpointSpec, MeshModel, Protocol, ResourceSet, ServiceEntrySpec, ServiceSpec,
    SubsetSpec, WeightedRouteSpec,
};
pub use server::XdsEvent;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// Binding or TLS setup failed.
    #[error("testkit control plane: {0}")]
    Io(#[from] std::io::Error),
    /// TLS was asked for without a CA to issue the server certificate.
    #[error("testkit control plane: TLS needs a TestCa (builder.ca(...))")]
    TlsWithoutCa,
    /// SDS secrets were asked for without a CA to issue them.
    #[error("testkit control plane: SDS secrets need a TestCa (builder.ca(...))")]
    SecretsWithoutCa,
}

/// Builds a [`ControlPlane`].
#[derive(Debug, Default)]
pub struct ControlPlaneBuilder {
    tls: bool,
    ca: Option<ca::TestCa>,
    require_token: bool,
    model: MeshModel,
    fixed: Option<ResourceSet>,
    listen: Option<SocketAddr>,
    bind_loopback: bool,
    strip_istio_proxy_extensions: bool,
    sds_identity: Option<mesh_core::SpiffeId>,
}

impl ControlPlaneBuilder {
    /// Serve TLS with a certificate for `istiod.istio-system.svc` issued by the CA.
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Serve the Istio CA too (and use it for TLS and token checks).
    pub fn ca(mut self, ca: ca::TestCa) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Refuse xDS streams without a valid `authorization: Bearer` token from the CA.
    pub fn require_token(mut self, require: bool) -> Self {
        self.require_token = require;
        self
    }

    /// The initial model.
    pub fn model(mut self, model: MeshModel) -> Self {
        self.model = model;
        self
    }

    /// Serve exactly these resources (a replayed config dump, for instance) instead of what
    /// the model generates; raw overlays still apply.
    pub fn resources(mut self, set: ResourceSet) -> Self {
        self.fixed = Some(set);
        self
    }

    /// Listen on `addr` instead of 127.0.0.1:0.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Serve every Listener that binds on 127.0.0.1 port 0 instead of its own address
    /// ([`envoy::bind_loopback`]), so a real Envoy pointed at this control plane binds only
    /// ephemeral loopback ports (its admin `/listeners` tells which). Names, route
    /// configuration names and filter chains stay as rendered.
    pub fn bind_loopback(mut self, on: bool) -> Self {
        self.bind_loopback = on;
        self
    }

    /// Serve resources without the extensions only istio-proxy's Envoy build has
    /// ([`envoy::strip_istio_proxy_extensions`]), so an upstream Envoy accepts them.
    pub fn strip_istio_proxy_extensions(mut self, on: bool) -> Self {
        self.strip_istio_proxy_extensions = on;
        self
    }

    /// Serve istio-agent's SDS secrets `default` (a certificate for `identity` from the CA)
    /// and `ROOTCA` (the CA's root) with every resource set, over ADS and over the
    /// `SecretDiscoveryService` on the same port (where istiod's sidecar bootstrap points
    /// `sds-grpc`). Needs [`ControlPlaneBuilder::ca`].
    pub fn sds_secrets(mut self, identity: mesh_core::SpiffeId) -> Self {
        self.sds_identity = Some(identity);
        self
    }

    /// Binds (127.0.0.1:0 unless [`ControlPlaneBuilder::listen`] says otherwise) and starts
    /// serving.
    pub async fn start(self) -> Result<ControlPlane, ControlPlaneError> {
        let tls = if self.tls {
            let ca = self.ca.as_ref().ok_or(ControlPlaneError::TlsWithoutCa)?;
            Some(ca.server_identity(&["istiod.istio-system.svc"]))
        } else {
            None
        };
        let secrets = match (&self.sds_identity, &self.ca) {
            (Some(id), Some(ca)) => envoy::sds_secrets(ca, id),
            (Some(_), None) => return Err(ControlPlaneError::SecretsWithoutCa),
            (None, _) => BTreeMap::new(),
        };
        let (events, _) = broadcast::channel(1024);
        let (inject, _) = broadcast::channel(16 * 1024);
        let shared = Arc::new(server::Shared {
            model: Mutex::new(self.model),
            fixed: Mutex::new(self.fixed),
            raw: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
            inject,
            generation: watch::channel(1).0,
            cut: watch::channel(0).0,
            events,
            nonce: AtomicU64::new(1),
            cut_after_push: AtomicBool::new(false),
            ca: self.ca,
            require_token: self.require_token,
            serve: server::ServeOptions {
                bind_loopback: self.bind_loopback,
                strip_istio_proxy_extensions: self.strip_istio_proxy_extensions,
                secrets,
            },
        });
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (addr, stop) = server::serve(shared.clone(), tls, listen).await?;
        Ok(ControlPlane {
            addr,
            shared,
            _stop: stop,
        })
    }
}

/// A running control plane; stops when dropped.
pub struct ControlPlane {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    _stop: oneshot::Sender<()>,
}

impl Drop for ControlPlane {
    /// A stopped control plane ends its streams too, as a killed istiod would.
    fn drop(&mut self) {
        self.cut_streams();
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// A builder (plaintext, no CA, empty model).
    pub fn builder() -> ControlPlaneBuilder {
        ControlPlaneBuilder::default()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as mesh's config wants it: plaintext, or TLS verified against `root_cert`
    /// with server name `istiod.istio-system.svc`.
    pub fn control_plane_address(
        &self,
        root_cert: Option<std::path::PathBuf>,
    ) -> mesh_core::config::ControlPlaneAddress {
        mesh_core::config::ControlPlaneAddress {
            address: self.addr.to_string(),
            tls: root_cert.is_some(),
            root_cert,
            server_name: Some("istiod.istio-system.svc".into()),
        }
    }

    /// The CA, if one was given.
    pub fn ca(&self) -> Option<&ca::TestCa> {
        self.shared.ca.as_ref()
    }

    /// Replaces the model and pushes to every stream.
    pub fn set_model(&self, model: MeshModel) {
        self.update(|m| *m = model);
    }

    /// Edits the model and pushes to every stream (delta: changed + removed; SotW: full sets).
    pub fn update(&self, f: impl FnOnce(&mut MeshModel)) {
        if let Ok(mut m) = self.shared.model.lock() {
            f(&mut m);
        }
        self.bump();
    }

    /// Serves exactly `set` from now on (instead of the model) and pushes to every stream;
    /// `None` goes back to the model.
    pub fn set_resources(&self, set: Option<ResourceSet>) {
        if let Ok(mut f) = self.shared.fixed.lock() {
            *f = set;
        }
        self.bump();
    }

    /// The current model.
    pub fn model(&self) -> MeshModel {
        self.shared
            .model
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Overlays raw resources (same name replaces the generated one) and pushes; use it to send
    /// invalid resources.
    pub fn push_raw(&self, type_url: &str, resources: Vec<(String, Any)>) {
        if let Ok(mut raw) = self.shared.raw.lock() {
            let e = raw.entry(type_url.to_owned()).or_default();
            for (n, a) in resources {
                e.insert(n, a);
            }
        }
        self.bump();
    }

    /// Drops every raw overlay and pushes.
    pub fn clear_raw(&self) {
        if let Ok(mut raw) = self.shared.raw.lock() {
            raw.clear();
        }
        self.bump();
    }

    /// Holds back the resource `name` of `type_url`: from the next push on it is served as if
    /// it did not exist (yet), until [`ControlPlane::release_held`]. Use it to delay a
    /// `ClusterLoadAssignment` or `RouteConfiguration` behind the cluster or listener that
    /// needs it. Does not push by itself.
    pub fn hold_back(&self, type_url: &str, name: &str) {
        if let Ok(mut held) = self.shared.held.lock() {
            held.entry(type_url.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }

    /// Serves every held-back resource again and pushes.
    pub fn release_held(&self) {
        if let Ok(mut held) = self.shared.held.lock() {
            held.clear();
        }
        self.bump();
    }

    /// Sends, on every open stream, one response of `type_url` with exactly `resources` and
    /// `nonce` (which may be empty, repeated or stale), outside the streams' bookkeeping:
    /// the server does not remember having sent it. Delta responses carry each resource at
    /// a version hashed from its bytes; SotW responses carry `version_info: "injected"`.
    pub fn inject(&self, type_url: &str, resources: Vec<(String, Any)>, nonce: &str) {
        let _ = self.shared.inject.send(server::Injected {
            type_url: type_url.to_owned(),
            resources,
            nonce: nonce.to_owned(),
        });
    }

    /// The resources a client in `namespace` is served now (model or fixed set, raw overlays,
    /// minus held-back ones).
    pub fn resources_for(&self, namespace: &str) -> ResourceSet {
        self.shared.resources(namespace)
    }

    /// Stream events.
    pub fn events(&self) -> broadcast::Receiver<XdsEvent> {
        self.shared.events.subscribe()
    }

    /// Aborts every open stream with UNAVAILABLE.
    pub fn cut_streams(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// The stream that sends the next push (a model update, raw overlay, …) sends all of that
    /// push's responses and is then aborted with UNAVAILABLE before it reads another request:
    /// the client has the responses but its ACKs never arrive on that stream.
    pub fn cut_after_next_push(&self) {
        self.shared.cut_after_push.store(true, Ordering::SeqCst);
    }

    fn bump(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }
}
