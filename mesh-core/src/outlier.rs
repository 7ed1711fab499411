//! Outlier detection (Envoy's `outlier_detection`) and circuit breaker thresholds.
//!
//! Consecutive-error ejections (`consecutive_5xx`, `consecutive_gateway_failure`,
//! `consecutive_local_origin_failure`) happen as soon as the threshold is reached; success-rate
//! and failure-percentage ejections, and the return of ejected hosts, happen on the `interval`
//! sweep. An ejection lasts `base_ejection_time × ejections so far` (capped at
//! `max_ejection_time`); a host that stays healthy through an interval has its ejection count
//! lowered by one. No ejection may take the ejected share of hosts above
//! `max_ejection_percent` (unless `always_eject_one_host` and none is ejected). Each ejection
//! type is enforced with its `enforcing_*` probability.
//!
//! The sweep runs lazily: whoever reports a result or picks a host after the interval has
//! passed runs it (one caller wins), so no timer task is needed and paused-time tests drive it.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;

use crate::lb::HostState;

/// A cluster's `outlier_detection`, with Envoy's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (5).
    pub consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (5).
    pub consecutive_gateway_failure: u32,
    /// `consecutive_local_origin_failure` (5).
    pub consecutive_local_origin_failure: u32,
    /// `interval` (10 s).
    pub interval: Duration,
    /// `base_ejection_time` (30 s).
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (300 s).
    pub max_ejection_time: Duration,
    /// `max_ejection_percent` (10).
    pub max_ejection_percent: u32,
    /// `enforcing_consecutive_5xx` (100).
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_consecutive_gateway_failure` (0).
    pub enforcing_consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` (100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `enforcing_success_rate` (100).
    pub enforcing_success_rate: u32,
    /// `success_rate_minimum_hosts` (5).
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (100).
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` (1900, i.e. 1.9).
    pub success_rate_stdev_factor: u32,
    /// `failure_percentage_threshold` (85).
    pub failure_percentage_threshold: u32,
    /// `enforcing_failure_percentage` (0).
    pub enforcing_failure_percentage: u32,
    /// `failure_percentage_minimum_hosts` (5).
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (50).
    pub failure_percentage_request_volume: u32,
    /// `split_external_local_origin_errors` (false: local failures count as 5xx).
    pub split_external_local_origin_errors: bool,
    /// `always_eject_one_host` (false).
    pub always_eject_one_host: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            split_external_local_origin_errors: false,
            always_eject_one_host: false,
        }
    }
}

/// A cluster's `circuit_breakers` thresholds for the default priority, with Envoy's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitBreakers {
    /// `max_connections` (1024).
    pub max_connections: u32,
    /// `max_pending_requests` (1024).
    pub max_pending_requests: u32,
    /// `max_requests` (1024).
    pub max_requests: u32,
    /// `max_retries` (3); not used when there is a retry budget.
    pub max_retries: u32,
    /// `retry_budget`: when present it replaces `max_retries`.
    pub retry_budget: Option<RetryBudget>,
}

/// `retry_budget`: concurrent retries limited to a share of the cluster's active and pending
/// requests, never below a floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBudget {
    /// `budget_percent` (Envoy's default 20).
    pub budget_percent: crate::lb::Real,
    /// `min_retry_concurrency` (Envoy's default 3).
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            budget_percent: crate::lb::Real(20.0),
            min_retry_concurrency: 3,
        }
    }
}

impl CircuitBreakers {
    /// How many retries may be in flight to the cluster while `active` requests are active or
    /// pending there: `max_retries`, or with a retry budget Envoy's
    /// `max(budget_percent / 100 * active, min_retry_concurrency)` (the share truncated).
    pub fn retry_limit(&self, active: u32) -> u32 {
        match &self.retry_budget {
            None => self.max_retries,
            Some(b) => {
                let share = (b.budget_percent.0 / 100.0 * f64::from(active)) as u32;
                share.max(b.min_retry_concurrency)
            }
        }
    }
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// Per-host outlier counters (inside [`HostState`]).
#[derive(Debug, Default)]
pub(crate) struct HostCounters {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    interval_success: AtomicU32,
    interval_total: AtomicU32,
    /// Ejections so far (the ejection-time multiplier).
    ejections: AtomicU32,
    /// When the current ejection started (ms since the process clock epoch).
    ejected_at: AtomicU64,
}

/// How one request to a host ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierResult {
    /// The upstream answered with this status.
    Http(u16),
    /// Connecting failed (local origin).
    ConnectFailed,
    /// The request timed out (local origin).
    Timeout,
    /// The connection was reset (local origin).
    Reset,
}

/// Why a host was ejected (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectionType {
    /// `consecutive_5xx`.
    Consecutive5xx,
    /// `consecutive_gateway_failure`.
    ConsecutiveGatewayFailure,
    /// `consecutive_local_origin_failure`.
    ConsecutiveLocalOriginFailure,
    /// Success rate below the cluster's.
    SuccessRate,
    /// Failure percentage above the threshold.
    FailurePercentage,
}

impl EjectionType {
    /// Every type, in the order of [`OutlierCounts`]' per-type arrays.
    pub const ALL: [EjectionType; 5] = [
        EjectionType::Consecutive5xx,
        EjectionType::ConsecutiveGatewayFailure,
        EjectionType::ConsecutiveLocalOriginFailure,
        EjectionType::SuccessRate,
        EjectionType::FailurePercentage,
    ];

    /// Envoy's stat suffix for the type (`ejections_detected_<suffix>`,
    /// `ejections_enforced_<suffix>`).
    pub fn stat_suffix(self) -> &'static str {
        match self {
            EjectionType::Consecutive5xx => "consecutive_5xx",
            EjectionType::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionType::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            EjectionType::SuccessRate => "success_rate",
            EjectionType::FailurePercentage => "failure_percentage",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a detector decided since the counts were last taken, as Envoy's
/// `outlier_detection.*` counters count it (`DetectorImpl::ejectHost`,
/// `updateDetectedEjectionStats`, `updateEnforcedEjectionStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutlierCounts {
    /// `ejections_detected_<type>`: a threshold reached by a host not already ejected,
    /// whether or not the ejection was then allowed and enforced.
    pub detected: [u64; 5],
    /// `ejections_enforced_<type>`: hosts actually ejected.
    pub enforced: [u64; 5],
    /// `ejections_overflow`: detections refused by `max_ejection_percent`.
    pub overflow: u64,
    /// The deprecated `ejections_total`: consecutive-5xx and success-rate detections that
    /// `max_ejection_percent` allowed (enforced or not).
    pub total: u64,
}

/// The detector's counters, taken (read and reset) by whoever records them as metrics.
#[derive(Debug, Default)]
pub struct OutlierStats {
    detected: [AtomicU64; 5],
    enforced: [AtomicU64; 5],
    overflow: AtomicU64,
    total: AtomicU64,
}

impl OutlierStats {
    /// The counts since the last call, resetting them to zero (several recorders of one
    /// cluster then never count an event twice).
    pub fn take(&self) -> OutlierCounts {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        OutlierCounts {
            detected: std::array::from_fn(|i| take(&self.detected[i])),
            enforced: std::array::from_fn(|i| take(&self.enforced[i])),
            overflow: take(&self.overflow),
            total: take(&self.total),
        }
    }
}

/// The detector's clock: ms since the first use in this process (tokio time, so paused-time
/// tests move it).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    tokio::time::Instant::now()
        .saturating_duration_since(epoch)
        .as_millis() as u64
        + 1
}

/// One cluster's outlier detector.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierDetection,
    next_sweep: AtomicU64,
    stats: Arc<OutlierStats>,
}

impl OutlierDetector {
    /// A detector with `config`; the first sweep is one interval from now.
    pub fn new(config: OutlierDetection) -> Self {
        Self::new_at(now_ms(), config)
    }

    /// A detector whose clock reads `now` (ms) at creation.
    pub fn new_at(now: u64, config: OutlierDetection) -> Self {
        let next = now + config.interval.as_millis() as u64;
        OutlierDetector {
            config,
            next_sweep: AtomicU64::new(next),
            stats: Arc::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OutlierDetection {
        &self.config
    }

    /// The detector's detection and ejection counters.
    pub fn stats(&self) -> Arc<OutlierStats> {
        Arc::clone(&self.stats)
    }

    /// Records how a request to `host` ended; may eject it. `hosts` is every host of the
    /// cluster (for `max_ejection_percent`). Returns the ejection made, if any.
    pub fn report<R: Rng + ?Sized>(
        &self,
        host: &HostState,
        hosts: &[Arc<HostState>],
        result: OutlierResult,
        rng: &mut R,
    ) -> Option<EjectionType> {
        self.report_at(now_ms(), host, hosts, result, rng)
    }

    /// [`report`](Self::report) at time `now` (ms on the detector's clock).
    pub fn report_at<R: Rng + ?Sized>(
        &self,
        now: u64,
        host: &HostState,
        hosts: &[Arc<HostState>],
        result: OutlierResult,
        rng: &mut R,
    ) -> Option<EjectionType> {
        self.sweep_at(now, hosts, rng);
        let c = &host.outlier;
        let cfg = &self.config;
        let local = !matches!(result, OutlierResult::Http(_));
        if local && cfg.split_external_local_origin_errors {
            c.interval_total.fetch_add(1, Ordering::Relaxed);
            let n = c.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= cfg.consecutive_local_origin_failure && cfg.consecutive_local_origin_failure > 0
            {
                c.consecutive_local.store(0, Ordering::Relaxed);
                return self.try_eject(
                    now,
                    host,
                    hosts,
                    EjectionType::ConsecutiveLocalOriginFailure,
                    cfg.enforcing_consecutive_local_origin_failure,
                    rng,
                );
            }
            return None;
        }
        // Without the split, local-origin failures count as the 5xx Envoy would answer.
        let status = match result {
            OutlierResult::Http(s) => s,
            OutlierResult::ConnectFailed | OutlierResult::Reset => 503,
            OutlierResult::Timeout => 504,
        };
        if cfg.split_external_local_origin_errors {
            c.consecutive_local.store(0, Ordering::Relaxed);
        }
        c.interval_total.fetch_add(1, Ordering::Relaxed);
        if status < 500 {
            c.interval_success.fetch_add(1, Ordering::Relaxed);
            c.consecutive_5xx.store(0, Ordering::Relaxed);
            c.consecutive_gateway.store(0, Ordering::Relaxed);
            return None;
        }
        let gateway = matches!(status, 502..=504);
        if gateway {
            let n = c.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= cfg.consecutive_gateway_failure && cfg.consecutive_gateway_failure > 0 {
                c.consecutive_gateway.store(0, Ordering::Relaxed);
                if let Some(e) = self.try_eject(
                    now,
                    host,
                    hosts,
                    EjectionType::ConsecutiveGatewayFailure,
                    cfg.enforcing_consecutive_gateway_failure,
                    rng,
                ) {
                    c.consecutive_5xx.store(0, Ordering::Relaxed);
                    return Some(e);
                }
            }
        } else {
            c.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        let n = c.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= cfg.consecutive_5xx && cfg.consecutive_5xx > 0 {
            c.consecutive_5xx.store(0, Ordering::Relaxed);
            return self.try_eject(
                now,
                host,
                hosts,
                EjectionType::Consecutive5xx,
                cfg.enforcing_consecutive_5xx,
                rng,
            );
        }
        None
    }

    /// A host reached the `kind` threshold: as Envoy's `ejectHost`, counted as detected
    /// (unless already ejected), refused as an overflow when it would take the ejected share
    /// above `max_ejection_percent`, then enforced with probability `enforcing` %.
    fn try_eject<R: Rng + ?Sized>(
        &self,
        now: u64,
        host: &HostState,
        hosts: &[Arc<HostState>],
        kind: EjectionType,
        enforcing: u32,
        rng: &mut R,
    ) -> Option<EjectionType> {
        if host.is_ejected() {
            return None;
        }
        let stats = &self.stats;
        stats.detected[kind.index()].fetch_add(1, Ordering::Relaxed);
        let ejected = hosts.iter().filter(|h| h.is_ejected()).count();
        let total = hosts.len().max(1);
        let percent = 100.0 * (ejected + 1) as f64 / total as f64;
        let allowed = percent <= f64::from(self.config.max_ejection_percent.min(100))
            || (self.config.always_eject_one_host && ejected == 0);
        if !allowed {
            stats.overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if matches!(
            kind,
            EjectionType::Consecutive5xx | EjectionType::SuccessRate
        ) {
            stats.total.fetch_add(1, Ordering::Relaxed);
        }
        if enforcing == 0 || rng.random_range(0..100) >= enforcing {
            return None;
        }
        stats.enforced[kind.index()].fetch_add(1, Ordering::Relaxed);
        host.outlier.ejections.fetch_add(1, Ordering::Relaxed);
        host.outlier.ejected_at.store(now, Ordering::Relaxed);
        host.set_ejected(true);
        tracing::debug!(host = %host.address, ?kind, "outlier detection ejected host");
        Some(kind)
    }

    /// Runs the interval sweep if it is due: returns ejected hosts whose time is up, lowers
    /// the ejection count of hosts that stayed healthy, and applies success-rate and
    /// failure-percentage ejection.
    pub fn sweep_if_due<R: Rng + ?Sized>(&self, hosts: &[Arc<HostState>], rng: &mut R) {
        self.sweep_at(now_ms(), hosts, rng);
    }

    /// [`sweep_if_due`](Self::sweep_if_due) at time `now` (ms on the detector's clock).
    pub fn sweep_at<R: Rng + ?Sized>(&self, now: u64, hosts: &[Arc<HostState>], rng: &mut R) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        let next = now + self.config.interval.as_millis().max(1) as u64;
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let cfg = &self.config;
        for h in hosts {
            let c = &h.outlier;
            let n = c.ejections.load(Ordering::Relaxed);
            if h.is_ejected() {
                let base = cfg.base_ejection_time.as_millis() as u64;
                let max = (cfg.max_ejection_time.as_millis() as u64).max(base);
                let time = (base * u64::from(n.max(1))).min(max);
                if now >= c.ejected_at.load(Ordering::Relaxed) + time {
                    h.set_ejected(false);
                    tracing::debug!(host = %h.address, "outlier detection returned host");
                }
            } else if n > 0 && c.interval_total.load(Ordering::Relaxed) > 0 {
                // Healthy through an interval: the next ejection will be shorter.
                c.ejections.store(n - 1, Ordering::Relaxed);
            }
        }
        // Success rate and failure percentage over the interval's counts.
        let stats: Vec<(usize, f64, u32)> = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_ejected())
            .map(|(i, h)| {
                let total = h.outlier.interval_total.load(Ordering::Relaxed);
                let ok = h.outlier.interval_success.load(Ordering::Relaxed);
                let rate = if total == 0 {
                    100.0
                } else {
                    100.0 * f64::from(ok) / f64::from(total)
                };
                (i, rate, total)
            })
            .collect();
        let sr: Vec<&(usize, f64, u32)> = stats
            .iter()
            .filter(|s| s.2 >= cfg.success_rate_request_volume)
            .collect();
        if !sr.is_empty() && sr.len() >= cfg.success_rate_minimum_hosts as usize {
            let mean = sr.iter().map(|s| s.1).sum::<f64>() / sr.len() as f64;
            let var = sr.iter().map(|s| (s.1 - mean).powi(2)).sum::<f64>() / sr.len() as f64;
            let threshold = mean - var.sqrt() * f64::from(cfg.success_rate_stdev_factor) / 1000.0;
            for s in &sr {
                if s.1 < threshold {
                    self.try_eject(
                        now,
                        &hosts[s.0],
                        hosts,
                        EjectionType::SuccessRate,
                        cfg.enforcing_success_rate,
                        rng,
                    );
                }
            }
        }
        let fp: Vec<&(usize, f64, u32)> = stats
            .iter()
            .filter(|s| s.2 >= cfg.failure_percentage_request_volume)
            .collect();
        if !fp.is_empty() && fp.len() >= cfg.failure_percentage_minimum_hosts as usize {
            for s in &fp {
                if 100.0 - s.1 >= f64::from(cfg.failure_percentage_threshold) {
                    self.try_eject(
                        now,
                        &hosts[s.0],
                        hosts,
                        EjectionType::FailurePercentage,
                        cfg.enforcing_failure_percentage,
                        rng,
                    );
                }
            }
        }
        for h in hosts {
            h.outlier.interval_total.store(0, Ordering::Relaxed);
            h.outlier.interval_success.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    thread_local! {
        static CLOCK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// The test clock.
    struct T;
    impl T {
        fn get() -> u64 {
            CLOCK.with(|c| c.get())
        }
        fn set(v: u64) {
            CLOCK.with(|c| c.set(v));
        }
    }

    fn hosts(n: u16) -> Vec<Arc<HostState>> {
        let ejected = Arc::new(AtomicUsize::new(0));
        (1..=n)
            .map(|p| {
                Arc::new(HostState::new(
                    SocketAddr::from(([10, 0, 0, 1], p)),
                    ejected.clone(),
                ))
            })
            .collect()
    }

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            max_ejection_percent: 100,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(10),
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn consecutive_5xx_ejects_and_the_host_returns_after_its_time() {
        T::set(0);
        let hs = hosts(4);
        let d = OutlierDetector::new_at(0, cfg());
        let mut rng = rand::rng();
        let r = |code| OutlierResult::Http(code);
        assert_eq!(d.report_at(T::get(), &hs[0], &hs, r(503), &mut rng), None);
        assert_eq!(d.report_at(T::get(), &hs[0], &hs, r(500), &mut rng), None);
        // A success resets the streak.
        assert_eq!(d.report_at(T::get(), &hs[0], &hs, r(200), &mut rng), None);
        d.report_at(T::get(), &hs[0], &hs, r(503), &mut rng);
        d.report_at(
            T::get(),
            &hs[0],
            &hs,
            OutlierResult::ConnectFailed,
            &mut rng,
        );
        assert_eq!(
            d.report_at(T::get(), &hs[0], &hs, r(500), &mut rng),
            Some(EjectionType::Consecutive5xx)
        );
        assert!(hs[0].is_ejected());
        // Still ejected after 9 s; back after 10 s (one ejection × base).
        T::set(T::get() + Duration::from_secs(9).as_millis() as u64);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(hs[0].is_ejected());
        T::set(T::get() + Duration::from_millis(1100).as_millis() as u64);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(!hs[0].is_ejected());
        // A second ejection right away lasts twice as long.
        for _ in 0..3 {
            d.report_at(T::get(), &hs[0], &hs, r(503), &mut rng);
        }
        assert!(hs[0].is_ejected());
        T::set(T::get() + Duration::from_millis(11_100).as_millis() as u64);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(hs[0].is_ejected());
        T::set(T::get() + Duration::from_secs(10).as_millis() as u64);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(!hs[0].is_ejected());
    }

    #[test]
    fn max_ejection_percent_and_enforcing_limit_ejections() {
        T::set(0);
        let hs = hosts(4);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                max_ejection_percent: 50,
                ..cfg()
            },
        );
        let mut rng = rand::rng();
        for h in &hs {
            for _ in 0..3 {
                d.report_at(T::get(), h, &hs, OutlierResult::Http(503), &mut rng);
            }
        }
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 2);
        // Gateway failures are not enforced by default.
        let hs = hosts(2);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                consecutive_5xx: 100,
                consecutive_gateway_failure: 2,
                max_ejection_percent: 100,
                ..cfg()
            },
        );
        for _ in 0..4 {
            d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(502), &mut rng);
        }
        assert!(!hs[0].is_ejected());
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                consecutive_5xx: 100,
                consecutive_gateway_failure: 2,
                enforcing_consecutive_gateway_failure: 100,
                max_ejection_percent: 100,
                ..cfg()
            },
        );
        d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(502), &mut rng);
        assert_eq!(
            d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(504), &mut rng),
            Some(EjectionType::ConsecutiveGatewayFailure)
        );
        // Default max_ejection_percent (10) with 2 hosts ejects nobody…
        let hs = hosts(2);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                max_ejection_percent: 10,
                ..cfg()
            },
        );
        for _ in 0..3 {
            d.report_at(T::get(), &hs[1], &hs, OutlierResult::Http(503), &mut rng);
        }
        assert!(!hs[1].is_ejected());
        // …unless always_eject_one_host.
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                max_ejection_percent: 10,
                always_eject_one_host: true,
                ..cfg()
            },
        );
        for _ in 0..3 {
            d.report_at(T::get(), &hs[1], &hs, OutlierResult::Http(503), &mut rng);
        }
        assert!(hs[1].is_ejected());
    }

    #[test]
    fn detections_overflows_and_enforcements_are_counted_as_envoy_does() {
        T::set(0);
        let mut rng = rand::rng();
        let c5xx = EjectionType::Consecutive5xx.index();
        // 4 hosts, at most half ejected: every host reaches the threshold once; two are
        // ejected, the other two detections overflow.
        let hs = hosts(4);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                max_ejection_percent: 50,
                ..cfg()
            },
        );
        for h in &hs {
            for _ in 0..3 {
                d.report_at(T::get(), h, &hs, OutlierResult::Http(503), &mut rng);
            }
        }
        // More failures of an ejected host detect nothing.
        for _ in 0..3 {
            d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(503), &mut rng);
        }
        let counts = d.stats().take();
        assert_eq!(counts.detected[c5xx], 4);
        assert_eq!(counts.enforced[c5xx], 2);
        assert_eq!(counts.overflow, 2);
        assert_eq!(counts.total, 2);
        assert_eq!(counts.detected.iter().sum::<u64>(), 4);
        // Taken: the next read starts from zero.
        assert_eq!(d.stats().take(), OutlierCounts::default());

        // enforcing_consecutive_5xx: 0 → detected (and in the deprecated total), never ejected.
        let hs = hosts(2);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                enforcing_consecutive_5xx: 0,
                ..cfg()
            },
        );
        for _ in 0..6 {
            assert_eq!(
                d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(500), &mut rng),
                None
            );
        }
        assert!(!hs[0].is_ejected());
        let counts = d.stats().take();
        assert_eq!(counts.detected[c5xx], 2);
        assert_eq!(counts.enforced, [0; 5]);
        assert_eq!((counts.overflow, counts.total), (0, 2));

        // Gateway failures (not enforced by default) are detected under their own type and
        // are not in the deprecated total.
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                consecutive_5xx: 100,
                consecutive_gateway_failure: 2,
                ..cfg()
            },
        );
        for _ in 0..4 {
            d.report_at(T::get(), &hs[1], &hs, OutlierResult::Http(502), &mut rng);
        }
        let counts = d.stats().take();
        assert_eq!(
            counts.detected[EjectionType::ConsecutiveGatewayFailure.index()],
            2
        );
        assert_eq!((counts.enforced, counts.total), ([0; 5], 0));
    }

    #[test]
    fn local_origin_failures_split_out() {
        T::set(0);
        let hs = hosts(2);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                split_external_local_origin_errors: true,
                consecutive_local_origin_failure: 2,
                ..cfg()
            },
        );
        let mut rng = rand::rng();
        // 5xx responses and local failures count separately.
        d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(503), &mut rng);
        d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(503), &mut rng);
        d.report_at(T::get(), &hs[0], &hs, OutlierResult::Timeout, &mut rng);
        assert!(!hs[0].is_ejected());
        assert_eq!(
            d.report_at(
                T::get(),
                &hs[0],
                &hs,
                OutlierResult::ConnectFailed,
                &mut rng
            ),
            Some(EjectionType::ConsecutiveLocalOriginFailure)
        );
    }

    #[test]
    fn success_rate_and_failure_percentage_eject_on_the_sweep() {
        T::set(0);
        let hs = hosts(5);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                consecutive_5xx: 1000,
                max_ejection_percent: 100,
                success_rate_request_volume: 10,
                ..cfg()
            },
        );
        let mut rng = rand::rng();
        for (i, h) in hs.iter().enumerate() {
            for k in 0..20 {
                let fail = i == 4 && k % 2 == 0;
                d.report_at(
                    T::get(),
                    h,
                    &hs,
                    OutlierResult::Http(if fail { 500 } else { 200 }),
                    &mut rng,
                );
            }
        }
        assert!(!hs[4].is_ejected());
        T::set(T::get() + Duration::from_millis(1100).as_millis() as u64);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(hs[4].is_ejected());
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 1);
        // Detected and enforced as success-rate ejections (in the deprecated total too).
        let counts = d.stats().take();
        let (sr, fp) = (
            EjectionType::SuccessRate.index(),
            EjectionType::FailurePercentage.index(),
        );
        assert_eq!((counts.detected[sr], counts.enforced[sr]), (1, 1));
        assert_eq!((counts.detected[fp], counts.total), (0, 1));

        let hs = hosts(5);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                consecutive_5xx: 1000,
                max_ejection_percent: 100,
                enforcing_success_rate: 0,
                enforcing_failure_percentage: 100,
                failure_percentage_threshold: 50,
                failure_percentage_request_volume: 10,
                ..cfg()
            },
        );
        for (i, h) in hs.iter().enumerate() {
            for k in 0..10 {
                let fail = i == 2 && k < 6;
                d.report_at(
                    T::get(),
                    h,
                    &hs,
                    OutlierResult::Http(if fail { 503 } else { 200 }),
                    &mut rng,
                );
            }
        }
        T::set(T::get() + Duration::from_millis(1100).as_millis() as u64);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(hs[2].is_ejected());
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 1);
        let counts = d.stats().take();
        assert_eq!((counts.detected[fp], counts.enforced[fp]), (1, 1));
        assert_eq!((counts.detected[sr], counts.total), (0, 0));
    }

    #[test]
    fn retry_budget_replaces_max_retries() {
        let plain = CircuitBreakers {
            max_retries: 5,
            ..CircuitBreakers::default()
        };
        assert_eq!(plain.retry_limit(1000), 5);
        let budget = CircuitBreakers {
            max_retries: 5,
            retry_budget: Some(RetryBudget::default()),
            ..CircuitBreakers::default()
        };
        // 20% of the active requests, at least 3.
        assert_eq!(budget.retry_limit(0), 3);
        assert_eq!(budget.retry_limit(19), 3);
        assert_eq!(budget.retry_limit(20), 4);
        assert_eq!(budget.retry_limit(24), 4);
        assert_eq!(budget.retry_limit(100), 20);
        let none = CircuitBreakers {
            retry_budget: Some(RetryBudget {
                budget_percent: crate::lb::Real(0.0),
                min_retry_concurrency: 0,
            }),
            ..CircuitBreakers::default()
        };
        assert_eq!(none.retry_limit(1000), 0);
    }
}
