//! The self-update: `--update-cmd CMD` run with `sh -c`, `MODEL_RELAY_TARGET_VERSION` set,
//! in a process group of its own, killed past `--update-timeout`. Its exit status decides
//! the outcome; the last [`MAX_OUTPUT`] bytes of its stdout and stderr, together, are its
//! `output`, readable while it runs (the daemon reports them as progress).

use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::discover::{GroupKiller, describe};

/// How much output is kept: its end, where the outcome is.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// What the command has printed so far (both streams, in the order read), its last
/// [`MAX_OUTPUT`] bytes.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    fn push(&self, bytes: &[u8]) {
        let mut kept = self.lock();
        kept.extend_from_slice(bytes);
        if kept.len() > MAX_OUTPUT {
            let excess = kept.len() - MAX_OUTPUT;
            kept.drain(..excess);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // Only appended to and cut: a poisoned lock still holds whole bytes.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How an update ended: `Ok` when the command exited 0, else why not.
pub async fn run(
    command: &str,
    target_version: &str,
    timeout: Duration,
    output: &Output,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("MODEL_RELAY_TARGET_VERSION", target_version)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the update command: {e}"))?;
    // Kills the whole group when this future is dropped (the daemon stops) or times out.
    let group = GroupKiller::new(child.id());
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("the update command's output is not piped".into());
    };
    let finished = tokio::time::timeout(timeout, async {
        let (_, _, status) =
            tokio::join!(drain(stdout, output), drain(stderr, output), child.wait());
        status
    })
    .await;
    match finished {
        Ok(Ok(status)) if status.success() => {
            group.disarm();
            Ok(())
        }
        Ok(Ok(status)) => {
            group.disarm();
            Err(format!("update command failed ({})", describe(status)))
        }
        Ok(Err(e)) => Err(format!("waiting for the update command failed: {e}")),
        Err(_) => {
            drop(group);
            Err(format!(
                "update command timed out after {} and was killed",
                humantime::format_duration(timeout)
            ))
        }
    }
}

async fn drain(mut pipe: impl AsyncRead + Unpin, output: &Output) {
    let mut chunk = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            return;
        }
        output.push(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_command_gets_the_target_version_and_its_output_is_kept() {
        let output = Output::default();
        let ran = run(
            "echo \"to $MODEL_RELAY_TARGET_VERSION\"; echo oops >&2",
            "2.1.0",
            Duration::from_secs(10),
            &output,
        )
        .await;
        assert_eq!(ran, Ok(()));
        let text = output.text();
        assert!(
            text.contains("to 2.1.0\n") && text.contains("oops\n"),
            "{text:?}"
        );
    }

    #[tokio::test]
    async fn a_failing_or_slow_command_fails_the_update() {
        let output = Output::default();
        let failed = run("echo half; exit 3", "x", Duration::from_secs(10), &output).await;
        assert_eq!(
            failed,
            Err("update command failed (exit status 3)".to_owned())
        );
        assert_eq!(output.text(), "half\n");
        let slow = run(
            "sleep 30",
            "x",
            Duration::from_millis(200),
            &Output::default(),
        )
        .await;
        assert_eq!(
            slow,
            Err("update command timed out after 200ms and was killed".to_owned())
        );
    }

    #[test]
    fn output_keeps_its_last_64_kib() {
        let output = Output::default();
        output.push(&vec![b'a'; MAX_OUTPUT]);
        output.push(b"end");
        let text = output.text();
        assert_eq!(text.len(), MAX_OUTPUT);
        assert!(text.ends_with("aend"));
    }
}
