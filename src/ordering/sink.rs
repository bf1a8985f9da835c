//! [`OrderedSink`]: a sink that puts ordered deliveries in their lines.

use std::fmt;

use super::{LineError, OrderedLines, encode};
use crate::{
    job::WebhookJob,
    sink::{Deferral, WebhookSink},
};

/// Made by [`OrderedLines::sink`]: a new delivery with an ordering key enters its line and is
/// pushed into `S` only as the line's head; everything else goes straight to `S`.
#[derive(Clone)]
pub struct OrderedSink<S> {
    lines: OrderedLines,
    inner: S,
}

impl<S> fmt::Debug for OrderedSink<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderedSink")
            .field("lines", &self.lines)
            .finish_non_exhaustive()
    }
}

/// Why an ordered push failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderedSinkError<E: std::error::Error + 'static> {
    /// The line store failed; nothing was enqueued.
    #[error(transparent)]
    Lines(#[from] LineError),
    /// The backend failed the push; nothing was enqueued.
    #[error("backend push failed: {0}")]
    Backend(#[source] E),
    /// The delivery is the head of its line, and the backend failed its push (which may have
    /// stored it all the same). It stays in its line, and
    /// [`repair`](super::OrderedLines::repair) pushes it if it was not stored: do not dispatch
    /// it again.
    #[error("backend push of a line's head failed; the line keeps it and repair pushes it: {0}")]
    InLine(#[source] E),
}

impl<S> OrderedSink<S> {
    pub(super) fn new(lines: OrderedLines, inner: S) -> Self {
        Self { lines, inner }
    }

    /// The sink underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: WebhookSink<K>, K> WebhookSink<K> for OrderedSink<S> {
    type Error = OrderedSinkError<S::Error>;

    async fn push_job(&mut self, mut job: WebhookJob, run_at: Option<u64>) -> Result<(), Self::Error> {
        let Some(line) = job.line().filter(|_| job.is_new_delivery()) else {
            return self
                .inner
                .push_job(job, run_at)
                .await
                .map_err(OrderedSinkError::Backend);
        };
        // A head may be pushed again by `repair` or a worker: let the backend deduplicate it.
        job.fresh = false;
        let member = job.webhook_id().as_str().to_owned();
        if !self.lines.store().enter(&line, &member, encode(&job)?).await? {
            return Ok(()); // Waits in its line; the worker pushes it after its predecessor.
        }
        // From here the head is in its line. If this push fails, or this future is dropped,
        // the push may have stored it or not: taking it out of the line could let the next one
        // run beside it, so it stays, and repair pushes it under this same key (stored once).
        self.inner.push_job(job, run_at).await.map_err(OrderedSinkError::InLine)
    }

    fn orders(&self) -> bool {
        true
    }

    fn orphan_window(&self) -> Option<std::time::Duration> {
        self.inner.orphan_window()
    }

    async fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        result: &str,
    ) -> Result<Deferral, Self::Error> {
        self.inner
            .defer_task(task_id, job, run_at, result)
            .await
            .map_err(OrderedSinkError::Backend)
    }
}
