//! Signing secrets that never print.

use std::{fmt, sync::Arc};

use base64::{
    Engine,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::STANDARD},
};
use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The prefix of Standard Webhooks secrets: `whsec_` followed by base64 key bytes.
pub const WHSEC_PREFIX: &str = "whsec_";

/// The prefix of Standard Webhooks `v1a` signing keys: `whsk_` and the base64 of an ed25519
/// key pair (seed, then public key) or of a bare 32-byte seed.
pub const WHSK_PREFIX: &str = "whsk_";
/// The prefix of Standard Webhooks `v1a` public keys: `whpk_` and the base64 of a 32-byte
/// ed25519 public key. Not secret: a receiver holding it can verify, never sign.
pub const WHPK_PREFIX: &str = "whpk_";

/// Standard base64 that accepts padded and unpadded input, as the official Standard Webhooks
/// libraries do.
pub(crate) const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A webhook signing secret.
///
/// A `Secret` keeps the text it was created from (for example `whsec_MfKQ9r8G…`, or any string
/// a Stripe- or GitHub-style receiver was configured with) or raw key bytes. Each
/// [`SignatureScheme`](crate::SignatureScheme) derives its HMAC key from it the way that scheme's
/// own libraries do:
///
/// * Standard Webhooks: the base64 after the `whsec_` prefix, decoded (raw bytes: used as is),
///   signing `v1`; or, with the `v1a` feature, an ed25519 key: `whsk_…` signs `v1a` (and
///   verifies it), `whpk_…` only verifies it;
/// * Stripe and GitHub styles: the bytes of the secret string itself.
///
/// `Debug` and `Display` print `Secret([REDACTED])`; the material is zeroed when dropped. Cloning is
/// cheap (the material is shared).
///
/// # Key strength
///
/// A short key can be recovered from one captured signature by brute force, so
/// the sender (apalis-webhooks' `dispatch`) refuses keys under
/// [`MIN_STANDARD_KEY_BYTES`] (24, the Standard Webhooks minimum) decoded bytes for Standard
/// Webhooks and under [`MIN_LITERAL_KEY_BYTES`] (16) bytes for the Stripe and GitHub styles
/// (`DispatchError::WeakSecret`). A receiver that already
/// holds a shorter key can still be served: mark that secret with
/// [`allow_weak`](Self::allow_weak). Keys longer than the 64 bytes the specification mentions
/// are not refused: they are not weaker, and the official libraries accept them.
///
/// ```
/// use apalis_webhooks_verify::{Secret, SignatureScheme};
///
/// let weak = [Secret::new("whsec_AA==")];
/// assert!(SignatureScheme::Standard.check_strength(&weak).is_err());
///
/// let allowed = [Secret::new("whsec_AA==").allow_weak()];
/// assert!(SignatureScheme::Standard.check_strength(&allowed).is_ok());
/// ```
#[derive(Clone)]
pub struct Secret {
    material: Arc<Material>,
    /// Set by [`Secret::allow_weak`]: the key length is not checked.
    allow_weak: bool,
}

enum Material {
    Text(SecretBox<str>),
    Bytes(SecretBox<[u8]>),
}

/// A secret that cannot be used with the scheme it was given to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret is empty.
    #[error("the secret is empty")]
    Empty,
    /// A Standard Webhooks secret must be base64 (after an optional `whsec_` prefix).
    #[error("the secret is not valid base64 after the `whsec_` prefix")]
    NotBase64,
    /// A generated secret must have between [`MIN_GENERATED_BYTES`] and
    /// [`MAX_GENERATED_BYTES`] bytes, as Standard Webhooks asks.
    #[error("a generated secret has 24 to 64 bytes, not {0}")]
    InvalidLength(usize),
    /// A `whsk_` key must be the base64 of a 64-byte ed25519 key pair whose second half is the
    /// public key of its first, or of a 32-byte seed.
    #[error("the `whsk_` key is not the base64 of an ed25519 key pair (64 bytes) or seed (32 bytes)")]
    InvalidSigningKey,
    /// A `whpk_` key must be the base64 of a valid 32-byte ed25519 public key.
    #[error("the `whpk_` key is not the base64 of a valid 32-byte ed25519 public key")]
    InvalidPublicKey,
    /// A `whpk_` public key verifies `v1a` signatures; it cannot make them.
    #[error("a `whpk_` public key can verify but not sign; sign with the `whsk_` key")]
    PublicKeyCannotSign,
    /// `whsk_` / `whpk_` keys need the `v1a` feature of apalis-webhooks-verify.
    #[error("ed25519 (`whsk_`/`whpk_`) keys need the `v1a` feature of apalis-webhooks-verify")]
    V1aDisabled,
    /// An ed25519 key was given to a scheme other than Standard Webhooks, or an HMAC secret
    /// where an ed25519 key is needed.
    #[error("ed25519 (`whsk_`/`whpk_`) keys sign and verify Standard Webhooks `v1a` only")]
    WrongKeyKind,
}

/// The key a secret yields for Standard Webhooks.
pub(crate) enum StandardKey {
    /// `v1`: HMAC-SHA256 with these bytes.
    Hmac(zeroize::Zeroizing<Vec<u8>>),
    /// `v1a`: signs (and verifies with its public key).
    #[cfg(feature = "v1a")]
    Signing(Box<ed25519_dalek::SigningKey>),
    /// `v1a`: verifies only.
    #[cfg(feature = "v1a")]
    Public(ed25519_dalek::VerifyingKey),
}

/// Fewest decoded key bytes of a Standard Webhooks secret that a sender accepts without
/// [`Secret::allow_weak`] (the specification asks for 24 to 64).
pub const MIN_STANDARD_KEY_BYTES: usize = 24;
/// Fewest bytes of a Stripe- or GitHub-style secret that a sender accepts without
/// [`Secret::allow_weak`] (128 bits; those schemes publish no minimum).
pub const MIN_LITERAL_KEY_BYTES: usize = 16;

/// A key too short to sign with unless explicitly allowed ([`Secret::allow_weak`]). It names the
/// scheme and the lengths, never the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "weak secret: a {scheme} key needs at least {min_bytes} bytes, this one has {len} \
     (make one with Secret::generate, or mark a key the receiver already holds with Secret::allow_weak)"
)]
#[non_exhaustive]
pub struct WeakSecret {
    /// The signature scheme: `standard`, `stripe` or `github`.
    pub scheme: &'static str,
    /// The scheme's minimum key length in bytes.
    pub min_bytes: usize,
    /// The key's length in bytes (decoded, for Standard Webhooks).
    pub len: usize,
}

/// Fewest key bytes [`Secret::generate_with_len`] makes (Standard Webhooks: 24 to 64).
pub const MIN_GENERATED_BYTES: usize = 24;
/// Most key bytes [`Secret::generate_with_len`] makes.
pub const MAX_GENERATED_BYTES: usize = 64;

/// A fresh Standard Webhooks secret, `whsec_` and the base64 of 32 bytes from a CSPRNG: give it
/// to the receiver once, store it (or its key id) with the subscription.
///
/// ```
/// # #![allow(deprecated)]
/// let secret = apalis_webhooks_verify::generate_secret();
/// # drop(secret);
/// ```
#[deprecated(since = "0.1.0", note = "one way to make a key: use `Secret::generate()`")]
pub fn generate_secret() -> Secret {
    Secret::generate()
}

impl Secret {
    /// A secret from its text form: a `whsec_…` Standard Webhooks secret, or the shared string a
    /// Stripe- or GitHub-style receiver is configured with.
    pub fn new(text: impl Into<String>) -> Self {
        let text: String = text.into();
        Self::of(Material::Text(SecretBox::new(text.into_boxed_str())))
    }

    fn of(material: Material) -> Self {
        Self {
            material: Arc::new(material),
            allow_weak: false,
        }
    }

    /// The same secret, exempt from the key-length check at dispatch (and, in secret-store
    /// mode, at send time): for a receiver that already holds a key shorter than
    /// [`MIN_STANDARD_KEY_BYTES`] / [`MIN_LITERAL_KEY_BYTES`] and cannot change it yet. The
    /// allowance is kept when the secret is stored (a registry endpoint,
    /// a job). Prefer rotating to a [generated](Self::generate) key.
    pub fn allow_weak(mut self) -> Self {
        self.allow_weak = true;
        self
    }

    /// Whether [`allow_weak`](Self::allow_weak) exempts this secret from the key-length check.
    pub fn is_weak_allowed(&self) -> bool {
        self.allow_weak
    }

    /// Checks that a key of `len` bytes is long enough for `scheme`, unless allowed.
    pub(crate) fn check_len(&self, scheme: &'static str, min_bytes: usize, len: usize) -> Result<(), WeakSecret> {
        if self.allow_weak || len >= min_bytes {
            return Ok(());
        }
        Err(WeakSecret { scheme, min_bytes, len })
    }

    /// The text this secret was made from (`whsec_…`, `whsk_…`, a shared string), to hand to a
    /// receiver or write to your own secret storage; `None` for a secret made from raw bytes.
    /// It exposes the secret: keep it out of logs.
    pub fn expose_text(&self) -> Option<&str> {
        match &*self.material {
            Material::Text(text) => Some(text.expose_secret()),
            Material::Bytes(_) => None,
        }
    }

    /// A secret from raw key bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        let bytes: Vec<u8> = bytes.into();
        Self::of(Material::Bytes(SecretBox::new(bytes.into_boxed_slice())))
    }

    /// A fresh Standard Webhooks secret: `whsec_` and the base64 of 32 bytes from a CSPRNG.
    pub fn generate() -> Self {
        Self::fresh(32)
    }

    /// A fresh Standard Webhooks secret of `bytes` key bytes, 24 to 64.
    pub fn generate_with_len(bytes: usize) -> Result<Self, SecretError> {
        if !(MIN_GENERATED_BYTES..=MAX_GENERATED_BYTES).contains(&bytes) {
            return Err(SecretError::InvalidLength(bytes));
        }
        Ok(Self::fresh(bytes))
    }

    fn fresh(bytes: usize) -> Self {
        let mut key = zeroize::Zeroizing::new([0u8; MAX_GENERATED_BYTES]);
        // The operating system's CSPRNG. Without it no key can be made safely, and there is
        // nothing better to fall back to.
        getrandom::fill(&mut key[..bytes]).expect("the operating system's random number generator failed");
        Self::new(format!("{WHSEC_PREFIX}{}", STANDARD.encode(&key[..bytes])))
    }

    /// A fresh Standard Webhooks `v1a` signing key, `whsk_` and the base64 of an ed25519 key
    /// pair (seed from the operating system's CSPRNG, then its public key), as Svix writes it.
    /// Keep it with the sender; give the receiver [`v1a_public_key`](Self::v1a_public_key).
    ///
    /// ```
    /// use apalis_webhooks_verify::Secret;
    ///
    /// let signing = Secret::generate_v1a();
    /// let public = signing.v1a_public_key()?; // "whpk_…": safe to publish
    /// assert!(public.starts_with("whpk_"));
    /// # Ok::<_, apalis_webhooks_verify::SecretError>(())
    /// ```
    #[cfg(feature = "v1a")]
    pub fn generate_v1a() -> Self {
        Self::new(crate::ed25519::generate().as_str())
    }

    /// The `whpk_…` public key of a `whsk_…` signing key (a `whpk_…` key gives itself): what
    /// a receiver needs to verify `v1a` signatures, and cannot sign with.
    pub fn v1a_public_key(&self) -> Result<String, SecretError> {
        match self.standard()? {
            StandardKey::Hmac(_) => Err(SecretError::WrongKeyKind),
            #[cfg(feature = "v1a")]
            StandardKey::Signing(key) => Ok(crate::ed25519::public_text(&key.verifying_key())),
            #[cfg(feature = "v1a")]
            StandardKey::Public(key) => Ok(crate::ed25519::public_text(&key)),
        }
    }

    /// The key this secret yields for Standard Webhooks: HMAC bytes, or an ed25519 key for a
    /// `whsk_` / `whpk_` text.
    pub(crate) fn standard(&self) -> Result<StandardKey, SecretError> {
        if let Material::Text(text) = &*self.material {
            let text = text.expose_secret();
            if let Some(encoded) = text.strip_prefix(WHSK_PREFIX) {
                #[cfg(feature = "v1a")]
                return crate::ed25519::signing_key(encoded).map(|key| StandardKey::Signing(Box::new(key)));
                #[cfg(not(feature = "v1a"))]
                return {
                    let _ = encoded;
                    Err(SecretError::V1aDisabled)
                };
            }
            if let Some(encoded) = text.strip_prefix(WHPK_PREFIX) {
                #[cfg(feature = "v1a")]
                return crate::ed25519::verifying_key(encoded).map(StandardKey::Public);
                #[cfg(not(feature = "v1a"))]
                return {
                    let _ = encoded;
                    Err(SecretError::V1aDisabled)
                };
            }
        }
        self.standard_key().map(StandardKey::Hmac)
    }

    /// Whether this is an ed25519 (`whsk_` / `whpk_`) key, whatever the features.
    fn is_ed25519_text(&self) -> bool {
        match &*self.material {
            Material::Text(text) => {
                let text = text.expose_secret();
                text.starts_with(WHSK_PREFIX) || text.starts_with(WHPK_PREFIX)
            }
            Material::Bytes(_) => false,
        }
    }

    /// The HMAC key for Standard Webhooks `v1`: the decoded base64 after `whsec_` (raw bytes as
    /// they are).
    fn standard_key(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, SecretError> {
        let key = match &*self.material {
            Material::Bytes(bytes) => bytes.expose_secret().to_vec(),
            Material::Text(text) => {
                let text = text.expose_secret();
                let encoded = text.strip_prefix(WHSEC_PREFIX).unwrap_or(text);
                LENIENT_BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?
            }
        };
        let key = zeroize::Zeroizing::new(key);
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(key)
    }

    /// The HMAC key for the Stripe and GitHub styles: the secret's own bytes. It exposes the
    /// key: keep it out of logs.
    pub fn literal_key(&self) -> Result<&[u8], SecretError> {
        // An ed25519 key's text is not an HMAC key someone meant to share.
        if self.is_ed25519_text() {
            return Err(SecretError::WrongKeyKind);
        }
        let key = match &*self.material {
            Material::Bytes(bytes) => bytes.expose_secret(),
            Material::Text(text) => text.expose_secret().as_bytes(),
        };
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(key)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

/// How a secret is written into a stored job or registry endpoint. The job must be able to sign
/// later, on another process, so the material is stored; `Debug` of the job still redacts it.
///
/// Exactly one of `text` and `base64` is set. Without the weak-key allowance this is the same
/// JSON as before the allowance existed (`{"text": …}` or `{"base64": …}`), so stored jobs and
/// endpoints read both ways.
#[derive(Serialize, Deserialize)]
struct StoredSecret {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    allow_weak: bool,
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut stored = StoredSecret {
            text: None,
            base64: None,
            allow_weak: self.allow_weak,
        };
        match &*self.material {
            Material::Text(text) => stored.text = Some(text.expose_secret().to_owned()),
            Material::Bytes(bytes) => stored.base64 = Some(STANDARD.encode(bytes.expose_secret())),
        }
        let result = stored.serialize(serializer);
        // Scrub the temporary copy of the material.
        for s in [&mut stored.text, &mut stored.base64].into_iter().flatten() {
            zeroize::Zeroize::zeroize(s);
        }
        result
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredSecret::deserialize(deserializer)?;
        let secret = match (stored.text, stored.base64) {
            (Some(text), None) => Self::new(text),
            (None, Some(encoded)) => STANDARD
                .decode(encoded)
                .map(Self::from_bytes)
                .map_err(serde::de::Error::custom)?,
            _ => {
                return Err(serde::de::Error::custom(
                    "a stored secret has exactly one of `text` and `base64`",
                ));
            }
        };
        Ok(Self {
            allow_weak: stored.allow_weak,
            ..secret
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_eq!(format!("{secret:?}"), "Secret([REDACTED])");
        assert_eq!(secret.to_string(), "[REDACTED]");
        assert!(!format!("{:?}", Some(secret)).contains("MfKQ"));
    }

    #[test]
    fn generated_secrets_are_standard_and_distinct() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert!(a.literal_key().unwrap().starts_with(WHSEC_PREFIX.as_bytes()));
        assert_eq!(a.standard_key().unwrap().len(), 32);
        assert_ne!(*a.standard_key().unwrap(), *b.standard_key().unwrap());
        for len in [24, 33, 64] {
            assert_eq!(
                Secret::generate_with_len(len).unwrap().standard_key().unwrap().len(),
                len
            );
        }
        for len in [0, 23, 65, 1 << 20] {
            assert_eq!(
                Secret::generate_with_len(len).unwrap_err(),
                SecretError::InvalidLength(len)
            );
        }
        // 1,000 keys of 24 bytes: no repeats, and every byte value turns up (a constant or
        // low-entropy generator would fail one of the two).
        let keys: std::collections::HashSet<Vec<u8>> = (0..1000)
            .map(|_| Secret::generate_with_len(24).unwrap().standard_key().unwrap().to_vec())
            .collect();
        assert_eq!(keys.len(), 1000);
        let seen: std::collections::HashSet<u8> = keys.iter().flatten().copied().collect();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn standard_key_accepts_unpadded_base64() {
        // 31 bytes: padded base64 ends in '='.
        let padded = format!("whsec_{}", STANDARD.encode([7u8; 31]));
        let unpadded = padded.trim_end_matches('=').to_owned();
        assert_ne!(padded, unpadded);
        assert_eq!(*Secret::new(unpadded).standard_key().unwrap(), vec![7u8; 31]);
        assert_eq!(*Secret::new(padded).standard_key().unwrap(), vec![7u8; 31]);
    }

    #[test]
    fn standard_key_rejects_non_base64() {
        assert_eq!(
            Secret::new("whsec_not base64!").standard_key().unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(Secret::new("").literal_key().unwrap_err(), SecretError::Empty);
    }

    #[test]
    fn serde_keeps_the_weak_key_allowance_and_the_old_format() {
        let strong = Secret::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        // Without the allowance the stored form is the one jobs had before it existed.
        assert_eq!(
            serde_json::to_string(&strong).unwrap(),
            r#"{"text":"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"}"#
        );
        let back: Secret = serde_json::from_str(r#"{"base64":"AQID"}"#).unwrap();
        assert!(!back.is_weak_allowed());
        for secret in [
            Secret::new("whsec_AA==").allow_weak(),
            Secret::from_bytes(vec![1, 2]).allow_weak(),
        ] {
            let json = serde_json::to_string(&secret).unwrap();
            assert!(json.contains(r#""allow_weak":true"#), "{json}");
            let back: Secret = serde_json::from_str(&json).unwrap();
            assert!(back.is_weak_allowed());
            assert_eq!(back.literal_key().unwrap(), secret.literal_key().unwrap());
        }
        for bad in [r#"{}"#, r#"{"text":"a","base64":"AQID"}"#] {
            assert!(serde_json::from_str::<Secret>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weak_secret_errors_never_show_the_key() {
        let secret = Secret::new("whsec_AA==");
        let err = secret.check_len("standard", MIN_STANDARD_KEY_BYTES, 1).unwrap_err();
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("AA=="), "{shown}");
        }
        assert!(
            secret
                .allow_weak()
                .check_len("standard", MIN_STANDARD_KEY_BYTES, 1)
                .is_ok()
        );
    }

    #[test]
    fn serde_round_trip_keeps_material() {
        for secret in [
            Secret::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
            Secret::from_bytes(vec![1, 2, 3]),
        ] {
            let json = serde_json::to_string(&secret).unwrap();
            let back: Secret = serde_json::from_str(&json).unwrap();
            assert_eq!(back.literal_key().unwrap(), secret.literal_key().unwrap());
        }
    }
}
