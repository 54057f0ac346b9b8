//! `model-relay serve` as a separate OS process, as users run it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_model-relay");

/// A `serve` process on a free port; killed if dropped without `terminate`.
pub struct Serve {
    child: Child,
    pub base: String,
}

impl Serve {
    /// Starts `serve --listen 127.0.0.1:0 --database DATABASE EXTRA…` and waits until it
    /// says where it listens.
    pub fn start(database: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--database", database])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start model-relay serve");
        // The log line `model-relay serving listen=ADDR` says which port it took.
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .expect("read serve's log");
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Serve {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        self.child.wait().expect("wait for serve")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `model-relay workspace create NAME --json` on `database`: the API token.
pub fn workspace_create(database: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "workspace",
            "create",
            "acme",
            "--json",
            "--database",
            database,
        ])
        .env_remove("MODEL_RELAY_DATABASE")
        .env_remove("DATABASE_URL")
        .output()
        .expect("run workspace create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert_eq!(stdout.lines().count(), 1, "exactly one line: {stdout:?}");
    serde_json::from_str(&stdout).expect("one JSON object")
}
