//! `pipeline.lock`: per stage, the key, params, input hashes and output hashes of its last
//! successful run. Human-readable YAML, meant to be committed: `goemo run --locked` proves a
//! checkout reproduces it, `goemo status` explains drift from it, `goemo gc` keeps what it names.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::fingerprint::{Fingerprint, InputHash};
use crate::hashing::FileDigest;

pub const LOCK_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub version: u32,
    /// In pipeline order.
    pub stages: Vec<LockedStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedStage {
    pub name: String,
    pub kind: String,
    pub impl_version: u32,
    pub key: String,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, InputHash>,
    pub outputs_hash: String,
    pub outputs: BTreeMap<String, FileDigest>,
}

impl LockedStage {
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            format: crate::fingerprint::FORMAT,
            kind: self.kind.clone(),
            version: self.impl_version,
            params: self.params.clone(),
            inputs: self.inputs.clone(),
        }
    }
}

impl LockFile {
    /// A missing lock is an empty one; a damaged one, one of another version, or one naming a
    /// stage twice is a [`ConfigError`] naming the file (exit 2).
    pub fn read(path: &Path) -> anyhow::Result<LockFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LockFile {
                    version: LOCK_VERSION,
                    stages: Vec::new(),
                })
            }
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        Ok(Self::parse(&text, path)?)
    }

    fn parse(text: &str, path: &Path) -> Result<LockFile, ConfigError> {
        const RESTORE: &str =
            "restore it from git, or delete it and run `goemo run` to write a new one";
        let lock: LockFile = serde_yaml::from_str(text).map_err(|e| {
            let mut msg = e.to_string();
            // The location goes in front, where every file error has it.
            if let Some(pos) = msg.find(" at line ") {
                msg.truncate(pos);
            }
            ConfigError::new(path, format!("not a valid pipeline.lock: {msg}"))
                .at(e.location().map(|l| (l.line(), l.column())))
                .hint(RESTORE)
        })?;
        if lock.version != LOCK_VERSION {
            return Err(ConfigError::new(
                path,
                format!(
                    "pipeline.lock version {} is not one this goemo reads (it reads version {LOCK_VERSION})",
                    lock.version
                ),
            )
            .at(crate::pipeline::locate(text, &["version"]))
            .hint(format!(
                "a newer goemo wrote it: use that goemo, or {RESTORE}"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for stage in &lock.stages {
            if !seen.insert(stage.name.as_str()) {
                return Err(ConfigError::new(
                    path,
                    format!("stage `{}` is recorded twice", stage.name),
                )
                .at(second_name_line(text, &stage.name))
                .hint(format!("a merge may have kept both versions: {RESTORE}")));
            }
        }
        Ok(lock)
    }

    pub fn get(&self, name: &str) -> Option<&LockedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Write atomically, and only when the content changed (a no-op run leaves the file alone).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let body = serde_yaml::to_string(self)?;
        let text = format!(
            "# pipeline.lock, written by `goemo run`: each stage's key, params, input and output hashes.\n# Commit it; `goemo run --locked` checks a checkout reproduces it.\n{body}"
        );
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        crate::cache::write_file_atomic(path, text.as_bytes())
    }
}

/// Line and column of the second `name: NAME` in a lock (where a duplicate stage starts).
fn second_name_line(text: &str, name: &str) -> Option<(usize, usize)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let content = line.trim_start().trim_start_matches("- ");
            let value = content.strip_prefix("name:")?.trim();
            let value = value.trim_matches(|c| c == '\'' || c == '"');
            (value == name).then(|| (i + 1, line.len() - content.len() + 1))
        })
        .nth(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_goemo_cannot_read_names_the_place() {
        let p = Path::new("pipeline.lock");
        let e = LockFile::parse("version: 99\nstages: []\n", p).unwrap_err();
        assert_eq!(e.location, Some((1, 1)));
        assert!(e.message.contains("version 99"), "{}", e.message);
        let stage = "  - name: a\n    kind: command\n    impl_version: 1\n    key: k\n    params: {}\n    inputs: {}\n    outputs_hash: h\n    outputs: {}\n";
        let e = LockFile::parse(&format!("version: 1\nstages:\n{stage}{stage}"), p).unwrap_err();
        assert_eq!(e.location, Some((11, 5)), "{e}");
        assert_eq!(e.message, "stage `a` is recorded twice");
        assert_eq!(
            LockFile::parse(&format!("version: 1\nstages:\n{stage}"), p)
                .unwrap()
                .stages
                .len(),
            1
        );
    }
}
