//! The web page in a real browser (headless Chromium over WebDriver) against a real server
//! and three in-process daemons: one finds models, one finds none, one fails. The page must
//! tell the three apart, offer the models found, and always take a typed model ID.

#[path = "browser/driver.rs"]
mod driver;
mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::{Driver, announce};
use fantoccini::key::Key;
use fantoccini::{Client, Locator};
use http_body_util::Full;
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::service::service_fn;
use model_relay::clock::SystemClock;
use model_relay::daemon::{self, Discovery, Source};
use model_relay::ids::{RuntimeId, Token};
use model_relay::model::ModelEntry;
use model_relay::store::Storer;
use model_relay::store::memory::MemoryStore;
use serde_json::json;
use support::server::{Http, Instance, settings, workspace};
use tokio::sync::watch;

/// Only a broken page makes a healthy wait take this long.
const DEADLINE: Duration = Duration::from_secs(30);
const FAILED_TEXT: &str = "Could not discover models. Type a model ID or try again.";

fn catalogue() -> Vec<ModelEntry> {
    let model = |id: &str, label: &str, default| ModelEntry {
        id: id.into(),
        label: label.into(),
        provider: Some("anthropic".into()),
        default,
        thinking: None,
        service_tiers: None,
    };
    vec![
        model("claude-sonnet-4-6", "Claude Sonnet 4.6", Some(true)),
        model("claude-haiku-4-5", "Claude Haiku 4.5", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_tells_models_found_none_and_failure_apart_in_chromium() {
    let Some(tools) =
        driver::tools("the_page_tells_models_found_none_and_failure_apart_in_chromium")
    else {
        return;
    };
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&artifacts).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let empty_file = scratch.path().join("models.json");
    std::fs::write(&empty_file, r#"{"models": [], "supported": true}"#).unwrap();
    // The slow runtime's discovery lasts until the scenario creates this file.
    let gate = scratch.path().join("open");
    let slow = format!(
        "while [ ! -e '{}' ]; do sleep 0.05; done; echo '[{{\"id\":\"slow-model\",\"label\":\"Slow\"}}]'",
        gate.display()
    );

    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Default::default()));
    let (_, api) = workspace(store.as_ref(), 0);
    let server = Instance::start(store, Arc::new(SystemClock), settings()).await;
    let (stop_daemons, daemons_stop) = watch::channel(false);
    let sources = [
        (
            "alpha-laptop",
            Source::Fixed(Discovery::Found {
                models: catalogue(),
                supported: true,
            }),
        ),
        ("empty-box", Source::ModelsFile(empty_file)),
        (
            "broken-box",
            Source::Command("echo 'codex: not signed in' >&2; exit 3".into()),
        ),
        ("slow-box", Source::Command(slow)),
    ];
    let http = Http::default();
    let mut daemons = Vec::new();
    for (name, source) in sources {
        let created = http
            .post(
                &format!("{}/api/runtimes", server.base),
                &api,
                json!({"name": name, "provider": "test"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
        let rt = RuntimeId::parse(created.json["id"].as_str().unwrap()).unwrap();
        let token = Token::from_header(created.json["daemon_token"].as_str().unwrap());
        let mut config = daemon::Config::new(&server.base, rt, token, source).unwrap();
        config.heartbeat_interval = Duration::from_millis(200);
        let mut stop = daemons_stop.clone();
        daemons.push(tokio::spawn(daemon::run(config, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }

    let driver = Driver::start(&tools, &artifacts.join("chromedriver.log"));
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(&tools, profile.path()).await;
    // The scenario runs in a task so that a failed assertion still lets us take the
    // screenshot and close the browser before the test fails.
    let scenario = tokio::spawn(scenario(client.clone(), server.base.clone(), api, gate));
    let outcome = scenario.await;
    let screenshot = artifacts.join("discovery.png");
    match client.screenshot().await {
        Ok(png) => {
            std::fs::write(&screenshot, png).unwrap();
            announce(&format!("browser screenshot: {}", screenshot.display()));
        }
        Err(e) => announce(&format!("no browser screenshot: {e}")),
    }
    let _ = client.close().await;
    drop(driver);
    let _ = stop_daemons.send(true);
    for daemon in daemons {
        daemon.await.unwrap().unwrap();
    }
    server.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(client: Client, base: String, api: String, gate: PathBuf) {
    client.goto(&format!("{base}/")).await.unwrap();
    let token = client.find(Locator::Id("token")).await.unwrap();
    token.send_keys(&api).await.unwrap();
    // Signs in with the keyboard: Enter in the field submits the form.
    token.send_keys(&Key::Enter).await.unwrap();

    for name in ["alpha-laptop", "empty-box", "broken-box", "slow-box"] {
        let badge = format!("{} .badge", runtime(name));
        wait_for_text(&client, &badge, "online").await;
    }
    // The token was kept: a reload lands signed in, with no token field to fill.
    client.refresh().await.unwrap();
    wait_for_text(
        &client,
        &format!("{} .badge", runtime("broken-box")),
        "online",
    )
    .await;
    let token_field = client.find(Locator::Id("token")).await.unwrap();
    assert!(
        !token_field.is_displayed().await.unwrap(),
        "signed in after reload"
    );
    // Signing out forgets it; the demo's link (token in the fragment) signs in again,
    // opened afresh or pasted into the open page, and leaves no token in the address bar.
    for from in ["about:blank", "the open page"] {
        let signout = client.find(Locator::Id("signout")).await.unwrap();
        signout.click().await.unwrap();
        let token_field = client.find(Locator::Id("token")).await.unwrap();
        assert!(token_field.is_displayed().await.unwrap(), "signed out");
        if from == "about:blank" {
            client.goto(from).await.unwrap();
        }
        client.goto(&format!("{base}/#token={api}")).await.unwrap();
        let badge = format!("{} .badge", runtime("empty-box"));
        wait_for_text(&client, &badge, "online").await;
        let url = client.current_url().await.unwrap();
        assert_eq!(url.fragment(), None, "from {from}: {url}");
    }

    // One by keyboard (focus, Enter), two by click.
    let alpha = client
        .find(Locator::Css(&format!(
            "{} .discover",
            runtime("alpha-laptop")
        )))
        .await
        .unwrap();
    alpha.send_keys(&Key::Enter).await.unwrap();
    for name in ["empty-box", "broken-box"] {
        let button = format!("{} .discover", runtime(name));
        client
            .find(Locator::Css(&button))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    // Models found: the picker offers them, the default first chosen.
    let found = wait_for_outcome(&client, "alpha-laptop").await;
    assert_eq!(found, "Found 2 models. Pick one, or type a model ID.");
    let select = format!("{} .model-select", runtime("alpha-laptop"));
    let options = client
        .find_all(Locator::Css(&format!("{select} option")))
        .await
        .unwrap();
    let mut offered = Vec::new();
    for option in &options {
        offered.push((
            option.prop("value").await.unwrap().unwrap(),
            option.text().await.unwrap(),
        ));
    }
    assert_eq!(
        offered,
        [
            (
                "claude-sonnet-4-6".to_owned(),
                "Claude Sonnet 4.6 (default)".to_owned()
            ),
            ("claude-haiku-4-5".to_owned(), "Claude Haiku 4.5".to_owned()),
        ]
    );
    assert_eq!(
        chosen(&client, "alpha-laptop").await,
        "Selected model: claude-sonnet-4-6"
    );
    let picker = client.find(Locator::Css(&select)).await.unwrap();
    picker.select_by_value("claude-haiku-4-5").await.unwrap();
    assert_eq!(
        chosen(&client, "alpha-laptop").await,
        "Selected model: claude-haiku-4-5"
    );

    // None available: said so, no list to pick from, a model ID can still be typed.
    assert_eq!(
        wait_for_outcome(&client, "empty-box").await,
        "No models available"
    );
    let empty_select = format!("{} .model-select", runtime("empty-box"));
    let hidden = client.find(Locator::Css(&empty_select)).await.unwrap();
    assert!(
        !hidden.is_displayed().await.unwrap(),
        "no picker without models"
    );
    type_model(&client, "empty-box", "custom-model").await;
    assert_eq!(
        chosen(&client, "empty-box").await,
        "Selected model: custom-model"
    );

    // Failed: the fixed text, then the server's error with exit status and stderr.
    assert_eq!(wait_for_outcome(&client, "broken-box").await, FAILED_TEXT);
    let detail = text_of(
        &client,
        &format!("{} .outcome-detail", runtime("broken-box")),
    )
    .await;
    assert!(detail.contains("exit status 3"), "{detail}");
    assert!(detail.contains("codex: not signed in"), "{detail}");
    type_model(&client, "broken-box", "gpt-5-codex").await;
    assert_eq!(
        chosen(&client, "broken-box").await,
        "Selected model: gpt-5-codex"
    );

    // While a discovery runs, the page's read waits at the server (a poll would not be
    // held), and the end of the discovery answers it.
    client
        .find(Locator::Css(&format!("{} .discover", runtime("slow-box"))))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let http = Http::default();
    let start = Instant::now();
    loop {
        let metrics = http.get_text(&format!("{base}/metrics")).await.text();
        let scrape = support::prom::Scrape::parse(&metrics);
        if scrape.value("model_relay_held_calls", &[("kind", "read")]) == 1.0 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the page never held a read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        wait_for_outcome(&client, "slow-box").await,
        "Found 1 model. Pick one, or type a model ID."
    );
}

fn runtime(name: &str) -> String {
    format!(r#"li.runtime[data-runtime-name="{name}"]"#)
}

async fn text_of(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn wait_for_text(client: &Client, css: &str, expected: &str) {
    let start = Instant::now();
    loop {
        let text = text_of(client, css).await;
        if text == expected {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{css} never read {expected:?}: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the runtime's discovery has ended; the outcome's main text.
async fn wait_for_outcome(client: &Client, name: &str) -> String {
    let item = runtime(name);
    let start = Instant::now();
    loop {
        let element = client.find(Locator::Css(&item)).await.unwrap();
        let outcome = element.attr("data-outcome").await.unwrap();
        if matches!(outcome.as_deref(), Some("found" | "none" | "failed")) {
            return text_of(client, &format!("{item} .outcome-text")).await;
        }
        assert!(start.elapsed() < DEADLINE, "{name}: discovery never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn type_model(client: &Client, name: &str, model: &str) {
    let input = format!("{} .model-input", runtime(name));
    let input = client.find(Locator::Css(&input)).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(model).await.unwrap();
}

async fn chosen(client: &Client, name: &str) -> String {
    text_of(client, &format!("{} .chosen", runtime(name))).await
}

/// `fetch(url, {method, Authorization: Bearer token, body})` from the page open in the
/// browser: `{"status", "body"}` when the browser let the page see the answer, `{"error"}`
/// when it blocked it (CORS).
async fn fetch_from_page(
    client: &Client,
    method: &str,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let script = r#"
        const [method, url, token, body, done] = arguments;
        const init = { method, headers: { Authorization: 'Bearer ' + token } };
        if (body !== null) {
            init.headers['Content-Type'] = 'application/json';
            init.body = JSON.stringify(body);
        }
        fetch(url, init)
            .then(r => r.text().then(text => done({ status: r.status, body: text })))
            .catch(e => done({ error: String(e) }));
    "#;
    let args = vec![
        json!(method),
        json!(url),
        json!(token),
        body.unwrap_or(serde_json::Value::Null),
    ];
    client.execute_async(script, args).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_a_listed_origin_calls_the_ui_routes_and_never_the_daemon_routes() {
    let Some(tools) =
        driver::tools("a_page_on_a_listed_origin_calls_the_ui_routes_and_never_the_daemon_routes")
    else {
        return;
    };
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&artifacts).unwrap();
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(Default::default()));
    let (_, api) = workspace(store.as_ref(), 0);
    // The platform's UI: a page of its own, on another server. It is reached under two
    // origins, http://localhost:PORT (listed) and http://127.0.0.1:PORT (not listed).
    let ui_port = ui_page_server().await;
    let listed = format!("http://localhost:{ui_port}");
    let not_listed = format!("http://127.0.0.1:{ui_port}");
    let app = model_relay::App::new(store, Arc::new(SystemClock), settings())
        .with_cors_origins(vec![listed.clone()]);
    let server = Instance::start_app(app).await;
    let relay = server.base.clone();
    let http = Http::default();
    let created = http
        .post(
            &format!("{relay}/api/runtimes"),
            &api,
            json!({"name": "box", "provider": "test"}),
        )
        .await;
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let daemon_token = created.json["daemon_token"].as_str().unwrap().to_owned();

    let driver = Driver::start(&tools, &artifacts.join("chromedriver-cors.log"));
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(&tools, profile.path()).await;
    let outcome = tokio::spawn({
        let client = client.clone();
        let (listed, not_listed, relay, api) =
            (listed.clone(), not_listed, relay.clone(), api.clone());
        async move {
            // The page of the listed origin calls the relay: the preflight (the
            // Authorization header needs one) is answered, and the page sees the answer.
            client.goto(&format!("{listed}/")).await.unwrap();
            let runtimes =
                fetch_from_page(&client, "GET", &format!("{relay}/api/runtimes"), &api, None).await;
            assert_eq!(runtimes["status"], 200, "{runtimes}");
            assert!(
                runtimes["body"].as_str().unwrap().contains(&rt),
                "{runtimes}"
            );
            let created = fetch_from_page(
                &client,
                "POST",
                &format!("{relay}/api/runtimes"),
                &api,
                Some(json!({"name": "from-the-page", "provider": "test"})),
            )
            .await;
            assert_eq!(created["status"], 201, "{created}");

            // The daemon's routes never answer CORS: the browser blocks the call before
            // it is made, so the runtime never comes online.
            let beat = fetch_from_page(
                &client,
                "POST",
                &format!("{relay}/api/daemon/heartbeat"),
                &daemon_token,
                Some(json!({"runtime_id": rt})),
            )
            .await;
            assert!(beat["error"].is_string(), "{beat}");

            // The same page on an origin not listed cannot read the UI routes.
            client.goto(&format!("{not_listed}/")).await.unwrap();
            let refused =
                fetch_from_page(&client, "GET", &format!("{relay}/api/runtimes"), &api, None).await;
            assert!(refused["error"].is_string(), "{refused}");
        }
    })
    .await;
    let _ = client.close().await;
    drop(driver);
    let runtimes = http.get(&format!("{relay}/api/runtimes"), &api).await;
    server.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    let statuses: Vec<_> = runtimes.json["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].clone(), r["status"].clone()))
        .collect();
    assert_eq!(
        statuses.len(),
        2,
        "the page's create went through: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|(_, status)| status == "offline"),
        "no heartbeat reached the server: {statuses:?}"
    );
}

/// A server that answers every request with one small HTML page, as the platform's own UI
/// would be served; its port on 127.0.0.1.
async fn ui_page_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let page = service_fn(|_request| async {
                let html = "<!doctype html><title>Platform UI</title><p>platform UI</p>";
                hyper::Response::builder()
                    .header(hyper::header::CONTENT_TYPE, "text/html; charset=utf-8")
                    .body(Full::new(Bytes::from(html)))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), page);
            tokio::spawn(connection);
        }
    });
    port
}
