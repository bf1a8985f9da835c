//! Signature schemes and secrets ([`apalis_webhooks_verify`], re-exported) and the tower layer
//! that signs each delivery attempt.
//!
//! [`Secret`] (also at the crate root) is a signing key; a key that cannot be used with its
//! scheme is refused with a [`SecretError`], one shorter than the `MIN_*_KEY_BYTES` with a
//! [`WeakSecret`]. The `WH*_PREFIX` constants are the prefixes of the key formats.
//!
//! [`SignatureScheme`] is stored in the job, so every attempt of a delivery is signed the same
//! way; [`SigningLayer`] signs at send time with a fresh timestamp.

pub use apalis_webhooks_verify::{
    MAX_GENERATED_BYTES, MIN_GENERATED_BYTES, MIN_LITERAL_KEY_BYTES, MIN_STANDARD_KEY_BYTES, Secret, SecretError,
    SignatureScheme, WHPK_PREFIX, WHSEC_PREFIX, WHSK_PREFIX, WeakSecret,
    headers::{GITHUB_SIGNATURE, STRIPE_SIGNATURE, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP},
};

pub use crate::layers::signing::{DEFAULT_SECRET_LOOKUP_TIMEOUT, SigningLayer, SigningService};
