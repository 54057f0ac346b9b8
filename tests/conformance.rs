//! The conformance suite: one set of test bodies (`conformance/cases.rs`), run against every
//! engine. A behaviour is tested once and holds for memory, SQLite and PostgreSQL alike.
//!
//! PostgreSQL comes from `DATABASE_URL`, a container, or a throwaway local cluster (see
//! `support/postgres.rs`); each test gets its own schema. Under `REQUIRE_POSTGRES=1` a missing
//! PostgreSQL fails the test instead of skipping it.

#[path = "conformance/cases.rs"]
mod cases;
mod support;

use std::sync::Arc;

use model_relay::ids::RequestId;
use model_relay::model::Timeouts;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use model_relay::store::postgres::PostgresStore;
use model_relay::store::sqlite::SqliteStore;

/// A database under test. Every `open` is a new handle (its own pool) on the same data, as
/// a second instance of the service would have.
pub trait Engine {
    fn open(&self) -> Arc<dyn Storer>;
}

pub struct Memory(Arc<MemoryStore>);

impl Memory {
    fn new() -> Self {
        Memory(Arc::new(MemoryStore::new(cases::TIMEOUTS)))
    }
}

impl Engine for Memory {
    fn open(&self) -> Arc<dyn Storer> {
        // One process, one map: every handle is the same store.
        self.0.clone()
    }
}

pub struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

impl Engine for Sqlite {
    fn open(&self) -> Arc<dyn Storer> {
        Arc::new(
            SqliteStore::open(&self.dir.path().join("relay.db"), cases::TIMEOUTS)
                .expect("open sqlite"),
        )
    }
}

pub struct Postgres {
    schema: support::postgres::PgSchema,
}

impl Postgres {
    fn new(test: &str) -> Option<Self> {
        support::postgres::fresh_schema(test).map(|schema| Postgres { schema })
    }
}

impl Engine for Postgres {
    fn open(&self) -> Arc<dyn Storer> {
        Arc::new(open_postgres(self.schema.config(), cases::TIMEOUTS))
    }
}

fn open_postgres(config: ::postgres::Config, timeouts: Timeouts) -> PostgresStore {
    PostgresStore::open_config(config, timeouts).expect("open postgres")
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[test] fn $case() { super::cases::$case(&super::Memory::new()); } )*
        }
        mod sqlite {
            $( #[test] fn $case() { super::cases::$case(&super::Sqlite::new()); } )*
        }
        mod postgres {
            $(
                #[test]
                fn $case() {
                    if let Some(engine) = super::Postgres::new(stringify!($case)) {
                        super::cases::$case(&engine);
                    }
                }
            )*
        }
    };
}

conformance!(
    opening_twice_keeps_the_data,
    tokens_resolve_to_their_owner_only,
    runtimes_are_scoped_to_their_workspace,
    touch_records_last_seen_and_never_moves_it_back,
    heartbeat_writes_last_seen_only_when_older_than_refresh_after,
    deleting_a_runtime_deletes_its_requests,
    create_makes_a_pending_request_with_a_claim_deadline,
    create_for_a_missing_runtime_is_none,
    create_coalesces_while_a_request_is_pending_or_running,
    create_after_the_active_request_ended_makes_a_new_one,
    create_expires_an_overdue_active_request_and_makes_a_new_one,
    concurrent_creates_from_two_handles_coalesce_to_one_request,
    claim_moves_the_pending_request_to_running_with_a_lease,
    claim_hands_out_a_request_at_most_once,
    concurrent_claims_from_two_handles_hand_out_one_request_once,
    claim_only_sees_its_own_runtime,
    expired_pending_request_is_never_claimed_and_becomes_timeout,
    report_completed_records_the_models_and_ends_the_request,
    report_failed_records_the_error,
    report_without_models_reads_as_no_models,
    report_on_a_pending_request_is_refused_and_changes_nothing,
    report_running_renews_the_lease,
    report_running_on_an_ended_request_is_refused,
    exact_replay_of_the_ending_report_is_accepted_and_changes_nothing,
    a_different_report_after_the_end_is_refused_and_changes_nothing,
    report_after_the_lease_ran_out_is_refused_and_reads_timeout,
    report_one_millisecond_before_the_deadline_is_accepted,
    report_for_another_runtime_is_not_found,
    concurrent_reports_from_two_handles_record_exactly_one,
    reads_end_an_overdue_running_request_as_timeout,
    reads_are_scoped_to_the_runtime,
    terminal_status_is_final,
    expire_overdue_ends_only_overdue_active_requests,
    retention_deletes_only_requests_ended_before_the_cutoff_in_bounded_batches,
    sweep_expires_then_deletes_after_retention,
    heartbeat_of_a_runtime_deleted_since_its_token_was_read_is_unknown,
    daemon_by_token_tells_whether_a_request_is_pending,
    find_request_by_token_answers_each_level_in_turn,
    get_request_by_token_ends_an_overdue_request_first,
    expire_request_ends_only_the_phase_it_names,
    expire_overdue_works_in_bounded_batches_oldest_deadline_first,
    count_requests_counts_each_status_and_the_oldest_pending,
    concurrent_sweeps_from_two_handles_end_and_delete_each_request_once,
    checkpoint_keeps_every_request,
    daemon_by_token_names_the_running_request_until_it_is_renewed,
    a_lost_hand_out_is_handed_out_again_only_when_working_on_omits_it,
    a_renewed_or_expired_request_is_never_handed_out_again,
    active_requests_lists_pending_and_running_requests_only,
    a_create_through_one_handle_wakes_the_listener_of_another,
    a_claim_and_a_report_through_one_handle_wake_the_listener_of_another,
    an_expiry_by_the_sweeper_wakes_the_listener_of_another_handle,
);

/// PostgreSQL only, because only there can a create see a runtime that a concurrent delete
/// is removing: the create's insert checks its foreign key under a lock, so it waits for
/// the uncommitted delete, and once that commits the answer is "no such runtime" — `None`,
/// as for any missing runtime, not a store error (which would be a 503).
#[test]
fn postgres_create_racing_an_uncommitted_delete_of_its_runtime_is_none() {
    let Some(engine) = Postgres::new("create_racing_a_delete") else {
        return;
    };
    let store = engine.open();
    let runtime = cases::tenant(store.as_ref()).runtime;
    let config = engine.schema.config();
    let mut deleter = config.connect(::postgres::NoTls).expect("connect");
    let mut watcher = config.connect(::postgres::NoTls).expect("connect");
    let mut delete = deleter.transaction().expect("begin");
    delete
        .execute(
            "DELETE FROM runtimes WHERE id = $1",
            &[&runtime.to_string()],
        )
        .expect("delete");
    let xid: String = delete
        .query_one("SELECT txid_current()::text", &[])
        .expect("txid")
        .get(0);

    let creating = std::thread::spawn(move || {
        store.create_or_coalesce(runtime, RequestId::random().unwrap(), cases::T0)
    });
    // The create waits on the delete's transaction: its row lock, or its uncommitted
    // delete seen by the foreign key's check.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks
                  WHERE locktype = 'transactionid' AND NOT granted AND transactionid::text = $1",
                &[&xid],
            )
            .expect("pg_locks")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the create never waited on the delete"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    delete.commit().expect("commit");
    let created = creating.join().expect("create panicked");
    assert!(matches!(created, Ok(None)), "{created:?}");
}

/// SQLite only: a new database file is its owner's alone (it holds token hashes and every
/// tenant's requests), and so are the write-ahead log and its index, which SQLite makes
/// with the database file's permissions.
#[cfg(unix)]
#[test]
fn sqlite_files_are_created_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = SqliteStore::open(&path, cases::TIMEOUTS).unwrap();
    cases::tenant(&store);
    for file in ["relay.db", "relay.db-wal", "relay.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
    }
}
