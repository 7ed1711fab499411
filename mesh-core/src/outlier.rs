//! Outlier detection (Envoy's `outlier_detection`) and circuit breaker thresholds.
//!
//! Consecutive-error ejections (`consecutive_5xx`, `consecutive_gateway_failure`,
//! `consecutive_local_origin_failure`) happen as soon as the threshold is reached; success-rate
//! and failure-percentage ejections, and the return of ejected hosts, happen on the `interval`
//! sweep. An ejection lasts `base_ejection_time × backoff` (capped at `max_ejection_time`):
//! each ejection raises the host's backoff by one while `backoff × base_ejection_time` is below
//! `max_ejection_time + base_ejection_time`, and each sweep that finds the host back for at
//! least an interval lowers it by one; each ejection also lasts a random extra of up to
//! `max_ejection_time_jitter`. A returning host starts its consecutive-error counts
//! from zero. No ejection may take the ejected share of hosts above `max_ejection_percent`
//! (unless `always_eject_one_host` and none is ejected). Each ejection type is enforced with
//! its `enforcing_*` probability.
//!
//! With `split_external_local_origin_errors`, as in Envoy, each host keeps two sets of counts:
//! external (the upstream's HTTP status codes: consecutive 5xx and gateway failures, and the
//! success rate the `success_rate_*` / `failure_percentage_*` sweep uses) and local origin
//! (whether a connection could be used: every attempt that got one counts a local-origin
//! success, which also ends a run of `consecutive_local_origin_failure`; connect failures,
//! resets and timeouts count local-origin failures). Local-origin success-rate and
//! failure-percentage ejections use the same thresholds over the local-origin counts and are
//! enforced with `enforcing_local_origin_success_rate` and
//! `enforcing_failure_percentage_local_origin`. Without the split, local failures count as the
//! 503 (connect failure, reset) or 504 (timeout) Envoy answers.
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
    /// `max_ejection_time` (300 s; never below `base_ejection_time` when unset).
    pub max_ejection_time: Duration,
    /// `max_ejection_time_jitter` (0): each ejection lasts a random 0..=jitter longer.
    pub max_ejection_time_jitter: Duration,
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
    /// `enforcing_local_origin_success_rate` (100; with the split only).
    pub enforcing_local_origin_success_rate: u32,
    /// `enforcing_failure_percentage_local_origin` (0; with the split only).
    pub enforcing_failure_percentage_local_origin: u32,
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
            max_ejection_time_jitter: Duration::ZERO,
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
            enforcing_local_origin_success_rate: 100,
            enforcing_failure_percentage_local_origin: 0,
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
    /// External-origin requests (all requests without the split) and successes this interval.
    interval_success: AtomicU32,
    interval_total: AtomicU32,
    /// Local-origin results and successes this interval (with the split only).
    local_success: AtomicU32,
    local_total: AtomicU32,
    /// Envoy's eject-time backoff (the ejection-time multiplier).
    ejections: AtomicU32,
    /// When the current ejection started (ms since the process clock epoch).
    ejected_at: AtomicU64,
    /// The current ejection's jitter (ms).
    jitter: AtomicU64,
    /// When the host last returned (0: never ejected).
    unejected_at: AtomicU64,
}

impl HostCounters {
    /// A local-origin success: a connection was there for the request.
    fn local_success(&self) {
        self.local_total.fetch_add(1, Ordering::Relaxed);
        self.local_success.fetch_add(1, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }

    /// The interval's (successes, total) of the external or the local-origin counts.
    fn interval(&self, origin: Origin) -> (u32, u32) {
        let (ok, total) = match origin {
            Origin::External => (&self.interval_success, &self.interval_total),
            Origin::Local => (&self.local_success, &self.local_total),
        };
        (ok.load(Ordering::Relaxed), total.load(Ordering::Relaxed))
    }
}

/// Which of a host's success-rate counts a sweep looks at (Envoy's `SuccessRateMonitorType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    External,
    Local,
}

/// How one request to a host ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierResult {
    /// The upstream answered with this status.
    Http(u16),
    /// Connecting failed (local origin).
    ConnectFailed,
    /// A connection carrying no protocol mesh sees into (TCP proxy) was established: Envoy's
    /// `LocalOriginConnectSuccessFinal`, a 200 without the split, a local-origin success with it.
    ConnectSucceeded,
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
    /// Local-origin success rate below the cluster's (with the split).
    SuccessRateLocalOrigin,
    /// Local-origin failure percentage above the threshold (with the split).
    FailurePercentageLocalOrigin,
}

impl EjectionType {
    /// Every type, in the order of [`OutlierCounts`]' per-type arrays.
    pub const ALL: [EjectionType; EJECTION_TYPES] = [
        EjectionType::Consecutive5xx,
        EjectionType::ConsecutiveGatewayFailure,
        EjectionType::ConsecutiveLocalOriginFailure,
        EjectionType::SuccessRate,
        EjectionType::FailurePercentage,
        EjectionType::SuccessRateLocalOrigin,
        EjectionType::FailurePercentageLocalOrigin,
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
            EjectionType::SuccessRateLocalOrigin => "local_origin_success_rate",
            EjectionType::FailurePercentageLocalOrigin => "local_origin_failure_percentage",
        }
    }

    /// Its index in [`ALL`](Self::ALL) and in [`OutlierCounts`]' per-type arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How many ejection types there are.
pub const EJECTION_TYPES: usize = 7;

/// What a detector decided since the counts were last taken, as Envoy's
/// `outlier_detection.*` counters count it (`DetectorImpl::ejectHost`,
/// `updateDetectedEjectionStats`, `updateEnforcedEjectionStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutlierCounts {
    /// `ejections_detected_<type>`: a threshold reached by a host not already ejected,
    /// whether or not the ejection was then allowed and enforced.
    pub detected: [u64; EJECTION_TYPES],
    /// `ejections_enforced_<type>`: hosts actually ejected.
    pub enforced: [u64; EJECTION_TYPES],
    /// `ejections_overflow`: detections refused by `max_ejection_percent`.
    pub overflow: u64,
    /// The deprecated `ejections_total`: consecutive-5xx and (external) success-rate
    /// detections that `max_ejection_percent` allowed (enforced or not).
    pub total: u64,
}

impl OutlierCounts {
    /// `ejections_enforced_total`: every enforced ejection.
    pub fn enforced_total(&self) -> u64 {
        self.enforced.iter().sum()
    }
}

/// The detector's counters since it was created; [`take`](Self::take) hands out what was added
/// since the last take to whoever records them as metrics.
#[derive(Debug, Default)]
pub struct OutlierStats {
    detected: [AtomicU64; EJECTION_TYPES],
    enforced: [AtomicU64; EJECTION_TYPES],
    overflow: AtomicU64,
    total: AtomicU64,
    /// Each counter's value at the last [`take`](Self::take) that saw it highest (no lock:
    /// `take` runs on the request path).
    taken_detected: [AtomicU64; EJECTION_TYPES],
    taken_enforced: [AtomicU64; EJECTION_TYPES],
    taken_overflow: AtomicU64,
    taken_total: AtomicU64,
}

impl OutlierStats {
    /// The counts since the detector was created.
    pub fn counts(&self) -> OutlierCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OutlierCounts {
            detected: std::array::from_fn(|i| load(&self.detected[i])),
            enforced: std::array::from_fn(|i| load(&self.enforced[i])),
            overflow: load(&self.overflow),
            total: load(&self.total),
        }
    }

    /// The counts since the last call (several recorders of one cluster then never count an
    /// event twice).
    pub fn take(&self) -> OutlierCounts {
        // The counters only grow, so raising the taken mark to what this call read hands out
        // exactly the events no other call has: a concurrent call that read less gets nothing.
        let take = |count: &AtomicU64, taken: &AtomicU64| {
            let now = count.load(Ordering::Relaxed);
            now.saturating_sub(taken.fetch_max(now, Ordering::Relaxed))
        };
        OutlierCounts {
            detected: std::array::from_fn(|i| take(&self.detected[i], &self.taken_detected[i])),
            enforced: std::array::from_fn(|i| take(&self.enforced[i], &self.taken_enforced[i])),
            overflow: take(&self.overflow, &self.taken_overflow),
            total: take(&self.total, &self.taken_total),
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
        if cfg.split_external_local_origin_errors {
            // Envoy's router reports a local-origin success when the pool hands the request a
            // connection, then the response code, or a local-origin failure for a reset or
            // timeout after that; a connect failure is only the failure.
            if result != OutlierResult::ConnectFailed {
                c.local_success();
            }
            if result == OutlierResult::ConnectSucceeded {
                return None;
            }
            let OutlierResult::Http(_) = result else {
                c.local_total.fetch_add(1, Ordering::Relaxed);
                let n = c.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= cfg.consecutive_local_origin_failure
                    && cfg.consecutive_local_origin_failure > 0
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
            };
        }
        // Without the split, local-origin failures count as the 5xx Envoy would answer.
        let status = match result {
            OutlierResult::Http(s) => s,
            OutlierResult::ConnectSucceeded => 200,
            OutlierResult::ConnectFailed | OutlierResult::Reset => 503,
            OutlierResult::Timeout => 504,
        };
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
        // A consecutive-error threshold reached by an ejected host is dropped; a sweep's
        // success-rate or failure-percentage outlier is counted even when an earlier check of
        // the same sweep ejected it (Envoy picks a sweep's candidates before ejecting any).
        let rate = matches!(
            kind,
            EjectionType::SuccessRate
                | EjectionType::FailurePercentage
                | EjectionType::SuccessRateLocalOrigin
                | EjectionType::FailurePercentageLocalOrigin
        );
        if host.is_ejected() && !rate {
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
        if host.is_ejected() {
            // Envoy would eject it a second time (README: knowingly differs).
            return None;
        }
        stats.enforced[kind.index()].fetch_add(1, Ordering::Relaxed);
        // The backoff grows while `backoff × base` is below `max + base`.
        let (base, max) = self.ejection_times();
        let c = &host.outlier;
        let backoff = u64::from(c.ejections.load(Ordering::Relaxed));
        if backoff * base < max + base {
            c.ejections.fetch_add(1, Ordering::Relaxed);
        }
        c.ejected_at.store(now, Ordering::Relaxed);
        let max_jitter = self.config.max_ejection_time_jitter.as_millis() as u64;
        c.jitter
            .store(rng.random_range(0..=max_jitter), Ordering::Relaxed);
        host.set_ejected(true);
        tracing::debug!(host = %host.address, ?kind, "outlier detection ejected host");
        Some(kind)
    }

    /// (`base_ejection_time`, `max_ejection_time`) in ms.
    fn ejection_times(&self) -> (u64, u64) {
        let base = self.config.base_ejection_time.as_millis() as u64;
        let max = (self.config.max_ejection_time.as_millis() as u64).max(base);
        (base, max)
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
        // Envoy sweeps on a timer every interval; this sweep stands for every sweep due since
        // (at `due + k × interval`, k < sweeps) as far as returns and backoffs go, and the next
        // stays on that grid.
        let interval = self.config.interval.as_millis().max(1) as u64;
        let sweeps = 1 + (now - due) / interval;
        let next = due + sweeps * interval;
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // The first of those sweeps at or after `t`, as an index (may be ≥ sweeps: none).
        let first_at = |t: u64| t.saturating_sub(due).div_ceil(interval);
        let cfg = &self.config;
        let (base, max) = self.ejection_times();
        for h in hosts {
            let c = &h.outlier;
            if h.is_ejected() {
                let time = (base * u64::from(c.ejections.load(Ordering::Relaxed))).min(max)
                    + c.jitter.load(Ordering::Relaxed);
                let k = first_at(c.ejected_at.load(Ordering::Relaxed) + time);
                if k < sweeps {
                    h.set_ejected(false);
                    // A returning host starts its runs of errors from zero.
                    c.consecutive_5xx.store(0, Ordering::Relaxed);
                    c.consecutive_gateway.store(0, Ordering::Relaxed);
                    c.consecutive_local.store(0, Ordering::Relaxed);
                    c.unejected_at.store(due + k * interval, Ordering::Relaxed);
                    tracing::debug!(host = %h.address, "outlier detection returned host");
                }
            }
        }
        self.rate_ejections(now, hosts, Origin::External, rng);
        if cfg.split_external_local_origin_errors {
            self.rate_ejections(now, hosts, Origin::Local, rng);
        }
        for h in hosts {
            let c = &h.outlier;
            c.interval_total.store(0, Ordering::Relaxed);
            c.interval_success.store(0, Ordering::Relaxed);
            c.local_total.store(0, Ordering::Relaxed);
            c.local_success.store(0, Ordering::Relaxed);
            // Each sweep that finds the host back for at least an interval lowers its backoff.
            let back = c.unejected_at.load(Ordering::Relaxed);
            if !h.is_ejected() && back > 0 {
                let lower = sweeps.saturating_sub(first_at(back + interval));
                let n = u64::from(c.ejections.load(Ordering::Relaxed));
                c.ejections
                    .store(n.saturating_sub(lower) as u32, Ordering::Relaxed);
            }
        }
    }

    /// Success-rate and failure-percentage ejection over the interval's external or
    /// local-origin counts (Envoy's `processSuccessRateEjections`): hosts not ejected with at
    /// least one request; success rate needs `success_rate_minimum_hosts` hosts with
    /// `success_rate_request_volume` requests and ejects those below
    /// `mean − stdev × success_rate_stdev_factor / 1000`; failure percentage needs
    /// `failure_percentage_minimum_hosts` hosts with `failure_percentage_request_volume`
    /// requests and ejects those failing at least `failure_percentage_threshold` %.
    fn rate_ejections<R: Rng + ?Sized>(
        &self,
        now: u64,
        hosts: &[Arc<HostState>],
        origin: Origin,
        rng: &mut R,
    ) {
        let cfg = &self.config;
        let (sr_kind, sr_enforcing, fp_kind, fp_enforcing) = match origin {
            Origin::External => (
                EjectionType::SuccessRate,
                cfg.enforcing_success_rate,
                EjectionType::FailurePercentage,
                cfg.enforcing_failure_percentage,
            ),
            Origin::Local => (
                EjectionType::SuccessRateLocalOrigin,
                cfg.enforcing_local_origin_success_rate,
                EjectionType::FailurePercentageLocalOrigin,
                cfg.enforcing_failure_percentage_local_origin,
            ),
        };
        // (host index, success rate %, requests)
        let stats: Vec<(usize, f64, u32)> = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_ejected())
            .filter_map(|(i, h)| {
                let (ok, total) = h.outlier.interval(origin);
                (total > 0).then(|| (i, 100.0 * f64::from(ok) / f64::from(total), total))
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
            for s in sr.iter().filter(|s| s.1 < threshold) {
                self.try_eject(now, &hosts[s.0], hosts, sr_kind, sr_enforcing, rng);
            }
        }
        let fp: Vec<&(usize, f64, u32)> = stats
            .iter()
            .filter(|s| s.2 >= cfg.failure_percentage_request_volume)
            .collect();
        if !fp.is_empty() && fp.len() >= cfg.failure_percentage_minimum_hosts as usize {
            let threshold = f64::from(cfg.failure_percentage_threshold);
            for s in fp.iter().filter(|s| 100.0 - s.1 >= threshold) {
                self.try_eject(now, &hosts[s.0], hosts, fp_kind, fp_enforcing, rng);
            }
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
        assert_eq!(counts.enforced, [0; EJECTION_TYPES]);
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
        assert_eq!((counts.enforced, counts.total), ([0; EJECTION_TYPES], 0));
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
        // 5xx responses and local failures count separately. Each timeout or reset had a
        // connection first (a local-origin success that ends the run), so they never make a
        // run of two…
        for r in [
            OutlierResult::Http(503),
            OutlierResult::Http(503),
            OutlierResult::Timeout,
            OutlierResult::Reset,
            OutlierResult::Timeout,
        ] {
            assert_eq!(d.report_at(T::get(), &hs[0], &hs, r, &mut rng), None);
        }
        // Local-origin counts: 2 answers + 3 × (success + failure); external: the answers.
        assert_eq!(hs[0].outlier.interval(Origin::Local), (5, 8));
        assert_eq!(hs[0].outlier.interval(Origin::External), (0, 2));
        // …but a connect failure right after one does.
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
    fn tcp_connect_success_counts_as_envoy_local_origin_connect_success_final() {
        T::set(0);
        let hs = hosts(2);
        let mut rng = rand::rng();
        // Without the split: a 200, ending a run of connect failures (503s).
        let d = OutlierDetector::new_at(0, cfg());
        for r in [
            OutlierResult::ConnectFailed,
            OutlierResult::ConnectFailed,
            OutlierResult::ConnectSucceeded,
            OutlierResult::ConnectFailed,
            OutlierResult::ConnectFailed,
        ] {
            assert_eq!(d.report_at(T::get(), &hs[0], &hs, r, &mut rng), None);
        }
        assert_eq!(hs[0].outlier.interval(Origin::External), (1, 5));
        // With it: a local-origin success only; the external counts stay untouched.
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                split_external_local_origin_errors: true,
                consecutive_local_origin_failure: 2,
                ..cfg()
            },
        );
        let r = OutlierResult::ConnectSucceeded;
        assert_eq!(d.report_at(T::get(), &hs[1], &hs, r, &mut rng), None);
        assert_eq!(hs[1].outlier.interval(Origin::Local), (1, 1));
        assert_eq!(hs[1].outlier.interval(Origin::External), (0, 0));
        let r = OutlierResult::ConnectFailed;
        assert_eq!(d.report_at(T::get(), &hs[1], &hs, r, &mut rng), None);
        assert_eq!(
            d.report_at(T::get(), &hs[1], &hs, r, &mut rng),
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

    /// Feeds `n` results to each host: `fail(host, k)` picks the result of the k-th.
    fn feed(
        d: &OutlierDetector,
        hs: &[Arc<HostState>],
        n: usize,
        fail: impl Fn(usize, usize) -> OutlierResult,
    ) {
        let mut rng = rand::rng();
        for (i, h) in hs.iter().enumerate() {
            for k in 0..n {
                d.report_at(T::get(), h, hs, fail(i, k), &mut rng);
            }
        }
    }

    fn next_interval(d: &OutlierDetector, hs: &[Arc<HostState>]) {
        T::set(T::get() + 1100);
        d.sweep_at(T::get(), hs, &mut rand::rng());
    }

    fn split() -> OutlierDetection {
        OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_5xx: 1000,
            consecutive_local_origin_failure: 1000,
            max_ejection_percent: 100,
            success_rate_request_volume: 10,
            failure_percentage_request_volume: 10,
            ..cfg()
        }
    }

    /// Five hosts under `cfg` through one interval where host 4 fails every other of 20
    /// requests with `fail`: the hosts and the detector's counts.
    fn host_4_half_failing(
        cfg: OutlierDetection,
        fail: OutlierResult,
    ) -> (Vec<Arc<HostState>>, OutlierCounts) {
        let hs = hosts(5);
        let d = OutlierDetector::new_at(T::get(), cfg);
        feed(&d, &hs, 20, |i, k| {
            if i == 4 && k % 2 == 0 {
                fail
            } else {
                OutlierResult::Http(200)
            }
        });
        next_interval(&d, &hs);
        let counts = d.stats().take();
        (hs, counts)
    }

    #[test]
    fn local_origin_success_rate_ejects_on_local_counts_only() {
        T::set(0);
        let (sr, srl, fpl) = (
            EjectionType::SuccessRate.index(),
            EjectionType::SuccessRateLocalOrigin.index(),
            EjectionType::FailurePercentageLocalOrigin.index(),
        );
        // Host 4 fails to connect half the time; the others answer 200. The external counts
        // of host 4 are all successes (its answered requests), so only the local-origin
        // success rate sees it.
        let (hs, c) = host_4_half_failing(split(), OutlierResult::ConnectFailed);
        assert!(hs[4].is_ejected());
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 1);
        assert_eq!((c.detected[srl], c.enforced[srl]), (1, 1));
        // Not an external success-rate ejection, and not in the deprecated total.
        assert_eq!((c.detected[sr], c.total), (0, 0));

        // enforcing_local_origin_success_rate: 0 → detected, not ejected.
        let cfg = OutlierDetection {
            enforcing_local_origin_success_rate: 0,
            ..split()
        };
        let (hs, c) = host_4_half_failing(cfg, OutlierResult::ConnectFailed);
        assert!(!hs[4].is_ejected());
        assert_eq!((c.detected[srl], c.enforced[srl]), (1, 0));

        // Without the split the same connect failures are 503s: an external success-rate
        // ejection.
        let cfg = OutlierDetection {
            split_external_local_origin_errors: false,
            ..split()
        };
        let (hs, c) = host_4_half_failing(cfg, OutlierResult::ConnectFailed);
        assert!(hs[4].is_ejected());
        assert_eq!((c.detected[sr], c.detected[srl], c.total), (1, 0, 1));

        // With the split, 5xx answers are external: a host answering 500 half the time is an
        // external success-rate outlier and its local-origin counts are all successes.
        let cfg = OutlierDetection {
            enforcing_failure_percentage_local_origin: 100,
            failure_percentage_threshold: 40,
            ..split()
        };
        let (hs, c) = host_4_half_failing(cfg, OutlierResult::Http(500));
        assert!(hs[4].is_ejected());
        assert_eq!(
            (c.detected[sr], c.detected[srl], c.detected[fpl]),
            (1, 0, 0)
        );
    }

    #[test]
    fn local_origin_failure_percentage_is_enforced_on_its_own() {
        T::set(0);
        let (fp, fpl, srl) = (
            EjectionType::FailurePercentage.index(),
            EjectionType::FailurePercentageLocalOrigin.index(),
            EjectionType::SuccessRateLocalOrigin.index(),
        );
        let cfg = OutlierDetection {
            enforcing_success_rate: 0,
            enforcing_local_origin_success_rate: 0,
            enforcing_failure_percentage: 100,
            enforcing_failure_percentage_local_origin: 100,
            failure_percentage_threshold: 50,
            // Host 1 has too few external results to count there: four hosts remain.
            failure_percentage_minimum_hosts: 4,
            ..split()
        };
        // Host 1: 6 of 10 connects fail (60% ≥ 50%) → local-origin failure percentage.
        // Host 3: 6 of 10 answers are 503 → external failure percentage.
        let hs = hosts(5);
        let d = OutlierDetector::new_at(0, cfg.clone());
        feed(&d, &hs, 10, |i, k| match (i, k < 6) {
            (1, true) => OutlierResult::ConnectFailed,
            (3, true) => OutlierResult::Http(503),
            _ => OutlierResult::Http(200),
        });
        next_interval(&d, &hs);
        assert!(hs[1].is_ejected() && hs[3].is_ejected());
        assert_eq!(hs.iter().filter(|h| h.is_ejected()).count(), 2);
        let c = d.stats().take();
        assert_eq!((c.detected[fpl], c.enforced[fpl]), (1, 1));
        assert_eq!((c.detected[fp], c.enforced[fp]), (1, 1));
        // The success-rate detections (not enforced) are counted too.
        assert_eq!(c.enforced[srl], 0);
        assert_eq!(c.enforced_total(), 2);

        // Its enforcing at 0: detected only.
        let hs = hosts(5);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                enforcing_failure_percentage_local_origin: 0,
                ..cfg
            },
        );
        feed(&d, &hs, 10, |i, k| {
            if i == 1 && k < 6 {
                OutlierResult::ConnectFailed
            } else {
                OutlierResult::Http(200)
            }
        });
        next_interval(&d, &hs);
        assert!(!hs[1].is_ejected());
        let c = d.stats().take();
        assert_eq!((c.detected[fpl], c.enforced[fpl]), (1, 0));

        // A host the sweep's success-rate check ejected is still a failure-percentage outlier
        // of the same sweep: detected (as Envoy counts it), not ejected twice.
        let hs = hosts(5);
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                enforcing_failure_percentage_local_origin: 100,
                ..split()
            },
        );
        feed(&d, &hs, 10, |i, _| {
            if i == 1 {
                OutlierResult::ConnectFailed
            } else {
                OutlierResult::Http(200)
            }
        });
        next_interval(&d, &hs);
        assert!(hs[1].is_ejected());
        let c = d.stats().take();
        assert_eq!((c.detected[srl], c.enforced[srl]), (1, 1));
        assert_eq!((c.detected[fpl], c.enforced[fpl]), (1, 0));
        assert_eq!(hs[1].outlier.ejections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn backoff_is_capped_and_lowered_by_every_interval_back() {
        T::set(0);
        let mut rng = rand::rng();
        let hs = hosts(4);
        // base 10 s, max 25 s: an ejection raises the backoff while backoff × 10 s < 35 s,
        // so it stops at 4 (each ejection still lasting at most 25 s).
        let d = OutlierDetector::new_at(
            0,
            OutlierDetection {
                max_ejection_time: Duration::from_secs(25),
                ..cfg()
            },
        );
        let eject = |d: &OutlierDetector| {
            for _ in 0..3 {
                d.report_at(
                    T::get(),
                    &hs[0],
                    &hs,
                    OutlierResult::Http(503),
                    &mut rand::rng(),
                );
            }
            assert!(hs[0].is_ejected());
        };
        // Ejected again as soon as it returns: 10, 20, then max_ejection_time (25 s) each.
        let mut lasted = Vec::new();
        for _ in 0..6 {
            eject(&d);
            let mut secs = 0;
            while hs[0].is_ejected() && secs < 100 {
                T::set(T::get() + 1_000);
                d.sweep_at(T::get(), &hs, &mut rng);
                secs += 1;
            }
            lasted.push(secs);
        }
        assert_eq!(lasted, [10, 20, 25, 25, 25, 25]);
        assert_eq!(hs[0].outlier.ejections.load(Ordering::Relaxed), 4);
        // Back for a long idle time (no report, no pick): the lazy sweep lowers the backoff
        // once per interval that Envoy's timer would have fired, here to zero.
        T::set(T::get() + 60_000);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert_eq!(hs[0].outlier.ejections.load(Ordering::Relaxed), 0);
        // So the next ejection lasts one base time again.
        eject(&d);
        T::set(T::get() + 10_500);
        d.sweep_at(T::get(), &hs, &mut rng);
        assert!(!hs[0].is_ejected());
        // A returned host starts its runs from zero: two more 503s do not eject it.
        d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(503), &mut rng);
        d.report_at(T::get(), &hs[0], &hs, OutlierResult::Http(503), &mut rng);
        assert!(!hs[0].is_ejected());
    }

    #[test]
    fn jitter_lengthens_an_ejection_by_at_most_max_ejection_time_jitter() {
        let mut rng = rand::rng();
        let mut lasted = std::collections::BTreeSet::new();
        for _ in 0..20 {
            T::set(0);
            let hs = hosts(2);
            let d = OutlierDetector::new_at(
                0,
                OutlierDetection {
                    max_ejection_time_jitter: Duration::from_secs(5),
                    ..cfg()
                },
            );
            feed(&d, &hs[..1], 3, |_, _| OutlierResult::Http(503));
            assert!(hs[0].is_ejected());
            let mut secs = 0;
            while hs[0].is_ejected() && secs < 100 {
                T::set(T::get() + 1_000);
                d.sweep_at(T::get(), &hs, &mut rng);
                secs += 1;
            }
            lasted.insert(secs);
        }
        // base 10 s plus 0..=5 s, seen on the 1 s sweeps.
        assert!(lasted.iter().all(|s| (10..=15).contains(s)), "{lasted:?}");
        assert!(lasted.len() > 1, "the jitter varies: {lasted:?}");
    }

    #[test]
    fn counts_are_cumulative_and_take_hands_out_each_event_once() {
        T::set(0);
        let hs = hosts(2);
        let d = OutlierDetector::new_at(0, cfg());
        feed(&d, &hs[..1], 3, |_, _| OutlierResult::Http(503));
        let c5 = EjectionType::Consecutive5xx.index();
        assert_eq!(d.stats().take().enforced[c5], 1);
        assert_eq!(d.stats().take(), OutlierCounts::default());
        assert_eq!(d.stats().counts().enforced[c5], 1);
    }

    #[test]
    fn concurrent_takes_hand_out_each_event_exactly_once() {
        // Takes run on the request path, concurrently and without a lock: together they hand
        // out every event once, never twice, whatever the interleaving.
        let stats = Arc::new(OutlierStats::default());
        let c5 = EjectionType::Consecutive5xx.index();
        let events = 20_000u64;
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let stats = Arc::clone(&stats);
                std::thread::spawn(move || {
                    let mut got = OutlierCounts::default();
                    for _ in 0..events {
                        let n = stats.take();
                        got.enforced[c5] += n.enforced[c5];
                        got.overflow += n.overflow;
                    }
                    got
                })
            })
            .collect();
        for _ in 0..events {
            stats.enforced[c5].fetch_add(1, Ordering::Relaxed);
            stats.overflow.fetch_add(2, Ordering::Relaxed);
        }
        let mut sum = stats.take();
        for t in takers {
            let got = t.join().unwrap();
            sum.enforced[c5] += got.enforced[c5];
            sum.overflow += got.overflow;
        }
        assert_eq!((sum.enforced[c5], sum.overflow), (events, 2 * events));
        assert_eq!(stats.take(), OutlierCounts::default());
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
