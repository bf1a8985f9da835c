//! [`dispatch_event`]: one event to every matching endpoint.

use std::time::Duration;

use serde::Serialize;

use super::{Endpoint, EndpointId, EndpointRegistry, RegistryError};
use crate::{
    idempotency::{DEFAULT_IDEMPOTENCY_WINDOW, DispatchKey},
    job::WebhookId,
    sink::WebhookSink,
    subscription::{DEFAULT_MAX_PAYLOAD_BYTES, DispatchError, check_idempotency, validate_event_type},
};

/// An event to fan out: its type, its payload (serialized once, here), and optionally the
/// tenant whose endpoints receive it.
pub struct Event {
    event_type: String,
    body: Result<String, serde_json::Error>,
    tenant: Option<String>,
    ordering_key: Option<String>,
    idempotency_key: Option<String>,
    idempotency_window: Duration,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("event_type", &self.event_type)
            .field("body_bytes", &self.body.as_ref().map(String::len).ok())
            .field("tenant", &self.tenant)
            .field("ordering_key", &self.ordering_key)
            .field("idempotency_key", &self.idempotency_key)
            .field("idempotency_window", &self.idempotency_window)
            .finish()
    }
}

impl Event {
    /// The event `event_type` with `payload`, for the endpoints of every tenant.
    pub fn new<T: Serialize + ?Sized>(event_type: impl Into<String>, payload: &T) -> Self {
        Self {
            event_type: event_type.into(),
            body: serde_json::to_string(payload),
            tenant: None,
            ordering_key: None,
            idempotency_key: None,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }

    /// Only endpoints of `tenant` receive it.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Delivers it to each endpoint in order with the endpoint's other deliveries of the same
    /// `key` (see [`crate::ordering`]); the sink must be an [`OrderedSink`] (with the
    /// `ordering` feature).
    ///
    /// [`crate::ordering`]: crate::ordering
    /// [`OrderedSink`]: crate::ordering::OrderedSink
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Makes the fan-out idempotent under `key`: fanning the event out again with the same key
    /// (a retry after a timeout, say), or at the same time, stores nothing new for an endpoint
    /// that has a delivery under it and returns the same webhook id for it. The key is scoped
    /// per endpoint id: an endpoint added in between gets its delivery on the repeat. Same
    /// rules and windows as
    /// [`WebhookSubscription::idempotency_key`](crate::WebhookSubscription::idempotency_key)
    /// (see [`crate::idempotency`]).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// How long Redis and the memory sink remember the
    /// [`idempotency_key`](Self::idempotency_key) (24 h by default, at most 30 days).
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
}

/// Why a fan-out enqueued nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FanOutError {
    /// The event itself is invalid (type, payload), or the backend failed the push.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The registry could not be read.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Fans `event` out: one delivery job per enabled endpoint of the registry whose filters match
/// the event type (and of the event's tenant, if it has one), each with its own webhook id, all
/// pushed with one [`WebhookSink::push_jobs`] (one round trip on SQLite, Postgres and Redis).
/// A matching disabled endpoint gets nothing, unless it [parks](super::WhenDisabled::Park): then
/// its delivery is stored in the same push, marked parked, and the worker sets it aside as a
/// [`Parked`](crate::report::DeadLetterReason::Parked) dead letter without sending it.
/// Returns the endpoints and the webhook ids of their deliveries, parked ones included. With an
/// [`idempotency_key`](Event::idempotency_key), an endpoint that has a delivery under the key
/// gets nothing new and its first webhook id is returned.
///
/// All or nothing: an invalid event ([`FanOutError::Dispatch`]), an endpoint that does not
/// validate ([`RegistryError::Invalid`], only from registries that do not check on `upsert`), or
/// a failed push returns an error and the event is not enqueued for any endpoint (on Redis a
/// connection lost part-way through the pipeline can leave the first ones stored).
pub async fn dispatch_event<R, S, K>(
    registry: &R,
    sink: &mut S,
    event: Event,
) -> Result<Vec<(EndpointId, WebhookId)>, FanOutError>
where
    R: EndpointRegistry + ?Sized,
    S: WebhookSink<K>,
{
    validate_event_type(&event.event_type)?;
    let body = event.body.map_err(DispatchError::Serialize)?;
    if body.len() > DEFAULT_MAX_PAYLOAD_BYTES {
        return Err(DispatchError::PayloadTooLarge {
            size: body.len(),
            limit: DEFAULT_MAX_PAYLOAD_BYTES,
        }
        .into());
    }
    if let Some(key) = &event.idempotency_key {
        check_idempotency(key, event.idempotency_window, event.ordering_key.is_some())?;
    }
    if event.ordering_key.is_some() && !sink.orders() {
        return Err(DispatchError::NotOrdered.into());
    }
    // A disabled recipient is there because it parks: its delivery is stored, not sent.
    let mut endpoints: Vec<(Endpoint, bool)> = registry
        .recipients(&event.event_type, event.tenant.as_deref())
        .await?
        .into_iter()
        .map(|endpoint| {
            let parked = !endpoint.is_enabled();
            (endpoint, parked)
        })
        .collect();
    if event.idempotency_key.is_some() {
        // Concurrent keyed fan-outs insert the same rows: in one order, so that Postgres
        // makes the later one wait on the unique index rather than deadlock.
        endpoints.sort_by(|a, b| a.0.id().cmp(b.0.id()));
    }
    let mut jobs = Vec::with_capacity(endpoints.len());
    let mut sent = Vec::with_capacity(endpoints.len());
    for (endpoint, parked) in endpoints {
        let mut subscription = endpoint.subscription();
        // A parked delivery joins no ordered line: it is set aside at once, and its recovery
        // is a replay, which goes outside the lines anyway.
        if let Some(key) = event.ordering_key.as_ref().filter(|_| !parked) {
            subscription = subscription.ordering_key(key.clone());
        }
        // Registries check endpoints when they are stored; one of another registry may not be.
        subscription
            .validate(&event.event_type)
            .map_err(|source| RegistryError::Invalid {
                id: endpoint.id().to_string(),
                source,
            })?;
        let mut job = subscription.job_with_body(&event.event_type, body.clone())?;
        job.fresh = true;
        job.parked = parked;
        let key =
            (event.idempotency_key.as_deref()).map(|key| DispatchKey::new(&subscription.idempotency_scope(), key));
        sent.push((endpoint.id().clone(), job.webhook_id().clone()));
        jobs.push((job, key));
    }
    if jobs.is_empty() {
        return Ok(sent);
    }
    let pushed = if event.idempotency_key.is_some() {
        let keyed = jobs.into_iter().filter_map(|(job, key)| Some((job, key?))).collect();
        sink.push_jobs_keyed(keyed, event.idempotency_window).await.map(Some)
    } else {
        sink.push_jobs(jobs.into_iter().map(|(job, _)| job).collect())
            .await
            .map(|()| None)
    };
    let pushed = pushed.map_err(|e| DispatchError::Backend(Box::new(e)))?;
    // A keyed fan-out's ids are the backend's: the first fan-out's under the same key.
    if let Some(ids) = pushed {
        for ((_, sent), id) in sent.iter_mut().zip(ids) {
            *sent = id;
        }
    }
    Ok(sent)
}
