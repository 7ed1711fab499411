//! One meshed inbound listener on 127.0.0.1 for a test: started with an app, a snapshot cell, a
//! certificate store and an `InboundConfig`, stopped through its shutdown signal.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use mesh_core::listener::InboundTlsMode;
use mesh_core::{CertStore, NodeIdentity, SnapshotCell};
use mesh_tower::inbound::{self, InboundConfig, RequestBody};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long a test waits for the listener to stop after its shutdown signal.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The inbound config the tests use: no header-read timeout, no drain, no ext_authz.
pub fn config(port: u16, mode: Option<InboundTlsMode>, node: NodeIdentity) -> InboundConfig {
    InboundConfig {
        port,
        mode,
        node,
        header_read_timeout: None,
        idle_timeout: Some(mesh_tower::inbound::DEFAULT_IDLE_TIMEOUT),
        drain: None,
        ext_authz: None,
    }
}

/// A running inbound listener.
pub struct InboundServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The shutdown signal (taken by `shutdown`).
    pub stop: Option<oneshot::Sender<()>>,
    /// The serving task; it returns once shutdown has drained the connections.
    pub done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InboundServer {
    /// Serves `app` through mesh's inbound side on an ephemeral loopback port.
    pub async fn start<S, B>(
        app: S,
        cell: SnapshotCell,
        certs: CertStore,
        config: InboundConfig,
    ) -> Self
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(inbound::serve(listener, app, cell, certs, config, async {
            let _ = stopped.await;
        }));
        InboundServer {
            addr,
            stop: Some(stop),
            done,
        }
    }

    /// Signals shutdown and waits (bounded) for the listener to return cleanly.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(STOP_WAIT, self.done)
            .await
            .expect("serve returned after shutdown")
            .unwrap()
            .unwrap();
    }
}
