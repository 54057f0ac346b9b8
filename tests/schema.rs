//! The schema and its migrations (DESIGN.md, "Schema changes"), on SQLite and PostgreSQL:
//! - `schema.sql`, the readable newest schema, is exactly what the numbered migrations
//!   build;
//! - a database written by the last release (schema 3: the fixtures under
//!   `tests/fixtures/`, made by `tests/fixtures/make-v3`) upgrades in place with nothing
//!   lost, to the schema a new database gets, and `model-relay serve` works on it;
//! - a database newer than this build is refused, by the store and by `serve`, with a clear
//!   message;
//! - an upgrade run again changes nothing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hyper::StatusCode;
use model_relay::ids::{RequestId, RuntimeId, Token};
use model_relay::kind::Kind;
use model_relay::model::{ModelEntry, Timeouts};
use model_relay::store::postgres::PostgresStore;
use model_relay::store::sqlite::SqliteStore;
use model_relay::store::{SCHEMA, SCHEMA_VERSION, StoreError, Storer};
use postgres::{Client, NoTls};
use rusqlite::Connection;
use serde_json::{Map, Value, json};
use support::postgres::{PgSchema, fresh_schema};
use support::process::{BIN, Serve};
use support::server::Http;

/// The tables of the newest schema. Every description below must mention each of them, so
/// that a description that found nothing (a wrong schema, a wrong query) cannot pass as
/// "equal".
const TABLES: [&str; 5] = [
    "workspaces",
    "api_tokens",
    "runtimes",
    "requests",
    "catalogs",
];

/// The fixtures' requests ended (or were due) long ago: a `serve` on them must keep ended
/// requests far longer than the default retention, or its sweeper would delete what the
/// test reads.
const KEEP_EVERYTHING: [&str; 2] = ["--retention", "36500d"];

// ---- schema.sql against the migrations ----

#[test]
fn schema_sql_is_what_the_sqlite_migrations_build() {
    let dir = tempfile::tempdir().unwrap();
    let by_hand = Connection::open(dir.path().join("schema-sql.db")).unwrap();
    by_hand
        .execute_batch(SCHEMA)
        .expect("SQLite accepts schema.sql");
    let migrated = dir.path().join("migrated.db");
    drop(SqliteStore::open(&migrated, Timeouts::default()).expect("open a new SQLite file"));
    let migrated = Connection::open(&migrated).unwrap();

    assert_same_shape(
        "schema.sql",
        &sqlite_shape(&by_hand),
        "the migrations",
        &sqlite_shape(&migrated),
    );
}

#[test]
fn schema_sql_is_what_the_postgres_migrations_build() {
    let (Some(by_hand), Some(migrated)) = (
        fresh_schema("schema_sql_by_hand"),
        fresh_schema("schema_sql_migrated"),
    ) else {
        return;
    };
    let mut by_hand_client = connect(&by_hand);
    by_hand_client
        .batch_execute(SCHEMA)
        .expect("PostgreSQL accepts schema.sql");
    drop(open_postgres(&migrated));
    let mut migrated_client = connect(&migrated);

    assert_same_shape(
        "schema.sql",
        &postgres_shape(&mut by_hand_client, by_hand.name()),
        "the migrations",
        &postgres_shape(&mut migrated_client, migrated.name()),
    );
}

// ---- upgrades from the last release ----

#[test]
fn a_schema_3_sqlite_file_upgrades_in_place_and_serves() {
    let fixture = Fixture::read("v3.db.ids");
    let dir = tempfile::tempdir().unwrap();
    let path = copy_sqlite_fixture(dir.path());
    let before = {
        let conn = Connection::open(&path).unwrap();
        assert_eq!(user_version(&conn), 3, "the fixture is a schema-3 file");
        assert_eq!(auto_vacuum(&conn), 0, "made before files gave space back");
        conn.execute_batch(&running_request(&fixture)).unwrap();
        sqlite_rows(&conn)
    };

    let store = SqliteStore::open(&path, Timeouts::default()).expect("open the schema-3 file");
    let conn = Connection::open(&path).unwrap();
    assert_eq!(user_version(&conn), SCHEMA_VERSION);
    assert_eq!(
        auto_vacuum(&conn),
        2,
        "rebuilt to give space back (INCREMENTAL)"
    );
    assert_nothing_lost(&before, &sqlite_rows(&conn));
    check_store_reads_fixture(&store, &fixture, &before);
    drop(store);

    // Upgraded, it has exactly the schema a new file gets.
    let fresh = dir.path().join("fresh.db");
    drop(SqliteStore::open(&fresh, Timeouts::default()).unwrap());
    assert_same_shape(
        "the upgraded file",
        &sqlite_shape(&conn),
        "a new file",
        &sqlite_shape(&Connection::open(&fresh).unwrap()),
    );
    drop(conn);

    let serve = Serve::start(&format!("sqlite:{}", path.display()), &KEEP_EVERYTHING);
    block_on(check_service_on_fixture(&serve.base, &fixture, &before));
    assert!(
        serve.terminate().success(),
        "SIGTERM ends serve with status 0"
    );
}

#[test]
fn a_schema_3_postgres_database_upgrades_in_place_and_serves() {
    let (Some(schema), Some(fresh)) = (
        fresh_schema("upgrade_postgres"),
        fresh_schema("upgrade_postgres_fresh"),
    ) else {
        return;
    };
    let fixture = Fixture::read("v3.postgres.ids");
    let mut client = connect(&schema);
    load_postgres_fixture(&mut client);
    assert_eq!(
        recorded_versions(&mut client),
        [3],
        "the fixture is schema 3"
    );
    client.batch_execute(&running_request(&fixture)).unwrap();
    let before = postgres_rows(&mut client);

    let store = open_postgres(&schema);
    // The record keeps the version the last release wrote and adds each one applied.
    assert_eq!(
        recorded_versions(&mut client),
        (3..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert_nothing_lost(&before, &postgres_rows(&mut client));
    check_store_reads_fixture(&store, &fixture, &before);
    drop(store);

    // Upgraded, it has exactly the schema a new database gets, the wake-up triggers
    // included: they came with schema 3 and must still be there.
    drop(open_postgres(&fresh));
    let upgraded = postgres_full_shape(&mut client, schema.name());
    for trigger in ["requests_notify_insert", "requests_notify_status"] {
        assert!(
            upgraded
                .iter()
                .any(|line| line.starts_with(&format!("trigger {trigger} "))),
            "{trigger} is missing after the upgrade"
        );
    }
    assert_same_shape(
        "the upgraded database",
        &upgraded,
        "a new database",
        &postgres_full_shape(&mut connect(&fresh), fresh.name()),
    );
    drop(client);

    let serve = Serve::start(&schema.url(), &KEEP_EVERYTHING);
    block_on(check_service_on_fixture(&serve.base, &fixture, &before));
    assert!(
        serve.terminate().success(),
        "SIGTERM ends serve with status 0"
    );
}

// ---- a database newer than this build ----

#[test]
fn an_sqlite_file_newer_than_this_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    drop(SqliteStore::open(&path, Timeouts::default()).unwrap());
    // As the next release would leave it.
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();

    match SqliteStore::open(&path, Timeouts::default()) {
        Err(StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        Err(other) => panic!("expected SchemaTooNew, got {other}"),
        Ok(_) => panic!("a file of schema {} was opened", SCHEMA_VERSION + 1),
    }
    assert_eq!(
        user_version(&Connection::open(&path).unwrap()),
        SCHEMA_VERSION + 1,
        "refusing leaves the version alone"
    );
    serve_refuses_newer_schema(&format!("sqlite:{}", path.display()));
}

#[test]
fn a_postgres_database_newer_than_this_build_is_refused() {
    let Some(schema) = fresh_schema("newer_postgres") else {
        return;
    };
    drop(open_postgres(&schema));
    let mut client = connect(&schema);
    client
        .execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .unwrap();
    let recorded = recorded_versions(&mut client);

    match PostgresStore::open_config(schema.config(), Timeouts::default()) {
        Err(StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        Err(other) => panic!("expected SchemaTooNew, got {other}"),
        Ok(_) => panic!("a database of schema {} was opened", SCHEMA_VERSION + 1),
    }
    assert_eq!(
        recorded_versions(&mut client),
        recorded,
        "refusing records nothing"
    );
    drop(client);
    serve_refuses_newer_schema(&schema.url());
}

// ---- an upgrade run again ----

#[test]
fn an_sqlite_upgrade_run_twice_changes_nothing_the_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_sqlite_fixture(dir.path());
    let snapshot = || {
        let conn = Connection::open(&path).unwrap();
        (
            user_version(&conn),
            sqlite_master(&conn),
            sqlite_rows(&conn),
        )
    };

    drop(SqliteStore::open(&path, Timeouts::default()).unwrap());
    let once = snapshot();
    assert_eq!(once.0, SCHEMA_VERSION, "the first open upgraded the file");
    drop(SqliteStore::open(&path, Timeouts::default()).unwrap());
    assert_eq!(snapshot(), once);
}

#[test]
fn a_postgres_upgrade_run_twice_changes_nothing_the_second_time() {
    let Some(schema) = fresh_schema("upgrade_postgres_twice") else {
        return;
    };
    let mut client = connect(&schema);
    load_postgres_fixture(&mut client);
    // Every row, `schema_version`'s included: a second run must not record its versions
    // again.
    let mut snapshot = || {
        (
            postgres_full_shape(&mut client, schema.name()),
            postgres_rows(&mut client),
        )
    };

    drop(open_postgres(&schema));
    let once = snapshot();
    assert_eq!(
        once.1["schema_version"].len(),
        usize::try_from(SCHEMA_VERSION - 2).unwrap(),
        "the first open recorded versions 4 and up beside 3"
    );
    drop(open_postgres(&schema));
    assert_eq!(snapshot(), once);
}

// ---- the fixtures ----

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of the schema-3 SQLite file in `dir`: the upgrade writes to the file it opens.
fn copy_sqlite_fixture(dir: &Path) -> PathBuf {
    let path = dir.join("v3.db");
    std::fs::copy(fixture_path("v3.db"), &path).expect("copy tests/fixtures/v3.db");
    path
}

/// The schema-3 dump, loaded into the (empty) schema `client` uses. The dump names nothing
/// by schema, so it lands in the first one of the search path, the only one there.
fn load_postgres_fixture(client: &mut Client) {
    client
        .batch_execute(include_str!("fixtures/v3.postgres.sql"))
        .expect("load tests/fixtures/v3.postgres.sql");
}

/// What `make-v3` wrote beside each database.
struct Fixture {
    /// The workspace's API token.
    token: String,
    /// "laptop": a completed request (two models, thinking levels, service tiers) and a
    /// failed one.
    laptop: RuntimeId,
    /// "desktop": a request that timed out unclaimed and one left pending.
    desktop: RuntimeId,
}

impl Fixture {
    fn read(name: &str) -> Fixture {
        let text = std::fs::read_to_string(fixture_path(name)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let [token, laptop, desktop] = lines[..] else {
            panic!("{name}: three lines expected, found {lines:?}");
        };
        assert!(token.starts_with("mra_"), "{name}: line 1 is an API token");
        Fixture {
            token: token.to_owned(),
            laptop: RuntimeId::parse(laptop).unwrap(),
            desktop: RuntimeId::parse(desktop).unwrap(),
        }
    }
}

/// A request the fixture lacks, written as a schema-3 release wrote one: the laptop's,
/// running, its lease far in the future, so that the upgrade meets a row in every status.
fn running_request(fixture: &Fixture) -> String {
    format!(
        "INSERT INTO requests (id, runtime_id, status, supported, created_at, updated_at,
                               deadline_at)
         VALUES ('{RUNNING_ID}', '{}', 'running', TRUE, 1777627161000, 1777627161000,
                 4102444800000)",
        fixture.laptop
    )
}

const RUNNING_ID: &str = "5eed0000000000000000000000000001";

// ---- what an upgraded database must still hold and do ----

/// Every row of every table, by table, read with plain SQL as JSON objects (column →
/// value).
type Rows = BTreeMap<String, Vec<Map<String, Value>>>;

/// Every row the last release wrote is still there, each of its columns unchanged. The
/// `schema_version` record is what an upgrade changes, so it is left out.
fn assert_nothing_lost(before: &Rows, after: &Rows) {
    let counts: BTreeMap<&str, usize> = before.iter().map(|(t, r)| (t.as_str(), r.len())).collect();
    for (table, rows) in [
        ("workspaces", 1),
        ("api_tokens", 1),
        ("runtimes", 2),
        // The fixture's four and the running one the test adds.
        ("requests", 5),
    ] {
        assert_eq!(
            counts.get(table),
            Some(&rows),
            "the fixture's {table}: {counts:?}"
        );
    }
    for (table, rows) in before {
        if table == "schema_version" {
            continue;
        }
        let now = after
            .get(table)
            .unwrap_or_else(|| panic!("table {table} is gone"));
        assert_eq!(now.len(), rows.len(), "rows of {table}");
        for row in rows {
            let key = row_key(row);
            let upgraded = now
                .iter()
                .find(|r| row_key(r) == key)
                .unwrap_or_else(|| panic!("{table} {key} is gone"));
            for (column, value) in row {
                assert_eq!(upgraded.get(column), Some(value), "{table} {key}: {column}");
            }
        }
    }
}

/// A row's primary key: the first column of every table of this schema (`api_tokens`
/// also has an `id`, since version 5, which the fixture lacks).
fn row_key(row: &Map<String, Value>) -> String {
    ["token_hash", "id", "runtime_id"]
        .iter()
        .find_map(|column| row.get(*column))
        .unwrap_or_else(|| panic!("no key column in {row:?}"))
        .to_string()
}

/// Every request and runtime of the fixture, read through this build's `Storer`: the same
/// fields the last release stored, and the columns it did not have at their defaults.
fn check_store_reads_fixture(store: &dyn Storer, fixture: &Fixture, before: &Rows) {
    let mut statuses: BTreeMap<RuntimeId, BTreeSet<String>> = BTreeMap::new();
    for row in &before["requests"] {
        let id = RequestId::parse(text(row, "id")).unwrap();
        let runtime = RuntimeId::parse(text(row, "runtime_id")).unwrap();
        let found = store
            .find_request(runtime, id)
            .unwrap()
            .unwrap_or_else(|| panic!("request {id} is not found after the upgrade"));
        let models: Vec<ModelEntry> = match &row["models"] {
            Value::Null => Vec::new(),
            stored => serde_json::from_str(stored.as_str().unwrap()).unwrap(),
        };
        assert_eq!(found.id, id);
        assert_eq!(found.runtime_id, runtime);
        assert_eq!(found.status.as_str(), text(row, "status"), "{id}");
        assert_eq!(found.models, models, "{id}");
        assert_eq!(found.supported, boolean(&row["supported"]), "{id}");
        assert_eq!(found.error.as_deref(), row["error"].as_str(), "{id}");
        assert_eq!(found.created_at, number(row, "created_at"), "{id}");
        assert_eq!(found.updated_at, number(row, "updated_at"), "{id}");
        assert_eq!(found.deadline_at, number(row, "deadline_at"), "{id}");
        assert_eq!(found.ended_at, row["ended_at"].as_i64(), "{id}");
        assert!(
            !found.fallback,
            "{id}: a report before schema 4 was never a fallback"
        );
        assert_eq!(found.cached_at, None, "{id}");
        assert_eq!(found.refresh_id, None, "{id}");
        // Every request before schema 7 was a model list.
        assert_eq!(found.kind, Kind::Models, "{id}");
        assert_eq!(
            (found.key.as_str(), &found.input, &found.result),
            ("", &None, &None)
        );

        if found.status.as_str() == "completed" {
            // The entry fields the fixture was made to carry came through.
            let [first, second] = &found.models[..] else {
                panic!("{id}: two models expected: {:?}", found.models);
            };
            let thinking = first.thinking.as_ref().expect("thinking levels");
            assert_eq!(thinking.supported_levels.len(), 2);
            assert_eq!(thinking.default_level.as_deref(), Some("low"));
            let tiers = first.service_tiers.as_ref().expect("service tiers");
            assert_eq!(tiers[0].id, "priority");
            assert_eq!(second.id, "claude-haiku-4-5");
        }
        statuses
            .entry(runtime)
            .or_default()
            .insert(found.status.as_str().to_owned());
    }
    let set = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(
        statuses[&fixture.laptop],
        set(&["completed", "failed", "running"])
    );
    assert_eq!(statuses[&fixture.desktop], set(&["pending", "timeout"]));

    let workspace = store
        .workspace_by_api_token(&Token::from_header(&fixture.token).hash())
        .unwrap()
        .expect("the fixture's API token still opens its workspace");
    // The token stored before ids existed got the id a new token would get, and can be
    // listed (never used yet) and so revoked.
    let tokens = store.list_api_tokens(workspace).unwrap();
    let hash = Token::from_header(&fixture.token).hash();
    assert_eq!(
        tokens
            .iter()
            .map(|t| (&t.id, t.last_used_at))
            .collect::<Vec<_>>(),
        [(&hash.id(), None)]
    );
    let listed = store.list_runtimes(workspace, None, 100).unwrap();
    let ids: Vec<RuntimeId> = listed.iter().map(|r| r.id).collect();
    assert_eq!(ids, [fixture.laptop, fixture.desktop], "oldest first");
    for runtime in &listed {
        let row = before["runtimes"]
            .iter()
            .find(|row| text(row, "id") == runtime.id.to_string())
            .unwrap();
        assert_eq!(runtime.workspace_id.to_string(), text(row, "workspace_id"));
        assert_eq!(runtime.name, text(row, "name"));
        assert_eq!(runtime.provider, text(row, "provider"));
        assert_eq!(runtime.last_seen_at, row["last_seen_at"].as_i64());
        assert_eq!(runtime.created_at, number(row, "created_at"));
        assert_eq!(runtime.catalog_at, None, "no catalog before schema 4");
    }
    assert_eq!(listed[0].name, "laptop");
    assert_eq!(listed[1].name, "desktop");
}

/// `model-relay serve` on the upgraded database, over HTTP: the fixture's token lists its
/// runtimes, every request it stored answers, and a new runtime goes through a whole
/// discovery (which writes the columns and the table schema 4 added).
async fn check_service_on_fixture(base: &str, fixture: &Fixture, before: &Rows) {
    let http = Http::default();
    let api = fixture.token.as_str();

    let listed = http.get(&format!("{base}/api/runtimes"), api).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.json);
    let names: BTreeMap<String, String> = listed.json["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        (fixture.laptop.to_string(), "laptop".to_owned()),
        (fixture.desktop.to_string(), "desktop".to_owned()),
    ]
    .into();
    assert_eq!(names, expected);

    for row in &before["requests"] {
        let (runtime, id, stored) = (
            text(row, "runtime_id"),
            text(row, "id"),
            text(row, "status"),
        );
        let read = http
            .get(&format!("{base}/api/runtimes/{runtime}/models/{id}"), api)
            .await;
        assert_eq!(read.status, StatusCode::OK, "{id}: {}", read.json);
        // The pending one's deadline passed long ago: whoever looks first ends it.
        let status = if stored == "pending" {
            "timeout"
        } else {
            stored
        };
        assert_eq!(read.json["status"], status, "{id}: {}", read.json);
        match stored {
            "completed" => {
                let models: Value = serde_json::from_str(text(row, "models")).unwrap();
                assert_eq!(
                    read.json["models"], models,
                    "{id}: entries as they were sent"
                );
            }
            "failed" | "timeout" => assert_eq!(read.json["error"], row["error"], "{id}"),
            _ => {}
        }
    }

    let created = http
        .post(
            &format!("{base}/api/runtimes"),
            api,
            json!({"name": "after-upgrade", "provider": "claude"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.json);
    let runtime = created.json["id"].as_str().unwrap().to_owned();
    let daemon = created.json["daemon_token"].as_str().unwrap().to_owned();
    let ask = format!("{base}/api/runtimes/{runtime}/models");
    let heartbeat = format!("{base}/api/daemon/heartbeat");
    let beat = json!({"runtime_id": runtime});

    let offline = http.post_empty(&ask, api).await;
    assert_eq!(offline.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(offline.json, json!({"error": "runtime is offline"}));

    let ack = http.post(&heartbeat, &daemon, beat.clone()).await;
    assert_eq!(ack.json, json!({"status": "ok"}), "nothing to hand out yet");
    let asked = http.post_empty(&ask, api).await;
    assert_eq!(asked.status, StatusCode::OK, "{}", asked.json);
    assert_eq!(asked.json["status"], "pending");
    let id = asked.json["id"].as_str().unwrap().to_owned();
    let ack = http.post(&heartbeat, &daemon, beat).await;
    assert_eq!(ack.json["pending_model_list"]["id"], id.as_str());
    let models =
        json!([{"id": "m1", "label": "M1", "service_tiers": [{"id": "flex", "name": "Flex"}]}]);
    let report = http
        .post(
            &format!("{base}/api/daemon/runtimes/{runtime}/models/{id}/result"),
            &daemon,
            json!({"status": "completed", "models": models}),
        )
        .await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.json);
    let done = http.get(&format!("{ask}/{id}"), api).await;
    assert_eq!(done.json["status"], "completed", "{}", done.json);
    assert_eq!(done.json["models"], models);
}

/// `model-relay serve` on a database newer than it knows: it exits with an error before it
/// listens, and says why.
fn serve_refuses_newer_schema(database: &str) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--database", database])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start model-relay serve");
    // Read its stderr to the end, which comes when it exits; should it listen instead, it
    // would never exit, so that line ends the test at once.
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("listen=") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started on a database newer than it knows:\n{stderr}{line}");
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "serve exited with {status}:\n{stderr}");
    let expected = format!(
        "the database schema is version {}, newer than this build of model-relay knows (up to {})",
        SCHEMA_VERSION + 1,
        SCHEMA_VERSION
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

fn text<'a>(row: &'a Map<String, Value>, column: &str) -> &'a str {
    row[column]
        .as_str()
        .unwrap_or_else(|| panic!("{column} is not text: {row:?}"))
}

fn number(row: &Map<String, Value>, column: &str) -> i64 {
    row[column]
        .as_i64()
        .unwrap_or_else(|| panic!("{column} is not an integer: {row:?}"))
}

/// A stored boolean: SQLite keeps 0 or 1, PostgreSQL `false` or `true`.
fn boolean(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64() != Some(0),
        other => panic!("not a boolean: {other}"),
    }
}

fn auto_vacuum(conn: &Connection) -> i64 {
    conn.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
        .unwrap()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

// ---- describing a schema ----

/// Compares two descriptions of a schema, line by line, and names what only one side has.
fn assert_same_shape(
    left_name: &str,
    left: &BTreeSet<String>,
    right_name: &str,
    right: &BTreeSet<String>,
) {
    for (name, shape) in [(left_name, left), (right_name, right)] {
        for table in TABLES {
            assert!(
                shape.contains(&format!("table {table}")),
                "{name}: no table {table} in\n{shape:#?}"
            );
        }
    }
    let only = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
        a.difference(b)
            .map(|line| format!("\n  {line}"))
            .collect::<String>()
    };
    let (only_left, only_right) = (only(left, right), only(right, left));
    assert!(
        only_left.is_empty() && only_right.is_empty(),
        "the schemas differ.\nonly in {left_name}:{only_left}\nonly in {right_name}:{only_right}"
    );
}

/// Whitespace (line breaks, indentation) collapsed to single spaces.
fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An SQLite file's schema, one line per fact: tables, their columns in order and each
/// column's declared type, NOT NULL, default and place in the primary key; CHECK
/// constraints; indexes with their columns, uniqueness, origin and partial WHERE clause;
/// foreign keys; triggers and views. Comments and layout do not count.
fn sqlite_shape(conn: &Connection) -> BTreeSet<String> {
    let mut shape = BTreeSet::new();
    let tables: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_master
              WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
        )
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (table, sql) in tables {
        shape.insert(format!("table {table}"));

        let columns: Vec<(String, String, i64, Option<String>, i64)> = conn
            .prepare(
                "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1)
                  ORDER BY cid",
            )
            .unwrap()
            .query_map([&table], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let names: Vec<&str> = columns.iter().map(|c| c.0.as_str()).collect();
        shape.insert(format!("table {table} columns: {}", names.join(", ")));
        for (name, declared, notnull, default, pk) in &columns {
            shape.insert(format!(
                "column {table}.{name}: {declared}, not null {notnull}, default {default:?}, \
                 primary key part {pk}"
            ));
        }
        for check in check_clauses(&sql) {
            shape.insert(format!("table {table} {check}"));
        }

        let indexes: Vec<(String, i64, String, Option<String>)> = conn
            .prepare(
                "SELECT il.name, il.\"unique\", il.origin, m.sql
                   FROM pragma_index_list(?1) il
                   LEFT JOIN sqlite_master m ON m.type = 'index' AND m.name = il.name",
            )
            .unwrap()
            .query_map([&table], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (name, unique, origin, sql) in indexes {
            let columns: Vec<String> = conn
                .prepare(
                    "SELECT coalesce(name, '<expression>') FROM pragma_index_info(?1)
                      ORDER BY seqno",
                )
                .unwrap()
                .query_map([&name], |row| row.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            shape.insert(format!(
                "index {name} on {table} ({}): unique {unique}, origin {origin}, where {}",
                columns.join(", "),
                partial_where(sql.as_deref())
            ));
        }

        // One line per key, its columns in order; a NULL `to` names the parent's primary key.
        let keys: Vec<(String, String, String, String, String, String)> = conn
            .prepare(
                "SELECT \"table\", group_concat(\"from\", ', ' ORDER BY seq),
                        group_concat(coalesce(\"to\", '<primary key>'), ', ' ORDER BY seq),
                        on_update, on_delete, \"match\"
                   FROM pragma_foreign_key_list(?1) GROUP BY id",
            )
            .unwrap()
            .query_map([&table], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (target, from, to, on_update, on_delete, matching) in keys {
            shape.insert(format!(
                "foreign key {table} ({from}) references {target} ({to}) on update {on_update}, \
                 on delete {on_delete}, match {matching}"
            ));
        }
    }
    let others: Vec<(String, String, String)> = conn
        .prepare("SELECT type, name, tbl_name FROM sqlite_master WHERE type IN ('trigger', 'view')")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (kind, name, table) in others {
        shape.insert(format!("{kind} {name} on {table}"));
    }
    shape
}

/// The WHERE clause of a partial index, from its `CREATE INDEX` statement; "-" for none
/// (and for the indexes SQLite makes itself, which have no statement).
fn partial_where(sql: Option<&str>) -> String {
    let Some(sql) = sql else {
        return "-".to_owned();
    };
    let sql = squeeze(sql);
    match sql.to_ascii_uppercase().find(" WHERE ") {
        Some(at) => sql[at + " WHERE ".len()..].to_owned(),
        None => "-".to_owned(),
    }
}

/// The CHECK constraints of a `CREATE TABLE` statement as SQLite keeps it (with its
/// comments, and with the columns `ALTER TABLE` added appended): SQLite has no pragma
/// that lists them.
fn check_clauses(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let code = squeeze(&code);
    let upper = code.to_ascii_uppercase();
    let mut checks = Vec::new();
    let mut from = 0;
    while let Some(found) = upper[from..].find("CHECK") {
        let start = from + found;
        from = start + "CHECK".len();
        let word_before = upper[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let rest = code[from..].trim_start();
        if word_before || !rest.starts_with('(') {
            continue;
        }
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        checks.push(format!("CHECK {}", &rest[..end]));
    }
    checks
}

fn user_version(conn: &Connection) -> i64 {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap()
}

/// Every object SQLite keeps in its schema table, as it keeps it.
fn sqlite_master(conn: &Connection) -> Vec<(String, String, String, Option<String>)> {
    conn.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap()
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn sqlite_rows(conn: &Connection) -> Rows {
    use rusqlite::types::Value as Sql;
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master
              WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut all = Rows::new();
    for table in tables {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY 1"))
            .unwrap();
        let names: Vec<String> = stmt
            .column_names()
            .iter()
            .map(|n| (*n).to_owned())
            .collect();
        let rows = stmt
            .query_map([], |row| {
                let mut object = Map::new();
                for (i, name) in names.iter().enumerate() {
                    let value = match row.get::<_, Sql>(i)? {
                        Sql::Null => Value::Null,
                        Sql::Integer(n) => json!(n),
                        Sql::Real(x) => json!(x),
                        Sql::Text(s) => Value::String(s),
                        Sql::Blob(b) => json!(b),
                    };
                    object.insert(name.clone(), value);
                }
                Ok(object)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        all.insert(table, rows);
    }
    all
}

fn connect(schema: &PgSchema) -> Client {
    schema
        .config()
        .connect(NoTls)
        .expect("connect to the test schema")
}

fn open_postgres(schema: &PgSchema) -> PostgresStore {
    PostgresStore::open_config(schema.config(), Timeouts::default())
        .expect("open the PostgreSQL store")
}

/// Every version in the `schema_version` record, in order.
fn recorded_versions(client: &mut Client) -> Vec<i64> {
    client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Definitions as PostgreSQL prints them name the schema; test schemas have random names.
fn unqualified(definition: &str, schema: &str) -> String {
    squeeze(
        &definition
            .replace(&format!("\"{schema}\"."), "")
            .replace(&format!("{schema}."), ""),
    )
}

/// A PostgreSQL schema's tables as `schema.sql` states them, one line per fact: tables,
/// their columns in order with type, nullability and default; indexes as
/// `pg_get_indexdef` prints them; constraints as `pg_get_constraintdef` does. Left out:
/// `schema_version` (the record of the migrations, not part of the schema), and the
/// wake-up triggers and their function, which only the migrations make.
fn postgres_shape(client: &mut Client, schema: &str) -> BTreeSet<String> {
    let mut shape = BTreeSet::new();
    for row in client
        .query(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
                AND table_name <> 'schema_version'",
            &[],
        )
        .unwrap()
    {
        shape.insert(format!("table {}", row.get::<_, String>(0)));
    }
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text,
                    column_default::text
               FROM information_schema.columns
              WHERE table_schema = current_schema() AND table_name <> 'schema_version'
              ORDER BY table_name, ordinal_position",
            &[],
        )
        .unwrap()
    {
        let (table, column): (String, String) = (row.get(0), row.get(1));
        let (data_type, nullable, default): (String, String, Option<String>) =
            (row.get(2), row.get(3), row.get(4));
        shape.insert(format!(
            "column {table}.{column}: {data_type}, nullable {nullable}, default {default:?}"
        ));
        order.entry(table).or_default().push(column);
    }
    for (table, columns) in order {
        shape.insert(format!("table {table} columns: {}", columns.join(", ")));
    }
    for row in client
        .query(
            "SELECT tablename::text, indexdef FROM pg_indexes
              WHERE schemaname = current_schema() AND tablename <> 'schema_version'",
            &[],
        )
        .unwrap()
    {
        let (table, definition): (String, String) = (row.get(0), row.get(1));
        shape.insert(format!(
            "index on {table}: {}",
            unqualified(&definition, schema)
        ));
    }
    for row in client
        .query(
            "SELECT t.relname::text, c.conname::text, c.contype::text, pg_get_constraintdef(c.oid)
               FROM pg_constraint c
               JOIN pg_class t ON t.oid = c.conrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE n.nspname = current_schema() AND t.relname <> 'schema_version'",
            &[],
        )
        .unwrap()
    {
        let (table, name, kind, definition): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        shape.insert(format!(
            "constraint {name} ({kind}) on {table}: {}",
            unqualified(&definition, schema)
        ));
    }
    shape
}

/// [`postgres_shape`], and what only the migrations make: the triggers and the functions
/// they call.
fn postgres_full_shape(client: &mut Client, schema: &str) -> BTreeSet<String> {
    let mut shape = postgres_shape(client, schema);
    for row in client
        .query(
            "SELECT t.tgname::text, pg_get_triggerdef(t.oid)
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = current_schema() AND NOT t.tgisinternal",
            &[],
        )
        .unwrap()
    {
        let (name, definition): (String, String) = (row.get(0), row.get(1));
        shape.insert(format!(
            "trigger {name} {}",
            unqualified(&definition, schema)
        ));
    }
    for row in client
        .query(
            "SELECT p.proname::text, pg_get_functiondef(p.oid)
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = current_schema()",
            &[],
        )
        .unwrap()
    {
        let (name, definition): (String, String) = (row.get(0), row.get(1));
        shape.insert(format!(
            "function {name} {}",
            unqualified(&definition, schema)
        ));
    }
    shape
}

/// Every row of every table of the schema `client` uses, `schema_version` included.
fn postgres_rows(client: &mut Client) -> Rows {
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut all = Rows::new();
    for table in tables {
        let mut rows: Vec<Map<String, Value>> = client
            .query(&format!("SELECT to_jsonb(t)::text FROM \"{table}\" t"), &[])
            .unwrap()
            .iter()
            .map(|row| serde_json::from_str(row.get::<_, &str>(0)).unwrap())
            .collect();
        rows.sort_by_key(|row| Value::Object(row.clone()).to_string());
        all.insert(table, rows);
    }
    all
}
