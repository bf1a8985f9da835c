//! [`EndpointStats`]: success rate, latency percentiles, last error and breaker phase per
//! endpoint, kept in process and queryable from the app.

use std::{
    collections::VecDeque,
    fmt,
    mem::size_of,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap},
    clock::unix_millis,
    layers::{CircuitBreakerLayer, Phase},
    report::DeliveryEvent,
};

/// Latencies kept per endpoint for the percentiles: the most recent attempts.
pub const LATENCY_WINDOW: usize = 1024;

/// How many endpoints [`EndpointStats::new`] keeps, and in how many bytes: 10,000 endpoints
/// within 64 MiB (an endpoint with a full latency window takes about 16.5 KiB, so about 4,000
/// of those fit).
pub const DEFAULT_STATS_CAP: MemoryCap = MemoryCap::new(10_000, 64 << 20);

/// Per-endpoint delivery statistics of this process, fed by the worker's events and,
/// optionally, a circuit breaker's phase changes:
///
/// ```
/// use apalis_webhooks::{WebhookWorker, layers::CircuitBreakerLayer, observe::EndpointStats};
///
/// # fn example<B: Clone>(storage: B) {
/// let stats = EndpointStats::new();
/// let breaker = stats.track(CircuitBreakerLayer::default());
/// let worker = WebhookWorker::new(storage).on_event(stats.recorder());
/// // later, from an admin handler:
/// if let Some(snapshot) = stats.get("api.example.com") {
///     println!("{:.1}% delivered, p99 {:?}", snapshot.success_rate * 100.0, snapshot.latency_p99);
/// }
/// # drop((breaker, worker)); }
/// ```
///
/// Counts are of attempts made by workers that report into this value (deferrals are counted
/// apart); for a fleet-wide view, use the metrics. Cheap to clone; clones share the numbers.
///
/// **Capped** ([`DEFAULT_STATS_CAP`], or [`with_capacity`](Self::with_capacity)): past the cap
/// the endpoints reported least recently are forgotten, and start again from zero if they are
/// seen again.
#[derive(Clone)]
pub struct EndpointStats {
    inner: Arc<Mutex<BoundedMap<String, Endpoint>>>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_STATS_CAP)
    }
}

#[derive(Default)]
struct Endpoint {
    attempts: u64,
    delivered: u64,
    deferred: u64,
    latencies: VecDeque<Duration>,
    last_error: Option<LastError>,
    breaker: Phase,
}

/// The last failed attempt to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastError {
    /// Unix milliseconds when it was settled.
    pub at_ms: u64,
    /// The status, if the receiver answered.
    pub status: Option<u16>,
    /// The failure, if it did not (timeout, connection refused…).
    pub error: Option<String>,
}

/// One endpoint's numbers, as [`EndpointStats::get`] reports them.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointSnapshot {
    /// Attempts made.
    pub attempts: u64,
    /// Of which answered 2xx.
    pub delivered: u64,
    /// Of which failed (any other answer or no answer).
    pub failed: u64,
    /// `delivered / attempts` (1 when there were none).
    pub success_rate: f64,
    /// Attempts put off by a rate limit or an open breaker (not counted as attempts).
    pub deferred: u64,
    /// Median attempt latency over the last [`LATENCY_WINDOW`] attempts.
    pub latency_p50: Duration,
    /// 90th percentile, same window.
    pub latency_p90: Duration,
    /// 99th percentile, same window.
    pub latency_p99: Duration,
    /// The last failure.
    pub last_error: Option<LastError>,
    /// The breaker's phase, if a [`track`](EndpointStats::track)ed breaker reported one
    /// (closed otherwise).
    pub breaker: Phase,
}

impl HeapSize for Endpoint {
    fn heap_bytes(&self) -> usize {
        let error = self.last_error.as_ref().and_then(|e| e.error.as_ref());
        self.latencies
            .capacity()
            .saturating_mul(size_of::<Duration>())
            .saturating_add(error.map_or(0, String::capacity))
    }
}

impl fmt::Debug for EndpointStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointStats")
            .field("endpoints", &self.lock().usage().entries)
            .finish()
    }
}

impl EndpointStats {
    /// Empty statistics, holding at most [`DEFAULT_STATS_CAP`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty statistics holding at most `cap` (endpoints, and bytes: latencies and last errors
    /// included).
    pub fn with_capacity(cap: MemoryCap) -> Self {
        Self {
            inner: Arc::new(Mutex::new(BoundedMap::new("endpoint_stats", cap))),
        }
    }

    /// The size of the statistics next to their cap (introspection: dashboards, tests).
    pub fn memory_usage(&self) -> MapUsage {
        self.lock().usage()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<String, Endpoint>> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The hook to give [`WebhookWorker::on_event`](crate::WebhookWorker::on_event).
    pub fn recorder(&self) -> impl Fn(&DeliveryEvent<'_>) + Send + Sync + 'static {
        let stats = self.clone();
        move |event| stats.record(event)
    }

    /// `layer`, reporting its phase changes here.
    pub fn track(&self, layer: CircuitBreakerLayer) -> CircuitBreakerLayer {
        let stats = self.clone();
        layer.on_state_change(move |change| {
            let key = change.endpoint.as_str();
            stats.lock().update(key, Endpoint::default, |e| e.breaker = change.to);
        })
    }

    fn record(&self, event: &DeliveryEvent<'_>) {
        // (job, status, error, duration) of the attempt the event settles.
        let (job, status, error, duration) = match event {
            DeliveryEvent::Delivered { job, result } | DeliveryEvent::RetryScheduled { job, result, .. } => {
                (*job, result.status(), result.error(), result.duration())
            }
            // A dead letter is the only event of its (last) attempt.
            DeliveryEvent::DeadLettered { job, dead_letter } => {
                let record = &dead_letter.record;
                let sent = record.status.is_some() || record.duration_ms > 0;
                let duration = sent.then(|| Duration::from_millis(record.duration_ms));
                (*job, record.status, record.error.clone(), duration)
            }
            DeliveryEvent::Deferred { job, .. } => {
                self.lock()
                    .update(job.endpoint(), Endpoint::default, |e| e.deferred += 1);
                return;
            }
            _ => return,
        };
        self.lock().update(job.endpoint(), Endpoint::default, |endpoint| {
            endpoint.attempts += 1;
            if let Some(duration) = duration {
                endpoint.push_latency(duration);
            }
            if status.is_some_and(|status| (200..300).contains(&status)) {
                endpoint.delivered += 1;
            } else {
                endpoint.last_error = Some(LastError {
                    at_ms: unix_millis(),
                    status,
                    error,
                });
            }
        });
    }

    /// The numbers of `endpoint` (`host[:port]`, as [`WebhookJob::endpoint`](crate::WebhookJob::endpoint)).
    pub fn get(&self, endpoint: &str) -> Option<EndpointSnapshot> {
        self.lock().peek(endpoint).map(Endpoint::snapshot)
    }

    /// Every endpoint seen (and not forgotten past the cap), by name.
    pub fn all(&self) -> Vec<(String, EndpointSnapshot)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(name, endpoint)| (name.clone(), endpoint.snapshot()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl Endpoint {
    fn push_latency(&mut self, latency: Duration) {
        if self.latencies.len() == LATENCY_WINDOW {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
    }

    fn snapshot(&self) -> EndpointSnapshot {
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        let percentile = |p: f64| -> Duration {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[rank - 1]
        };
        EndpointSnapshot {
            attempts: self.attempts,
            delivered: self.delivered,
            failed: self.attempts - self.delivered,
            success_rate: if self.attempts == 0 {
                1.0
            } else {
                self.delivered as f64 / self.attempts as f64
            },
            deferred: self.deferred,
            latency_p50: percentile(0.50),
            latency_p90: percentile(0.90),
            latency_p99: percentile(0.99),
            last_error: self.last_error.clone(),
            breaker: self.breaker,
        }
    }
}
