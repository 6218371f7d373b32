//! Which remote a project uses: `--remote URL`, else the `GOEMO_REMOTE` environment variable,
//! else `remote: URL` in an optional `goemo.yaml` beside pipeline.yaml.
//!
//! `goemo.yaml` is meant to be committed, so it names only the URL; credentials come from the
//! store's standard environment and are never read from, or written to, any goemo file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::RemoteError;
use crate::location::RemoteUrl;

/// The project config file, beside pipeline.yaml.
pub const CONFIG_FILE: &str = "goemo.yaml";
/// The environment variable that names the remote.
pub const ENV_VAR: &str = "GOEMO_REMOTE";

/// `goemo.yaml`: settings of a project that are not part of the pipeline.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// The shared cache: `s3://bucket/prefix` or `file:///abs/folder`.
    pub remote: Option<String>,
}

impl ProjectConfig {
    /// `goemo.yaml` in `project_root`; a missing file is an empty config.
    pub fn read(project_root: &Path) -> Result<ProjectConfig, RemoteError> {
        let file = project_root.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ProjectConfig::default())
            }
            Err(e) => {
                return Err(RemoteError::Config {
                    file,
                    message: format!("cannot read it: {e}"),
                    hint: "make it readable, or remove it".into(),
                })
            }
        };
        if text.trim().is_empty() {
            return Ok(ProjectConfig::default());
        }
        serde_yaml::from_str(&text).map_err(|e| RemoteError::Config {
            file,
            // serde_yaml's message names the line and column, never the values of other keys.
            message: e.to_string(),
            hint: "goemo.yaml knows one key: `remote: s3://bucket/prefix` (or file:///abs/folder)"
                .into(),
        })
    }
}

/// The remote in force and where that came from.
pub fn resolve(project_root: &Path, flag: Option<&str>) -> Result<RemoteUrl, RemoteError> {
    if let Some(url) = flag {
        return RemoteUrl::parse(url, "--remote");
    }
    if let Some(url) = std::env::var(ENV_VAR).ok().filter(|v| !v.trim().is_empty()) {
        return RemoteUrl::parse(&url, ENV_VAR);
    }
    let config_file: PathBuf = project_root.join(CONFIG_FILE);
    match ProjectConfig::read(project_root)?.remote {
        Some(url) => RemoteUrl::parse(&url, &config_file.display().to_string()),
        None => Err(RemoteError::NotConfigured { config_file }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goemo_yaml_names_the_remote_and_refuses_other_keys() {
        let d = tempfile::tempdir().unwrap();
        assert!(ProjectConfig::read(d.path()).unwrap().remote.is_none());
        std::fs::write(d.path().join(CONFIG_FILE), "remote: s3://goemo-cache/x\n").unwrap();
        assert_eq!(
            ProjectConfig::read(d.path()).unwrap().remote.as_deref(),
            Some("s3://goemo-cache/x")
        );
        // The flag wins over the file (the environment is left alone: tests share it).
        let u = resolve(d.path(), Some("file:///tmp")).unwrap();
        assert_eq!(u.shown(), "file:///tmp");
        std::fs::write(d.path().join(CONFIG_FILE), "remote: x\nsecret: y\n").unwrap();
        let e = ProjectConfig::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("unknown field `secret`"), "{e}");
        assert!(e.contains("goemo.yaml"), "{e}");
    }
}
