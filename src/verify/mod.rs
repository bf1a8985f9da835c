//! Receiver side: verify a delivery's signature (and optionally reject replays).
//!
//! ```
//! use apalis_webhooks::verify::Verifier;
//! use http::HeaderMap;
//!
//! let verifier = Verifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
//! let headers = HeaderMap::new();
//! assert!(verifier.verify(&headers, b"{}").is_err()); // no signature headers
//! ```

#[cfg(feature = "axum")]
mod extractor;
mod replay;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

#[cfg(feature = "axum")]
pub use extractor::{VerifiedWebhook, WebhookRejection};
pub use replay::ReplayGuard;

use crate::{
    secret::{Secret, SecretError},
    signing::SignatureScheme,
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
    /// A configured secret yields no key for the scheme.
    #[error("receiver secret unusable: {0}")]
    InvalidSecret(#[from] SecretError),
}

/// What a verified signature vouches for, besides the body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// `webhook-id` (Standard Webhooks): stable across retries, use it to drop duplicates.
    pub webhook_id: Option<String>,
    /// The signed timestamp, Unix seconds (Standard Webhooks and Stripe style).
    pub timestamp: Option<i64>,
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
    verify_with(
        &SignatureScheme::Standard,
        headers,
        body,
        secrets,
        tolerance,
        unix_now(),
    )
}

fn verify_with(
    scheme: &SignatureScheme,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[Secret],
    tolerance: Duration,
    now: i64,
) -> Result<Verified, VerifyError> {
    let lookup = |name: &str| {
        let value = headers.get(name)?;
        let name = static_name(name);
        if value.len() > MAX_HEADER_LEN {
            return Some(Err(VerifyError::InvalidHeader(name)));
        }
        Some(
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| VerifyError::InvalidHeader(name)),
        )
    };
    let parts = scheme.verify(&lookup, body, secrets, tolerance, now)?;
    Ok(Verified {
        webhook_id: parts.webhook_id,
        timestamp: parts.timestamp,
    })
}

/// Error variants carry `&'static str` names; custom header names are reported generically.
fn static_name(name: &str) -> &'static str {
    use crate::signing::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};
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

/// A receiver's verification settings: scheme, secrets, tolerance, optional replay guard.
///
/// Cheap to clone; use it as axum state for [`VerifiedWebhook`].
#[derive(Debug, Clone)]
pub struct Verifier {
    scheme: SignatureScheme,
    secrets: Vec<Secret>,
    tolerance: Duration,
    replay: Option<ReplayGuard>,
}

impl Verifier {
    /// Standard Webhooks verification with `secret`, ±5 minutes, no replay guard.
    pub fn new(secret: impl Into<Secret>) -> Self {
        Self {
            scheme: SignatureScheme::Standard,
            secrets: vec![secret.into()],
            tolerance: DEFAULT_TOLERANCE,
            replay: None,
        }
    }

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

    /// Timestamp tolerance, both directions (5 minutes by default).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Rejects a message that was already accepted, with a guard remembering messages for the
    /// tolerance window (after which the timestamp check rejects them anyway).
    pub fn reject_replays(mut self) -> Self {
        self.replay = Some(ReplayGuard::new(self.tolerance));
        self
    }

    /// Uses `guard` (shared between verifiers, for example) to reject replays.
    pub fn replay_guard(mut self, guard: ReplayGuard) -> Self {
        self.replay = Some(guard);
        self
    }

    /// Verifies a request's headers and raw body.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify_at(headers, body, unix_now())
    }

    /// As [`verify`](Self::verify), with `now` in Unix seconds (for tests and replays of logs).
    pub fn verify_at(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        let verified = verify_with(&self.scheme, headers, body, &self.secrets, self.tolerance, now)?;
        // Only a genuine message is remembered, so forged requests cannot fill the guard or
        // block real ones.
        if let (Some(guard), Some(id), Some(timestamp)) = (&self.replay, &verified.webhook_id, verified.timestamp) {
            guard.check_and_remember(id, timestamp, now)?;
        }
        Ok(verified)
    }
}
