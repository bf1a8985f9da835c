//! Signature schemes: how a delivery is signed and how a receiver verifies it.

mod github;
mod standard;

#[cfg(feature = "v1a")]
pub use standard::MAX_V1A_SIGNATURES;
mod stripe;

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub use crate::headers::{GITHUB_SIGNATURE, STRIPE_SIGNATURE, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};
use crate::{
    secret::{MIN_LITERAL_KEY_BYTES, MIN_STANDARD_KEY_BYTES, Secret, SecretError, StandardKey, WeakSecret},
    verifier::VerifyError,
};

/// How a delivery is signed, and how a receiver verifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SignatureScheme {
    /// [Standard Webhooks](https://www.standardwebhooks.com/): `webhook-id`, `webhook-timestamp`
    /// and `webhook-signature` over `{id}.{timestamp}.{body}`: `v1,<base64 HMAC-SHA256>` per
    /// `whsec_` secret and (feature `v1a`) `v1a,<base64 ed25519>` per `whsk_` key, space
    /// separated, so one header can carry both during a migration.
    #[default]
    Standard,
    /// Stripe style: `<header>: t=<timestamp>,v1=<hex>` (one `v1` per secret) over
    /// `{timestamp}.{body}`; the key is the secret string's bytes.
    Stripe {
        /// Header name, `stripe-signature` by default.
        header: String,
    },
    /// GitHub style: `<header>: sha256=<hex>` over the body, signed with the first secret. It has
    /// no timestamp and so no replay protection.
    #[serde(rename = "github")]
    GitHub {
        /// Header name, `x-hub-signature-256` by default.
        header: String,
    },
}

impl SignatureScheme {
    /// The Stripe style with its usual header, `stripe-signature`.
    pub fn stripe() -> Self {
        Self::Stripe {
            header: STRIPE_SIGNATURE.to_owned(),
        }
    }

    /// The GitHub style with its usual header, `x-hub-signature-256`.
    pub fn github() -> Self {
        Self::GitHub {
            header: GITHUB_SIGNATURE.to_owned(),
        }
    }

    /// The same scheme with another signature header name (Stripe and GitHub styles; the
    /// Standard Webhooks header names are fixed by the specification and left as they are).
    pub fn with_header(self, name: impl Into<String>) -> Self {
        match self {
            Self::Standard => Self::Standard,
            Self::Stripe { .. } => Self::Stripe { header: name.into() },
            Self::GitHub { .. } => Self::GitHub { header: name.into() },
        }
    }

    /// Names of the headers this scheme writes.
    pub fn header_names(&self) -> Vec<&str> {
        match self {
            Self::Standard => vec![WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE],
            Self::Stripe { header } | Self::GitHub { header } => vec![header.as_str()],
        }
    }

    /// Checks that every secret yields a key for this scheme, to verify with: a `whpk_` public
    /// key passes (Standard Webhooks, feature `v1a`).
    pub fn check_secrets(&self, secrets: &[Secret]) -> Result<(), SecretError> {
        if secrets.is_empty() {
            return Err(SecretError::Empty);
        }
        for secret in secrets {
            match self {
                Self::Standard => drop(secret.standard()?),
                Self::Stripe { .. } | Self::GitHub { .. } => drop(secret.literal_key()?),
            }
        }
        Ok(())
    }

    /// As [`check_secrets`](Self::check_secrets), for a sender: every secret must also be able
    /// to sign, so a `whpk_` public key is refused ([`SecretError::PublicKeyCannotSign`]).
    pub fn check_signing_secrets(&self, secrets: &[Secret]) -> Result<(), SecretError> {
        self.check_secrets(secrets)?;
        #[cfg(feature = "v1a")]
        if matches!(self, Self::Standard) {
            for secret in secrets {
                if let crate::secret::StandardKey::Public(_) = secret.standard()? {
                    return Err(SecretError::PublicKeyCannotSign);
                }
            }
        }
        Ok(())
    }

    /// Checks that every secret (each one, during rotation) has a key long enough for this
    /// scheme: [`MIN_STANDARD_KEY_BYTES`] decoded bytes for Standard Webhooks,
    /// [`MIN_LITERAL_KEY_BYTES`] for the Stripe and GitHub styles (an ed25519 key is always
    /// strong enough), unless the secret was marked
    /// with [`Secret::allow_weak`]. A secret that yields no key at all is left to
    /// [`check_secrets`](Self::check_secrets).
    pub fn check_strength(&self, secrets: &[Secret]) -> Result<(), WeakSecret> {
        for secret in secrets.iter().filter(|s| !s.is_weak_allowed()) {
            match self {
                Self::Standard => {
                    // ed25519 keys have one size, and every one of them is strong.
                    if let Ok(StandardKey::Hmac(key)) = secret.standard() {
                        secret.check_len("standard", MIN_STANDARD_KEY_BYTES, key.len())?;
                    }
                }
                Self::Stripe { .. } | Self::GitHub { .. } => {
                    let name = if matches!(self, Self::Stripe { .. }) {
                        "stripe"
                    } else {
                        "github"
                    };
                    if let Ok(key) = secret.literal_key() {
                        secret.check_len(name, MIN_LITERAL_KEY_BYTES, key.len())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The signature headers for one attempt, as `(name, value)` pairs.
    ///
    /// `webhook_id` and `timestamp` (Unix seconds) are used by the schemes that sign them.
    pub fn sign(
        &self,
        webhook_id: &str,
        timestamp: i64,
        body: &[u8],
        secrets: &[Secret],
    ) -> Result<Vec<(String, String)>, SecretError> {
        // Each scheme derives (and so checks) every key as it signs; decoding them twice would
        // double the cost of a Standard Webhooks signature.
        if secrets.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(match self {
            Self::Standard => vec![
                (WEBHOOK_ID.to_owned(), webhook_id.to_owned()),
                (WEBHOOK_TIMESTAMP.to_owned(), timestamp.to_string()),
                (
                    WEBHOOK_SIGNATURE.to_owned(),
                    standard::sign(webhook_id, timestamp, body, secrets)?,
                ),
            ],
            Self::Stripe { header } => vec![(header.clone(), stripe::sign(timestamp, body, secrets)?)],
            Self::GitHub { header } => vec![(header.clone(), github::sign(body, &secrets[0])?)],
        })
    }

    /// Verifies a received request's headers and body against any of `secrets`.
    ///
    /// `header` looks a header up by its lowercase name. `now` is Unix seconds. Returns the
    /// webhook id and timestamp where the scheme has them.
    pub(crate) fn verify(
        &self,
        header: HeaderLookup<'_>,
        body: &[u8],
        secrets: &[Secret],
        tolerance: Duration,
        now: i64,
    ) -> Result<SignedParts, VerifyError> {
        match self {
            Self::Standard => standard::verify(header, body, secrets, tolerance, now),
            Self::Stripe { header: name } => stripe::verify(header, name, body, secrets, tolerance, now),
            Self::GitHub { header: name } => github::verify(header, name, body, secrets),
        }
    }
}

/// Looks a received header up by lowercase name: `None` when absent, an error when unusable
/// (not ASCII, or longer than the verifier accepts).
pub(crate) type HeaderLookup<'a> = &'a dyn Fn(&str) -> Option<Result<String, VerifyError>>;

/// What a verified signature vouches for, besides the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SignedParts {
    pub(crate) webhook_id: Option<String>,
    pub(crate) timestamp: Option<i64>,
}

/// HMAC-SHA256 over the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Checks a timestamp against `now` within `tolerance`, in both directions.
fn check_timestamp(timestamp: i64, tolerance: Duration, now: i64) -> Result<(), VerifyError> {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if timestamp < now.saturating_sub(tolerance) {
        return Err(VerifyError::TimestampTooOld);
    }
    if timestamp > now.saturating_add(tolerance) {
        return Err(VerifyError::TimestampInFuture);
    }
    Ok(())
}

/// Constant-time check of `candidate` against the MAC of every key; true when any matches.
///
/// Every key is tried even after a match so the time taken does not depend on which one matched.
fn any_matches(candidate: &[u8], expected: impl Iterator<Item = [u8; 32]>) -> bool {
    use subtle::ConstantTimeEq;
    let mut matched = subtle::Choice::from(0);
    for mac in expected {
        matched |= mac.as_slice().ct_eq(candidate);
    }
    matched.into()
}
