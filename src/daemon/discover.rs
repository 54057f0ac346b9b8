//! Discovery: how the daemon finds out which models its runtime offers. A models file, a
//! shell command, or a fixed answer (the demo's catalogue); each ends in a [`Discovery`],
//! never an error, because a failure is itself what the daemon reports.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::model::{DEFAULT_MAX_MODELS_PER_REPORT, ModelEntry, check_model_count};

/// Largest models document we read: the server refuses report bodies past 1 MiB anyway.
const MAX_DOCUMENT: usize = 1024 * 1024;
/// How much of a command's stderr goes into a failure message: enough for the last few
/// lines, which is where tools put the reason they stopped.
const STDERR_TAIL: usize = 2000;

/// Where the models come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A JSON file, read afresh for every request so that edits apply without a restart.
    ModelsFile(PathBuf),
    /// A command run through `sh -c`; its stdout is the same JSON as a models file.
    Command(String),
    /// Always the same answer: the demo's built-in catalogue, and tests.
    Fixed(Discovery),
}

/// What one discovery found: the daemon reports it as it is.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Discovery {
    Found {
        models: Vec<ModelEntry>,
        /// False when the runtime cannot list models at all.
        supported: bool,
        /// A static stand-in list, not a real discovery: the server never caches it.
        fallback: bool,
    },
    Failed(String),
}

impl Source {
    /// Runs discovery once; gives up with `Failed` after `timeout`.
    pub async fn discover(&self, timeout: Duration) -> Discovery {
        match self {
            Source::Fixed(discovery) => discovery.clone(),
            Source::ModelsFile(path) => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || read_models_file(&path));
                match tokio::time::timeout(timeout, read).await {
                    Ok(Ok(discovery)) => discovery,
                    Ok(Err(e)) => Discovery::Failed(format!("reading the models file failed: {e}")),
                    Err(_) => Discovery::Failed(format!(
                        "reading the models file took longer than {}",
                        humantime::format_duration(timeout)
                    )),
                }
            }
            Source::Command(command) => run_command(command, timeout).await,
        }
    }
}

fn read_models_file(path: &std::path::Path) -> Discovery {
    use std::io::Read;
    let shown = path.display();
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(MAX_DOCUMENT as u64 + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        return Discovery::Failed(format!("cannot read models file {shown}: {e}"));
    }
    if bytes.len() > MAX_DOCUMENT {
        return Discovery::Failed(format!(
            "models file {shown} is larger than {MAX_DOCUMENT} bytes"
        ));
    }
    match parse_models(&bytes) {
        Ok(found) => found,
        Err(e) => Discovery::Failed(format!("models file {shown}: {e}")),
    }
}

/// A models document: `[{"id","label",…}, …]` or `{"models": […], "supported": bool}`.
/// `thinking` and `service_tiers` pass through; other unknown fields are ignored and an
/// entry with an empty id is dropped, as the server does. A model without an id or label,
/// or out of the server's bounds, is refused here, with its index, rather than by the
/// server with a 400 the daemon cannot act on.
pub fn parse_models(json: &[u8]) -> Result<Discovery, String> {
    #[derive(Deserialize)]
    struct Document {
        #[serde(default)]
        models: Vec<Value>,
        #[serde(default = "yes")]
        supported: bool,
        #[serde(default)]
        fallback: bool,
    }
    fn yes() -> bool {
        true
    }
    let value: Value = serde_json::from_slice(json).map_err(|e| format!("invalid JSON: {e}"))?;
    let (entries, supported, fallback) = match value {
        Value::Array(entries) => (entries, true, false),
        object @ Value::Object(_) => {
            let doc: Document = serde_json::from_value(object)
                .map_err(|e| format!("invalid models document: {e}"))?;
            (doc.models, doc.supported, doc.fallback)
        }
        _ => return Err("expected a JSON array of models or an object with \"models\"".into()),
    };
    // More entries than the server takes by default fail the discovery rather than being
    // cut: a truncated list would look complete on the page, a failure says why.
    check_model_count(entries.len(), DEFAULT_MAX_MODELS_PER_REPORT)?;
    let mut models = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let model: ModelEntry =
            serde_json::from_value(entry).map_err(|e| format!("models[{i}]: {e}"))?;
        model.check_at(i)?;
        if !model.has_no_id() {
            models.push(model);
        }
    }
    Ok(Discovery::Found {
        models,
        supported,
        fallback,
    })
}

/// Runs `sh -c command` in a process group of its own, so that on a timeout (or when the
/// daemon stops) the whole group is killed, not just the shell: a grandchild left behind
/// would hold the pipes open and run on unsupervised.
async fn run_command(command: &str, timeout: Duration) -> Discovery {
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Discovery::Failed(format!("cannot start the discovery command: {e}")),
    };
    let group = GroupKiller::new(child.id());
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Discovery::Failed("the discovery command's output is not piped".into());
    };
    // The buffers live outside the timed future, so whatever was read before a timeout is
    // still here to quote.
    let mut out = Captured::head(MAX_DOCUMENT);
    let mut err = Captured::tail(STDERR_TAIL);
    let finished = tokio::time::timeout(timeout, async {
        let (_, _, status) = tokio::join!(out.drain(stdout), err.drain(stderr), child.wait());
        status
    })
    .await;
    let status = match finished {
        Ok(Ok(status)) => {
            group.disarm();
            status
        }
        Ok(Err(e)) => return Discovery::Failed(format!("waiting for the command failed: {e}")),
        Err(_) => {
            drop(group);
            return Discovery::Failed(format!(
                "discovery command timed out after {} and was killed{}",
                humantime::format_duration(timeout),
                err.quoted()
            ));
        }
    };
    if !status.success() {
        return Discovery::Failed(format!(
            "discovery command failed ({}){}",
            describe(status),
            err.quoted()
        ));
    }
    if out.overflowed {
        return Discovery::Failed(format!(
            "discovery command printed more than {MAX_DOCUMENT} bytes"
        ));
    }
    parse_models(&out.bytes).unwrap_or_else(|e| {
        Discovery::Failed(format!(
            "discovery command printed {e} (exit status 0){}",
            err.quoted()
        ))
    })
}

pub(super) fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Kills a command's process group when dropped, unless the command ended by itself.
pub(super) struct GroupKiller(Option<u32>);

impl GroupKiller {
    /// The killer of the group that the command `pid` leads (spawned with
    /// `process_group(0)`).
    pub(super) fn new(pid: Option<u32>) -> Self {
        GroupKiller(pid)
    }

    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        let Some(group) = self.0.and_then(|pid| i32::try_from(pid).ok()) else {
            return;
        };
        // SAFETY: kill(2) takes two integers and touches no memory of ours. A negative pid
        // names the process group the command leads (it was spawned with process_group(0));
        // a group that is already gone gives ESRCH, which is what we want anyway.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// Output read from a pipe, bounded: the first `limit` bytes of stdout, or the last ones of
/// stderr. The pipe is read to its end either way, so the command never blocks on it.
struct Captured {
    bytes: Vec<u8>,
    limit: usize,
    keep_tail: bool,
    overflowed: bool,
}

impl Captured {
    fn head(limit: usize) -> Self {
        Captured {
            bytes: Vec::new(),
            limit,
            keep_tail: false,
            overflowed: false,
        }
    }

    fn tail(limit: usize) -> Self {
        Captured {
            keep_tail: true,
            ..Captured::head(limit)
        }
    }

    async fn drain(&mut self, mut pipe: impl AsyncRead + Unpin) {
        let mut chunk = [0u8; 8192];
        // Each `read` is cancel-safe, so a timeout keeps every byte appended so far.
        while let Ok(n) = pipe.read(&mut chunk).await {
            if n == 0 {
                return;
            }
            self.bytes.extend_from_slice(&chunk[..n]);
            if self.bytes.len() > self.limit {
                self.overflowed = true;
                if self.keep_tail {
                    let excess = self.bytes.len() - self.limit;
                    self.bytes.drain(..excess);
                } else {
                    self.bytes.truncate(self.limit);
                }
            }
        }
    }

    /// `; stderr: …` with the captured text, or nothing when there was none.
    fn quoted(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        match (text.is_empty(), self.overflowed) {
            (true, _) => String::new(),
            (false, false) => format!("; stderr: {text}"),
            (false, true) => format!("; stderr (last {} bytes): …{text}", self.limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: &str, label: &str) -> ModelEntry {
        ModelEntry {
            id: id.into(),
            label: label.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_models_document_is_a_list_or_an_object_and_ignores_unknown_fields() {
        assert_eq!(
            parse_models(br#"[{"id":"a","label":"A","extra":1}]"#),
            Ok(Discovery::Found {
                models: vec![model("a", "A")],
                supported: true,
                fallback: false
            })
        );
        assert_eq!(
            parse_models(br#"{"models":[],"supported":false}"#),
            Ok(Discovery::Found {
                models: vec![],
                supported: false,
                fallback: false
            })
        );
        assert_eq!(
            parse_models(br#"{"models":[{"id":"b","label":"B"}]}"#),
            Ok(Discovery::Found {
                models: vec![model("b", "B")],
                supported: true,
                fallback: false
            })
        );
    }

    #[test]
    fn a_stand_in_list_says_so_and_the_flag_passes_through() {
        assert_eq!(
            parse_models(br#"{"models":[{"id":"a","label":"A"}],"fallback":true}"#),
            Ok(Discovery::Found {
                models: vec![model("a", "A")],
                supported: true,
                fallback: true
            })
        );
    }

    #[test]
    fn thinking_and_service_tiers_pass_through_and_entries_without_an_id_are_dropped() {
        let entry = serde_json::json!({
            "id": "gpt-5", "label": "GPT-5",
            "thinking": {
                "supported_levels": [{"value": "low", "label": "Low"}],
                "default_level": "low"
            },
            "service_tiers": [{"id": "flex", "name": "Flex", "description": "Cheaper"}]
        });
        let document = serde_json::json!([{"id": " ", "label": "Blank"}, entry]).to_string();
        let Ok(Discovery::Found { models, .. }) = parse_models(document.as_bytes()) else {
            panic!("not found")
        };
        assert_eq!(models.len(), 1);
        assert_eq!(serde_json::to_value(&models[0]).unwrap(), entry);
    }

    #[test]
    fn a_bad_models_document_says_what_is_wrong() {
        let err = |json: &[u8]| parse_models(json).unwrap_err();
        assert!(err(b"nope").contains("invalid JSON"));
        assert!(err(b"3").contains("expected a JSON array"));
        assert!(err(br#"[{"id":"a","label":"A"},{"id":"b"}]"#).starts_with("models[1]: "));
        assert!(
            err(br#"[{"id":"a","label":"A","service_tiers":[{"id":"","name":"T"}]}]"#)
                .contains("models[0].service_tiers[0].id must not be empty")
        );
        assert!(err(br#"{"models":{}}"#).contains("invalid models document"));
        // What the server would refuse with a 400, said here instead.
        assert!(
            err(br#"[{"id":"a\u0000b","label":"A"}]"#)
                .contains("models[0].id must not contain control characters")
        );
    }

    #[test]
    fn a_document_past_the_servers_bounds_fails_rather_than_being_cut() {
        let entries = |n: usize| -> Vec<serde_json::Value> {
            (0..n)
                .map(|i| serde_json::json!({"id": format!("m{i}"), "label": "M"}))
                .collect()
        };
        let at_limit = serde_json::to_vec(&entries(DEFAULT_MAX_MODELS_PER_REPORT)).unwrap();
        match parse_models(&at_limit).unwrap() {
            Discovery::Found { models, .. } => {
                assert_eq!(models.len(), DEFAULT_MAX_MODELS_PER_REPORT)
            }
            other => panic!("{other:?}"),
        }
        let past = serde_json::to_vec(&entries(DEFAULT_MAX_MODELS_PER_REPORT + 1)).unwrap();
        assert_eq!(
            parse_models(&past).unwrap_err(),
            "models lists 501 entries; a report may list at most 500"
        );
        let huge = serde_json::json!([{"id": "a", "label": "A"}, {"id": "b", "label": "x".repeat(17_000)}]);
        let error = parse_models(&serde_json::to_vec(&huge).unwrap()).unwrap_err();
        assert!(error.starts_with("models[1] (id \"b\") is 170"), "{error}");
    }

    #[tokio::test]
    async fn stderr_keeps_its_tail_and_stdout_its_head() {
        let mut tail = Captured::tail(4);
        tail.drain(&b"abcdefgh"[..]).await;
        assert_eq!(tail.bytes, b"efgh");
        assert_eq!(tail.quoted(), "; stderr (last 4 bytes): …efgh");
        let mut head = Captured::head(4);
        head.drain(&b"abcdefgh"[..]).await;
        assert_eq!(
            (head.bytes.as_slice(), head.overflowed),
            (&b"abcd"[..], true)
        );
        assert_eq!(Captured::tail(4).quoted(), "");
    }
}
