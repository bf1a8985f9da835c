//! [`WebhookSubscription`]: where and how to deliver, and `dispatch` to enqueue one event.

use std::time::Duration;

use apalis_core::error::BoxDynError;
use apalis_webhooks_verify::{Secret, SecretError, SignatureScheme, WeakSecret};
use serde::Serialize;

use crate::{
    delivery::{ATTEMPT_HEADER, EVENT_HEADER},
    endpoint_id::EndpointId,
    job::{WebhookId, WebhookJob},
    limit::Limit,
    outcome::StatusSet,
    policy::DeliveryPolicy,
    redact::{header_names, url_host},
    retry::RetrySchedule,
    sink::WebhookSink,
};

/// The setters of where and how a delivery is signed and sent (secrets, scheme, envelope,
/// headers), written once for [`WebhookSubscription`] and
/// [`Endpoint`](crate::registry::Endpoint), which hold them in fields of the same names.
macro_rules! delivery_target_setters {
    () => {
        /// Adds another active secret (rotation): every attempt carries a signature per secret
        /// (GitHub style: the first secret only). In secret-store mode this secret is stored in the
        /// job and signs next to the store's. Each secret is held to the key-length rule.
        pub fn secret(mut self, secret: impl Into<Secret>) -> Self {
            self.secrets.push(secret.into());
            self
        }

        /// The signature scheme (Standard Webhooks by default).
        pub fn scheme(mut self, scheme: SignatureScheme) -> Self {
            self.scheme = scheme;
            self
        }

        /// Sends each payload inside the Standard Webhooks envelope,
        /// `{"type": <event type>, "timestamp": <dispatch time, RFC 3339>, "data": <payload>}`, so the
        /// event type is covered by the signature. Without it the type travels only in the
        /// `x-webhook-event` header, which no scheme signs: whoever can resend a captured request
        /// can change it. The receiver reads it with
        /// [`Envelope`](apalis_webhooks_verify::Envelope) or `VerifiedWebhook::event_type`. The
        /// payload limit applies to the whole envelope.
        ///
        /// ```
        /// use apalis_webhooks::WebhookSubscription;
        ///
        /// let job = WebhookSubscription::new("https://example.com/hooks", apalis_webhooks::Secret::generate())
        ///     .envelope()
        ///     .job("order.created", &serde_json::json!({ "order": 42 }))
        ///     .unwrap();
        /// let sent: serde_json::Value = serde_json::from_slice(job.body()).unwrap();
        /// assert_eq!(sent["type"], "order.created");
        /// assert_eq!(sent["data"]["order"], 42);
        /// ```
        pub fn envelope(mut self) -> Self {
            self.envelope = true;
            self
        }

        /// Adds a header to every attempt. Dispatch refuses an invalid name or value, a name the
        /// transport or the signature owns, a hop-by-hop name ([`DispatchError::InvalidHeader`](crate::DispatchError::InvalidHeader)),
        /// more than [`MAX_EXTRA_HEADERS`](crate::MAX_EXTRA_HEADERS) headers or more than [`MAX_EXTRA_HEADER_BYTES`](crate::MAX_EXTRA_HEADER_BYTES) of names
        /// and values.
        pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
            self.headers.push((name.into(), value.into()));
            self
        }
    };
}
#[cfg(feature = "registry")] // registry endpoints hold the same fields
pub(crate) use delivery_target_setters;

/// Default limit of a serialized payload: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest accepted event type.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// Longest accepted key id (secret-store mode).
pub const MAX_KEY_ID_LEN: usize = 256;

/// Longest accepted URL.
pub const MAX_URL_LEN: usize = 4096;

/// Headers that a subscription may not set: the transport owns them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "user-agent",
    EVENT_HEADER,
    ATTEMPT_HEADER,
    // All Standard Webhooks headers, whatever the scheme, so a receiver never sees a forged one.
    apalis_webhooks_verify::headers::WEBHOOK_ID,
    apalis_webhooks_verify::headers::WEBHOOK_TIMESTAMP,
    apalis_webhooks_verify::headers::WEBHOOK_SIGNATURE,
];

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the proxy ones): they describe one connection,
/// not the message, so neither extra headers nor a signature header may be named after them.
const HOP_BY_HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Most extra headers ([`WebhookSubscription::header`]) a subscription may carry: 32.
pub const MAX_EXTRA_HEADERS: usize = 32;

/// Largest total size of a subscription's extra headers, names plus values: 8 KiB. Every
/// attempt sends them, and every stored job carries them.
pub const MAX_EXTRA_HEADER_BYTES: usize = 8 * 1024;

/// A target endpoint with its secret(s), signature scheme and delivery policy.
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
    url: String,
    secrets: Vec<Secret>,
    key_id: Option<String>,
    rate_limit_key: Option<String>,
    rate_limit: Option<Limit>,
    endpoint_id: Option<EndpointId>,
    ordering_key: Option<String>,
    tenant: Option<String>,
    scheme: SignatureScheme,
    headers: Vec<(String, String)>,
    policy: DeliveryPolicy,
    max_payload_bytes: usize,
    envelope: bool,
}

/// Why a dispatch was rejected. Nothing was enqueued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The URL does not parse, is not http(s), has no host, or carries credentials.
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(&'static str),
    /// An extra header has an invalid name or value, or is one the transport owns, or a
    /// hop-by-hop header.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name as given (values are not repeated: they may be credentials).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The signature header name of a Stripe or GitHub style
    /// [`scheme`](WebhookSubscription::scheme) (set with [`SignatureScheme::with_header`]) is
    /// not a valid header name, or is one the transport owns (`host`, `content-type`, …),
    /// a hop-by-hop header, or a `webhook-*` / `x-webhook-*` name.
    #[error("invalid signature header name {name:?}: {reason}")]
    InvalidSignatureHeader {
        /// The header name as given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// More extra headers than [`MAX_EXTRA_HEADERS`].
    #[error("{count} extra headers; the limit is {limit}")]
    TooManyHeaders {
        /// How many the subscription has.
        count: usize,
        /// The limit, [`MAX_EXTRA_HEADERS`].
        limit: usize,
    },
    /// The extra headers' names and values add up to more than [`MAX_EXTRA_HEADER_BYTES`].
    #[error("extra headers are {size} bytes (names plus values); the limit is {limit}")]
    HeadersTooLarge {
        /// Their total size.
        size: usize,
        /// The limit, [`MAX_EXTRA_HEADER_BYTES`].
        limit: usize,
    },
    /// The event type is empty, too long, or has characters outside `A-Z a-z 0-9 . _ - : /`.
    #[error("invalid event type: {0}")]
    InvalidEventType(&'static str),
    /// The payload could not be serialized.
    #[error("payload could not be serialized: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The serialized payload is over the limit.
    #[error("payload is {size} bytes; the limit is {limit}")]
    PayloadTooLarge {
        /// Serialized size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// A secret yields no key for the chosen scheme.
    #[error("invalid secret: {0}")]
    InvalidSecret(#[from] SecretError),
    /// A secret's key is shorter than its scheme's minimum (see
    /// [`SignatureScheme::check_strength`]) and was not marked with
    /// [`Secret::allow_weak`]. The error names the scheme and the lengths, never the key.
    #[error(transparent)]
    WeakSecret(#[from] WeakSecret),
    /// The key id is empty, too long, or has characters other than visible ASCII.
    #[error("invalid key id: {0}")]
    InvalidKeyId(&'static str),
    /// The ordering key is empty, too long, or has characters other than visible ASCII.
    #[error("invalid ordering key: {0}")]
    InvalidOrderingKey(&'static str),
    /// The rate-limit key is empty, too long, or has characters other than visible ASCII.
    #[error("invalid rate-limit key: {0}")]
    InvalidRateLimitKey(&'static str),
    /// The tenant is empty, longer than 256 bytes, or has control characters.
    #[error("invalid tenant: {0}")]
    InvalidTenant(&'static str),
    /// The subscription has an ordering key but the sink does not keep order: dispatch
    /// through [`OrderedLines::sink`].
    ///
    #[cfg_attr(
        feature = "ordering",
        doc = "[`OrderedLines::sink`]: crate::ordering::OrderedLines::sink"
    )]
    #[cfg_attr(
        not(feature = "ordering"),
        doc = "[`OrderedLines::sink`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/ordering/struct.OrderedLines.html#method.sink"
    )]
    #[error("an ordered delivery must be dispatched through OrderedLines::sink")]
    NotOrdered,
    /// The backend refused or failed the push.
    #[error("backend push failed: {0}")]
    Backend(#[source] BoxDynError),
}

impl WebhookSubscription {
    /// A subscription for `url`, signed with `secret` under Standard Webhooks.
    ///
    /// Dispatch refuses a key shorter than its scheme's minimum
    /// ([`DispatchError::WeakSecret`]) unless the secret is marked with
    /// [`Secret::allow_weak`]; see [`Secret`]'s key strength section.
    pub fn new(url: impl Into<String>, secret: impl Into<Secret>) -> Self {
        Self::signed_by(url.into(), vec![secret.into()], None)
    }

    /// A subscription signed with `secrets` (none: a registry endpoint adds its own).
    #[cfg(feature = "registry")]
    pub(crate) fn signed_with(url: String, secrets: Vec<Secret>) -> Self {
        Self::signed_by(url, secrets, None)
    }

    fn signed_by(url: String, secrets: Vec<Secret>, key_id: Option<String>) -> Self {
        Self {
            url,
            secrets,
            key_id,
            rate_limit_key: None,
            rate_limit: None,
            endpoint_id: None,
            ordering_key: None,
            tenant: None,
            scheme: SignatureScheme::default(),
            headers: Vec::new(),
            policy: DeliveryPolicy::default(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            envelope: false,
        }
    }

    /// A subscription for `url` in secret-store mode: the job stores only `key_id`, and the
    /// worker's [`SecretStore`](crate::SecretStore) resolves it to the active secrets when each
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
        Self::signed_by(url.into(), Vec::new(), Some(key_id.into()))
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
    /// [`rate_limit_key`](Self::rate_limit_key) instead of the layer's per-endpoint limit. Give
    /// it a key of its own, or every subscription under the same key should carry the same limit.
    pub fn own_rate_limit(mut self, limit: Limit) -> Self {
        self.rate_limit = Some(limit);
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
    /// names the endpoint without a registry: [`Erasure::endpoint`](crate::Erasure::endpoint)
    /// selects by it, and ordered lines are per endpoint id (else URL).
    ///
    #[cfg_attr(
        feature = "registry",
        doc = "[`EndpointRegistry`]: crate::registry::EndpointRegistry"
    )]
    #[cfg_attr(
        not(feature = "registry"),
        doc = "[`EndpointRegistry`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/registry/trait.EndpointRegistry.html"
    )]
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
    #[cfg_attr(
        feature = "ordering",
        doc = "[`OrderedLines::sink`]: crate::ordering::OrderedLines::sink"
    )]
    #[cfg_attr(
        not(feature = "ordering"),
        doc = "[`OrderedLines::sink`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/ordering/struct.OrderedLines.html#method.sink"
    )]
    #[cfg_attr(
        feature = "ordering",
        doc = "[`WebhookWorker::ordered`]: crate::WebhookWorker::ordered"
    )]
    #[cfg_attr(
        not(feature = "ordering"),
        doc = "[`WebhookWorker::ordered`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/struct.WebhookWorker.html#method.ordered"
    )]
    #[cfg_attr(feature = "ordering", doc = "[`crate::ordering`]: crate::ordering")]
    #[cfg_attr(
        not(feature = "ordering"),
        doc = "[`crate::ordering`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/ordering/index.html"
    )]
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// The tenant (customer, account) the deliveries belong to, stored with each delivery so
    /// that [`WebhookStore::erase`](crate::WebhookStore::erase) can find them
    /// ([`Erasure::tenant`](crate::Erasure::tenant)). Fan-out sets the registry endpoint's. At
    /// most 256 bytes, without control characters.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    delivery_target_setters!();

    crate::policy::delivery_policy_setters!();

    /// The whole delivery policy at once (a registry endpoint's).
    #[cfg(feature = "registry")]
    pub(crate) fn with_policy(mut self, policy: DeliveryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Largest accepted serialized payload (256 KiB by default).
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Validates and serializes, returning the job that [`dispatch`](Self::dispatch) would
    /// enqueue. Useful to push with your own `TaskBuilder` options.
    pub fn job<T: Serialize + ?Sized>(&self, event_type: &str, payload: &T) -> Result<WebhookJob, DispatchError> {
        self.validate(event_type)?;
        let body = serde_json::to_string(payload).map_err(DispatchError::Serialize)?;
        self.job_with_body(event_type, body)
    }

    /// Checks everything but the payload.
    pub(crate) fn validate(&self, event_type: &str) -> Result<(), DispatchError> {
        validate_url(&self.url)?;
        validate_event_type(event_type)?;
        self.validate_headers()?;
        if let Some(key) = &self.rate_limit_key {
            check_key(key).map_err(DispatchError::InvalidRateLimitKey)?;
        }
        if let Some(key) = &self.ordering_key {
            check_key(key).map_err(DispatchError::InvalidOrderingKey)?;
        }
        if let Some(tenant) = &self.tenant {
            validate_tenant(tenant)?;
        }
        match &self.key_id {
            Some(key_id) => {
                check_key(key_id).map_err(DispatchError::InvalidKeyId)?;
                // Inline secrets next to a key id are optional, but must be usable.
                if !self.secrets.is_empty() {
                    self.scheme.check_signing_secrets(&self.secrets)?;
                }
            }
            None => self.scheme.check_signing_secrets(&self.secrets)?,
        }
        // Every secret of a rotation: one weak key is enough to forge signatures the receiver
        // accepts. Secrets from a secret store are checked by the signing layer at send time.
        self.scheme.check_strength(&self.secrets)?;
        Ok(())
    }

    /// The job for an already serialized payload; [`validate`](Self::validate) first.
    pub(crate) fn job_with_body(&self, event_type: &str, body: String) -> Result<WebhookJob, DispatchError> {
        let body = if self.envelope {
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
            url: self.url.clone(),
            body,
            headers: self.headers.clone(),
            scheme: self.scheme.clone(),
            secrets: self.secrets.clone(),
            key_id: self.key_id.clone(),
            policy: self.policy.clone(),
            attempt: 1,
            dispatched_at: crate::clock::unix_seconds(),
            replay: 0,
            deferrals: 0,
            deferred_since: None,
            rate_limit_key: self.rate_limit_key.clone(),
            rate_limit: self.rate_limit,
            endpoint_id: self.endpoint_id.clone(),
            ordering_key: self.ordering_key.clone(),
            repush: 0,
            tenant: self.tenant.clone(),
            erased: false,
            parsed: Default::default(),
            fresh: false,
        })
    }

    /// Validates, serializes the payload once, and pushes the delivery onto `sink` (any apalis
    /// backend holding [`WebhookJob`]s, see [`WebhookSink`]). Returns the delivery's webhook id.
    ///
    /// On any error nothing is enqueued.
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
        let id = job.webhook_id.clone();
        sink.push_job(job, None)
            .await
            .map_err(|e| DispatchError::Backend(Box::new(e)))?;
        Ok(id)
    }

    fn validate_headers(&self) -> Result<(), DispatchError> {
        validate_signature_header(&self.scheme)?;
        if self.headers.len() > MAX_EXTRA_HEADERS {
            return Err(DispatchError::TooManyHeaders {
                count: self.headers.len(),
                limit: MAX_EXTRA_HEADERS,
            });
        }
        let size = self.headers.iter().fold(0usize, |size, (name, value)| {
            size.saturating_add(name.len()).saturating_add(value.len())
        });
        if size > MAX_EXTRA_HEADER_BYTES {
            return Err(DispatchError::HeadersTooLarge {
                size,
                limit: MAX_EXTRA_HEADER_BYTES,
            });
        }
        let signature_headers = self.scheme.header_names();
        for (name, value) in &self.headers {
            let invalid = |reason| DispatchError::InvalidHeader {
                name: name.clone(),
                reason,
            };
            let parsed =
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("not a valid header name"))?;
            let lower = parsed.as_str();
            if RESERVED_HEADERS.contains(&lower) || signature_headers.iter().any(|h| h.eq_ignore_ascii_case(lower)) {
                return Err(invalid("reserved: set by apalis-webhooks"));
            }
            if HOP_BY_HOP_HEADERS.contains(&lower) {
                return Err(invalid("hop-by-hop: it describes a connection, not the delivery"));
            }
            // HeaderValue refuses CR, LF, NUL and other control characters (tab is allowed).
            http::HeaderValue::from_str(value)
                .map_err(|_| invalid("value has control characters or non-visible bytes"))?;
        }
        Ok(())
    }
}

/// Checks the signature header name of the Stripe and GitHub styles (Standard Webhooks' names
/// are fixed): a valid HTTP token, none of the transport's, no hop-by-hop name, and no
/// `webhook-*` / `x-webhook-*` name (the Standard Webhooks and apalis-webhooks headers).
fn validate_signature_header(scheme: &SignatureScheme) -> Result<(), DispatchError> {
    let name = match scheme {
        SignatureScheme::Stripe { header } | SignatureScheme::GitHub { header } => header,
        _ => return Ok(()),
    };
    let invalid = |reason| DispatchError::InvalidSignatureHeader {
        name: name.clone(),
        reason,
    };
    // `HeaderName` accepts exactly the RFC 9110 token characters, and lowercases.
    let parsed = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("not a valid header name"))?;
    let lower = parsed.as_str();
    if RESERVED_HEADERS.contains(&lower) || lower.starts_with("webhook-") || lower.starts_with("x-webhook-") {
        return Err(invalid("reserved: set by apalis-webhooks"));
    }
    if HOP_BY_HOP_HEADERS.contains(&lower) {
        return Err(invalid("hop-by-hop: it describes a connection, not the delivery"));
    }
    Ok(())
}

impl std::fmt::Debug for WebhookSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSubscription")
            .field("endpoint_host", &url_host(&self.url))
            .field("secrets", &self.secrets)
            .field("key_id", &self.key_id)
            .field("rate_limit_key", &self.rate_limit_key)
            .field("scheme", &self.scheme)
            .field("header_names", &header_names(&self.headers))
            .field("policy", &self.policy)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("rate_limit", &self.rate_limit)
            .field("endpoint_id", &self.endpoint_id)
            .field("ordering_key", &self.ordering_key)
            .field("tenant", &self.tenant)
            .field("envelope", &self.envelope)
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

/// What is wrong with a key id, ordering key or rate-limit key: the caller's error variant
/// names which one.
fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty");
    }
    if key.len() > MAX_KEY_ID_LEN {
        return Err("longer than 256 bytes");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only visible ASCII is allowed");
    }
    Ok(())
}

/// A tenant is stored with every delivery and compared by erasure: bounded, printable.
fn validate_tenant(tenant: &str) -> Result<(), DispatchError> {
    if tenant.is_empty() {
        return Err(DispatchError::InvalidTenant("empty"));
    }
    if tenant.len() > MAX_KEY_ID_LEN {
        return Err(DispatchError::InvalidTenant("longer than 256 bytes"));
    }
    if tenant.chars().any(char::is_control) {
        return Err(DispatchError::InvalidTenant("control characters are not allowed"));
    }
    Ok(())
}

fn validate_url(raw: &str) -> Result<(), DispatchError> {
    if raw.len() > MAX_URL_LEN {
        return Err(DispatchError::InvalidUrl("longer than 4096 bytes"));
    }
    let url = url::Url::parse(raw).map_err(|_| DispatchError::InvalidUrl("does not parse"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(DispatchError::InvalidUrl("scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(DispatchError::InvalidUrl("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in URLs end up in logs and job tables; use a header instead.
        return Err(DispatchError::InvalidUrl(
            "credentials in the URL are not accepted; send them in a header",
        ));
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
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn sub(url: &str) -> WebhookSubscription {
        WebhookSubscription::new(url, SECRET)
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "not a url",
            "ftp://example.com/x",
            "file:///etc/passwd",
            "https://user:pw@example.com/",
            "https://",
        ] {
            assert!(
                matches!(sub(url).job("a.b", &1), Err(DispatchError::InvalidUrl(_))),
                "{url}"
            );
        }
        assert!(sub("https://example.com/hook?x=1").job("a.b", &1).is_ok());
    }

    #[test]
    fn rejects_bad_headers() {
        for (name, value) in [
            ("x-ok", "bad\r\nx-injected: 1"),
            ("x-ok", "nul\0"),
            ("bad name", "v"),
            ("bad\nname", "v"),
            ("Content-Length", "1"),
            ("host", "evil"),
            ("Webhook-Signature", "v1,forged"),
            ("webhook-id", "x"),
        ] {
            let err = sub("https://example.com")
                .header(name, value)
                .job("a.b", &1)
                .unwrap_err();
            assert!(matches!(err, DispatchError::InvalidHeader { .. }), "{name:?}");
            assert!(!err.to_string().contains("injected"), "values are not echoed");
        }
        let stripe = sub("https://example.com")
            .scheme(SignatureScheme::stripe())
            .header("Stripe-Signature", "x");
        assert!(matches!(
            stripe.job("a.b", &1),
            Err(DispatchError::InvalidHeader { .. })
        ));
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
    fn rejects_secrets_the_scheme_cannot_use() {
        let err = WebhookSubscription::new("https://e.com", "whsec_@@@")
            .job("a", &1)
            .unwrap_err();
        assert!(matches!(err, DispatchError::InvalidSecret(SecretError::NotBase64)));
        // The same kind of text is a fine literal key for the Stripe style (16 bytes or more).
        assert!(
            WebhookSubscription::new("https://e.com", "whsec_@@@ stripe-style")
                .scheme(SignatureScheme::stripe())
                .job("a", &1)
                .is_ok()
        );
    }

    #[test]
    fn key_ids_are_validated_and_need_no_inline_secret() {
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
            assert!(matches!(
                WebhookSubscription::with_key_id("https://e.com", bad).job("a", &1),
                Err(DispatchError::InvalidKeyId(_))
            ));
            // Each key is named by its own error.
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
        assert!(matches!(
            WebhookSubscription::with_key_id("https://e.com", "k")
                .secret("whsec_@@")
                .job("a", &1),
            Err(DispatchError::InvalidSecret(_))
        ));
    }

    /// `whsec_` and the base64 of `len` bytes.
    fn standard_of(len: usize) -> String {
        use base64::Engine;
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(vec![0x5a; len])
        )
    }

    #[test]
    fn weak_standard_keys_are_refused_unless_allowed() {
        // The one-byte key of the report, then one byte under the minimum.
        for (secret, len) in [("whsec_AA==".to_owned(), 1), (standard_of(23), 23)] {
            let err = WebhookSubscription::new("https://e.com", secret.as_str())
                .job("a", &1)
                .unwrap_err();
            let DispatchError::WeakSecret(weak) = &err else {
                panic!("{err:?}");
            };
            assert_eq!((weak.scheme, weak.min_bytes, weak.len), ("standard", 24, len));
            let encoded = secret.trim_start_matches("whsec_");
            for shown in [err.to_string(), format!("{err:?}")] {
                assert!(!shown.contains(encoded), "{shown}");
                assert!(shown.contains("24") && shown.contains("standard"), "{shown}");
            }
            let allowed = WebhookSubscription::new("https://e.com", Secret::new(secret).allow_weak());
            assert!(allowed.job("a", &1).is_ok());
        }
        assert!(
            WebhookSubscription::new("https://e.com", standard_of(24))
                .job("a", &1)
                .is_ok()
        );
        // Longer than the 64 bytes the specification mentions: not weaker, so accepted.
        assert!(
            WebhookSubscription::new("https://e.com", standard_of(65))
                .job("a", &1)
                .is_ok()
        );
        // Raw key bytes are held to the same rule.
        assert!(matches!(
            WebhookSubscription::new("https://e.com", Secret::from_bytes(vec![1; 16])).job("a", &1),
            Err(DispatchError::WeakSecret(WeakSecret { len: 16, .. }))
        ));
    }

    #[test]
    fn weak_literal_keys_are_refused_for_stripe_and_github() {
        for (scheme, name) in [
            (SignatureScheme::stripe(), "stripe"),
            (SignatureScheme::github(), "github"),
        ] {
            let weak = WebhookSubscription::new("https://e.com", "fifteen-bytes!!").scheme(scheme.clone());
            match weak.job("a", &1) {
                Err(DispatchError::WeakSecret(w)) => {
                    assert_eq!((w.scheme, w.min_bytes, w.len), (name, 16, 15));
                }
                other => panic!("{other:?}"),
            }
            let strong = WebhookSubscription::new("https://e.com", "sixteen-bytes!!!").scheme(scheme.clone());
            assert!(strong.job("a", &1).is_ok());
            let allowed = WebhookSubscription::new("https://e.com", Secret::new("short").allow_weak()).scheme(scheme);
            assert!(allowed.job("a", &1).is_ok());
        }
    }

    #[test]
    fn every_rotated_secret_is_checked() {
        // A strong first secret does not cover a weak second one, in either order, and
        // next to a key id too (inline secrets are stored with the job).
        let weak = "whsec_AAAA";
        for subscription in [
            WebhookSubscription::new("https://e.com", SECRET).secret(weak),
            WebhookSubscription::new("https://e.com", weak).secret(SECRET),
            WebhookSubscription::with_key_id("https://e.com", "k").secret(weak),
        ] {
            assert!(matches!(
                subscription.job("a", &1),
                Err(DispatchError::WeakSecret(WeakSecret { len: 3, .. }))
            ));
        }
        let allowed = WebhookSubscription::new("https://e.com", SECRET).secret(Secret::new(weak).allow_weak());
        assert!(allowed.job("a", &1).is_ok());
    }

    #[test]
    fn long_urls_are_refused() {
        let url = format!("https://e.com/{}", "p".repeat(MAX_URL_LEN));
        assert!(matches!(sub(&url).job("a", &1), Err(DispatchError::InvalidUrl(_))));
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
}
