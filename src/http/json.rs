//! JSON answers: the one way an answer's body is made, and the two bodies every layer sends
//! (an error, a plain "ok"). Apart from `wire`, whose parsers answer with `ApiError`, so
//! that `error` can make its answers without depending on `wire`.

use hyper::body::Bytes;
use hyper::{Response, StatusCode, header};
use serde::Serialize;

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Bytes> {
    // Our response types are plain structs of strings, numbers and booleans; serializing
    // them cannot fail, but if it ever did the caller still gets valid JSON.
    let bytes =
        serde_json::to_vec(body).unwrap_or_else(|_| br#"{"error":"internal error"}"#.to_vec());
    let mut response = Response::new(Bytes::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

#[derive(Serialize)]
pub struct ErrorBody {
    error: String,
}

impl ErrorBody {
    pub fn new(error: String) -> Self {
        ErrorBody { error }
    }
}

#[derive(Serialize)]
pub struct StatusOk {
    status: &'static str,
}

pub const OK: StatusOk = StatusOk { status: "ok" };
