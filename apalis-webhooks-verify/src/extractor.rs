//! The axum extractor [`VerifiedWebhook`].

use axum::{
    body::Bytes,
    extract::{FromRef, FromRequest, Request, rejection::BytesRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use crate::{
    headers::EVENT_HEADER,
    trace_context::TraceContext,
    verifier::{Verified, Verifier, VerifyError},
};

/// A delivery whose signature checked out, with its JSON payload deserialized.
///
/// The [`Verifier`] comes from the router state (`Verifier: FromRef<S>`). Rejections (see
/// [`WebhookRejection`]):
///
/// | status | when |
/// |---|---|
/// | 401 | signature headers missing, no matching signature, timestamp outside the tolerance |
/// | 400 | a signature header malformed (not ASCII, too long, unparseable), or a genuine body that is not the expected JSON |
/// | 409 | a replay: this exact signed message was already accepted |
/// | 503 | the replay store could not answer (full, or Redis down): retry later |
/// | 500 | the receiver's own secret unusable (only with the free function; a built `Verifier` checks it) |
///
/// A replay gets 409 rather than 401 because its signature is genuine: the distinct status
/// tells a logged attack or a duplicating proxy apart from a wrong secret. 503 lets a sender
/// retry once the store is back, where a 4xx could make it give the delivery up.
///
/// ```no_run
/// use apalis_webhooks_verify::{VerifiedWebhook, Verifier};
/// use axum::{Router, routing::post};
///
/// async fn handle(webhook: VerifiedWebhook<serde_json::Value>) -> &'static str {
///     // `event_type` is read from the signed body (the Standard Webhooks envelope), never
///     // from a header.
///     println!("{:?} {:?}", webhook.event_type, webhook.payload);
///     "ok"
/// }
///
/// let verifier = Verifier::builder("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
///     .reject_replays()
///     .build()
///     .expect("a valid secret");
/// let app: Router = Router::new().route("/webhook", post(handle)).with_state(verifier);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifiedWebhook<T = serde_json::Value> {
    /// What the signature vouches for: the webhook id (Standard Webhooks, the same on every
    /// retry) and timestamp, per scheme.
    pub verified: Verified,
    /// The event type from the signed body: the `type` of a Standard Webhooks envelope
    /// (`{"type", "timestamp", "data"}`, what a sender's `.envelope()` sends); `None` for a
    /// body that is not one. Route on this.
    pub event_type: Option<String>,
    /// The `x-webhook-event` header as received. **No scheme signs it**: anyone replaying a
    /// captured request can change it, so do not let it decide anything.
    pub unsigned_event_header: Option<String>,
    /// The deserialized payload (the whole body; use `VerifiedWebhook<Envelope<T>>` to
    /// deserialize an envelope's `data`).
    pub payload: T,
    /// The W3C trace context headers, validated; unsigned (see [`trace_context`](Self::trace_context)).
    trace_context: Option<TraceContext>,
}

impl<T> VerifiedWebhook<T> {
    /// The `webhook-id`, where the scheme signs one (Standard Webhooks).
    pub fn webhook_id(&self) -> Option<&str> {
        self.verified.webhook_id()
    }

    /// The signed timestamp, Unix seconds, where the scheme signs one.
    pub fn timestamp(&self) -> Option<i64> {
        self.verified.timestamp()
    }

    /// The sender's W3C trace context (`traceparent` and `tracestate`), if the request carried
    /// a valid one: the parent of your span, to continue the sender's trace. **No scheme signs
    /// these headers**, so use them to correlate traces and for nothing else. See
    /// [`TraceContext`]; with the `opentelemetry` feature, `TraceContext::to_otel`.
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.trace_context.as_ref()
    }
}

/// Why [`VerifiedWebhook`] rejected a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookRejection {
    /// The signature did not verify: 401, 400 for a malformed header, 409 for a replay, 503
    /// when the replay store could not answer, 500 if the receiver's own secret is unusable.
    #[error("webhook signature rejected: {0}")]
    Signature(#[from] VerifyError),
    /// The body could not be read.
    #[error(transparent)]
    Body(#[from] BytesRejection),
    /// The verified body is not the expected JSON (400).
    #[error("webhook payload is not the expected JSON: {0}")]
    Payload(#[source] serde_json::Error),
}

impl IntoResponse for WebhookRejection {
    fn into_response(self) -> Response {
        match self {
            Self::Signature(error) => {
                let status = error.status();
                // The server-side failures are logged (the sender only sees a status) and their
                // detail is kept out of the response body.
                let body = match &error {
                    VerifyError::InvalidSecret(_) => {
                        tracing::error!(%error, "webhook verification is misconfigured");
                        "webhook verification is misconfigured".to_owned()
                    }
                    VerifyError::ReplayStore(_) => {
                        tracing::warn!(%error, "webhook refused: replay check unavailable");
                        "replay check unavailable, retry later".to_owned()
                    }
                    _ => error.to_string(),
                };
                (status, body).into_response()
            }
            Self::Body(rejection) => rejection.into_response(),
            Self::Payload(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
        }
    }
}

impl<S, T> FromRequest<S> for VerifiedWebhook<T>
where
    Verifier: FromRef<S>,
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = WebhookRejection;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Verifier::from_ref(state);
        let headers = request.headers().clone();
        let body = Bytes::from_request(request, state).await?;
        let verified = verifier.verify(&headers, &body).await?;
        let payload = serde_json::from_slice(&body).map_err(WebhookRejection::Payload)?;
        let event_type = serde_json::from_slice::<EnvelopeHead>(&body)
            .ok()
            .map(|head| head.event_type);
        let unsigned_event_header = headers
            .get(EVENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Self {
            verified,
            event_type,
            unsigned_event_header,
            payload,
            trace_context: TraceContext::from_headers(&headers),
        })
    }
}

/// The parts of an envelope that make it one; `data` is skipped, not parsed.
#[derive(serde::Deserialize)]
struct EnvelopeHead {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(rename = "timestamp")]
    _timestamp: String,
    #[serde(rename = "data")]
    _data: serde::de::IgnoredAny,
}
