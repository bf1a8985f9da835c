//! How fast deliveries are stored, one `dispatch` at a time against `DispatchBatch`es; nothing
//! is delivered (no worker runs). Each run uses a queue of its own and removes its rows after.
//!
//! ```sh
//! cargo run --release --example enqueue_rate -- [--backend postgres|sqlite|redis] [--count 20000] [--batch 100] [--tasks 4]
//! ```
//!
//! Postgres and Redis come from `TEST_POSTGRES_URL` / `TEST_REDIS_URL` (the local servers by
//! default); SQLite is a file in a temporary directory.

use std::time::{Duration, Instant};

use apalis_webhooks::{
    Secret, WebhookSink, WebhookSubscription,
    backend::{postgres, redis, sqlite},
    batch::DispatchBatch,
};

struct Args {
    backend: String,
    count: usize,
    batch: usize,
    tasks: usize,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        backend: "postgres".into(),
        count: 20_000,
        batch: 100,
        tasks: 4,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|_| format!("{flag}: not a number"));
        match flag.as_str() {
            "--backend" => args.backend = value.clone(),
            "--count" => args.count = number()?.max(1),
            "--batch" => args.batch = number()?.clamp(1, apalis_webhooks::batch::MAX_BATCH),
            "--tasks" => args.tasks = number()?.max(1),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Stores `count` deliveries from `tasks` concurrent tasks, `batch` at a time (1: `dispatch`).
async fn enqueue<S, K>(sink: S, count: usize, batch: usize, tasks: usize) -> Duration
where
    S: WebhookSink<K> + Clone + Send + 'static,
    K: 'static,
{
    let subscription = WebhookSubscription::new("https://customer.example/hooks", Secret::generate());
    let started = Instant::now();
    let mut running = Vec::new();
    for task in 0..tasks {
        let (mut sink, subscription) = (sink.clone(), subscription.clone());
        let mine = count / tasks + usize::from(task < count % tasks);
        running.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < mine {
                let n = batch.min(mine - sent);
                if n == 1 {
                    subscription.dispatch(&mut sink, "order.created", &sent).await.unwrap();
                } else {
                    let mut many = DispatchBatch::new();
                    for i in 0..n {
                        many.add(&subscription, "order.created", &(sent + i)).unwrap();
                    }
                    many.dispatch(&mut sink).await.unwrap();
                }
                sent += n;
            }
        }));
    }
    for task in running {
        task.await.unwrap();
    }
    started.elapsed()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse().map_err(|e| {
        format!("{e}\nusage: enqueue_rate [--backend postgres|sqlite|redis] [--count N] [--batch N] [--tasks N]")
    })?;
    let queue = format!("enqueue-rate-{}", ulid::Ulid::new());
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let mut report = Vec::new();
    for batch in [1, args.batch] {
        let took = match args.backend.as_str() {
            "postgres" => {
                let pool =
                    postgres::connect(&env("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")).await?;
                let storage = postgres::storage(&pool).with_config(postgres::config().queue(&queue));
                let took = enqueue(postgres::PostgresSink::new(&storage), args.count, batch, args.tasks).await;
                sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
                    .bind(&queue)
                    .execute(&pool)
                    .await?;
                took
            }
            "sqlite" => {
                let dir = tempfile::tempdir()?;
                let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("enqueue.db").display())).await?;
                enqueue(sqlite::storage(&pool), args.count, batch, args.tasks).await
            }
            "redis" => {
                let conn = redis::connect(&env("TEST_REDIS_URL", "redis://127.0.0.1:6379/")).await?;
                let storage = redis::storage(conn.clone()).with_config(redis::config().queue(&queue));
                let took = enqueue(redis::RedisSink::new(&storage), args.count, batch, args.tasks).await;
                // The queue's keys, found by SCAN (KEYS would block a large Redis).
                let mut conn = conn;
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{queue}*"))
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut conn)
                        .await?;
                    if !keys.is_empty() {
                        let _: () = ::redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
                took
            }
            other => return Err(format!("unknown backend {other}").into()),
        };
        let per_second = args.count as f64 / took.as_secs_f64();
        report.push((batch, per_second));
    }
    println!(
        "{} deliveries stored on {}, {} tasks:",
        args.count, args.backend, args.tasks
    );
    for (batch, per_second) in report {
        let how = if batch == 1 {
            "dispatch, one at a time".to_owned()
        } else {
            format!("DispatchBatch of {batch}")
        };
        println!("  {how:<28} {per_second:>9.0} deliveries/s");
    }
    Ok(())
}
