//! [`WebhookService`]: the apalis service that runs one attempt through the delivery stack.

#[cfg(feature = "ordering")]
use super::settle::Patience;
#[cfg(feature = "registry")]
use super::settle::report_health;
use super::settle::{NoLines, dead_letter, settle};
use super::*;

/// The apalis service of webhook jobs: runs the attempt through the delivery stack, then marks
/// it delivered, stores the next attempt, or dead-letters it. Made by [`WebhookWorker`].
pub struct WebhookService<S, B, K> {
    pub(super) inner: S,
    pub(super) backend: B,
    pub(super) hooks: Hooks,
    #[cfg(feature = "registry")]
    pub(super) health: Option<EndpointHealth>,
    #[cfg(feature = "ordering")]
    pub(super) lines: Option<OrderedLines>,
    pub(super) attempt_limit: Duration,
    pub(super) _kind: PhantomData<fn() -> K>,
}

impl<S: Clone, B: Clone, K> Clone for WebhookService<S, B, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            hooks: self.hooks.clone(),
            #[cfg(feature = "registry")]
            health: self.health.clone(),
            #[cfg(feature = "ordering")]
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
        if job.is_parked() {
            // Fan-out stored it for a disabled endpoint: set it aside unsent, before any layer
            // (rate limit, breaker, in-flight cap) counts it, as a dead letter that
            // `WebhookStore::recover` replays.
            let result = AttemptResult::Refused {
                reason: "parked: the endpoint was disabled when the event was fanned out".to_owned(),
            };
            let record = AttemptRecord::new(&job, unix_millis(), &result);
            let error = dead_letter(&job, DeadLetterReason::Parked, record, &result, &self.hooks);
            return Box::pin(async move { Err(error) });
        }
        // An ordered delivery (replays go outside their line) needs the lines to move on.
        let ordered = job.line().is_some() && job.replay() == 0;
        // Without the `ordering` feature a worker has no lines, but the job format is the same:
        // an ordered job that reaches it is still this listed, replayable dead letter.
        #[cfg(feature = "ordering")]
        let has_lines = self.lines.is_some();
        #[cfg(not(feature = "ordering"))]
        let has_lines = false;
        if ordered && !has_lines {
            tracing::error!(webhook.id = %job.webhook_id(), "ordered delivery on a worker without lines");
            // A dead letter like any other, so the store lists it and it can be replayed.
            let result = AttemptResult::Refused {
                reason: NoLines.to_string(),
            };
            let record = AttemptRecord::new(&job, unix_millis(), &result);
            let error = dead_letter(&job, DeadLetterReason::WorkerWithoutLines, record, &result, &self.hooks);
            return Box::pin(async move { Err(error) });
        }
        #[cfg(feature = "ordering")]
        let lines = self.lines.clone().filter(|_| ordered);
        let (span, trace_headers) = observe::attempt_span(&job);
        let mut request = DeliveryRequest::new(Arc::clone(&job));
        request.headers = trace_headers;
        let started_at_ms = unix_millis();
        let attempt = span.in_scope(|| self.inner.call(request));
        let attempt_limit = self.attempt_limit;
        let mut backend = self.backend.clone();
        let hooks = self.hooks.clone();
        #[cfg(feature = "registry")]
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
                #[cfg(feature = "ordering")]
                let ends_delivery = matches!(report, Ok(DeliveryReport::Delivered { .. }) | Err(_));
                #[cfg(feature = "ordering")]
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
                #[cfg(feature = "registry")]
                if let (Some(health), Some(endpoint_id)) = (&health, job.endpoint_id()) {
                    report_health(health, &job, endpoint_id, &result, &hooks).await;
                }
                report
            }
            .instrument(span),
        )
    }
}
