//! Checks the test PostgreSQL support in `tests/support/postgres.rs` itself.
//!
//! Each test skips (loudly) when no PostgreSQL is found, unless `REQUIRE_POSTGRES=1`.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use postgres::{Client, NoTls};
use support::postgres::{PgSchema, fresh_schema, own};

fn connect(schema: &PgSchema) -> Client {
    schema
        .config()
        .connect(NoTls)
        .expect("connect with the schema's config")
}

fn schema_exists(client: &mut Client, name: &str) -> bool {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&name],
        )
        .expect("query pg_namespace");
    row.get::<_, i64>(0) == 1
}

#[test]
fn schema_is_fresh_used_by_the_config_and_dropped() {
    let Some(schema) = fresh_schema("schema_is_fresh_used_by_the_config_and_dropped") else {
        return;
    };
    let name = schema.name().to_owned();
    let config = schema.config();
    let mut client = connect(&schema);

    assert!(schema_exists(&mut client, &name));
    let objects: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1",
            &[&name],
        )
        .expect("count objects")
        .get(0);
    assert_eq!(objects, 0, "a fresh schema is empty");

    let current: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .expect("current_schema")
        .get(0);
    assert_eq!(current.as_deref(), Some(name.as_str()));

    client
        .batch_execute("CREATE TABLE probe (x INT); INSERT INTO probe VALUES (7)")
        .expect("create an unqualified table");
    let schemas: Vec<String> = client
        .query(
            "SELECT table_schema::text FROM information_schema.tables WHERE table_name = 'probe'",
            &[],
        )
        .expect("find the table")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        schemas.contains(&name),
        "probe is in {schemas:?}, not in {name}"
    );
    let x: i32 = client
        .query_one(&format!("SELECT x FROM \"{name}\".probe"), &[])
        .expect("read it back qualified")
        .get(0);
    assert_eq!(x, 7);
    drop(client);

    drop(schema);
    // Connecting with a search_path naming a missing schema is fine; it just finds nothing.
    let mut client = config.connect(NoTls).expect("connect after the drop");
    assert!(
        !schema_exists(&mut client, &name),
        "{name} outlived its guard"
    );
}

#[test]
fn schemas_are_isolated_and_named_from_the_test() {
    let test_name = "Weird::Name-With CAPS, and a very long tail beyond thirty chars";
    let (Some(a), Some(b)) = (fresh_schema(test_name), fresh_schema(test_name)) else {
        return;
    };
    for schema in [&a, &b] {
        let name = schema.name();
        assert!(
            name.starts_with("t_weird_name_with_caps_and_a_ver_"),
            "unexpected name {name}"
        );
        assert!(name.len() <= 2 + 30 + 1 + 8, "{name} is too long");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name} needs quoting"
        );
        let random = &name[name.len() - 8..];
        assert!(random.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
    }
    assert_ne!(a.name(), b.name());

    // The same unqualified table name in both, without a clash.
    let mut in_a = connect(&a);
    let mut in_b = connect(&b);
    in_a.batch_execute("CREATE TABLE probe (x INT); INSERT INTO probe VALUES (1)")
        .expect("table in a");
    in_b.batch_execute("CREATE TABLE probe (x INT); INSERT INTO probe VALUES (2), (3)")
        .expect("table in b");
    let count = |c: &mut Client| -> i64 {
        c.query_one("SELECT count(*) FROM probe", &[])
            .expect("count")
            .get(0)
    };
    assert_eq!(count(&mut in_a), 1);
    assert_eq!(count(&mut in_b), 2);
}

#[test]
fn url_round_trips_to_the_same_config() {
    let Some(schema) = fresh_schema("url_round_trips_to_the_same_config") else {
        return;
    };
    let url = schema.url();
    assert!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "{url}"
    );
    assert!(
        url.contains(&format!("-c%20search_path%3D{}", schema.name())),
        "{url}"
    );
    let parsed: postgres::Config = url.parse().expect("the URL parses");
    let config = schema.config();
    assert_eq!(parsed.get_options(), config.get_options());
    assert_eq!(parsed.get_hosts(), config.get_hosts());
    assert_eq!(parsed.get_ports(), config.get_ports());
    assert_eq!(parsed.get_user(), config.get_user());
    assert_eq!(parsed.get_dbname(), config.get_dbname());
    assert_eq!(parsed.get_password(), config.get_password());

    let mut client = parsed.connect(NoTls).expect("connect with the parsed URL");
    let current: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .expect("current_schema")
        .get(0);
    assert_eq!(current.as_deref(), Some(schema.name()));

    // What a child process given the URL sees: only this schema on its search path.
    let search_path: String = client
        .query_one("SHOW search_path", &[])
        .expect("search_path")
        .get(0);
    assert_eq!(search_path, schema.name());
}

/// The synchronous client panics inside a tokio runtime; the helper keeps it off the
/// runtime's threads, for creating and for dropping.
async fn create_and_drop_inside_a_runtime(test_name: &str) {
    let Some(schema) = fresh_schema(test_name) else {
        return;
    };
    let name = schema.name().to_owned();
    let config = schema.config();
    let exists = move |name: String| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = config.connect(NoTls).expect("connect");
            schema_exists(&mut client, &name)
        })
    };
    assert!(exists(name.clone()).await.expect("check task"));
    drop(schema);
    assert!(!exists(name.clone()).await.expect("check task"));
}

#[tokio::test]
async fn works_inside_a_current_thread_runtime() {
    create_and_drop_inside_a_runtime("works_inside_a_current_thread_runtime").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_inside_a_multi_thread_runtime() {
    create_and_drop_inside_a_runtime("works_inside_a_multi_thread_runtime").await;
}

// ---------------------------------------------------------------------------------------
// Checks of what every other test shares: on a discovery and a cluster of their own.

/// The local cluster (what a test process uses without `DATABASE_URL`) goes away, and its
/// temp dir with it, once the watchdog's stdin closes — which is what happens when the test
/// process exits, however it exits.
#[test]
fn local_cluster_is_removed_when_its_test_process_goes() {
    let cluster = match own::Cluster::start() {
        Ok(cluster) => cluster,
        Err(e) if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("REQUIRE_POSTGRES=1 but no local cluster: {e}")
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED local_cluster_is_removed_when_its_test_process_goes: {e}"
            );
            return;
        }
    };
    let config = cluster.config();
    let port = config.get_ports()[0];
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(accepts(addr), "the cluster is not up on {addr}");
    let dir = cluster.dir.clone();
    assert!(dir.exists());

    cluster.abandon();
    assert!(!accepts(addr), "the server on {addr} outlived its watchdog");
    assert!(!dir.exists(), "{} outlived its watchdog", dir.display());
}

fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// A `DATABASE_URL` that does not connect fails the tests; it is never a skip.
#[test]
fn unreachable_database_url_fails_instead_of_skipping() {
    let found = own::discover_with(Some("postgres://nobody@127.0.0.1:1/none"));
    let error = found.expect_err("an unreachable DATABASE_URL must be an error");
    assert!(
        error.contains("DATABASE_URL=postgres://nobody@127.0.0.1:1/none does not connect"),
        "{error}"
    );
}
