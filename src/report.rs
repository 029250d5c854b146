//! `spoold report`: the progress helper for handlers, shell ones especially.
//!
//! Reads `$SPOOL_PROGRESS`, merges the given fields into what is there (so
//! `--message` alone keeps the last progress), and replaces the file
//! atomically (temp file in the same directory, then rename). Not fsync'd:
//! progress is not worth a disk flush.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{Map, Value};

use crate::config::ReportArgs;

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let Some(path) = std::env::var_os("SPOOL_PROGRESS").map(PathBuf::from) else {
        bail!("SPOOL_PROGRESS is not set: `spoold report` is meant to be run by a handler that spoold started");
    };
    let mut fields: Map<String, Value> = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    if let Some(p) = args.progress {
        if !p.is_finite() {
            bail!("--progress must be a number from 0 to 100");
        }
        fields.insert("progress".into(), Value::from(p.clamp(0.0, 100.0)));
    }
    if let Some(m) = args.message {
        fields.insert("message".into(), Value::from(m));
    }
    if let Some(d) = args.data {
        let data: Value = serde_json::from_str(&d)
            .context("--data must be JSON, e.g. --data '{\"rows\": 10}'")?;
        fields.insert("data".into(), data);
    }
    if let Some(ct) = args.content_type {
        fields.insert("content_type".into(), Value::from(ct));
    }
    let tmp = path.with_file_name(format!(".progress.json.{}.tmp", std::process::id()));
    fs::write(&tmp, serde_json::to_vec(&Value::Object(fields))?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}
