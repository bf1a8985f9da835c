//! [Standard Webhooks](https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)
//! signatures over `{id}.{timestamp}.{body}`: `v1,<base64 HMAC-SHA256>` and (feature `v1a`)
//! `v1a,<base64 ed25519>`.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};

use super::{
    HeaderLookup, SignedParts, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP, any_matches, check_timestamp,
    hmac_sha256,
};
use crate::{
    secret::{Secret, SecretError, StandardKey},
    verifier::VerifyError,
};

/// Most `v1a` signatures of one header checked: each costs an ed25519 verification per public
/// key (tens of microseconds), so a header stuffed with them must not buy a slow request. A
/// sender signs with one key, two during a rotation.
#[cfg(feature = "v1a")]
pub const MAX_V1A_SIGNATURES: usize = 4;

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let timestamp = timestamp.to_string();
    hmac_sha256(key, &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body])
}

/// What `v1a` signs: the same content as `v1`, in one buffer (ed25519 hashes it twice).
#[cfg(feature = "v1a")]
fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let timestamp = timestamp.to_string();
    let mut content = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
    for part in [id.as_bytes(), b".", timestamp.as_bytes(), b".", body] {
        content.extend_from_slice(part);
    }
    content
}

/// The `webhook-signature` value: one `v1,<sig>` or `v1a,<sig>` per secret, in order, separated
/// by single spaces.
pub(super) fn sign(id: &str, timestamp: i64, body: &[u8], secrets: &[Secret]) -> Result<String, SecretError> {
    let mut value = String::new();
    #[cfg(feature = "v1a")]
    let mut content = None;
    for secret in secrets {
        if !value.is_empty() {
            value.push(' ');
        }
        match secret.standard()? {
            StandardKey::Hmac(key) => {
                value.push_str("v1,");
                value.push_str(&STANDARD.encode(mac(&key, id, timestamp, body)));
            }
            #[cfg(feature = "v1a")]
            StandardKey::Signing(key) => {
                use ed25519_dalek::Signer;
                let content = content.get_or_insert_with(|| signed_content(id, timestamp, body));
                value.push_str("v1a,");
                value.push_str(&STANDARD.encode(key.sign(content).to_bytes()));
            }
            #[cfg(feature = "v1a")]
            StandardKey::Public(_) => return Err(SecretError::PublicKeyCannotSign),
        }
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
    let mut macs = Vec::with_capacity(secrets.len());
    #[cfg(feature = "v1a")]
    let mut public_keys = Vec::new();
    for secret in secrets {
        match secret.standard()? {
            StandardKey::Hmac(key) => macs.push(mac(&key, &id, timestamp, body)),
            #[cfg(feature = "v1a")]
            StandardKey::Signing(key) => public_keys.push(key.verifying_key()),
            #[cfg(feature = "v1a")]
            StandardKey::Public(key) => public_keys.push(key),
        }
    }
    let entries = || signatures.split(' ').filter_map(|entry| entry.split_once(','));
    // Unknown versions are skipped, as the specification asks.
    let v1 = entries()
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, signature)| STANDARD.decode(signature).ok())
        .any(|candidate| any_matches(&candidate, macs.iter().copied()));
    if v1 {
        return Ok(SignedParts {
            webhook_id: Some(id),
            timestamp: Some(timestamp),
        });
    }
    #[cfg(feature = "v1a")]
    if !public_keys.is_empty() {
        let content = signed_content(&id, timestamp, body);
        let v1a = entries()
            .filter(|(version, _)| *version == "v1a")
            .filter_map(|(_, signature)| STANDARD.decode(signature).ok())
            .filter_map(|bytes| ed25519_dalek::Signature::from_slice(&bytes).ok())
            .take(MAX_V1A_SIGNATURES)
            // Strict verification: no malleable signatures, no small-order keys or points.
            .any(|signature| {
                public_keys
                    .iter()
                    .any(|key| key.verify_strict(&content, &signature).is_ok())
            });
        if v1a {
            return Ok(SignedParts {
                webhook_id: Some(id),
                timestamp: Some(timestamp),
            });
        }
    }
    Err(VerifyError::NoMatchingSignature)
}
