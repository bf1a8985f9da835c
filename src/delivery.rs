//! The tower service that sends one attempt over HTTP.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue, header};
use tower::Service;

use crate::{
    job::WebhookJob,
    outcome::{AttemptResult, TransportErrorKind, parse_retry_after},
};

/// Header carrying the event type, e.g. `order.created`.
pub const EVENT_HEADER: &str = "x-webhook-event";
/// Header carrying the 1-based attempt number.
pub const ATTEMPT_HEADER: &str = "x-webhook-attempt";
/// `User-Agent` of every attempt.
pub const USER_AGENT: &str = concat!("apalis-webhooks/", env!("CARGO_PKG_VERSION"));
/// Default cap of the response body read per attempt: 64 KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How much of a response body is kept in reports and dead letters.
pub const RESPONSE_EXCERPT_BYTES: usize = 2 * 1024;

/// One attempt on its way through the delivery stack.
///
/// Layers between the worker and [`HttpDelivery`] add headers (the signer does) or answer
/// without sending (a refused request).
#[derive(Debug, Clone)]
pub struct DeliveryRequest {
    /// The job being attempted.
    pub job: Arc<WebhookJob>,
    /// Headers added by layers, sent after the job's own.
    pub headers: HeaderMap,
}

impl DeliveryRequest {
    /// A request for `job` with no extra headers yet.
    pub fn new(job: Arc<WebhookJob>) -> Self {
        Self {
            job,
            headers: HeaderMap::new(),
        }
    }
}

/// Sends a [`DeliveryRequest`] as an HTTP POST and reports what happened.
///
/// Never fails: transport problems are an [`AttemptResult::Transport`]. Redirects are not
/// followed; the response body is read up to a cap and within the attempt timeout, so a
/// receiver that trickles or floods cannot hold the worker longer or make it buffer more.
#[derive(Debug, Clone)]
pub struct HttpDelivery {
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl HttpDelivery {
    /// A delivery service with a pooled client: rustls, HTTP/1.1 and HTTP/2, no redirects,
    /// `User-Agent: apalis-webhooks/<version>`.
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()?;
        Ok(Self::with_client(client))
    }

    /// A delivery service on your own client. Keep redirects off on it: a followed redirect
    /// would send the signed payload somewhere the subscription did not name.
    pub fn with_client(client: reqwest::Client) -> Self {
        Self {
            client,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// Cap of the response body read per attempt (64 KiB by default).
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }
}

impl Service<DeliveryRequest> for HttpDelivery {
    type Response = AttemptResult;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<AttemptResult, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: DeliveryRequest) -> Self::Future {
        let client = self.client.clone();
        let cap = self.max_response_bytes;
        Box::pin(async move { Ok(send(client, request, cap).await) })
    }
}

async fn send(client: reqwest::Client, request: DeliveryRequest, cap: usize) -> AttemptResult {
    let DeliveryRequest { job, headers } = request;
    let mut builder = client
        .post(job.url())
        .timeout(job.policy().timeout())
        .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(EVENT_HEADER, job.event_type())
        .header(ATTEMPT_HEADER, job.attempt());
    for (name, value) in job.headers() {
        builder = builder.header(name, value);
    }
    let builder = builder.headers(headers).body(job.body.clone());

    let started = Instant::now();
    let mut response = match builder.send().await {
        Ok(response) => response,
        Err(error) => return transport_error(&error, started),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));

    // Read at most `cap` bytes. A failure after the status line (a trickle hitting the
    // timeout, a reset) does not change what the receiver answered.
    let mut body = Vec::new();
    while body.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(RESPONSE_EXCERPT_BYTES);
    AttemptResult::Response {
        status,
        retry_after,
        body_excerpt: String::from_utf8_lossy(&body).into_owned(),
        duration: started.elapsed(),
    }
}

fn transport_error(error: &reqwest::Error, started: Instant) -> AttemptResult {
    let kind = if error.is_timeout() {
        TransportErrorKind::Timeout
    } else if error.is_connect() {
        TransportErrorKind::Connect
    } else {
        TransportErrorKind::Other
    };
    // The innermost cause says most ("connection refused"); the URL is left out of the message
    // because it may carry tokens in its query.
    let mut message = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(cause) = source {
        message = cause.to_string();
        source = cause.source();
    }
    if let Some(url) = error.url() {
        message = message.replace(url.as_str(), "<url>");
    }
    AttemptResult::Transport {
        kind,
        message,
        duration: started.elapsed(),
    }
}
