//! [`OrderedSink`]: a sink that puts ordered deliveries in their lines.

use std::fmt;

use super::{LineError, OrderedLines, decode, encode};
use crate::{job::WebhookJob, sink::WebhookSink};

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

/// Why an ordered push failed. Nothing was enqueued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderedSinkError<E: std::error::Error + 'static> {
    /// The line store failed.
    #[error(transparent)]
    Lines(#[from] LineError),
    /// The backend failed the push.
    #[error("backend push failed: {0}")]
    Backend(#[source] E),
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
        if let Err(error) = self.inner.push_job(job, run_at).await {
            // Not enqueued after all: take it out, and hand the line to whoever entered since.
            if let Some(next) = self.lines.store().leave(&line, &member).await? {
                let _ = self.inner.push_job(decode(&next)?, None).await;
            }
            return Err(OrderedSinkError::Backend(error));
        }
        Ok(())
    }

    fn orders(&self) -> bool {
        true
    }
}
