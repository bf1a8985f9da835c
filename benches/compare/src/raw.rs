//! The ceiling: a reqwest loop posting the same signed 1 KiB bodies at the same concurrency,
//! no queue at all.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use apalis_webhooks::{Secret, signing::SignatureScheme};

use crate::{CONCURRENCY, receiver::body};

pub async fn run(url: &str, events: u64, secret: &Secret) {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, next, url, secret) = (client.clone(), Arc::clone(&next), url.to_owned(), secret.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= events {
                    return;
                }
                let body = body(seq);
                let id = format!("msg_{seq}");
                let now = (crate::receiver::now_us() / 1_000_000) as i64;
                let headers = SignatureScheme::Standard
                    .sign(&id, now, body.as_bytes(), std::slice::from_ref(&secret))
                    .unwrap();
                let mut request = client.post(&url).header("content-type", "application/json");
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let _ = request.body(body).send().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
