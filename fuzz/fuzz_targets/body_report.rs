//! Report bodies (`POST …/result`): parsed or refused as a bad request, never a panic;
//! an accepted end never carries a model without an id, nor an empty error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_report};
use model_relay::model::{Report, Status};

fuzz_target!(|body: &[u8]| {
    match parse_report(body) {
        Ok(Report::Running) => {}
        Ok(Report::Ended(outcome)) => {
            assert!(matches!(outcome.status, Status::Completed | Status::Failed));
            assert!(outcome.models.iter().all(|m| !m.id.trim().is_empty()));
            assert!(outcome.error.as_deref().is_none_or(|e| !e.is_empty()));
        }
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
});
