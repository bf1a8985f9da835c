//! Receiver side: verify a delivery's signature (and optionally reject replays).
//!
//! Everything here is [`apalis_webhooks_verify`], re-exported: a service that only receives
//! webhooks should depend on that crate alone, which builds none of the sender's machinery.

#[cfg(feature = "redis")]
pub use apalis_webhooks_verify::RedisReplayStore;
pub use apalis_webhooks_verify::{
    BoxFuture, DEFAULT_REPLAY_CAPACITY, DEFAULT_TOLERANCE, Envelope, MAX_HEADER_LEN, MAX_V1A_SIGNATURES,
    MemoryReplayStore, ReplayKey, ReplayStore, ReplayStoreError, Verified, Verifier, VerifierBuilder, VerifierError,
    VerifyError, verify,
};
pub use apalis_webhooks_verify::{MAX_TRACESTATE_LEN, TRACEPARENT_LEN, TraceContext};
#[cfg(feature = "axum")]
pub use apalis_webhooks_verify::{VerifiedWebhook, WebhookRejection};
