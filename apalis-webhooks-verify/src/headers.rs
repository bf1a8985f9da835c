//! Names of the headers a delivery carries.
//!
//! The signature headers are covered by (or carry) the signature; [`EVENT_HEADER`] is not, so a
//! receiver must not trust it more than the network it came over.

/// The Standard Webhooks id header: the message id, the same on every retry. Signed.
pub const WEBHOOK_ID: &str = "webhook-id";
/// The Standard Webhooks timestamp header, Unix seconds. Signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// The Standard Webhooks signature header: `v1,<base64>` and/or `v1a,<base64>` entries.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// Default signature header of the Stripe style (`t=<ts>,v1=<hex>`).
pub const STRIPE_SIGNATURE: &str = "stripe-signature";
/// Default signature header of the GitHub style (`sha256=<hex>`).
pub const GITHUB_SIGNATURE: &str = "x-hub-signature-256";
/// The event type, e.g. `order.created`, as a convenience for routing. **Not signed** by any
/// scheme: anyone who can replay a request can change it. Read a signed event type from the
/// body instead (the Standard Webhooks envelope's `type`).
pub const EVENT_HEADER: &str = "x-webhook-event";
/// The W3C Trace Context parent, `00-{trace id}-{parent id}-{flags}`: the sender's span the
/// delivery belongs to. **Not signed** by any scheme; use it only to correlate traces (see
/// [`TraceContext`](crate::TraceContext)).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context vendor state that goes with [`TRACEPARENT`]. **Not signed.**
pub const TRACESTATE: &str = "tracestate";
