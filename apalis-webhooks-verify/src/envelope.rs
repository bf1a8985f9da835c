//! The Standard Webhooks envelope: `{"type", "timestamp", "data"}`, whose event type is signed
//! along with the rest of the body.

use serde::{Deserialize, Serialize};

/// A payload in the [Standard Webhooks envelope](https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md#payload-structure):
/// what apalis-webhooks sends for a subscription with `.envelope()`.
///
/// Its `type` is part of the signed body, unlike the `x-webhook-event` header, so route on it.
/// Deserialize a verified body into `Envelope<YourPayload>`:
///
/// ```
/// use apalis_webhooks_verify::Envelope;
///
/// #[derive(serde::Deserialize)]
/// struct Order { order: u64 }
///
/// let body = br#"{"type":"order.created","timestamp":"2026-11-29T20:15:00.000Z","data":{"order":42}}"#;
/// let event: Envelope<Order> = serde_json::from_slice(body)?; // after verifying `body`
/// assert_eq!(event.event_type, "order.created");
/// assert_eq!(event.data.order, 42);
/// # Ok::<_, serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Envelope<T> {
    /// The event type, e.g. `order.created`. Signed.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the event was dispatched, RFC 3339 (`2026-11-29T20:15:00.000Z`).
    pub timestamp: String,
    /// The payload.
    pub data: T,
}

impl<T> Envelope<T> {
    /// An envelope of `data`.
    pub fn new(event_type: impl Into<String>, timestamp: impl Into<String>, data: T) -> Self {
        Self {
            event_type: event_type.into(),
            timestamp: timestamp.into(),
            data,
        }
    }
}
