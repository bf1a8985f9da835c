//! [`CircuitBreakerLayer`]: per-endpoint breakers that defer deliveries while an endpoint is
//! down, local or shared in Redis.

mod config;
mod state;
mod store;

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use rand::Rng;
use tower::{Layer, Service};

pub use config::{BreakerConfig, Trip};
pub use state::Phase;
pub use store::DEFAULT_BREAKER_CAP;

use self::{
    state::{Admission, Breaker},
    store::Store,
};
use super::{DEFAULT_MAX_DEFERRAL, deferral_cap, endpoint_failed, take_ready};
use crate::{
    bounded::{MapUsage, MemoryCap},
    delivery::DeliveryRequest,
    outcome::{AttemptResult, DeferReason},
};

/// Deferrals of an open breaker are spread over up to this much after it may half-open, so the
/// held-back deliveries do not all come due in the same instant.
const MAX_SPREAD: Duration = Duration::from_secs(1);

/// The shared breaker state (Redis) could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker state unavailable: {0}")]
pub struct StateUnavailable(#[source] apalis_core::error::BoxDynError);

/// A breaker moved from one phase to another.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StateChange {
    /// The endpoint (`host[:port]`).
    pub endpoint: String,
    /// Where it was.
    pub from: Phase,
    /// Where it is.
    pub to: Phase,
}

/// An endpoint's breaker, as [`CircuitBreakerLayer::state`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerState {
    /// Closed, open or half-open.
    pub phase: Phase,
    /// Failures in a row so far (closed).
    pub consecutive_failures: u32,
    /// Deliveries and failures in the window (failure-ratio breakers, closed).
    pub window_requests: u32,
    /// Failures among them.
    pub window_failures: u32,
    /// When an open breaker lets probes through.
    pub open_until: Option<SystemTime>,
    /// Probes sent and succeeded so far (half-open).
    pub probes_sent: u32,
    /// Probes that succeeded.
    pub probe_successes: u32,
}

type Callback = Arc<dyn Fn(&StateChange) + Send + Sync>;

/// One circuit breaker per endpoint (`host[:port]`): closed → open → half-open → closed.
///
/// * **Opens** after [`BreakerConfig`]'s threshold of failures (transport errors, timeouts,
///   5xx, 429; not other 4xx): consecutive, or a ratio within a window.
/// * **While open**, deliveries to that endpoint are answered with
///   [`AttemptResult::Deferred`]: stored again for when the breaker may half-open. No request
///   reaches the endpoint, no attempt is counted, no slot is held. Other endpoints are not
///   affected.
/// * **Half-open** lets the configured number of probes through; enough successes close it,
///   a failed probe opens it again.
/// * **Capped.** No deferral lasts longer than [`max_deferral`](Self::max_deferral) (one hour
///   by default); an open period found longer than [`BreakerConfig::open_for`] from now (state
///   written by a worker with another config, or tampered with) is cut to it. The breaker does
///   not read `Retry-After`: a 429 or 503 counts as one failure, whatever it asks for.
/// * **Local or shared.** State is in memory by default; with [`shared`] it is
///   in Redis, so every worker sees the same breaker and a restart keeps it.
/// * **Observable.** Changes are tracing events (`info` on close, `warn` on open) and reach
///   [`on_state_change`](Self::on_state_change) callbacks; [`state`](Self::state) answers
///   for one endpoint.
///
/// If the shared state cannot be reached, deliveries go through (a breaker protects the
/// receiver; it should not stop the sender when Redis blips) and a warning is logged.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::layers::{CircuitBreakerLayer, circuit_breaker::BreakerConfig};
///
/// let breakers = CircuitBreakerLayer::new(
///     BreakerConfig::default().consecutive_failures(5).open_for(Duration::from_secs(60)),
/// )
/// .on_state_change(|change| println!("{} is now {:?}", change.endpoint, change.to));
/// # drop(breakers);
/// ```
///
#[cfg_attr(feature = "redis", doc = "[`shared`]: Self::shared")]
#[cfg_attr(
    not(feature = "redis"),
    doc = "[`shared`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/layers/circuit_breaker/struct.CircuitBreakerLayer.html#method.shared"
)]
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
}

struct Shared {
    config: BreakerConfig,
    max_deferral: Duration,
    store: Store,
    callbacks: Vec<Callback>,
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new(BreakerConfig::default())
    }
}

/// Memory: the in-process breakers are capped.
impl CircuitBreakerLayer {
    /// Keeps at most `cap` breakers in memory ([`DEFAULT_BREAKER_CAP`] by default: 100,000
    /// endpoints, 32 MiB), forgetting the least recently used past it. A forgotten breaker is
    /// closed with nothing counted, as for an endpoint never seen: an open one lets deliveries
    /// through again until it trips anew, so size the cap above the number of endpoints that
    /// fail at the same time. Only endpoints with failures on record take room: a healthy
    /// delivery stores nothing. Starts the in-memory state anew; no effect on
    /// [`shared`] (Redis) state, which expires in Redis.
    ///
    #[cfg_attr(feature = "redis", doc = "[`shared`]: Self::shared")]
    #[cfg_attr(
        not(feature = "redis"),
        doc = "[`shared`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/layers/circuit_breaker/struct.CircuitBreakerLayer.html#method.shared"
    )]
    pub fn max_endpoints(self, cap: MemoryCap) -> Self {
        let mut shared = self.into_shared();
        if let Some(store) = shared.store.recapped(cap) {
            shared.store = store;
        }
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The size of the in-memory breaker map next to its cap (introspection: dashboards,
    /// tests); empty in Redis mode.
    pub fn memory_usage(&self) -> Vec<MapUsage> {
        self.shared.store.usage()
    }
}

impl CircuitBreakerLayer {
    /// Breakers with `config`, state in memory.
    pub fn new(config: BreakerConfig) -> Self {
        let store = Store::local(DEFAULT_BREAKER_CAP);
        Self::from_parts(config, DEFAULT_MAX_DEFERRAL, store, Vec::new())
    }

    /// The longest this layer defers a delivery: one hour by default
    /// ([`DEFAULT_MAX_DEFERRAL`]), at least a millisecond, at most
    /// [`DeliveryPolicy::MAX_DELAY`](crate::policy::DeliveryPolicy::MAX_DELAY). While a breaker stays
    /// open longer ([`BreakerConfig::open_for`]), its deliveries come back after this much and
    /// are deferred again.
    pub fn max_deferral(self, max: Duration) -> Self {
        let mut shared = self.into_shared();
        shared.max_deferral = deferral_cap(max);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Keeps the breakers in Redis under `prefix`, shared by every worker using the same
    /// prefix (give each fleet, or each test, its own).
    #[cfg(feature = "redis")]
    pub fn shared(self, conn: ::redis::aio::ConnectionManager, prefix: impl Into<String>) -> Self {
        let store = Store::Redis(store::redis_store::RedisStore {
            conn,
            prefix: prefix.into(),
        });
        let shared = &self.shared;
        Self::from_parts(
            shared.config.clone(),
            shared.max_deferral,
            store,
            shared.callbacks.clone(),
        )
    }

    /// Calls `callback` on every phase change this process makes (in a fleet, the worker that
    /// makes the change calls it): notify the subscriber's owner on open, say.
    pub fn on_state_change(self, callback: impl Fn(&StateChange) + Send + Sync + 'static) -> Self {
        let mut shared = self.into_shared();
        shared.callbacks.push(Arc::new(callback));
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The breaker of `endpoint` (`host[:port]`, as [`WebhookJob::endpoint`](crate::WebhookJob::endpoint)
    /// gives it).
    pub async fn state(&self, endpoint: &str) -> Result<BreakerState, StateUnavailable> {
        let (breaker, now) = self.shared.store.read(endpoint).await?;
        let (window_requests, window_failures) = breaker.window_counts(&self.shared.config, now);
        Ok(BreakerState {
            phase: breaker.phase,
            consecutive_failures: breaker.consecutive_failures,
            window_requests,
            window_failures,
            open_until: (breaker.phase == state::Phase::Open)
                .then(|| UNIX_EPOCH.checked_add(Duration::from_millis(breaker.open_until)))
                .flatten(),
            probes_sent: breaker.probes_sent,
            probe_successes: breaker.probe_successes,
        })
    }

    fn from_parts(config: BreakerConfig, max_deferral: Duration, store: Store, callbacks: Vec<Callback>) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                max_deferral,
                store,
                callbacks,
            }),
        }
    }

    fn into_shared(self) -> Shared {
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared,
            // Cloned before being configured: the clone keeps the old settings, and the state
            // starts anew here.
            Err(shared) => {
                let store = match &shared.store {
                    Store::Local(_) => shared.store.fresh(),
                    #[cfg(feature = "redis")]
                    Store::Redis(redis) => Store::Redis(store::redis_store::RedisStore {
                        conn: redis.conn.clone(),
                        prefix: redis.prefix.clone(),
                    }),
                };
                Shared {
                    config: shared.config.clone(),
                    max_deferral: shared.max_deferral,
                    store,
                    callbacks: shared.callbacks.clone(),
                }
            }
        }
    }
}

impl Shared {
    fn report(&self, endpoint: &str, change: store::Change) {
        let Some((from, to)) = change else { return };
        phase_gauge(endpoint, to);
        match to {
            Phase::Open => tracing::warn!(endpoint, ?from, ?to, "circuit breaker opened"),
            _ => tracing::info!(endpoint, ?from, ?to, "circuit breaker changed"),
        }
        let change = StateChange {
            endpoint: endpoint.to_owned(),
            from,
            to,
        };
        for callback in &self.callbacks {
            callback(&change);
        }
    }

    /// Admits or defers a delivery whose attempt may take `probe_wait`.
    async fn admit(&self, endpoint: &str, probe_wait: Duration) -> Admission {
        let step = |breaker: &mut Breaker, config: &BreakerConfig, now| breaker.admit(config, now, probe_wait);
        match self.store.update(&self.config, endpoint, step).await {
            Ok((admission, change)) => {
                self.report(endpoint, change);
                admission
            }
            Err(error) => {
                tracing::warn!(%error, endpoint, "sending without the circuit breaker");
                Admission::Go { probe: false }
            }
        }
    }

    async fn record(&self, endpoint: &str, failed: Option<bool>, probe: bool) {
        let step = |breaker: &mut Breaker, config: &BreakerConfig, now| breaker.record(config, now, failed, probe);
        match self.store.update(&self.config, endpoint, step).await {
            Ok(((), change)) => self.report(endpoint, change),
            Err(error) => tracing::warn!(%error, endpoint, "could not record the outcome in the circuit breaker"),
        }
    }
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.shared.store {
            Store::Local(_) => "local",
            #[cfg(feature = "redis")]
            Store::Redis(_) => "redis",
        };
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.shared.config)
            .field("max_deferral", &self.shared.max_deferral)
            .field("state", &mode)
            .field("callbacks", &self.shared.callbacks.len())
            .finish()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service made by [`CircuitBreakerLayer`].
#[derive(Clone)]
pub struct CircuitBreakerService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreakerService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<DeliveryRequest> for CircuitBreakerService<S>
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
            let endpoint = job.endpoint();
            let probe = match shared.admit(endpoint, job.policy().timeout()).await {
                Admission::Go { probe } => probe,
                Admission::Defer(wait) => {
                    let spread = rand::rng().random_range(Duration::ZERO..=MAX_SPREAD);
                    return Ok(AttemptResult::Deferred {
                        delay: wait.saturating_add(spread).min(shared.max_deferral),
                        reason: DeferReason::CircuitOpen,
                    });
                }
            };
            let result = inner.call(request).await?;
            shared.record(endpoint, endpoint_failed(&result), probe).await;
            Ok(result)
        })
    }
}
/// The `webhook_circuit_breaker_state` gauge (feature `metrics`): 0 closed, 1 half-open, 2 open.
/// Emitted here rather than by `observe`, which sits above the layers it observes.
fn phase_gauge(endpoint: &str, to: Phase) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("webhook_circuit_breaker_state", "endpoint" => endpoint.to_owned()).set(match to {
        Phase::Closed => 0.0,
        Phase::HalfOpen => 1.0,
        Phase::Open => 2.0,
    });
    #[cfg(not(feature = "metrics"))]
    let _ = (endpoint, to);
}
