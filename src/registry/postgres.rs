//! [`PostgresRegistry`]: endpoints in a table of the app's Postgres database.

use std::fmt;

use futures::future::{BoxFuture, FutureExt};
use sqlx::{PgPool, Row};

use super::{Endpoint, EndpointId, EndpointRegistry, EventFilter, RegistryError};
pub use crate::table_name::InvalidTableName;
use crate::table_name::checked_table;

/// A disabled endpoint that parks its events. The setting lives in the endpoint's JSON (no
/// column, so tables made before it existed need no migration).
const PARKS: &str = "endpoint->>'when_disabled' = 'park'";

/// The table [`PostgresRegistry::new`] uses.
pub const DEFAULT_TABLE: &str = "webhook_endpoints";

/// Endpoints in a Postgres table of the app's own database, so they can be edited in the same
/// transactions as the rest of the app's data:
///
/// ```sql
/// CREATE TABLE webhook_endpoints (
///     id text PRIMARY KEY,
///     tenant text,
///     filters text[] NOT NULL,      -- GIN-indexed: matching is an index lookup
///     enabled boolean NOT NULL,
///     disabled_reason text,
///     failing_since bigint,         -- Unix seconds of the first failure since the last success
///     endpoint jsonb NOT NULL,      -- URL, secrets or key id, scheme, headers, rate limit
///     updated_at timestamptz NOT NULL DEFAULT now()
/// );
/// ```
///
/// [`setup`](Self::setup) creates it. The `endpoint` column holds signing secrets as the jobs
/// do; use [`Endpoint::with_key_id`] and a [`SecretStore`](crate::secret_store::SecretStore) to keep them
/// out of the database.
#[derive(Clone)]
pub struct PostgresRegistry {
    pool: PgPool,
    table: String,
}

impl fmt::Debug for PostgresRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresRegistry").field("table", &self.table).finish()
    }
}

fn unavailable(error: sqlx::Error) -> RegistryError {
    RegistryError::Unavailable(Box::new(error))
}

impl PostgresRegistry {
    /// The registry in table [`DEFAULT_TABLE`] of `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            table: DEFAULT_TABLE.to_owned(),
        }
    }

    /// Uses `table` (`name` or `schema.name`, lower-case letters, digits and `_`) instead.
    pub fn with_table(mut self, table: &str) -> Result<Self, InvalidTableName> {
        self.table = checked_table(table)?;
        Ok(self)
    }

    /// The pool it reads and writes.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table it keeps the endpoints in.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table and its filter index if they do not exist.
    pub async fn setup(&self) -> Result<(), RegistryError> {
        let index = self.table.replace('.', "_");
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, tenant text, filters text[] NOT NULL, \
                 enabled boolean NOT NULL, disabled_reason text, failing_since bigint, endpoint jsonb NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT now())",
                self.table
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {index}_filters ON {} USING gin (filters)",
                self.table
            ),
            format!("CREATE INDEX IF NOT EXISTS {index}_tenant ON {} (tenant)", self.table),
        ];
        for statement in statements {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    fn read(row: &sqlx::postgres::PgRow) -> Result<Endpoint, RegistryError> {
        let id: String = row.get("id");
        let json: sqlx::types::Json<serde_json::Value> = row.get("endpoint");
        let endpoint: Endpoint = serde_json::from_value(json.0).map_err(|error| RegistryError::Corrupt {
            id: id.clone(),
            reason: crate::json::describe(&error),
        })?;
        if endpoint.id().as_str() != id {
            return Err(RegistryError::Corrupt {
                id,
                reason: "the stored endpoint has another id".to_owned(),
            });
        }
        let enabled: bool = row.get("enabled");
        let reason: Option<String> = row.get("disabled_reason");
        Ok(endpoint.with_state(enabled, reason))
    }

    const COLUMNS: &'static str = "id, enabled, disabled_reason, endpoint";

    /// The endpoints whose filters match `event_type` (of `tenant` when given) and which meet
    /// `condition`, by id. The filter index narrows the rows first.
    fn select_for_event<'a>(
        &'a self,
        condition: &str,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {condition} AND filters && $1 AND ($2::text IS NULL OR tenant = $2) ORDER BY id",
            Self::COLUMNS,
            self.table
        );
        async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(EventFilter::candidates(event_type))
                .bind(tenant)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            rows.iter().map(Self::read).collect()
        }
        .boxed()
    }

    /// Runs `sql` (a statement on this table whose only parameter is the id); rows changed.
    async fn execute_for(&self, sql: String, id: &EndpointId) -> Result<u64, RegistryError> {
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }
}

impl EndpointRegistry for PostgresRegistry {
    fn matching<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        self.select_for_event("enabled", event_type, tenant)
    }

    fn parking<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        self.select_for_event(&format!("NOT enabled AND {PARKS}"), event_type, tenant)
    }

    fn recipients<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        self.select_for_event(&format!("(enabled OR {PARKS})"), event_type, tenant)
    }

    fn upsert(&self, endpoint: Endpoint) -> BoxFuture<'_, Result<(), RegistryError>> {
        async move {
            endpoint.validate()?;
            let filters: Vec<&str> = endpoint.event_filters().iter().map(EventFilter::as_str).collect();
            let json = serde_json::to_value(&endpoint).map_err(|error| RegistryError::Corrupt {
                id: endpoint.id().to_string(),
                reason: crate::json::describe(&error),
            })?;
            let sql = format!(
                "INSERT INTO {} (id, tenant, filters, enabled, disabled_reason, endpoint) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET tenant = $2, filters = $3, enabled = $4, disabled_reason = $5, \
                 endpoint = $6, updated_at = now()",
                self.table
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(endpoint.id().as_str())
                .bind(endpoint.tenant_id())
                .bind(filters)
                .bind(endpoint.is_enabled())
                .bind(endpoint.disabled_reason())
                .bind(sqlx::types::Json(json))
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<Option<Endpoint>, RegistryError>> {
        async move {
            let sql = format!("SELECT {} FROM {} WHERE id = $1", Self::COLUMNS, self.table);
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(Self::read).transpose()
        }
        .boxed()
    }

    fn remove<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<bool, RegistryError>> {
        async move {
            let sql = format!("DELETE FROM {} WHERE id = $1", self.table);
            Ok(self.execute_for(sql, id).await? > 0)
        }
        .boxed()
    }

    fn disable<'a>(&'a self, id: &'a EndpointId, reason: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        async move {
            // `AND enabled`: of several workers disabling at once, one sees a row changed.
            let sql = format!(
                "UPDATE {} SET enabled = false, disabled_reason = $2, updated_at = now() WHERE id = $1 AND enabled",
                self.table
            );
            let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id.as_str())
                .bind(reason)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(done.rows_affected() > 0)
        }
        .boxed()
    }

    fn enable<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<bool, RegistryError>> {
        async move {
            let sql = format!(
                "UPDATE {} SET enabled = true, disabled_reason = NULL, failing_since = NULL, updated_at = now() \
                 WHERE id = $1",
                self.table
            );
            Ok(self.execute_for(sql, id).await? > 0)
        }
        .boxed()
    }

    fn record_failure<'a>(&'a self, id: &'a EndpointId, at: u64) -> BoxFuture<'a, Result<Option<u64>, RegistryError>> {
        async move {
            let sql = format!(
                "UPDATE {} SET failing_since = COALESCE(failing_since, $2) WHERE id = $1 RETURNING failing_since",
                self.table
            );
            let since: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(id.as_str())
                .bind(i64::try_from(at).unwrap_or(i64::MAX))
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(since.map(|since| since.max(0) as u64))
        }
        .boxed()
    }

    fn record_success<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<(), RegistryError>> {
        async move {
            // Writes only when the endpoint was failing: a healthy endpoint costs a read.
            let sql = format!(
                "UPDATE {} SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
                self.table
            );
            self.execute_for(sql, id).await?;
            Ok(())
        }
        .boxed()
    }
}
