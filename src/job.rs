//! The job stored in the host's apalis backend: one delivery attempt of one webhook.

use std::{fmt, sync::OnceLock};

use serde::{Deserialize, Serialize};

use apalis_webhooks_verify::{Secret, SignatureScheme, TraceContext};

use crate::{endpoint_id::EndpointId, limit::Limit, policy::DeliveryPolicy};

/// The stable id of a delivery: `msg_` and a ULID.
///
/// Sent as `webhook-id` (Standard Webhooks) on every attempt, so receivers can use it to
/// drop duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookId(String);

impl WebhookId {
    /// A fresh, time-ordered id: within a process, each id is greater than the one made before
    /// it, even in the same millisecond, so that the dispatch order of deliveries can be read
    /// back from their ids ([`WebhookStore::recover`](crate::store::WebhookStore::recover)
    /// sends in that order).
    pub fn new() -> Self {
        static IDS: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
        // A panic elsewhere while holding the lock leaves the generator usable.
        let mut ids = IDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The generator fails only when 2^80 ids were made in one millisecond; a plain random
        // id then is still unique.
        let id = ids.generate().unwrap_or_else(|_| ulid::Ulid::new());
        Self(format!("msg_{id}"))
    }

    /// The id of a keyed dispatch ([`crate::idempotency`]): `bits` in the ULID text form, so it
    /// looks like any other id, though it is not time-ordered.
    pub(crate) fn derived(bits: u128) -> Self {
        Self(format!("msg_{}", ulid::Ulid::from(bits)))
    }

    /// An id a backend stored (the first id of a keyed dispatch, read back).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn from_stored(id: String) -> Self {
        Self(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for WebhookId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for WebhookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One attempt of one webhook delivery, as stored in the apalis backend.
///
/// Built by [`WebhookSubscription::dispatch`](crate::WebhookSubscription::dispatch). After a
/// retryable failure the worker stores a copy with [`attempt`](Self::attempt) raised by one and a
/// later `run_at`, so the wait lives in the backend and survives restarts.
///
/// The job holds the signing secrets so that any worker process can sign, or only a key id in
/// [secret-store mode](crate::secret_store::SecretStore). `Debug` shows neither secrets, header values, the
/// URL's path and query (they often carry tokens) nor the payload.
#[derive(Clone, Serialize, Deserialize)]
pub struct WebhookJob {
    pub(crate) webhook_id: WebhookId,
    pub(crate) event_type: String,
    pub(crate) url: String,
    /// The payload exactly as serialized at dispatch; every attempt sends these bytes.
    pub(crate) body: String,
    // Fields at their defaults are left out of the stored job (about a fifth of a 1 KiB
    // delivery's row: less to write, fetch and parse per attempt) and read back as defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) scheme: SignatureScheme,
    pub(crate) secrets: Vec<Secret>,
    /// Key id of the secrets in the worker's [`SecretStore`](crate::secret_store::SecretStore), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_id: Option<String>,
    /// Key id of the client certificate in the worker's
    /// [`ClientIdentityStore`](crate::client_identity::ClientIdentityStore), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_identity: Option<String>,
    /// Left out when it is the default policy, as stored endpoints do: a job stored without one
    /// gets the default of the version that reads it.
    #[serde(default, skip_serializing_if = "DeliveryPolicy::is_default")]
    pub(crate) policy: DeliveryPolicy,
    /// 1-based number of the attempt this job performs.
    pub(crate) attempt: u32,
    /// Unix seconds of the dispatch.
    pub(crate) dispatched_at: u64,
    /// 0 for the original delivery, n for its n-th replay from the dead letters.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) replay: u32,
    /// How often this attempt was put off (rate limit, open breaker) without being made.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) deferrals: u32,
    /// Unix seconds of this attempt's first deferral, if it was put off: a delivery put off
    /// for longer than its policy's [`defer_horizon`](DeliveryPolicy::defer_horizon) becomes a
    /// dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deferred_since: Option<u64>,
    /// The rate-limit key the subscription chose (a tenant id, say); the endpoint otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit_key: Option<String>,
    /// The subscription's own rate limit, applied instead of the layer's per-endpoint one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit: Option<Limit>,
    /// The registry endpoint this delivery is for (fan-out), which the worker keeps current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) endpoint_id: Option<EndpointId>,
    /// Deliveries with the same key to the same endpoint arrive in dispatch order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ordering_key: Option<String>,
    /// 0 as dispatched; n after an ordered line's repair pushed the delivery again for the n-th
    /// time, under keys of its own, because every task of it had ended without delivering it
    /// or giving up (see [`crate::ordering`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) repush: u32,
    /// The tenant (customer, account) the delivery belongs to, which erasure selects by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tenant: Option<String>,
    /// Set on the stored copy once its payload, headers and secrets were erased (see
    /// [`Erasure`](crate::store::Erasure)): it is kept as an audit stub and never sent.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) erased: bool,
    /// Set by fan-out for an endpoint disabled with
    /// [`WhenDisabled::Park`](crate::registry::WhenDisabled::Park): the worker sets the delivery
    /// aside as a [`Parked`](crate::report::DeadLetterReason::Parked) dead letter without
    /// sending it. A replay clears it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) parked: bool,
    /// The W3C trace context of the span the delivery was dispatched in (feature
    /// `opentelemetry`), sent with every attempt. Not feature-gated, like the job format: a
    /// worker built without the feature still sends it. Validated when read back: a malformed
    /// stored one is dropped, not sent, and fails nothing.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "stored_trace")]
    pub(crate) trace_context: Option<TraceContext>,
    /// The URL parsed once per attempt, and the endpoint derived from it: the breaker, the
    /// rate limiter, the span and the HTTP call all need them.
    #[serde(skip)]
    pub(crate) parsed: OnceLock<Parsed>,
    /// Set by `dispatch` on the job it builds and pushes once: a brand-new delivery cannot be
    /// stored twice, so backends may skip their idempotency bookkeeping for it.
    #[serde(skip)]
    pub(crate) fresh: bool,
}

/// What the job's URL parses into.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub(crate) url: Option<url::Url>,
    pub(crate) endpoint: String,
    pub(crate) host: String,
}

impl WebhookJob {
    /// The delivery's stable id.
    pub fn webhook_id(&self) -> &WebhookId {
        &self.webhook_id
    }

    /// The event type, for example `order.created`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The target URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The serialized payload.
    pub fn body(&self) -> &[u8] {
        self.body.as_bytes()
    }

    /// Extra headers sent with every attempt.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// How the delivery is signed.
    pub fn scheme(&self) -> &SignatureScheme {
        &self.scheme
    }

    /// The key id the worker resolves the signing secrets from, in secret-store mode.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// The key id of the client certificate (mTLS) the worker sends it with, if any.
    pub fn client_identity(&self) -> Option<&str> {
        self.client_identity.as_deref()
    }

    /// The delivery's policy.
    pub fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    /// The 1-based number of the attempt this job performs.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Unix seconds of the dispatch.
    pub fn dispatched_at(&self) -> u64 {
        self.dispatched_at
    }

    /// 0 for the original delivery, n for its n-th replay from the dead letters.
    pub fn replay(&self) -> u32 {
        self.replay
    }

    /// How often this attempt was put off (rate limit, open circuit breaker) without being
    /// made; deferrals do not count as attempts.
    pub fn deferrals(&self) -> u32 {
        self.deferrals
    }

    /// Unix seconds at which this attempt was first put off; `None` if it never was.
    pub fn deferred_since(&self) -> Option<u64> {
        self.deferred_since
    }

    /// The endpoint as rate limiters and circuit breakers key it: the URL's host, and its port
    /// when the URL names one (`api.example.com`, `127.0.0.1:8080`).
    pub fn endpoint(&self) -> &str {
        &self.parsed().endpoint
    }

    /// The URL, parsed (once per job); `None` if it does not parse (dispatch refuses those).
    pub(crate) fn parsed_url(&self) -> Option<&url::Url> {
        self.parsed().url.as_ref()
    }

    fn parsed(&self) -> &Parsed {
        self.parsed.get_or_init(|| {
            let url = url::Url::parse(&self.url).ok();
            let host = url
                .as_ref()
                .and_then(|url| url.host_str())
                .unwrap_or_default()
                .to_owned();
            let endpoint = match url.as_ref().and_then(url::Url::port) {
                Some(port) => format!("{host}:{port}"),
                None => host.clone(),
            };
            Parsed { url, endpoint, host }
        })
    }

    /// The key rate limits count this delivery under: the subscription's
    /// [`rate_limit_key`](crate::WebhookSubscription::rate_limit_key) if it set one, else the
    /// [`endpoint`](Self::endpoint).
    pub fn rate_limit_key(&self) -> &str {
        self.rate_limit_key.as_deref().unwrap_or_else(|| self.endpoint())
    }

    /// The subscription's own rate limit, if it set one.
    pub fn own_rate_limit(&self) -> Option<Limit> {
        self.rate_limit
    }

    /// The registry endpoint this delivery is for, when it was fanned out from one.
    pub fn endpoint_id(&self) -> Option<&EndpointId> {
        self.endpoint_id.as_ref()
    }

    /// The tenant the delivery belongs to: the registry endpoint's, or the subscription's
    /// [`tenant`](crate::WebhookSubscription::tenant).
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// Whether this stored copy was erased: its payload, headers and secrets are gone.
    pub fn is_erased(&self) -> bool {
        self.erased
    }

    /// The ordering key, for ordered delivery (see [`crate::ordering`]).
    ///
    /// [`crate::ordering`]: crate::ordering
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }

    /// The line of an ordered delivery: its endpoint (registry id, else URL) and ordering key.
    pub(crate) fn line(&self) -> Option<String> {
        let key = self.ordering_key.as_deref()?;
        Some(match &self.endpoint_id {
            Some(id) => format!("id:{id}|{key}"),
            None => format!("url:{}|{key}", self.url),
        })
    }

    /// The first attempt of a delivery that was never stored before (not a retry, deferral or
    /// replay).
    #[cfg(feature = "ordering")]
    pub(crate) fn is_new_delivery(&self) -> bool {
        self.attempt == 1 && self.deferrals == 0 && self.replay == 0
    }

    /// The host of the target URL, for logs and spans (never the path, query or credentials).
    pub fn endpoint_host(&self) -> &str {
        &self.parsed().host
    }

    pub(crate) fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    /// The job for the next attempt.
    pub(crate) fn next_attempt(&self) -> Self {
        Self {
            attempt: self.attempt.saturating_add(1),
            deferrals: 0,
            deferred_since: None,
            fresh: false,
            ..self.clone()
        }
    }

    /// The same attempt, put off once more (at `now`, Unix seconds).
    pub(crate) fn deferred(&self, now: u64) -> Self {
        Self {
            deferrals: self.deferrals.saturating_add(1),
            deferred_since: Some(self.deferred_since.unwrap_or(now)),
            fresh: false,
            ..self.clone()
        }
    }

    /// The backend idempotency key of this attempt: rescheduling the same attempt twice (a
    /// worker killed between storing the next attempt and acknowledging this one) stores it once
    /// on backends that honour idempotency keys.
    pub(crate) fn idempotency_key(&self) -> String {
        task_key(&self.webhook_id, self.replay, self.attempt, self.repush, self.deferrals)
    }

    /// How often repair pushed this delivery again under fresh keys (0 as dispatched).
    #[cfg_attr(not(all(feature = "ordering", feature = "postgres")), allow(dead_code))]
    pub(crate) fn repush(&self) -> u32 {
        self.repush
    }

    /// The first attempt of this delivery under repush number `repush`: the same delivery,
    /// stored under keys no earlier task of it used.
    #[cfg(feature = "ordering")]
    pub(crate) fn repushed(&self, repush: u32) -> Self {
        Self {
            attempt: 1,
            deferrals: 0,
            deferred_since: None,
            repush,
            fresh: false,
            ..self.clone()
        }
    }

    /// The first attempt of this delivery's next replay.
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
    pub(crate) fn replayed(&self) -> Self {
        Self {
            attempt: 1,
            replay: self.replay.saturating_add(1),
            deferrals: 0,
            deferred_since: None,
            parked: false,
            fresh: false,
            ..self.clone()
        }
    }

    /// Whether fan-out parked it (its endpoint was disabled): it is never sent as it is.
    pub fn is_parked(&self) -> bool {
        self.parked
    }

    /// The W3C trace context captured at dispatch (feature `opentelemetry`): the span the
    /// delivery was dispatched in. Every attempt sends it as `traceparent` / `tracestate`.
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.trace_context.as_ref()
    }
}

impl fmt::Debug for WebhookJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookJob")
            .field("webhook_id", &self.webhook_id)
            .field("event_type", &self.event_type)
            .field("endpoint_host", &self.endpoint_host())
            .field("body_bytes", &self.body.len())
            .field("header_names", &crate::redact::header_names(&self.headers))
            .field("scheme", &self.scheme)
            .field("secrets", &self.secrets)
            .field("key_id", &self.key_id)
            .field("client_identity", &self.client_identity)
            .field("policy", &self.policy)
            .field("attempt", &self.attempt)
            .field("dispatched_at", &self.dispatched_at)
            .field("replay", &self.replay)
            .field("deferrals", &self.deferrals)
            .field("deferred_since", &self.deferred_since)
            .field("rate_limit_key", &self.rate_limit_key)
            .field("rate_limit", &self.rate_limit)
            .field("endpoint_id", &self.endpoint_id)
            .field("ordering_key", &self.ordering_key)
            .field("repush", &self.repush)
            .field("tenant", &self.tenant)
            .field("erased", &self.erased)
            .field("parked", &self.parked)
            .field("trace_context", &self.trace_context)
            .finish()
    }
}

/// The idempotency key of one task: [`attempt_key`], then `:p{repush}` when repair pushed the
/// delivery again, then `:d{deferrals}` when the attempt was put off. Keys of repush 0 are
/// those of every earlier version of this crate.
pub(crate) fn task_key(webhook_id: &WebhookId, replay: u32, attempt: u32, repush: u32, deferrals: u32) -> String {
    let mut key = attempt_key(webhook_id, replay, attempt);
    if repush > 0 {
        key.push_str(&format!(":p{repush}"));
    }
    if deferrals > 0 {
        key.push_str(&format!(":d{deferrals}"));
    }
    key
}

/// The repush number of a task from its idempotency key ([`task_key`]): 0 without a `:p` part;
/// `None` if the key is not one of this crate's.
#[cfg_attr(not(all(feature = "ordering", feature = "redis")), allow(dead_code))]
pub(crate) fn repush_of_key(key: &str) -> Option<u32> {
    let mut parts = key.split(':').skip(1);
    let mut repush = 0;
    for part in parts.by_ref() {
        if let Some(n) = part.strip_prefix('p') {
            repush = n.parse().ok()?;
        }
    }
    Some(repush)
}

/// A trace context as stored: the two header values. Reading back validates them again, and a
/// malformed one (a hand-edited or corrupted row) becomes no trace context rather than a job
/// that cannot be read or a header that cannot be sent.
mod stored_trace {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::TraceContext;

    #[derive(Serialize, Deserialize)]
    struct Stored<S> {
        traceparent: S,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tracestate: Option<S>,
    }

    pub(super) fn serialize<S: Serializer>(context: &Option<TraceContext>, serializer: S) -> Result<S::Ok, S::Error> {
        context
            .as_ref()
            .map(|context| Stored {
                traceparent: context.traceparent(),
                tracestate: context.tracestate(),
            })
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<TraceContext>, D::Error> {
        let stored = Option::<Stored<String>>::deserialize(deserializer)?;
        Ok(stored.and_then(|stored| TraceContext::new(&stored.traceparent, stored.tracestate.as_deref())))
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The idempotency key of attempt `attempt` of replay `replay` of delivery `webhook_id`. Every
/// key of a delivery starts with `{webhook_id}:`, which the stores use to find its tasks.
pub(crate) fn attempt_key(webhook_id: &WebhookId, replay: u32, attempt: u32) -> String {
    match replay {
        0 => format!("{webhook_id}:{attempt}"),
        replay => format!("{webhook_id}:r{replay}:{attempt}"),
    }
}
