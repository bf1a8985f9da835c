//! The breaker of one endpoint as a pure state machine, shared by the local and Redis modes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{BreakerConfig, Trip};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Deliveries go through; failures are counted.
    #[default]
    Closed,
    /// Deliveries are deferred until the open period ends.
    Open,
    /// A few probe deliveries go through; their outcome closes or re-opens the breaker.
    HalfOpen,
}

/// Buckets the failure-ratio window is counted in.
const BUCKETS: u64 = 10;

/// The stored state of one endpoint's breaker. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Breaker {
    pub(crate) phase: Phase,
    pub(crate) consecutive_failures: u32,
    /// `(bucket start, requests, failures)`, oldest first.
    pub(crate) window: Vec<(u64, u32, u32)>,
    pub(crate) open_until: u64,
    pub(crate) half_open_since: u64,
    pub(crate) probes_sent: u32,
    pub(crate) probe_successes: u32,
    /// When the probes sent so far must have ended (their attempts' timeouts), so that the
    /// deliveries held back meanwhile wait for the verdict instead of asking again and again.
    /// 0 in state written before it existed.
    #[serde(default)]
    pub(crate) verdict_due: u64,
}

/// What the breaker says about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Send it; `probe` when it is one of the half-open probes.
    Go { probe: bool },
    /// Not before this long.
    Defer(Duration),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Breaker {
    /// Decides on one delivery at `now`; `probe_wait` is how long its attempt may take, should
    /// it be sent as a probe.
    pub(crate) fn admit(&mut self, config: &BreakerConfig, now: u64, probe_wait: Duration) -> Admission {
        if self.phase == Phase::Open {
            if now < self.open_until {
                // Never open longer than `open_for` from now, whatever the state says (written
                // with another config, or tampered with).
                let open_for = millis(config.open_for);
                if self.open_until - now > open_for {
                    self.open_until = now.saturating_add(open_for);
                }
                return Admission::Defer(Duration::from_millis(self.open_until - now));
            }
            self.half_open(now);
        }
        if self.phase == Phase::HalfOpen {
            // Probes whose outcome never came back (a worker killed mid-probe) are given up
            // after an open period, so the breaker cannot stay half-open forever.
            let give_up_at = self.half_open_since.saturating_add(millis(config.open_for));
            if self.probes_sent >= config.half_open_probes && now >= give_up_at {
                self.half_open(now);
            }
            if self.probes_sent >= config.half_open_probes {
                // Wait for the probes' verdict, at the latest until lost probes are given up:
                // a success closes the breaker, a failure opens it again, and either way one
                // deferral per held-back delivery is enough.
                let verdict_at = match self.verdict_due {
                    0 => give_up_at,
                    due => due.min(give_up_at),
                };
                return Admission::Defer(Duration::from_millis(verdict_at.saturating_sub(now).max(1_000)));
            }
            self.probes_sent = self.probes_sent.saturating_add(1);
            self.verdict_due = self.verdict_due.max(now.saturating_add(millis(probe_wait)));
            return Admission::Go { probe: true };
        }
        Admission::Go { probe: false }
    }

    /// Records the outcome of a delivery `admit` let through: `Some(true)` if the endpoint
    /// failed, `Some(false)` if it answered, `None` if nothing was sent after all.
    pub(crate) fn record(&mut self, config: &BreakerConfig, now: u64, failed: Option<bool>, probe: bool) {
        match (self.phase, failed) {
            (Phase::HalfOpen, None) if probe => self.probes_sent = self.probes_sent.saturating_sub(1),
            (Phase::HalfOpen, Some(true)) if probe => self.open(config, now),
            (Phase::HalfOpen, Some(false)) if probe => {
                self.probe_successes = self.probe_successes.saturating_add(1);
                if self.probe_successes >= config.close_after() {
                    *self = Self::default();
                }
            }
            (Phase::Closed, Some(failed)) => {
                self.count(config, now, failed);
                if self.tripped(config, now) {
                    self.open(config, now);
                }
            }
            // Outcomes of deliveries admitted before the breaker opened, or while half-open
            // but not as probes, say nothing about the endpoint now.
            _ => {}
        }
    }

    fn count(&mut self, config: &BreakerConfig, now: u64, failed: bool) {
        self.consecutive_failures = if failed {
            self.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        if let Trip::FailureRatio { window, .. } = config.trip {
            let window = millis(window).max(BUCKETS);
            let bucket = now - now % (window / BUCKETS);
            self.window.retain(|(start, ..)| start.saturating_add(window) > now);
            match self.window.last_mut() {
                Some((start, requests, failures)) if *start == bucket => {
                    *requests = requests.saturating_add(1);
                    *failures = failures.saturating_add(u32::from(failed));
                }
                _ => self.window.push((bucket, 1, u32::from(failed))),
            }
        }
    }

    /// `(requests, failures)` in the window at `now`.
    pub(crate) fn window_counts(&self, config: &BreakerConfig, now: u64) -> (u32, u32) {
        let window = match config.trip {
            Trip::FailureRatio { window, .. } => millis(window).max(BUCKETS),
            Trip::ConsecutiveFailures(_) => return (0, 0),
        };
        self.window
            .iter()
            .filter(|(start, ..)| start.saturating_add(window) > now)
            .fold((0u32, 0u32), |(r, f), (_, requests, failures)| {
                (r.saturating_add(*requests), f.saturating_add(*failures))
            })
    }

    fn tripped(&self, config: &BreakerConfig, now: u64) -> bool {
        match config.trip {
            Trip::ConsecutiveFailures(threshold) => self.consecutive_failures >= threshold,
            Trip::FailureRatio {
                ratio, min_requests, ..
            } => {
                let (requests, failures) = self.window_counts(config, now);
                requests >= min_requests && f64::from(failures) >= ratio * f64::from(requests)
            }
        }
    }

    fn open(&mut self, config: &BreakerConfig, now: u64) {
        *self = Self {
            phase: Phase::Open,
            open_until: now.saturating_add(millis(config.open_for)),
            ..Self::default()
        };
    }

    fn half_open(&mut self, now: u64) {
        *self = Self {
            phase: Phase::HalfOpen,
            half_open_since: now,
            ..Self::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE_WAIT: Duration = Duration::from_millis(500);

    fn run(breaker: &mut Breaker, config: &BreakerConfig, now: u64, failed: bool) -> Admission {
        let admission = breaker.admit(config, now, PROBE_WAIT);
        if let Admission::Go { probe } = admission {
            breaker.record(config, now, Some(failed), probe);
        }
        admission
    }

    #[test]
    fn consecutive_failures_open_probes_close() {
        let config = BreakerConfig::default()
            .consecutive_failures(3)
            .open_for(Duration::from_secs(10))
            .half_open_probes(2)
            .successes_to_close(2);
        let mut b = Breaker::default();
        run(&mut b, &config, 0, true);
        run(&mut b, &config, 1, false); // a success resets the count
        run(&mut b, &config, 2, true);
        run(&mut b, &config, 3, true);
        assert_eq!(b.phase, Phase::Closed);
        run(&mut b, &config, 4, true);
        assert_eq!(b.phase, Phase::Open);
        assert_eq!(
            b.admit(&config, 5_000, PROBE_WAIT),
            Admission::Defer(Duration::from_millis(5_004))
        );
        // Half-open: exactly two probes, then deferral until they report.
        assert_eq!(b.admit(&config, 10_004, PROBE_WAIT), Admission::Go { probe: true });
        assert_eq!(b.admit(&config, 10_005, PROBE_WAIT), Admission::Go { probe: true });
        assert!(matches!(b.admit(&config, 10_006, PROBE_WAIT), Admission::Defer(_)));
        b.record(&config, 10_007, Some(false), true);
        assert_eq!(b.phase, Phase::HalfOpen);
        b.record(&config, 10_008, Some(false), true);
        assert_eq!(b.phase, Phase::Closed);
    }

    /// Held-back deliveries wait for the probe's verdict (its attempt's time, at most an open
    /// period) instead of asking every second.
    #[test]
    fn half_open_waiters_wait_for_the_probes_verdict() {
        let config = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(30));
        let mut b = Breaker::default();
        run(&mut b, &config, 0, true);
        assert_eq!(
            b.admit(&config, 30_000, Duration::from_secs(10)),
            Admission::Go { probe: true }
        );
        // The probe may take 10 s: a delivery a second later waits the 9 s left.
        assert_eq!(
            b.admit(&config, 31_000, PROBE_WAIT),
            Admission::Defer(Duration::from_secs(9))
        );
        // A probe allowed longer than the open period is given up at its end.
        let mut slow = Breaker::default();
        run(&mut slow, &config, 0, true);
        assert_eq!(
            slow.admit(&config, 30_000, Duration::from_secs(600)),
            Admission::Go { probe: true }
        );
        assert_eq!(
            slow.admit(&config, 40_000, PROBE_WAIT),
            Admission::Defer(Duration::from_secs(20))
        );
        // Never less than a second, even with the verdict due now.
        assert_eq!(
            b.admit(&config, 39_999, PROBE_WAIT),
            Admission::Defer(Duration::from_secs(1))
        );
        // The verdict closes it: the next delivery goes.
        b.record(&config, 40_000, Some(false), true);
        assert_eq!(b.admit(&config, 40_001, PROBE_WAIT), Admission::Go { probe: false });
    }

    #[test]
    fn a_failed_probe_reopens_and_unsent_probes_are_returned() {
        let config = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(1));
        let mut b = Breaker::default();
        run(&mut b, &config, 0, true);
        assert_eq!(b.admit(&config, 1_000, PROBE_WAIT), Admission::Go { probe: true });
        b.record(&config, 1_001, None, true); // held back by a later layer: not a probe after all
        assert_eq!(b.admit(&config, 1_002, PROBE_WAIT), Admission::Go { probe: true });
        b.record(&config, 1_003, Some(true), true);
        assert_eq!((b.phase, b.open_until), (Phase::Open, 2_003));
        // A lost probe is given up after an open period.
        assert_eq!(b.admit(&config, 2_003, PROBE_WAIT), Admission::Go { probe: true });
        assert!(matches!(b.admit(&config, 2_500, PROBE_WAIT), Admission::Defer(_)));
        assert_eq!(b.admit(&config, 3_003, PROBE_WAIT), Admission::Go { probe: true });
    }

    #[test]
    fn an_open_period_beyond_the_configured_one_is_cut_to_it() {
        // State written by another process (another config, a hostile store): open "forever".
        let config = BreakerConfig::default().open_for(Duration::from_secs(30));
        let mut b = Breaker {
            phase: Phase::Open,
            open_until: u64::MAX,
            ..Breaker::default()
        };
        match b.admit(&config, 1_000, PROBE_WAIT) {
            Admission::Defer(wait) => assert!(wait <= Duration::from_secs(30), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        // ... and stays cut: it half-opens once the configured period has passed.
        assert_eq!(b.open_until, 31_000);
        assert_eq!(b.admit(&config, 31_000, PROBE_WAIT), Admission::Go { probe: true });
        // Extreme settings and clocks do not overflow either.
        let forever = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::MAX)
            .failure_ratio(0.5, Duration::MAX, 1);
        let mut b = Breaker::default();
        run(&mut b, &forever, u64::MAX - 10, true);
        assert_eq!((b.phase, b.open_until), (Phase::Open, u64::MAX));
        assert!(matches!(
            b.admit(&forever, u64::MAX - 5, PROBE_WAIT),
            Admission::Defer(_)
        ));
        assert_eq!(b.admit(&forever, u64::MAX, PROBE_WAIT), Admission::Go { probe: true });
    }

    #[test]
    fn failure_ratio_needs_the_minimum_requests_within_the_window() {
        let config = BreakerConfig::default().failure_ratio(0.5, Duration::from_secs(10), 4);
        let mut b = Breaker::default();
        for (now, failed) in [(0, true), (1, true), (2, true)] {
            run(&mut b, &config, now, failed);
        }
        assert_eq!(b.phase, Phase::Closed, "3 requests are under the minimum");
        // The early failures leave the window before the fourth request.
        run(&mut b, &config, 20_000, true);
        assert_eq!((b.phase, b.window_counts(&config, 20_000)), (Phase::Closed, (1, 1)));
        for now in [20_001, 20_002, 20_003] {
            run(&mut b, &config, now, now == 20_003);
        }
        assert_eq!(b.phase, Phase::Open, "2 of 4 failed");
    }
}
