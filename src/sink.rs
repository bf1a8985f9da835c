//! [`WebhookSink`]: where deliveries and their next attempts are stored.

use std::future::Future;

use apalis_core::{
    backend::{TaskSink, TaskSinkError},
    task::builder::TaskBuilder,
};

use crate::job::WebhookJob;

/// How often apalis itself runs one delivery attempt whose handling failed for a reason of the
/// infrastructure (the next attempt could not be stored, say). Delivery failures are counted by
/// the webhook's own [`DeliveryPolicy`](crate::DeliveryPolicy), not by this.
pub(crate) const INFRA_MAX_ATTEMPTS: u32 = 25;

/// Somewhere webhook jobs can be pushed: every apalis backend that stores [`WebhookJob`]s (through
/// its [`TaskSink`]), and [`memory::MemorySink`](crate::backend::memory::MemorySink).
///
/// [`WebhookSubscription::dispatch`](crate::WebhookSubscription::dispatch) pushes the first attempt
/// through it, and the worker the next attempt after a retryable failure. `K` is the backend's
/// kind marker; it is inferred.
pub trait WebhookSink<K>: Send {
    /// The backend's push error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Stores `job`, due at `run_at` (Unix seconds) or now. Pushing the same job attempt twice
    /// stores it once on backends that honour idempotency keys.
    fn push_job(
        &mut self,
        job: WebhookJob,
        run_at: Option<u64>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether deliveries with an ordering key are kept in order
    /// ([`OrderedSink`](crate::ordering::OrderedSink)); `dispatch` refuses them otherwise.
    fn orders(&self) -> bool {
        false
    }

    /// How long the backend waits for a silent worker before handing its tasks to another
    /// (heartbeat interval × missed heartbeats), if it does. A worker must finish any attempt
    /// within it: [`WebhookWorker`](crate::WebhookWorker) checks its
    /// [`max_attempt_timeout`](crate::WebhookWorker::max_attempt_timeout) against it.
    fn orphan_window(&self) -> Option<std::time::Duration> {
        None
    }

    /// Stores `jobs`, all due now: in one round trip (one transaction, one pipeline) on
    /// SQLite, Postgres and Redis; one by one elsewhere. Used by fan-out.
    fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> impl Future<Output = Result<(), Self::Error>> + Send {
        async move {
            for job in jobs {
                self.push_job(job, None).await?;
            }
            Ok(())
        }
    }
}

impl<S, K> WebhookSink<K> for S
where
    S: TaskSink<WebhookJob, K> + Send,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    type Error = TaskSinkError<S::Error>;

    fn push_job(
        &mut self,
        job: WebhookJob,
        run_at: Option<u64>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.push_task(task(job, run_at))
    }

    fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> impl Future<Output = Result<(), Self::Error>> + Send {
        // Through the backend's buffered sink: apalis-sqlite writes the batch in one flush.
        let tasks = futures::stream::iter(jobs.into_iter().map(|job| task(job, None)));
        async move { self.push_all(tasks).await }
    }
}

/// The apalis task of one job: its idempotency key, apalis's own attempt limit, its due time.
fn task(job: WebhookJob, run_at: Option<u64>) -> apalis_core::task::Task<WebhookJob> {
    let key = job.idempotency_key();
    let mut task = TaskBuilder::new(job)
        .idempotency_key(key)
        .max_attempts(INFRA_MAX_ATTEMPTS as usize);
    if let Some(run_at) = run_at {
        task = task.run_at_timestamp(run_at);
    }
    task.build()
}
