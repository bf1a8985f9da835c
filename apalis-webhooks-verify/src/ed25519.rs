//! Standard Webhooks `v1a` keys: ed25519, written `whsk_…` (signing) and `whpk_…` (public).
//!
//! The formats are those Svix's server writes: `whsk_` and the base64 of the 64-byte key pair
//! (the 32-byte seed, then the 32-byte public key), `whpk_` and the base64 of the 32-byte public
//! key. A `whsk_` holding a bare 32-byte seed is accepted as well.

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::secret::{LENIENT_BASE64, SecretError, WHPK_PREFIX, WHSK_PREFIX};

/// The signing key of a `whsk_…` text: the 64-byte pair must hold the public key of its seed.
pub(crate) fn signing_key(encoded: &str) -> Result<SigningKey, SecretError> {
    let bytes = Zeroizing::new(
        LENIENT_BASE64
            .decode(encoded)
            .map_err(|_| SecretError::InvalidSigningKey)?,
    );
    if let Ok(pair) = <&[u8; 64]>::try_from(bytes.as_slice()) {
        return SigningKey::from_keypair_bytes(pair).map_err(|_| SecretError::InvalidSigningKey);
    }
    let seed = <&[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| SecretError::InvalidSigningKey)?;
    Ok(SigningKey::from_bytes(seed))
}

/// The public key of a `whpk_…` text. Keys of small order are refused: any signature made
/// without the private key could verify with them.
pub(crate) fn verifying_key(encoded: &str) -> Result<VerifyingKey, SecretError> {
    let bytes = LENIENT_BASE64
        .decode(encoded)
        .map_err(|_| SecretError::InvalidPublicKey)?;
    let bytes = <&[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| SecretError::InvalidPublicKey)?;
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| SecretError::InvalidPublicKey)?;
    if key.is_weak() {
        return Err(SecretError::InvalidPublicKey);
    }
    Ok(key)
}

/// A fresh `whsk_…` text: a seed from the operating system's CSPRNG, written as Svix writes it.
pub(crate) fn generate() -> Zeroizing<String> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).expect("the operating system's random number generator failed");
    let pair = Zeroizing::new(SigningKey::from_bytes(&seed).to_keypair_bytes());
    Zeroizing::new(format!("{WHSK_PREFIX}{}", STANDARD.encode(pair.as_slice())))
}

/// `whpk_…` for a public key.
pub(crate) fn public_text(key: &VerifyingKey) -> String {
    format!("{WHPK_PREFIX}{}", STANDARD.encode(key.as_bytes()))
}
