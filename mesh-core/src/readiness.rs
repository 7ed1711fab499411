//! Readiness as pilot-agent reports it on `/healthz/ready`: the first full xDS configuration is
//! in and a workload certificate is loaded, and the workload is not draining.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cert::CertStore;
use crate::snapshot::SnapshotCell;

/// Why the workload is not ready (logged by the status server; the HTTP answer is a bare 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// No complete xDS configuration yet.
    #[error("config not received from XDS server (is Istiod running?)")]
    NoConfig,
    /// No workload certificate yet.
    #[error("workload certificate not loaded yet")]
    NoCertificate,
    /// Shutdown has begun.
    #[error("server is terminated")]
    Draining,
}

/// The readiness inputs, shared by the status listeners and `Mesh::ready()`.
#[derive(Debug, Clone)]
pub struct Readiness {
    snapshot: SnapshotCell,
    certs: Option<CertStore>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Readiness over a snapshot cell and, when mTLS is on, a certificate store.
    pub fn new(snapshot: SnapshotCell, certs: Option<CertStore>) -> Self {
        Readiness {
            snapshot,
            certs,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `Ok` when ready. Like pilot-agent, the config check latches: later istiod outages do
    /// not flip readiness (the snapshot cell's `synced` never goes back to false).
    pub fn check(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Acquire) {
            return Err(NotReady::Draining);
        }
        if !self.snapshot.is_synced() {
            return Err(NotReady::NoConfig);
        }
        if let Some(c) = &self.certs
            && c.current().is_none()
        {
            return Err(NotReady::NoCertificate);
        }
        Ok(())
    }

    /// Marks the start of shutdown: readiness fails from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Waits until ready (or draining).
    pub async fn ready(&self) {
        self.snapshot.synced().await;
        if let Some(c) = &self.certs {
            c.loaded().await;
        }
    }
}
