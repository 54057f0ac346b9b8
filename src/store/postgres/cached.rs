//! Pooled connections, and how each statement reaches the server.
//!
//! The `postgres` client's `query(sql, …)` prepares `sql` on the server on every call: one
//! extra round trip per statement, and a fresh plan each time. A [`CachedClient`] keeps the
//! prepared [`Statement`] per SQL text for the life of its connection and reuses it. The
//! engine issues a fixed set of SQL texts, so the cache stays a few dozen entries; it dies
//! with its connection, so a reconnect after an outage prepares afresh.
//!
//! Behind a transaction-pooling proxy ([`PoolMode::Transaction`]) a named statement lives on
//! whichever server connection the proxy lent for that moment, and the next call may get
//! another one: there is no cache then, and every call sends its statement unnamed, with
//! its parameters' types, in one round trip (`query_typed`), which the proxy passes through
//! whole. The types come from [`Param`], so the call sites are the same in both modes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{Client, Error, GenericClient, NoTls, Row, Statement, Transaction};
use r2d2_postgres::PostgresConnectionManager;

use super::PoolMode;

type Statements = HashMap<String, Statement>;

/// A statement parameter and the PostgreSQL type it is sent as when nothing was prepared to
/// tell. Every column the engine writes is `TEXT`, `BIGINT` or `BOOLEAN`; the sweeper also
/// sends lists of ids (`TEXT[]`).
pub trait Param: ToSql + Sync {
    fn pg_type(&self) -> Type;
}

/// A Rust type's PostgreSQL type: [`Param`] for a value, and for `None` of an `Option`.
pub trait Typed {
    const TYPE: Type;
}

impl<T: Typed + ToSql + Sync> Param for T {
    fn pg_type(&self) -> Type {
        T::TYPE
    }
}

impl Typed for i64 {
    const TYPE: Type = Type::INT8;
}

impl Typed for bool {
    const TYPE: Type = Type::BOOL;
}

impl Typed for String {
    const TYPE: Type = Type::TEXT;
}

impl Typed for &str {
    const TYPE: Type = Type::TEXT;
}

impl Typed for Vec<String> {
    const TYPE: Type = Type::TEXT_ARRAY;
}

impl<T: Typed> Typed for Option<T> {
    const TYPE: Type = T::TYPE;
}

type Params<'a> = &'a [&'a dyn Param];

/// `params` with their types, for the unnamed-statement calls.
fn typed<'a>(params: Params<'a>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .map(|&p| (p as &(dyn ToSql + Sync), p.pg_type()))
        .collect()
}

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

/// The calls the engine makes, on a connection or in a transaction. Each type's `parts`
/// gives its cache (`None`: send unnamed statements) and the client it runs on.
macro_rules! cached_calls {
    () => {
        pub fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, Error> {
            match self.parts() {
                (Some(statements), client) => {
                    let statement = prepared(statements, &mut *client, sql)?;
                    client.execute(&statement, &to_sql(params))
                }
                (None, client) => {
                    let mut rows = client.query_typed_raw(sql, typed(params))?;
                    while rows.next()?.is_some() {}
                    Ok(rows.rows_affected().unwrap_or(0))
                }
            }
        }

        pub fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
            match self.parts() {
                (Some(statements), client) => {
                    let statement = prepared(statements, &mut *client, sql)?;
                    client.query(&statement, &to_sql(params))
                }
                (None, client) => client.query_typed(sql, &typed(params)),
            }
        }

        pub fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
            match self.parts() {
                (Some(statements), client) => {
                    let statement = prepared(statements, &mut *client, sql)?;
                    client.query_opt(&statement, &to_sql(params))
                }
                (None, client) => client.query_typed_opt(sql, &typed(params)),
            }
        }
    };
}

/// `params` as the prepared-statement calls take them.
fn to_sql<'a>(params: Params<'a>) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|&p| p as &(dyn ToSql + Sync)).collect()
}

/// A pooled connection and the statements prepared on it.
pub struct CachedClient {
    client: Client,
    /// `None` behind a transaction pooler: nothing is prepared.
    statements: Option<Statements>,
    /// When the pool last took this connection back: see [`CachingManager::is_valid`].
    returned_at: Instant,
}

impl CachedClient {
    cached_calls!();

    fn parts(&mut self) -> (Option<&mut Statements>, &mut Client) {
        (self.statements.as_mut(), &mut self.client)
    }

    pub fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, Error> {
        match self.parts() {
            (Some(statements), client) => {
                let statement = prepared(statements, &mut *client, sql)?;
                client.query_one(&statement, &to_sql(params))
            }
            (None, client) => client.query_typed_one(sql, &typed(params)),
        }
    }

    /// Session settings and the like: not cached, not parameterized.
    pub fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.client.batch_execute(sql)
    }

    /// A transaction whose statements come from (and go into) this connection's cache.
    pub fn transaction(&mut self) -> Result<CachedTransaction<'_>, Error> {
        Ok(CachedTransaction {
            tx: self.client.transaction()?,
            statements: self.statements.as_mut(),
        })
    }
}

/// A transaction on a [`CachedClient`]. Dropped without `commit`, it rolls back.
pub struct CachedTransaction<'a> {
    tx: Transaction<'a>,
    statements: Option<&'a mut Statements>,
}

impl<'a> CachedTransaction<'a> {
    cached_calls!();

    fn parts(&mut self) -> (Option<&mut Statements>, &mut Transaction<'a>) {
        (self.statements.as_deref_mut(), &mut self.tx)
    }

    pub fn commit(self) -> Result<(), Error> {
        self.tx.commit()
    }
}

/// How long a pooled connection may sit idle and still be handed out without a ping.
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

/// r2d2's manager for [`CachedClient`]s: `r2d2_postgres`'s, with an empty cache per new
/// connection (none behind a transaction pooler).
pub struct CachingManager {
    pub inner: PostgresConnectionManager<NoTls>,
    pub pool_mode: PoolMode,
}

impl r2d2::ManageConnection for CachingManager {
    type Connection = CachedClient;
    type Error = Error;

    fn connect(&self) -> Result<CachedClient, Error> {
        Ok(CachedClient {
            client: self.inner.connect()?,
            statements: match self.pool_mode {
                PoolMode::Session => Some(Statements::new()),
                PoolMode::Transaction => None,
            },
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
        self.inner.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut CachedClient) -> bool {
        conn.returned_at = Instant::now();
        self.inner.has_broken(&mut conn.client)
    }
}
