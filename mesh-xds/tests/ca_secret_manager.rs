//! SecretManager against a real tonic server serving the testkit CA.

use crate::ca_support;

use std::sync::Arc;
use std::time::Duration;

use ca_support::{Scratch, serve_ca};
use mesh_core::{CertStore, SpiffeId, WorkloadCertificate};
use mesh_xds::ca::{CaClient, CaError, SecretManager};
use mesh_xds::testkit::ca::TestCa;

struct Fixture {
    ca: TestCa,
    _scratch: Scratch,
    client: CaClient,
    identity: SpiffeId,
}

async fn fixture(token_sa: &str) -> Fixture {
    let ca = TestCa::new("cluster.local");
    let scratch = Scratch::new();
    let root = scratch.write("root-cert.pem", &ca.root_pem());
    let addr = serve_ca(&ca, true, Some(root)).await;
    let token = scratch.write("istio-token", &ca.token_for("prod", token_sa));
    let client = CaClient::connect(&addr, Some(token), "Kubernetes".into(), vec![])
        .await
        .unwrap();
    Fixture {
        ca,
        _scratch: scratch,
        client,
        identity: SpiffeId::new("cluster.local", "prod", "reviews"),
    }
}

/// Waits (bounded) until the store holds a certificate whose leaf differs from `old`.
async fn wait_for_new_leaf(
    store: &CertStore,
    old: &[u8],
    limit: Duration,
) -> Arc<WorkloadCertificate> {
    let mut rx = store.subscribe();
    tokio::time::timeout(limit, async {
        loop {
            if let Some(c) = store.current().filter(|c| c.chain[0] != old) {
                return c;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("no new certificate in time")
}

#[tokio::test]
async fn fetch_once_installs_a_verified_certificate() {
    let f = fixture("reviews").await;
    let store = CertStore::new();
    let sm = SecretManager::new(
        f.client.clone(),
        f.identity.clone(),
        Duration::from_secs(3600),
        store.clone(),
    );
    let cert = tokio::time::timeout(Duration::from_secs(20), sm.fetch_once())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cert.identity, f.identity);
    assert_eq!(cert.chain.len(), 1, "chain without the root");
    assert_eq!(cert.roots, vec![f.ca.root_der()]);
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(life, Duration::from_secs(3600 + 120));
    let stored = store.current().expect("installed into the store");
    assert_eq!(stored.chain, cert.chain);
    // The private key belongs to the leaf.
    let key = rustls::crypto::ring::sign::any_supported_type(
        &rustls_pki_types::PrivateKeyDer::Pkcs8(cert.private_key.clone().into()),
    )
    .unwrap();
    rustls::sign::CertifiedKey::new(vec![cert.chain[0].clone().into()], key)
        .keys_match()
        .unwrap();
    // Each fetch uses a fresh key.
    let again = sm.fetch_once().await.unwrap();
    assert_ne!(again.private_key, cert.private_key);
    assert_ne!(again.chain[0], cert.chain[0]);
}

#[tokio::test]
async fn certificate_for_another_identity_is_refused() {
    // The token authenticates sa "ratings", but this workload is "reviews".
    let f = fixture("ratings").await;
    let store = CertStore::new();
    let sm = SecretManager::new(
        f.client,
        f.identity,
        Duration::from_secs(600),
        store.clone(),
    );
    let err = sm.fetch_once().await.unwrap_err();
    match &err {
        CaError::IdentityMismatch { requested, issued } => {
            assert_eq!(requested, "spiffe://cluster.local/ns/prod/sa/reviews");
            assert_eq!(issued, "spiffe://cluster.local/ns/prod/sa/ratings");
        }
        other => panic!("expected IdentityMismatch, got {other:?}"),
    }
    assert!(store.current().is_none());
}

#[tokio::test]
async fn run_fetches_then_rotates_at_half_life() {
    let f = fixture("reviews").await;
    let store = CertStore::new();
    let sm = SecretManager::new(
        f.client.clone(),
        f.identity.clone(),
        Duration::from_secs(4),
        store.clone(),
    );
    let task = tokio::spawn(sm.run());
    tokio::time::timeout(Duration::from_secs(20), store.loaded())
        .await
        .unwrap();
    let first = store.current().unwrap();
    let second = wait_for_new_leaf(&store, &first.chain[0], Duration::from_secs(20)).await;
    assert_eq!(second.identity, f.identity);
    assert_ne!(second.private_key, first.private_key);
    // It rotated before the first certificate expired (at about half its 4s lifetime).
    assert!(
        std::time::SystemTime::now() < first.not_after,
        "rotation should happen before expiry"
    );
    let requests = f.ca.requests();
    assert!(requests.len() >= 2);
    assert!(requests.iter().all(|r| r.validity_duration == 4));
    task.abort();
}

#[tokio::test]
async fn ca_outage_keeps_the_current_certificate_then_recovers() {
    let f = fixture("reviews").await;
    let store = CertStore::new();
    let sm = SecretManager::new(
        f.client.clone(),
        f.identity.clone(),
        Duration::from_secs(6),
        store.clone(),
    )
    .with_backoff(Duration::from_millis(50), Duration::from_millis(200));
    let first = sm.fetch_once().await.unwrap();
    f.ca.set_failing(true);
    let task = tokio::spawn(sm.run());

    // Wait (bounded) until the manager has tried and failed several times.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let failures =
                f.ca.requests()
                    .iter()
                    .filter(|r| r.outcome == tonic::Code::Unavailable)
                    .count();
            if failures >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the manager should retry while the CA is down");
    let kept = store
        .current()
        .expect("a CA failure never clears the store");
    assert_eq!(kept.chain, first.chain, "the current certificate is kept");

    f.ca.set_failing(false);
    let renewed = wait_for_new_leaf(&store, &first.chain[0], Duration::from_secs(20)).await;
    assert_eq!(renewed.identity, f.identity);
    task.abort();
}

#[tokio::test]
async fn run_replaces_an_expired_certificate_at_once() {
    let f = fixture("reviews").await;
    let store = CertStore::new();
    let now = std::time::SystemTime::now();
    let expired = f.ca.issue_with_validity(
        &f.identity,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    assert!(expired.not_after < now);
    store.set(WorkloadCertificate {
        chain: vec![expired.leaf_der.clone()],
        private_key: expired.key_der.clone(),
        roots: vec![expired.root_der.clone()],
        identity: expired.identity.clone(),
        not_before: expired.not_before,
        not_after: expired.not_after,
    });
    let sm = SecretManager::new(
        f.client.clone(),
        f.identity.clone(),
        Duration::from_secs(3600),
        store.clone(),
    );
    let task = tokio::spawn(sm.run());
    let fresh = wait_for_new_leaf(&store, &expired.leaf_der, Duration::from_secs(20)).await;
    assert!(!fresh.is_expired(std::time::SystemTime::now()));
    assert_eq!(f.ca.requests().len(), 1);
    task.abort();
}

/// `SECRET_GRACE_PERIOD_RATIO` read through `MeshConfig` decides when rotation happens: with
/// a 1h certificate, a ratio of 0.999 (renew when 99.9% of the lifetime is left) rotates about
/// 3.6s after the fetch, while the default 0.5 waits for half-life (30 min) — so when the
/// first manager has rotated, the second still holds its first certificate.
#[tokio::test]
async fn the_grace_period_ratio_from_the_environment_decides_when_rotation_happens() {
    use mesh_core::config::MeshConfig;
    use std::collections::HashMap;
    let rotation = |extra: &[(&str, &str)]| {
        let mut env: HashMap<String, String> = [
            ("POD_NAME", "reviews-0"),
            ("POD_NAMESPACE", "prod"),
            ("INSTANCE_IP", "10.0.0.7"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.insert("SECRET_TTL".into(), "1h".into());
        MeshConfig::from_strings(&env).unwrap().secret_rotation
    };
    let eager = rotation(&[
        ("SECRET_GRACE_PERIOD_RATIO", "0.999"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ]);
    let default = rotation(&[]);
    assert_eq!(default.grace_period_ratio, 0.5);
    assert_eq!(default.grace_period_ratio_jitter, 0.01);

    let f = fixture("reviews").await;
    let manager = |r: mesh_core::config::SecretRotation, store: &CertStore| {
        SecretManager::new(
            f.client.clone(),
            f.identity.clone(),
            Duration::from_secs(3600),
            store.clone(),
        )
        .with_grace_period_ratio(r.grace_period_ratio, r.grace_period_ratio_jitter)
    };
    let (eager_store, default_store) = (CertStore::new(), CertStore::new());
    let eager_task = tokio::spawn(manager(eager, &eager_store).run());
    let default_task = tokio::spawn(manager(default, &default_store).run());
    for s in [&eager_store, &default_store] {
        tokio::time::timeout(Duration::from_secs(20), s.loaded())
            .await
            .unwrap();
    }
    let eager_first = eager_store.current().unwrap();
    let default_first = default_store.current().unwrap();

    let renewed =
        wait_for_new_leaf(&eager_store, &eager_first.chain[0], Duration::from_secs(30)).await;
    assert_eq!(renewed.identity, f.identity);
    // Renewed with nearly the whole hour left: long before the default's half-life.
    let left = eager_first
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(1800),
        "renewed with {left:?} left"
    );
    assert_eq!(
        default_store.current().unwrap().chain[0],
        default_first.chain[0],
        "the default ratio does not rotate before half-life"
    );
    eager_task.abort();
    default_task.abort();
}
