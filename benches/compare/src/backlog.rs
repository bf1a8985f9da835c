//! A backlog drained: N deliveries enqueued with no worker running, then one apalis-webhooks
//! worker (64 slots, default layers) started; reports deliveries per second and the process's
//! resident memory while the worker holds the backlog.

use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookSink, WebhookSubscription,
    backend::{postgres, redis, sqlite, worker_name},
};

use crate::{CONCURRENCY, Error, dispatch, receiver::Receiver, rss_mib, stop_signal, webhooks};

/// Enqueues `events` into `sink` from 8 tasks.
async fn fill<S, K>(sink: S, subscription: &WebhookSubscription, events: u64)
where
    S: WebhookSink<K> + Clone + Send + 'static,
{
    let lanes = 8;
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (mut sink, subscription) = (sink.clone(), subscription.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = lane;
            while seq < events {
                dispatch(&subscription, &mut sink, seq).await;
                seq += lanes;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Drains: waits for `events` arrivals while sampling RSS; returns (deliveries/s, peak MiB).
async fn drain(receiver: &mut Receiver, events: u64) -> (f64, f64) {
    let before = receiver.arrived();
    let started = Instant::now();
    let mut peak = rss_mib();
    while receiver.arrived() < before + events as usize {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mib());
    }
    let _ = receiver.take_latencies();
    (events as f64 / started.elapsed().as_secs_f64(), peak)
}

pub async fn run(backend: &str, receiver: &mut Receiver, events: u64) -> Result<Option<(f64, f64, f64)>, Error> {
    let subscription = WebhookSubscription::new(receiver.url.clone(), Secret::generate());
    let queue = format!("bench-backlog-{}", ulid::Ulid::new());
    let baseline = rss_mib();
    let (stop, until) = stop_signal();
    let (rate, peak) = match backend {
        "sqlite" => {
            let dir = tempfile::tempdir()?;
            let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("backlog.db").display())).await?;
            let storage = apalis_sqlite::SqliteStorage::<apalis_webhooks::WebhookJob>::new(&pool)
                .with_config(sqlite::config().queue(&queue));
            fill(storage.clone(), &subscription, events).await;
            let worker = WorkerBuilder::new(worker_name("backlog"))
                .backend(sqlite::worker_backend(storage.clone()))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(storage));
            let handle = tokio::spawn(worker.run_until(until));
            let result = drain(receiver, events).await;
            let _ = stop.send(());
            handle.await??;
            result
        }
        "postgres" => {
            let Ok(url) = std::env::var("TEST_POSTGRES_URL") else {
                return Ok(None);
            };
            let pool = postgres::connect(&url).await?;
            let storage = apalis_postgres::PostgresStorage::<apalis_webhooks::WebhookJob>::new(&pool)
                .with_config(postgres::config().queue(&queue));
            let sink = postgres::PostgresSink::new(&storage);
            fill(sink.clone(), &subscription, events).await;
            let worker = WorkerBuilder::new(worker_name("backlog"))
                .backend(postgres::worker_backend_with(storage, CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(sink));
            let handle = tokio::spawn(worker.run_until(until));
            let result = drain(receiver, events).await;
            let _ = stop.send(());
            handle.await??;
            // The backlog's rows would otherwise stay in the shared database.
            crate::clear_postgres(&url).await?;
            result
        }
        "redis" => {
            let Ok(url) = std::env::var("TEST_REDIS_URL") else {
                return Ok(None);
            };
            let conn = redis::connect(&url).await?;
            let storage = apalis_redis::RedisStorage::<apalis_webhooks::WebhookJob>::new(conn)
                .with_config(redis::config().queue(&queue));
            let sink = redis::RedisSink::new(&storage);
            fill(sink.clone(), &subscription, events).await;
            let worker = WorkerBuilder::new(worker_name("backlog"))
                .backend(redis::worker_backend_with(storage, CONCURRENCY))
                .concurrency(CONCURRENCY)
                .build(webhooks::service(sink));
            let handle = tokio::spawn(worker.run_until(until));
            let result = drain(receiver, events).await;
            let _ = stop.send(());
            handle.await??;
            result
        }
        _ => return Ok(None),
    };
    Ok(Some((rate, peak, baseline)))
}
