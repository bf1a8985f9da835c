//! GitHub-style signatures: `sha256=<lowercase hex HMAC-SHA256 of the body>`.
//!
//! The body alone is signed: there is no timestamp, so a captured request can be replayed.

use super::{HeaderLookup, SignedParts, any_matches, hmac_sha256};
use crate::{
    secret::{Secret, SecretError},
    verifier::VerifyError,
};

/// `sha256=<hex>`. GitHub's format carries one signature, so only one secret signs.
pub(super) fn sign(body: &[u8], secret: &Secret) -> Result<String, SecretError> {
    Ok(format!(
        "sha256={}",
        crate::hex::encode(hmac_sha256(secret.literal_key()?, &[body]))
    ))
}

pub(super) fn verify(
    header: HeaderLookup<'_>,
    name: &str,
    body: &[u8],
    secrets: &[Secret],
) -> Result<SignedParts, VerifyError> {
    let value = header(&name.to_ascii_lowercase()).unwrap_or(Err(VerifyError::MissingHeader("signature")))?;
    let candidate = value
        .trim()
        .strip_prefix("sha256=")
        .and_then(crate::hex::decode)
        .ok_or(VerifyError::InvalidHeader("signature"))?;
    let keys = secrets
        .iter()
        .map(|secret| secret.literal_key())
        .collect::<Result<Vec<_>, _>>()?;
    if !any_matches(&candidate, keys.iter().map(|key| hmac_sha256(key, &[body]))) {
        return Err(VerifyError::NoMatchingSignature);
    }
    Ok(SignedParts::default())
}
