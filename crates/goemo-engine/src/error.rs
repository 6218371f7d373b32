//! Errors that the CLI maps to exit codes: a bad pipeline.yaml, pipeline.lock or CLI value is the
//! user's to fix (exit 2), a failed stage or I/O problem is a run failure (exit 1).

use std::borrow::Cow;
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
        // Names, keys and values come from the user's file and may be any length.
        let stage = self.stage.as_deref().map(|s| clip(s, ECHO_MAX));
        let what = self.what.as_deref().map(clip_echoes);
        match (stage, what) {
            (Some(stage), Some(what)) => write!(f, "stage `{stage}`, {what}: ")?,
            (Some(stage), None) => write!(f, "stage `{stage}`: ")?,
            (None, Some(what)) => write!(f, "{what}: ")?,
            (None, None) => {}
        }
        write!(f, "{}", clip_echoes(&self.message))?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {}", clip_echoes(hint))?;
        }
        Ok(())
    }
}

/// The most characters of one piece of user text (a name, key or value) a message echoes.
pub const ECHO_MAX: usize = 80;

/// The most characters of an unquoted run without spaces (a path, a serde path) a message
/// echoes: longer than [`ECHO_MAX`] so ordinary paths stay whole.
const RUN_MAX: usize = 200;

/// `text` cut to `max` characters, with `…` where it was cut.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
    }
}

/// A message with each quoted part (`…` or "…", how messages quote user text) clipped to
/// [`ECHO_MAX`] characters and each unquoted run without spaces to [`RUN_MAX`], so a 1 MB key
/// is not echoed whole.
pub fn clip_echoes(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        out.push_str(&clip_runs(&rest[..open]));
        let quote = &rest[open..open + 1];
        let inside = &rest[open + 1..];
        let (quoted, after) = match inside.find(quote) {
            Some(close) => (&inside[..close], &inside[close + 1..]),
            None => (inside, ""),
        };
        out.push_str(quote);
        out.push_str(&clip(quoted, ECHO_MAX));
        if inside.len() > quoted.len() {
            out.push_str(quote);
        }
        rest = after;
    }
    out.push_str(&clip_runs(rest));
    out
}

fn clip_runs(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|piece| {
            let word = piece.trim_end_matches(char::is_whitespace);
            let space = &piece[word.len()..];
            format!("{}{space}", clip(word, RUN_MAX))
        })
        .collect()
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
#[derive(Debug, thiserror::Error)]
#[error(
    "results differ from pipeline.lock ({} difference(s)):\n{}  hint: run `goemo run` without --locked to update pipeline.lock, and commit it",
    .0.len(),
    .0.iter().map(|line| format!("  - {line}\n")).collect::<String>()
)]
pub struct LockDrift(pub Vec<String>);

/// The run was interrupted (Ctrl-C, SIGTERM or SIGHUP). Exit code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: stages that were running are discarded; nothing half-written is kept")]
pub struct Interrupted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_user_text_is_clipped_in_messages() {
        let key = "k".repeat(1_000_000);
        let e = ConfigError::new(
            "pipeline.yaml",
            format!("unknown field `{key}`, expected `cmd` or `vars`"),
        )
        .stage(&key)
        .what(format!("param `{key}`"))
        .hint(format!("stages are: a, {key}"));
        let text = e.to_string();
        let k80 = "k".repeat(ECHO_MAX);
        assert_eq!(
            text,
            format!(
                "pipeline.yaml: stage `{k80}…`, param `{k80}…`: unknown field `{k80}…`, expected `cmd` or `vars`\n  hint: stages are: a, {}…",
                "k".repeat(RUN_MAX)
            )
        );
        // Short text, multi-byte characters and an unclosed quote are left as they are.
        assert_eq!(
            clip_echoes("stage `émoji` \"x\" it's"),
            "stage `émoji` \"x\" it's"
        );
        assert_eq!(clip_echoes("open `abc"), "open `abc");
        assert_eq!(clip("ééé", 2), "éé…");
    }

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
