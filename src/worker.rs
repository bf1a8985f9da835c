//! The apalis service that runs one attempt and settles its outcome in the backend.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::{
    error::{AbortError, BoxDynError},
    task::Task,
};
use tower::{Layer, Service};
use tracing::Instrument;

pub use crate::report::{DEAD_LETTER_PREFIX, DeadLetter, DeadLetterReason, DeliveryEvent, DeliveryReport};
use crate::{
    backend::resilient::Backoff,
    bounded::MemoryCap,
    clock::{unix_millis, unix_seconds, unix_seconds_after},
    delivery::{DEFAULT_MAX_ATTEMPT_TIMEOUT, DeliveryRequest, HttpDelivery},
    job::WebhookJob,
    layers::signing::{SigningLayer, SigningService},
    observe::{self, Settled},
    ordering::OrderedLines,
    outcome::{AttemptResult, DeferReason, Outcome, TransportErrorKind},
    record::AttemptRecord,
    registry::{
        DEFAULT_DISABLE_AFTER, EndpointId, EndpointRegistry,
        health::{DEFAULT_HEALTH_CAP, EndpointHealth, Verdict},
    },
    secret_store::SecretStore,
    sink::WebhookSink,
    ssrf::EgressPolicy,
};

pub use crate::tuning::{DEFAULT_CONCURRENCY, DEFAULT_POLL_INTERVAL};

/// How long a worker keeps trying to store what an attempt decided (its next attempt, its
/// deferral, the next delivery of its ordered line) while the backend fails or does not
/// answer. Each store is idempotent, so it is tried again with capped backoff rather than
/// repeating the HTTP request. Past this the delivery becomes a dead letter
/// ([`DeadLetterReason::OutcomeNotStored`]), which can be replayed.
pub const SETTLE_PATIENCE: Duration = Duration::from_secs(600);

/// Longest one try of a backend write may take before it is tried again. The write may have
/// succeeded: it is idempotent.
const STORE_TRY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest floor [`deferral_floor`] sets: repeated deferrals of one attempt are at least
/// this far apart once it has been put off often.
pub const MAX_DEFERRAL_BACKOFF: Duration = Duration::from_secs(60);

/// The least wait before an attempt put off `deferrals` times already is tried again: none
/// the first time (the layer's own delay applies), then 1 s doubling up to
/// [`MAX_DEFERRAL_BACKOFF`]. A layer that keeps deferring with a short delay (a rate limiter
/// that cannot reach Redis, say) is thereby asked less and less often.
fn deferral_floor(deferrals: u32) -> Duration {
    match deferrals {
        0 => Duration::ZERO,
        n => Duration::from_secs(1u64.checked_shl(n - 1).unwrap_or(u64::MAX)).min(MAX_DEFERRAL_BACKOFF),
    }
}

/// Time the layers (rate limiter, breaker, signer with its secret store) may add to an
/// attempt's HTTP timeout before the worker gives up on the attempt.
const LAYER_ALLOWANCE: Duration = Duration::from_secs(5);

/// Runs the write `$write` (an expression that makes a fresh future each time) under a
/// [`Patience`] named `$what`; the final result.
macro_rules! patiently {
    ($what:expr, $write:expr) => {{
        let mut patience = Patience::new($what);
        loop {
            if let Some(done) = patience.try_once($write).await {
                break done;
            }
        }
    }};
}

type Hook = Arc<dyn Fn(&DeliveryEvent<'_>) + Send + Sync>;

/// Shared so that each attempt clones one `Arc`, not the list.
#[derive(Clone, Default)]
struct Hooks(Arc<Vec<Hook>>);

impl Hooks {
    fn emit(&self, event: &DeliveryEvent<'_>) {
        for hook in self.0.iter() {
            hook(event);
        }
    }
}

/// Builds the webhook delivery service for an apalis worker.
///
/// `backend` is the storage the webhook jobs live in; the service pushes each retry into it as
/// a new task with a later `run_at`, so backoff is persisted and holds no worker slot.
///
/// ```no_run
/// # async fn example(pool: apalis_sqlite::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
/// use apalis::prelude::*;
/// use apalis_webhooks::{WebhookWorker, sqlite};
///
/// let storage = sqlite::storage(&pool);
/// let service = WebhookWorker::new(storage.clone())
///     .on_endpoint_gone(|job| println!("disable the subscription for {}", job.url()))
///     .service()?;
/// Monitor::new()
///     .register(move |restarts| sqlite::worker(&storage, restarts).build(service.clone()))
///     .should_restart(|_, _| true)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub struct WebhookWorker<B> {
    backend: B,
    client: ClientSource,
    egress: EgressPolicy,
    secret_store: Option<Arc<dyn SecretStore>>,
    max_response_bytes: Option<usize>,
    hooks: Hooks,
    registry: Option<Arc<dyn EndpointRegistry>>,
    disable_after: Duration,
    lines: Option<OrderedLines>,
    max_attempt_timeout: Duration,
    health_cap: MemoryCap,
}

impl<B: fmt::Debug> fmt::Debug for WebhookWorker<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookWorker")
            .field("backend", &self.backend)
            .field("egress", &self.egress)
            .field("client", &self.client)
            .field("secret_store", &self.secret_store.is_some())
            .field("hooks", &self.hooks.0.len())
            .field("registry", &self.registry.is_some())
            .field("disable_after", &self.disable_after)
            .field("lines", &self.lines)
            .field("max_attempt_timeout", &self.max_attempt_timeout)
            .finish_non_exhaustive()
    }
}

/// Where the worker's HTTP client comes from.
#[derive(Clone)]
enum ClientSource {
    /// [`HttpDelivery::with_egress`].
    Default,
    /// The app's builder, with the guard applied.
    Guarded(Arc<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>),
    /// The app's finished client, used as it is.
    Unguarded(reqwest::Client),
}

impl fmt::Debug for ClientSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "Default",
            Self::Guarded(_) => "Guarded",
            Self::Unguarded(_) => "Unguarded",
        })
    }
}

/// Why [`WebhookWorker`] could not build its service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Could not build the HTTP client (for example, no TLS roots could be loaded).
    #[error("could not build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// The backend hands a silent worker's tasks to another after `orphan_window`, which is
    /// not longer than the longest attempt this worker may run: a worker busy with a slow
    /// receiver would have its deliveries sent again by a peer.
    #[error(
        "the backend's orphan window ({orphan_window:?}: heartbeat interval × missed heartbeats) must be longer \
         than the worker's max_attempt_timeout ({max_attempt_timeout:?}) plus {allowance:?} for the layers; \
         raise the backend's missed heartbeats or lower WebhookWorker::max_attempt_timeout"
    )]
    OrphanWindowTooShort {
        /// The backend's orphan window.
        orphan_window: Duration,
        /// The worker's cap on one attempt's HTTP timeout.
        max_attempt_timeout: Duration,
        /// What the layers may add to it.
        allowance: Duration,
    },
}

impl<B: Clone> WebhookWorker<B> {
    /// A builder for the service that delivers the jobs stored in `backend`.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            client: ClientSource::Default,
            egress: EgressPolicy::default(),
            secret_store: None,
            max_response_bytes: None,
            hooks: Hooks::default(),
            registry: None,
            disable_after: DEFAULT_DISABLE_AFTER,
            lines: None,
            max_attempt_timeout: DEFAULT_MAX_ATTEMPT_TIMEOUT,
            health_cap: DEFAULT_HEALTH_CAP,
        }
    }

    /// Cap of each attempt's HTTP timeout ([`DEFAULT_MAX_ATTEMPT_TIMEOUT`], 20 s): a
    /// subscription's own [`timeout`](crate::WebhookSubscription::timeout) applies up to it,
    /// and the whole attempt, layers included, is abandoned (a transport timeout) 5 s past
    /// it. Building the service fails if the backend's orphan window is not longer than that.
    pub fn max_attempt_timeout(mut self, limit: Duration) -> Self {
        self.max_attempt_timeout = limit;
        self
    }

    /// Delivers ordered deliveries (those with an
    /// [`ordering_key`](crate::WebhookSubscription::ordering_key)) one after the other through
    /// `lines`, the same lines they were dispatched into (see [`crate::ordering`]). A worker
    /// without lines kills an ordered delivery's task (its error names this method) rather than
    /// deliver it out of order, as it could not move its line on.
    ///
    /// Give it lines [`with_repair`](OrderedLines::with_repair) so that each service it builds
    /// repairs them periodically (until the service is dropped): a line whose head's dispatch
    /// was cut short, or whose head's task apalis gave up on, then moves on by itself.
    pub fn ordered(mut self, lines: OrderedLines) -> Self {
        self.lines = Some(lines);
        self
    }

    /// Keeps `registry` current for fanned-out deliveries (jobs with an
    /// [`endpoint_id`](WebhookJob::endpoint_id)): records their failures and successes, and
    /// disables an endpoint that answers 410 Gone or fails without a success for
    /// [`disable_endpoints_after`](Self::disable_endpoints_after), firing
    /// [`DeliveryEvent::EndpointDisabled`]. A registry that cannot be reached is logged, and
    /// never holds up or fails a delivery.
    pub fn registry(mut self, registry: impl EndpointRegistry) -> Self {
        self.registry = Some(Arc::new(registry));
        self
    }

    /// How many registry endpoints the worker remembers a recent success of, so that a healthy
    /// endpoint costs one registry write per 10 s ([`DEFAULT_HEALTH_CAP`]: 100,000 endpoints,
    /// 16 MiB). An endpoint dropped past the cap has its next success written again; its
    /// failures are kept in the registry, not here, so disabling is not affected.
    pub fn max_tracked_endpoints(mut self, cap: MemoryCap) -> Self {
        self.health_cap = cap;
        self
    }

    /// How long an endpoint may fail without a success before it is disabled
    /// ([`DEFAULT_DISABLE_AFTER`]: five days). Needs a [`registry`](Self::registry).
    pub fn disable_endpoints_after(mut self, period: Duration) -> Self {
        self.disable_after = period;
        self
    }

    /// Which addresses deliveries may connect to: public ones only by default (see
    /// [`crate::ssrf`]). Tests and demos with a receiver on this machine allow loopback:
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) {
    /// use apalis_webhooks::{WebhookWorker, ssrf::EgressPolicy};
    ///
    /// let worker = WebhookWorker::new(storage).egress(EgressPolicy::new().allow_loopback());
    /// # drop(worker); }
    /// ```
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.egress = policy;
        self
    }

    /// Resolves the key ids of [secret-store](crate::SecretStore) jobs through `store` (used by
    /// [`service`](Self::service); with [`service_with`](Self::service_with), put
    /// [`signing_layer`](Self::signing_layer) in your stack).
    pub fn secret_store(mut self, store: impl SecretStore) -> Self {
        self.secret_store = Some(Arc::new(store));
        self
    }

    /// Deliver with a client built from `make`'s builder (timeouts, TLS roots, pool
    /// settings, a `User-Agent`), called once per [`service`](Self::service) built. The guard is
    /// applied on top of whatever the builder says: a
    /// [`GuardedResolver`](crate::ssrf::GuardedResolver) with the worker's
    /// [`egress`](Self::egress) policy, no proxies (not even from the environment) and no
    /// redirects (see [`HttpDelivery::from_builder`]).
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) {
    /// use std::time::Duration;
    /// use apalis_webhooks::WebhookWorker;
    ///
    /// let worker = WebhookWorker::new(storage)
    ///     .http_client(|| reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)));
    /// # drop(worker); }
    /// ```
    pub fn http_client(mut self, make: impl Fn() -> reqwest::ClientBuilder + Send + Sync + 'static) -> Self {
        self.client = ClientSource::Guarded(Arc::new(make));
        self
    }

    /// Deliver with this finished client, **without the guard's resolver**: names are
    /// resolved, proxies and redirects followed as the client does, unchecked, before the
    /// request is sent. The worker still refuses IP-literal URLs its policy does not allow, and
    /// refuses (dead-letters, without retrying) the response of a peer whose address the
    /// policy does not allow, but by then the receiver has the request. Only for clients whose
    /// every target you trust; prefer [`http_client`](Self::http_client).
    pub fn unguarded_http_client(mut self, client: reqwest::Client) -> Self {
        self.client = ClientSource::Unguarded(client);
        self
    }

    /// Cap of the response body read per attempt (64 KiB by default). Interim `1xx`
    /// responses before the final head are skipped by the HTTP stack without being counted:
    /// a receiver streaming `100 Continue` is bounded by the attempt timeout, not by this cap.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = Some(limit);
        self
    }

    /// Calls `hook` for every [`DeliveryEvent`], once the outcome is decided (the backend's
    /// record of it follows moments later). Hooks run on the worker: keep them quick, and
    /// do not panic in them.
    pub fn on_event(mut self, hook: impl Fn(&DeliveryEvent<'_>) + Send + Sync + 'static) -> Self {
        Arc::make_mut(&mut self.hooks.0).push(Arc::new(hook));
        self
    }

    /// Calls `hook` with the job when a receiver answers 410 Gone, so the app can disable the
    /// subscription. The delivery is dead-lettered, not retried.
    pub fn on_endpoint_gone(self, hook: impl Fn(&WebhookJob) + Send + Sync + 'static) -> Self {
        self.on_event(move |event| {
            if let DeliveryEvent::EndpointGone { job } = event {
                hook(job);
            }
        })
    }

    /// The service with the default stack: signing around HTTP delivery.
    pub fn service<K>(&self) -> Result<WebhookService<SigningService<HttpDelivery>, B, K>, BuildError>
    where
        B: WebhookSink<K>,
    {
        self.service_with(self.signing_layer())
    }

    /// The signing layer [`service`](Self::service) uses, with this worker's secret store if it
    /// has one: the one to put in a stack for [`service_with`](Self::service_with).
    pub fn signing_layer(&self) -> SigningLayer {
        match &self.secret_store {
            Some(store) => SigningLayer::new().with_shared_secret_store(Arc::clone(store)),
            None => SigningLayer::new(),
        }
    }

    /// The service with your own `layer` around HTTP delivery (it should include
    /// [`SigningLayer`] unless deliveries are meant to go out unsigned).
    pub fn service_with<L, K>(&self, layer: L) -> Result<WebhookService<L::Service, B, K>, BuildError>
    where
        L: Layer<HttpDelivery>,
        B: WebhookSink<K>,
    {
        let attempt_limit = self.max_attempt_timeout.saturating_add(LAYER_ALLOWANCE);
        if let Some(orphan_window) = self.backend.orphan_window()
            && orphan_window <= attempt_limit
        {
            return Err(BuildError::OrphanWindowTooShort {
                orphan_window,
                max_attempt_timeout: self.max_attempt_timeout,
                allowance: LAYER_ALLOWANCE,
            });
        }
        let mut delivery = match &self.client {
            ClientSource::Default => HttpDelivery::with_egress(self.egress.clone())?,
            ClientSource::Guarded(make) => HttpDelivery::from_builder(make(), self.egress.clone())?,
            ClientSource::Unguarded(client) => {
                HttpDelivery::with_unguarded_client(client.clone()).egress(self.egress.clone())
            }
        };
        if let Some(limit) = self.max_response_bytes {
            delivery = delivery.max_response_bytes(limit);
        }
        let inner = layer.layer(delivery.max_attempt_timeout(self.max_attempt_timeout));
        Ok(WebhookService {
            inner,
            backend: self.backend.clone(),
            hooks: self.hooks.clone(),
            health: self.registry.as_ref().map(|registry| {
                EndpointHealth::with_capacity(Arc::clone(registry), self.disable_after, self.health_cap)
            }),
            // Starts the lines' periodic repair, if they have one; it ends with the service.
            lines: self.lines.as_ref().map(OrderedLines::for_worker),
            attempt_limit,
            _kind: PhantomData,
        })
    }
}

/// The apalis service of webhook jobs: runs the attempt through the delivery stack, then marks
/// it delivered, stores the next attempt, or dead-letters it. Made by [`WebhookWorker`].
pub struct WebhookService<S, B, K> {
    inner: S,
    backend: B,
    hooks: Hooks,
    health: Option<EndpointHealth>,
    lines: Option<OrderedLines>,
    attempt_limit: Duration,
    _kind: PhantomData<fn() -> K>,
}

impl<S: Clone, B: Clone, K> Clone for WebhookService<S, B, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            hooks: self.hooks.clone(),
            health: self.health.clone(),
            lines: self.lines.clone(),
            attempt_limit: self.attempt_limit,
            _kind: PhantomData,
        }
    }
}

impl<S: fmt::Debug, B, K> fmt::Debug for WebhookService<S, B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, K> Service<Task<WebhookJob>> for WebhookService<S, B, K>
where
    S: Service<DeliveryRequest, Response = AttemptResult>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
    B: WebhookSink<K> + Clone + 'static,
{
    type Response = DeliveryReport;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<DeliveryReport, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<WebhookJob>) -> Self::Future {
        let task_id = task.task_id().map(ToString::to_string);
        let job = Arc::new(task.args);
        // An ordered delivery (replays go outside their line) needs the lines to move on.
        let ordered = job.line().is_some() && job.replay() == 0;
        if ordered && self.lines.is_none() {
            tracing::error!(webhook.id = %job.webhook_id(), "ordered delivery on a worker without lines");
            return Box::pin(async { Err(Box::new(AbortError::new(NoLines)) as BoxDynError) });
        }
        let lines = self.lines.clone().filter(|_| ordered);
        let span = observe::attempt_span(&job);
        let started_at_ms = unix_millis();
        let attempt = span.in_scope(|| self.inner.call(DeliveryRequest::new(Arc::clone(&job))));
        let attempt_limit = self.attempt_limit;
        let mut backend = self.backend.clone();
        let hooks = self.hooks.clone();
        let health = self.health.clone();
        Box::pin(
            async move {
                let result = match tokio::time::timeout(attempt_limit, attempt).await {
                    Ok(Ok(result)) => result,
                    // A layer failed instead of answering: count it as a transport failure.
                    Ok(Err(error)) => AttemptResult::Transport {
                        kind: TransportErrorKind::Other,
                        message: Into::<BoxDynError>::into(error).to_string(),
                        duration: Duration::ZERO,
                    },
                    // The HTTP timeout is below this limit: something in the layers hung.
                    Err(_) => AttemptResult::Transport {
                        kind: TransportErrorKind::Timeout,
                        message: format!("the attempt took longer than {attempt_limit:?}"),
                        duration: attempt_limit,
                    },
                };
                observe::record_result(&tracing::Span::current(), &result);
                let report = settle(&job, task_id.as_deref(), started_at_ms, &result, &mut backend, &hooks).await;
                // Delivered, or dead (the only errors `settle` returns are dead letters).
                let ends_delivery = matches!(report, Ok(DeliveryReport::Delivered { .. }) | Err(_));
                if let Some(lines) = lines
                    && ends_delivery
                {
                    // The line must move on whatever happened to the backend meanwhile; every
                    // try is idempotent. If it cannot for SETTLE_PATIENCE, the periodic repair
                    // of the lines frees it later.
                    let advanced = patiently!("advancing the ordered line", lines.advance(&job, &mut backend));
                    if let Err(error) = advanced {
                        tracing::error!(%error, "the ordered line could not move on; its repair will free it");
                    }
                }
                if let (Some(health), Some(endpoint_id)) = (&health, job.endpoint_id()) {
                    report_health(health, &job, endpoint_id, &result, &hooks).await;
                }
                report
            }
            .instrument(span),
        )
    }
}

/// Tries of one backend write whose repetition is harmless (an idempotent push, a line move):
/// capped backoff between tries, each try bounded by [`STORE_TRY_TIMEOUT`], for at most
/// [`SETTLE_PATIENCE`]. The attempt's outcome is stored once the backend answers, and the HTTP
/// request is never repeated for it.
struct Patience {
    what: &'static str,
    deadline: tokio::time::Instant,
    backoff: Backoff,
}

impl Patience {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            deadline: tokio::time::Instant::now() + SETTLE_PATIENCE,
            backoff: Backoff::default(),
        }
    }

    /// Runs one try: `Some` with the final result, or `None` (after the backoff wait) to try
    /// again.
    async fn try_once<E: Into<BoxDynError>>(
        &mut self,
        write: impl Future<Output = Result<(), E>>,
    ) -> Option<Result<(), BoxDynError>> {
        let error: BoxDynError = match tokio::time::timeout(STORE_TRY_TIMEOUT, write).await {
            Ok(Ok(())) => return Some(Ok(())),
            Ok(Err(error)) => error.into(),
            Err(_) => format!("no answer within {STORE_TRY_TIMEOUT:?}").into(),
        };
        if tokio::time::Instant::now() >= self.deadline {
            return Some(Err(error));
        }
        tracing::warn!(%error, "{} failed; trying again", self.what);
        self.backoff.wait().await;
        None
    }
}

/// Applies the outcome of one attempt of `job`, run as the task `task_id`.
async fn settle<B, K>(
    job: &WebhookJob,
    task_id: Option<&str>,
    started_at_ms: u64,
    result: &AttemptResult,
    backend: &mut B,
    hooks: &Hooks,
) -> Result<DeliveryReport, BoxDynError>
where
    B: WebhookSink<K>,
{
    let policy = job.policy();
    let record = AttemptRecord::new(job, started_at_ms, result);
    let reason = match result.classify(policy) {
        Outcome::Delivered => {
            tracing::debug!(status = result.status(), "delivered");
            observe::settled(job, result, Settled::Delivered);
            hooks.emit(&DeliveryEvent::Delivered { job, result });
            return Ok(DeliveryReport::Delivered { record });
        }
        Outcome::Retry { retry_after } if job.attempt() < policy.max_attempts => {
            let delay = policy.next_delay(job.attempt(), retry_after);
            let next_attempt_at = unix_seconds_after(delay);
            let next = job.next_attempt();
            let stored = patiently!(
                "storing the next attempt",
                backend.push_job(next.clone(), Some(next_attempt_at))
            );
            if let Err(error) = stored {
                return outcome_not_stored(job, record, result, hooks, &error);
            }
            tracing::info!(
                status = result.status(),
                error = result.error(),
                next_attempt_at,
                "retry scheduled"
            );
            observe::settled(job, result, Settled::RetryScheduled);
            hooks.emit(&DeliveryEvent::RetryScheduled {
                job,
                result,
                next_attempt_at,
            });
            return Ok(DeliveryReport::RetryScheduled {
                record,
                next_attempt_at,
            });
        }
        Outcome::Retry { .. } => DeadLetterReason::AttemptsExhausted,
        Outcome::Gone => {
            hooks.emit(&DeliveryEvent::EndpointGone { job });
            DeadLetterReason::EndpointGone
        }
        Outcome::Fatal => DeadLetterReason::Fatal,
        Outcome::Deferred { delay, reason } => {
            let now = unix_seconds();
            let since = job.deferred_since().unwrap_or(now);
            let horizon = policy.defer_horizon();
            if now.saturating_sub(since) >= horizon.as_secs() {
                return deferred_too_long(job, record, result, reason, horizon, hooks);
            }
            let until = unix_seconds_after(delay.max(deferral_floor(job.deferrals())));
            let deferred = job.deferred(now);
            let report = DeliveryReport::Deferred {
                webhook_id: job.webhook_id().clone(),
                attempt: job.attempt(),
                until,
                reason,
            };
            let stored_result = serde_json::json!({ "Ok": &report }).to_string();
            let stored = patiently!("storing the deferred attempt", async {
                match task_id {
                    // The running task itself moves back to the queue: nothing new is stored.
                    Some(task_id) => backend
                        .defer_task(task_id, deferred.clone(), until, &stored_result)
                        .await
                        .map(drop),
                    None => backend.push_job(deferred.clone(), Some(until)).await,
                }
            });
            if let Err(error) = stored {
                return outcome_not_stored(job, record, result, hooks, &error);
            }
            tracing::debug!(%reason, until, "deferred");
            observe::settled(job, result, Settled::Deferred(reason));
            hooks.emit(&DeliveryEvent::Deferred { job, reason, until });
            return Ok(report);
        }
    };
    Err(dead_letter(job, reason, record, result, hooks))
}

/// The attempt has been put off for longer than the delivery's horizon: it becomes a dead
/// letter rather than being put off again.
fn deferred_too_long(
    job: &WebhookJob,
    mut record: AttemptRecord,
    result: &AttemptResult,
    reason: DeferReason,
    horizon: Duration,
    hooks: &Hooks,
) -> Result<DeliveryReport, BoxDynError> {
    record.error = Some(format!(
        "put off for longer than the defer horizon ({}s); last held up by: {reason}",
        horizon.as_secs()
    ));
    Err(dead_letter(
        job,
        DeadLetterReason::DeferredTooLong,
        record,
        result,
        hooks,
    ))
}

/// Kills the task as a dead letter: apalis stores it `Killed`, with the record as its result.
fn dead_letter(
    job: &WebhookJob,
    reason: DeadLetterReason,
    record: AttemptRecord,
    result: &AttemptResult,
    hooks: &Hooks,
) -> BoxDynError {
    let dead_letter = DeadLetter {
        reason,
        max_attempts: job.policy().max_attempts,
        record,
    };
    tracing::warn!(status = result.status(), error = result.error(), ?reason, "dead letter");
    observe::settled(job, result, Settled::DeadLettered(reason));
    hooks.emit(&DeliveryEvent::DeadLettered {
        job,
        dead_letter: &dead_letter,
    });
    Box::new(AbortError::new(dead_letter))
}

/// The next attempt could not be stored for [`SETTLE_PATIENCE`]: rather than have apalis run
/// this attempt again (a repeated request, then a task stuck `Failed`), the delivery becomes
/// a dead letter that says so, stored with the acknowledgement once the backend is back.
fn outcome_not_stored(
    job: &WebhookJob,
    mut record: AttemptRecord,
    result: &AttemptResult,
    hooks: &Hooks,
    error: &BoxDynError,
) -> Result<DeliveryReport, BoxDynError> {
    tracing::error!(%error, "the backend did not store the attempt's outcome");
    let attempt_error = record.error.take().map(|e| format!("{e}; ")).unwrap_or_default();
    record.error = Some(format!("{attempt_error}outcome not stored: {error}"));
    Err(dead_letter(
        job,
        DeadLetterReason::OutcomeNotStored,
        record,
        result,
        hooks,
    ))
}

/// Tells the registry how an attempt of one of its endpoints went, once the outcome is stored.
async fn report_health(
    health: &EndpointHealth,
    job: &WebhookJob,
    endpoint_id: &EndpointId,
    result: &AttemptResult,
    hooks: &Hooks,
) {
    let verdict = match result.classify(job.policy()) {
        Outcome::Delivered => {
            health.succeeded(endpoint_id).await;
            return;
        }
        Outcome::Deferred { .. } => return,
        Outcome::Gone => health.gone(endpoint_id).await,
        Outcome::Retry { .. } | Outcome::Fatal => health.failed(endpoint_id).await,
    };
    if let Verdict::Disabled(reason) = verdict {
        observe::endpoint_disabled(job);
        hooks.emit(&DeliveryEvent::EndpointDisabled {
            job,
            endpoint_id,
            reason: &reason,
        });
    }
}

/// An ordered delivery reached a worker without [`WebhookWorker::ordered`].
#[derive(Debug, thiserror::Error)]
#[error(
    "ordered delivery on a worker without lines: configure WebhookWorker::ordered with the lines it was dispatched into"
)]
struct NoLines;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_deferrals_back_off_to_a_cap() {
        let floors: Vec<u64> = (0..10).map(|n| deferral_floor(n).as_secs()).collect();
        assert_eq!(floors, [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(deferral_floor(u32::MAX), MAX_DEFERRAL_BACKOFF);
    }
}

#[cfg(test)]
#[path = "worker_settle_tests.rs"]
mod settle_tests;
