//! Reliable outbound webhooks for apps that already run [apalis](https://docs.rs/apalis).
//!
//! A delivery is an apalis job ([`WebhookJob`]) in the host's backend; the host's `Monitor` runs
//! the worker ([`WebhookWorker`]); a tower stack around the HTTP call
//! ([`SigningLayer`](signing::SigningLayer), [`HttpDelivery`](delivery::HttpDelivery)) signs it.
//! Retries are new tasks with a later `run_at` in the same backend; dead letters are the
//! backend's `Killed` tasks.
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
//!     // A unique name per process start, polling, 256 deliveries in flight: `sqlite::worker`.
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
//! ([`SecretStore`](secret_store::SecretStore)) jobs carry a key id instead of their secrets.
//!
//! The root holds only what these three flows name. Everything else is in the module that
//! defines it, with its limits and defaults beside it:
//!
//! | module | what |
//! |---|---|
//! | [`backend`] | one module per backend (`connect`, `storage`, `worker`, `worker_backend`, sinks) |
//! | [`subscription`] | [`WebhookSubscription`], [`DispatchError`], the payload and event-type limits |
//! | [`idempotency`] | idempotent dispatch: keys, windows, what each backend remembers |
//! | [`target`] | `DeliveryTarget`, shared by subscriptions and registry endpoints, and its limits (`MAX_URL_LEN`, …) |
//! | [`signing`] | signature schemes, secrets and their limits, [`SigningLayer`](signing::SigningLayer) |
//! | [`policy`], [`retry`], [`outcome`] | per-delivery policy, backoff schedules, status sets and attempt outcomes |
//! | [`worker`] | [`WebhookWorker`], its service and defaults (concurrency, poll interval) |
//! | [`delivery`] | the HTTP attempt, the headers it sends, response limits |
//! | [`report`], [`record`] | what deliveries report: results, dead letters, events, attempt records |
//! | `store` | delivery history, dead letters and replay, retention, erasure (with a backend feature) |
//! | [`sink`], [`secret_store`], [`bounded`] | the sink trait and `TaskSinkAdapter` (any apalis backend), secret-store mode, memory caps |
//! | [`layers`], [`ssrf`], [`observe`], [`verify`] | as named |
//! | `registry`, `ordering` | fan-out to registered endpoints, ordered delivery per key (features of those names) |
//!
//! The README has the tables of headers sent and of status → outcome, and the Security section.
#![cfg_attr(docsrs, feature(doc_cfg))]
// A link to an item of a feature that is off cannot resolve, so links are checked where every
// feature is on: on docs.rs and in CI's doc build (`cargo doc --all-features`, warnings denied).
#![cfg_attr(
    not(all(
        feature = "sqlite",
        feature = "postgres",
        feature = "redis",
        feature = "axum",
        feature = "metrics",
        feature = "registry",
        feature = "ordering",
        feature = "opentelemetry"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

/// The README's Rust snippets, each a complete function, compiled as doctests.
#[cfg(all(
    doctest,
    feature = "sqlite",
    feature = "postgres",
    feature = "redis",
    feature = "axum",
    feature = "registry",
    feature = "ordering",
    feature = "opentelemetry"
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
    // Its trace context example uses the `opentelemetry` feature.
    #[cfg(feature = "opentelemetry")]
    #[doc = include_str!("../docs/observability.md")]
    pub struct Observability;
    #[doc = include_str!("../docs/performance.md")]
    pub struct Performance;
    #[doc = include_str!("../docs/apalis.md")]
    pub struct Apalis;
}

pub mod backend;
pub mod batch;
pub mod bounded;
pub mod client_identity;
mod clock;
pub mod delivery;
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
pub mod outcome;
pub mod policy;
pub mod record;
mod redact;
#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub mod registry;
pub mod report;
pub mod retry;
pub mod secret_store;
pub mod signing;
pub mod sink;
pub mod ssrf;
mod status_set;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub mod store;
pub mod subscription;
// Postgres tables named by the app: the endpoint registry's and the ordered lines'.
#[cfg(all(feature = "postgres", any(feature = "registry", feature = "ordering")))]
mod table_name;
pub mod target;
mod tuning;
pub mod verify;
pub mod worker;

// The three flows, at the root; everything else is in the module that defines it.
pub use apalis_webhooks_verify::Secret;
#[cfg(feature = "sqlite")]
pub use backend::sqlite;
pub use job::{WebhookId, WebhookJob};
pub use sink::WebhookSink;
pub use subscription::{DispatchError, WebhookSubscription};
pub use worker::WebhookWorker;
