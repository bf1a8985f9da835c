//! apalis-webhooks as the README installs it: `WebhookWorker::new(sink).service()`, that is the
//! in-flight cap and signing around the HTTP delivery (loopback allowed: the receiver is on
//! 127.0.0.1). A circuit breaker and a rate limiter in front, set not to bite, measured the same
//! CPU per delivery here (58–62 µs in memory).

use apalis_webhooks::{
    delivery::HttpDelivery, layers::InFlightService, signing::SigningService, ssrf::EgressPolicy,
    worker::WebhookService,
};

/// The worker's default service, for a worker whose retries go to `sink`.
pub fn service<B: Clone + apalis_webhooks::WebhookSink<K>, K>(
    sink: B,
) -> WebhookService<InFlightService<SigningService<HttpDelivery>>, B, K> {
    apalis_webhooks::WebhookWorker::new(sink)
        .egress(EgressPolicy::new().allow_loopback())
        .service()
        .expect("HTTP client")
}
