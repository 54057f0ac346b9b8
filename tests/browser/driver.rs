//! Headless Chromium driven over WebDriver: finds `chromedriver` and Chromium, starts the
//! driver on a free port, and opens a session with a fresh profile.
//!
//! Missing tools are a loud SKIPPED, unless `REQUIRE_BROWSER=1` (CI), where they fail the
//! test: a browser test that quietly does not run proves nothing.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

/// How long chromedriver may take to listen.
const DRIVER_START: Duration = Duration::from_secs(30);

/// Says something in the test's output even when the harness captures `println!`.
pub fn announce(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

pub struct Tools {
    pub chromedriver: PathBuf,
    pub chromium: PathBuf,
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

fn from_env_or_path(var: &str, names: &[&str]) -> Option<PathBuf> {
    match std::env::var_os(var) {
        // A path that is not there counts as missing, so it skips or fails like one.
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)).filter(|p| p.is_file()),
        _ => on_path(names),
    }
}

/// The tools, or `None` after a loud SKIPPED; panics instead when `REQUIRE_BROWSER=1`.
pub fn tools(test: &str) -> Option<Tools> {
    let chromedriver = from_env_or_path("CHROMEDRIVER", &["chromedriver"]);
    let chromium = from_env_or_path("CHROMIUM", &["chromium", "chromium-browser"]);
    match (chromedriver, chromium) {
        (Some(chromedriver), Some(chromium)) => Some(Tools {
            chromedriver,
            chromium,
        }),
        (driver, browser) => {
            let missing = format!(
                "chromedriver {}, chromium {} (install: apt-get install -y chromium chromium-driver; \
                 or set CHROMEDRIVER and CHROMIUM)",
                if driver.is_some() {
                    "found"
                } else {
                    "NOT FOUND"
                },
                if browser.is_some() {
                    "found"
                } else {
                    "NOT FOUND"
                },
            );
            if std::env::var("REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("REQUIRE_BROWSER=1 but the browser is missing: {missing}");
            }
            announce(&format!(
                "\n*** SKIPPED {test}: {missing}. Set REQUIRE_BROWSER=1 to make this a failure. ***\n"
            ));
            None
        }
    }
}

/// A running chromedriver, killed when dropped.
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Driver {
    pub fn start(tools: &Tools, log: &Path) -> Self {
        // Free now; chromedriver takes it a moment later. Nothing else on this machine
        // races for ephemeral ports at that rate.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tools.chromedriver.display()));
        let mut driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!("chromedriver exited with {status}; see {}", log.display());
            }
            assert!(
                start.elapsed() < DRIVER_START,
                "chromedriver did not listen in time; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    /// A browser session: headless Chromium with the flags CI needs and a fresh profile.
    pub async fn session(&self, tools: &Tools, profile: &Path) -> Client {
        let options = json!({
            "binary": tools.chromium,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                format!("--user-data-dir={}", profile.display()),
                "--window-size=1000,1100",
            ],
        });
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), options);
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot open a browser session: {e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
