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
