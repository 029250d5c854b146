//! The handlers directory: `handlers/<type>` is an executable (or a symlink to
//! one) and `handlers/<type>.toml` optionally tunes how it runs.
//!
//! Only a validated [`HandlerType`] can name a file here, so a type can never
//! reach outside the directory. A symlink may point anywhere: that is how an
//! existing tool (jq, say) becomes a handler, and only the operator can make one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{duration_from_secs, parse_duration};
use crate::spool::ids::HandlerType;

/// How one handler runs: its executable and its `T.toml`.
#[derive(Debug, Clone, Default)]
pub struct HandlerSpec {
    pub path: PathBuf,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub concurrency: Option<usize>,
    pub content_type: Option<String>,
    pub env: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("no handler for type {kind:?}: put an executable named {kind} in {}", dir.display())]
    Missing { kind: String, dir: PathBuf },
    #[error("{} is not executable: run chmod +x on it", path.display())]
    NotExecutable { path: PathBuf },
    #[error("{}: {detail}", path.display())]
    BadConfig { path: PathBuf, detail: String },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HandlerToml {
    timeout: Option<toml::Value>,
    max_attempts: Option<u32>,
    concurrency: Option<usize>,
    content_type: Option<String>,
    #[serde(default)]
    env: Vec<String>,
}

impl HandlerError {
    /// The error without server paths, for statuses that clients read.
    pub fn brief(&self, kind: &str) -> String {
        match self {
            HandlerError::Missing { .. } => {
                format!("no handler for type {kind:?}: handlers/{kind} is missing")
            }
            HandlerError::NotExecutable { .. } => format!("handlers/{kind} is not executable"),
            HandlerError::BadConfig { detail, .. } => format!("handlers/{kind}.toml: {detail}"),
        }
    }
}

/// Finds the handler for `kind` and reads its settings.
pub fn resolve(dir: &Path, kind: &HandlerType) -> Result<HandlerSpec, HandlerError> {
    let path = dir.join(kind.as_str());
    match fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(m) if m.is_file() => return Err(HandlerError::NotExecutable { path }),
        _ => {
            return Err(HandlerError::Missing {
                kind: kind.to_string(),
                dir: dir.to_owned(),
            })
        }
    }
    let toml_path = dir.join(format!("{kind}.toml"));
    let conf = match fs::read_to_string(&toml_path) {
        Ok(text) => parse_toml(&toml_path, &text)?,
        Err(_) => HandlerToml::default(),
    };
    let bad = |detail: String| HandlerError::BadConfig {
        path: toml_path.clone(),
        detail,
    };
    let timeout = match conf.timeout {
        None => None,
        Some(toml::Value::Integer(n)) if n > 0 => {
            Some(duration_from_secs(n as f64).map_err(|e| bad(format!("timeout: {e:#}")))?)
        }
        Some(toml::Value::Float(f)) if f > 0.0 => {
            Some(duration_from_secs(f).map_err(|e| bad(format!("timeout: {e:#}")))?)
        }
        Some(toml::Value::String(s)) => {
            Some(parse_duration(&s).map_err(|e| bad(format!("timeout: {e:#}")))?)
        }
        Some(other) => {
            return Err(bad(format!(
                "timeout: {other} is not a duration; write e.g. timeout = \"30s\""
            )))
        }
    };
    if conf.max_attempts == Some(0) || conf.concurrency == Some(0) {
        return Err(bad("max_attempts and concurrency must be at least 1".into()));
    }
    Ok(HandlerSpec {
        path,
        timeout,
        max_attempts: conf.max_attempts,
        concurrency: conf.concurrency,
        content_type: conf.content_type,
        env: conf.env,
    })
}

fn parse_toml(path: &Path, text: &str) -> Result<HandlerToml, HandlerError> {
    toml::from_str(text).map_err(|e| HandlerError::BadConfig {
        path: path.to_owned(),
        detail: format!("{e}; the keys are timeout, max_attempts, concurrency, content_type and env (see handlers/README.md)"),
    })
}

/// The types that have a runnable handler, sorted.
pub fn list(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut kinds: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| HandlerType::parse(name).is_ok_and(|k| resolve(dir, &k).is_ok()))
        .collect();
    kinds.sort();
    kinds
}
