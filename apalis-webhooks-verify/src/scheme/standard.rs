//! [Standard Webhooks](https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)
//! signatures: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};

use super::{
    HeaderLookup, SignedParts, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, any_matches, check_timestamp,
    hmac_sha256,
};
use crate::{
    secret::{Secret, SecretError},
    verifier::VerifyError,
};

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let timestamp = timestamp.to_string();
    hmac_sha256(key, &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body])
}

/// The `webhook-signature` value: `v1,<sig>` per secret, separated by single spaces.
pub(super) fn sign(id: &str, timestamp: i64, body: &[u8], secrets: &[Secret]) -> Result<String, SecretError> {
    let mut value = String::new();
    for secret in secrets {
        if !value.is_empty() {
            value.push(' ');
        }
        value.push_str("v1,");
        value.push_str(&STANDARD.encode(mac(&secret.standard_key()?, id, timestamp, body)));
    }
    Ok(value)
}

pub(super) fn verify(
    header: HeaderLookup<'_>,
    body: &[u8],
    secrets: &[Secret],
    tolerance: Duration,
    now: i64,
) -> Result<SignedParts, VerifyError> {
    let required = |name: &'static str| header(name).unwrap_or(Err(VerifyError::MissingHeader(name)));
    let id = required(WEBHOOK_ID)?;
    let timestamp = required(WEBHOOK_TIMESTAMP)?;
    let signatures = required(WEBHOOK_SIGNATURE)?;
    let timestamp: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::InvalidHeader(WEBHOOK_TIMESTAMP))?;
    check_timestamp(timestamp, tolerance, now)?;

    // One MAC per secret, whatever the number of candidates: a header full of signatures must
    // not make the receiver hash the body hundreds of times.
    let expected = secrets
        .iter()
        .map(|secret| Ok(mac(&secret.standard_key()?, &id, timestamp, body)))
        .collect::<Result<Vec<_>, SecretError>>()?;
    // Unknown versions (anything but `v1`) are skipped, as the specification asks.
    let matched = signatures
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, signature)| STANDARD.decode(signature).ok())
        .any(|candidate| any_matches(&candidate, expected.iter().copied()));
    if !matched {
        return Err(VerifyError::NoMatchingSignature);
    }
    Ok(SignedParts {
        webhook_id: Some(id),
        timestamp: Some(timestamp),
    })
}
