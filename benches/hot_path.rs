//! What apalis-webhooks adds per delivery, without the network: signing, classification, the
//! dispatch-side job build, and the default layer stack (breaker, rate limiter, signer) around a
//! stub that answers 204 at once.
//!
//! ```text
//! cargo bench --bench hot_path
//! ```

use std::{
    convert::Infallible,
    future::{Ready, ready},
    hint::black_box,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    delivery::DeliveryRequest,
    layers::{CircuitBreakerLayer, Limit, RateLimitLayer},
    outcome::AttemptResult,
    policy::DeliveryPolicy,
    signing::{SignatureScheme, SigningLayer},
};
use tower::{Service, ServiceBuilder, ServiceExt};

const ITERATIONS: u32 = 200_000;

/// Answers 204 without sending anything.
#[derive(Clone)]
struct Stub;

impl Service<DeliveryRequest> for Stub {
    type Response = AttemptResult;
    type Error = Infallible;
    type Future = Ready<Result<AttemptResult, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: DeliveryRequest) -> Self::Future {
        black_box(request);
        ready(Ok(AttemptResult::Response {
            status: 204,
            retry_after: None,
            body_excerpt: String::new(),
            duration: Duration::ZERO,
        }))
    }
}

fn report(what: &str, started: Instant) {
    let per_op = started.elapsed() / ITERATIONS;
    println!("{what:<58} {:>8.2} µs", per_op.as_nanos() as f64 / 1000.0);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let payload = serde_json::json!({ "order": 42, "pad": "x".repeat(1000) });
    let subscription = WebhookSubscription::new("https://hooks.example.com/in", Secret::generate());
    let job = Arc::new(subscription.job("order.created", &payload).unwrap());
    let secrets = [Secret::generate()];

    let started = Instant::now();
    for _ in 0..ITERATIONS {
        black_box(
            SignatureScheme::Standard
                .sign("msg_1", 1_700_000_000, black_box(job.body()), &secrets)
                .unwrap(),
        );
    }
    report("sign 1 KiB (Standard Webhooks, one secret)", started);

    let v1a = [Secret::generate_v1a()];
    let started = Instant::now();
    for _ in 0..ITERATIONS {
        black_box(
            SignatureScheme::Standard
                .sign("msg_1", 1_700_000_000, black_box(job.body()), &v1a)
                .unwrap(),
        );
    }
    report("sign 1 KiB v1a (ed25519)", started);

    // The receiver's side: a fresh timestamp, so the default tolerance accepts it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (what, signing_key, verifying_key) in [
        (
            "verify 1 KiB v1 (Verifier, no replay store)",
            secrets[0].clone(),
            secrets[0].clone(),
        ),
        (
            "verify 1 KiB v1a by whpk_ (Verifier, no replay store)",
            v1a[0].clone(),
            Secret::new(v1a[0].v1a_public_key().unwrap()),
        ),
    ] {
        let headers: http::HeaderMap = SignatureScheme::Standard
            .sign("msg_1", now, job.body(), &[signing_key])
            .unwrap()
            .into_iter()
            .map(|(name, value)| (name.parse::<http::HeaderName>().unwrap(), value.parse().unwrap()))
            .collect();
        let verifier = apalis_webhooks::verify::Verifier::new(verifying_key).unwrap();
        let started = Instant::now();
        for _ in 0..ITERATIONS {
            black_box(verifier.verify(&headers, black_box(job.body())).await.unwrap());
        }
        report(what, started);
    }

    let policy = DeliveryPolicy::default();
    let results = [204u16, 429, 503, 410, 400].map(|status| AttemptResult::Response {
        status,
        retry_after: None,
        body_excerpt: String::new(),
        duration: Duration::ZERO,
    });
    let started = Instant::now();
    for i in 0..ITERATIONS {
        black_box(results[i as usize % results.len()].classify(black_box(&policy)));
    }
    report("classify an outcome", started);

    let started = Instant::now();
    for _ in 0..ITERATIONS {
        black_box(subscription.job("order.created", black_box(&payload)).unwrap());
    }
    report("build a 1 KiB job at dispatch (validate, serialize)", started);

    let mut signing = ServiceBuilder::new().layer(SigningLayer::new()).service(Stub);
    let started = Instant::now();
    for _ in 0..ITERATIONS {
        let service = signing.ready().await.unwrap();
        black_box(service.call(DeliveryRequest::new(Arc::clone(&job))).await.unwrap());
    }
    report("signing layer around a stub", started);

    let mut stack = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::default())
        .layer(RateLimitLayer::per_endpoint(Limit::per_second(1_000_000_000)))
        .layer(SigningLayer::new())
        .service(Stub);
    let started = Instant::now();
    for _ in 0..ITERATIONS {
        let service = stack.ready().await.unwrap();
        black_box(service.call(DeliveryRequest::new(Arc::clone(&job))).await.unwrap());
    }
    report("default layers (breaker, rate limiter, signing) around a stub", started);
}
