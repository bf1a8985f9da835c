//! Enqueues N webhooks, then works until every delivery is delivered or dead-lettered: for
//! demos, load and chaos runs.
//!
//! ```text
//! cargo run --release --example dispatch -- --backend sqlite|postgres|redis|memory \
//!     --database-url URL --url TARGET --secret SECRET --count N \
//!     [--scheme standard|stripe|github] [--max-attempts K] [--retry-base-ms MS] [--concurrency C] \
//!     [--rate-limit PER_SECOND [--shared-limits REDIS_URL]]
//! ```
//!
//! `--rate-limit` puts a `RateLimitLayer` of that many deliveries a second per endpoint in front
//! of the signer; `--shared-limits` keeps its budget in Redis, shared by every process given the
//! same URL and `DISPATCH_LIMITS_PREFIX` (by default `<queue>:limits`).
//!
//! Payloads are `{"seq": i}`. Progress goes to stderr; the last line on stdout is
//! `{"enqueued":N,"delivered":D,"dead_lettered":X,"elapsed_s":F,"per_sec":F}`. Run it again
//! with `--count 0` and the same `--database-url` to drain what a killed run left behind (a
//! killed worker's deliveries come back after its heartbeats stop: about 30 s on Postgres and
//! Redis).
//!
//! The process rides through an outage of its database: the worker waits for it, the progress
//! line says `backend unavailable`, and a dispatch that fails is tried again (the same job, so
//! an ambiguous failure stores it once on Postgres).

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_webhooks::{
    WebhookSink, WebhookSubscription, WebhookWorker,
    backend::{Restarted, memory, postgres, redis, sqlite, worker_name},
    layers::{Limit, RateLimitLayer},
    report::DeliveryEvent,
    retry::RetrySchedule,
    signing::{SignatureScheme, SigningLayer},
    ssrf::EgressPolicy,
    store::WebhookStore,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tower::ServiceBuilder;

const USAGE: &str = "usage: dispatch --backend sqlite|postgres|redis|memory --database-url URL --url TARGET \
                     --secret SECRET --count N [--scheme standard|stripe|github] [--max-attempts K] \
                     [--retry-base-ms MS] [--concurrency C] [--rate-limit PER_SECOND [--shared-limits REDIS_URL]]";

struct Args {
    backend: String,
    database_url: String,
    url: String,
    secret: String,
    count: u64,
    scheme: SignatureScheme,
    max_attempts: u32,
    retry_base: Duration,
    concurrency: usize,
    rate_limit: Option<u32>,
    shared_limits: Option<String>,
}

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut args = Self {
            backend: String::new(),
            database_url: String::new(),
            url: String::new(),
            secret: String::new(),
            count: 0,
            scheme: SignatureScheme::Standard,
            max_attempts: 8,
            retry_base: Duration::from_secs(1),
            concurrency: 64,
            rate_limit: None,
            shared_limits: None,
        };
        let mut count = None;
        while let Some(flag) = argv.next() {
            let value = argv.next().ok_or(format!("{flag} needs a value"))?;
            let number = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: not a number: {v}"));
            match flag.as_str() {
                "--backend" => args.backend = value,
                "--database-url" => args.database_url = value,
                "--url" => args.url = value,
                "--secret" => args.secret = value,
                "--count" => count = Some(number(&value)?),
                "--scheme" => {
                    args.scheme = match value.as_str() {
                        "standard" => SignatureScheme::Standard,
                        "stripe" => SignatureScheme::stripe(),
                        "github" => SignatureScheme::github(),
                        other => return Err(format!("--scheme: unknown scheme {other}")),
                    }
                }
                "--max-attempts" => {
                    args.max_attempts = number(&value)?.try_into().map_err(|_| "--max-attempts: too big")?
                }
                "--retry-base-ms" => args.retry_base = Duration::from_millis(number(&value)?),
                "--concurrency" => args.concurrency = number(&value)?.max(1) as usize,
                "--rate-limit" => {
                    args.rate_limit = Some(number(&value)?.try_into().map_err(|_| "--rate-limit: too big")?)
                }
                "--shared-limits" => args.shared_limits = Some(value),
                other => return Err(format!("unknown option {other}")),
            }
        }
        args.count = count.ok_or("--count is required")?;
        for (name, value) in [
            ("--backend", &args.backend),
            ("--url", &args.url),
            ("--secret", &args.secret),
        ] {
            if value.is_empty() {
                return Err(format!("{name} is required"));
            }
        }
        if args.database_url.is_empty() && args.backend != "memory" {
            return Err("--database-url is required".into());
        }
        Ok(args)
    }

    fn subscription(&self) -> WebhookSubscription {
        WebhookSubscription::new(&self.url, self.secret.as_str())
            .scheme(self.scheme.clone())
            .max_attempts(self.max_attempts)
            .retry_schedule(RetrySchedule::exponential(
                self.retry_base,
                2.0,
                Duration::from_secs(3600),
            ))
    }
}

/// Delivery outcomes of this run.
#[derive(Default)]
struct Counts {
    delivered: AtomicU64,
    dead: AtomicU64,
}

#[tokio::main]
async fn main() -> ExitCode {
    // RUST_LOG=apalis_webhooks=debug,apalis=info to watch deliveries and the worker.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dispatch: {error}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn run(args: Args) -> Result<(), Error> {
    let concurrency = args.concurrency;
    // Tests that run several of these at once give each its own queue.
    let queue = std::env::var("DISPATCH_QUEUE").unwrap_or_else(|_| apalis_webhooks::backend::QUEUE.to_owned());
    let rate_limit = match (args.rate_limit, &args.shared_limits) {
        (None, _) => None,
        (Some(rate), None) => Some(RateLimitLayer::per_endpoint(Limit::per_second(rate))),
        (Some(rate), Some(url)) => {
            let prefix = std::env::var("DISPATCH_LIMITS_PREFIX").unwrap_or_else(|_| format!("{queue}:limits"));
            Some(RateLimitLayer::per_endpoint(Limit::per_second(rate)).shared(redis::connect(url).await?, prefix))
        }
    };
    let layers = ServiceBuilder::new()
        .option_layer(rate_limit)
        .layer(SigningLayer::new());
    match args.backend.as_str() {
        "sqlite" => {
            let pool = sqlite::connect(&args.database_url).await?;
            let storage = || sqlite::SqliteStorage::new(&pool).with_config(sqlite::config().queue(&queue));
            let store = WebhookStore::sqlite(&storage());
            work(&args, storage(), Some(store), |builder, stop| {
                let (service, storage) = (builder.service_with(layers.clone()).expect("HTTP client"), storage());
                // apalis-sqlite stops its worker on a database error: the Monitor starts it
                // again, after a capped backoff.
                let monitor = Monitor::new()
                    .register(move |restarts| {
                        WorkerBuilder::new(worker_name("dispatch"))
                            .backend(Restarted::new(sqlite::worker_backend(storage.clone()), restarts))
                            .concurrency(concurrency)
                            .build(service.clone())
                    })
                    .should_restart(|_, _| true);
                tokio::spawn(async move { monitor.run_with_signal(signal(stop)).await.map_err(Error::from) })
            })
            .await
        }
        "postgres" => {
            let pool = postgres::connect(&args.database_url).await?;
            let storage = postgres::PostgresStorage::new(&pool).with_config(postgres::config().queue(&queue));
            let sink = postgres::PostgresSink::new(&storage);
            work(
                &args,
                sink.clone(),
                Some(WebhookStore::postgres(&sink)),
                |builder, stop| {
                    let worker = WorkerBuilder::new(worker_name("dispatch"))
                        .backend(postgres::worker_backend_with(storage, concurrency))
                        .concurrency(concurrency)
                        .build(builder.service_with(layers.clone()).expect("HTTP client"));
                    tokio::spawn(async move { worker.run_until(until(stop)).await.map_err(Error::from) })
                },
            )
            .await
        }
        "redis" => {
            let conn = redis::connect(&args.database_url).await?;
            let storage = redis::RedisStorage::new(conn).with_config(redis::config().queue(&queue));
            let sink = redis::RedisSink::new(&storage);
            work(
                &args,
                sink.clone(),
                Some(WebhookStore::redis(&sink)),
                |builder, stop| {
                    let service = builder.service_with(layers.clone()).expect("HTTP client");
                    let worker = WorkerBuilder::new(worker_name("dispatch"))
                        .backend(redis::worker_backend_with(storage, concurrency))
                        .concurrency(concurrency)
                        .build(service);
                    tokio::spawn(async move { worker.run_until(until(stop)).await.map_err(Error::from) })
                },
            )
            .await
        }
        "memory" => {
            let (storage, sink) = memory::storage();
            work(&args, sink, None, |builder, stop| {
                let worker = WorkerBuilder::new(worker_name("dispatch"))
                    .backend(storage)
                    .concurrency(concurrency)
                    .build(builder.service_with(layers.clone()).expect("HTTP client"));
                tokio::spawn(async move { worker.run_until(until(stop)).await.map_err(Error::from) })
            })
            .await
        }
        other => Err(format!("unknown backend {other}\n{USAGE}").into()),
    }
}

/// Starts the worker, enqueues, waits until nothing is outstanding, stops, reports.
async fn work<S, K>(
    args: &Args,
    sink: S,
    store: Option<WebhookStore>,
    start: impl FnOnce(WebhookWorker<S>, oneshot::Receiver<()>) -> JoinHandle<Result<(), Error>>,
) -> Result<(), Error>
where
    S: WebhookSink<K> + Clone + Send + Sync + 'static,
{
    let started = Instant::now();
    let counts = Arc::new(Counts::default());
    let recorder = Arc::clone(&counts);
    // The receiver runs on this machine: allow loopback past the SSRF guard.
    let builder = WebhookWorker::new(sink.clone())
        .egress(EgressPolicy::new().allow_loopback())
        .on_event(move |event| match event {
            DeliveryEvent::Delivered { .. } => {
                recorder.delivered.fetch_add(1, Ordering::Relaxed);
            }
            DeliveryEvent::DeadLettered { .. } => {
                recorder.dead.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        });
    let (stop, stopped) = oneshot::channel();
    let worker = start(builder, stopped);

    let enqueued = enqueue(args, &sink).await?;
    eprintln!("enqueued {enqueued} in {:.1} s", started.elapsed().as_secs_f64());
    let mut last_report = Instant::now();
    loop {
        let delivered = counts.delivered.load(Ordering::Relaxed);
        let dead = counts.dead.load(Ordering::Relaxed);
        let outstanding = match &store {
            Some(store) => match store.outstanding().await {
                Ok(outstanding) => outstanding,
                Err(error) => {
                    if last_report.elapsed() >= Duration::from_secs(1) {
                        eprintln!(
                            "enqueued {enqueued}  delivered {delivered}  dead {dead}  backend unavailable: {error}"
                        );
                        last_report = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            None => enqueued.saturating_sub(delivered + dead),
        };
        if last_report.elapsed() >= Duration::from_secs(1) || outstanding == 0 {
            eprintln!("enqueued {enqueued}  delivered {delivered}  dead {dead}  outstanding {outstanding}");
            last_report = Instant::now();
        }
        if outstanding == 0 {
            break;
        }
        if worker.is_finished() {
            return Err(worker.await?.err().unwrap_or_else(|| "worker stopped".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    worker.await??;

    let elapsed = started.elapsed().as_secs_f64();
    let delivered = counts.delivered.load(Ordering::Relaxed);
    let dead = counts.dead.load(Ordering::Relaxed);
    let per_sec = (delivered + dead) as f64 / elapsed.max(f64::EPSILON);
    println!(
        "{}",
        serde_json::json!({
            "enqueued": enqueued,
            "delivered": delivered,
            "dead_lettered": dead,
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "per_sec": per_sec.round(),
        })
    );
    Ok(())
}

/// Dispatches `{"seq": i}` for every i below `--count`, from several tasks at once (SQLite
/// takes one writer at a time, so more would only queue for its lock).
async fn enqueue<S, K>(args: &Args, sink: &S) -> Result<u64, Error>
where
    S: WebhookSink<K> + Clone + Send + Sync + 'static,
{
    let subscription = Arc::new(args.subscription());
    let mut tasks = tokio::task::JoinSet::new();
    let lanes = if args.backend == "sqlite" { 4 } else { 64 };
    for lane in 0..lanes {
        let (subscription, mut sink, count) = (Arc::clone(&subscription), sink.clone(), args.count);
        tasks.spawn(async move {
            for seq in (lane..count).step_by(lanes as usize) {
                let job = subscription.job("load.test", &serde_json::json!({ "seq": seq }))?;
                // The database may be away for a while: try the same job again until it is
                // stored.
                let mut wait = Duration::from_millis(100);
                while let Err(error) = sink.push_job(job.clone(), None).await {
                    eprintln!("dispatch of seq {seq} failed, trying again: {error}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(args.count)
}

/// Resolves when `stop` fires, for `Worker::run_until`.
async fn until(stop: oneshot::Receiver<()>) -> Result<(), WorkerError> {
    let _ = stop.await;
    Ok(())
}

/// Resolves when `stop` fires, for `Monitor::run_with_signal`.
async fn signal(stop: oneshot::Receiver<()>) -> std::io::Result<()> {
    let _ = stop.await;
    Ok(())
}
