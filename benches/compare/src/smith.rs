//! webhooksmith 0.2 (a Postgres/SQLite webhook outbox) on the same receiver, with its own
//! tables: in a fresh schema on Postgres, in a fresh file on SQLite.
//!
//! Settings that make it comparable: `allow_insecure_urls` (the receiver is `http://127.0.0.1`;
//! a raw IP address skips its delivery-time DNS check), and on Postgres a batch of 64 (its
//! deliveries in flight: it claims a batch, sends it concurrently, waits for all of it, then
//! claims the next) on a pool of 64 connections. Its SQLite engine has a fixed batch and one
//! writer connection. Deliveries are signed (HMAC-SHA256, its own headers).

use std::sync::Arc;

use uuid::Uuid;
use webhooksmith::{SqliteEngine, WebhookEngine};

use crate::receiver::{PAD, now_us};

/// A secret webhooksmith accepts (at least 16 characters).
const SECRET: &str = "bench-secret-of-thirty-two-bytes";

/// Event `seq` as the JSON value webhooksmith stores and sends.
fn payload(seq: u64) -> serde_json::Value {
    serde_json::json!({ "seq": seq, "t": now_us(), "pad": PAD })
}

/// Either engine, for one `send` and one `run_graceful`.
#[derive(Clone)]
pub enum Smith {
    Postgres(Arc<WebhookEngine>, Uuid),
    Sqlite(Arc<SqliteEngine>, Uuid),
}

impl Smith {
    /// A Postgres engine whose tables live in a fresh schema (their names are fixed). Returns
    /// the schema to drop afterwards.
    pub async fn on_postgres(database_url: &str, url: &str) -> Result<(Self, String), crate::Error> {
        use std::str::FromStr;
        let schema = format!("ws_bench_{}", ulid::Ulid::new().to_string().to_lowercase());
        let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE SCHEMA {schema}")).await?;
        let options =
            sqlx::postgres::PgConnectOptions::from_str(database_url)?.options([("search_path", schema.as_str())]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(crate::CONCURRENCY as u32)
            .connect_with(options)
            .await?;
        let engine = WebhookEngine::builder()
            .pool(pool)
            .allow_insecure_urls()
            .batch_size(crate::CONCURRENCY as i64)
            .build()
            .await?;
        engine.migrate().await?;
        let endpoint = engine.register(url, SECRET).await?.id;
        Ok((Self::Postgres(Arc::new(engine), endpoint), schema))
    }

    /// A SQLite engine on a fresh file in `dir`.
    pub async fn on_sqlite(dir: &std::path::Path, url: &str) -> Result<Self, crate::Error> {
        let engine = SqliteEngine::builder()
            .database_url(format!("sqlite:{}?mode=rwc", dir.join("webhooksmith.db").display()))
            .allow_insecure_urls()
            .build()
            .await?;
        engine.migrate().await?;
        let endpoint = engine.register(url, SECRET).await?.id;
        Ok(Self::Sqlite(Arc::new(engine), endpoint))
    }

    /// Sends event `seq`.
    pub async fn send(&self, seq: u64) {
        let sent = match self {
            Self::Postgres(engine, endpoint) => engine.send("bench.event", payload(seq), *endpoint).await.map(drop),
            Self::Sqlite(engine, endpoint) => engine.send("bench.event", payload(seq), *endpoint).await.map(drop),
        };
        sent.expect("webhooksmith send");
    }

    /// Runs the delivery loop until `stop` resolves.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        match self {
            Self::Postgres(engine, _) => engine.run_graceful(stop).await,
            Self::Sqlite(engine, _) => engine.run_graceful(stop).await,
        }
    }
}
