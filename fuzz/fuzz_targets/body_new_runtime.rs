//! `POST /api/runtimes` bodies: parsed or refused as a bad request, never a panic; what is
//! accepted is trimmed, non-empty, within its bound and free of control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_new_runtime};

fn well_formed(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.trim() == value
        && value.chars().count() <= max
        && !value.chars().any(char::is_control)
}

fuzz_target!(|body: &[u8]| {
    match parse_new_runtime(body) {
        Ok(new) => {
            assert!(well_formed(&new.name, 200), "{:?}", new.name);
            assert!(well_formed(&new.provider, 100), "{:?}", new.provider);
        }
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
});
