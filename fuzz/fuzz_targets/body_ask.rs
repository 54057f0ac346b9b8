//! Bodies of the UI's "list the models" (`POST …/models`): whether to skip the catalog, or
//! a bad request; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_ask};

fuzz_target!(|body: &[u8]| {
    if let Err(e) = parse_ask(body) {
        assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}");
    }
});
