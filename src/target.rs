//! [`DeliveryTarget`]: where and how deliveries are sent — URL, secrets or key id, signature
//! scheme, extra headers, envelope, rate limit, tenant and delivery policy — shared by
//! [`WebhookSubscription`](crate::WebhookSubscription) and the registry's `Endpoint` (feature
//! `registry`), validated here once.
//!
//! A low module: it knows nothing of subscriptions, registries or sinks, so both can hold one.

use std::time::Duration;

use apalis_webhooks_verify::{Secret, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::dispatch_error::DispatchError;
use crate::{
    delivery::{ATTEMPT_HEADER, EVENT_HEADER},
    limit::Limit,
    policy::{DeliveryPolicy, MAX_ATTEMPTS_LIMIT},
    redact::{header_names, url_host},
    retry::RetrySchedule,
    status_set::StatusSet,
};

/// Longest accepted key id (secret-store mode); also the limit of ordering keys, rate-limit keys
/// and tenants.
pub const MAX_KEY_ID_LEN: usize = 256;

/// Longest accepted URL.
pub const MAX_URL_LEN: usize = 4096;

/// Most extra headers ([`DeliveryTarget::header`]) a target may carry: 32.
pub const MAX_EXTRA_HEADERS: usize = 32;

/// Largest total size of a target's extra headers, names plus values: 8 KiB. Every attempt
/// sends them, and every stored job carries them.
pub const MAX_EXTRA_HEADER_BYTES: usize = 8 * 1024;

/// Headers that a target may not set: the transport owns them.
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
    // The delivery's own trace context (see `WebhookJob::trace_context`): one set, not two.
    apalis_webhooks_verify::headers::TRACEPARENT,
    apalis_webhooks_verify::headers::TRACESTATE,
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

/// Where and how deliveries are sent: the URL, the secrets (or a key id for the worker's
/// [`SecretStore`](crate::secret_store::SecretStore)), the signature scheme, extra headers, the envelope, a
/// rate limit of its own, the tenant and the [`DeliveryPolicy`] (timeout, attempts, retry
/// schedule and statuses, horizons).
///
/// A [`WebhookSubscription`](crate::WebhookSubscription) and a registry [`Endpoint`] (feature
/// `registry`) each hold one, and their builder methods of the same names set it; build one
/// here to share it, or to store it (it serializes as the endpoint's fields, defaults left
/// out).
///
/// [`Endpoint`]: crate::registry::Endpoint
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::{WebhookSubscription, registry::Endpoint, target::DeliveryTarget};
///
/// let target = DeliveryTarget::new("https://example.com/hooks", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .header("x-api-version", "2")
///     .timeout(Duration::from_secs(5))
///     .max_attempts(3);
/// target.validate().unwrap();
///
/// let job = WebhookSubscription::to(target.clone())
///     .job("order.created", &serde_json::json!({ "order": 42 }))
///     .unwrap();
/// assert_eq!(job.policy().max_attempts, 3);
///
/// let endpoint = Endpoint::for_target("ep_1", target);
/// assert_eq!(endpoint.target().policy().timeout(), Duration::from_secs(5));
/// ```
///
/// `Debug` shows the URL's host only (paths and queries often carry tokens), header names
/// without values, and no secrets.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeliveryTarget {
    pub(crate) url: String,
    #[serde(default)]
    pub(crate) secrets: Vec<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_id: Option<String>,
    #[serde(default)]
    pub(crate) scheme: SignatureScheme,
    #[serde(default)]
    pub(crate) headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tenant: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) envelope: bool,
    /// Key id of the client certificate (mTLS) in the worker's
    /// [`ClientIdentityStore`](crate::client_identity::ClientIdentityStore); targets stored
    /// before it existed read as none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_identity: Option<String>,
    /// Timeout, attempts, retry schedule and statuses; targets stored before it existed (registry
    /// endpoints) read as the default.
    #[serde(default, skip_serializing_if = "DeliveryPolicy::is_default")]
    pub(crate) policy: DeliveryPolicy,
}

impl DeliveryTarget {
    /// A target at `url`, signed with `secret` under Standard Webhooks.
    ///
    /// Validation refuses a key shorter than its scheme's minimum
    /// ([`DispatchError::WeakSecret`]) unless the secret is marked with
    /// [`Secret::allow_weak`]; see [`Secret`]'s key strength section.
    pub fn new(url: impl Into<String>, secret: impl Into<Secret>) -> Self {
        Self::signed_by(url.into(), vec![secret.into()], None)
    }

    /// A target at `url` in secret-store mode: jobs store only `key_id`, and the worker's
    /// [`SecretStore`](crate::secret_store::SecretStore) resolves it to the active secrets when each attempt
    /// is signed, so no secret is written to the backend.
    pub fn with_key_id(url: impl Into<String>, key_id: impl Into<String>) -> Self {
        Self::signed_by(url.into(), Vec::new(), Some(key_id.into()))
    }

    fn signed_by(url: String, secrets: Vec<Secret>, key_id: Option<String>) -> Self {
        Self {
            url,
            secrets,
            key_id,
            scheme: SignatureScheme::default(),
            headers: Vec::new(),
            rate_limit: None,
            tenant: None,
            envelope: false,
            client_identity: None,
            policy: DeliveryPolicy::default(),
        }
    }

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

    /// Adds a header to every attempt. Validation refuses an invalid name or value, a name the
    /// transport or the signature owns, a hop-by-hop name
    /// ([`DispatchError::InvalidHeader`]), more than [`MAX_EXTRA_HEADERS`] headers or more than
    /// [`MAX_EXTRA_HEADER_BYTES`] of names and values.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A rate limit of the target's own, which a
    /// [`RateLimitLayer`](crate::layers::RateLimitLayer) applies instead of its per-endpoint
    /// default: a registry endpoint's deliveries are counted under its id (`endpoint:{id}`), a
    /// subscription's under its [`rate_limit_key`](crate::WebhookSubscription::rate_limit_key)
    /// (give it a key of its own, or every subscription under the same key should carry the same
    /// limit).
    pub fn rate_limit(mut self, limit: Limit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// The tenant (customer, account) the deliveries belong to, stored with each delivery so
    /// that [`WebhookStore::erase`] can find them ([`Erasure::tenant`]); a registry selects a
    /// tenant's endpoints by it. At most 256 bytes, without control characters.
    ///
    /// [`WebhookStore::erase`]: crate::store::WebhookStore::erase
    /// [`Erasure::tenant`]: crate::store::Erasure::tenant
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Sends every attempt with the client certificate (mutual TLS) stored under `key_id` in
    /// the worker's [`ClientIdentityStore`](crate::client_identity::ClientIdentityStore), for
    /// receivers that authenticate senders by certificate. The job stores only the key id;
    /// the worker looks the certificate and private key up when it sends (see
    /// [`crate::client_identity`]). Validation holds the key id to the rules of a secret-store
    /// key id ([`DispatchError::InvalidClientIdentity`]).
    pub fn client_identity(mut self, key_id: impl Into<String>) -> Self {
        self.client_identity = Some(key_id.into());
        self
    }

    /// Limit of one attempt, connect to end of response read (15 s by default), up to the
    /// worker's [`max_attempt_timeout`](crate::WebhookWorker::max_attempt_timeout) (20 s by
    /// default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.policy.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        self
    }

    /// Attempts in all, the first included (8 by default, at least 1, at most
    /// [`MAX_ATTEMPTS_LIMIT`]).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = attempts.clamp(1, MAX_ATTEMPTS_LIMIT);
        self
    }

    /// Wait between attempts (see [`RetrySchedule`]).
    pub fn retry_schedule(mut self, schedule: RetrySchedule) -> Self {
        self.policy.retry = schedule;
        self
    }

    /// Status codes that are retried (408, 429, 5xx by default).
    pub fn retry_statuses(mut self, statuses: StatusSet) -> Self {
        self.policy.retry_statuses = statuses;
        self
    }

    /// How long one attempt may be put off (by rate limits, an open circuit breaker, an
    /// unreachable secret store) before the delivery becomes a dead letter
    /// ([`DeadLetterReason::DeferredTooLong`](crate::report::DeadLetterReason::DeferredTooLong)); by
    /// default the length of its retry schedule, at least an hour (see
    /// [`DeliveryPolicy::defer_horizon`]).
    pub fn defer_horizon(mut self, horizon: Duration) -> Self {
        self.policy.defer_horizon_ms = Some(u64::try_from(horizon.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Most attempts to this target's endpoint in flight at once (at least 1), applied by the
    /// worker's [`InFlightLayer`](crate::layers::InFlightLayer) instead of its per-endpoint
    /// default ([`DEFAULT_MAX_IN_FLIGHT`](crate::layers::in_flight::DEFAULT_MAX_IN_FLIGHT), 16)
    /// while the endpoint answers slowly. Deliveries past it are deferred, not failed: no
    /// attempt is used and no worker slot is held. Every target of one endpoint should carry
    /// the same cap (the endpoint's count is shared; each delivery is checked against its own).
    pub fn max_in_flight(mut self, cap: u32) -> Self {
        self.policy.max_in_flight = Some(cap.max(1));
        self
    }

    /// Upper bound for a receiver's `Retry-After` (24 h by default).
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.policy.max_retry_after_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The URL deliveries go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key id, in secret-store mode.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// The key id of the client certificate, if the target sends one.
    pub fn client_identity_id(&self) -> Option<&str> {
        self.client_identity.as_deref()
    }

    /// The tenant, if any.
    pub fn tenant_id(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The target's own rate limit, if any.
    pub fn limit(&self) -> Option<Limit> {
        self.rate_limit
    }

    /// The delivery policy.
    pub fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    /// Checks that deliveries to it can be made: the URL, the extra headers and the signature
    /// header name, the tenant, the key id, and the secrets against the scheme (usable, and
    /// long enough). Dispatch and registries call it; the error is the one dispatch returns.
    pub fn validate(&self) -> Result<(), DispatchError> {
        validate_url(&self.url)?;
        self.validate_headers()?;
        if let Some(tenant) = &self.tenant {
            validate_tenant(tenant)?;
        }
        if let Some(identity) = &self.client_identity {
            check_key(identity).map_err(DispatchError::InvalidClientIdentity)?;
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

impl std::fmt::Debug for DeliveryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryTarget")
            .field("host", &url_host(&self.url))
            .field("secrets", &self.secrets)
            .field("key_id", &self.key_id)
            .field("scheme", &self.scheme)
            .field("header_names", &header_names(&self.headers))
            .field("rate_limit", &self.rate_limit)
            .field("tenant", &self.tenant)
            .field("envelope", &self.envelope)
            .field("client_identity", &self.client_identity)
            .field("policy", &self.policy)
            .finish()
    }
}

/// The builder methods of a type holding a [`DeliveryTarget`] in field `$field`, each forwarding
/// to the target's setter of the same name (documented there, once).
///
/// A macro rather than a trait: the methods stay inherent, so callers of
/// `WebhookSubscription::new(..).header(..)` or `Endpoint::new(..).timeout(..)` (README, docs,
/// tests, users) need no trait in scope, and no public trait is added for what is a detail of
/// two builders. One new delivery option is one setter on [`DeliveryTarget`] and one line here.
macro_rules! forward_target_setters {
    ($field:ident) => {
        $crate::target::forward_target_setters!(@one $field, secret(secret: impl Into<::apalis_webhooks_verify::Secret>),
            "Adds another active secret (rotation), held to the key-length rule.");
        $crate::target::forward_target_setters!(@one $field, scheme(scheme: ::apalis_webhooks_verify::SignatureScheme),
            "The signature scheme (Standard Webhooks by default).");
        $crate::target::forward_target_setters!(@one $field, envelope(),
            "Sends each payload inside the Standard Webhooks envelope, so the event type is signed.");
        $crate::target::forward_target_setters!(@one $field, header(name: impl Into<String>, value: impl Into<String>),
            "Adds a header to every attempt.");
        $crate::target::forward_target_setters!(@one $field, tenant(tenant: impl Into<String>),
            "The tenant (customer, account) the deliveries belong to.");
        $crate::target::forward_target_setters!(@one $field, client_identity(key_id: impl Into<String>),
            "Sends every attempt with the client certificate (mTLS) stored under `key_id`.");
        $crate::target::forward_target_setters!(@one $field, timeout(timeout: ::std::time::Duration),
            "Limit of one attempt, connect to end of response read (15 s by default).");
        $crate::target::forward_target_setters!(@one $field, max_attempts(attempts: u32),
            "Attempts in all, the first included (8 by default).");
        $crate::target::forward_target_setters!(@one $field, retry_schedule(schedule: $crate::retry::RetrySchedule),
            "Wait between attempts.");
        $crate::target::forward_target_setters!(@one $field, retry_statuses(statuses: $crate::status_set::StatusSet),
            "Status codes that are retried (408, 429, 5xx by default).");
        $crate::target::forward_target_setters!(@one $field, defer_horizon(horizon: ::std::time::Duration),
            "How long one attempt may be put off before the delivery becomes a dead letter.");
        $crate::target::forward_target_setters!(@one $field, max_retry_after(limit: ::std::time::Duration),
            "Upper bound for a receiver's `Retry-After` (24 h by default).");
        $crate::target::forward_target_setters!(@one $field, max_in_flight(cap: u32),
            "Most attempts to the target's endpoint in flight at once, while it answers slowly.");
    };
    (@one $field:ident, $name:ident($($arg:ident: $ty:ty),*), $doc:literal) => {
        #[doc = $doc]
        #[doc = ""]
        #[doc = concat!(
            "See [`DeliveryTarget::", stringify!($name), "`](crate::target::DeliveryTarget::", stringify!($name), ")."
        )]
        pub fn $name(mut self, $($arg: $ty),*) -> Self {
            self.$field = self.$field.$name($($arg),*);
            self
        }
    };
}
pub(crate) use forward_target_setters;

/// What is wrong with a key id, ordering key or rate-limit key: the caller's error variant
/// names which one.
pub(crate) fn check_key(key: &str) -> Result<(), &'static str> {
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

#[cfg(test)]
mod tests {
    use apalis_webhooks_verify::{SecretError, WeakSecret};

    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn target(url: &str) -> DeliveryTarget {
        DeliveryTarget::new(url, SECRET)
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
                matches!(target(url).validate(), Err(DispatchError::InvalidUrl(_))),
                "{url}"
            );
        }
        assert!(target("https://example.com/hook?x=1").validate().is_ok());
    }

    #[test]
    fn long_urls_are_refused() {
        let url = format!("https://e.com/{}", "p".repeat(MAX_URL_LEN));
        assert!(matches!(target(&url).validate(), Err(DispatchError::InvalidUrl(_))));
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
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("TraceState", "a=1"),
        ] {
            let err = target("https://example.com")
                .header(name, value)
                .validate()
                .unwrap_err();
            assert!(matches!(err, DispatchError::InvalidHeader { .. }), "{name:?}");
            assert!(!err.to_string().contains("injected"), "values are not echoed");
        }
        let stripe = target("https://example.com")
            .scheme(SignatureScheme::stripe())
            .header("Stripe-Signature", "x");
        assert!(matches!(stripe.validate(), Err(DispatchError::InvalidHeader { .. })));
    }

    #[test]
    fn rejects_bad_tenants() {
        for bad in ["", "new\nline", &"t".repeat(257)] {
            assert!(matches!(
                target("https://e.com").tenant(bad).validate(),
                Err(DispatchError::InvalidTenant(_))
            ));
        }
        assert!(target("https://e.com").tenant("Acme GmbH / EU").validate().is_ok());
    }

    #[test]
    fn rejects_secrets_the_scheme_cannot_use() {
        let err = DeliveryTarget::new("https://e.com", "whsec_@@@")
            .validate()
            .unwrap_err();
        assert!(matches!(err, DispatchError::InvalidSecret(SecretError::NotBase64)));
        // The same kind of text is a fine literal key for the Stripe style (16 bytes or more).
        assert!(
            DeliveryTarget::new("https://e.com", "whsec_@@@ stripe-style")
                .scheme(SignatureScheme::stripe())
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn key_ids_are_validated_and_need_no_inline_secret() {
        assert!(
            DeliveryTarget::with_key_id("https://e.com", "tenant-7/endpoint-42")
                .validate()
                .is_ok()
        );
        for bad in ["", "has space", "new\nline", &"k".repeat(257)] {
            assert!(matches!(
                DeliveryTarget::with_key_id("https://e.com", bad).validate(),
                Err(DispatchError::InvalidKeyId(_))
            ));
        }
        assert!(matches!(
            DeliveryTarget::with_key_id("https://e.com", "k")
                .secret("whsec_@@")
                .validate(),
            Err(DispatchError::InvalidSecret(_))
        ));
    }

    #[test]
    fn client_identity_key_ids_are_validated_and_stored_by_name() {
        let target = target("https://e.com").client_identity("acme-prod");
        assert!(target.validate().is_ok());
        let json = serde_json::to_value(&target).unwrap();
        assert_eq!(json["client_identity"], "acme-prod");
        let back: DeliveryTarget = serde_json::from_value(json).unwrap();
        assert_eq!(back.client_identity_id(), Some("acme-prod"));
        for bad in ["", "has space", "tab\t", &"k".repeat(257)] {
            assert!(matches!(
                target.clone().client_identity(bad).validate(),
                Err(DispatchError::InvalidClientIdentity(_))
            ));
        }
        // Targets stored before it existed read as sending no certificate.
        let old: DeliveryTarget = serde_json::from_value(serde_json::json!({ "url": "https://e.com" })).unwrap();
        assert_eq!(old.client_identity_id(), None);
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
            let err = DeliveryTarget::new("https://e.com", secret.as_str())
                .validate()
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
            let allowed = DeliveryTarget::new("https://e.com", Secret::new(secret).allow_weak());
            assert!(allowed.validate().is_ok());
        }
        assert!(DeliveryTarget::new("https://e.com", standard_of(24)).validate().is_ok());
        // Longer than the 64 bytes the specification mentions: not weaker, so accepted.
        assert!(DeliveryTarget::new("https://e.com", standard_of(65)).validate().is_ok());
        // Raw key bytes are held to the same rule.
        assert!(matches!(
            DeliveryTarget::new("https://e.com", Secret::from_bytes(vec![1; 16])).validate(),
            Err(DispatchError::WeakSecret(WeakSecret { len: 16, .. }))
        ));
    }

    #[test]
    fn weak_literal_keys_are_refused_for_stripe_and_github() {
        for (scheme, name) in [
            (SignatureScheme::stripe(), "stripe"),
            (SignatureScheme::github(), "github"),
        ] {
            let weak = DeliveryTarget::new("https://e.com", "fifteen-bytes!!").scheme(scheme.clone());
            match weak.validate() {
                Err(DispatchError::WeakSecret(w)) => {
                    assert_eq!((w.scheme, w.min_bytes, w.len), (name, 16, 15));
                }
                other => panic!("{other:?}"),
            }
            let strong = DeliveryTarget::new("https://e.com", "sixteen-bytes!!!").scheme(scheme.clone());
            assert!(strong.validate().is_ok());
            let allowed = DeliveryTarget::new("https://e.com", Secret::new("short").allow_weak()).scheme(scheme);
            assert!(allowed.validate().is_ok());
        }
    }

    #[test]
    fn every_rotated_secret_is_checked() {
        // A strong first secret does not cover a weak second one, in either order, and
        // next to a key id too (inline secrets are stored with the job).
        let weak = "whsec_AAAA";
        for target in [
            DeliveryTarget::new("https://e.com", SECRET).secret(weak),
            DeliveryTarget::new("https://e.com", weak).secret(SECRET),
            DeliveryTarget::with_key_id("https://e.com", "k").secret(weak),
        ] {
            assert!(matches!(
                target.validate(),
                Err(DispatchError::WeakSecret(WeakSecret { len: 3, .. }))
            ));
        }
        let allowed = DeliveryTarget::new("https://e.com", SECRET).secret(Secret::new(weak).allow_weak());
        assert!(allowed.validate().is_ok());
    }

    #[test]
    fn debug_shows_the_host_and_header_names_only() {
        let tokened = target("https://hooks.example.com/services/T0/B0/tok3n?key=s3cret")
            .header("authorization", "Bearer sk_live_abc")
            .secret(Secret::new("sixteen-bytes!!!"));
        let debug = format!("{tokened:?}");
        for hidden in ["MfKQ9r8G", "sixteen", "tok3n", "s3cret", "sk_live_abc"] {
            assert!(!debug.contains(hidden), "{hidden} in {debug}");
        }
        assert!(
            debug.contains("hooks.example.com") && debug.contains("authorization"),
            "{debug}"
        );
    }

    #[test]
    fn defaults_are_left_out_of_the_json() {
        let json = serde_json::to_value(target("https://e.com")).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["headers", "scheme", "secrets", "url"], "{json}");
        let back: DeliveryTarget = serde_json::from_value(json).unwrap();
        assert_eq!(back.policy(), &DeliveryPolicy::default());
    }
}
