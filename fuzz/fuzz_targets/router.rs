//! Paths and ids as the network sends them: the router resolves any path or none, without
//! a panic, and every id it hands on parses only in a form that round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::Route;
use model_relay::ids::{RequestId, RuntimeId};

fuzz_target!(|path: &str| {
    if let Some(route) = Route::resolve(path) {
        assert!(route.template().starts_with('/'));
        assert!(!route.allowed().is_empty());
        let ids: &[&str] = match route {
            Route::Runtime(rt) | Route::Create(rt, _) | Route::DaemonToken(rt) => &[rt],
            Route::Read(rt, _, id) | Route::Result(rt, _, id) => &[rt, id],
            _ => &[],
        };
        for id in ids {
            assert!(!id.is_empty() && !id.contains('/'), "{path:?}");
        }
    }
    // Only the canonical spelling is a request id.
    if let Some(id) = RequestId::parse(path) {
        assert_eq!(id.to_string(), path);
    }
    if let Some(id) = RuntimeId::parse(path) {
        assert_eq!(RuntimeId::parse(&id.to_string()), Some(id));
    }
});
