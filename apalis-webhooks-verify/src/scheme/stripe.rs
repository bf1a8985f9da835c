//! Stripe-style signatures: `t=<timestamp>,v1=<hex HMAC-SHA256 of "{t}.{body}">`, keyed with the
//! secret string's own bytes.

use std::time::Duration;

use super::{HeaderLookup, SignedParts, any_matches, check_timestamp, hmac_sha256};
use crate::{
    secret::{Secret, SecretError},
    verifier::VerifyError,
};

fn mac(key: &[u8], timestamp: i64, body: &[u8]) -> [u8; 32] {
    let timestamp = timestamp.to_string();
    hmac_sha256(key, &[timestamp.as_bytes(), b".", body])
}

/// `t=<ts>,v1=<hex>[,v1=<hex>…]`, one `v1` per secret, as Stripe sends during secret rolls.
pub(super) fn sign(timestamp: i64, body: &[u8], secrets: &[Secret]) -> Result<String, SecretError> {
    let mut value = format!("t={timestamp}");
    for secret in secrets {
        value.push_str(",v1=");
        value.push_str(&crate::hex::encode(mac(secret.literal_key()?, timestamp, body)));
    }
    Ok(value)
}

pub(super) fn verify(
    header: HeaderLookup<'_>,
    name: &str,
    body: &[u8],
    secrets: &[Secret],
    tolerance: Duration,
    now: i64,
) -> Result<SignedParts, VerifyError> {
    let value = header(&name.to_ascii_lowercase()).unwrap_or(Err(VerifyError::MissingHeader("signature")))?;
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for item in value.split(',') {
        match item.trim().split_once('=') {
            Some(("t", ts)) => timestamp = ts.parse::<i64>().ok(),
            Some(("v1", sig)) => candidates.extend(crate::hex::decode(sig)),
            // Other schemes (v0, …) are ignored, as Stripe's libraries do.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::InvalidHeader("signature"))?;
    check_timestamp(timestamp, tolerance, now)?;
    // One MAC per secret, whatever the number of candidates.
    let expected = secrets
        .iter()
        .map(|secret| Ok(mac(secret.literal_key()?, timestamp, body)))
        .collect::<Result<Vec<_>, SecretError>>()?;
    let matched = candidates
        .iter()
        .any(|candidate| any_matches(candidate, expected.iter().copied()));
    if !matched {
        return Err(VerifyError::NoMatchingSignature);
    }
    Ok(SignedParts {
        webhook_id: None,
        timestamp: Some(timestamp),
    })
}
