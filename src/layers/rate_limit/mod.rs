//! [`RateLimitLayer`]: per-endpoint and global rate budgets that defer, and slow down on 429.

mod local;
#[cfg(feature = "redis")]
mod redis;

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use super::{DEFAULT_MAX_DEFERRAL, Limit, deferral_cap, spread::Spread, take_ready};
use crate::{
    bounded::{MapUsage, MemoryCap},
    delivery::DeliveryRequest,
    outcome::{AttemptResult, DeferReason},
};

/// Slowest an endpoint is slowed to after 429s: a sixteenth of its rate.
pub const MIN_RATE_FACTOR: f64 = 1.0 / 16.0;
/// How much of its rate an endpoint regains per success after a slow-down.
pub const RECOVERY_STEP: f64 = 1.0 / 16.0;
/// How many keys a layer tracks in memory by default, per map (budgets, 429 slow-downs,
/// deferral spreading), and in how many bytes: 100,000 keys within 32 MiB. See
/// [`RateLimitLayer::max_keys`].
pub const DEFAULT_KEY_CAP: MemoryCap = MemoryCap::new(100_000, 32 << 20);
/// How long a deferral waits when the shared (Redis) state cannot be reached.
const UNAVAILABLE_DELAY: Duration = Duration::from_secs(1);

/// Holds deliveries to each endpoint to a [`Limit`], and all deliveries to an optional global
/// one; over budget, a delivery is deferred until the budget allows it.
///
/// * **Keys.** Deliveries count under their job's
///   [`rate_limit_key`](crate::WebhookJob::rate_limit_key): the endpoint (`host[:port]`), or a
///   key the subscription set (a tenant id). A job with a limit of its own
///   ([`WebhookSubscription::own_rate_limit`](crate::WebhookSubscription::own_rate_limit), a
///   registry endpoint's rate limit) is held to that limit instead of the layer's.
/// * **Deferral, not failure.** Over budget, the attempt is answered with
///   [`AttemptResult::Deferred`]: stored again for when the budget allows (spread one interval
///   apart per key, so a held-back backlog comes due at the rate it can go), not counted as an
///   attempt, holding no worker slot, never dead-lettered for this.
/// * **Adaptive.** A 429 halves the endpoint's rate (down to [`MIN_RATE_FACTOR`]) and holds
///   it back for its `Retry-After` (or one slowed interval); each later success gives back
///   [`RECOVERY_STEP`] of the rate. The `Retry-After` is clamped like the retry path's: to
///   the job's [`max_retry_after`](crate::policy::DeliveryPolicy::max_retry_after) and to the layer's
///   [`max_deferral`](Self::max_deferral).
/// * **Capped.** No deferral lasts longer than [`max_deferral`](Self::max_deferral) (one
///   hour by default), whatever a receiver, a stored state or a limit says; a delivery held
///   back longer comes back then and is checked again. Slowing down is done by charging each delivery several
///   GCRA cells, so it needs a burst of at least 2 to show below the cooldown.
/// * **Local or fleet-wide.** State is in memory (GCRA, as governor computes it) by default;
///   with [`shared`] it is in Redis, one atomic script per decision using
///   Redis's clock, so N workers on N machines stay within one budget and a restart keeps it.
/// * **Bounded memory.** In memory, at most [`max_keys`](Self::max_keys) keys are tracked
///   ([`DEFAULT_KEY_CAP`]); the least recently used are forgotten and start again with a full
///   budget.
///
/// ```
/// use apalis_webhooks::layers::{Limit, RateLimitLayer};
///
/// let layer = RateLimitLayer::per_endpoint(Limit::per_second(10).burst(20))
///     .global(Limit::per_second(1_000));
/// # drop(layer);
/// ```
///
#[cfg_attr(feature = "redis", doc = "[`shared`]: Self::shared")]
#[cfg_attr(
    not(feature = "redis"),
    doc = "[`shared`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/layers/rate_limit/struct.RateLimitLayer.html#method.shared"
)]
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    budget: Budget,
    spread: Spread,
}

/// What the builder sets.
#[derive(Debug, Clone, Copy)]
struct Settings {
    endpoint: Limit,
    global: Option<Limit>,
    adaptive: bool,
    max_deferral: Duration,
    cap: MemoryCap,
}

enum Budget {
    /// Boxed: the local state is several maps, the Redis one a connection.
    Local(Box<local::LocalBudget>),
    #[cfg(feature = "redis")]
    Redis(redis::RedisBudget),
}

/// What the budget says about one delivery.
pub(super) enum Decision {
    /// Go; the key runs at `factor` of its rate.
    Admit { factor: f64 },
    /// Not before this long.
    Wait(Duration),
}

/// How far an endpoint has been slowed down after 429s.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Adaptation {
    /// Share of the configured rate it may use, [`MIN_RATE_FACTOR`] to 1.
    pub factor: f64,
    /// How long it is still held back entirely (a receiver's `Retry-After`).
    pub cooldown: Duration,
}

impl Adaptation {
    /// Full rate, no cooldown.
    pub const FULL: Self = Self {
        factor: 1.0,
        cooldown: Duration::ZERO,
    };
}

/// The shared limiter state (Redis) could not be read.
#[derive(Debug, thiserror::Error)]
#[error("rate limiter state unavailable: {0}")]
pub struct StateUnavailable(#[source] apalis_core::error::BoxDynError);

/// GCRA cells one delivery costs at `factor` of the rate: slowing to a half charges two.
pub(super) fn cost(factor: f64, burst: u32) -> u32 {
    let cells = (1.0 / factor.clamp(MIN_RATE_FACTOR, 1.0)).ceil() as u32;
    cells.clamp(1, burst.max(1))
}

/// The adaptation after a 429, and how long the key is held back: the receiver's
/// `Retry-After` or one slowed interval, at most `cap`.
fn slowed(
    current: Adaptation,
    retry_after: Option<Duration>,
    interval: Duration,
    cap: Duration,
) -> (Adaptation, Duration) {
    let factor = (current.factor / 2.0).max(MIN_RATE_FACTOR);
    let cooldown = retry_after
        .unwrap_or_else(|| Duration::try_from_secs_f64(interval.as_secs_f64() / factor).unwrap_or(cap))
        .min(cap);
    (Adaptation { factor, cooldown }, cooldown)
}

/// A stored rate factor, read back within [`MIN_RATE_FACTOR`]`..=1` (unreadable: full rate).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(super) fn stored_factor(text: &str) -> f64 {
    match text.parse::<f64>() {
        Ok(factor) if factor.is_finite() => factor.clamp(MIN_RATE_FACTOR, 1.0),
        _ => 1.0,
    }
}

/// The adaptation after a success.
fn recovered(current: Adaptation) -> (Adaptation, Duration) {
    let factor = (current.factor + RECOVERY_STEP).min(1.0);
    (Adaptation { factor, ..current }, Duration::ZERO)
}

impl RateLimitLayer {
    /// Each endpoint (or subscription key) gets `limit`; no global limit; adaptive; state in
    /// memory.
    pub fn per_endpoint(limit: Limit) -> Self {
        let settings = Settings {
            endpoint: limit,
            global: None,
            adaptive: true,
            max_deferral: DEFAULT_MAX_DEFERRAL,
            cap: DEFAULT_KEY_CAP,
        };
        Self::build(settings, None)
    }

    /// Also holds all deliveries together to `limit`.
    pub fn global(self, limit: Limit) -> Self {
        let settings = Settings {
            global: Some(limit),
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// Whether a 429 slows its endpoint down (on by default).
    pub fn adaptive(self, adaptive: bool) -> Self {
        let settings = Settings {
            adaptive,
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// The longest this layer defers a delivery, and holds an endpoint back after a 429 with a
    /// `Retry-After`: one hour by default ([`DEFAULT_MAX_DEFERRAL`]), at least a millisecond,
    /// at most [`DeliveryPolicy::MAX_DELAY`](crate::policy::DeliveryPolicy::MAX_DELAY). A delivery
    /// that would wait longer (a receiver asking for days, a limit of one a day) is deferred by
    /// this much, then checked again.
    pub fn max_deferral(self, max: Duration) -> Self {
        let settings = Settings {
            max_deferral: deferral_cap(max),
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// Keeps at most `cap` keys in each in-memory map of this layer ([`DEFAULT_KEY_CAP`] by
    /// default: 100,000 keys, 32 MiB): the budgets (one per key and limit), the 429
    /// slow-downs, and the spreading of deferrals. Past it, the least recently used keys are
    /// forgotten: a forgotten key starts again with a full burst at full rate (at worst one
    /// burst early), so size the cap above the number of keys busy at once. In Redis mode only
    /// the spreading is in memory. Starts the in-memory state anew.
    pub fn max_keys(self, cap: MemoryCap) -> Self {
        let settings = Settings {
            cap,
            ..self.shared.settings
        };
        Self::build(settings, self.redis())
    }

    /// The sizes of this layer's in-memory maps next to their caps (introspection:
    /// dashboards, tests).
    pub fn memory_usage(&self) -> Vec<MapUsage> {
        let mut usage = match &self.shared.budget {
            Budget::Local(local) => local.usage().to_vec(),
            #[cfg(feature = "redis")]
            Budget::Redis(_) => Vec::new(),
        };
        usage.push(self.shared.spread.usage());
        usage
    }

    /// Keeps the budgets in Redis under `prefix`, shared by every worker using the same
    /// prefix (give each fleet, or each test, its own).
    #[cfg(feature = "redis")]
    pub fn shared(self, conn: ::redis::aio::ConnectionManager, prefix: impl Into<String>) -> Self {
        Self::build(self.shared.settings, Some((conn, prefix.into())))
    }

    /// How far `key` is slowed down now.
    pub async fn adaptation(&self, key: &str) -> Result<Adaptation, StateUnavailable> {
        match &self.shared.budget {
            Budget::Local(local) => Ok(local.adaptation(key)),
            #[cfg(feature = "redis")]
            Budget::Redis(redis) => redis.adaptation(key).await,
        }
    }

    #[cfg(feature = "redis")]
    fn redis(&self) -> Option<(::redis::aio::ConnectionManager, String)> {
        match &self.shared.budget {
            Budget::Redis(redis) => Some(redis.connection()),
            Budget::Local(_) => None,
        }
    }

    #[cfg(not(feature = "redis"))]
    fn redis(&self) -> Option<std::convert::Infallible> {
        None
    }

    #[cfg(feature = "redis")]
    fn build(settings: Settings, redis: Option<(::redis::aio::ConnectionManager, String)>) -> Self {
        let Settings {
            endpoint,
            global,
            max_deferral,
            cap,
            ..
        } = settings;
        let budget = match redis {
            Some((conn, prefix)) => {
                Budget::Redis(redis::RedisBudget::new(conn, prefix, endpoint, global, max_deferral))
            }
            None => Budget::Local(Box::new(local::LocalBudget::new(endpoint, global, cap))),
        };
        Self::with_budget(settings, budget)
    }

    #[cfg(not(feature = "redis"))]
    fn build(settings: Settings, _: Option<std::convert::Infallible>) -> Self {
        let local = local::LocalBudget::new(settings.endpoint, settings.global, settings.cap);
        let budget = Budget::Local(Box::new(local));
        Self::with_budget(settings, budget)
    }

    fn with_budget(settings: Settings, budget: Budget) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                budget,
                spread: Spread::new(settings.cap),
            }),
        }
    }
}

impl Shared {
    async fn decide(&self, key: &str, limit: Option<Limit>) -> Result<Decision, StateUnavailable> {
        match &self.budget {
            Budget::Local(local) => Ok(local.acquire(key, limit)),
            #[cfg(feature = "redis")]
            Budget::Redis(redis) => redis.acquire(key, limit).await,
        }
    }

    /// Slows `key` down after a 429, or gives rate back after a success. The receiver's
    /// `Retry-After` holds the key back for at most the job's `max_retry_after` and the
    /// layer's `max_deferral`.
    async fn observe(&self, key: &str, factor: f64, max_retry_after: Duration, result: &AttemptResult) {
        let AttemptResult::Response {
            status, retry_after, ..
        } = result
        else {
            return;
        };
        let interval = self.settings.endpoint.interval();
        let cap = self.settings.max_deferral.min(max_retry_after);
        let outcome = match *status {
            429 => {
                tracing::info!(key, "429: slowing the endpoint down");
                self.adapt(key, |current| slowed(current, *retry_after, interval, cap))
                    .await
            }
            200..=299 if factor < 1.0 => self.adapt(key, recovered).await,
            _ => Ok(()),
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "could not record the endpoint's rate adaptation");
        }
    }

    async fn adapt(
        &self,
        key: &str,
        change: impl FnOnce(Adaptation) -> (Adaptation, Duration),
    ) -> Result<(), StateUnavailable> {
        match &self.budget {
            Budget::Local(local) => {
                local.adapt(key, change);
                Ok(())
            }
            #[cfg(feature = "redis")]
            Budget::Redis(redis) => redis.adapt(key, change).await,
        }
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.shared.budget {
            Budget::Local(_) => "local",
            #[cfg(feature = "redis")]
            Budget::Redis(_) => "redis",
        };
        let settings = &self.shared.settings;
        f.debug_struct("RateLimitLayer")
            .field("endpoint", &settings.endpoint)
            .field("global", &settings.global)
            .field("adaptive", &settings.adaptive)
            .field("max_deferral", &settings.max_deferral)
            .field("cap", &settings.cap)
            .field("state", &mode)
            .finish()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service made by [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for RateLimitService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<DeliveryRequest> for RateLimitService<S>
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
        let shared = Arc::clone(&self.shared);
        let mut inner = take_ready(&mut self.inner);
        Box::pin(async move {
            let job = Arc::clone(&request.job);
            let key = job.rate_limit_key();
            let limit = job.own_rate_limit();
            let settings = shared.settings;
            let factor = match shared.decide(key, limit).await {
                Ok(Decision::Admit { factor }) => factor,
                Ok(Decision::Wait(wait)) => {
                    let interval = limit.unwrap_or(settings.endpoint).interval();
                    let delay = shared.spread.delay(key, wait, interval, settings.max_deferral);
                    return Ok(AttemptResult::Deferred {
                        delay,
                        reason: DeferReason::RateLimited,
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "deferring: the rate budget cannot be checked");
                    return Ok(AttemptResult::Deferred {
                        delay: UNAVAILABLE_DELAY,
                        reason: DeferReason::LimiterUnavailable,
                    });
                }
            };
            let max_retry_after = job.policy().max_retry_after();
            let result = inner.call(request).await?;
            if settings.adaptive {
                shared.observe(key, factor, max_retry_after, &result).await;
            }
            Ok(result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_429_halves_the_rate_and_successes_give_it_back() {
        let interval = Duration::from_millis(100);
        let cap = DEFAULT_MAX_DEFERRAL;
        let (slow, cooldown) = slowed(Adaptation::FULL, None, interval, cap);
        assert_eq!((slow.factor, cooldown), (0.5, Duration::from_millis(200)));
        let (slower, cooldown) = slowed(slow, Some(Duration::from_secs(3)), interval, cap);
        assert_eq!((slower.factor, cooldown), (0.25, Duration::from_secs(3)));
        let mut floor = slower;
        for _ in 0..10 {
            floor = slowed(floor, None, interval, cap).0;
        }
        assert_eq!(floor.factor, MIN_RATE_FACTOR);
        let mut back = floor;
        for _ in 0..15 {
            back = recovered(back).0;
        }
        assert_eq!(back.factor, 1.0);
        assert_eq!(
            (cost(1.0, 10), cost(0.5, 10), cost(0.3, 10), cost(MIN_RATE_FACTOR, 4)),
            (1, 2, 4, 4)
        );
    }

    #[test]
    fn a_huge_retry_after_or_interval_is_cut_to_the_cap() {
        let cap = Duration::from_secs(2);
        for retry_after in [Some(Duration::MAX), Some(Duration::from_secs(9_300_000_000_000)), None] {
            let (adaptation, cooldown) = slowed(Adaptation::FULL, retry_after, Duration::MAX, cap);
            assert_eq!((adaptation.cooldown, cooldown), (cap, cap), "{retry_after:?}");
        }
        for (text, factor) in [
            ("0.5", 0.5),
            ("NaN", 1.0),
            ("inf", 1.0),
            ("-3", MIN_RATE_FACTOR),
            ("x", 1.0),
        ] {
            assert_eq!(stored_factor(text), factor, "{text}");
        }
        assert_eq!(cost(f64::NAN, 8), 1);
    }
}
