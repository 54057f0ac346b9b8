//! The web page in a real browser (headless Chromium over WebDriver) against a real server
//! and in-process daemons: one finds models, one finds none, one fails. The page must tell
//! the three apart, offer the models found, and always take a typed model ID. Another
//! runtime's list is opened again from the server's catalog, refreshed, and offers
//! reasoning-effort levels and service tiers.

#[path = "browser/driver.rs"]
mod driver;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::{Driver, announce};
use fantoccini::key::Key;
use fantoccini::{Client, Locator};
use http_body_util::Full;
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::service::service_fn;
use model_relay::clock::{Clock, FakeClock, SystemClock};
use model_relay::config::Settings;
use model_relay::daemon::{self, Discovery, Source};
use model_relay::ids::{RuntimeId, Token};
use model_relay::model::ModelEntry;
use model_relay::store::memory::MemoryStore;
use model_relay::store::{NewRuntime, Storer};
use serde_json::json;
use support::server::{Http, Instance, settings, workspace};
use tokio::sync::watch;

/// Only a broken page makes a healthy wait take this long.
const DEADLINE: Duration = Duration::from_secs(30);
/// An update's progress is read at least every 2 s; only a page that holds its reads as
/// long as a discovery's (20 s) takes this long to show it.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(10);
const FAILED_TEXT: &str = "Could not discover models. Type a model ID or try again.";
/// A catalog younger than this is answered from without asking the daemon; the test moves
/// the server's clock past it to make the catalog stale.
const CATALOG_FRESH: Duration = Duration::from_secs(10);

fn catalogue() -> Vec<ModelEntry> {
    let model = |id: &str, label: &str, default| ModelEntry {
        id: id.into(),
        label: label.into(),
        provider: Some("anthropic".into()),
        default,
        ..Default::default()
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

    let catalog = CatalogBox::new(scratch.path());

    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(model_relay::kind::PerKind::defaults()));
    let (_, api) = workspace(store.as_ref(), 0);
    // Today's time, so "as of" reads as it would; it moves only when the test says.
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let settings = Settings {
        catalog_fresh: CATALOG_FRESH,
        ..settings()
    };
    let server = Instance::start(store, clock.clone(), settings).await;
    let (stop_daemons, daemons_stop) = watch::channel(false);
    let sources = [
        (
            "alpha-laptop",
            Source::Fixed(Discovery::Found {
                models: catalogue(),
                supported: true,
                fallback: false,
            }),
        ),
        ("empty-box", Source::ModelsFile(empty_file)),
        (
            "broken-box",
            Source::Command("echo 'codex: not signed in' >&2; exit 3".into()),
        ),
        ("slow-box", Source::Command(slow)),
        ("catalog-box", Source::Command(catalog.command())),
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
    let scenario = tokio::spawn({
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            scenario(&client, &base, &api, &gate).await;
            catalog_scenario(&client, &base, &clock, &catalog).await;
        }
    });
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

async fn scenario(client: &Client, base: &str, api: &str, gate: &Path) {
    client.goto(&format!("{base}/")).await.unwrap();
    let token = client.find(Locator::Id("token")).await.unwrap();
    token.send_keys(api).await.unwrap();
    // Signs in with the keyboard: Enter in the field submits the form.
    token.send_keys(&Key::Enter).await.unwrap();

    for name in ["alpha-laptop", "empty-box", "broken-box", "slow-box"] {
        let badge = format!("{} .badge", runtime(name));
        wait_for_text(client, &badge, "online").await;
    }
    // The token was kept: a reload lands signed in, with no token field to fill.
    client.refresh().await.unwrap();
    wait_for_text(
        client,
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
        wait_for_text(client, &badge, "online").await;
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
    let found = wait_for_outcome(client, "alpha-laptop").await;
    assert_eq!(found, "Found 2 models. Pick one, or type a model ID.");
    let select = format!("{} .model-select", runtime("alpha-laptop"));
    assert_eq!(
        options(client, &select).await,
        [
            (
                "claude-sonnet-4-6".to_owned(),
                "Claude Sonnet 4.6 (default)".to_owned()
            ),
            ("claude-haiku-4-5".to_owned(), "Claude Haiku 4.5".to_owned()),
        ]
    );
    assert_eq!(
        chosen(client, "alpha-laptop").await,
        "Selected model: claude-sonnet-4-6"
    );
    let picker = client.find(Locator::Css(&select)).await.unwrap();
    picker.select_by_value("claude-haiku-4-5").await.unwrap();
    assert_eq!(
        chosen(client, "alpha-laptop").await,
        "Selected model: claude-haiku-4-5"
    );

    // None available: said so, no list to pick from, a model ID can still be typed.
    assert_eq!(
        wait_for_outcome(client, "empty-box").await,
        "No models available"
    );
    let empty_select = format!("{} .model-select", runtime("empty-box"));
    let hidden = client.find(Locator::Css(&empty_select)).await.unwrap();
    assert!(
        !hidden.is_displayed().await.unwrap(),
        "no picker without models"
    );
    type_model(client, "empty-box", "custom-model").await;
    assert_eq!(
        chosen(client, "empty-box").await,
        "Selected model: custom-model"
    );

    // Failed: the fixed text, then the server's error with exit status and stderr.
    assert_eq!(wait_for_outcome(client, "broken-box").await, FAILED_TEXT);
    let detail = text_of(
        client,
        &format!("{} .outcome-detail", runtime("broken-box")),
    )
    .await;
    assert!(detail.contains("exit status 3"), "{detail}");
    assert!(detail.contains("codex: not signed in"), "{detail}");
    type_model(client, "broken-box", "gpt-5-codex").await;
    assert_eq!(
        chosen(client, "broken-box").await,
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
    std::fs::write(gate, "").unwrap();
    assert_eq!(
        wait_for_outcome(client, "slow-box").await,
        "Found 1 model. Pick one, or type a model ID."
    );
}

/// The catalog runtime's daemon: a models file read afresh by each discovery (so the test
/// says what the next one finds), a gate each discovery waits for, and a line in `runs`
/// for each discovery past the gate.
struct CatalogBox {
    models: PathBuf,
    gate: PathBuf,
    runs: PathBuf,
}

impl CatalogBox {
    fn new(dir: &Path) -> Self {
        let catalog = CatalogBox {
            models: dir.join("catalog-models.json"),
            gate: dir.join("catalog-open"),
            runs: dir.join("catalog-runs"),
        };
        std::fs::write(&catalog.gate, "").unwrap();
        catalog
    }

    fn command(&self) -> String {
        format!(
            "while [ ! -e '{}' ]; do sleep 0.05; done; echo run >> '{}'; cat '{}'",
            self.gate.display(),
            self.runs.display(),
            self.models.display()
        )
    }

    fn offer(&self, models: &str) {
        std::fs::write(&self.models, models).unwrap();
    }

    /// How many discoveries the daemon has run.
    fn discoveries(&self) -> usize {
        std::fs::read_to_string(&self.runs).map_or(0, |runs| runs.lines().count())
    }
}

/// Requests handed to daemons, and answers from a fresh catalog, as `/metrics` counts them.
async fn counters(base: &str) -> (f64, f64) {
    let metrics = Http::default()
        .get_text(&format!("{base}/metrics"))
        .await
        .text();
    let scrape = support::prom::Scrape::parse(&metrics);
    let fresh = scrape
        .matching(
            "model_relay_catalog_answers_total",
            &[("freshness", "fresh")],
        )
        .map(|sample| sample.value)
        .sum();
    (
        scrape.value("model_relay_claims_total", &[("kind", "models")]),
        fresh,
    )
}

async fn catalog_scenario(client: &Client, base: &str, clock: &FakeClock, catalog: &CatalogBox) {
    let name = "catalog-box";
    let item = runtime(name);
    let outcome = format!("{item} .outcome-text");
    let detail = format!("{item} .outcome-detail");
    let models = format!("{item} .model-select");
    let effort = format!("{item} .effort-select");
    let tier = format!("{item} .tier-select");
    let reasoning = json!({"id": "gpt-5", "label": "GPT-5", "default": true,
        "thinking": {"supported_levels": [{"value": "low", "label": "Low"},
                                          {"value": "medium", "label": "Medium"},
                                          {"value": "high", "label": "High", "description": "Slower"}],
                     "default_level": "medium"},
        "service_tiers": [{"id": "flex", "name": "Flex", "description": "Cheaper, slower"}]});
    let plain = json!({"id": "gpt-4.1", "label": "GPT-4.1"});
    let mini = json!({"id": "gpt-5-mini", "label": "GPT-5 mini"});
    catalog.offer(&json!([reasoning, plain]).to_string());
    wait_for_text(client, &format!("{item} .badge"), "online").await;

    // The first open finds no catalog: a discovery.
    click(client, &format!("{item} .discover")).await;
    assert_eq!(
        wait_for_outcome(client, name).await,
        "Found 2 models. Pick one, or type a model ID."
    );
    assert_eq!(text_of(client, &detail).await, "");
    assert_eq!(catalog.discoveries(), 1);

    // A model with reasoning-effort levels offers them, its default level first chosen, and
    // its service tiers after "Default"; a model without hides both pickers.
    assert_eq!(
        options(client, &effort).await,
        [("low", "Low"), ("medium", "Medium"), ("high", "High")].map(owned)
    );
    assert_eq!(value_of(client, &effort).await, "medium");
    assert!(displayed(client, &effort).await, "effort picker for gpt-5");
    assert_eq!(
        options(client, &tier).await,
        [("", "Default"), ("flex", "Flex")].map(owned)
    );
    assert_eq!(
        chosen(client, name).await,
        "Selected model: gpt-5, reasoning effort: Medium"
    );
    select(client, &models, "gpt-4.1").await;
    assert_eq!(chosen(client, name).await, "Selected model: gpt-4.1");
    assert!(
        !displayed(client, &effort).await,
        "no effort picker for gpt-4.1"
    );
    assert!(
        !displayed(client, &tier).await,
        "no tier picker for gpt-4.1"
    );
    select(client, &models, "gpt-5").await;
    assert!(
        displayed(client, &effort).await,
        "effort picker for gpt-5 again"
    );
    select(client, &effort, "high").await;
    select(client, &tier, "flex").await;
    assert_eq!(
        chosen(client, name).await,
        "Selected model: gpt-5, reasoning effort: High, service tier: Flex"
    );

    // The second open is answered from the catalog at once: no request reaches a daemon.
    let (claims, fresh) = counters(base).await;
    click(client, &format!("{item} .discover")).await;
    let saved = wait_for(client, &detail, "as of", |text| {
        text.starts_with("Saved list as of ")
    })
    .await;
    assert!(
        saved.ends_with('.'),
        "nothing refreshes a fresh catalog: {saved}"
    );
    assert_eq!(
        text_of(client, &outcome).await,
        "Found 2 models. Pick one, or type a model ID."
    );
    assert_eq!(counters(base).await, (claims, fresh + 1.0));
    assert_eq!(catalog.discoveries(), 1, "the daemon was not asked again");

    // Refresh skips the catalog: the daemon is asked, and the list is what it finds now.
    catalog.offer(&json!([reasoning, plain, mini]).to_string());
    click(client, &format!("{item} .refresh-models")).await;
    wait_for_text(
        client,
        &outcome,
        "Found 3 models. Pick one, or type a model ID.",
    )
    .await;
    assert_eq!(text_of(client, &detail).await, "");
    assert_eq!(catalog.discoveries(), 2);
    assert_eq!(counters(base).await.0, claims + 1.0);
    let offered: Vec<String> = options(client, &models)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(offered, ["gpt-5", "gpt-4.1", "gpt-5-mini"]);

    // A stale catalog: the saved list at once, while the discovery started behind it runs;
    // its list then replaces the saved one, and the model chosen meanwhile stays chosen.
    std::fs::remove_file(&catalog.gate).unwrap();
    let o3 = json!({"id": "o3", "label": "o3"});
    catalog.offer(&json!([reasoning, plain, mini, o3]).to_string());
    clock.advance(CATALOG_FRESH + Duration::from_secs(1));
    click(client, &format!("{item} .discover")).await;
    let checking = wait_for(client, &detail, "checking", |text| {
        text.contains("checking")
    })
    .await;
    assert!(checking.starts_with("Saved list as of "), "{checking}");
    assert_eq!(
        text_of(client, &outcome).await,
        "Found 3 models. Pick one, or type a model ID."
    );
    select(client, &models, "gpt-4.1").await;
    std::fs::write(&catalog.gate, "").unwrap();
    wait_for_text(
        client,
        &outcome,
        "Found 4 models. Pick one, or type a model ID.",
    )
    .await;
    assert_eq!(text_of(client, &detail).await, "");
    assert_eq!(chosen(client, name).await, "Selected model: gpt-4.1");
    assert_eq!(catalog.discoveries(), 3);

    // A refresh behind the saved list that fails leaves the list, and says so.
    catalog.offer("not a models document");
    clock.advance(CATALOG_FRESH + Duration::from_secs(1));
    click(client, &format!("{item} .discover")).await;
    let failed = wait_for(client, &detail, "could not check", |text| {
        text.contains("could not check for changes")
    })
    .await;
    assert!(failed.starts_with("Saved list as of "), "{failed}");
    assert_eq!(
        text_of(client, &outcome).await,
        "Found 4 models. Pick one, or type a model ID."
    );
    assert_eq!(catalog.discoveries(), 4);
}

fn owned((value, label): (&str, &str)) -> (String, String) {
    (value.to_owned(), label.to_owned())
}

async fn click(client: &Client, css: &str) {
    let element = client.find(Locator::Css(css)).await.unwrap();
    element.click().await.unwrap();
}

async fn select(client: &Client, css: &str, value: &str) {
    let element = client.find(Locator::Css(css)).await.unwrap();
    element.select_by_value(value).await.unwrap();
}

/// A `<select>`'s options: (value, text) each.
async fn options(client: &Client, css: &str) -> Vec<(String, String)> {
    let options = client
        .find_all(Locator::Css(&format!("{css} option")))
        .await
        .unwrap();
    let mut offered = Vec::new();
    for option in &options {
        offered.push((
            option.prop("value").await.unwrap().unwrap(),
            option.text().await.unwrap(),
        ));
    }
    offered
}

async fn value_of(client: &Client, css: &str) -> String {
    let element = client.find(Locator::Css(css)).await.unwrap();
    element.prop("value").await.unwrap().unwrap_or_default()
}

async fn displayed(client: &Client, css: &str) -> bool {
    let element = client.find(Locator::Css(css)).await.unwrap();
    element.is_displayed().await.unwrap()
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
    wait_for(client, css, &format!("{expected:?}"), |text| {
        text == expected
    })
    .await;
}

/// Waits until the text of `css` passes `check` (`what` says what it waits for); that text.
async fn wait_for(client: &Client, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    wait_for_within(client, css, what, DEADLINE, check).await
}

/// [`wait_for`] with a deadline of its own.
async fn wait_for_within(
    client: &Client,
    css: &str,
    what: &str,
    deadline: Duration,
    check: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = text_of(client, css).await;
        if check(&text) {
            return text;
        }
        assert!(
            start.elapsed() < deadline,
            "{css} never read {what}: {text:?}"
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
async fn a_workspace_of_several_pages_shows_every_runtime() {
    let Some(tools) = driver::tools("a_workspace_of_several_pages_shows_every_runtime") else {
        return;
    };
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&artifacts).unwrap();
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(model_relay::kind::PerKind::defaults()));
    let (workspace_id, api) = workspace(store.as_ref(), 0);
    // Past two of the server's default pages (100): the page must follow `next_cursor`
    // twice to show them all. Two share each millisecond, so pages also end inside a tie.
    const RUNTIMES: i64 = 230;
    for i in 0..RUNTIMES {
        let new = NewRuntime {
            id: RuntimeId::random().unwrap(),
            workspace_id,
            name: format!("rt-{i:03}"),
            provider: "test".into(),
            daemon_token: Token::new_daemon().unwrap().hash(),
        };
        store.create_runtime(&new, 1_000 + i / 2).unwrap();
    }
    let server = Instance::start(store, Arc::new(SystemClock), settings()).await;

    let driver = Driver::start(&tools, &artifacts.join("chromedriver-pages.log"));
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(&tools, profile.path()).await;
    let outcome = tokio::spawn({
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            client.goto(&format!("{base}/")).await.unwrap();
            let token = client.find(Locator::Id("token")).await.unwrap();
            token.send_keys(&api).await.unwrap();
            token.send_keys(&Key::Enter).await.unwrap();
            wait_for_text(&client, "#runtimes-status", "230 runtimes").await;
            let items = client.find_all(Locator::Css("li.runtime")).await.unwrap();
            assert_eq!(items.len(), 230);
            for name in ["rt-000", "rt-099", "rt-100", "rt-199", "rt-200", "rt-229"] {
                assert!(
                    client.find(Locator::Css(&runtime(name))).await.is_ok(),
                    "{name} is listed"
                );
            }
        }
    })
    .await;
    let _ = client.close().await;
    drop(driver);
    server.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
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
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(model_relay::kind::PerKind::defaults()));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_refused_a_waiting_read_at_the_cap_reads_on_without_waiting() {
    // A cap of held calls that is always full: every waiting read is refused.
    let settings = Settings {
        max_waiting: 0,
        ..settings()
    };
    let test = "a_page_refused_a_waiting_read_at_the_cap_reads_on_without_waiting";
    refused_a_waiting_read(test, settings, "503").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_refused_a_waiting_read_past_its_workspace_share_reads_on_without_waiting() {
    // A workspace share that is always taken: every waiting read is refused with 429.
    let settings = Settings {
        max_waiting_per_workspace: 0,
        ..settings()
    };
    let test = "a_page_refused_a_waiting_read_past_its_workspace_share_reads_on_without_waiting";
    refused_a_waiting_read(test, settings, "429").await;
}

/// A page whose every waiting read is refused with `status` (`settings` say why) still
/// shows the models a slow discovery finds: it reads on without waiting.
async fn refused_a_waiting_read(test: &str, settings: Settings, status: &'static str) {
    let Some(tools) = driver::tools(test) else {
        return;
    };
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&artifacts).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // The discovery lasts until the test creates this file.
    let gate = scratch.path().join("open");
    let command = format!(
        "while [ ! -e '{}' ]; do sleep 0.05; done; echo '[{{\"id\":\"late-model\",\"label\":\"Late\"}}]'",
        gate.display()
    );
    let store: Arc<dyn Storer> = Arc::new(MemoryStore::new(model_relay::kind::PerKind::defaults()));
    let (_, api) = workspace(store.as_ref(), 0);
    let server = Instance::start(store, Arc::new(SystemClock), settings).await;
    let http = Http::default();
    let created = http
        .post(
            &format!("{}/api/runtimes", server.base),
            &api,
            json!({"name": "capped-box", "provider": "test"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let rt = RuntimeId::parse(created.json["id"].as_str().unwrap()).unwrap();
    let token = Token::from_header(created.json["daemon_token"].as_str().unwrap());
    let mut config =
        daemon::Config::new(&server.base, rt, token, Source::Command(command)).unwrap();
    // Heartbeats on an interval: a held one would be refused at this cap too.
    config.heartbeat_interval = Duration::from_millis(200);
    config.heartbeat_wait = Duration::ZERO;
    let (stop_daemon, daemon_stops) = watch::channel(false);
    let daemon = tokio::spawn(daemon::run(config, async move {
        let mut stop = daemon_stops;
        let _ = stop.wait_for(|s| *s).await;
    }));

    let driver = Driver::start(&tools, &artifacts.join("chromedriver-cap.log"));
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(&tools, profile.path()).await;
    let outcome = tokio::spawn({
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            client.goto(&format!("{base}/#token={api}")).await.unwrap();
            let name = "capped-box";
            wait_for_text(&client, &format!("{} .badge", runtime(name)), "online").await;
            click(&client, &format!("{} .discover", runtime(name))).await;
            // The page's waiting read was refused at the cap while the discovery runs.
            let read = "/api/runtimes/{runtimeId}/models/{requestId}";
            let start = Instant::now();
            loop {
                let metrics = Http::default()
                    .get_text(&format!("{base}/metrics"))
                    .await
                    .text();
                let scrape = support::prom::Scrape::parse(&metrics);
                let refused: f64 = scrape
                    .matching(
                        "model_relay_http_requests_total",
                        &[("route", read), ("method", "GET"), ("status", status)],
                    )
                    .map(|sample| sample.value)
                    .sum();
                if refused >= 1.0 {
                    break;
                }
                assert!(start.elapsed() < DEADLINE, "no waiting read was refused");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            std::fs::write(&gate, "").unwrap();
            // Not a failure: the page read on without waiting and saw the models.
            assert_eq!(
                wait_for_outcome(&client, name).await,
                "Found 1 model. Pick one, or type a model ID."
            );
        }
    })
    .await;
    let _ = client.close().await;
    drop(driver);
    let _ = stop_daemon.send(true);
    daemon.await.unwrap().unwrap();
    server.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Skills and an update from the page, across instances: two servers over one SQLite file,
/// the runtime's daemon on one (with a skills directory and an update command), the page on
/// the other. The page lists the skills, imports one and shows its files as text (markup in
/// a file stays text), and runs an update to completion with its output; a second update
/// while it runs is refused with 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_and_imports_skills_and_updates_a_runtime_across_instances() {
    let Some(tools) =
        driver::tools("the_page_lists_and_imports_skills_and_updates_a_runtime_across_instances")
    else {
        return;
    };
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&artifacts).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let skills = scratch.path().join("skills");
    let review = skills.join("review");
    std::fs::create_dir_all(review.join("refs")).unwrap();
    std::fs::write(
        review.join("SKILL.md"),
        "---\nname: Review\ndescription: Reviews a change\n---\nRead the diff.\n",
    )
    .unwrap();
    std::fs::write(
        review.join("refs/markup.html"),
        "<b>not bold</b><img src=x onerror=alert(1)>",
    )
    .unwrap();
    std::fs::create_dir_all(skills.join("deploy")).unwrap();
    std::fs::write(skills.join("deploy/SKILL.md"), "# Deploy\n").unwrap();
    // The update prints a line, waits for the first gate, prints another, waits for the
    // second: the page must show each line while the update still runs (its reads are held
    // at most a couple of seconds, not the 20 s a discovery's may be).
    let (gate, second_gate) = (
        scratch.path().join("update-open"),
        scratch.path().join("update-open-2"),
    );
    let update_cmd = format!(
        "echo \"updating to $MODEL_RELAY_TARGET_VERSION\"; \
         while [ ! -e '{}' ]; do sleep 0.05; done; echo downloaded; \
         while [ ! -e '{}' ]; do sleep 0.05; done; echo installed",
        gate.display(),
        second_gate.display()
    );

    let file = scratch.path().join("relay.db");
    let open = || {
        let store = model_relay::store::sqlite::SqliteStore::open(
            &file,
            model_relay::kind::PerKind::defaults(),
        )
        .unwrap();
        Arc::new(store) as Arc<dyn Storer>
    };
    let (first, second) = (open(), open());
    let (_, api) = workspace(first.as_ref(), SystemClock.now());
    let daemons_side = Instance::start(first, Arc::new(SystemClock), settings()).await;
    let page_side = Instance::start(second, Arc::new(SystemClock), settings()).await;
    let http = Http::default();
    let created = http
        .post(
            &format!("{}/api/runtimes", page_side.base),
            &api,
            json!({"name": "skills-box", "provider": "claude"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let rt = created.json["id"].as_str().unwrap().to_owned();
    let token = Token::from_header(created.json["daemon_token"].as_str().unwrap());
    let source = Source::Fixed(Discovery::Found {
        models: catalogue(),
        supported: true,
        fallback: false,
    });
    let mut config = daemon::Config::new(
        &daemons_side.base,
        RuntimeId::parse(&rt).unwrap(),
        token,
        source,
    )
    .unwrap();
    config.heartbeat_interval = Duration::from_millis(200);
    config.skills_dirs = vec![daemon::SkillsDir::parse(&skills.display().to_string()).unwrap()];
    config.update_cmd = Some(update_cmd);
    let (stop_daemon, daemon_stops) = watch::channel(false);
    let daemon = tokio::spawn(daemon::run(config, async move {
        let mut stop = daemon_stops;
        let _ = stop.wait_for(|s| *s).await;
    }));

    let driver = Driver::start(&tools, &artifacts.join("chromedriver-skills.log"));
    let profile = tempfile::tempdir().unwrap();
    let client = driver.session(&tools, profile.path()).await;
    let outcome = tokio::spawn({
        let (client, base) = (client.clone(), page_side.base.clone());
        let (api, rt, review) = (api.clone(), rt.clone(), review.clone());
        let (gate, second_gate) = (gate.clone(), second_gate.clone());
        async move {
            client.goto(&format!("{base}/#token={api}")).await.unwrap();
            let item = runtime("skills-box");
            wait_for_text(&client, &format!("{item} .badge"), "online").await;

            click(&client, &format!("{item} .list-skills")).await;
            wait_for_text(&client, &format!("{item} .skills-status"), "2 skills.").await;
            let names = client
                .find_all(Locator::Css(&format!("{item} .skill-name")))
                .await
                .unwrap();
            let mut listed = Vec::new();
            for name in &names {
                listed.push(name.text().await.unwrap());
            }
            assert_eq!(listed, ["deploy", "Review"]);
            let review_item = format!(r#"{item} li.skill[data-key="claude:review"]"#);
            assert_eq!(
                text_of(&client, &format!("{review_item} .skill-files")).await,
                "2 files"
            );

            click(&client, &format!("{review_item} .import-skill")).await;
            wait_for_text(
                &client,
                &format!("{item} .imported-status"),
                "Imported 2 files.",
            )
            .await;
            let mut shown = Vec::new();
            for css in ["h6", "pre.file-content"] {
                let found = client
                    .find_all(Locator::Css(&format!("{item} .imported-files {css}")))
                    .await
                    .unwrap();
                for element in &found {
                    shown.push(element.prop("textContent").await.unwrap().unwrap());
                }
            }
            assert_eq!(
                shown,
                [
                    "SKILL.md",
                    "refs/markup.html",
                    "---\nname: Review\ndescription: Reviews a change\n---\nRead the diff.\n",
                    "<b>not bold</b><img src=x onerror=alert(1)>",
                ]
            );
            // Text, never HTML: the file's markup made no elements.
            let made = client
                .find_all(Locator::Css(&format!(
                    "{item} .imported-files b, {item} img"
                )))
                .await
                .unwrap();
            assert!(made.is_empty(), "the imported file's markup was rendered");
            assert!(review.exists());

            let version = client
                .find(Locator::Css(&format!("{item} .update-version")))
                .await
                .unwrap();
            version.send_keys("2.1.0").await.unwrap();
            version.send_keys(&Key::Enter).await.unwrap();
            wait_for(
                &client,
                &format!("{item} .update-output"),
                "the update's progress",
                |text| text.contains("updating to 2.1.0"),
            )
            .await;
            // While it runs, a second update (from anywhere) is refused.
            let second = Http::default()
                .post(
                    &format!("{base}/api/runtimes/{rt}/update"),
                    &api,
                    json!({"target_version": "2.2.0"}),
                )
                .await;
            assert_eq!(
                (second.status, second.json),
                (
                    StatusCode::CONFLICT,
                    json!({"error": "an update is already in progress for this runtime"})
                )
            );
            std::fs::write(&gate, "").unwrap();
            // Half the 20 s a held read of a discovery may take: a page that held the
            // update's reads that long would show the progress only at the end.
            wait_for_within(
                &client,
                &format!("{item} .update-output"),
                "the update's next progress",
                PROGRESS_DEADLINE,
                |text| text.contains("downloaded"),
            )
            .await;
            assert_eq!(
                text_of(&client, &format!("{item} .update-status")).await,
                "Updating to 2.1.0…",
                "still running"
            );
            std::fs::write(&second_gate, "").unwrap();
            wait_for_text(
                &client,
                &format!("{item} .update-status"),
                "Updated to 2.1.0.",
            )
            .await;
            let output = text_of(&client, &format!("{item} .update-output")).await;
            assert_eq!(output, "updating to 2.1.0\ndownloaded\ninstalled");
        }
    })
    .await;
    let screenshot = artifacts.join("skills.png");
    if let Ok(png) = client.screenshot().await {
        std::fs::write(&screenshot, png).unwrap();
        announce(&format!("browser screenshot: {}", screenshot.display()));
    }
    let _ = client.close().await;
    drop(driver);
    let _ = stop_daemon.send(true);
    daemon.await.unwrap().unwrap();
    daemons_side.stop().await;
    page_side.stop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
