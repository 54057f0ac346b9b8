//! Durations and database URLs as the command line and the environment give them: parsed
//! or refused with a message, never a panic; a refused URL's message never shows a password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::config::{DatabaseUrl, parse_duration, redact};
use model_relay::store::postgres::PoolMode;

fuzz_target!(|s: &str| {
    if let Ok(d) = parse_duration(s) {
        assert!(!d.is_zero());
    }
    match DatabaseUrl::parse(s) {
        Ok(DatabaseUrl::Sqlite { path, .. }) => assert!(!path.as_os_str().is_empty()),
        Ok(DatabaseUrl::Postgres { url, pool_mode }) => {
            // Only model-relay's own `pool_mode` parameter is taken out of what the driver
            // gets; transaction pooling only when asked for.
            let (base, query) = url.split_once('?').unwrap_or((&url, ""));
            assert!(s.starts_with(base), "{s:?} -> {url:?}");
            assert!(
                !query.split('&').any(|p| p.starts_with("pool_mode=")),
                "{url:?}"
            );
            if pool_mode == PoolMode::Transaction {
                assert!(s.contains("pool_mode=transaction"), "{s:?}");
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
    let redacted = redact(s);
    // A password in `scheme://user:password@host` is never shown.
    if let (Some(scheme_end), Some(at)) = (s.find("://"), s.rfind('@')) {
        if at > scheme_end {
            if s[scheme_end + 3..at].contains(':') {
                assert!(redacted.contains(":***@"), "{s:?} -> {redacted:?}");
            }
        }
    }
});
