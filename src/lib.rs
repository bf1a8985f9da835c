//! Reliable outbound webhooks for apps that already run [apalis](https://docs.rs/apalis).
//!
//! A delivery is an apalis job ([`WebhookJob`]) in the host's backend; the host's `Monitor` runs
//! the worker ([`WebhookWorker`]); a tower stack around the HTTP call ([`SigningLayer`],
//! [`HttpDelivery`]) signs it. Retries are new tasks with a later `run_at` in the same backend;
//! dead letters are the backend's `Killed` tasks.
//!
//! 1. Register the worker:
//!
//! ```no_run
//! # async fn example(pool: apalis_webhooks::sqlite::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
//! use apalis::prelude::*;
//! use apalis_webhooks::{WebhookWorker, sqlite};
//!
//! let storage = sqlite::storage(&pool);
//! let service = WebhookWorker::new(storage.clone()).service()?;
//! Monitor::new()
//!     // A unique name per process start, polling, 64 deliveries in flight: `sqlite::worker`.
//!     .register(move |restarts| sqlite::worker(&storage, restarts).build(service.clone()))
//!     // A worker a database error stopped starts again, after a capped backoff.
//!     .should_restart(|_, _| true)
//!     .run()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! 2. Dispatch an event with one call:
//!
//! ```no_run
//! # async fn example(mut storage: apalis_webhooks::sqlite::SqliteStorage<apalis_webhooks::WebhookJob>) -> Result<(), apalis_webhooks::DispatchError> {
//! use apalis_webhooks::WebhookSubscription;
//!
//! let id = WebhookSubscription::new("https://example.com/hooks", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .dispatch(&mut storage, "order.created", &serde_json::json!({ "order": 42 }))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! On Postgres and Redis the same with `postgres::worker` / `redis::worker`, dispatching through
//! `PostgresSink` / `RedisSink` (see [`backend`]).
//!
//! 3. Verify in the receiver with [`verify::verify`], [`verify::Verifier`] or the axum extractor
//!    `verify::VerifiedWebhook`; a receiving service depends on the `apalis-webhooks-verify`
//!    crate alone.
//!
//! Deliveries connect only to public addresses unless the worker's
//! [`EgressPolicy`](ssrf::EgressPolicy) allows more (see [`ssrf`]); in secret-store mode
//! ([`SecretStore`]) jobs carry a key id instead of their secrets.
//!
//! The README has the tables of headers sent and of status → outcome, and the Security section.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

/// The README's Rust snippets, each a complete function, compiled as doctests.
#[cfg(all(
    doctest,
    feature = "sqlite",
    feature = "postgres",
    feature = "redis",
    feature = "axum",
    feature = "registry",
    feature = "ordering"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The focused docs under `docs/`, their Rust snippets compiled as doctests like the README's.
#[cfg(all(
    doctest,
    feature = "sqlite",
    feature = "postgres",
    feature = "redis",
    feature = "axum",
    feature = "registry",
    feature = "ordering"
))]
pub mod docs {
    #[doc = include_str!("../docs/operations.md")]
    pub struct Operations;
    #[doc = include_str!("../docs/security.md")]
    pub struct Security;
    #[doc = include_str!("../docs/fanout-and-ordering.md")]
    pub struct FanOutAndOrdering;
    #[doc = include_str!("../docs/observability.md")]
    pub struct Observability;
    #[doc = include_str!("../docs/performance.md")]
    pub struct Performance;
    #[doc = include_str!("../docs/apalis.md")]
    pub struct Apalis;
}

pub mod backend;
mod bounded;
mod clock;
mod delivery;
mod dispatch_error;
mod endpoint_id;
pub mod idempotency;
mod job;
// What reads JSON documents back: the stores, ordered lines (and the Postgres registry).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis", feature = "ordering"))]
mod json;
pub mod layers;
mod limit;
pub mod observe;
#[cfg(feature = "ordering")]
#[cfg_attr(docsrs, doc(cfg(feature = "ordering")))]
pub mod ordering;
mod outcome;
mod policy;
mod record;
mod redact;
#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub mod registry;
mod report;
mod retry;
mod secret_store;
pub mod signing;
mod sink;
pub mod ssrf;
mod status_set;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
mod store;
mod subscription;
// Postgres tables named by the app: the endpoint registry's and the ordered lines'.
#[cfg(all(feature = "postgres", any(feature = "registry", feature = "ordering")))]
mod table_name;
pub mod target;
mod tuning;
pub mod verify;
mod worker;

#[allow(deprecated)]
pub use apalis_webhooks_verify::generate_secret;
pub use apalis_webhooks_verify::{
    MAX_GENERATED_BYTES, MIN_GENERATED_BYTES, MIN_LITERAL_KEY_BYTES, MIN_STANDARD_KEY_BYTES, Secret, SecretError,
    WHPK_PREFIX, WHSEC_PREFIX, WHSK_PREFIX, WeakSecret,
};
#[cfg(feature = "sqlite")]
pub use backend::sqlite;
pub use bounded::{MapUsage, MemoryCap};
pub use delivery::{
    ATTEMPT_HEADER, DEFAULT_MAX_ATTEMPT_TIMEOUT, DEFAULT_MAX_RESPONSE_BYTES, DeliveryRequest, EVENT_HEADER,
    HttpDelivery, RESPONSE_EXCERPT_BYTES, USER_AGENT,
};
pub use job::{WebhookId, WebhookJob};
pub use outcome::{AttemptResult, DeferReason, Outcome, StatusRange, StatusSet, TransportErrorKind, parse_retry_after};
pub use policy::{DeliveryPolicy, MAX_ATTEMPTS_LIMIT};
pub use record::AttemptRecord;
pub use retry::RetrySchedule;
pub use secret_store::{MemorySecretStore, SecretStore, SecretStoreError};
pub use signing::{SignatureScheme, SigningLayer, SigningService};
pub use sink::{Deferral, TaskSinkAdapter, WebhookSink};
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub use store::{
    Cursor, DeadLetterEntry, DeadLetterFilter, DeliveryHistory, DeliveryStatus, Page, StoreError, WebhookStore,
};
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub use store::{
    DEFAULT_DEAD_LETTER_RETENTION, DEFAULT_DELIVERED_RETENTION, DEFAULT_PURGE_BATCH, MAX_PURGE_BATCH, MAX_RETENTION,
    MIN_PURGE_INTERVAL, PurgeReport, PurgeRuns, PurgeSchedule, RetentionError, RetentionPolicy,
};
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub use store::{DEFAULT_ERASURE_BATCH, Erasure, ErasureReport};
pub use subscription::{
    DEFAULT_MAX_PAYLOAD_BYTES, DispatchError, MAX_EVENT_TYPE_LEN, MAX_EXTRA_HEADER_BYTES, MAX_EXTRA_HEADERS,
    MAX_KEY_ID_LEN, MAX_URL_LEN, WebhookSubscription,
};
pub use target::DeliveryTarget;
pub use worker::{
    BuildError, DEAD_LETTER_PREFIX, DEFAULT_CONCURRENCY, DEFAULT_POLL_INTERVAL, DeadLetter, DeadLetterReason,
    DeliveryEvent, DeliveryReport, SETTLE_PATIENCE, WebhookService, WebhookWorker,
};
