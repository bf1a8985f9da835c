//! Verify webhook signatures in a receiver: [Standard Webhooks](https://www.standardwebhooks.com/)
//! (`v1` HMAC and `v1a` ed25519), and the Stripe and GitHub styles.
//!
//! This is the receiver half of [apalis-webhooks](https://crates.io/crates/apalis-webhooks),
//! on its own so that a service that only *receives* webhooks does not build a job queue, an
//! HTTP client or a TLS stack. It holds the secrets, the pure sign and verify functions of every
//! scheme, the header names, the [`Verifier`], the replay stores and (feature `axum`) the
//! `VerifiedWebhook` extractor. The README is the receiver's manual: every failure's status, the
//! body limit, keys, and replay stores for several replicas.
//!
//! ```
//! use apalis_webhooks_verify::{Verifier, VerifierError};
//! use http::HeaderMap;
//!
//! # futures::executor::block_on(async {
//! // Keys are checked here, once: a bad one is an error at startup, not a 500 per request.
//! let verifier = Verifier::builder("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .reject_replays()
//!     .build()?;
//! let unsigned = HeaderMap::new();
//! assert!(verifier.verify(&unsigned, b"{}").await.is_err());
//! # Ok::<_, VerifierError>(())
//! # }).unwrap();
//! ```
//!
//! # Features
//!
//! * `axum`: the `VerifiedWebhook` extractor.
//! * `v1a`: Standard Webhooks `v1a` (ed25519) signatures and `whsk_` / `whpk_` keys.
//! * `redis`: `RedisReplayStore`, one replay memory for every replica of a receiver.
//! * `opentelemetry`: [`TraceContext`] to and from an `opentelemetry::Context`, through
//!   OpenTelemetry's W3C `TraceContextPropagator`, to continue the sender's trace.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

/// The README's examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "axum", feature = "redis", feature = "v1a"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(feature = "v1a")]
mod ed25519;
mod envelope;
#[cfg(feature = "axum")]
mod extractor;
pub mod headers;
mod hex;
mod replay;
mod scheme;
mod secret;
mod trace_context;
mod verifier;

pub use envelope::Envelope;
#[cfg(feature = "axum")]
pub use extractor::{VerifiedWebhook, WebhookRejection};
#[cfg(feature = "redis")]
pub use replay::RedisReplayStore;
pub use replay::{BoxFuture, DEFAULT_REPLAY_CAPACITY, MemoryReplayStore, ReplayKey, ReplayStore, ReplayStoreError};
#[cfg(feature = "v1a")]
pub use scheme::MAX_V1A_SIGNATURES;
pub use scheme::SignatureScheme;
#[allow(deprecated)]
pub use secret::generate_secret;
pub use secret::{
    MAX_GENERATED_BYTES, MIN_GENERATED_BYTES, MIN_LITERAL_KEY_BYTES, MIN_STANDARD_KEY_BYTES, Secret, SecretError,
    WHPK_PREFIX, WHSEC_PREFIX, WHSK_PREFIX, WeakSecret,
};
pub use trace_context::{MAX_TRACESTATE_LEN, TRACEPARENT_LEN, TraceContext};
pub use verifier::{
    DEFAULT_TOLERANCE, MAX_HEADER_LEN, Verified, Verifier, VerifierBuilder, VerifierError, VerifyError, verify,
};
