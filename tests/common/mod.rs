//! Shared test parts: a scripted HTTP receiver on 127.0.0.1, a SQLite file, a running worker.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use apalis::prelude::*;
use apalis_webhooks::{
    WebhookJob, WebhookWorker,
    delivery::{DeliveryRequest, HttpDelivery},
    outcome::{AttemptResult, DeferReason},
    report::{DeadLetter, DeliveryEvent},
    sqlite,
    ssrf::EgressPolicy,
};
use axum::{Router, body::Bytes, extract::State, http::HeaderMap, response::IntoResponse, routing::post};
use tokio::sync::{mpsc, oneshot};

/// Upper bound for waiting on an event: a safety net so a broken build fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: SystemTime,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// What the receiver answers to the n-th request (0-based).
pub type Script = Arc<dyn Fn(usize, &Received) -> (u16, Vec<(&'static str, String)>) + Send + Sync>;

#[derive(Clone)]
struct ReceiverState {
    script: Script,
    count: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<Received>,
}

/// An HTTP receiver on 127.0.0.1 (port 0) that answers by script and reports every request.
pub struct Receiver {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    pub async fn start(
        script: impl Fn(usize, &Received) -> (u16, Vec<(&'static str, String)>) + Send + Sync + 'static,
    ) -> Self {
        let (tx, requests) = mpsc::unbounded_channel();
        let state = ReceiverState {
            script: Arc::new(script),
            count: Arc::default(),
            tx,
        };
        let app = Router::new().route("/hook", post(handle)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, requests }
    }

    /// Always answers `status`.
    pub async fn answering(status: u16) -> Self {
        Self::start(move |_, _| (status, vec![])).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.requests.recv())
            .await
            .expect("no request in time")
            .unwrap()
    }
}

async fn handle(State(state): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let received = Received {
        headers,
        body,
        at: SystemTime::now(),
    };
    let n = state.count.fetch_add(1, Ordering::SeqCst);
    let (status, headers) = (state.script)(n, &received);
    let _ = state.tx.send(received);
    let mut response = axum::http::Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(name, value);
    }
    response.body(axum::body::Body::from("receiver says hi")).unwrap()
}

/// A SQLite database in a fresh file, migrated.
pub struct Db {
    pub dir: tempfile::TempDir,
    pub pool: sqlite::SqlitePool,
}

impl Db {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pool = Self::open(&dir).await;
        Self { dir, pool }
    }

    async fn open(dir: &tempfile::TempDir) -> sqlite::SqlitePool {
        sqlite::connect(&format!("sqlite://{}", dir.path().join("jobs.db").display()))
            .await
            .unwrap()
    }

    /// A second, independent connection pool on the same file (a "restarted process").
    pub async fn reopen(&self) -> sqlite::SqlitePool {
        Self::open(&self.dir).await
    }

    pub fn storage(&self) -> sqlite::SqliteStorage<WebhookJob> {
        sqlite::storage(&self.pool)
    }

    /// Every webhook task row, oldest first.
    pub async fn rows(&self) -> Vec<Row> {
        use sqlx::Row as _;
        sqlx::query("SELECT status, run_at, job, last_result FROM Jobs WHERE job_type = ? ORDER BY rowid")
            .bind(apalis_webhooks::backend::QUEUE)
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| Row {
                status: r.get("status"),
                run_at: r.get("run_at"),
                job: serde_json::from_slice(&r.get::<Vec<u8>, _>("job")).unwrap(),
                last_result: r.get("last_result"),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub status: String,
    pub run_at: i64,
    pub job: serde_json::Value,
    pub last_result: Option<String>,
}

/// A delivery event, owned.
#[derive(Debug, Clone)]
pub enum Seen {
    Delivered {
        webhook_id: String,
        attempt: u32,
        status: u16,
    },
    RetryScheduled {
        webhook_id: String,
        attempt: u32,
        status: Option<u16>,
        error: Option<String>,
        next_attempt_at: u64,
    },
    Gone {
        webhook_id: String,
    },
    Dead {
        webhook_id: String,
        dead_letter: DeadLetter,
    },
    Deferred {
        webhook_id: String,
        attempt: u32,
        deferrals: u32,
        reason: DeferReason,
    },
    Disabled {
        webhook_id: String,
        endpoint_id: String,
        reason: String,
    },
}

impl Seen {
    pub fn webhook_id(&self) -> &str {
        match self {
            Seen::Delivered { webhook_id, .. }
            | Seen::RetryScheduled { webhook_id, .. }
            | Seen::Gone { webhook_id }
            | Seen::Dead { webhook_id, .. }
            | Seen::Deferred { webhook_id, .. }
            | Seen::Disabled { webhook_id, .. } => webhook_id,
        }
    }

    fn from_event(event: &DeliveryEvent<'_>) -> Self {
        match event {
            DeliveryEvent::Delivered { job, result } => Seen::Delivered {
                webhook_id: job.webhook_id().to_string(),
                attempt: job.attempt(),
                status: result.status().unwrap(),
            },
            DeliveryEvent::RetryScheduled {
                job,
                result,
                next_attempt_at,
            } => Seen::RetryScheduled {
                webhook_id: job.webhook_id().to_string(),
                attempt: job.attempt(),
                status: result.status(),
                error: result.error(),
                next_attempt_at: *next_attempt_at,
            },
            DeliveryEvent::EndpointGone { job } => Seen::Gone {
                webhook_id: job.webhook_id().to_string(),
            },
            DeliveryEvent::DeadLettered { job, dead_letter } => Seen::Dead {
                webhook_id: job.webhook_id().to_string(),
                dead_letter: (*dead_letter).clone(),
            },
            DeliveryEvent::Deferred { job, reason, .. } => Seen::Deferred {
                webhook_id: job.webhook_id().to_string(),
                attempt: job.attempt(),
                deferrals: job.deferrals(),
                reason: *reason,
            },
            DeliveryEvent::EndpointDisabled {
                job,
                endpoint_id,
                reason,
            } => Seen::Disabled {
                webhook_id: job.webhook_id().to_string(),
                endpoint_id: endpoint_id.to_string(),
                reason: reason.to_string(),
            },
            other => panic!("unexpected event {other:?}"),
        }
    }
}

pub type Builder = WebhookWorker<sqlite::SqliteStorage<WebhookJob>>;

/// Runs a worker named `$name` with `$service` on `$storage` until `$stopped` fires. (A macro:
/// the bounds `WorkerBuilder::build` puts on the service are not worth spelling out.)
macro_rules! run_sqlite_worker {
    ($name:expr, $storage:expr, $service:expr, $stopped:expr) => {{
        let worker = WorkerBuilder::new($name)
            .backend(sqlite::worker_backend($storage))
            .concurrency(8)
            .build($service);
        tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = $stopped.await;
                    Ok::<_, WorkerError>(())
                })
                .await
                .unwrap();
        })
    }};
}

/// A webhook worker running on a SQLite pool until stopped.
pub struct RunningWorker {
    pub events: mpsc::UnboundedReceiver<Seen>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    pub fn start(pool: &sqlite::SqlitePool, name: &str) -> Self {
        Self::start_with(pool, name, |builder| builder)
    }

    /// As `start`, with `configure` applied to the builder (after the event recorder).
    pub fn start_with(pool: &sqlite::SqlitePool, name: &str, configure: impl FnOnce(Builder) -> Builder) -> Self {
        let storage = sqlite::storage(pool);
        Self::spawn(storage.clone(), configure, |builder, stopped| {
            run_sqlite_worker!(name, storage, builder.service().unwrap(), stopped)
        })
    }

    /// As `start_with`, delivering through `layer` (which should include the signer).
    pub fn start_layered<L>(
        pool: &sqlite::SqlitePool,
        name: &str,
        configure: impl FnOnce(Builder) -> Builder,
        layer: L,
    ) -> Self
    where
        L: tower::Layer<HttpDelivery>,
        L::Service: tower::Service<DeliveryRequest, Response = AttemptResult> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<DeliveryRequest>>::Future: Send + 'static,
        <L::Service as tower::Service<DeliveryRequest>>::Error: Into<apalis_core::error::BoxDynError> + Send + 'static,
    {
        let storage = sqlite::storage(pool);
        Self::spawn(storage.clone(), configure, |builder, stopped| {
            run_sqlite_worker!(name, storage, builder.service_with(layer).unwrap(), stopped)
        })
    }

    /// A worker pushing retries into `sink`, with an event recorder and `configure` applied, run
    /// by `run` until stopped.
    pub fn spawn<S: Clone>(
        sink: S,
        configure: impl FnOnce(WebhookWorker<S>) -> WebhookWorker<S>,
        run: impl FnOnce(WebhookWorker<S>, oneshot::Receiver<()>) -> tokio::task::JoinHandle<()>,
    ) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        // Receivers in tests are on loopback, which the SSRF guard refuses unless allowed.
        let builder = WebhookWorker::new(sink)
            .egress(EgressPolicy::new().allow_loopback())
            .on_event(move |event| {
                let _ = tx.send(Seen::from_event(event));
            });
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = run(configure(builder), stopped);
        Self {
            events,
            stop: Some(stop),
            handle,
        }
    }

    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("no delivery event in time")
            .unwrap()
    }

    /// The next event about delivery `webhook_id`, skipping events about others.
    pub async fn next_for(&mut self, webhook_id: &str) -> Seen {
        loop {
            let seen = self.next().await;
            if seen.webhook_id() == webhook_id {
                return seen;
            }
        }
    }

    /// Stops the worker gracefully and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("worker did not stop")
            .unwrap();
    }
}
