//! `POST /api/daemon/heartbeat` bodies: any bytes are parsed or refused as a bad request,
//! never a panic; what is accepted is a runtime id that survives its own round trip, and
//! request ids in `working_on` that do too, within the bound on their number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_heartbeat};
use model_relay::ids::{RequestId, RuntimeId};

fuzz_target!(|body: &[u8]| {
    match parse_heartbeat(body) {
        Ok(beat) => {
            let id = beat.runtime_id;
            assert_eq!(RuntimeId::parse(&id.to_string()), Some(id));
            for held in beat.working_on.iter().flatten() {
                assert_eq!(RequestId::parse(&held.to_string()), Some(*held));
            }
            assert!(beat.working_on.is_none_or(|w| w.len() <= 1000));
        }
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
});
