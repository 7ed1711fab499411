//! The workload certificate store: the current SPIFFE certificate and trust bundle, swapped
//! whole so new TLS handshakes read the latest one without locks.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::identity::SpiffeId;

/// A workload certificate as the CA issued it: DER chain (leaf first), PKCS#8 private key, and
/// the roots it chains to.
#[derive(Clone)]
pub struct WorkloadCertificate {
    /// DER certificates, leaf first, without the root.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key of the leaf.
    pub private_key: Vec<u8>,
    /// DER root certificates this workload trusts for peers (the `ROOTCA` trust bundle).
    pub roots: Vec<Vec<u8>>,
    /// The identity in the leaf's URI SAN.
    pub identity: SpiffeId,
    /// Leaf `notBefore`.
    pub not_before: SystemTime,
    /// Leaf `notAfter`.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl WorkloadCertificate {
    /// When pilot-agent would rotate it: at `ratio` of its lifetime (0.5 by default).
    pub fn refresh_at(&self, ratio: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(ratio.clamp(0.0, 1.0))
    }

    /// Whether the certificate is past `notAfter` at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// Holds the current [`WorkloadCertificate`]. Writers replace it whole; TLS handshakes call
/// [`CertStore::current`] (an atomic load) and so always use the newest certificate, while
/// established connections keep the one they were made with.
#[derive(Debug, Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: ArcSwapOption<WorkloadCertificate>,
    changed: watch::Sender<u64>,
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore::new()
    }
}

impl CertStore {
    /// An empty store.
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        CertStore {
            inner: Arc::new(Inner {
                current: ArcSwapOption::empty(),
                changed,
            }),
        }
    }

    /// The current certificate, if one is loaded.
    pub fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.inner.current.load_full()
    }

    /// Replaces the certificate; new handshakes use it at once.
    pub fn set(&self, cert: WorkloadCertificate) {
        self.inner.current.store(Some(Arc::new(cert)));
        self.inner.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that changes on every [`CertStore::set`]; its value counts the updates.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Waits until a certificate is loaded.
    pub async fn loaded(&self) {
        let mut rx = self.subscribe();
        while self.current().is_none() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}
