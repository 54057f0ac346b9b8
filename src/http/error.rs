//! Every way a call can fail, and the one place that maps each to a status code.

use hyper::body::Bytes;
use hyper::{Response, StatusCode, header};

use super::json;
use crate::errors::error_chain;
use crate::ids::RandomError;
use crate::instance::TooManyWaiting;
use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// The body or a field in it is malformed; the message says which and why.
    BadRequest(String),
    /// No bearer token, or one that belongs to nobody.
    Unauthorized,
    /// No such thing for this caller: unknown, or someone else's (the same answer for both).
    NotFound(&'static str),
    /// The path exists, the method does not; the methods that do.
    MethodNotAllowed(&'static str),
    /// The request is not in a state that allows this report.
    Conflict(String),
    /// The body is larger than the configured limit.
    PayloadTooLarge(usize),
    /// The body did not arrive in time.
    RequestTimeout,
    /// The runtime's daemon has not heartbeated within `offline_after`.
    RuntimeOffline,
    /// `--max-waiting` calls are held already, or the caller's share of them.
    TooManyWaiting(TooManyWaiting),
    /// The workspace stores `--max-requests-per-workspace` requests already.
    TooManyStored(u64),
    /// Answers not yet taken by their clients hold the whole budget of the connection
    /// (true) or of the server (false).
    AnswersQueued(bool),
    /// The store could not answer. Never a 404 and never a 200: the caller must retry.
    StoreUnavailable(StoreError),
    /// A bug: a store call panicked, or the OS random source failed.
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::StoreUnavailable(e)
    }
}

impl From<TooManyWaiting> for ApiError {
    fn from(cap: TooManyWaiting) -> Self {
        ApiError::TooManyWaiting(cap)
    }
}

impl From<RandomError> for ApiError {
    fn from(e: RandomError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            // A tenant past its share asks too much; past the total the server is full.
            ApiError::TooManyStored(_)
            | ApiError::TooManyWaiting(TooManyWaiting::Runtime | TooManyWaiting::Workspace) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::RuntimeOffline
            | ApiError::TooManyWaiting(TooManyWaiting::Total)
            | ApiError::AnswersQueued(_)
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the caller reads. Store errors are summarized: their cause goes to the log.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m) | ApiError::Conflict(m) => m.clone(),
            ApiError::Unauthorized => "missing or invalid bearer token".to_owned(),
            ApiError::NotFound(what) => format!("{what} not found"),
            ApiError::MethodNotAllowed(allowed) => format!("method not allowed; use {allowed}"),
            ApiError::PayloadTooLarge(limit) => format!("body larger than {limit} bytes"),
            ApiError::RequestTimeout => "body not received in time".to_owned(),
            ApiError::RuntimeOffline => "runtime is offline".to_owned(),
            ApiError::TooManyWaiting(TooManyWaiting::Total) => "too many waiting calls".to_owned(),
            ApiError::TooManyWaiting(TooManyWaiting::Runtime) => {
                "too many waiting calls for this runtime".to_owned()
            }
            ApiError::TooManyWaiting(TooManyWaiting::Workspace) => {
                "too many waiting calls for this workspace".to_owned()
            }
            ApiError::TooManyStored(max) => format!(
                "this workspace stores {max} requests, the most allowed: try again once older ones have passed retention"
            ),
            ApiError::AnswersQueued(true) => {
                "too many answers not yet read on this connection".to_owned()
            }
            ApiError::AnswersQueued(false) => "too many answers not yet read".to_owned(),
            ApiError::StoreUnavailable(_) => "store unavailable".to_owned(),
            ApiError::Internal(_) => "internal error".to_owned(),
        }
    }

    pub fn into_response(self) -> Response<Bytes> {
        match &self {
            ApiError::StoreUnavailable(cause) => {
                tracing::warn!(error = %error_chain(cause), "store unavailable");
            }
            ApiError::Internal(cause) => tracing::error!(%cause, "internal error"),
            _ => {}
        }
        let mut response = json::json(self.status(), &json::ErrorBody::new(self.message()));
        if let ApiError::MethodNotAllowed(allowed) = self {
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
        }
        response
    }
}
