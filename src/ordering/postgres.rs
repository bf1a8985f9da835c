//! Lines in a Postgres table: one row per waiting or in-flight delivery; each change of a line
//! runs in a transaction holding that line's advisory lock, so entries are numbered and heads
//! decided one at a time per line.

use futures::future::{BoxFuture, FutureExt};
use sqlx::PgPool;

use super::{HeadsPage, LineError, LineStore, LinesPage, Member};

pub(super) struct PostgresLines {
    pool: PgPool,
    table: String,
}

fn unavailable(error: sqlx::Error) -> LineError {
    LineError(Box::new(error))
}

impl PostgresLines {
    /// Lines in `table` (already checked to be a plain identifier), created if missing.
    pub(super) async fn open(pool: PgPool, table: String) -> Result<Self, LineError> {
        let index = table.replace('.', "_");
        for statement in [
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (line text NOT NULL, seq bigserial, member text NOT NULL, \
                 job text NOT NULL, PRIMARY KEY (line, member))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {index}_order ON {table} (line, seq)"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&pool)
                .await
                .map_err(unavailable)?;
        }
        Ok(Self { pool, table })
    }

    /// The job of `line`'s head, inside `tx`.
    async fn head(&self, tx: &mut sqlx::PgConnection, line: &str) -> Result<Option<(String, String)>, LineError> {
        let sql = format!(
            "SELECT member, job FROM {} WHERE line = $1 ORDER BY seq LIMIT 1",
            self.table
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(line)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)
    }

    /// A transaction holding `line`'s lock until it ends.
    async fn locked(&self, line: &str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, LineError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7411))")
            .bind(line)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        Ok(tx)
    }
}

impl LineStore for PostgresLines {
    fn enter<'a>(&'a self, line: &'a str, member: &'a str, job: String) -> BoxFuture<'a, Result<bool, LineError>> {
        async move {
            let mut tx = self.locked(line).await?;
            let sql = format!(
                "INSERT INTO {} (line, member, job) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                self.table
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(line)
                .bind(member)
                .bind(job)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            let head = self.head(&mut tx, line).await?;
            tx.commit().await.map_err(unavailable)?;
            Ok(head.is_some_and(|(head, _)| head == member))
        }
        .boxed()
    }

    fn next<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
        async move {
            let sql = format!(
                "SELECT job FROM {t} WHERE line = $1 AND seq > (SELECT seq FROM {t} WHERE line = $1 AND member = $2) \
                 ORDER BY seq LIMIT 1",
                t = self.table
            );
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(line)
                .bind(member)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn leave<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
        async move {
            let mut tx = self.locked(line).await?;
            let sql = format!("DELETE FROM {} WHERE line = $1 AND member = $2", self.table);
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(line)
                .bind(member)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            let head = self.head(&mut tx, line).await?;
            tx.commit().await.map_err(unavailable)?;
            Ok(head.map(|(_, job)| job))
        }
        .boxed()
    }

    fn heads<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<HeadsPage, LineError>> {
        async move {
            let sql = format!(
                "SELECT DISTINCT ON (line) line, job FROM {} WHERE $1::text IS NULL OR line > $1 \
                 ORDER BY line, seq LIMIT $2",
                self.table
            );
            let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(cursor)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            let next = rows
                .last()
                .filter(|_| rows.len() >= limit)
                .map(|(line, _)| line.clone());
            Ok((rows.into_iter().map(|(_, job)| job).collect(), next))
        }
        .boxed()
    }

    fn lines<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<LinesPage, LineError>> {
        async move {
            let sql = format!(
                "SELECT DISTINCT line FROM {} WHERE $1::text IS NULL OR line > $1 ORDER BY line LIMIT $2",
                self.table
            );
            let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(cursor)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            let next = lines.last().filter(|_| lines.len() >= limit).cloned();
            Ok((lines, next))
        }
        .boxed()
    }

    fn members<'a>(
        &'a self,
        line: &'a str,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Member>, LineError>> {
        async move {
            let sql = format!(
                "SELECT seq, member, job FROM {} WHERE line = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                self.table
            );
            let rows: Vec<(i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(line)
                .bind(after.map_or(0, |a| i64::try_from(a).unwrap_or(i64::MAX)))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            // bigserial starts at 1: entry numbers are positive.
            Ok(rows
                .into_iter()
                .map(|(seq, member, job)| (seq.max(0) as u64, member, job))
                .collect())
        }
        .boxed()
    }

    fn erase_member<'a>(
        &'a self,
        line: &'a str,
        member: &'a str,
        stub: String,
    ) -> BoxFuture<'a, Result<Option<bool>, LineError>> {
        async move {
            let mut tx = self.locked(line).await?;
            let head = self.head(&mut tx, line).await?.is_some_and(|(head, _)| head == member);
            let sql = if head {
                format!("UPDATE {} SET job = $3 WHERE line = $1 AND member = $2", self.table)
            } else {
                format!(
                    "DELETE FROM {} WHERE line = $1 AND member = $2 AND $3::text IS NOT NULL",
                    self.table
                )
            };
            let done = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(line)
                .bind(member)
                .bind(stub)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok((done.rows_affected() == 1).then_some(head))
        }
        .boxed()
    }
}
