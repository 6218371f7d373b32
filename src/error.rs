//! Errors that the CLI maps to exit codes: a bad pipeline.yaml, pipeline.lock or CLI value is the
//! user's to fix (exit 2), a failed stage or I/O problem is a run failure (exit 1).

use std::fmt;
use std::path::PathBuf;

/// A problem in pipeline.yaml, an override or a CLI selection. Exit code 2.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, where the YAML gives them.
    pub location: Option<(usize, usize)>,
    pub stage: Option<String>,
    /// What the message is about within the stage: `param lr`, `deps`, `input data`.
    pub what: Option<String>,
    pub message: String,
    /// What would be valid, or what to do.
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            location: None,
            stage: None,
            what: None,
            message: message.into(),
            hint: None,
        }
    }
    pub fn at(mut self, location: Option<(usize, usize)>) -> Self {
        self.location = location.or(self.location);
        self
    }
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.stage = Some(stage.into());
        self
    }
    pub fn what(mut self, what: impl Into<String>) -> Self {
        self.what = Some(what.into());
        self
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.location {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        match (&self.stage, &self.what) {
            (Some(stage), Some(what)) => write!(f, "stage `{stage}`, {what}: ")?,
            (Some(stage), None) => write!(f, "stage `{stage}`: ")?,
            (None, Some(what)) => write!(f, "{what}: ")?,
            (None, None) => {}
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// An error and its causes on one line, `outer: inner: …`, each text once: a cause whose text
/// an outer message already holds (`writing x: No space left…` wrapping that same io error) is
/// not repeated.
pub fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// `--locked` found the results differ from pipeline.lock. Exit code 3.
#[derive(Debug)]
pub struct LockDrift(pub Vec<String>);

impl fmt::Display for LockDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "results differ from pipeline.lock ({} difference(s)):",
            self.0.len()
        )?;
        for line in &self.0 {
            writeln!(f, "  - {line}")?;
        }
        write!(
            f,
            "  hint: run `goemo run` without --locked to update pipeline.lock, and commit it"
        )
    }
}

impl std::error::Error for LockDrift {}

/// The run was interrupted (Ctrl-C). Exit code 130.
#[derive(Debug)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted: stages that were running are discarded; nothing half-written is kept"
        )
    }
}

impl std::error::Error for Interrupted {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_full_error_names_its_path_once_and_its_cause_once() {
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        // A context that already quotes its io error, as `anyhow!("writing {p}: {e}")` does.
        let e = anyhow::Error::new(full())
            .context(format!("writing cache/tmp/k/manifest.json: {}", full()))
            .context("stage a");
        let text = chain_text(&e);
        assert_eq!(
            text,
            format!("stage a: writing cache/tmp/k/manifest.json: {}", full())
        );
        assert_eq!(text.matches(&full().to_string()).count(), 1, "{text}");
        // A plain context chain is joined whole.
        let e = anyhow::Error::new(full()).context("writing outputs/x");
        assert_eq!(chain_text(&e), format!("writing outputs/x: {}", full()));
    }
}
