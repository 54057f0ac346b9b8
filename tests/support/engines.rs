//! The engines the store suites run against, in one place: an engine added here (a type and
//! a line in [`engine_tests!`]) runs in every suite that uses the macro.

use std::sync::Arc;

use model_relay::kind::PerKind;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use model_relay::store::postgres::{self, PoolMode, PostgresStore};
use model_relay::store::sqlite::SqliteStore;

use super::pgbouncer::{PgBouncerDatabase, fresh_database};
use super::postgres::{PgSchema, fresh_schema};

/// A database under test.
pub trait Engine: Send + Sync {
    /// A new handle (its own pool) on the same data, as a second instance of the service
    /// would have.
    fn open(&self) -> Arc<dyn Storer>;

    /// Another, empty database of the same engine and timeouts, for a suite that needs one
    /// per generated case.
    fn fresh(&self) -> Arc<dyn Engine>;
}

pub struct Memory {
    store: Arc<MemoryStore>,
    timeouts: PerKind<Timeouts>,
}

impl Memory {
    pub fn new(timeouts: impl Into<PerKind<Timeouts>>) -> Self {
        let timeouts = timeouts.into();
        Memory {
            store: Arc::new(MemoryStore::new(timeouts)),
            timeouts,
        }
    }
}

impl Engine for Memory {
    fn open(&self) -> Arc<dyn Storer> {
        // One process, one map: every handle is the same store.
        self.store.clone()
    }

    fn fresh(&self) -> Arc<dyn Engine> {
        Arc::new(Memory::new(self.timeouts))
    }
}

pub struct Sqlite {
    dir: tempfile::TempDir,
    timeouts: PerKind<Timeouts>,
}

impl Sqlite {
    pub fn new(timeouts: impl Into<PerKind<Timeouts>>) -> Self {
        let timeouts = timeouts.into();
        Sqlite {
            dir: tempfile::tempdir().expect("temp dir"),
            timeouts,
        }
    }
}

impl Engine for Sqlite {
    fn open(&self) -> Arc<dyn Storer> {
        let path = self.dir.path().join("relay.db");
        Arc::new(SqliteStore::open(&path, self.timeouts).expect("open sqlite"))
    }

    fn fresh(&self) -> Arc<dyn Engine> {
        Arc::new(Sqlite::new(self.timeouts))
    }
}

pub struct Postgres {
    pub schema: PgSchema,
    test: String,
    timeouts: PerKind<Timeouts>,
}

impl Postgres {
    /// A fresh schema named after `test`; None when there is no PostgreSQL and
    /// `REQUIRE_POSTGRES` is unset (see [`fresh_schema`]).
    pub fn new(test: &str, timeouts: impl Into<PerKind<Timeouts>>) -> Option<Self> {
        let timeouts = timeouts.into();
        fresh_schema(test).map(|schema| Postgres {
            schema,
            test: test.to_owned(),
            timeouts,
        })
    }
}

impl Engine for Postgres {
    fn open(&self) -> Arc<dyn Storer> {
        Arc::new(
            PostgresStore::open_config(self.schema.config(), self.timeouts).expect("open postgres"),
        )
    }

    fn fresh(&self) -> Arc<dyn Engine> {
        let fresh = Postgres::new(&self.test, self.timeouts);
        Arc::new(fresh.expect("PostgreSQL was there for this test's first schema"))
    }
}

/// PostgreSQL through PgBouncer in transaction-pooling mode, opened with
/// `pool_mode=transaction`: a database of its own per test (see [`super::pgbouncer`]).
pub struct PgBouncer {
    pub database: PgBouncerDatabase,
    test: String,
    timeouts: PerKind<Timeouts>,
}

impl PgBouncer {
    /// None when there is no PostgreSQL or no PgBouncer and `REQUIRE_POSTGRES` is unset.
    pub fn new(test: &str, timeouts: impl Into<PerKind<Timeouts>>) -> Option<Self> {
        let timeouts = timeouts.into();
        fresh_database(test).map(|database| PgBouncer {
            database,
            test: test.to_owned(),
            timeouts,
        })
    }
}

impl Engine for PgBouncer {
    fn open(&self) -> Arc<dyn Storer> {
        let options = postgres::Options {
            pool_mode: PoolMode::Transaction,
            ..postgres::Options::default()
        };
        Arc::new(
            PostgresStore::open_with(self.database.config(), self.timeouts, options)
                .expect("open postgres through pgbouncer"),
        )
    }

    fn fresh(&self) -> Arc<dyn Engine> {
        let fresh = PgBouncer::new(&self.test, self.timeouts);
        Arc::new(fresh.expect("PgBouncer was there for this test's first database"))
    }
}

/// `engine_tests!(TIMEOUTS; case, …)`, for cases `fn case(engine: &dyn Engine)`, adds to the
/// calling module the modules `memory`, `sqlite` and `postgres`, each with one `#[test]` per
/// case, its engine opened with `TIMEOUTS`. `engine_tests!(async TIMEOUTS; case, …)` does
/// the same for `async fn case(engine: &dyn Engine)`, on a multi-threaded runtime (so that a
/// case can open PostgreSQL handles in `tokio::task::block_in_place`).
/// `engine_tests!(with_pgbouncer TIMEOUTS; case, …)` adds a module `pgbouncer` as well: each
/// case on PostgreSQL through PgBouncer in transaction-pooling mode, for the suites that need
/// no notifications (an instance does not listen there). A PostgreSQL test passes without
/// running only when there is no PostgreSQL (or PgBouncer) and `REQUIRE_POSTGRES` is unset.
// Not every test binary runs a suite over the engines.
#[allow(unused_macros)]
macro_rules! engine_tests {
    // First: the other arm would take `async …` for the start of an async block.
    (async $timeouts:expr; $($case:ident),* $(,)?) => {
        $crate::support::engines::engine_tests!(@engines [async] $timeouts; $($case),*);
    };
    // Also before the plain arm, for the same reason.
    (with_pgbouncer $timeouts:expr; $($case:ident),* $(,)?) => {
        $crate::support::engines::engine_tests!(@engines [sync] $timeouts; $($case),*);
        mod pgbouncer {
            $($crate::support::engines::engine_tests!(@test [sync] $case
                $crate::support::engines::PgBouncer::new(stringify!($case), super::engine_timeouts())
            );)*
        }
    };
    ($timeouts:expr; $($case:ident),* $(,)?) => {
        $crate::support::engines::engine_tests!(@engines [sync] $timeouts; $($case),*);
    };
    (@engines $kind:tt $timeouts:expr; $($case:ident),*) => {
        // Evaluated here, where the caller's names resolve, not in the modules below.
        fn engine_timeouts() -> ::model_relay::kind::PerKind<::model_relay::model::Timeouts> {
            ::std::convert::Into::into($timeouts)
        }
        mod memory {
            $($crate::support::engines::engine_tests!(@test $kind $case Some(
                $crate::support::engines::Memory::new(super::engine_timeouts())
            ));)*
        }
        mod sqlite {
            $($crate::support::engines::engine_tests!(@test $kind $case Some(
                $crate::support::engines::Sqlite::new(super::engine_timeouts())
            ));)*
        }
        mod postgres {
            $($crate::support::engines::engine_tests!(@test $kind $case
                $crate::support::engines::Postgres::new(stringify!($case), super::engine_timeouts())
            );)*
        }
    };
    (@test [sync] $case:ident $engine:expr) => {
        #[test]
        fn $case() {
            if let Some(engine) = $engine {
                super::$case(&engine);
            }
        }
    };
    (@test [async] $case:ident $engine:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            if let Some(engine) = $engine {
                super::$case(&engine).await;
            }
        }
    };
}

#[allow(unused_imports)]
pub(crate) use engine_tests;
