//! Helpers shared by the integration tests; each test binary includes them with `mod support;`.
// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod postgres;
pub mod prom;
pub mod server;
