//! File-mounted workload certificates (`FILE_MOUNTED_CERTS`, a CSI driver's
//! `workload-spiffe-credentials`): `cert-chain.pem`, `key.pem`, `root-cert.pem` in one
//! directory, loaded into the [`CertStore`] and reloaded when they change.
//!
//! Changes are found by polling the files' contents (every second by default; three small
//! files, no inotify needed, and robust to the symlink swaps Kubernetes volume updates do).
//! A change is installed once the contents stay the same for the debounce period
//! (`FILE_DEBOUNCE_DURATION`, 100ms), so a rotation written file by file is read whole. A
//! set of files that does not load (a key not matching the chain, garbage) is logged and
//! counted, and the current certificate stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::{CertStore, WorkloadCertificate};

use super::{
    CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, SECRET_UPDATES_METRIC, SecretError,
    workload_certificate_from_pem,
};

/// pilot-agent's `FILE_DEBOUNCE_DURATION` default.
pub const FILE_DEBOUNCE_DURATION: Duration = Duration::from_millis(100);
/// How often the files are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Loads certificates from a directory into a [`CertStore`] and keeps them current.
#[derive(Debug, Clone)]
pub struct FileCertificateWatcher {
    dir: PathBuf,
    store: CertStore,
    poll_interval: Duration,
    debounce: Duration,
}

type Contents = [Vec<u8>; 3];

impl FileCertificateWatcher {
    /// A watcher of `dir/{cert-chain.pem,key.pem,root-cert.pem}` writing into `store`.
    pub fn new(dir: impl Into<PathBuf>, store: CertStore) -> Self {
        FileCertificateWatcher {
            dir: dir.into(),
            store,
            poll_interval: FILE_POLL_INTERVAL,
            debounce: FILE_DEBOUNCE_DURATION,
        }
    }

    /// Overrides the poll interval (default 1s) and the debounce (default 100ms).
    pub fn with_timing(mut self, poll_interval: Duration, debounce: Duration) -> Self {
        self.poll_interval = poll_interval.max(Duration::from_millis(1));
        self.debounce = debounce;
        self
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&self) -> Result<Contents, SecretError> {
        let read = |name: &str| {
            let path = self.dir.join(name);
            std::fs::read(&path).map_err(|source| SecretError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        Ok([
            read(CERT_CHAIN_FILE)?,
            read(KEY_FILE)?,
            read(ROOT_CERT_FILE)?,
        ])
    }

    /// Reads and parses the three files once, without touching the store.
    pub fn load(&self) -> Result<WorkloadCertificate, SecretError> {
        let [chain, key, roots] = self.read()?;
        workload_certificate_from_pem(&chain, &key, &roots)
    }

    /// Loads the files once and installs the certificate into the store.
    pub fn load_into_store(&self) -> Result<(), SecretError> {
        let contents = self.read()?;
        self.install(&contents)
    }

    fn install(&self, [chain, key, roots]: &Contents) -> Result<(), SecretError> {
        match workload_certificate_from_pem(chain, key, roots) {
            Ok(cert) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    identity = %cert.identity,
                    not_after = ?cert.not_after,
                    roots = cert.roots.len(),
                    "loaded file-mounted workload certificate"
                );
                metrics::counter!(SECRET_UPDATES_METRIC, "source" => "file", "result" => "success")
                    .increment(1);
                self.store.set(cert);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    %error,
                    "file-mounted workload certificate not loaded; keeping the current one"
                );
                metrics::counter!(SECRET_UPDATES_METRIC, "source" => "file", "result" => "failure")
                    .increment(1);
                Err(error)
            }
        }
    }

    /// Runs forever: loads the files, then reloads them whenever their contents change and
    /// stay unchanged for the debounce period.
    pub async fn run(self) {
        let mut seen: Option<Contents> = None;
        loop {
            match self.read() {
                Ok(contents) if seen.as_ref() != Some(&contents) => {
                    if !self.debounce.is_zero() {
                        tokio::time::sleep(self.debounce).await;
                    }
                    // Install only contents that stayed put for the debounce period.
                    if let Ok(again) = self.read()
                        && again == contents
                    {
                        let _ = self.install(&contents);
                        seen = Some(contents);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    if seen.is_some() {
                        tracing::debug!(%error, "certificate files unreadable; keeping the current certificate");
                    }
                }
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }
}
