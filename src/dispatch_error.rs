//! [`DispatchError`]: why a dispatch was rejected.
//!
//! A module of its own, below both [`target`](crate::target) (which validates a delivery target)
//! and `subscription` (which validates and enqueues a dispatch), so neither imports the other
//! for its error type.

use apalis_core::error::BoxDynError;
use apalis_webhooks_verify::{SecretError, WeakSecret};

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
    /// [`scheme`](crate::target::DeliveryTarget::scheme) (set with [`SignatureScheme::with_header`](apalis_webhooks_verify::SignatureScheme::with_header)) is
    /// not a valid header name, or is one the transport owns (`host`, `content-type`, …),
    /// a hop-by-hop header, or a `webhook-*` / `x-webhook-*` name.
    #[error("invalid signature header name {name:?}: {reason}")]
    InvalidSignatureHeader {
        /// The header name as given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// More extra headers than [`MAX_EXTRA_HEADERS`](crate::target::MAX_EXTRA_HEADERS).
    #[error("{count} extra headers; the limit is {limit}")]
    TooManyHeaders {
        /// How many the subscription has.
        count: usize,
        /// The limit, [`MAX_EXTRA_HEADERS`](crate::target::MAX_EXTRA_HEADERS).
        limit: usize,
    },
    /// The extra headers' names and values add up to more than [`MAX_EXTRA_HEADER_BYTES`](crate::target::MAX_EXTRA_HEADER_BYTES).
    #[error("extra headers are {size} bytes (names plus values); the limit is {limit}")]
    HeadersTooLarge {
        /// Their total size.
        size: usize,
        /// The limit, [`MAX_EXTRA_HEADER_BYTES`](crate::target::MAX_EXTRA_HEADER_BYTES).
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
    /// [`SignatureScheme::check_strength`](apalis_webhooks_verify::SignatureScheme::check_strength)) and was not marked with
    /// [`Secret::allow_weak`](apalis_webhooks_verify::Secret::allow_weak). The error names the scheme and the lengths, never the key.
    #[error(transparent)]
    WeakSecret(#[from] WeakSecret),
    /// The key id is empty, too long, or has characters other than visible ASCII.
    #[error("invalid key id: {0}")]
    InvalidKeyId(&'static str),
    /// The client identity's key id is empty, too long, or has characters other than visible
    /// ASCII.
    #[error("invalid client identity key id: {0}")]
    InvalidClientIdentity(&'static str),
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
    /// [`OrderedLines::sink`]: crate::ordering::OrderedLines::sink
    #[error("an ordered delivery must be dispatched through OrderedLines::sink")]
    NotOrdered,
    /// The idempotency key is empty, longer than
    /// [`MAX_IDEMPOTENCY_KEY_LEN`](crate::idempotency::MAX_IDEMPOTENCY_KEY_LEN) bytes, or has
    /// characters other than visible ASCII.
    #[error("invalid idempotency key: {0}")]
    InvalidIdempotencyKey(&'static str),
    /// The idempotency window is zero or longer than
    /// [`MAX_IDEMPOTENCY_WINDOW`](crate::idempotency::MAX_IDEMPOTENCY_WINDOW).
    #[error("invalid idempotency window: {0}")]
    InvalidIdempotencyWindow(&'static str),
    /// A dispatch has both an idempotency key and an ordering key: an ordered line would take
    /// a repeated dispatch for a new delivery, so the two are not combined.
    #[error("an idempotency key cannot be combined with an ordering key")]
    IdempotencyKeyWithOrdering,
    /// A [`DispatchBatch`](crate::batch::DispatchBatch) holds at most
    /// [`MAX_BATCH`](crate::batch::MAX_BATCH) deliveries: dispatch this one and start another.
    #[error("a dispatch batch holds at most {limit} deliveries")]
    BatchTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A [`DispatchBatch`](crate::batch::DispatchBatch) is keyed throughout or not at all: the
    /// delivery added had an idempotency key and the batch had none, or the reverse.
    #[error("a dispatch batch cannot mix deliveries with and without an idempotency key")]
    MixedBatch,
    /// [`WebhookSubscription::dispatch_many`](crate::WebhookSubscription::dispatch_many) was
    /// given a subscription with an idempotency key, which would name every delivery of the
    /// batch: give each delivery its own key in a [`DispatchBatch`](crate::batch::DispatchBatch).
    #[error("dispatch_many sends many deliveries under one idempotency key; key each in a DispatchBatch")]
    IdempotencyKeyInBatch,
    /// The backend refused or failed the push.
    #[error("backend push failed: {0}")]
    Backend(#[source] BoxDynError),
}
