//! `model-relay serve` as a separate OS process, as users run it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_model-relay");

/// A `serve` process on a free port; killed if dropped without `terminate`. Its log lines
/// are kept.
pub struct Serve {
    child: Child,
    pub base: String,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Serve {
    /// Starts `serve --listen 127.0.0.1:0 --database DATABASE EXTRA…` and waits until it
    /// says where it listens.
    pub fn start(database: &str, extra: &[&str]) -> Self {
        Self::start_with(database, extra, "info")
    }

    pub fn start_with(database: &str, extra: &[&str], rust_log: &str) -> Self {
        Self::spawn(Self::command(database, extra, rust_log))
    }

    /// [`Serve::start`], as a process whose limits on open files are `soft` and `hard`.
    #[cfg(unix)]
    pub fn start_with_open_files(database: &str, extra: &[&str], soft: u64, hard: u64) -> Self {
        use std::os::unix::process::CommandExt;
        let mut command = Self::command(database, extra, "info");
        // SAFETY: between fork and exec, setrlimit is async-signal-safe and touches only
        // the child.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::spawn(command)
    }

    /// The PID of the process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line it logged so far.
    pub fn logs_so_far(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn command(database: &str, extra: &[&str], rust_log: &str) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--database", database])
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    fn spawn(mut command: Command) -> Self {
        let mut child = command.spawn().expect("start model-relay serve");
        // The log line `model-relay serving listen=ADDR` (or `"listen":"ADDR"` in JSON)
        // says which port it took.
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut scheme = "http";
        let addr = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .expect("read serve's log");
            logs.lock().unwrap().push(line.clone());
            let text = line.split("listen=").nth(1).map(str::to_owned);
            let json = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v["fields"]["listen"].as_str().map(str::to_owned));
            if line.contains(r#"scheme="https""#) || line.contains(r#""scheme":"https""#) {
                scheme = "https";
            }
            if let Some(addr) = text.or(json) {
                break addr
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        // Keep reading the log so the process never blocks on a full pipe.
        let kept = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Serve {
            child,
            base: format!("{scheme}://{addr}"),
            logs,
            reader: Some(reader),
        }
    }

    /// `kill -SIGNAL`, then the exit status.
    pub fn signal(&mut self, signal: &str) -> ExitStatus {
        self.send(signal);
        self.child.wait().expect("wait for serve")
    }

    /// `kill -SIGNAL`, without waiting for anything.
    pub fn send(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// SIGTERM, then the exit status if it exits within `bound` (else it is killed when
    /// dropped, and this says `None`).
    pub fn terminate_within(mut self, bound: std::time::Duration) -> Option<ExitStatus> {
        self.send("TERM");
        let start = std::time::Instant::now();
        while start.elapsed() < bound {
            if let Some(status) = self.child.try_wait().expect("wait for serve") {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal("TERM")
    }

    /// Every line it logged; call once it has exited.
    pub fn all_logs(&mut self) -> Vec<String> {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.logs.lock().unwrap().clone()
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
