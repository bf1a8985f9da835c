//! Signature schemes ([`apalis_webhooks_verify`], re-exported) and the tower layer that signs
//! each delivery attempt.
//!
//! [`SignatureScheme`] is stored in the job, so every attempt of a delivery is signed the same
//! way; [`SigningLayer`] signs at send time with a fresh timestamp.

pub use apalis_webhooks_verify::{
    SignatureScheme,
    headers::{GITHUB_SIGNATURE, STRIPE_SIGNATURE, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP},
};

pub use crate::layers::signing::{DEFAULT_SECRET_LOOKUP_TIMEOUT, SigningLayer, SigningService};
