//! Local skills as Claude Code keeps them: a directory per skill holding `SKILL.md` (front
//! matter `name:` and `description:`) and the files beside it, under one or more skill
//! directories (`--skills-dir [PROVIDER=]DIR`). Listing reports each skill with its file
//! count; an import reads the skill's files. Both are bounded as the server bounds them,
//! so the daemon never sends what the server would refuse.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The most skills one list reports (the server refuses more).
pub const MAX_SKILLS: usize = 1000;
/// The most files one import carries.
pub const MAX_FILES: usize = 256;
/// The most bytes of file content one import carries; the server's `--max-import-bytes`
/// default, less room for the JSON around it.
pub const MAX_IMPORT_BYTES: usize = 8 * 1024 * 1024 - 64 * 1024;
/// The longest key or path text, in characters.
const MAX_TEXT: usize = 1000;
/// How deep an import looks into a skill's subdirectories.
const MAX_DEPTH: usize = 8;

/// One skill directory the daemon serves, and the provider its skills belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkillsDir {
    pub provider: String,
    pub dir: PathBuf,
}

impl SkillsDir {
    /// `PROVIDER=DIR` or `DIR` (provider `claude`), as `--skills-dir` takes it.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let (provider, dir) = match arg.split_once('=') {
            Some((provider, dir)) if !provider.is_empty() && !provider.contains('/') => {
                (provider, dir)
            }
            _ => ("claude", arg),
        };
        if dir.is_empty() {
            return Err(format!("--skills-dir {arg:?}: no directory"));
        }
        if provider.chars().any(char::is_control) || provider.contains(':') {
            return Err(format!(
                "--skills-dir {arg:?}: a provider without ':' or controls"
            ));
        }
        Ok(SkillsDir {
            provider: provider.to_owned(),
            dir: PathBuf::from(dir),
        })
    }
}

/// The result of a skill list: `{"skills": […], "supported": bool}`. Without skill
/// directories, `supported: false`. A directory that cannot be read fails the list.
pub fn list(dirs: &[SkillsDir]) -> Result<Value, String> {
    if dirs.is_empty() {
        return Ok(json!({"skills": [], "supported": false}));
    }
    let mut skills = Vec::new();
    for SkillsDir { provider, dir } in dirs {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read the skills directory {}: {e}", dir.display()))?;
        let mut names: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .filter(|(_, path)| path.join("SKILL.md").is_file())
            .collect();
        names.sort();
        for (name, path) in names {
            let key = format!("{provider}:{name}");
            if !key_like(&key) || !key_like(&path.display().to_string()) {
                continue;
            }
            let (title, description) = front_matter(&path.join("SKILL.md"));
            let mut skill = json!({
                "key": key,
                "name": title.unwrap_or_else(|| name.clone()),
                "source_path": path.display().to_string(),
                "provider": provider,
                "file_count": count_files(&path, 0),
            });
            if let Some(description) = description {
                skill["description"] = description.into();
            }
            skills.push(skill);
        }
    }
    if skills.len() > MAX_SKILLS {
        return Err(format!(
            "found {} skills; a list may carry at most {MAX_SKILLS}",
            skills.len()
        ));
    }
    Ok(json!({"skills": skills, "supported": true}))
}

/// The result of an import of `key` (`<provider>:<directory name>`): `{"skill": {…}}` with
/// `SKILL.md` as `content` and the files beside it, relative paths, sorted.
pub fn import(dirs: &[SkillsDir], key: &str) -> Result<Value, String> {
    let (provider, name) = key
        .split_once(':')
        .ok_or_else(|| format!("skill key {key:?} is not <provider>:<name>"))?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("skill key {key:?} names no skill directory"));
    }
    let path = dirs
        .iter()
        .filter(|d| d.provider == provider)
        .map(|d| d.dir.join(name))
        .find(|path| path.join("SKILL.md").is_file())
        .ok_or_else(|| format!("no skill {key:?} on this machine"))?;
    let root = path
        .canonicalize()
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let content = read_text(&root.join("SKILL.md"), "SKILL.md")?;
    let (title, description) = front_matter(&root.join("SKILL.md"));
    let mut files = Vec::new();
    let mut bytes = content.len();
    collect(&root, &root, 0, &mut files, &mut bytes)?;
    files.sort_by(|a: &(String, String), b| a.0.cmp(&b.0));
    let files: Vec<Value> = files
        .into_iter()
        .map(|(path, content)| json!({"path": path, "content": content}))
        .collect();
    let mut skill = json!({
        "key": key,
        "name": title.unwrap_or_else(|| name.to_owned()),
        "content": content,
        "source_path": path.display().to_string(),
        "provider": provider,
        "files": files,
    });
    if let Some(description) = description {
        skill["description"] = description.into();
    }
    Ok(json!({ "skill": skill }))
}

/// The files under `dir` but `SKILL.md` at the top, as `(relative path, text)`. A symlink
/// is followed only while it stays inside the skill's directory (`root`); one that leaves
/// it fails the import, as does a file that is not UTF-8 text, or more files or bytes than
/// an import may carry.
fn collect(
    root: &Path,
    dir: &Path,
    depth: usize,
    files: &mut Vec<(String, String)>,
    bytes: &mut usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{} is nested too deep", dir.display()));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let path = entry.path();
        let relative = relative_path(root, &path)?;
        // Where it really is: a symlink is resolved, and must stay inside the skill.
        let real = path
            .canonicalize()
            .map_err(|e| format!("cannot open {relative}: {e}"))?;
        if !real.starts_with(root) {
            return Err(format!(
                "{relative} leads out of the skill's directory; it is not imported"
            ));
        }
        if real.is_dir() {
            collect(root, &real, depth + 1, files, bytes)?;
            continue;
        }
        if depth == 0 && relative == "SKILL.md" {
            continue;
        }
        if files.len() >= MAX_FILES {
            return Err(format!(
                "the skill has more than {MAX_FILES} files; an import carries at most that"
            ));
        }
        let text = read_text(&real, &relative)?;
        *bytes += text.len();
        if *bytes > MAX_IMPORT_BYTES {
            return Err(format!(
                "the skill's files are more than {MAX_IMPORT_BYTES} bytes"
            ));
        }
        files.push((relative, text));
    }
    Ok(())
}

/// `path` relative to `root`, `/`-separated, and a text the server takes.
fn relative_path(root: &Path, path: &Path) -> Result<String, String> {
    let relative = path
        .strip_prefix(root)
        .map_err(|_| format!("{} is outside the skill", path.display()))?;
    let parts: Option<Vec<&str>> = relative.iter().map(|p| p.to_str()).collect();
    let text = parts
        .ok_or_else(|| format!("{} has a name that is not UTF-8", path.display()))?
        .join("/");
    if !key_like(&text) {
        return Err(format!("{text:?}: a path the server would refuse"));
    }
    Ok(text)
}

/// A file's text; a file that is not UTF-8 (a binary) is refused.
fn read_text(path: &Path, shown: &str) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    String::from_utf8(bytes)
        .map_err(|_| format!("{shown} is not UTF-8 text; binary files are not imported"))
}

/// Files under `dir`, for the list's `file_count` (bounded depth, symlinks not followed).
fn count_files(dir: &Path, depth: usize) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() && depth < MAX_DEPTH => count_files(&e.path(), depth + 1),
            Ok(t) if t.is_dir() => 0,
            _ => 1,
        })
        .sum()
}

/// `name:` and `description:` of a `SKILL.md`'s front matter (between `---` lines).
fn front_matter(path: &Path) -> (Option<String>, Option<String>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (None, None);
    };
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("---") {
        return (None, None);
    }
    let (mut name, mut description) = (None, None);
    for line in lines.take_while(|l| l.trim() != "---") {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().trim_matches('"').trim_matches('\'').trim();
        let value = (!value.is_empty()).then(|| value.to_owned());
        match field.trim() {
            "name" => name = value,
            "description" => description = value,
            _ => {}
        }
    }
    (name, description)
}

/// Not blank, at most [`MAX_TEXT`] characters, no control character: what the server takes
/// as a key or a path.
fn key_like(text: &str) -> bool {
    !text.trim().is_empty()
        && text.chars().count() <= MAX_TEXT
        && !text.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skill(root: &Path, name: &str, front: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("SKILL.md"),
            format!("---\n{front}\n---\n# {name}\n"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn skills_dirs_name_their_provider_or_default_to_claude() {
        assert_eq!(
            SkillsDir::parse("/home/u/.claude/skills").unwrap(),
            SkillsDir {
                provider: "claude".into(),
                dir: "/home/u/.claude/skills".into()
            }
        );
        assert_eq!(SkillsDir::parse("codex=/s").unwrap().provider, "codex");
        assert!(SkillsDir::parse("codex=").is_err());
        assert!(SkillsDir::parse("a:b=/s").is_err());
    }

    #[test]
    fn a_list_reports_each_skill_directory_with_its_front_matter_and_file_count() {
        let root = tempfile::tempdir().unwrap();
        let review = skill(
            root.path(),
            "review",
            "name: Review\ndescription: \"Reviews\"",
        );
        std::fs::write(review.join("checklist.md"), "- tests\n").unwrap();
        skill(root.path(), "plain", "other: x");
        std::fs::create_dir(root.path().join("not-a-skill")).unwrap();
        let dirs = [SkillsDir::parse(&root.path().display().to_string()).unwrap()];
        let list = list(&dirs).unwrap();
        let at = |name: &str| root.path().join(name).display().to_string();
        assert_eq!(
            list,
            json!({"supported": true, "skills": [
                {"key": "claude:plain", "name": "plain", "source_path": at("plain"),
                 "provider": "claude", "file_count": 1},
                {"key": "claude:review", "name": "Review", "description": "Reviews",
                 "source_path": at("review"), "provider": "claude", "file_count": 2},
            ]})
        );
        assert_eq!(
            super::list(&[]).unwrap(),
            json!({"skills": [], "supported": false})
        );
    }

    #[test]
    fn an_import_reads_the_files_beside_skill_md_and_nothing_outside() {
        let root = tempfile::tempdir().unwrap();
        let review = skill(root.path(), "review", "name: Review");
        std::fs::create_dir(review.join("refs")).unwrap();
        std::fs::write(review.join("refs/style.md"), "Be kind.\n").unwrap();
        std::os::unix::fs::symlink(review.join("refs/style.md"), review.join("alias.md")).unwrap();
        let dirs = [SkillsDir::parse(&root.path().display().to_string()).unwrap()];
        let imported = import(&dirs, "claude:review").unwrap();
        assert_eq!(
            imported["skill"]["content"],
            "---\nname: Review\n---\n# review\n"
        );
        assert_eq!(
            imported["skill"]["files"],
            json!([{"path": "alias.md", "content": "Be kind.\n"},
                   {"path": "refs/style.md", "content": "Be kind.\n"}])
        );

        let secret = root.path().join("secret.txt");
        std::fs::write(&secret, "password").unwrap();
        std::os::unix::fs::symlink(&secret, review.join("leak.txt")).unwrap();
        let refused = import(&dirs, "claude:review").unwrap_err();
        assert!(
            refused.contains("leak.txt leads out of the skill"),
            "{refused}"
        );
        std::fs::remove_file(review.join("leak.txt")).unwrap();

        std::fs::write(
            review.join("logo.png"),
            [0x89, b'P', b'N', b'G', 0xff, 0xfe],
        )
        .unwrap();
        let binary = import(&dirs, "claude:review").unwrap_err();
        assert!(binary.contains("logo.png is not UTF-8"), "{binary}");
        assert!(import(&dirs, "claude:../review").is_err());
        assert!(import(&dirs, "codex:review").is_err());
    }
}
