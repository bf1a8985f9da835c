//! The endpoint registry: the app's list of webhook endpoints, which events each receives, and
//! fan-out of one event to all of them ([`dispatch_event`]).
//!
//! The app owns its endpoints ([`Endpoint`]: URL, secrets, [`EventFilter`]s, enabled flag,
//! custom headers, rate limit, tenant) in an [`EndpointRegistry`]: [`MemoryRegistry`] in
//! process, or [`PostgresRegistry`] in a table of the app's database. [`dispatch_event`] turns
//! one event into one delivery job per matching enabled endpoint, each with its own webhook id,
//! pushed in one backend round trip where the backend allows.
//!
//! The worker keeps the registry current: with [`WebhookWorker::registry`](crate::WebhookWorker::registry)
//! an endpoint that answers 410 Gone, or has failed without a success for
//! [`disable_after`](crate::WebhookWorker::disable_endpoints_after), is disabled there and
//! [`DeliveryEvent::EndpointDisabled`](crate::report::DeliveryEvent::EndpointDisabled) fires.
//!
//! ```no_run
//! # async fn example(mut storage: apalis_webhooks::sqlite::SqliteStorage<apalis_webhooks::WebhookJob>) -> Result<(), Box<dyn std::error::Error>> {
//! use apalis_webhooks::registry::{Endpoint, EndpointRegistry, Event, MemoryRegistry, dispatch_event};
//!
//! let registry = MemoryRegistry::new();
//! registry
//!     .upsert(
//!         Endpoint::new("ep_1", "https://example.com/hooks", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!             .filter("user.*")?
//!             .tenant("acme"),
//!     )
//!     .await?;
//! let sent = dispatch_event(
//!     &registry,
//!     &mut storage,
//!     Event::new("user.created", &serde_json::json!({ "id": 7 })).tenant("acme"),
//! )
//! .await?;
//! assert_eq!(sent.len(), 1);
//! # Ok(()) }
//! ```

mod endpoint;
mod fanout;
mod filter;
pub(crate) mod health;
mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
mod recover;

use futures::future::BoxFuture;

pub use endpoint::{Endpoint, EndpointId, WhenDisabled};
pub use fanout::{Event, FanOutError, dispatch_event};
pub use filter::{EventFilter, InvalidFilter, MAX_FILTER_LEN};
pub use health::{DEFAULT_DISABLE_AFTER, DEFAULT_HEALTH_CAP, EndpointHealth, Verdict};
pub use memory::MemoryRegistry;
#[cfg(feature = "postgres")]
pub use postgres::{DEFAULT_TABLE, InvalidTableName, PostgresRegistry};
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub use recover::{RecoverError, recover};

/// The registry could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The store failed (connection, query).
    #[error("endpoint registry unavailable: {0}")]
    Unavailable(#[source] apalis_core::error::BoxDynError),
    /// The endpoint could never be delivered to (its URL, headers, secrets or key id are
    /// invalid); nothing was stored.
    #[error("endpoint {id} is invalid: {source}")]
    Invalid {
        /// The endpoint.
        id: String,
        /// What is wrong.
        #[source]
        source: crate::subscription::DispatchError,
    },
    /// A stored endpoint could not be read back (a hand-edited row, say).
    #[error("endpoint {id} is stored in a form this version cannot read: {reason}")]
    Corrupt {
        /// The endpoint.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where the app keeps its webhook endpoints. Implemented by [`MemoryRegistry`] and
/// [`PostgresRegistry`]; implement it over your own tables to keep endpoints where the rest of
/// your data is.
///
/// Object safe, so the worker holds it as `Arc<dyn EndpointRegistry>`.
pub trait EndpointRegistry: Send + Sync + 'static {
    /// The enabled endpoints whose filters match `event_type`, of `tenant` when it is given
    /// (all tenants' otherwise). [`EventFilter::candidates`] lists the filters that match.
    fn matching<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>>;

    /// The disabled endpoints that [park](WhenDisabled::Park) their events and whose filters
    /// match `event_type`, of `tenant` when it is given. [`dispatch_event`] stores a parked
    /// delivery for each.
    ///
    /// The default finds none: a registry that does not implement it skips, as before parking
    /// existed.
    fn parking<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        let _ = (event_type, tenant);
        Box::pin(futures::future::ready(Ok(Vec::new())))
    }

    /// Everything [`dispatch_event`] delivers `event_type` to: the [`matching`](Self::matching)
    /// endpoints, then the [`parking`](Self::parking) ones (told apart by
    /// [`Endpoint::is_enabled`]).
    ///
    /// The default asks both; a registry behind a database answers in one query
    /// ([`PostgresRegistry`](crate::registry::PostgresRegistry) does), so a fan-out costs one round trip.
    fn recipients<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        Box::pin(async move {
            let mut endpoints = self.matching(event_type, tenant).await?;
            endpoints.extend(self.parking(event_type, tenant).await?);
            Ok(endpoints)
        })
    }

    /// Stores `endpoint`, replacing the one with the same id. Refuses an endpoint that could
    /// never be delivered to with [`RegistryError::Invalid`] ([`Endpoint::validate`]).
    fn upsert(&self, endpoint: Endpoint) -> BoxFuture<'_, Result<(), RegistryError>>;

    /// The endpoint with this id, enabled or not.
    fn get<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<Option<Endpoint>, RegistryError>>;

    /// Removes the endpoint; whether it existed.
    fn remove<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<bool, RegistryError>>;

    /// Disables the endpoint with `reason`; whether it was enabled before (so exactly one
    /// caller sees `true` when several workers disable it at once).
    fn disable<'a>(&'a self, id: &'a EndpointId, reason: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>>;

    /// Enables the endpoint again and forgets its failures; whether it exists.
    fn enable<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<bool, RegistryError>>;

    /// Notes a failed attempt at Unix second `at`; returns since when the endpoint has been
    /// failing without a success in between (`at` for a first failure), `None` if it is unknown.
    fn record_failure<'a>(&'a self, id: &'a EndpointId, at: u64) -> BoxFuture<'a, Result<Option<u64>, RegistryError>>;

    /// Notes a successful delivery: the endpoint is no longer failing.
    fn record_success<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<(), RegistryError>>;
}
