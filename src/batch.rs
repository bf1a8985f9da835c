//! [`DispatchBatch`]: many deliveries stored in one round trip, all or none.
//!
//! `dispatch` costs one round trip (and on Postgres one commit, with apalis's `NOTIFY`) per
//! delivery. An app that emits many events at once adds them to a batch, each validated as
//! `dispatch` validates it, and stores the batch with one statement (Postgres), one
//! transaction (SQLite) or one `MULTI`/`EXEC` (Redis): every delivery is stored, or none is.

use std::time::Duration;

use serde::Serialize;

use crate::{
    dispatch_error::DispatchError,
    idempotency::DispatchKey,
    job::{WebhookId, WebhookJob},
    sink::WebhookSink,
    subscription::WebhookSubscription,
};

/// Most deliveries one batch holds: 10,000. A batch is one statement or transaction, held in
/// memory until it is stored; split larger sets into several batches.
pub const MAX_BATCH: usize = 10_000;

/// Deliveries validated one by one and stored together, all or none.
///
/// ```no_run
/// use apalis_webhooks::{WebhookJob, WebhookSubscription, batch::DispatchBatch, sqlite::SqliteStorage};
///
/// async fn emit(mut sink: SqliteStorage<WebhookJob>, customers: &[WebhookSubscription]) -> Result<(), apalis_webhooks::DispatchError> {
///     let mut batch = DispatchBatch::new();
///     for (n, customer) in customers.iter().enumerate() {
///         batch.add(customer, "order.created", &serde_json::json!({ "order": n }))?; // checked here
///     }
///     let ids = batch.dispatch(&mut sink).await?; // one transaction: all stored, or none
///     assert_eq!(ids.len(), customers.len());
///     Ok(())
/// }
/// ```
///
/// Idempotency keys: either every delivery of a batch has one or none has
/// ([`DispatchError::MixedBatch`] otherwise). A keyed batch dispatched again stores nothing
/// new and returns the first ids, as `dispatch` does; Redis and the memory sink remember the
/// keys for the longest window in the batch.
#[derive(Debug, Default)]
pub struct DispatchBatch {
    jobs: Vec<WebhookJob>,
    /// One per job when the batch is keyed (the first job decides).
    keys: Vec<DispatchKey>,
    window: Duration,
}

impl DispatchBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and serializes one delivery of `subscription` as
    /// [`dispatch`](WebhookSubscription::dispatch) does, and adds it. On an error nothing is
    /// added and the batch stays usable. Returns the delivery's webhook id, which a keyed
    /// batch may replace by the first dispatch's (see [`dispatch`](Self::dispatch)).
    pub fn add<T: Serialize + ?Sized>(
        &mut self,
        subscription: &WebhookSubscription,
        event_type: &str,
        payload: &T,
    ) -> Result<WebhookId, DispatchError> {
        if self.jobs.len() >= MAX_BATCH {
            return Err(DispatchError::BatchTooLarge { limit: MAX_BATCH });
        }
        let mut job = subscription.job(event_type, payload)?;
        let key = subscription.dispatch_key();
        let batch_keyed = !self.keys.is_empty();
        if !self.jobs.is_empty() && key.is_some() != batch_keyed {
            return Err(DispatchError::MixedBatch);
        }
        job.fresh = true;
        if let Some((key, window)) = key {
            self.keys.push(key);
            self.window = self.window.max(window);
        }
        let id = job.webhook_id().clone();
        self.jobs.push(job);
        Ok(id)
    }

    /// How many deliveries the batch holds.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether the batch holds no delivery.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Stores every delivery in one round trip where the sink takes one (SQLite, Postgres,
    /// Redis; the memory sink pushes one by one), all or none, and returns their webhook ids
    /// in the order they were added. An empty batch stores nothing and asks nothing of the
    /// backend.
    ///
    /// A keyed batch returns, for each key already used, the id its first delivery was stored
    /// under. A [`Backend`](DispatchError::Backend) error leaves the outcome unknown (a reply
    /// lost after the commit): dispatch a keyed batch again to find out without storing twice.
    /// An ordered delivery ([`ordering_key`](WebhookSubscription::ordering_key)) needs an
    /// ordering sink ([`DispatchError::NotOrdered`] otherwise, and nothing is stored).
    pub async fn dispatch<S, K>(self, sink: &mut S) -> Result<Vec<WebhookId>, DispatchError>
    where
        S: WebhookSink<K>,
    {
        if self.jobs.is_empty() {
            return Ok(Vec::new());
        }
        if !sink.orders() && self.jobs.iter().any(|job| job.ordering_key.is_some()) {
            return Err(DispatchError::NotOrdered);
        }
        let backend = |error| DispatchError::Backend(Box::new(error));
        if self.keys.is_empty() {
            let ids = self.jobs.iter().map(|job| job.webhook_id().clone()).collect();
            sink.push_jobs(self.jobs).await.map_err(backend)?;
            Ok(ids)
        } else {
            let keyed = self.jobs.into_iter().zip(self.keys).collect();
            sink.push_jobs_keyed(keyed, self.window).await.map_err(backend)
        }
    }
}

/// Many payloads to one target (here rather than in `subscription`, which a batch builds on).
impl WebhookSubscription {
    /// Dispatches one delivery per payload in one round trip, all or none, and returns their
    /// webhook ids in order: [`DispatchBatch`] for deliveries to
    /// one target. Every payload is validated before anything is stored; at most
    /// [`MAX_BATCH`] per call. With an
    /// [`idempotency_key`](Self::idempotency_key) the batch needs one key per delivery:
    /// build a `DispatchBatch` from keyed subscriptions instead
    /// ([`DispatchError::IdempotencyKeyInBatch`] here).
    ///
    /// ```no_run
    /// # async fn f(mut sink: apalis_webhooks::sqlite::SqliteStorage<apalis_webhooks::WebhookJob>) -> Result<(), apalis_webhooks::DispatchError> {
    /// use apalis_webhooks::{Secret, WebhookSubscription};
    ///
    /// let orders: Vec<serde_json::Value> = (0..100).map(|n| serde_json::json!({ "order": n })).collect();
    /// let ids = WebhookSubscription::new("https://customer.example/hooks", Secret::generate())
    ///     .dispatch_many(&mut sink, "order.created", &orders)
    ///     .await?;
    /// assert_eq!(ids.len(), 100);
    /// # Ok(()) }
    /// ```
    pub async fn dispatch_many<'p, S, K, T>(
        &self,
        sink: &mut S,
        event_type: &str,
        payloads: impl IntoIterator<Item = &'p T>,
    ) -> Result<Vec<WebhookId>, DispatchError>
    where
        S: WebhookSink<K>,
        T: Serialize + 'p,
    {
        if self.dispatch_key().is_some() {
            return Err(DispatchError::IdempotencyKeyInBatch);
        }
        let mut batch = DispatchBatch::new();
        for payload in payloads {
            batch.add(self, event_type, payload)?;
        }
        batch.dispatch(sink).await
    }
}
