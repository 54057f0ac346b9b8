//! The page at `GET /` and its assets, as the server sends them: embedded, locked down by
//! headers, and only under GET.

mod support;
#[path = "support/text.rs"]
mod text;

use std::sync::Arc;

use hyper::{Method, StatusCode};
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use support::server::{Instance, clock, settings};

async fn server() -> Instance {
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(model_relay::kind::PerKind::defaults()));
    Instance::start(store, clock(), settings()).await
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_content_security_policy() {
    let server = server().await;
    for (path, content_type, marker) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<label for=\"token\">API token</label>",
        ),
        (
            "/assets/app.js",
            "text/javascript; charset=utf-8",
            "Could not discover models.",
        ),
        (
            "/assets/style.css",
            "text/css; charset=utf-8",
            ":focus-visible",
        ),
    ] {
        let got = text::fetch(Method::GET, &format!("{}{path}", server.base)).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert_eq!(got.headers["content-type"], content_type, "{path}");
        assert!(got.body.contains(marker), "{path} holds {marker:?}");
        let csp = got.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"));
        assert_eq!(got.headers["x-content-type-options"], "nosniff");
        assert_eq!(got.headers["referrer-policy"], "no-referrer");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_page_loads_nothing_from_elsewhere() {
    let server = server().await;
    let page = text::fetch(Method::GET, &format!("{}/", server.base)).await;
    for outside in ["http://", "https://", "//cdn", "<script>"] {
        assert!(
            !page.body.contains(outside),
            "the page mentions {outside:?}"
        );
    }
    assert!(
        page.body
            .contains(r#"<script src="/assets/app.js" defer></script>"#)
    );
    server.stop().await;
}

#[tokio::test]
async fn unknown_assets_are_404_and_the_page_answers_only_get_and_head() {
    let server = server().await;
    let missing = text::fetch(Method::GET, &format!("{}/assets/nope.js", server.base)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.body, r#"{"error":"asset not found"}"#);
    let posted = text::fetch(Method::POST, &format!("{}/", server.base)).await;
    assert_eq!(posted.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(posted.headers["allow"], "GET, HEAD");
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_is_served_as_it_is_checked_in() {
    let server = server().await;
    let got = text::fetch(Method::GET, &format!("{}/openapi.yaml", server.base)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers["content-type"],
        "application/yaml; charset=utf-8"
    );
    assert_eq!(got.body, include_str!("../openapi.yaml"));
    server.stop().await;
}
