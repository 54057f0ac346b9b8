//! The bodies of every kind but `models` (`POST …/<kind>` and `…/<kind>/{id}/result`): the
//! first byte picks the kind, the rest is the body. Parsed or refused as a bad request,
//! never a panic; what is accepted is what the store may keep: a key and input within
//! bounds, a result that is one JSON object, an update's output within its 64 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_input, parse_result};
use model_relay::kind::Kind;
use model_relay::model::{Report, Status, holds_control};

fn object(json: &str) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str(json) {
        Ok(serde_json::Value::Object(fields)) => fields,
        other => panic!("not a JSON object: {json:?} ({other:?})"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kind = Kind::ALL[1 + usize::from(pick) % (Kind::ALL.len() - 1)];
    match parse_input(kind, body) {
        Ok(input) => {
            assert!(!holds_control(&input.key) && input.key.chars().count() <= 1000);
            assert_eq!(input.key.is_empty(), kind.spec().key_field.is_none());
            if let Some(json) = &input.json {
                let fields = object(json);
                if let Some(field) = kind.spec().key_field {
                    assert_eq!(fields[field], input.key.as_str());
                }
            }
        }
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
    match parse_result(kind, body) {
        Ok(Report::Running) => {}
        Ok(Report::Progress(json)) => {
            assert_eq!(kind, Kind::Update);
            let output = object(&json)["output"].as_str().map(str::len);
            assert!(output.is_some_and(|n| n <= 64 * 1024), "{json:?}");
        }
        Ok(Report::Ended(outcome)) => {
            assert!(matches!(outcome.status, Status::Completed | Status::Failed));
            assert!(outcome.models.is_empty() && !outcome.fallback);
            assert!(outcome.error.as_deref().is_none_or(|e| !e.is_empty()));
            if let Some(json) = &outcome.result {
                object(json);
            }
            if outcome.status == Status::Completed && kind != Kind::Update {
                assert!(
                    outcome.result.is_some(),
                    "a completed {kind:?} has its result"
                );
            }
        }
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
});
