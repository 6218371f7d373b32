//! `pipeline.lock`: per stage, the key, params, input hashes and output hashes of its last
//! successful run. Human-readable YAML, meant to be committed: `goemo run --locked` proves a
//! checkout reproduces it, `goemo status` explains drift from it, `goemo gc` keeps what it names.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

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
    /// A missing lock is an empty one; a damaged one is an error naming the file.
    pub fn read(path: &Path) -> anyhow::Result<LockFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a valid pipeline.lock: {e}\n  hint: restore it from git, or delete it and run `goemo run` to write a new one",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(LockFile { version: LOCK_VERSION, stages: Vec::new() })
            }
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
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
        goemo_stages::write_atomic(path, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }
}
