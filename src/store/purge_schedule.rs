//! [`PurgeSchedule`]: [`WebhookStore::purge`] every so often, beside the worker.

use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};

use super::{
    WebhookStore,
    retention::{PurgeReport, RetentionPolicy},
};

/// Shortest interval between two purges of a [`PurgeSchedule`]; shorter ones are raised to it.
pub const MIN_PURGE_INTERVAL: Duration = Duration::from_secs(1);

/// What a [`PurgeSchedule`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeRuns {
    /// Purges that ran to the end.
    pub succeeded: u64,
    /// Purges the backend failed (logged; tried again at the next tick).
    pub failed: u64,
    /// What the last successful purge removed.
    pub last: Option<PurgeReport>,
    /// What every purge removed together, failed ones' finished batches excepted.
    pub total: PurgeReport,
}

/// Purges a [`WebhookStore`] at a fixed interval on a Tokio task, until dropped.
///
/// The first purge runs at once. A purge that fails (the backend is down, say) is logged with
/// `tracing` at `warn` and tried again at the next tick; the schedule never stops on its own.
/// A purge cut short loses nothing that should be kept: each batch is atomic (see
/// [`WebhookStore::purge`]). Running one schedule in each of several processes on the same queue
/// is safe (purges are idempotent), only wasteful.
///
/// Run it beside the `Monitor`, for as long as the worker runs:
///
/// ```no_run
/// # async fn example(storage: apalis_webhooks::sqlite::SqliteStorage<apalis_webhooks::WebhookJob>, monitor: apalis::prelude::Monitor) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use apalis_webhooks::store::{RetentionPolicy, WebhookStore};
///
/// let store = WebhookStore::sqlite(&storage);
/// let _purging = store.purge_every(RetentionPolicy::new(), Duration::from_secs(3600));
/// monitor.run().await?; // dropping `_purging` afterwards stops the purges
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PurgeSchedule {
    task: JoinHandle<()>,
    runs: watch::Receiver<PurgeRuns>,
}

impl PurgeSchedule {
    /// Purges `store` with `policy` now and then every `interval` (at least
    /// [`MIN_PURGE_INTERVAL`]).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as `tokio::spawn` does.
    pub fn spawn(store: WebhookStore, policy: RetentionPolicy, interval: Duration) -> Self {
        let (tx, runs) = watch::channel(PurgeRuns::default());
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval.max(MIN_PURGE_INTERVAL));
            // A purge longer than the interval is not followed by a burst of catch-up purges.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match store.purge(&policy).await {
                    Ok(report) => {
                        tracing::info!(
                            delivered = report.delivered,
                            dead_letters = report.dead_letters,
                            tasks = report.tasks,
                            keys = report.keys,
                            "purged finished webhook deliveries"
                        );
                        tx.send_modify(|runs| {
                            runs.succeeded = runs.succeeded.saturating_add(1);
                            runs.last = Some(report);
                            runs.total.add(&report);
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not purge finished webhook deliveries; trying again next time");
                        tx.send_modify(|runs| runs.failed = runs.failed.saturating_add(1));
                    }
                }
            }
        });
        Self { task, runs }
    }

    /// Follows the schedule's progress: `changed().await` on it waits for the next purge.
    pub fn runs(&self) -> watch::Receiver<PurgeRuns> {
        self.runs.clone()
    }
}

impl Drop for PurgeSchedule {
    fn drop(&mut self) {
        self.task.abort();
    }
}
