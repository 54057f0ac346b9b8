//! One helper every layer uses to log a failure: an error with all its causes on one line.
//! It lives apart so that the store, the HTTP layer and the command line share it without
//! depending on each other.

/// An error and all its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
