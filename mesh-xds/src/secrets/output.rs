//! `OUTPUT_CERTS`: pilot-agent also writes the workload certificate it obtained from the CA
//! to this directory as `cert-chain.pem`, `key.pem` and `root-cert.pem` (for other processes,
//! e.g. proxyless gRPC's `file_watcher` certificate provider, and, on VMs where it is the
//! `PROV_CERT` directory too, for authenticating the next renewal).

use std::path::{Path, PathBuf};

use mesh_core::{CertStore, WorkloadCertificate};

use super::{CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, SecretError, pem};

/// Writes `cert` into `dir` (created if missing). Each file is written to a temporary name
/// and renamed into place, the key first, so a reader never sees a half-written file;
/// `key.pem` is readable by the owner only.
pub fn write_output_certs(dir: &Path, cert: &WorkloadCertificate) -> Result<(), SecretError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SecretError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (chain, key, roots) = pem::workload_certificate_to_pem(cert);
    for (name, body, private) in [
        (KEY_FILE, key, true),
        (CERT_CHAIN_FILE, chain, false),
        (ROOT_CERT_FILE, roots, false),
    ] {
        let target = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        write_file(&tmp, body.as_bytes(), private).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
    }
    Ok(())
}

fn write_file(path: &Path, body: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path)?;
    f.write_all(body)?;
    f.sync_all()
}

/// Writes every certificate `store` holds into `dir`, now and after each change, until the
/// store is dropped. Failures are logged and retried with the next certificate.
pub async fn run_output_certs(dir: PathBuf, store: CertStore) {
    let mut changes = store.subscribe();
    loop {
        if let Some(cert) = store.current() {
            match write_output_certs(&dir, &cert) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), identity = %cert.identity, "wrote the workload certificate to OUTPUT_CERTS")
                }
                Err(error) => {
                    tracing::warn!(%error, dir = %dir.display(), "cannot write the workload certificate to OUTPUT_CERTS")
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::ca::TestCa;
    use mesh_core::SpiffeId;

    #[test]
    fn written_files_load_back_as_the_same_certificate() {
        let ca = TestCa::new("cluster.local");
        let cert = ca.workload_certificate(
            &SpiffeId::new("cluster.local", "default", "vm"),
            std::time::Duration::from_secs(600),
        );
        let dir = std::env::temp_dir().join(format!("mesh-output-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_output_certs(&dir, &cert).unwrap();
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        let loaded = pem::workload_certificate_from_pem(
            &read(CERT_CHAIN_FILE),
            &read(KEY_FILE),
            &read(ROOT_CERT_FILE),
        )
        .unwrap();
        assert_eq!(loaded.chain, cert.chain);
        assert_eq!(loaded.private_key, cert.private_key);
        assert_eq!(loaded.roots, cert.roots);
        assert_eq!(loaded.identity, cert.identity);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key.pem is private: {mode:o}");
        }
        // The PEM is what other tools read: 64 columns, padded base64.
        let chain = String::from_utf8(read(CERT_CHAIN_FILE)).unwrap();
        assert!(chain.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(chain.lines().all(|l| l.len() <= 64));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
