//! Shared helpers for the CA tests: a real tonic server on 127.0.0.1 serving only the
//! testkit CA, plaintext or TLS.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_core::config::ControlPlaneAddress;
use mesh_xds::testkit::ca::TestCa;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-xds-ca-test-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves `ca` on 127.0.0.1:0. With `tls`, the server presents a certificate for
/// `istiod.istio-system.svc` from the same root, and the returned address trusts
/// `root_file`.
pub async fn serve_ca(ca: &TestCa, tls: bool, root_file: Option<PathBuf>) -> ControlPlaneAddress {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut builder = Server::builder();
    if tls {
        let (chain, key) = ca.server_identity(&["istiod.istio-system.svc"]);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))
            .unwrap();
    }
    let router = builder.add_service(ca.service());
    tokio::spawn(async move {
        router
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    ControlPlaneAddress {
        address: format!("127.0.0.1:{port}"),
        tls,
        root_cert: root_file,
        server_name: tls.then(|| "istiod.istio-system.svc".to_owned()),
    }
}
