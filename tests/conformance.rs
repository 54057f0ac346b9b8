//! The conformance suite: each rule of DESIGN.md's state machine tested once, and run
//! against every engine of `support/engines.rs`, so that it holds for memory, SQLite and
//! PostgreSQL alike. A case takes an [`Engine`](support::engines::Engine), opens store
//! handles on it (two, for races), and passes the time of a fake clock to the store as `now`.
//!
//! The cases are grouped by topic, one file each in `conformance/`, with the helpers they
//! share in `conformance/common.rs`. The topics about requests (create, claim, report,
//! expiry, listen, tenancy) run every case for every kind of request (`kind_tests!`: named
//! `<topic>::<kind>::<engine>::<case>`, the helpers making requests of that kind); the
//! others say at their list why they are about model lists, or no kind, only. Each topic file lists its cases in `engine_tests!`,
//! so a test is named `<topic>::<engine>::<case>`. A new topic is a new file and a `mod`
//! line here; a new engine is added in `support/engines.rs` alone. Tests of one engine's
//! own behaviour sit in the topic they belong to, named after their engine.
//!
//! PostgreSQL comes from `DATABASE_URL`, a container, or a throwaway local cluster (see
//! `support/postgres.rs`); each test gets its own schema. Under `REQUIRE_POSTGRES=1` a missing
//! PostgreSQL fails the test instead of skipping it.

#[path = "conformance/catalog.rs"]
mod catalog;
#[path = "conformance/claim.rs"]
mod claim;
#[path = "conformance/common.rs"]
mod common;
#[path = "conformance/create.rs"]
mod create;
#[path = "conformance/expiry.rs"]
mod expiry;
#[path = "conformance/kinds.rs"]
mod kinds;
#[path = "conformance/limits.rs"]
mod limits;
#[path = "conformance/listen.rs"]
mod listen;
#[path = "conformance/report.rs"]
mod report;
#[path = "conformance/stored.rs"]
mod stored;
mod support;
#[path = "conformance/tenancy.rs"]
mod tenancy;
#[path = "conformance/text.rs"]
mod text;
#[path = "conformance/tokens.rs"]
mod tokens;
