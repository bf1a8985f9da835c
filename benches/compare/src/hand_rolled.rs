//! What a team writes without this crate: an apalis job carrying the URL, body and secret, whose
//! handler signs it with Standard Webhooks and POSTs it with the headers apalis-webhooks sends,
//! under a timeout, retried by apalis's own retry layer. Same storage settings as bare apalis.
//!
//! It has none of what retries, dead letters and history are made of in apalis-webhooks (its
//! retries are in-process, a stored attempt record, status classification, egress policy,
//! breaker, rate limiter, in-flight cap): it is the cost of "sign, send, retry" done by hand.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::layers::retry::{
    HasherRng, RetryPolicy,
    backoff::{ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff},
};
use apalis::prelude::*;
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The job: everything the handler needs to sign and send one event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandRolledJob {
    pub id: String,
    pub event: String,
    pub url: String,
    pub body: String,
    /// `whsec_` + base64 of the key, as Standard Webhooks hands it out.
    pub secret: String,
}

/// The same attempt timeout as apalis-webhooks' default policy.
const TIMEOUT: Duration = Duration::from_secs(15);
/// Eight attempts in all, like apalis-webhooks' default policy.
const RETRIES: usize = 7;

/// The HTTP client: one per worker, with a user agent like ours, no redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent("hand-rolled-webhooks/0.1")
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client")
}

/// apalis's retry with an exponential backoff from 1 s (in-process: the task is held and
/// re-run by the worker, not re-queued).
pub fn retry_policy() -> apalis::layers::retry::BackoffRetryPolicy<ExponentialBackoff> {
    let backoff = ExponentialBackoffMaker::new(
        Duration::from_secs(1),
        Duration::from_secs(3600),
        0.5,
        HasherRng::default(),
    )
    .expect("valid backoff")
    .make_backoff();
    RetryPolicy::retries(RETRIES).with_backoff(backoff)
}

/// A job for event `seq` to `url`, signed with `secret` (`whsec_…`).
pub fn job(url: &str, secret: &str, seq: u64) -> HandRolledJob {
    HandRolledJob {
        id: format!("msg_{}", ulid::Ulid::new()),
        event: "bench.event".to_owned(),
        url: url.to_owned(),
        body: crate::receiver::body(seq),
        secret: secret.to_owned(),
    }
}

/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn sign(secret: &str, id: &str, timestamp: u64, body: &str) -> Result<String, BoxDynError> {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(secret))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The handler: sign with a fresh timestamp, send, and fail on anything but 2xx (apalis retries).
pub async fn deliver(job: HandRolledJob, client: Data<reqwest::Client>, attempt: Attempt) -> Result<(), BoxDynError> {
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let signature = sign(&job.secret, &job.id, timestamp, &job.body)?;
    let response = client
        .post(&job.url)
        .timeout(TIMEOUT)
        .header("content-type", "application/json")
        .header("webhook-id", &job.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("x-webhook-event", &job.event)
        // apalis counts the attempt before the handler runs; `max(1)` in case it did not.
        .header("x-webhook-attempt", attempt.current().max(1).to_string())
        .body(job.body)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use apalis_webhooks::{Secret, signing::SignatureScheme};

    /// The hand-rolled signature is the one apalis-webhooks' Standard scheme computes.
    #[test]
    fn signs_like_the_standard_scheme() {
        let secret = Secret::generate();
        let text = secret.expose_text().unwrap().to_owned();
        let ours = super::sign(&text, "msg_1", 1_700_000_000, "{\"a\":1}").unwrap();
        let headers = SignatureScheme::Standard
            .sign("msg_1", 1_700_000_000i64, b"{\"a\":1}", std::slice::from_ref(&secret))
            .unwrap();
        let theirs = headers
            .into_iter()
            .find(|(name, _)| name == "webhook-signature")
            .map(|(_, value)| value)
            .unwrap();
        assert_eq!(ours, theirs);
    }
}
