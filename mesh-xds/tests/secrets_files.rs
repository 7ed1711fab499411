//! File-mounted certificates: selection, loading, and reload on change with debounce.

use crate::secrets_support;

use std::path::Path;
use std::time::Duration;

use mesh_core::{CertStore, SpiffeId};
use mesh_xds::secrets::{
    CertificateSource, FileCertificateWatcher, SourceSignals, WORKLOAD_CREDENTIALS_DIR,
    select_certificate_source,
};
use mesh_xds::testkit::ca::{IssuedCert, TestCa};
use secrets_support::{TempDir, wait_for};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "prod", sa)
}

fn write(dir: &Path, cert: &IssuedCert, roots_pem: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), &cert.leaf_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
    std::fs::write(dir.join("root-cert.pem"), roots_pem).unwrap();
}

fn watcher(dir: &Path, store: &CertStore) -> FileCertificateWatcher {
    FileCertificateWatcher::new(dir, store.clone())
        .with_timing(Duration::from_millis(20), Duration::from_millis(10))
}

#[tokio::test]
async fn workload_credentials_are_selected_loaded_and_reloaded_on_rotation() {
    let root = TempDir::new("files");
    let dir = root.path().join(WORKLOAD_CREDENTIALS_DIR);
    let ca = TestCa::new("cluster.local");
    let first = ca.issue(&id("reviews"), Duration::from_secs(3600));
    write(&dir, &first, &ca.root_pem());

    let signals = SourceSignals::gather(root.path(), &|_| None, "istiod:15012");
    assert_eq!(
        select_certificate_source(&signals),
        CertificateSource::Files { dir: dir.clone() }
    );

    let store = CertStore::new();
    let task = tokio::spawn(watcher(&dir, &store).run());
    let cert = wait_for(&store, "the mounted certificate", |_| true).await;
    assert_eq!(cert.identity, id("reviews"));
    assert_eq!(cert.chain, vec![first.leaf_der.clone()]);
    assert_eq!(cert.roots, vec![ca.root_der()]);

    let second = ca.issue(&id("reviews"), Duration::from_secs(3600));
    write(&dir, &second, &ca.root_pem());
    wait_for(&store, "the rotated certificate", |c| {
        c.chain[0] == second.leaf_der
    })
    .await;

    // Trust bundle: a root added, then the old one removed.
    let other = TestCa::new("cluster.local");
    std::fs::write(
        dir.join("root-cert.pem"),
        format!("{}{}", ca.root_pem(), other.root_pem()),
    )
    .unwrap();
    wait_for(&store, "two roots", |c| c.roots.len() == 2).await;
    std::fs::write(dir.join("root-cert.pem"), other.root_pem()).unwrap();
    let cert = wait_for(&store, "one new root", |c| {
        c.roots == vec![other.root_der()]
    })
    .await;
    assert_eq!(cert.chain[0], second.leaf_der);
    task.abort();
}

#[tokio::test]
async fn a_half_written_rotation_is_not_installed_until_the_key_arrives() {
    let root = TempDir::new("files");
    let dir = root.path().join("etc/certs");
    let ca = TestCa::new("cluster.local");
    let first = ca.issue(&id("reviews"), Duration::from_secs(3600));
    write(&dir, &first, &ca.root_pem());
    let signals = SourceSignals::gather(
        root.path(),
        &|k| (k == "FILE_MOUNTED_CERTS").then(|| "true".to_owned()),
        "istiod:15012",
    );
    assert_eq!(
        select_certificate_source(&signals),
        CertificateSource::Files { dir: dir.clone() }
    );

    let store = CertStore::new();
    let task = tokio::spawn(watcher(&dir, &store).run());
    wait_for(&store, "the first certificate", |_| true).await;

    // New chain, old key: refused by load() and never installed by the watcher.
    let second = ca.issue(&id("reviews"), Duration::from_secs(3600));
    std::fs::write(dir.join("cert-chain.pem"), &second.leaf_pem).unwrap();
    let err = watcher(&dir, &store).load().unwrap_err();
    assert!(
        err.to_string().contains("does not belong to the leaf"),
        "{err}"
    );
    // Give the watcher many poll periods to (wrongly) act on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.current().unwrap().chain[0], first.leaf_der);

    std::fs::write(dir.join("key.pem"), &second.key_pem).unwrap();
    wait_for(&store, "the completed rotation", |c| {
        c.chain[0] == second.leaf_der
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn missing_files_name_the_file() {
    let root = TempDir::new("files");
    let err = watcher(root.path(), &CertStore::new()).load().unwrap_err();
    assert!(err.to_string().contains("cert-chain.pem"), "{err}");
}
