//! Helpers shared by the integration tests; each test binary includes them with `mod support;`.
// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod engines;
pub mod harness;
pub mod pgbouncer;
pub mod postgres;
pub mod process;
pub mod prom;
pub mod server;
pub mod tls;
