//! Shared helpers for the secrets tests: scratch directories and store waits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mesh_core::{CertStore, WorkloadCertificate};

/// A temporary directory removed on drop (short path: Unix socket paths are limited).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (bounded) until the store holds a certificate satisfying `pred`.
pub async fn wait_for(
    store: &CertStore,
    what: &str,
    pred: impl Fn(&WorkloadCertificate) -> bool,
) -> Arc<WorkloadCertificate> {
    let mut rx = store.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(c) = store.current().filter(|c| pred(c)) {
                return c;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits (bounded) until `cond` holds, polling.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
