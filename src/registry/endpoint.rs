//! [`Endpoint`]: one registered webhook endpoint.

use std::fmt;

use apalis_webhooks_verify::Secret;
use serde::{Deserialize, Serialize};

pub use crate::endpoint_id::EndpointId;

use super::filter::{EventFilter, InvalidFilter};
use crate::{limit::Limit, subscription::WebhookSubscription, target::DeliveryTarget};

/// A registered webhook endpoint: where to deliver, how to sign, which events, and whether it
/// is enabled.
///
/// A new endpoint receives every event (`*`) until [`filter`](Self::filter) narrows it. `Debug`
/// shows the host only and no secrets or header values, as for [`WebhookSubscription`].
///
/// ```
/// use apalis_webhooks::{layers::Limit, registry::Endpoint};
///
/// let endpoint = Endpoint::new("ep_1", "https://example.com/hooks", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .filter("order.*").unwrap()
///     .filter("user.deleted").unwrap()
///     .header("x-api-version", "2")
///     .rate_limit(Limit::per_second(5))
///     .tenant("acme");
/// assert!(endpoint.accepts("order.paid"));
/// assert!(!endpoint.accepts("user.created"));
/// ```
#[derive(Clone, Serialize, Deserialize)]
pub struct Endpoint {
    id: EndpointId,
    /// Flattened, so the stored JSON keeps the fields of the endpoints stored before the target
    /// was split out (`url`, `secrets`, `scheme`, `policy`, … next to `id` and `filters`).
    #[serde(flatten)]
    target: DeliveryTarget,
    filters: Vec<EventFilter>,
    enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disabled_reason: Option<String>,
    /// Absent from endpoints stored before the setting existed: they read as `Skip`, what they
    /// did then.
    #[serde(default, skip_serializing_if = "WhenDisabled::is_skip")]
    when_disabled: WhenDisabled,
}

/// What [`dispatch_event`](super::dispatch_event) does with an event for an endpoint while it
/// is disabled (by the app, or by a worker after a 410 or a long failure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WhenDisabled {
    /// Nothing is stored for it: what it misses while disabled is gone.
    #[default]
    Skip,
    /// The delivery is stored but not sent: the worker sets it aside at once as a dead letter
    /// with reason [`Parked`](crate::report::DeadLetterReason::Parked) (listed, counted in
    /// metrics and purged like any other), which
    /// [`WebhookStore::recover`](crate::store::WebhookStore::recover) sends once the endpoint
    /// is enabled again.
    Park,
}

impl WhenDisabled {
    fn is_skip(&self) -> bool {
        *self == Self::Skip
    }
}

impl Endpoint {
    /// An enabled endpoint `id` at `url`, signed with `secret`, receiving every event.
    ///
    /// Its secrets are held to the same key-length rule as a subscription's; a receiver that
    /// already holds a short key is served with a secret marked
    /// [`Secret::allow_weak`], an allowance the endpoint keeps when a registry stores it.
    pub fn new(id: impl Into<EndpointId>, url: impl Into<String>, secret: impl Into<Secret>) -> Self {
        Self::for_target(id, DeliveryTarget::new(url, secret))
    }

    /// An endpoint in secret-store mode: its deliveries carry `key_id`, which the worker's
    /// [`SecretStore`](crate::secret_store::SecretStore) resolves (see
    /// [`WebhookSubscription::with_key_id`]).
    pub fn with_key_id(id: impl Into<EndpointId>, url: impl Into<String>, key_id: impl Into<String>) -> Self {
        Self::for_target(id, DeliveryTarget::with_key_id(url, key_id))
    }

    /// An enabled endpoint `id` delivering to `target`, receiving every event.
    pub fn for_target(id: impl Into<EndpointId>, target: DeliveryTarget) -> Self {
        Self {
            id: id.into(),
            target,
            filters: vec![EventFilter::all()],
            enabled: true,
            disabled_reason: None,
            when_disabled: WhenDisabled::Skip,
        }
    }

    crate::target::forward_target_setters!(target);

    /// Adds an event filter (`user.created`, `user.*`, `*`). The first call replaces the
    /// default `*`.
    pub fn filter(mut self, filter: impl TryInto<EventFilter, Error = InvalidFilter>) -> Result<Self, InvalidFilter> {
        let filter = filter.try_into()?;
        if self.filters == [EventFilter::all()] {
            self.filters.clear();
        }
        if !self.filters.contains(&filter) {
            self.filters.push(filter);
        }
        Ok(self)
    }

    /// Replaces the event filters (an empty list receives nothing).
    pub fn filters(mut self, filters: impl IntoIterator<Item = EventFilter>) -> Self {
        self.filters = filters.into_iter().collect();
        self.filters.sort();
        self.filters.dedup();
        self
    }

    /// This endpoint's own rate limit, which a [`RateLimitLayer`](crate::layers::RateLimitLayer)
    /// applies instead of its per-endpoint default: see [`DeliveryTarget::rate_limit`].
    pub fn rate_limit(mut self, limit: Limit) -> Self {
        self.target = self.target.rate_limit(limit);
        self
    }

    /// Enables or disables the endpoint (a disabled endpoint receives nothing).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        if enabled {
            self.disabled_reason = None;
        }
        self
    }

    /// What fan-out does with its events while it is disabled: skip them (the default) or park
    /// them for [`recover`](crate::store::WebhookStore::recover).
    pub fn when_disabled(mut self, when_disabled: WhenDisabled) -> Self {
        self.when_disabled = when_disabled;
        self
    }

    /// Whether its events are skipped or parked while it is disabled.
    pub fn disabled_policy(&self) -> WhenDisabled {
        self.when_disabled
    }

    /// Whether an `event_type` event is parked for it: it is disabled, parks, and one of its
    /// filters matches.
    pub fn parks(&self, event_type: &str) -> bool {
        !self.enabled
            && self.when_disabled == WhenDisabled::Park
            && self.filters.iter().any(|filter| filter.matches(event_type))
    }

    /// The state a registry stored: enabled, or disabled (with the worker's reason, if a
    /// worker disabled it).
    pub(crate) fn with_state(mut self, enabled: bool, disabled_reason: Option<String>) -> Self {
        self.enabled = enabled;
        self.disabled_reason = if enabled { None } else { disabled_reason };
        self
    }

    /// The endpoint's id.
    pub fn id(&self) -> &EndpointId {
        &self.id
    }

    /// Where and how its deliveries are sent.
    pub fn target(&self) -> &DeliveryTarget {
        &self.target
    }

    /// The URL deliveries go to.
    pub fn url(&self) -> &str {
        self.target.url()
    }

    /// The event filters.
    pub fn event_filters(&self) -> &[EventFilter] {
        &self.filters
    }

    /// Whether deliveries go to it.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Why it was disabled, when a worker disabled it (410 Gone, failing too long).
    pub fn disabled_reason(&self) -> Option<&str> {
        self.disabled_reason.as_deref()
    }

    /// The tenant, if any.
    pub fn tenant_id(&self) -> Option<&str> {
        self.target.tenant_id()
    }

    /// The endpoint's own rate limit, if any.
    pub fn limit(&self) -> Option<Limit> {
        self.target.limit()
    }

    /// The key id, in secret-store mode.
    pub fn key_id(&self) -> Option<&str> {
        self.target.key_id()
    }

    /// The key id of the client certificate (mTLS) its deliveries are sent with, if any.
    pub fn client_identity_id(&self) -> Option<&str> {
        self.target.client_identity_id()
    }

    /// Checks that deliveries to it can be made: URL, headers, secrets or key id, as
    /// [`WebhookSubscription::dispatch`] would.
    pub fn validate(&self) -> Result<(), super::RegistryError> {
        // Any valid event type: the event is checked when one is dispatched.
        self.subscription()
            .validate("endpoint.check")
            .map_err(|source| super::RegistryError::Invalid {
                id: self.id.to_string(),
                source,
            })
    }

    /// Whether the endpoint is enabled and one of its filters matches `event_type`.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.enabled && self.filters.iter().any(|filter| filter.matches(event_type))
    }

    /// The subscription its deliveries are made with: its whole [`target`](Self::target) (URL,
    /// secrets or key id, scheme, headers, envelope, delivery policy, and the tenant, which
    /// [`Erasure::tenant`](crate::store::Erasure::tenant) selects by) and the endpoint id. An
    /// endpoint with its own [`rate_limit`](Self::rate_limit) is counted under its id
    /// (`endpoint:{id}`), so that its limit is not shared with other endpoints on the same host;
    /// the others under their host, as any subscription.
    pub fn subscription(&self) -> WebhookSubscription {
        let subscription = WebhookSubscription::to(self.target.clone()).endpoint_id(self.id.clone());
        match self.target.limit() {
            Some(_) => subscription.rate_limit_key(format!("endpoint:{}", self.id)),
            None => subscription,
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("target", &self.target)
            .field("filters", &self.filters)
            .field("enabled", &self.enabled)
            .field("disabled_reason", &self.disabled_reason)
            .field("when_disabled", &self.when_disabled)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_stored_before_parking_existed_reads_as_skip() {
        let endpoint = Endpoint::new("ep", "https://example.com/hook", Secret::generate());
        let mut json = serde_json::to_value(&endpoint).unwrap();
        assert!(json.get("when_disabled").is_none(), "skip is not written");
        let read: Endpoint = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(read.disabled_policy(), WhenDisabled::Skip);
        json["when_disabled"] = "park".into();
        let parking = serde_json::from_value::<Endpoint>(json).unwrap().enabled(false);
        assert_eq!(parking.disabled_policy(), WhenDisabled::Park);
        assert!(parking.parks("order.paid") && !parking.accepts("order.paid"));
        assert!(
            !parking.enabled(true).parks("order.paid"),
            "an enabled endpoint is sent to"
        );
    }

    #[test]
    fn an_endpoints_client_identity_is_stored_and_carried_by_its_deliveries() {
        let endpoint = Endpoint::new("ep", "https://example.com/hook", Secret::generate()).client_identity("acme-prod");
        let json = serde_json::to_value(&endpoint).unwrap();
        assert_eq!(json["client_identity"], "acme-prod");
        let read: Endpoint = serde_json::from_value(json).unwrap();
        assert_eq!(read.client_identity_id(), Some("acme-prod"));
        let job = read.subscription().job("order.paid", &1).unwrap();
        assert_eq!(job.client_identity(), Some("acme-prod"));
        let bad = Endpoint::new("ep", "https://example.com/hook", Secret::generate()).client_identity("a b");
        assert!(bad.validate().is_err());
    }
}
