//! [`InFlightLayer`]: a cap on the attempts in flight to one endpoint, so that an endpoint
//! that answers slowly cannot take every worker slot.
//!
//! A receiver that answers after seconds, but answers, trips no breaker and uses no more rate
//! than it is given: without a cap, a backlog of its deliveries fills all the worker's slots and
//! every other endpoint waits behind it. With one, the excess is **deferred** like the other
//! layers defer: stored again for a moment later, no attempt used, no slot held, while the
//! other endpoints' deliveries go through.

mod local;
#[cfg(feature = "redis")]
mod redis;

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use rand::Rng;
use tower::{Layer, Service};

use self::local::LocalSlots;
use super::{DEFAULT_MAX_DEFERRAL, deferral_cap, spread::Spread, take_ready};
use crate::{
    bounded::{MapUsage, MemoryCap},
    delivery::DeliveryRequest,
    outcome::{AttemptResult, DeferReason},
    tuning::DEFAULT_CONCURRENCY,
};

/// Attempts one endpoint may have in flight by default: a quarter of the worker's default
/// slots ([`DEFAULT_CONCURRENCY`], 256: 64), so that at least three other slow endpoints, and any
/// number of fast ones, still find free slots. Set it to about a quarter of the concurrency
/// your workers run with.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = (DEFAULT_CONCURRENCY / 4) as u32;

/// An endpoint whose attempts take at least this long on average is held to its cap (250 ms);
/// a faster one is not, since its slots turn over before anyone waits long for them. See
/// [`InFlightLayer::slow_after`].
pub const DEFAULT_SLOW_AFTER: Duration = Duration::from_millis(250);

/// How many endpoints a layer tracks in memory by default (in-flight counts and average
/// attempt durations, deferral spreading): 100,000 within 16 MiB. See
/// [`InFlightLayer::max_keys`].
pub const DEFAULT_IN_FLIGHT_KEY_CAP: MemoryCap = MemoryCap::new(100_000, 16 << 20);

/// How long a fleet-wide lease outlives its attempt's timeout: a worker killed mid-attempt
/// gives its slots back this long after they would have timed out.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// The average attempt duration assumed for an endpoint that has none on record yet, to space
/// its deferrals (see [`InFlightLayer`]'s deferral section).
const UNKNOWN_DURATION: Duration = Duration::from_secs(1);

/// Deferrals of one endpoint are spread at least this far apart, at most this far.
const MIN_SPACING: Duration = Duration::from_millis(5);
const MAX_SPACING: Duration = Duration::from_secs(60);

/// Caps the attempts in flight to each endpoint (`host[:port]`) while it answers slowly; the
/// excess is deferred.
///
/// * **Keys.** Deliveries count under their job's [`endpoint`](crate::WebhookJob::endpoint),
///   the server that is slow, like the circuit breaker's (a tenant's rate-limit key says
///   nothing about which server answers slowly).
/// * **Cap.** [`DEFAULT_MAX_IN_FLIGHT`] (16) per endpoint, or [`new`](Self::new)'s; a
///   delivery with a cap of its own
///   ([`DeliveryTarget::max_in_flight`](crate::target::DeliveryTarget::max_in_flight), also on
///   subscriptions and registry endpoints) is held to that one.
/// * **Only while slow.** The cap applies to an endpoint whose attempts averaged at least
///   [`slow_after`](Self::slow_after) ([`DEFAULT_SLOW_AFTER`], 250 ms) recently; a fast
///   endpoint's backlog may use every slot, since they turn over quickly and a cap would only
///   add deferrals. The first attempts to an endpoint not yet measured are not held (so a newly
///   slow endpoint holds the slots for one attempt's duration, then is capped); set
///   `slow_after(Duration::ZERO)` to cap every endpoint always.
/// * **Deferral, not failure.** Past the cap, the attempt is answered with
///   [`AttemptResult::Deferred`] ([`DeferReason::EndpointBusy`]) at once: stored again, no
///   attempt counted, no slot held. The held-back deliveries of one endpoint are spread one
///   "average attempt duration ÷ cap" apart, with jitter, so they come due about as fast as its
///   slots free up (not all together, to be deferred again); never more than
///   [`max_deferral`](Self::max_deferral) (one hour by default).
/// * **Released whatever happens.** A slot is held by a guard for the inner call: it is given
///   back when the attempt ends, fails, times out, is cancelled or panics.
/// * **Local or fleet-wide.** Counts are per process by default; with [`shared`] they are
///   leases in Redis, so the cap holds for the whole fleet. A lease expires
///   [`LEASE_MARGIN`] after its attempt's timeout, so a killed worker's slots come back. If
///   Redis cannot be reached, the worker counts its own attempts meanwhile (the cap then holds
///   per worker) rather than stop or let everything through.
///
/// [`WebhookWorker`](crate::WebhookWorker) puts one with the defaults outside every other
/// layer (see [`WebhookWorker::in_flight`](crate::WebhookWorker::in_flight)); outside the
/// rate limiter, so a deferred delivery spends no rate budget.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::layers::InFlightLayer;
///
/// // 8 attempts per endpoint once its attempts average half a second.
/// let layer = InFlightLayer::new(8).slow_after(Duration::from_millis(500));
/// # drop(layer);
/// ```
///
/// [`shared`]: Self::shared
#[derive(Clone)]
pub struct InFlightLayer {
    shared: Arc<Shared>,
}

/// What the builder sets.
#[derive(Debug, Clone, Copy)]
struct Settings {
    cap: u32,
    slow_after: Duration,
    max_deferral: Duration,
    keys: MemoryCap,
}

struct Shared {
    settings: Settings,
    /// The in-process counts (the fallback when Redis cannot be reached) and the average
    /// durations (always local: each worker measures what it sees).
    local: LocalSlots,
    #[cfg(feature = "redis")]
    redis: Option<redis::RedisSlots>,
    spread: Spread,
}

impl Default for InFlightLayer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_IN_FLIGHT)
    }
}

impl InFlightLayer {
    /// At most `cap` attempts (at least 1) in flight per slow endpoint, counted in memory.
    pub fn new(cap: u32) -> Self {
        Self::build(
            Settings {
                cap: cap.max(1),
                slow_after: DEFAULT_SLOW_AFTER,
                max_deferral: DEFAULT_MAX_DEFERRAL,
                keys: DEFAULT_IN_FLIGHT_KEY_CAP,
            },
            None,
        )
    }

    /// The average attempt duration from which an endpoint is held to its cap
    /// ([`DEFAULT_SLOW_AFTER`]); `Duration::ZERO` caps every endpoint, measured or not.
    pub fn slow_after(self, slow_after: Duration) -> Self {
        let settings = Settings {
            slow_after,
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// The longest this layer defers a delivery (one hour by default, at least a millisecond,
    /// at most [`DeliveryPolicy::MAX_DELAY`](crate::policy::DeliveryPolicy::MAX_DELAY)).
    pub fn max_deferral(self, max: Duration) -> Self {
        let settings = Settings {
            max_deferral: deferral_cap(max),
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// Keeps at most `cap` endpoints in each in-memory map ([`DEFAULT_IN_FLIGHT_KEY_CAP`]):
    /// in-flight counts with average durations, and deferral spreading. A forgotten endpoint
    /// is counted from zero and measured anew, so size it above the endpoints busy at once.
    /// Starts the in-memory state anew.
    pub fn max_keys(self, cap: MemoryCap) -> Self {
        let settings = Settings {
            keys: cap,
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// Counts the attempts in flight in Redis under `prefix`, as leases shared by every worker
    /// using the same prefix (give each fleet, or each test, its own): the cap holds for the
    /// fleet. Average durations stay per worker.
    #[cfg(feature = "redis")]
    pub fn shared(self, conn: ::redis::aio::ConnectionManager, prefix: impl Into<String>) -> Self {
        Self::build(self.shared.settings, Some((conn, prefix.into())))
    }

    /// The attempts this process has in flight to `endpoint` (in Redis (`shared`) mode too:
    /// the local count is what the cap falls back on while Redis is unreachable), and their
    /// recent average duration: introspection for dashboards and tests.
    pub fn local_state(&self, endpoint: &str) -> (u32, Option<Duration>) {
        self.shared.local.state(endpoint)
    }

    /// The sizes of this layer's in-memory maps next to their caps.
    pub fn memory_usage(&self) -> Vec<MapUsage> {
        vec![self.shared.local.usage(), self.shared.spread.usage()]
    }

    #[cfg(feature = "redis")]
    fn redis(&self) -> Option<(::redis::aio::ConnectionManager, String)> {
        self.shared.redis.as_ref().map(redis::RedisSlots::connection)
    }

    #[cfg(not(feature = "redis"))]
    fn redis(&self) -> Option<std::convert::Infallible> {
        None
    }

    #[cfg(feature = "redis")]
    fn build(settings: Settings, redis: Option<(::redis::aio::ConnectionManager, String)>) -> Self {
        let redis = redis.map(|(conn, prefix)| redis::RedisSlots::new(conn, prefix));
        Self::with(settings, |shared| Shared { redis, ..shared })
    }

    #[cfg(not(feature = "redis"))]
    fn build(settings: Settings, _: Option<std::convert::Infallible>) -> Self {
        Self::with(settings, |shared| shared)
    }

    fn with(settings: Settings, finish: impl FnOnce(Shared) -> Shared) -> Self {
        let shared = Shared {
            settings,
            local: LocalSlots::new(settings.keys),
            #[cfg(feature = "redis")]
            redis: None,
            spread: Spread::new(settings.keys),
        };
        Self {
            shared: Arc::new(finish(shared)),
        }
    }
}

impl fmt::Debug for InFlightLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(feature = "redis")]
        let mode = if self.shared.redis.is_some() { "redis" } else { "local" };
        #[cfg(not(feature = "redis"))]
        let mode = "local";
        let settings = &self.shared.settings;
        f.debug_struct("InFlightLayer")
            .field("cap", &settings.cap)
            .field("slow_after", &settings.slow_after)
            .field("max_deferral", &settings.max_deferral)
            .field("keys", &settings.keys)
            .field("state", &mode)
            .finish()
    }
}

/// One attempt's slot: given back on drop, whatever ended the attempt. Records the attempt's
/// duration when it produced one ([`Self::finished`]).
struct Permit {
    shared: Arc<Shared>,
    key: String,
    /// The Redis lease, by id, when the slot was taken there (it is always counted locally too).
    #[cfg(feature = "redis")]
    lease: Option<String>,
    /// Set when the attempt reached the endpoint: its duration feeds the endpoint's average.
    took: Option<Duration>,
}

impl Permit {
    fn finished(&mut self, started: Instant, result: &AttemptResult) {
        // Deferred or refused attempts never reached the endpoint: they say nothing about it.
        if !matches!(result, AttemptResult::Deferred { .. } | AttemptResult::Refused { .. }) {
            self.took = Some(started.elapsed());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Every attempt is counted locally, leased in Redis or not.
        self.shared.local.release(&self.key, self.took);
        #[cfg(feature = "redis")]
        if let (Some(lease), Some(redis)) = (&self.lease, &self.shared.redis) {
            redis.release(&self.key, lease);
        }
    }
}

/// What the layer decides for one delivery.
enum Admission {
    Go(Permit),
    /// Deferred for this long.
    Busy(Duration),
}

impl Shared {
    async fn admit(self: &Arc<Self>, key: &str, request: &DeliveryRequest) -> Admission {
        let policy = request.job.policy();
        let cap = policy.max_in_flight.unwrap_or(self.settings.cap).max(1);
        let average = self.local.average(key);
        let enforce = match average {
            Some(average) => average >= self.settings.slow_after,
            None => self.settings.slow_after.is_zero(),
        };
        #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
        let permit = |lease: Option<String>| Permit {
            shared: Arc::clone(self),
            key: key.to_owned(),
            #[cfg(feature = "redis")]
            lease,
            took: None,
        };
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            let lease_for = policy.timeout().saturating_add(LEASE_MARGIN);
            match redis.acquire(key, cap, enforce, lease_for).await {
                Ok(Some(lease)) => {
                    // Counted here too, not enforced: should Redis become unreachable, the
                    // local fallback then knows what this process already has in flight.
                    self.local.acquire(key, cap, false);
                    return Admission::Go(permit(Some(lease)));
                }
                Ok(None) => return Admission::Busy(self.delay(key, average, cap)),
                Err(error) => {
                    tracing::warn!(%error, endpoint = key, "counting in-flight attempts locally: Redis is unreachable");
                }
            }
        }
        if self.local.acquire(key, cap, enforce) {
            Admission::Go(permit(None))
        } else {
            Admission::Busy(self.delay(key, average, cap))
        }
    }

    /// The deferral of one more held-back delivery of `key`: after the ones held back before
    /// it, one average attempt duration ÷ cap apart (about when a slot frees), plus jitter of
    /// up to one spacing, at most the layer's cap.
    fn delay(&self, key: &str, average: Option<Duration>, cap: u32) -> Duration {
        let spacing = (average.unwrap_or(UNKNOWN_DURATION) / cap).clamp(MIN_SPACING, MAX_SPACING);
        let max = self.settings.max_deferral;
        let queued = self.spread.delay(key, Duration::ZERO, spacing, max);
        let jitter = rand::rng().random_range(Duration::ZERO..=spacing);
        queued.saturating_add(jitter).min(max)
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService {
            inner,
            shared: Some(Arc::clone(&self.shared)),
        }
    }
}

/// The service made by [`InFlightLayer`] (or by a worker without a cap: it then only passes
/// deliveries on).
#[derive(Clone)]
pub struct InFlightService<S> {
    inner: S,
    /// `None`: no cap.
    shared: Option<Arc<Shared>>,
}

impl<S> InFlightService<S> {
    /// `inner` with `layer`'s cap, or none.
    pub(crate) fn new(inner: S, layer: Option<&InFlightLayer>) -> Self {
        Self {
            inner,
            shared: layer.map(|layer| Arc::clone(&layer.shared)),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for InFlightService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightService")
            .field("inner", &self.inner)
            .field("capped", &self.shared.is_some())
            .finish()
    }
}

impl<S> Service<DeliveryRequest> for InFlightService<S>
where
    S: Service<DeliveryRequest, Response = AttemptResult> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = AttemptResult;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<AttemptResult, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: DeliveryRequest) -> Self::Future {
        let Some(shared) = self.shared.clone() else {
            return Box::pin(self.inner.call(request));
        };
        let mut inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let key = request.job.endpoint().to_owned();
            let mut permit = match shared.admit(&key, &request).await {
                Admission::Go(permit) => permit,
                Admission::Busy(delay) => {
                    return Ok(AttemptResult::Deferred {
                        delay,
                        reason: DeferReason::EndpointBusy,
                    });
                }
            };
            let started = Instant::now();
            // The permit lives across the call: dropped with this future however it ends.
            let result = inner.call(request).await?;
            permit.finished(started, &result);
            Ok(result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferrals_of_a_busy_endpoint_are_spaced_by_its_average_over_the_cap() {
        let layer = InFlightLayer::new(4);
        let shared = &layer.shared;
        let average = Some(Duration::from_secs(2));
        let delays: Vec<Duration> = (0..3).map(|_| shared.delay("slow:1", average, 4)).collect();
        // 500 ms apart, each with up to 500 ms of jitter.
        for (n, delay) in delays.iter().enumerate() {
            let base = Duration::from_millis(500) * (n as u32 + 1);
            assert!(
                *delay >= base && *delay <= base + Duration::from_millis(500),
                "{n}: {delay:?}"
            );
        }
        let capped = InFlightLayer::new(1).max_deferral(Duration::from_secs(1));
        assert!(capped.shared.delay("k", Some(Duration::MAX), 1) <= Duration::from_secs(1));
    }

    fn request() -> DeliveryRequest {
        let job = crate::WebhookSubscription::new("https://slow.example/hook", crate::Secret::generate())
            .max_in_flight(1)
            .job("e", &1)
            .unwrap();
        DeliveryRequest::new(Arc::new(job))
    }

    #[test]
    fn a_slot_comes_back_when_the_attempt_is_cancelled_or_panics() {
        use futures::FutureExt;
        let layer = InFlightLayer::new(8).slow_after(Duration::ZERO);
        let held = |layer: &InFlightLayer| layer.local_state("slow.example").0;
        // An attempt that never ends holds the slot (the job's own cap of 1) until it is dropped.
        let mut pending = layer.layer(tower::service_fn(|_: DeliveryRequest| {
            futures::future::pending::<Result<AttemptResult, std::convert::Infallible>>()
        }));
        let mut first = pending.call(request());
        assert!((&mut first).now_or_never().is_none());
        assert_eq!(held(&layer), 1);
        match pending.call(request()).now_or_never() {
            Some(Ok(AttemptResult::Deferred { reason, .. })) => assert_eq!(reason, DeferReason::EndpointBusy),
            _ => panic!("past the cap: deferred at once"),
        }
        drop(first);
        assert_eq!(held(&layer), 0);
        // A panicking attempt gives its slot back while unwinding.
        let mut panics = layer.layer(tower::service_fn(|_: DeliveryRequest| async {
            if true {
                panic!("inner service panicked");
            }
            Ok::<_, std::convert::Infallible>(AttemptResult::Refused { reason: String::new() })
        }));
        let unwound = std::panic::AssertUnwindSafe(panics.call(request()))
            .catch_unwind()
            .now_or_never();
        assert!(matches!(unwound, Some(Err(_))));
        assert_eq!(held(&layer), 0);
    }
}
