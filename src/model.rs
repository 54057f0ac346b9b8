//! The domain: what a request and a runtime are, the statuses a request moves through,
//! what a daemon may report, and the deadlines that end a request nobody finishes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{Millis, millis};
use crate::ids::{RequestId, RuntimeId, WorkspaceId};
use crate::kind::Kind;

/// Where a request is in its life. See the state machine in DESIGN.md.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Status {
    Pending,
    Running,
    Completed,
    Failed,
    Timeout,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "running" => Status::Running,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "timeout" => Status::Timeout,
            _ => return None,
        })
    }

    /// Terminal statuses are final: nothing changes a request once it has one.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Timeout)
    }
}

/// Free text (a report's `error`, model labels and descriptions, and whatever else of a
/// model entry the store keeps) with each NUL replaced by U+FFFD; newlines, tabs and
/// everything else stay as sent. PostgreSQL's text columns refuse NUL (SQLSTATE 22021)
/// where SQLite and memory keep it, and DESIGN.md asks every engine for the same answer:
/// the text is cleaned before any engine sees it, instead of each engine failing its own
/// way. Discovery commands do print NULs, so refusing the report would lose a real failure.
pub fn replace_nul(text: &mut String) {
    if text.contains('\0') {
        *text = text.replace('\0', "\u{FFFD}");
    }
}

/// Whether identifier-like text (a runtime's name or provider, a model id) holds a control
/// character: NUL and the rest of C0, DEL, C1. Such text is refused with a 400 that names
/// the field rather than cleaned, since an id that reads differently from what was sent is
/// not the same id; an invisible control in a name is never meant either.
pub fn holds_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// One model a runtime offers, as the daemon reported it. Stored and returned as sent;
/// fields not named here are dropped.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    /// The reasoning-effort levels the model takes, for the page's effort picker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Thinking>,
    /// The service tiers the model is offered in, for the page's tier picker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tiers: Option<Vec<ServiceTier>>,
}

/// The most reasoning-effort levels, and the most service tiers, one model entry may list.
pub const MAX_MODEL_CHOICES: usize = 32;
/// The longest level value or label, tier id or name, in characters.
pub const MAX_CHOICE_TEXT: usize = 200;
/// The longest description of a level or a tier, in characters.
pub const MAX_DESCRIPTION: usize = 1000;

/// The most bytes one model entry may take as JSON. The field bounds of
/// [`ModelEntry::check`] leave `id`, `label` and `provider` open and allow far more
/// choice text than any real model has (about 90,000 characters); real entries are well
/// under 2 KiB.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;
/// The default of `serve --max-models-per-report`, and the bound the reference daemon
/// holds to before it reports.
pub const DEFAULT_MAX_MODELS_PER_REPORT: usize = 500;

/// A report's count of entries against the most allowed (`--max-models-per-report`).
pub fn check_model_count(count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!(
            "models lists {count} entries; a report may list at most {max}"
        ));
    }
    Ok(())
}

impl ModelEntry {
    /// [`check`](Self::check) and [`MAX_ENTRY_BYTES`], with the error naming the entry as
    /// `models[i]`, the way the server's 400 and the daemon's failed discovery say it.
    pub fn check_at(&self, i: usize) -> Result<(), String> {
        self.check().map_err(|e| format!("models[{i}].{e}"))?;
        // Serializing plain strings and numbers cannot fail; if it did, refuse the entry.
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |json| json.len());
        if bytes > MAX_ENTRY_BYTES {
            let id: String = self.id.chars().take(64).collect();
            return Err(format!(
                "models[{i}] (id {id:?}) is {bytes} bytes of JSON; an entry may be at most \
                 {MAX_ENTRY_BYTES}"
            ));
        }
        Ok(())
    }

    /// An entry whose id is empty or white space: dropped from a report, the rest of the
    /// report standing (refused whole, the report would be lost: the reference daemon does
    /// not retry a 4xx). The server and the daemon both apply it.
    pub fn has_no_id(&self) -> bool {
        self.id.trim().is_empty()
    }

    /// The bounds of `thinking` and `service_tiers`: at most [`MAX_MODEL_CHOICES`] of each,
    /// no empty level value or tier id, and texts bounded. Nothing else: a `default_level`
    /// that names no level is kept as sent, like the rest (the page then preselects none).
    /// The error names the field (`thinking.supported_levels[2].value …`).
    /// An empty `id` is not an error: such an entry is dropped ([`has_no_id`](Self::has_no_id)), not refused.
    pub fn check(&self) -> Result<(), String> {
        // An id of white space only (tabs and newlines too) is dropped, not refused.
        if !self.has_no_id() && holds_control(&self.id) {
            return Err("id must not contain control characters".to_owned());
        }
        if let Some(thinking) = &self.thinking {
            let levels = thinking.supported_levels.iter();
            let levels = levels.map(|l| (&*l.value, &*l.label, l.description.as_deref()));
            check_choices(
                "thinking.supported_levels",
                "levels",
                ["value", "label"],
                levels,
            )?;
            let default = thinking.default_level.as_deref().unwrap_or_default();
            check_text("thinking.default_level", default, MAX_CHOICE_TEXT, false)?;
        }
        let tiers = self.service_tiers.as_deref().unwrap_or_default().iter();
        let tiers = tiers.map(|t| (&*t.id, &*t.name, t.description.as_deref()));
        check_choices("service_tiers", "tiers", ["id", "name"], tiers)
    }

    /// Replaces NUL in every text of the entry ([`replace_nul`]). The report parser has
    /// refused an id with a control character already ([`check`](Self::check)); the
    /// store cleans the id too, so that a caller that skips the parser still gets the same
    /// record from every engine.
    pub fn replace_nul(&mut self) {
        replace_nul(&mut self.id);
        replace_nul(&mut self.label);
        if let Some(provider) = &mut self.provider {
            replace_nul(provider);
        }
        if let Some(thinking) = &mut self.thinking {
            for level in &mut thinking.supported_levels {
                replace_nul(&mut level.value);
                replace_nul(&mut level.label);
                if let Some(description) = &mut level.description {
                    replace_nul(description);
                }
            }
            if let Some(default) = &mut thinking.default_level {
                replace_nul(default);
            }
        }
        for tier in self.service_tiers.iter_mut().flatten() {
            replace_nul(&mut tier.id);
            replace_nul(&mut tier.name);
            if let Some(description) = &mut tier.description {
                replace_nul(description);
            }
        }
    }
}

/// A list of choices (reasoning-effort levels, service tiers): at most
/// [`MAX_MODEL_CHOICES`], each a key that must not be empty, a name and maybe a
/// description, all bounded. `fields` names the key and the name.
fn check_choices<'a>(
    list: &str,
    noun: &str,
    [key_field, name_field]: [&str; 2],
    choices: impl ExactSizeIterator<Item = (&'a str, &'a str, Option<&'a str>)>,
) -> Result<(), String> {
    if choices.len() > MAX_MODEL_CHOICES {
        return Err(format!(
            "{list} must list at most {MAX_MODEL_CHOICES} {noun}"
        ));
    }
    for (j, (key, name, description)) in choices.enumerate() {
        let at = format!("{list}[{j}]");
        check_text(&format!("{at}.{key_field}"), key, MAX_CHOICE_TEXT, true)?;
        check_text(&format!("{at}.{name_field}"), name, MAX_CHOICE_TEXT, false)?;
        let description = description.unwrap_or_default();
        check_text(
            &format!("{at}.description"),
            description,
            MAX_DESCRIPTION,
            false,
        )?;
    }
    Ok(())
}

fn check_text(what: &str, value: &str, max: usize, required: bool) -> Result<(), String> {
    if required && value.trim().is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.chars().count() > max {
        return Err(format!("{what} must be at most {max} characters"));
    }
    Ok(())
}

/// `{"supported_levels": [...], "default_level"?}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Thinking {
    pub supported_levels: Vec<ThinkingLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_level: Option<String>,
}

/// `{"value", "label", "description"?}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ThinkingLevel {
    pub value: String,
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `{"id", "name", "description"?}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ServiceTier {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One request for one runtime, of any kind, as stored.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredRequest {
    pub id: RequestId,
    pub runtime_id: RuntimeId,
    pub kind: Kind,
    /// The coalescing key: the value of the kind's key field in `input` (a skill import's
    /// `skill_key`), empty for kinds without one.
    pub key: String,
    /// The kind's input, a JSON object as the create's parser wrote it; `None` for none.
    pub input: Option<String>,
    /// The result of every kind but `models` (whose result has columns of its own): a JSON
    /// object as the report's parser wrote it; `None` until reported.
    pub result: Option<String>,
    pub status: Status,
    pub models: Vec<ModelEntry>,
    /// False when the runtime does not support listing models at all.
    pub supported: bool,
    pub error: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// While pending: the last moment it may be claimed. While running: the end of the
    /// daemon's lease. Kept after the end for the record.
    pub deadline_at: Millis,
    /// When it reached a terminal status; retention counts from here.
    pub ended_at: Option<Millis>,
    /// The report was a static stand-in list, not a real discovery: never cached.
    pub fallback: bool,
    /// An answer from the runtime's catalog: when the catalog was reported.
    pub cached_at: Option<Millis>,
    /// An answer from a stale catalog: the discovery it started in the background.
    pub refresh_id: Option<RequestId>,
}

impl StoredRequest {
    /// Active (pending or running) but past its deadline: the next look at it ends it.
    pub fn is_overdue(&self, now: Millis) -> bool {
        !self.status.is_terminal() && self.deadline_at <= now
    }
}

/// The end a daemon reports for a request it claimed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Outcome {
    /// `Completed` or `Failed`; the parser refuses anything else.
    pub status: Status,
    pub models: Vec<ModelEntry>,
    pub supported: bool,
    pub error: Option<String>,
    pub fallback: bool,
    /// The result of a kind other than `models`, a JSON object; `None` for none.
    pub result: Option<String>,
}

impl Outcome {
    /// Replaces NUL in the error and in every model text ([`replace_nul`]): what the store
    /// records, so also what a replay is compared with.
    pub fn replace_nul(&mut self) {
        if let Some(error) = &mut self.error {
            replace_nul(error);
        }
        self.models.iter_mut().for_each(ModelEntry::replace_nul);
    }

    /// Whether `request` already ended with exactly this outcome: a retried report.
    pub fn is_recorded_in(&self, request: &StoredRequest) -> bool {
        request.status == self.status
            && request.models == self.models
            && request.supported == self.supported
            && request.error == self.error
            && request.fallback == self.fallback
            && request.result == self.result
    }

    /// What this outcome does to the runtime's catalog, in the transaction that records
    /// it: a real discovery that found models replaces it; one that found none, or found
    /// that the runtime cannot list models, removes it; a failure or a stand-in list
    /// leaves it.
    pub fn catalog(&self) -> CatalogChange {
        match self.status {
            Status::Completed if self.fallback => CatalogChange::Keep,
            Status::Completed if self.supported && !self.models.is_empty() => CatalogChange::Write,
            Status::Completed => CatalogChange::Remove,
            _ => CatalogChange::Keep,
        }
    }
}

/// See [`Outcome::catalog`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CatalogChange {
    Keep,
    /// The outcome's models and `supported` become the catalog, reported now.
    Write,
    Remove,
}

/// What a daemon may report about a request it holds.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Report {
    /// Still working: renew the lease.
    Running,
    /// Still working, and this far: renew the lease and store this result (a JSON object;
    /// an update's output so far).
    Progress(String),
    Ended(Outcome),
}

/// The answer to a report.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReportOutcome {
    /// The report changed the request.
    Recorded,
    /// The request already ended with exactly this report: a retry, answered as success.
    Replayed,
    /// No such request for this runtime.
    NotFound,
    /// The request is not running; its status is given.
    NotRunning(Status),
}

/// A runtime as stored.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Runtime {
    pub id: RuntimeId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub provider: String,
    pub last_seen_at: Option<Millis>,
    pub created_at: Millis,
    /// When its catalog was reported, if it has one.
    pub catalog_at: Option<Millis>,
}

impl Runtime {
    pub fn is_online(&self, now: Millis, offline_after: Duration) -> bool {
        self.last_seen_at
            .is_some_and(|seen| now.saturating_sub(seen) < millis(offline_after))
    }
}

/// How long a request may wait for a claim, and how long a claimed one may run without
/// a report or renewal.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Timeouts {
    pub pending: Duration,
    pub running: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            pending: Duration::from_secs(30),
            running: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    pub fn pending_deadline(&self, now: Millis) -> Millis {
        now.saturating_add(millis(self.pending))
    }

    pub fn running_deadline(&self, now: Millis) -> Millis {
        now.saturating_add(millis(self.running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_replaced_in_free_text_and_controls_are_found_in_identifiers() {
        let mut text = String::from("a\0b\n\t𝄞\0");
        replace_nul(&mut text);
        assert_eq!(text, "a\u{FFFD}b\n\t𝄞\u{FFFD}");
        for c in ['\0', '\t', '\n', '\u{1b}', '\u{7f}', '\u{85}'] {
            assert!(holds_control(&format!("a{c}b")), "{c:?}");
        }
        assert!(!holds_control("𝄞 laptop é\u{200B}\u{FFFD}"));
    }

    #[test]
    fn status_names_round_trip_and_only_ends_are_terminal() {
        for s in [
            Status::Pending,
            Status::Running,
            Status::Completed,
            Status::Failed,
            Status::Timeout,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
        assert!(!Status::Pending.is_terminal() && !Status::Running.is_terminal());
        assert!(Status::Completed.is_terminal() && Status::Failed.is_terminal());
        assert!(Status::Timeout.is_terminal());
    }

    #[test]
    fn only_a_real_discovery_with_models_writes_the_catalog() {
        let found = Outcome {
            result: None,
            status: Status::Completed,
            models: vec![ModelEntry {
                id: "m".into(),
                label: "M".into(),
                ..Default::default()
            }],
            supported: true,
            error: None,
            fallback: false,
        };
        assert_eq!(found.catalog(), CatalogChange::Write);
        let stand_in = Outcome {
            fallback: true,
            ..found.clone()
        };
        assert_eq!(stand_in.catalog(), CatalogChange::Keep);
        let none = Outcome {
            models: vec![],
            ..found.clone()
        };
        assert_eq!(none.catalog(), CatalogChange::Remove);
        let unsupported = Outcome {
            supported: false,
            ..found.clone()
        };
        assert_eq!(unsupported.catalog(), CatalogChange::Remove);
        let failed = Outcome {
            status: Status::Failed,
            models: vec![],
            error: Some("no".into()),
            ..found
        };
        assert_eq!(failed.catalog(), CatalogChange::Keep);
    }

    #[test]
    fn a_runtime_is_online_until_offline_after_passes() {
        let rt = Runtime {
            id: RuntimeId::random().unwrap(),
            workspace_id: WorkspaceId::random().unwrap(),
            name: "n".into(),
            provider: "p".into(),
            last_seen_at: Some(10_000),
            created_at: 0,
            catalog_at: None,
        };
        let after = Duration::from_secs(45);
        assert!(rt.is_online(10_000 + 44_999, after));
        assert!(!rt.is_online(10_000 + 45_000, after));
        let never = Runtime {
            last_seen_at: None,
            ..rt
        };
        assert!(!never.is_online(10_000, after));
    }
}
