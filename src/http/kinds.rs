//! The parsers of each kind's bodies: a create's input and a report's result, for every
//! kind but `models` (whose parsers, older, are in `wire`). What a parser accepts it
//! writes back as canonical JSON text, which the store keeps as it is and the record
//! shows; a field out of bounds is a 400 that names it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;
use super::wire::parse_json;
use crate::kind::Kind;
use crate::model::{Outcome, Report, Status, holds_control};

/// The longest key, path or version text, in characters (DESIGN.md, "Request kinds").
pub const MAX_KEY_TEXT: usize = 1000;
/// The most skills one list may carry, and the most MCP servers.
pub const MAX_SKILLS: usize = 1000;
/// The most files one imported skill may carry.
pub const MAX_FILES: usize = 256;
/// The most of an update's output that is kept: its end, where the outcome is.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// A create's input: the coalescing key and the input as JSON text.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Input {
    pub key: String,
    pub json: Option<String>,
}

/// The body of `POST /api/runtimes/{rt}/<kind>` for `kind` (not `models`).
pub fn parse_input(kind: Kind, body: &[u8]) -> Result<Input, ApiError> {
    let empty = body.iter().all(u8::is_ascii_whitespace);
    match kind {
        // A model list's create is `wire::parse_ask`, which knows the catalog.
        Kind::Models | Kind::LocalSkills => {
            if !empty {
                let _: Map<String, Value> = parse_json(body)?;
            }
            Ok(Input::default())
        }
        Kind::SkillImport => {
            #[derive(Deserialize, Serialize)]
            struct Raw {
                skill_key: String,
                #[serde(default, skip_serializing_if = "Option::is_none")]
                name: Option<String>,
                #[serde(default, skip_serializing_if = "Option::is_none")]
                description: Option<String>,
            }
            let raw: Raw = parse_json(body)?;
            check_key("skill_key", &raw.skill_key)?;
            Ok(Input {
                key: raw.skill_key.clone(),
                json: Some(to_json(&raw)),
            })
        }
        Kind::Update => {
            #[derive(Deserialize, Serialize)]
            struct Raw {
                target_version: String,
            }
            let raw: Raw = parse_json(body)?;
            check_key("target_version", &raw.target_version)?;
            Ok(Input {
                key: String::new(),
                json: Some(to_json(&raw)),
            })
        }
    }
}

/// A skill on the runtime's machine, as a list reports it.
#[derive(Deserialize, Serialize)]
struct Skill {
    key: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    source_path: String,
    provider: String,
    file_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plugin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    can_disable: Option<bool>,
}

#[derive(Deserialize, Serialize)]
struct SkillList {
    #[serde(default)]
    skills: Vec<Skill>,
    #[serde(default = "yes")]
    supported: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mcp_servers: Option<Vec<Map<String, Value>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mcp_supported: Option<bool>,
}

fn yes() -> bool {
    true
}

/// One imported skill: `SKILL.md` and the files beside it.
#[derive(Deserialize, Serialize)]
struct ImportedSkill {
    key: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    content: String,
    source_path: String,
    provider: String,
    #[serde(default)]
    files: Vec<SkillFile>,
}

#[derive(Deserialize, Serialize)]
struct SkillFile {
    path: String,
    content: String,
}

/// The body of `POST /api/daemon/runtimes/{rt}/<kind>/{id}/result` for `kind` (not
/// `models`): `status` (`completed`, `failed`, `running`), `error`, and the kind's result.
pub fn parse_result(kind: Kind, body: &[u8]) -> Result<Report, ApiError> {
    #[derive(Deserialize)]
    struct Raw {
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(flatten)]
        rest: Map<String, Value>,
    }
    let raw: Raw = parse_json(body)?;
    let status = match raw.status.as_str() {
        "running" => Status::Running,
        "completed" => Status::Completed,
        "failed" => Status::Failed,
        _ => {
            return Err(ApiError::BadRequest(
                "status must be \"completed\", \"failed\" or \"running\"".to_owned(),
            ));
        }
    };
    let rest = Value::Object(raw.rest);
    let result = match kind {
        Kind::Models => {
            return Err(ApiError::BadRequest(
                "a model list's report has a parser of its own".to_owned(),
            ));
        }
        Kind::LocalSkills if status == Status::Completed => Some(skill_list(rest)?),
        Kind::SkillImport if status == Status::Completed => Some(imported_skill(rest)?),
        Kind::Update => update_output(&rest)?,
        _ => None,
    };
    if status == Status::Running {
        return Ok(match result {
            Some(progress) => Report::Progress(progress),
            None => Report::Running,
        });
    }
    Ok(Report::Ended(Outcome {
        status,
        models: Vec::new(),
        supported: true,
        error: raw.error.filter(|e| !e.is_empty()),
        fallback: false,
        result,
    }))
}

fn skill_list(rest: Value) -> Result<String, ApiError> {
    let list: SkillList = from_value(rest)?;
    if list.skills.len() > MAX_SKILLS {
        return Err(bad(format!(
            "skills lists {} entries; a list may carry at most {MAX_SKILLS}",
            list.skills.len()
        )));
    }
    for (i, skill) in list.skills.iter().enumerate() {
        check_key(&format!("skills[{i}].key"), &skill.key)?;
        check_key(&format!("skills[{i}].source_path"), &skill.source_path)?;
    }
    if list
        .mcp_servers
        .as_ref()
        .is_some_and(|m| m.len() > MAX_SKILLS)
    {
        return Err(bad(format!(
            "mcp_servers may list at most {MAX_SKILLS} servers"
        )));
    }
    Ok(to_json(&list))
}

fn imported_skill(rest: Value) -> Result<String, ApiError> {
    #[derive(Deserialize, Serialize)]
    struct Raw {
        skill: ImportedSkill,
    }
    let raw: Raw = from_value(rest)?;
    let skill = &raw.skill;
    check_key("skill.key", &skill.key)?;
    check_key("skill.source_path", &skill.source_path)?;
    if skill.files.len() > MAX_FILES {
        return Err(bad(format!(
            "skill.files lists {} files; an import may carry at most {MAX_FILES}",
            skill.files.len()
        )));
    }
    for (i, file) in skill.files.iter().enumerate() {
        let field = format!("skill.files[{i}].path");
        check_key(&field, &file.path)?;
        if file.path.starts_with('/') || file.path.split('/').any(|s| s == "..") {
            return Err(bad(format!(
                "{field} must be a path inside the skill's directory"
            )));
        }
    }
    Ok(to_json(&raw))
}

/// `{"output": …}` when the report has one: its last [`MAX_OUTPUT`] bytes.
fn update_output(rest: &Value) -> Result<Option<String>, ApiError> {
    let output = match rest.get("output") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(output)) => output,
        Some(_) => return Err(bad("output must be text".to_owned())),
    };
    let mut start = output.len().saturating_sub(MAX_OUTPUT);
    while !output.is_char_boundary(start) {
        start += 1;
    }
    Ok(Some(to_json(
        &serde_json::json!({ "output": &output[start..] }),
    )))
}

/// A key-like text (a skill key, a path, a version): not empty, at most
/// [`MAX_KEY_TEXT`] characters, no control character.
fn check_key(field: &str, text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(bad(format!("{field} must not be empty")));
    }
    if text.chars().count() > MAX_KEY_TEXT {
        return Err(bad(format!(
            "{field} must be at most {MAX_KEY_TEXT} characters"
        )));
    }
    if holds_control(text) {
        return Err(bad(format!("{field} must not contain control characters")));
    }
    Ok(())
}

fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| bad(format!("invalid report: {e}")))
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// Serializing maps, strings, numbers and booleans cannot fail; if it did, the empty
/// object stands in rather than a panic.
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}
