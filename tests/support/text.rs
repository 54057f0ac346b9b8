//! A plain `GET` that keeps the body as text, for the page and its assets (the JSON client
//! in `server.rs` insists on JSON). Included with `#[path]` by the tests that need it.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub struct Text {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

pub async fn fetch(method: Method, url: &str) -> Text {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Text {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}
