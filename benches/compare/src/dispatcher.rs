//! webhook-dispatcher 0.1 (`http` feature) on the same receiver: in memory, and on Postgres.
//! Its Redis store does not compile (rustc 1.95), so it has no Redis row.
//!
//! Settings that make it comparable: 64 workers (its delivery concurrency; the default is the
//! number of cores), and the global and per-endpoint permits raised above that, because a
//! delivery that finds no permit goes straight to its dead-letter queue. Deliveries are signed
//! (`with_secret`), like ours. Events are 1 KiB JSON with unique ids (ids double as
//! idempotency keys).

use std::{sync::Arc, time::Duration};

use webhook_dispatcher::{DispatchError, Dispatcher, DispatcherConfig, Endpoint, EndpointId, Event};

fn config() -> DispatcherConfig {
    DispatcherConfig {
        worker_count: crate::CONCURRENCY,
        max_in_flight: 256,
        ..Default::default()
    }
}

async fn register(dispatcher: &Dispatcher, url: &str) -> EndpointId {
    let endpoint = Endpoint::new("bench", url.to_owned())
        .with_max_concurrent(256)
        .with_timeout(Duration::from_secs(10))
        .with_secret(b"bench-secret-of-thirty-two-bytes".to_vec());
    let id = endpoint.id.clone();
    dispatcher.register_endpoint(endpoint).await;
    id
}

/// Sends event `seq`, waiting while its queue is full.
pub async fn send(dispatcher: &Dispatcher, endpoint: &EndpointId, run: &str, seq: u64) {
    loop {
        let event = Event::new(format!("{run}-{seq}"), crate::receiver::body(seq).into_bytes());
        match dispatcher.dispatch(event, vec![endpoint.clone()]).await {
            Ok(()) => return,
            Err(DispatchError::Backpressure) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(other) => panic!("webhook-dispatcher refused an event: {other}"),
        }
    }
}

/// An in-memory dispatcher delivering to `url`.
pub async fn in_memory(url: &str) -> (Arc<Dispatcher>, EndpointId) {
    let dispatcher = Dispatcher::new(config());
    let endpoint = register(&dispatcher, url).await;
    (Arc::new(dispatcher), endpoint)
}

/// A dispatcher on Postgres, its tables in a fresh schema (their names are fixed). Returns the
/// schema to drop afterwards.
pub async fn on_postgres(database_url: &str, url: &str) -> Result<(Arc<Dispatcher>, EndpointId, String), crate::Error> {
    let schema = format!("wd_bench_{}", ulid::Ulid::new().to_string().to_lowercase());
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}; SET search_path TO {schema}"))
        .await?;
    let storage = webhook_dispatcher::PostgresStorage::new(client).await?;
    let dispatcher = Dispatcher::new_with_storage(config(), Arc::new(storage)).await;
    let endpoint = register(&dispatcher, url).await;
    Ok((Arc::new(dispatcher), endpoint, schema))
}

pub async fn drop_schema(database_url: &str, schema: &str) -> Result<(), crate::Error> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await?;
    Ok(())
}
