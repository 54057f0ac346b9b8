//! The web page at `GET /`: static HTML, JavaScript and CSS compiled into the binary. No
//! build step and nothing from a CDN, so the page works wherever the server does and is
//! exactly the version of the API it talks to.

use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");
/// The API's description, served at `GET /openapi.yaml`: compiled in, so it is always the
/// document of the build that serves it.
pub const OPENAPI: &str = include_str!("../../openapi.yaml");

/// Only our own files, and calls to our own API: no inline script, nothing from elsewhere.
/// An injected `<script>` could read the token from local storage, so this matters.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page itself.
pub fn page() -> Response<Bytes> {
    file(INDEX, "text/html; charset=utf-8")
}

/// A file under `/assets/`, if there is one by that name.
pub fn asset(name: &str) -> Option<Response<Bytes>> {
    match name {
        "app.js" => Some(file(SCRIPT, "text/javascript; charset=utf-8")),
        "style.css" => Some(file(STYLE, "text/css; charset=utf-8")),
        _ => None,
    }
}

/// `GET /openapi.yaml`.
pub fn openapi() -> Response<Bytes> {
    file(OPENAPI, "application/yaml; charset=utf-8")
}

fn file(body: &'static str, content_type: &'static str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from_static(body.as_bytes()));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The page may be opened with the token in its URL fragment; send no referrer anywhere.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidate each time, so a page never outlives the server version it came with.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
