//! The secret manager: keeps the workload certificate in a [`CertStore`] fresh, as
//! pilot-agent's secret cache does (FACTS.md b.5, b.7).
//!
//! * Every fetch uses a new key and CSR.
//! * Rotation at `SECRET_GRACE_PERIOD_RATIO` (0.5) ± U(0, 0.01) of the certificate's lifetime.
//! * On failure: jittered exponential backoff (1s doubling to 60s), never sleeping past the
//!   current certificate's expiry without another attempt; the current certificate stays in
//!   the store (a CA outage never removes a working certificate).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::{CertStore, SpiffeId, WorkloadCertificate};
use rand::Rng;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

use super::{
    CERTIFICATE_EXPIRY_METRIC, CERTIFICATE_RENEWALS_METRIC, CaClient, CaError, generate_csr,
};

/// `SECRET_GRACE_PERIOD_RATIO` default (read through [`mesh_core::config::SecretRotation`]).
pub const SECRET_GRACE_PERIOD_RATIO: f64 = mesh_core::config::DEFAULT_SECRET_GRACE_PERIOD_RATIO;
/// `SECRET_GRACE_PERIOD_RATIO_JITTER` default.
pub const SECRET_GRACE_PERIOD_RATIO_JITTER: f64 =
    mesh_core::config::DEFAULT_SECRET_GRACE_PERIOD_RATIO_JITTER;

/// Fetches the workload certificate from the CA and keeps it fresh in a [`CertStore`].
#[derive(Debug)]
pub struct SecretManager {
    client: CaClient,
    identity: SpiffeId,
    ttl: Duration,
    store: CertStore,
    grace_ratio: f64,
    grace_ratio_jitter: f64,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// When the current certificate was fetched (pilot-agent's `CreatedTime`).
    fetched_at: std::sync::Mutex<Option<SystemTime>>,
}

impl SecretManager {
    /// A manager that requests certificates for `identity` valid for `ttl` (`SECRET_TTL`) and
    /// installs them into `store`.
    pub fn new(client: CaClient, identity: SpiffeId, ttl: Duration, store: CertStore) -> Self {
        SecretManager {
            client,
            identity,
            ttl,
            store,
            grace_ratio: SECRET_GRACE_PERIOD_RATIO,
            grace_ratio_jitter: SECRET_GRACE_PERIOD_RATIO_JITTER,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            fetched_at: std::sync::Mutex::new(None),
        }
    }

    /// Overrides `SECRET_GRACE_PERIOD_RATIO` and its jitter (clamped to `0..=1`).
    pub fn with_grace_period_ratio(mut self, ratio: f64, jitter: f64) -> Self {
        self.grace_ratio = ratio.clamp(0.0, 1.0);
        self.grace_ratio_jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// Overrides the retry backoff after a failed fetch (default 1s doubling to 60s).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.initial_backoff);
        self
    }

    /// The store this manager writes to.
    pub fn store(&self) -> &CertStore {
        &self.store
    }

    /// Fetches one certificate (new key and CSR), validates it, installs it into the store
    /// and returns it. Use it to await the first certificate before serving.
    pub async fn fetch_once(&self) -> Result<WorkloadCertificate, CaError> {
        let result = self.fetch().await;
        match &result {
            Ok(cert) => {
                metrics::counter!(CERTIFICATE_RENEWALS_METRIC, "result" => "success").increment(1);
                metrics::gauge!(CERTIFICATE_EXPIRY_METRIC).set(unix_seconds(cert.not_after));
                tracing::info!(
                    identity = %cert.identity,
                    not_after = ?cert.not_after,
                    ca = %self.client.address(),
                    "workload certificate issued"
                );
                self.store.set(cert.clone());
            }
            Err(e) => {
                metrics::counter!(CERTIFICATE_RENEWALS_METRIC, "result" => "failure").increment(1);
                tracing::warn!(identity = %self.identity, error = %e, "workload certificate request failed");
            }
        }
        result
    }

    async fn fetch(&self) -> Result<WorkloadCertificate, CaError> {
        let started = SystemTime::now();
        let csr = generate_csr(&self.identity)?;
        let chain = self
            .client
            .create_certificate(&csr.csr_pem, self.ttl)
            .await?;
        let cert = parse_certificate_chain(&chain, csr.private_key_pkcs8_der)?;
        if cert.identity != self.identity {
            return Err(CaError::IdentityMismatch {
                requested: self.identity.to_string(),
                issued: cert.identity.to_string(),
            });
        }
        if let Ok(mut at) = self.fetched_at.lock() {
            *at = Some(started);
        }
        Ok(cert)
    }

    /// Runs forever: fetches a certificate when the store has none for this identity, then
    /// rotates at the grace-period ratio of each certificate's lifetime, retrying failures
    /// with backoff while keeping the current certificate.
    pub async fn run(self) {
        loop {
            let wait = match self.store.current() {
                Some(cert) if cert.identity == self.identity => self
                    .rotation_time(&cert)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default(),
                _ => Duration::ZERO,
            };
            if !wait.is_zero() {
                tracing::debug!(after = ?wait, identity = %self.identity, "next workload certificate rotation");
                tokio::time::sleep(wait).await;
            }
            self.fetch_until_success().await;
        }
    }

    /// pilot-agent's `rotateTime`: `expire − grace`, with `grace = (ratio ± U(0, jitter)) ×
    /// (expire − created)` and `created` the time the certificate was fetched (`notBefore`
    /// for a certificate this manager did not fetch).
    fn rotation_time(&self, cert: &WorkloadCertificate) -> SystemTime {
        let jitter = if self.grace_ratio_jitter > 0.0 {
            rand::rng().random_range(-self.grace_ratio_jitter..=self.grace_ratio_jitter)
        } else {
            0.0
        };
        let ratio = (self.grace_ratio + jitter).clamp(0.0, 1.0);
        let created = self
            .fetched_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .filter(|at| *at >= cert.not_before && *at <= cert.not_after)
            .unwrap_or(cert.not_before);
        let life = cert.not_after.duration_since(created).unwrap_or_default();
        cert.not_after - life.mul_f64(ratio)
    }

    async fn fetch_until_success(&self) {
        let mut backoff = self.initial_backoff;
        loop {
            if self.fetch_once().await.is_ok() {
                return;
            }
            let mut delay = jitter(backoff);
            if let Some(cert) = self.store.current() {
                match cert.not_after.duration_since(SystemTime::now()) {
                    Ok(left) if !left.is_zero() => {
                        tracing::warn!(
                            expires_in = ?left,
                            retry_in = ?delay.min(left),
                            "keeping the current workload certificate until the CA answers"
                        );
                        delay = delay.min(left);
                    }
                    _ => tracing::error!(
                        identity = %self.identity,
                        not_after = ?cert.not_after,
                        "the workload certificate has expired and the CA still fails; mTLS handshakes will fail"
                    ),
                }
            }
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// `d` ± up to 10%.
fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.9..=1.1);
    d.mul_f64(f)
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Turns a CA response (PEM, leaf first, root last) and the CSR's PKCS#8 DER key into a
/// [`WorkloadCertificate`]: `chain` = every certificate but the root, `roots` = the last one,
/// validity and identity from the leaf (its single SPIFFE URI SAN).
pub fn parse_certificate_chain(
    pem_chain: &[String],
    private_key_pkcs8_der: Vec<u8>,
) -> Result<WorkloadCertificate, CaError> {
    let mut ders: Vec<Vec<u8>> = Vec::new();
    for (i, pem) in pem_chain.iter().enumerate() {
        let before = ders.len();
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| {
                CaError::InvalidCertificate(format!("element {i} of the chain is not PEM: {e}"))
            })?;
            ders.push(der.as_ref().to_vec());
        }
        if ders.len() == before {
            return Err(CaError::InvalidCertificate(format!(
                "element {i} of the chain holds no certificate"
            )));
        }
    }
    if ders.len() < 2 {
        return Err(CaError::ShortChain(ders.len()));
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0])
        .map_err(|e| CaError::InvalidCertificate(format!("leaf: {e}")))?;
    let validity = leaf.validity();
    let not_before = system_time(validity.not_before.timestamp());
    let not_after = system_time(validity.not_after.timestamp());
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| CaError::InvalidCertificate(format!("leaf subjectAltName: {e}")))?
        .ok_or_else(|| CaError::InvalidCertificate("the leaf has no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let identity = uris
        .iter()
        .find_map(|u| u.parse::<SpiffeId>().ok())
        .ok_or_else(|| {
            CaError::InvalidCertificate(format!(
                "the leaf has no Istio SPIFFE URI SAN (URIs: {uris:?})"
            ))
        })?;
    let root = ders.pop().unwrap_or_default();
    Ok(WorkloadCertificate {
        chain: ders,
        private_key: private_key_pkcs8_der,
        roots: vec![root],
        identity,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::ControlPlaneAddress;

    fn cert(not_before: SystemTime, not_after: SystemTime) -> WorkloadCertificate {
        WorkloadCertificate {
            chain: vec![],
            private_key: vec![],
            roots: vec![],
            identity: SpiffeId::new("cluster.local", "ns", "sa"),
            not_before,
            not_after,
        }
    }

    async fn manager() -> SecretManager {
        let addr = ControlPlaneAddress {
            address: "127.0.0.1:1".into(),
            tls: false,
            root_cert: None,
            server_name: None,
        };
        let client = CaClient::connect(&addr, None, String::new(), vec![])
            .await
            .unwrap();
        SecretManager::new(
            client,
            SpiffeId::new("cluster.local", "ns", "sa"),
            Duration::from_secs(100),
            CertStore::new(),
        )
    }

    #[tokio::test]
    async fn rotation_time_uses_fetch_time_and_ratio() {
        let sm = manager().await.with_grace_period_ratio(0.5, 0.0);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        // istiod backdates notBefore by 2 minutes; pilot-agent measures from fetch time.
        let c = cert(t0 - Duration::from_secs(120), t0 + Duration::from_secs(100));
        *sm.fetched_at.lock().unwrap() = Some(t0);
        assert_eq!(sm.rotation_time(&c), t0 + Duration::from_secs(50));
        // Unknown fetch time: fall back to notBefore.
        *sm.fetched_at.lock().unwrap() = None;
        assert_eq!(sm.rotation_time(&c), t0 - Duration::from_secs(10));
    }

    #[tokio::test]
    async fn rotation_time_jitter_stays_within_bounds() {
        let sm = manager().await;
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = cert(t0, t0 + Duration::from_secs(10_000));
        for _ in 0..100 {
            let at = sm.rotation_time(&c).duration_since(t0).unwrap();
            assert!(
                at >= Duration::from_secs(4900) && at <= Duration::from_secs(5100),
                "{at:?}"
            );
        }
    }

    #[test]
    fn chain_must_have_leaf_and_root() {
        let err = parse_certificate_chain(&["not pem".to_owned()], vec![]).unwrap_err();
        assert!(matches!(err, CaError::InvalidCertificate(_)), "{err:?}");
    }
}
