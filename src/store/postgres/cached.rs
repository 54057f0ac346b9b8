//! Pooled connections that prepare each statement once.
//!
//! The `postgres` client's `query(sql, …)` prepares `sql` on the server on every call: one
//! extra round trip per statement, and a fresh plan each time. A [`CachedClient`] keeps the
//! prepared [`Statement`] per SQL text for the life of its connection and reuses it. The
//! engine issues a fixed set of SQL texts, so the cache stays a few dozen entries; it dies
//! with its connection, so a reconnect after an outage prepares afresh.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, Error, GenericClient, NoTls, Row, Statement, Transaction};
use r2d2_postgres::PostgresConnectionManager;

type Statements = HashMap<String, Statement>;

/// The statement for `sql`, prepared on `client`'s connection at most once.
fn prepared<C: GenericClient>(
    statements: &mut Statements,
    client: &mut C,
    sql: &str,
) -> Result<Statement, Error> {
    if let Some(statement) = statements.get(sql) {
        return Ok(statement.clone());
    }
    let statement = client.prepare(sql)?;
    statements.insert(sql.to_owned(), statement.clone());
    Ok(statement)
}

/// The calls the engine makes, on a connection or in a transaction, through the cache.
/// Each type's `parts` gives its cache and the client it prepares on.
macro_rules! cached_calls {
    () => {
        pub fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
            let (statements, client) = self.parts();
            let statement = prepared(statements, &mut *client, sql)?;
            client.execute(&statement, params)
        }

        pub fn query(
            &mut self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Vec<Row>, Error> {
            let (statements, client) = self.parts();
            let statement = prepared(statements, &mut *client, sql)?;
            client.query(&statement, params)
        }

        pub fn query_opt(
            &mut self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Option<Row>, Error> {
            let (statements, client) = self.parts();
            let statement = prepared(statements, &mut *client, sql)?;
            client.query_opt(&statement, params)
        }
    };
}

/// A pooled connection and the statements prepared on it.
pub struct CachedClient {
    client: Client,
    statements: Statements,
    /// When the pool last took this connection back: see [`CachingManager::is_valid`].
    returned_at: Instant,
}

impl CachedClient {
    cached_calls!();

    fn parts(&mut self) -> (&mut Statements, &mut Client) {
        (&mut self.statements, &mut self.client)
    }

    pub fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        let statement = prepared(&mut self.statements, &mut self.client, sql)?;
        self.client.query_one(&statement, params)
    }

    /// Session settings and the like: not cached, not parameterized.
    pub fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.client.batch_execute(sql)
    }

    /// A transaction whose statements come from (and go into) this connection's cache.
    pub fn transaction(&mut self) -> Result<CachedTransaction<'_>, Error> {
        Ok(CachedTransaction {
            tx: self.client.transaction()?,
            statements: &mut self.statements,
        })
    }
}

/// A transaction on a [`CachedClient`]. Dropped without `commit`, it rolls back.
pub struct CachedTransaction<'a> {
    tx: Transaction<'a>,
    statements: &'a mut Statements,
}

impl<'a> CachedTransaction<'a> {
    cached_calls!();

    fn parts(&mut self) -> (&mut Statements, &mut Transaction<'a>) {
        (&mut *self.statements, &mut self.tx)
    }

    pub fn commit(self) -> Result<(), Error> {
        self.tx.commit()
    }
}

/// How long a pooled connection may sit idle and still be handed out without a ping.
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

/// r2d2's manager for [`CachedClient`]s: `r2d2_postgres`'s, with an empty cache per new
/// connection.
pub struct CachingManager(pub PostgresConnectionManager<NoTls>);

impl r2d2::ManageConnection for CachingManager {
    type Connection = CachedClient;
    type Error = Error;

    fn connect(&self) -> Result<CachedClient, Error> {
        Ok(CachedClient {
            client: self.0.connect()?,
            statements: Statements::new(),
            returned_at: Instant::now(),
        })
    }

    /// Pings the server (an empty query) only for a connection that sat idle for a while.
    /// The ping is a round trip: on every checkout it cost as much as the one query of a
    /// poll. A connection in steady use has just proved itself, and if it broke since, the
    /// call fails with a 503 and the pool drops it on return ([`Self::has_broken`]). One
    /// that sat idle may have lost its server unnoticed (a restart in a quiet hour): the
    /// synchronous client only reads its socket during a call, so a ping is how to know.
    fn is_valid(&self, conn: &mut CachedClient) -> Result<(), Error> {
        if conn.returned_at.elapsed() < TRUSTED_IDLE {
            return Ok(());
        }
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut CachedClient) -> bool {
        conn.returned_at = Instant::now();
        self.0.has_broken(&mut conn.client)
    }
}
