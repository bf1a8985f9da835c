//! [`WebhookSubscription`]: where and how to deliver, and `dispatch` to enqueue one event.

use std::time::Duration;

use apalis_webhooks_verify::Secret;
use serde::Serialize;

pub use crate::dispatch_error::DispatchError;
use crate::{
    endpoint_id::EndpointId,
    idempotency::{DEFAULT_IDEMPOTENCY_WINDOW, DispatchKey},
    job::{WebhookId, WebhookJob},
    limit::Limit,
    sink::WebhookSink,
    target::{DeliveryTarget, check_key},
};

/// Default limit of a serialized payload: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest accepted event type.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// A delivery to dispatch: its [`DeliveryTarget`] (URL, secrets or key id, scheme, headers,
/// delivery policy, …) and what only a dispatch has (registry endpoint id, ordering key,
/// rate-limit key, payload limit).
///
/// ```no_run
/// # async fn example(mut storage: apalis_sqlite::SqliteStorage<apalis_webhooks::WebhookJob>) -> Result<(), apalis_webhooks::DispatchError> {
/// use apalis_webhooks::WebhookSubscription;
/// use std::time::Duration;
///
/// let id = WebhookSubscription::new("https://example.com/hooks", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .header("x-tenant", "acme")
///     .timeout(Duration::from_secs(10))
///     .dispatch(&mut storage, "order.created", &serde_json::json!({ "order": 42 }))
///     .await?;
/// println!("enqueued {id}");
/// # Ok(()) }
/// ```
///
/// `Debug` shows the URL's host only (paths and queries often carry tokens), header names
/// without values, and no secrets.
#[derive(Clone)]
pub struct WebhookSubscription {
    /// Where and how: URL, secrets or key id, scheme, headers, envelope, own rate limit,
    /// tenant, delivery policy.
    target: DeliveryTarget,
    /// What only a dispatch needs, not a stored endpoint: fan-out sets the first two from the
    /// endpoint's id, an event sets the ordering key, and fan-out checks one payload limit for
    /// all endpoints of an event.
    rate_limit_key: Option<String>,
    endpoint_id: Option<EndpointId>,
    ordering_key: Option<String>,
    max_payload_bytes: usize,
    /// The caller's idempotency key and how long backends that expire keys remember it.
    idempotency_key: Option<String>,
    idempotency_window: Duration,
}

impl From<DeliveryTarget> for WebhookSubscription {
    fn from(target: DeliveryTarget) -> Self {
        Self::to(target)
    }
}

impl WebhookSubscription {
    /// A subscription for `url`, signed with `secret` under Standard Webhooks.
    ///
    /// Dispatch refuses a key shorter than its scheme's minimum
    /// ([`DispatchError::WeakSecret`]) unless the secret is marked with
    /// [`Secret::allow_weak`]; see [`Secret`]'s key strength section.
    pub fn new(url: impl Into<String>, secret: impl Into<Secret>) -> Self {
        Self::to(DeliveryTarget::new(url, secret))
    }

    /// A subscription delivering to `target` (a registry endpoint's [`target`], or one built to
    /// be shared).
    ///
    /// [`target`]: crate::registry::Endpoint::target
    pub fn to(target: DeliveryTarget) -> Self {
        Self {
            target,
            rate_limit_key: None,
            endpoint_id: None,
            ordering_key: None,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            idempotency_key: None,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
        }
    }

    /// A subscription for `url` in secret-store mode: the job stores only `key_id`, and the
    /// worker's [`SecretStore`](crate::secret_store::SecretStore) resolves it to the active secrets when each
    /// attempt is signed, so no secret is written to the backend.
    ///
    /// ```
    /// use apalis_webhooks::WebhookSubscription;
    ///
    /// let job = WebhookSubscription::with_key_id("https://example.com/hooks", "endpoint-42")
    ///     .job("order.created", &serde_json::json!({ "order": 42 }))
    ///     .unwrap();
    /// assert_eq!(job.key_id(), Some("endpoint-42"));
    /// ```
    pub fn with_key_id(url: impl Into<String>, key_id: impl Into<String>) -> Self {
        Self::to(DeliveryTarget::with_key_id(url, key_id))
    }

    /// Where and how its deliveries are sent.
    pub fn target(&self) -> &DeliveryTarget {
        &self.target
    }

    /// Counts this subscription's deliveries under `key` in a
    /// [`RateLimitLayer`](crate::layers::RateLimitLayer) (a tenant id, so that one tenant's
    /// endpoints share a budget) instead of under the endpoint (`host[:port]`). Same rules as a
    /// key id: visible ASCII, at most 256 bytes.
    pub fn rate_limit_key(mut self, key: impl Into<String>) -> Self {
        self.rate_limit_key = Some(key.into());
        self
    }

    /// A rate limit of this subscription's own, which a
    /// [`RateLimitLayer`](crate::layers::RateLimitLayer) applies to its
    /// [`rate_limit_key`](Self::rate_limit_key) instead of the layer's per-endpoint limit: see
    /// [`DeliveryTarget::rate_limit`].
    pub fn own_rate_limit(mut self, limit: Limit) -> Self {
        self.target = self.target.rate_limit(limit);
        self
    }

    // `endpoint_id` and `ordering_key` stay without a feature gate. The job format is the same
    // in every build, and features unify across a dependency graph: a crate that builds
    // subscriptions need not enable `ordering` or `registry` for the app that dispatches and
    // works them. Without `ordering` no sink keeps order (only `OrderedSink` does), so
    // `dispatch` refuses an ordering key with `DispatchError::NotOrdered`, and a job pushed by
    // hand ends as the replayable `WorkerWithoutLines` dead letter: typed, never silently
    // unordered. An endpoint id means something without a registry: erasure by endpoint and
    // the ordered line's name.
    /// The registry endpoint this subscription delivers for: the worker reports its failures
    /// and 410s to the [`EndpointRegistry`] under this id (with the `registry` feature). It also
    /// names the endpoint without a registry: [`Erasure::endpoint`] selects by it, and ordered
    /// lines are per endpoint id (else URL).
    ///
    /// [`Erasure::endpoint`]: crate::store::Erasure::endpoint
    /// [`EndpointRegistry`]: crate::registry::EndpointRegistry
    pub fn endpoint_id(mut self, id: impl Into<EndpointId>) -> Self {
        self.endpoint_id = Some(id.into());
        self
    }

    /// Delivers in dispatch order with every other delivery of the same `key` to the same
    /// endpoint (a customer id, say): each waits until the one before is delivered or
    /// dead-lettered. Dispatch through an [`OrderedLines::sink`] (others refuse it with
    /// [`DispatchError::NotOrdered`]) to a worker with the same lines
    /// ([`WebhookWorker::ordered`]); both need the `ordering` feature. Same rules as a key id:
    /// visible ASCII, at most 256 bytes. See [`crate::ordering`] for guarantees and costs.
    ///
    /// [`OrderedLines::sink`]: crate::ordering::OrderedLines::sink
    /// [`WebhookWorker::ordered`]: crate::WebhookWorker::ordered
    /// [`crate::ordering`]: crate::ordering
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    crate::target::forward_target_setters!(target);

    /// Makes [`dispatch`](Self::dispatch) idempotent under `key`: dispatching again with the
    /// same key (a retry after a timeout, say), or at the same time, stores nothing new and
    /// returns the first delivery's webhook id, even with another payload. The key is scoped
    /// to this subscription's endpoint id, else its URL, and the sink's queue. Visible ASCII,
    /// at most [`MAX_IDEMPOTENCY_KEY_LEN`](crate::idempotency::MAX_IDEMPOTENCY_KEY_LEN)
    /// bytes; not combinable with an [`ordering_key`](Self::ordering_key). How long each
    /// backend remembers it: [`crate::idempotency`].
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// How long Redis and the memory sink remember an
    /// [`idempotency_key`](Self::idempotency_key):
    /// [`DEFAULT_IDEMPOTENCY_WINDOW`] (24 h)
    /// unless set, at most
    /// [`MAX_IDEMPOTENCY_WINDOW`](crate::idempotency::MAX_IDEMPOTENCY_WINDOW) (30 days).
    /// SQLite and Postgres remember a key as long as they keep its delivery.
    pub fn idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// Largest accepted serialized payload (256 KiB by default).
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Validates and serializes, returning the job that [`dispatch`](Self::dispatch) would
    /// enqueue. Useful to push with your own `TaskBuilder` options. With an
    /// [`idempotency_key`](Self::idempotency_key) the sink chooses the id at the push
    /// (see [`WebhookSink::push_keyed`]); this job has a fresh one.
    ///
    /// With the `opentelemetry` feature the job carries the W3C trace context of the current
    /// span ([`WebhookJob::trace_context`]), sent with every attempt; see [`crate::observe`].
    pub fn job<T: Serialize + ?Sized>(&self, event_type: &str, payload: &T) -> Result<WebhookJob, DispatchError> {
        self.validate(event_type)?;
        let body = serde_json::to_string(payload).map_err(DispatchError::Serialize)?;
        self.job_with_body(event_type, body)
    }

    /// Checks everything but the payload.
    pub(crate) fn validate(&self, event_type: &str) -> Result<(), DispatchError> {
        self.target.validate()?;
        validate_event_type(event_type)?;
        if let Some(key) = &self.rate_limit_key {
            check_key(key).map_err(DispatchError::InvalidRateLimitKey)?;
        }
        if let Some(key) = &self.ordering_key {
            check_key(key).map_err(DispatchError::InvalidOrderingKey)?;
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency(key, self.idempotency_window, self.ordering_key.is_some())?;
        }
        Ok(())
    }

    /// The dispatch key and window of a keyed dispatch ([`idempotency_key`](Self::idempotency_key)).
    pub(crate) fn dispatch_key(&self) -> Option<(DispatchKey, Duration)> {
        let key = self.idempotency_key.as_ref()?;
        Some((
            DispatchKey::new(&self.idempotency_scope(), key),
            self.idempotency_window,
        ))
    }

    /// What an idempotency key is scoped to: the endpoint id, else the URL (as ordered lines
    /// name endpoints), so that one key used for two endpoints makes two deliveries.
    pub(crate) fn idempotency_scope(&self) -> String {
        match &self.endpoint_id {
            Some(id) => format!("id:{id}"),
            None => format!("url:{}", self.target.url),
        }
    }

    /// The job for an already serialized payload; [`validate`](Self::validate) first.
    pub(crate) fn job_with_body(&self, event_type: &str, body: String) -> Result<WebhookJob, DispatchError> {
        let target = &self.target;
        let body = if target.envelope {
            enveloped(event_type, &body)?
        } else {
            body
        };
        if body.len() > self.max_payload_bytes {
            return Err(DispatchError::PayloadTooLarge {
                size: body.len(),
                limit: self.max_payload_bytes,
            });
        }
        Ok(WebhookJob {
            webhook_id: WebhookId::new(),
            event_type: event_type.to_owned(),
            url: target.url.clone(),
            body,
            headers: target.headers.clone(),
            scheme: target.scheme.clone(),
            secrets: target.secrets.clone(),
            key_id: target.key_id.clone(),
            client_identity: target.client_identity.clone(),
            policy: target.policy.clone(),
            attempt: 1,
            dispatched_at: crate::clock::unix_seconds(),
            replay: 0,
            deferrals: 0,
            deferred_since: None,
            rate_limit_key: self.rate_limit_key.clone(),
            rate_limit: target.rate_limit,
            endpoint_id: self.endpoint_id.clone(),
            ordering_key: self.ordering_key.clone(),
            repush: 0,
            tenant: target.tenant.clone(),
            erased: false,
            parked: false,
            trace_context: crate::observe::capture_trace_context(),
            parsed: Default::default(),
            fresh: false,
        })
    }

    /// Validates, serializes the payload once, and pushes the delivery onto `sink` (any apalis
    /// backend holding [`WebhookJob`]s, see [`WebhookSink`]). Returns the delivery's webhook id.
    ///
    /// On any error nothing is enqueued. With an [`idempotency_key`](Self::idempotency_key), a
    /// dispatch under a key already stored enqueues nothing and returns the first id; an error
    /// whose outcome is unknown (a timeout) may be retried with the same key.
    pub async fn dispatch<S, K, T>(
        &self,
        sink: &mut S,
        event_type: &str,
        payload: &T,
    ) -> Result<WebhookId, DispatchError>
    where
        S: WebhookSink<K>,
        T: Serialize + ?Sized,
    {
        let mut job = self.job(event_type, payload)?;
        if job.ordering_key.is_some() && !sink.orders() {
            return Err(DispatchError::NotOrdered);
        }
        job.fresh = true;
        if let Some((key, window)) = self.dispatch_key() {
            return sink
                .push_keyed(job, &key, window)
                .await
                .map_err(|e| DispatchError::Backend(Box::new(e)));
        }
        let id = job.webhook_id.clone();
        sink.push_job(job, None)
            .await
            .map_err(|e| DispatchError::Backend(Box::new(e)))?;
        Ok(id)
    }
}

impl std::fmt::Debug for WebhookSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSubscription")
            .field("target", &self.target)
            .field("rate_limit_key", &self.rate_limit_key)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("endpoint_id", &self.endpoint_id)
            .field("ordering_key", &self.ordering_key)
            .field("idempotency_key", &self.idempotency_key)
            .field("idempotency_window", &self.idempotency_window)
            .finish()
    }
}

/// `body` (serialized JSON) inside the Standard Webhooks envelope. The parts are already JSON,
/// so they are joined rather than parsed and written again.
fn enveloped(event_type: &str, body: &str) -> Result<String, DispatchError> {
    let event_type = serde_json::to_string(event_type).map_err(DispatchError::Serialize)?;
    let timestamp = crate::clock::rfc3339_millis(crate::clock::unix_millis());
    Ok(format!(
        r#"{{"type":{event_type},"timestamp":"{timestamp}","data":{body}}}"#
    ))
}

/// Checks an idempotency key, its window, and that no ordering key comes with it.
pub(crate) fn check_idempotency(key: &str, window: Duration, ordered: bool) -> Result<(), DispatchError> {
    crate::idempotency::check_key(key).map_err(DispatchError::InvalidIdempotencyKey)?;
    crate::idempotency::check_window(window).map_err(DispatchError::InvalidIdempotencyWindow)?;
    if ordered {
        return Err(DispatchError::IdempotencyKeyWithOrdering);
    }
    Ok(())
}

pub(crate) fn validate_event_type(event_type: &str) -> Result<(), DispatchError> {
    if event_type.is_empty() {
        return Err(DispatchError::InvalidEventType("empty"));
    }
    if event_type.len() > MAX_EVENT_TYPE_LEN {
        return Err(DispatchError::InvalidEventType("longer than 128 bytes"));
    }
    if !event_type
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b))
    {
        return Err(DispatchError::InvalidEventType(
            "only A-Z a-z 0-9 . _ - : / are allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use apalis_webhooks_verify::SignatureScheme;

    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn sub(url: &str) -> WebhookSubscription {
        WebhookSubscription::new(url, SECRET)
    }

    // The target's own checks (URL, headers, secrets, key id, tenant) are tested in `target`;
    // these are the dispatch's: the target's are applied, then the event, keys and payload.

    #[test]
    fn a_stored_trace_context_is_sent_and_validated_when_read_back() {
        const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let job = sub("https://example.com").job("a.b", &1).unwrap();
        let mut stored = serde_json::to_value(&job).unwrap();
        // Outside any span nothing is captured, and the job looks like one stored before.
        assert_eq!(stored.get("trace_context"), None);
        stored["trace_context"] = serde_json::json!({ "traceparent": PARENT, "tracestate": "a=1" });
        let traced: WebhookJob = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(traced.trace_context().map(|c| c.traceparent()), Some(PARENT));
        assert_eq!(serde_json::to_value(&traced).unwrap(), stored);
        // Every attempt sends it, whatever the build: as stored when OpenTelemetry does not
        // record the attempt span (no subscriber here).
        let (_, headers) = crate::observe::attempt_span(&traced);
        assert!(
            headers["traceparent"] == PARENT && headers["tracestate"] == "a=1",
            "{headers:?}"
        );
        // A malformed stored one is dropped: the job still reads, and sends no trace header.
        for bad in [
            serde_json::json!({ "traceparent": PARENT.replace("4bf9", "4BF9") }),
            serde_json::json!({ "traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01" }),
            serde_json::json!({ "traceparent": format!("{PARENT}\r\nx-injected: 1") }),
            serde_json::json!({ "traceparent": "x".repeat(100_000) }),
        ] {
            stored["trace_context"] = bad;
            let job: WebhookJob = serde_json::from_value(stored.clone()).unwrap();
            assert_eq!(job.trace_context(), None);
            assert!(crate::observe::attempt_span(&job).1.is_empty());
        }
        // A bad `tracestate` alone is dropped, the `traceparent` kept.
        stored["trace_context"] = serde_json::json!({ "traceparent": PARENT, "tracestate": "a=1\r\nx: y" });
        let job: WebhookJob = serde_json::from_value(stored).unwrap();
        let (_, headers) = crate::observe::attempt_span(&job);
        assert!(headers.len() == 1 && headers["traceparent"] == PARENT, "{headers:?}");
    }

    #[test]
    fn the_targets_checks_apply_to_dispatch() {
        assert!(matches!(
            sub("ftp://e.com").job("a.b", &1),
            Err(DispatchError::InvalidUrl(_))
        ));
        let stripe = sub("https://example.com")
            .scheme(SignatureScheme::stripe())
            .header("Stripe-Signature", "x");
        assert!(matches!(
            stripe.job("a.b", &1),
            Err(DispatchError::InvalidHeader { .. })
        ));
        assert!(matches!(
            WebhookSubscription::with_key_id("https://e.com", "has space").job("a", &1),
            Err(DispatchError::InvalidKeyId(_))
        ));
        let target = DeliveryTarget::new("https://e.com", SECRET)
            .tenant("acme")
            .max_attempts(2);
        let job = WebhookSubscription::to(target).job("a", &1).unwrap();
        assert_eq!((job.policy().max_attempts, job.tenant()), (2, Some("acme")));
    }

    #[test]
    fn rejects_bad_event_types_and_sizes() {
        for event in ["", "has space", "new\nline", &"x".repeat(129)] {
            assert!(matches!(
                sub("https://e.com").job(event, &1),
                Err(DispatchError::InvalidEventType(_))
            ));
        }
        let big = "x".repeat(300 * 1024);
        assert!(matches!(
            sub("https://e.com").job("a", &big),
            Err(DispatchError::PayloadTooLarge { .. })
        ));
        assert!(
            sub("https://e.com")
                .max_payload_bytes(400 * 1024)
                .job("a", &big)
                .is_ok()
        );
    }

    #[test]
    fn key_ids_need_no_inline_secret_and_each_key_is_named_by_its_error() {
        let job = WebhookSubscription::with_key_id("https://e.com", "tenant-7/endpoint-42")
            .job("a", &1)
            .unwrap();
        assert_eq!(job.key_id(), Some("tenant-7/endpoint-42"));
        assert!(job.secrets().is_empty());
        let json = serde_json::to_string(&job).unwrap();
        assert!(
            json.contains("\"secrets\":[]") && json.contains("tenant-7/endpoint-42"),
            "{json}"
        );
        for bad in ["", "has space", "new\nline", &"k".repeat(257)] {
            let inline = WebhookSubscription::new("https://e.com", crate::Secret::generate());
            assert!(matches!(
                inline.clone().ordering_key(bad).job("a", &1),
                Err(DispatchError::InvalidOrderingKey(_))
            ));
            assert!(matches!(
                inline.rate_limit_key(bad).job("a", &1),
                Err(DispatchError::InvalidRateLimitKey(_))
            ));
        }
    }

    #[test]
    fn idempotency_keys_and_windows_are_checked_and_named_by_their_errors() {
        for bad in ["", "has space", "new\nline", &"k".repeat(257)] {
            assert!(matches!(
                sub("https://e.com").idempotency_key(bad).job("a", &1),
                Err(DispatchError::InvalidIdempotencyKey(_))
            ));
        }
        for window in [Duration::ZERO, Duration::from_secs(31 * 24 * 3600)] {
            assert!(matches!(
                sub("https://e.com")
                    .idempotency_key("k")
                    .idempotency_window(window)
                    .job("a", &1),
                Err(DispatchError::InvalidIdempotencyWindow(_))
            ));
        }
        assert!(matches!(
            sub("https://e.com").idempotency_key("k").ordering_key("c").job("a", &1),
            Err(DispatchError::IdempotencyKeyWithOrdering)
        ));
        // Scoped by endpoint id when there is one, else by URL.
        let by_url = sub("https://e.com/h").idempotency_scope();
        assert_eq!(by_url, "url:https://e.com/h");
        assert_eq!(sub("https://e.com/h").endpoint_id("ep").idempotency_scope(), "id:ep");
    }

    #[test]
    fn errors_and_debug_never_show_secrets() {
        let s = sub("https://user:pw@e.com");
        assert!(!format!("{s:?}").contains("MfKQ9r8G"));
        let tokened = sub("https://hooks.example.com/services/T0/B0/tok3n?key=s3cret")
            .header("authorization", "Bearer sk_live_abc");
        let job = tokened.job("a", &serde_json::json!({ "card": "4242" })).unwrap();
        for debug in [format!("{tokened:?}"), format!("{job:?}")] {
            for hidden in ["MfKQ9r8G", "tok3n", "s3cret", "sk_live_abc", "4242"] {
                assert!(!debug.contains(hidden), "{hidden} in {debug}");
            }
            assert!(
                debug.contains("hooks.example.com") && debug.contains("authorization"),
                "{debug}"
            );
        }
        let err = s.job("a", &1).unwrap_err().to_string();
        assert!(!err.contains("pw") && !err.contains("MfKQ9r8G"), "{err}");
    }

    #[test]
    fn a_stored_job_leaves_defaults_out_and_reads_them_back() {
        let job = sub("https://example.com/hook").job("order.created", &1).unwrap();
        let json = serde_json::to_value(&job).unwrap();
        for field in ["policy", "headers", "replay", "deferrals"] {
            assert!(json.get(field).is_none(), "{field} is stored: {json}");
        }
        let back: WebhookJob = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.policy(), &crate::policy::DeliveryPolicy::default());
        assert_eq!(serde_json::to_value(&back).unwrap(), json);

        let target = DeliveryTarget::new("https://example.com/hook", SECRET)
            .max_attempts(2)
            .header("x-api-version", "2");
        let job = WebhookSubscription::to(target).job("order.created", &1).unwrap();
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["policy"]["max_attempts"], 2, "{json}");
        assert_eq!(json["headers"][0][1], "2", "{json}");
        let back: WebhookJob = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.policy().max_attempts, 2);
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
    }
}
