//! JSON on the wire: the bodies callers send, parsed into domain types (or refused with a
//! message that says what is wrong), and the records we send back. Shapes follow the
//! reference system so its daemons and UI work unchanged.

use hyper::header;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::clock::rfc3339;
use crate::ids::{RequestId, RuntimeId, Token};
use crate::kind::Kind;
use crate::model::{
    DEFAULT_MAX_MODELS_PER_REPORT, ModelEntry, Outcome, Report, Runtime, Status, StoredRequest,
    check_model_count, holds_control,
};
use crate::store::Handed;
use crate::store::RuntimeCursor;

/// Longest runtime name and provider we store: enough for any real name, small enough that
/// a list of runtimes stays a small answer.
const MAX_NAME: usize = 200;
const MAX_PROVIDER: usize = 100;

pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

// ---- bodies we accept ----

/// `POST /api/runtimes`.
pub struct NewRuntimeBody {
    pub name: String,
    pub provider: String,
}

pub fn parse_new_runtime(body: &[u8]) -> Result<NewRuntimeBody, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        name: String,
        provider: String,
    }
    let raw: Raw = parse_json(body)?;
    Ok(NewRuntimeBody {
        name: bounded_text("name", raw.name, MAX_NAME)?,
        provider: bounded_text("provider", raw.provider, MAX_PROVIDER)?,
    })
}

fn bounded_text(field: &str, value: String, max: usize) -> Result<String, ApiError> {
    // The bound applies to the value as sent, before trimming: that is what the OpenAPI
    // document's `maxLength` says, so a client that validates against it agrees with us.
    if value.chars().count() > max {
        return Err(ApiError::BadRequest(format!(
            "{field} must be at most {max} characters"
        )));
    }
    // Invisible at either end: whitespace of any script, and format characters such as
    // the zero-width space, which would make a name that looks blank.
    let value = value.trim_matches(|c: char| c.is_whitespace() || is_format(c));
    if value.is_empty() {
        return Err(ApiError::BadRequest(format!("{field} must not be empty")));
    }
    // DESIGN.md: refused alike on every engine, never left for PostgreSQL to fail on.
    if holds_control(value) {
        return Err(ApiError::BadRequest(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(value.to_owned())
}

/// Unicode's format characters (general category Cf): invisible, they change how text
/// around them is shown (zero-width space and joiners, direction marks, the byte order
/// mark, soft hyphen, tags).
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// The most request ids a heartbeat's `working_on` may list: a daemon holds a handful.
pub const MAX_WORKING_ON: usize = 1000;

/// `POST /api/daemon/heartbeat`: `{"runtime_id", "wait_ms"?, "working_on"?}`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HeartbeatBody {
    pub runtime_id: RuntimeId,
    /// How long the daemon is willing to wait for a request, before clamping; 0: answer
    /// at once.
    pub wait_ms: u64,
    /// The requests the daemon holds, when it says so; `None` keeps v1 behaviour (nothing
    /// is handed out twice).
    pub working_on: Option<Vec<RequestId>>,
    /// The daemon takes a kind's batch in one answer (`supports_batch_import`).
    pub batches: bool,
}

pub fn parse_heartbeat(body: &[u8]) -> Result<HeartbeatBody, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        runtime_id: String,
        // Raw: whether it was written as an integer is in its text, which a parsed number
        // no longer tells (`1e3` and `1000.0` parse as the float 1000).
        #[serde(default)]
        wait_ms: Option<Box<serde_json::value::RawValue>>,
        #[serde(default)]
        working_on: Option<Vec<String>>,
        #[serde(default)]
        supports_batch_import: Option<bool>,
    }
    let raw: Raw = parse_json(body)?;
    let runtime_id = RuntimeId::parse(&raw.runtime_id)
        .ok_or_else(|| ApiError::BadRequest("runtime_id must be a UUID".to_owned()))?;
    let wait_ms = match raw.wait_ms.as_deref().map(serde_json::value::RawValue::get) {
        None | Some("null") => 0,
        Some(text) => wait_ms_from_digits(text)?,
    };
    let working_on = match raw.working_on {
        None => None,
        Some(ids) if ids.len() > MAX_WORKING_ON => {
            return Err(ApiError::BadRequest(format!(
                "working_on must list at most {MAX_WORKING_ON} request ids"
            )));
        }
        Some(ids) => Some(
            ids.iter()
                .map(|id| {
                    RequestId::parse(id).ok_or_else(|| {
                        ApiError::BadRequest(
                            "working_on must be an array of request ids (32 lowercase hex)"
                                .to_owned(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(HeartbeatBody {
        runtime_id,
        wait_ms,
        working_on,
        batches: raw.supports_batch_import.unwrap_or(false),
    })
}

const BAD_WAIT: &str = "wait_ms must be an integer of at least 0";

/// A `wait_ms` as written, in the body or the query: digits only, so an integer ≥ 0 (no
/// sign, fraction or exponent: `1e3`, `1000.0` and `0.0` are refused, as DESIGN.md says of
/// a non-integer). One too large for 64 bits is still a whole number and is clamped like
/// any other long wait.
fn wait_ms_from_digits(text: &str) -> Result<u64, ApiError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(BAD_WAIT.to_owned()));
    }
    Ok(text.parse().unwrap_or(u64::MAX))
}

/// `?wait_ms=N` of a read: absent is 0; digits only (no sign); any other parameter is
/// ignored. A number too large for 64 bits is clamped like any other long wait.
pub fn parse_wait_query(query: Option<&str>) -> Result<u64, ApiError> {
    let Some(query) = query else {
        return Ok(0);
    };
    let mut wait = 0;
    for pair in query.split('&') {
        let Some(value) = pair.strip_prefix("wait_ms=") else {
            if pair == "wait_ms" {
                return Err(ApiError::BadRequest(BAD_WAIT.to_owned()));
            }
            continue;
        };
        wait = wait_ms_from_digits(value)?;
    }
    Ok(wait)
}

/// A page of `GET /api/runtimes` when the caller names no `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// The largest `limit` of `GET /api/runtimes`.
pub const MAX_PAGE: usize = 1000;

const BAD_LIMIT: &str = "limit must be a whole number from 1 to 1000";
const BAD_CURSOR: &str = "cursor is malformed (pass next_cursor back as it is)";

/// `?limit=N&cursor=C` of `GET /api/runtimes`: the page size ([`DEFAULT_PAGE`] when absent)
/// and where the page starts. Other parameters are ignored; a bad value of either, or
/// either given twice, is 400.
pub fn parse_page_query(query: Option<&str>) -> Result<(usize, Option<RuntimeCursor>), ApiError> {
    let mut limit = None;
    let mut cursor = None;
    for pair in query.unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let twice = |name: &str| ApiError::BadRequest(format!("{name} given more than once"));
        match name {
            "limit" if limit.is_some() => return Err(twice(name)),
            "cursor" if cursor.is_some() => return Err(twice(name)),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| {
                        (1..=MAX_PAGE).contains(n) && value.bytes().all(|b| b.is_ascii_digit())
                    })
                    .map(Some)
                    .ok_or_else(|| ApiError::BadRequest(BAD_LIMIT.to_owned()))?;
            }
            "cursor" => {
                cursor = Some(
                    decode_cursor(value)
                        .ok_or_else(|| ApiError::BadRequest(BAD_CURSOR.to_owned()))?,
                );
            }
            _ => {}
        }
    }
    Ok((limit.unwrap_or(DEFAULT_PAGE), cursor))
}

/// The opaque `next_cursor`: `created_at.id` of the page's last runtime, in hex, so that
/// callers pass it back as it is rather than build one.
pub fn encode_cursor(cursor: RuntimeCursor) -> String {
    let text = format!("{}.{}", cursor.created_at, cursor.id);
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(hex: &str) -> Option<RuntimeCursor> {
    if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let (created_at, id) = text.split_once('.')?;
    Some(RuntimeCursor {
        created_at: created_at.parse().ok()?,
        id: RuntimeId::parse(id)?,
    })
}

/// `POST /api/daemon/runtimes/{id}/models/{id}/result`. Unknown fields are ignored.
/// Within the default of `--max-models-per-report`.
pub fn parse_report(body: &[u8]) -> Result<Report, ApiError> {
    parse_report_within(body, DEFAULT_MAX_MODELS_PER_REPORT)
}

/// A report body; `max_models` is `--max-models-per-report`: a longer list is refused whole
/// (400), as is an entry out of [`ModelEntry::check_at`]'s bounds.
pub fn parse_report_within(body: &[u8], max_models: usize) -> Result<Report, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        status: String,
        #[serde(default)]
        models: Option<Vec<ModelEntry>>,
        #[serde(default)]
        supported: Option<bool>,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        fallback: bool,
    }
    let raw: Raw = parse_json(body)?;
    let status = match raw.status.as_str() {
        "running" => return Ok(Report::Running),
        "completed" => Status::Completed,
        "failed" => Status::Failed,
        _ => {
            return Err(ApiError::BadRequest(
                "status must be \"completed\", \"failed\" or \"running\"".to_owned(),
            ));
        }
    };
    let mut models = raw.models.unwrap_or_default();
    check_model_count(models.len(), max_models).map_err(ApiError::BadRequest)?;
    for (i, model) in models.iter().enumerate() {
        model.check_at(i).map_err(ApiError::BadRequest)?;
    }
    models.retain(|m| !m.has_no_id());
    let mut outcome = Outcome {
        status,
        models,
        supported: raw.supported.unwrap_or(true),
        error: raw.error.filter(|e| !e.is_empty()),
        fallback: raw.fallback,
        result: None,
    };
    // NUL in free text is replaced, not refused: a discovery command's stderr may hold
    // one, and the failure it reports is worth keeping. The store does it again; doing it
    // here too means what the parser hands on is already what will be stored.
    outcome.replace_nul();
    Ok(Report::Ended(outcome))
}

/// `POST /api/runtimes/{id}/models`: no body, or `{"refresh": bool}` — whether to skip the
/// catalog. Unknown fields are ignored.
pub fn parse_ask(body: &[u8]) -> Result<bool, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    let bad = || ApiError::BadRequest("body must be {\"refresh\": true or false}".to_owned());
    let value: serde_json::Value = parse_json(body)?;
    match value.as_object().ok_or_else(bad)?.get("refresh") {
        None => Ok(false),
        Some(refresh) => refresh.as_bool().ok_or_else(bad),
    }
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(value: Option<&header::HeaderValue>) -> Option<Token> {
    let value = value?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| Token::from_header(token))
}

// ---- records we send ----

/// A request's record: the fields every kind has, a model list's own fields, and the
/// kind's input and result fields.
#[derive(Serialize)]
pub struct RequestRecord<'a> {
    id: String,
    runtime_id: String,
    kind: &'static str,
    status: &'static str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    models: &'a [ModelEntry],
    /// A model list's; a skill list's is among its result fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    supported: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    fallback: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    cached_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_id: Option<String>,
    created_at: String,
    updated_at: String,
    /// The kind's input fields, then its result fields.
    #[serde(flatten)]
    fields: serde_json::Map<String, serde_json::Value>,
}

/// The fields of a stored JSON object; nothing when there is none (or it is not one).
fn object_fields(json: Option<&str>) -> serde_json::Map<String, serde_json::Value> {
    json.and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

impl<'a> From<&'a StoredRequest> for RequestRecord<'a> {
    fn from(r: &'a StoredRequest) -> Self {
        let mut fields = object_fields(r.input.as_deref());
        fields.extend(object_fields(r.result.as_deref()));
        RequestRecord {
            id: r.id.to_string(),
            runtime_id: r.runtime_id.to_string(),
            kind: r.kind.name(),
            status: r.status.as_str(),
            models: &r.models,
            supported: (r.kind == Kind::Models).then_some(r.supported),
            error: r.error.as_deref().filter(|e| !e.is_empty()),
            fallback: r.fallback,
            cached: r.cached_at.is_some(),
            cached_at: r.cached_at.map(rfc3339),
            refresh_id: r.refresh_id.map(|id| id.to_string()),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
            fields,
        }
    }
}

#[derive(Serialize)]
pub struct RuntimeRecord<'a> {
    id: String,
    name: &'a str,
    provider: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen_at: Option<String>,
    created_at: String,
    /// Only in the answer to the runtime's creation: it is never shown again.
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon_token: Option<&'a str>,
}

impl<'a> RuntimeRecord<'a> {
    pub fn new(r: &'a Runtime, online: bool, daemon_token: Option<&'a Token>) -> Self {
        RuntimeRecord {
            id: r.id.to_string(),
            name: &r.name,
            provider: &r.provider,
            status: if online { "online" } else { "offline" },
            last_seen_at: r.last_seen_at.map(rfc3339),
            created_at: rfc3339(r.created_at),
            daemon_token: daemon_token.map(Token::expose),
        }
    }
}

#[derive(Serialize)]
pub struct RuntimeList<'a> {
    pub runtimes: Vec<RuntimeRecord<'a>>,
    /// Where the next page starts; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Serialize)]
#[serde(transparent)]
pub struct HeartbeatAck(serde_json::Map<String, serde_json::Value>);

impl HeartbeatAck {
    /// `{"status":"ok"}` and each request handed out in its kind's field: `{"id", …}` with
    /// the input fields the kind's hand-out names, or an array of them in the kind's batch
    /// field when the daemon takes batches.
    pub fn new(handed: &[Handed], batches: bool) -> Self {
        let mut ack = serde_json::Map::new();
        ack.insert("status".to_owned(), "ok".into());
        for h in handed {
            let spec = h.kind.spec();
            let input: serde_json::Map<String, serde_json::Value> = h
                .input
                .as_deref()
                .and_then(|json| serde_json::from_str(json).ok())
                .unwrap_or_default();
            let mut entry = serde_json::Map::new();
            entry.insert("id".to_owned(), h.id.to_string().into());
            for &field in spec.ack_fields {
                if let Some(value) = input.get(field) {
                    entry.insert(field.to_owned(), value.clone());
                }
            }
            match spec.batch_ack.filter(|_| batches) {
                Some(field) => {
                    let list = ack
                        .entry(field)
                        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                    if let serde_json::Value::Array(list) = list {
                        list.push(entry.into());
                    }
                }
                None => {
                    ack.insert(spec.ack.to_owned(), entry.into());
                }
            }
        }
        HeartbeatAck(ack)
    }
}

/// The answer to a daemon token's rotation: the new token, shown this once.
#[derive(Serialize)]
pub struct DaemonTokenRecord<'a> {
    pub daemon_token: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_comes_back_as_it_went_and_anything_else_is_refused() {
        let cursor = RuntimeCursor {
            created_at: 1_777_627_161_000,
            id: RuntimeId::random().unwrap(),
        };
        let text = encode_cursor(cursor);
        let query = format!("limit=7&cursor={text}");
        assert_eq!(parse_page_query(Some(&query)).unwrap(), (7, Some(cursor)));
        assert_eq!(parse_page_query(None).unwrap(), (DEFAULT_PAGE, None));
        assert_eq!(parse_page_query(Some("x=1")).unwrap(), (DEFAULT_PAGE, None));
        assert_eq!(parse_page_query(Some("limit=1000")).unwrap().0, MAX_PAGE);
        // A changed character, a cut, and hex that is not ours.
        let mut changed = text.clone().into_bytes();
        changed[0] = b'g';
        let cut = &text[..text.len() - 2];
        for bad in [
            String::from_utf8(changed).unwrap(),
            cut.to_owned(),
            "ff".into(),
        ] {
            assert!(
                parse_page_query(Some(&format!("cursor={bad}"))).is_err(),
                "{bad}"
            );
        }
        for bad in [
            "limit",
            "limit=",
            "limit=0",
            "limit=1001",
            "limit=1e3",
            "limit=%31",
            "limit=5&limit=5",
            "limit=5&x=1&limit=6",
        ] {
            assert!(parse_page_query(Some(bad)).is_err(), "{bad}");
        }
        let twice = format!("cursor={text}&cursor={text}");
        assert!(parse_page_query(Some(&twice)).is_err());
    }

    #[test]
    fn report_without_supported_means_supported() {
        let Report::Ended(o) = parse_report(br#"{"status":"completed","models":[]}"#).unwrap()
        else {
            panic!("not an end")
        };
        assert!(o.supported);
        assert_eq!(o.status, Status::Completed);
    }

    #[test]
    fn report_ignores_unknown_fields_but_refuses_unknown_status() {
        let r = parse_report(
            br#"{"status":"failed","error":"boom","extra":1,"models":[{"id":"m","label":"M","x":2}]}"#,
        )
        .unwrap();
        let Report::Ended(o) = r else {
            panic!("not an end")
        };
        assert_eq!(o.error.as_deref(), Some("boom"));
        assert_eq!(o.models[0].id, "m");
        for bad in [
            &br#"{"status":"done"}"#[..],
            br#"{"status":"pending"}"#,
            br#"{"status":"timeout"}"#,
            br#"{}"#,
            br#"{"status":1}"#,
            br#"{"status":"completed","models":{}}"#,
            br#"{"status":"completed","models":[{"label":"no id"}]}"#,
            br#"{"status":"completed","supported":"yes"}"#,
            b"not json",
            b"",
        ] {
            assert!(
                matches!(parse_report(bad), Err(ApiError::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn ended(body: &str) -> Outcome {
        match parse_report(body.as_bytes()) {
            Ok(Report::Ended(outcome)) => outcome,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn entries_with_an_empty_id_are_dropped_and_the_rest_of_the_report_stands() {
        let o = ended(
            r#"{"status":"completed","models":[{"id":"","label":"empty"},{"id":"m","label":"M"},{"id":"  ","label":"blank"}]}"#,
        );
        let ids: Vec<&str> = o.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["m"]);
        assert!(
            ended(r#"{"status":"completed","models":[{"id":"","label":"x"}]}"#)
                .models
                .is_empty()
        );
    }

    #[test]
    fn thinking_and_service_tiers_are_kept_as_sent() {
        let entry = serde_json::json!({
            "id": "gpt-5", "label": "GPT-5",
            "thinking": {
                "supported_levels": [
                    {"value": "low", "label": "Low"},
                    {"value": "high", "label": "High", "description": "Slower", "extra": 1}
                ],
                "default_level": "high"
            },
            "service_tiers": [{"id": "flex", "name": "Flex", "description": "Cheaper"}],
            "unknown": true
        });
        let body = serde_json::json!({"status": "completed", "models": [entry]}).to_string();
        let stored = serde_json::to_value(&ended(&body).models[0]).unwrap();
        let mut expected = entry.clone();
        expected.as_object_mut().unwrap().remove("unknown");
        expected["thinking"]["supported_levels"][1]
            .as_object_mut()
            .unwrap()
            .remove("extra");
        assert_eq!(stored, expected);
        // An empty list of tiers stays an empty list.
        let o =
            ended(r#"{"status":"completed","models":[{"id":"m","label":"M","service_tiers":[]}]}"#);
        assert_eq!(o.models[0].service_tiers, Some(vec![]));
    }

    #[test]
    fn thinking_and_service_tiers_out_of_bounds_are_refused_with_the_place() {
        let with = |fields: &str| {
            format!(r#"{{"status":"completed","models":[{{"id":"m","label":"M",{fields}}}]}}"#)
        };
        let level = r#"{"value":"v","label":"V"}"#;
        let tier = r#"{"id":"t","name":"T"}"#;
        let long = "x".repeat(201);
        let cases = [
            (
                format!(
                    r#""thinking":{{"supported_levels":[{}]}}"#,
                    vec![level; 33].join(",")
                ),
                "models[0].thinking.supported_levels must list at most 32",
            ),
            (
                r#""thinking":{"supported_levels":[{"value":" ","label":"V"}]}"#.to_owned(),
                "models[0].thinking.supported_levels[0].value must not be empty",
            ),
            (
                format!(r#""thinking":{{"supported_levels":[{{"value":"{long}","label":"V"}}]}}"#),
                "models[0].thinking.supported_levels[0].value must be at most 200",
            ),
            (
                format!(r#""thinking":{{"supported_levels":[{level}],"default_level":"{long}"}}"#),
                "models[0].thinking.default_level must be at most 200",
            ),
            (
                r#""thinking":{"default_level":"v"}"#.to_owned(),
                "supported_levels",
            ),
            (
                format!(r#""service_tiers":[{}]"#, vec![tier; 33].join(",")),
                "models[0].service_tiers must list at most 32",
            ),
            (
                r#""service_tiers":[{"id":"","name":"T"}]"#.to_owned(),
                "models[0].service_tiers[0].id must not be empty",
            ),
            (
                format!(
                    r#""service_tiers":[{{"id":"t","name":"T","description":"{}"}}]"#,
                    "d".repeat(1001)
                ),
                "models[0].service_tiers[0].description must be at most 1000",
            ),
            (r#""service_tiers":{}"#.to_owned(), "invalid JSON body"),
        ];
        for (fields, message) in cases {
            let body = with(&fields);
            match parse_report(body.as_bytes()) {
                Err(ApiError::BadRequest(m)) => assert!(m.contains(message), "{body}: {m}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn nul_in_report_texts_is_replaced_and_control_characters_in_model_ids_refused() {
        let o = ended(r#"{"status":"failed","error":"a\u0000b\n\tc"}"#);
        assert_eq!(o.error.as_deref(), Some("a\u{FFFD}b\n\tc"));
        let o = ended(
            r#"{"status":"completed","models":[{"id":"m","label":"M\u0000","thinking":{"supported_levels":[{"value":"v","label":"V\u0000","description":"\u0000\n"}]},"service_tiers":[{"id":"t","name":"T\u0000"}]}]}"#,
        );
        let m = &o.models[0];
        assert_eq!(m.label, "M\u{FFFD}");
        let level = &m.thinking.as_ref().unwrap().supported_levels[0];
        assert_eq!(
            (level.label.as_str(), level.description.as_deref()),
            ("V\u{FFFD}", Some("\u{FFFD}\n"))
        );
        assert_eq!(m.service_tiers.as_ref().unwrap()[0].name, "T\u{FFFD}");
        // An id of white space is dropped as before, tab or not; a visible id with a
        // control character is refused, naming its place.
        assert!(
            ended(r#"{"status":"completed","models":[{"id":" \t","label":"x"}]}"#)
                .models
                .is_empty()
        );
        for id in [r"a\u0000", r"a\nb", r"\u007f", r"\u0085x"] {
            let body = format!(
                r#"{{"status":"completed","models":[{{"id":"m","label":"M"}},{{"id":"{id}","label":"X"}}]}}"#
            );
            match parse_report(body.as_bytes()) {
                Err(ApiError::BadRequest(m)) => {
                    assert_eq!(m, "models[1].id must not contain control characters")
                }
                other => panic!("{id}: {other:?}"),
            }
        }
    }

    #[test]
    fn running_report_renews_whatever_else_it_carries() {
        assert_eq!(
            parse_report(br#"{"status":"running","models":[]}"#).unwrap(),
            Report::Running
        );
    }

    #[test]
    fn runtime_body_is_trimmed_and_bounded() {
        let b = parse_new_runtime(br#"{"name":"  laptop ","provider":"claude"}"#).unwrap();
        assert_eq!((b.name.as_str(), b.provider.as_str()), ("laptop", "claude"));
        for bad in [
            &br#"{"name":"","provider":"claude"}"#[..],
            br#"{"name":"x"}"#,
            br#"{"name":"x","provider":"   "}"#,
            br#"{"name":"a\u0000b","provider":"p"}"#,
            br#"{"name":7,"provider":"p"}"#,
            br#"[]"#,
        ] {
            assert!(
                parse_new_runtime(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"name":"{}","provider":"p"}}"#, "x".repeat(201));
        assert!(parse_new_runtime(long.as_bytes()).is_err());
    }

    #[test]
    fn names_blank_but_for_unicode_whitespace_or_format_characters_are_refused() {
        for blank in [
            "\u{200B}",
            "\u{3000}\u{200B} ",
            "\u{FEFF}",
            "\u{2060}\u{00A0}",
            "\u{200E}",
        ] {
            let body = serde_json::json!({"name": blank, "provider": "p"}).to_string();
            assert!(
                matches!(parse_new_runtime(body.as_bytes()), Err(ApiError::BadRequest(m)) if m.contains("empty")),
                "{blank:?}"
            );
        }
        let body = serde_json::json!({"name": "\u{200B}laptop\u{3000}", "provider": "p"});
        let b = parse_new_runtime(body.to_string().as_bytes()).unwrap();
        assert_eq!(b.name, "laptop");
    }

    #[test]
    fn name_of_200_characters_plus_a_space_is_refused_as_too_long() {
        // 201 characters as sent, 200 once trimmed: the bound is on what was sent.
        let padded = format!(r#"{{"name":" {}","provider":"p"}}"#, "x".repeat(200));
        assert!(matches!(
            parse_new_runtime(padded.as_bytes()),
            Err(ApiError::BadRequest(m)) if m.contains("at most 200")
        ));
        let exact = format!(r#"{{"name":"{}","provider":"p"}}"#, "x".repeat(200));
        assert!(parse_new_runtime(exact.as_bytes()).is_ok());
    }

    #[test]
    fn heartbeat_body_takes_wait_ms_and_working_on() {
        let rt = "f40ded99-5e02-4ce0-95b4-efd3589327d8";
        let id = "74b0840025ec468a069fb9a23f967106";
        let b = parse_heartbeat(format!(r#"{{"runtime_id":"{rt}"}}"#).as_bytes()).unwrap();
        assert_eq!((b.wait_ms, b.working_on), (0, None));
        let b = parse_heartbeat(
            format!(r#"{{"runtime_id":"{rt}","wait_ms":25000,"working_on":["{id}"]}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(b.wait_ms, 25_000);
        assert_eq!(b.working_on, Some(vec![RequestId::parse(id).unwrap()]));
        let huge = format!(r#"{{"runtime_id":"{rt}","wait_ms":{}}}"#, "9".repeat(30));
        assert_eq!(parse_heartbeat(huge.as_bytes()).unwrap().wait_ms, u64::MAX);
        let null = format!(r#"{{"runtime_id":"{rt}","wait_ms":null}}"#);
        assert_eq!(parse_heartbeat(null.as_bytes()).unwrap().wait_ms, 0);
        for bad in [
            r#""wait_ms":-1"#,
            r#""wait_ms":-0"#,
            r#""wait_ms":1.5"#,
            // Whole in value, not in form: DESIGN.md refuses a non-integer.
            r#""wait_ms":1e3"#,
            r#""wait_ms":1000.0"#,
            r#""wait_ms":0.0"#,
            r#""wait_ms":1e30"#,
            r#""wait_ms":"10""#,
            r#""wait_ms":true"#,
            r#""working_on":"x""#,
            r#""working_on":["nope"]"#,
            r#""working_on":[1]"#,
        ] {
            let body = format!(r#"{{"runtime_id":"{rt}",{bad}}}"#);
            assert!(
                matches!(
                    parse_heartbeat(body.as_bytes()),
                    Err(ApiError::BadRequest(_))
                ),
                "{bad}"
            );
        }
        let many = vec![format!("\"{id}\""); MAX_WORKING_ON + 1].join(",");
        let body = format!(r#"{{"runtime_id":"{rt}","working_on":[{many}]}}"#);
        assert!(parse_heartbeat(body.as_bytes()).is_err());
    }

    #[test]
    fn wait_query_is_digits_or_absent() {
        assert_eq!(parse_wait_query(None).unwrap(), 0);
        assert_eq!(parse_wait_query(Some("")).unwrap(), 0);
        assert_eq!(parse_wait_query(Some("x=1")).unwrap(), 0);
        assert_eq!(parse_wait_query(Some("wait_ms=250")).unwrap(), 250);
        assert_eq!(parse_wait_query(Some("a=b&wait_ms=0")).unwrap(), 0);
        assert_eq!(
            parse_wait_query(Some("wait_ms=99999999999999999999999")).unwrap(),
            u64::MAX
        );
        for bad in [
            "wait_ms=",
            "wait_ms",
            "wait_ms=-1",
            "wait_ms=1.5",
            "wait_ms=+3",
            "wait_ms=1e3",
        ] {
            assert!(parse_wait_query(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_needs_the_scheme_and_a_token() {
        let v = |s: &'static str| header::HeaderValue::from_static(s);
        assert_eq!(bearer(Some(&v("Bearer abc"))).unwrap().expose(), "abc");
        assert_eq!(bearer(Some(&v("bearer abc"))).unwrap().expose(), "abc");
        assert!(bearer(Some(&v("Basic abc"))).is_none());
        assert!(bearer(Some(&v("Bearer "))).is_none());
        assert!(bearer(Some(&v("Bearer"))).is_none());
        assert!(bearer(None).is_none());
    }
}
