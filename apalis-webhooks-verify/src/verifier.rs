//! The [`Verifier`]: a delivery's signature checked (and optionally replays rejected).
//!
//! A [`Verifier`] is checked when built: every secret must yield a key for the scheme, and
//! replay protection is refused for a scheme without a signed timestamp (GitHub style).
//!
//! ```
//! use apalis_webhooks_verify::{SignatureScheme, Verifier, VerifierError};
//! use http::HeaderMap;
//!
//! # futures::executor::block_on(async {
//! let verifier = Verifier::builder("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .reject_replays()
//!     .build()?;
//! let headers = HeaderMap::new();
//! assert!(verifier.verify(&headers, b"{}").await.is_err()); // no signature headers
//!
//! // A GitHub-style signature has no timestamp: a replay cannot be told from a delivery.
//! let refused = Verifier::builder("s3cret").scheme(SignatureScheme::github()).reject_replays().build();
//! assert!(matches!(refused, Err(VerifierError::ReplayProtectionUnsupported)));
//! # Ok::<_, VerifierError>(())
//! # }).unwrap();
//! ```

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::HeaderMap;

use sha2::{Digest, Sha256};

use crate::{
    headers::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP},
    replay::{MemoryReplayStore, ReplayKey, ReplayStore, ReplayStoreError},
    scheme::SignatureScheme,
    secret::{Secret, SecretError},
};

/// How far a signature timestamp may be from the receiver's clock, either way: 5 minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Longest signature-related header value looked at; longer ones are rejected unparsed.
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// Why a request was not accepted as a genuine delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A required header is not ASCII text, too long, or malformed.
    #[error("malformed header {0}")]
    InvalidHeader(&'static str),
    /// The signature timestamp is older than the tolerance.
    #[error("timestamp too old")]
    TimestampTooOld,
    /// The signature timestamp is further in the future than the tolerance.
    #[error("timestamp too far in the future")]
    TimestampInFuture,
    /// No signature matches any of the secrets.
    #[error("no matching signature")]
    NoMatchingSignature,
    /// This exact message was already accepted.
    #[error("replayed message")]
    Replayed,
    /// The replay store could not answer (full, or its backend failed), so the message was
    /// not accepted: replay protection fails closed.
    #[error("replay check unavailable: {0}")]
    ReplayStore(#[from] ReplayStoreError),
    /// A configured secret yields no key for the scheme. Only the free function [`verify`]
    /// returns it: a [`Verifier`] checks its secrets when built.
    #[error("receiver secret unusable: {0}")]
    InvalidSecret(#[from] SecretError),
}

impl VerifyError {
    /// The HTTP status a receiver should answer with; the axum extractor uses it.
    ///
    /// * 401: missing signature headers, no matching signature, timestamp outside the tolerance;
    /// * 400: a malformed signature header (not ASCII, too long, unparseable);
    /// * 409: a replay. Its signature is genuine, so a distinct status tells a logged attack or a
    ///   duplicating proxy apart from a wrong secret;
    /// * 503: the replay store could not answer; the sender should retry later, where a 4xx
    ///   could make it give the delivery up;
    /// * 500: the receiver's own secret is unusable (free function [`verify`] only).
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::MissingHeader(_) | Self::TimestampTooOld | Self::TimestampInFuture | Self::NoMatchingSignature => {
                StatusCode::UNAUTHORIZED
            }
            Self::InvalidHeader(_) => StatusCode::BAD_REQUEST,
            Self::Replayed => StatusCode::CONFLICT,
            Self::ReplayStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidSecret(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Why a [`Verifier`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifierError {
    /// Secret number `index` (0 for the first) yields no key for the scheme: empty, or not
    /// base64 after `whsec_` for Standard Webhooks.
    #[error("receiver secret {index} unusable: {source}")]
    InvalidSecret {
        /// Position of the secret, in the order given.
        index: usize,
        /// Why it is unusable.
        #[source]
        source: SecretError,
    },
    /// Replay protection was asked for with a scheme that signs no timestamp (GitHub style): a
    /// replay cannot be told from a new delivery with the same body, and there is no window
    /// after which a captured request stops verifying.
    #[error("the signature scheme signs no timestamp, so replays cannot be rejected")]
    ReplayProtectionUnsupported,
}

/// What a verified signature vouches for, besides the body; one variant per scheme, so what a
/// scheme always signs is never optional.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verified {
    /// Standard Webhooks.
    Standard {
        /// `webhook-id`: stable across the sender's retries, use it to drop duplicates.
        webhook_id: String,
        /// The signed `webhook-timestamp`, Unix seconds.
        timestamp: i64,
    },
    /// Stripe style.
    Stripe {
        /// The signed `t=` timestamp, Unix seconds.
        timestamp: i64,
    },
    /// GitHub style: the signature covers the body only.
    GitHub,
}

impl Verified {
    /// The webhook id where the scheme signs one (Standard Webhooks).
    pub fn webhook_id(&self) -> Option<&str> {
        match self {
            Self::Standard { webhook_id, .. } => Some(webhook_id),
            Self::Stripe { .. } | Self::GitHub => None,
        }
    }

    /// The signed timestamp, Unix seconds, where the scheme signs one.
    pub fn timestamp(&self) -> Option<i64> {
        match self {
            Self::Standard { timestamp, .. } | Self::Stripe { timestamp } => Some(*timestamp),
            Self::GitHub => None,
        }
    }
}

/// Verifies Standard Webhooks headers against any of `secrets` with a timestamp `tolerance`.
///
/// The comparison is constant-time; signatures of versions other than `v1` are ignored.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[Secret],
    tolerance: Duration,
) -> Result<Verified, VerifyError> {
    check(
        &SignatureScheme::Standard,
        &|name| headers.get(name).map(http::HeaderValue::as_bytes),
        body,
        secrets,
        tolerance,
        unix_now(),
    )
}

/// Verifies with headers looked up by lowercase name, whatever the HTTP library.
fn check<'h>(
    scheme: &SignatureScheme,
    header: &dyn Fn(&str) -> Option<&'h [u8]>,
    body: &[u8],
    secrets: &[Secret],
    tolerance: Duration,
    now: i64,
) -> Result<Verified, VerifyError> {
    // What `HeaderValue::to_str` accepts: visible ASCII and tabs, checked here for every
    // library's header type.
    let lookup = |name: &str| {
        let value = header(name)?;
        let name = static_name(name);
        if value.len() > MAX_HEADER_LEN || !value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
            return Some(Err(VerifyError::InvalidHeader(name)));
        }
        Some(
            std::str::from_utf8(value)
                .map(str::to_owned)
                .map_err(|_| VerifyError::InvalidHeader(name)),
        )
    };
    let parts = scheme.verify(&lookup, body, secrets, tolerance, now)?;
    // Each scheme's verifier returns what it signs; a missing part would be a bug there, and is
    // reported as the header it comes from rather than a panic.
    Ok(match scheme {
        SignatureScheme::Stripe { .. } => Verified::Stripe {
            timestamp: parts.timestamp.ok_or(VerifyError::InvalidHeader("signature"))?,
        },
        SignatureScheme::GitHub { .. } => Verified::GitHub,
        SignatureScheme::Standard => Verified::Standard {
            webhook_id: parts.webhook_id.ok_or(VerifyError::MissingHeader(WEBHOOK_ID))?,
            timestamp: parts.timestamp.ok_or(VerifyError::MissingHeader(WEBHOOK_TIMESTAMP))?,
        },
    })
}

/// Error variants carry `&'static str` names; custom header names are reported generically.
fn static_name(name: &str) -> &'static str {
    [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE]
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("signature")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A receiver's verification settings: scheme, secrets, tolerance, optional replay store.
///
/// Built by [`Verifier::new`] (Standard Webhooks, one secret) or [`Verifier::builder`], which
/// check every secret up front, so a bad key is a startup error rather than a 500 on every
/// request. Cheap to clone; use it as axum state for the `VerifiedWebhook` extractor.
///
/// # Replay protection
///
/// A replay is a captured request sent again: the same signed headers and body. With a replay
/// store, each verified message is remembered until its timestamp leaves the tolerance window
/// (`timestamp + tolerance`, inclusive), after which the timestamp check rejects it anyway.
/// The message is identified, within the verifier's namespace, by:
///
/// * Standard Webhooks: `(webhook-id, webhook-timestamp)`. The sender's own retries carry the
///   same id with a fresh timestamp and signature, so they pass (dedupe them in your handler by
///   `webhook-id`); keying on the id alone would answer a retry after a lost 2xx with a 4xx and
///   turn a delivered event into the sender's dead letter.
/// * Stripe style: `(t, SHA-256 of the body)`. For a given key this is the signature (the
///   signature is the HMAC of `t.body`), but unlike the header text it cannot be varied by
///   reordering the header's items or adding more `v1=` entries.
/// * GitHub style: refused at build time ([`VerifierError::ReplayProtectionUnsupported`]).
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: SignatureScheme,
    secrets: Vec<Secret>,
    tolerance: Duration,
    replay: Option<Replay>,
}

/// A replay store and the namespace this verifier's keys live in.
#[derive(Debug, Clone)]
struct Replay {
    store: Arc<dyn ReplayStore>,
    namespace: Arc<str>,
}

/// Builds a [`Verifier`]; options may be given in any order, they are combined in
/// [`build`](Self::build).
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct VerifierBuilder {
    scheme: SignatureScheme,
    secrets: Vec<Secret>,
    tolerance: Duration,
    replay: Option<Replay>,
}

impl Verifier {
    /// Standard Webhooks verification with `secret`, ±5 minutes, no replay store; fails if the
    /// secret yields no key.
    pub fn new(secret: impl Into<Secret>) -> Result<Self, VerifierError> {
        Self::builder(secret).build()
    }

    /// A builder starting from Standard Webhooks, `secret`, ±5 minutes and no replay store.
    pub fn builder(secret: impl Into<Secret>) -> VerifierBuilder {
        VerifierBuilder {
            scheme: SignatureScheme::Standard,
            secrets: vec![secret.into()],
            tolerance: DEFAULT_TOLERANCE,
            replay: None,
        }
    }

    /// The scheme verified.
    pub fn scheme(&self) -> &SignatureScheme {
        &self.scheme
    }

    /// The timestamp tolerance, both directions; also how long the replay store remembers a
    /// message past its timestamp.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// Whether this verifier rejects replays.
    pub fn rejects_replays(&self) -> bool {
        self.replay.is_some()
    }

    /// Verifies a request's headers and raw body, then (with a replay store) checks and
    /// remembers the message.
    pub async fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify_at(headers, body, unix_now()).await
    }

    /// As [`verify`](Self::verify), for any HTTP library: `header` returns the value of a
    /// header by its lowercase name (`webhook-id`, …), as bytes.
    ///
    /// ```
    /// # futures::executor::block_on(async {
    /// use std::collections::HashMap;
    /// use apalis_webhooks_verify::{VerifyError, Verifier};
    ///
    /// let verifier = Verifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    /// // Whatever your framework's request type is: a map from lowercase names here.
    /// let headers: HashMap<&str, &str> = HashMap::from([("webhook-id", "msg_1")]);
    /// let result = verifier
    ///     .verify_with(|name| headers.get(name).map(|v| v.as_bytes()), b"{}")
    ///     .await;
    /// assert_eq!(result, Err(VerifyError::MissingHeader("webhook-timestamp")));
    /// # });
    /// ```
    pub async fn verify_with<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h [u8]>,
        body: &[u8],
    ) -> Result<Verified, VerifyError> {
        let now = unix_now();
        let verified = check(&self.scheme, &header, body, &self.secrets, self.tolerance, now)?;
        self.remember(verified, body, now).await
    }

    /// As [`verify`](Self::verify), with `now` in Unix seconds (for tests and replays of logs).
    pub async fn verify_at(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        let verified = check(
            &self.scheme,
            &|name| headers.get(name).map(http::HeaderValue::as_bytes),
            body,
            &self.secrets,
            self.tolerance,
            now,
        )?;
        self.remember(verified, body, now).await
    }

    /// With a replay store, checks and remembers a verified message.
    async fn remember(&self, verified: Verified, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        // Only a genuine message is remembered, so forged requests cannot fill the store or
        // block real ones.
        let Some(replay) = &self.replay else {
            return Ok(verified);
        };
        let (key, timestamp) = match &verified {
            Verified::Standard { webhook_id, timestamp } => (
                ReplayKey::new(
                    &replay.namespace,
                    &[b"standard", webhook_id.as_bytes(), &timestamp.to_be_bytes()],
                ),
                *timestamp,
            ),
            Verified::Stripe { timestamp } => (
                ReplayKey::new(
                    &replay.namespace,
                    &[b"stripe", &timestamp.to_be_bytes(), &Sha256::digest(body)],
                ),
                *timestamp,
            ),
            // The builder refuses a replay store for schemes without a timestamp; failing closed
            // here keeps a future scheme from slipping through unchecked.
            Verified::GitHub => {
                return Err(VerifyError::ReplayStore(ReplayStoreError::Unavailable(
                    "the scheme signs no timestamp".to_owned(),
                )));
            }
        };
        // The timestamp check accepts the message through `timestamp + tolerance` inclusive, so
        // it is remembered that long. Saturating is safe: such a timestamp never verifies.
        let expires_at = timestamp
            .checked_add(tolerance_secs(self.tolerance))
            .unwrap_or(i64::MAX);
        if replay.store.check_and_remember(&key, now, expires_at.max(now)).await? {
            Ok(verified)
        } else {
            Err(VerifyError::Replayed)
        }
    }
}

impl VerifierBuilder {
    /// Also accepts signatures made with `secret` (rotation).
    pub fn secret(mut self, secret: impl Into<Secret>) -> Self {
        self.secrets.push(secret.into());
        self
    }

    /// Verifies this scheme instead of Standard Webhooks.
    pub fn scheme(mut self, scheme: SignatureScheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// Timestamp tolerance, both directions (5 minutes by default). The replay window follows
    /// it, whatever the order of the builder calls.
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Rejects replays with a [`MemoryReplayStore`] of its own ([`DEFAULT_REPLAY_CAPACITY`](crate::DEFAULT_REPLAY_CAPACITY)
    /// entries). It protects this process only; replicas need
    /// [`replay_store`](Self::replay_store) with a shared store.
    pub fn reject_replays(self) -> Self {
        self.replay_store(MemoryReplayStore::default(), "")
    }

    /// Rejects replays with `store`, under `namespace`. Verifiers sharing a store never see
    /// each other's messages unless they share the namespace: give each tenant or endpoint its
    /// own, and every replica of one receiver the same.
    pub fn replay_store(mut self, store: impl ReplayStore, namespace: impl Into<String>) -> Self {
        self.replay = Some(Replay {
            store: Arc::new(store),
            namespace: Arc::from(namespace.into()),
        });
        self
    }

    /// As [`replay_store`](Self::replay_store), for a store already behind an `Arc`.
    pub fn shared_replay_store(mut self, store: Arc<dyn ReplayStore>, namespace: impl Into<String>) -> Self {
        self.replay = Some(Replay {
            store,
            namespace: Arc::from(namespace.into()),
        });
        self
    }

    /// Checks every secret against the scheme and the replay store against the scheme.
    pub fn build(self) -> Result<Verifier, VerifierError> {
        for (index, secret) in self.secrets.iter().enumerate() {
            self.scheme
                .check_secrets(std::slice::from_ref(secret))
                .map_err(|source| VerifierError::InvalidSecret { index, source })?;
        }
        if self.replay.is_some() && !matches!(self.scheme, SignatureScheme::Standard | SignatureScheme::Stripe { .. }) {
            return Err(VerifierError::ReplayProtectionUnsupported);
        }
        // A receiver may have to accept a short key its sender already uses, so a weak key is
        // not refused here (the sender refuses it unless allowed); it is said once, when the
        // verifier is built, without the key.
        if let Err(weak) = self.scheme.check_strength(&self.secrets) {
            tracing::warn!(%weak, "the verifier accepts a weak secret: one captured request is enough to recover it");
        }
        Ok(Verifier {
            scheme: self.scheme,
            secrets: self.secrets,
            tolerance: self.tolerance,
            replay: self.replay,
        })
    }
}

fn tolerance_secs(tolerance: Duration) -> i64 {
    i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX)
}
