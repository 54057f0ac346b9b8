//! Report bodies (`POST …/result`): parsed or refused as a bad request, never a panic;
//! an accepted end never carries a model without an id, nor an empty error, nor text that
//! an engine could not hold (a NUL, a control character in an id).
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_report};
use model_relay::model::{Report, Status, holds_control};

fuzz_target!(|body: &[u8]| {
    match parse_report(body) {
        Ok(Report::Running) => {}
        Ok(Report::Progress(_)) => panic!("a model list's report carries no progress"),
        Ok(Report::Ended(outcome)) => {
            assert!(matches!(outcome.status, Status::Completed | Status::Failed));
            assert!(outcome.models.iter().all(|m| !m.id.trim().is_empty()));
            assert!(outcome.error.as_deref().is_none_or(|e| !e.is_empty()));
            // Text every engine holds alike: no control character in an id, no NUL
            // anywhere (cleaning it again changes nothing).
            assert!(outcome.models.iter().all(|m| !holds_control(&m.id)));
            let mut cleaned = outcome.clone();
            cleaned.replace_nul();
            assert_eq!(cleaned, outcome);
        }
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
});
