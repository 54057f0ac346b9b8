//! `POST /api/daemon/heartbeat` bodies: any bytes are parsed or refused as a bad request,
//! never a panic; what is accepted is a runtime id that survives its own round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_relay::http::{ApiError, parse_heartbeat};
use model_relay::ids::RuntimeId;

fuzz_target!(|body: &[u8]| {
    match parse_heartbeat(body) {
        Ok(id) => assert_eq!(RuntimeId::parse(&id.to_string()), Some(id)),
        Err(e) => assert!(matches!(e, ApiError::BadRequest(_)), "{e:?}"),
    }
});
