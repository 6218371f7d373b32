//! What the engine tells whoever drives it, as it happens. The engine never prints: it reports
//! [`EngineEvent`]s to a [`Reporter`], and the CLI decides how they look (log lines, a dry-run
//! plan), as cargo's job queue reports to its shell.

use std::path::Path;

/// What a stage came to, in a run's closing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same key as pipeline.lock, taken from the cache.
    Cached,
    /// A different key than pipeline.lock, found in the cache (the run-cache).
    Restored,
    /// Missing here, taken from the shared cache (another machine or worker built it).
    Pulled,
    Ran,
    Failed,
    Skipped,
    WouldRun,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Restored => "restored",
            Outcome::Pulled => "pulled",
            Outcome::Ran => "ran",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
            Outcome::WouldRun => "would run",
        }
    }
}

/// One line of a run's closing table.
#[derive(Debug, Clone)]
pub struct StageResult {
    pub name: String,
    pub outcome: Outcome,
    pub wall_s: f64,
    pub note: String,
}

#[derive(Debug, Clone, Copy)]
pub enum EngineEvent<'a> {
    /// A file or folder an interrupted publish left in outputs/ was removed.
    LeftoverRemoved { path: &'a Path },
    /// Dry run: what would happen to a stage (`why` is set when it would run).
    Planned {
        stage: &'a str,
        outcome: Outcome,
        why: Option<&'a str>,
    },
    /// `goemo gc` holds the cache; the run waits for it to finish.
    WaitingForGc,
    /// A cache entry is damaged; the stage is rebuilt and the new entry replaces it.
    EntryDamaged {
        stage: &'a str,
        key: &'a str,
        why: &'a str,
    },
    /// A stage started running, and why it had to.
    Started { stage: &'a str, why: &'a str },
    /// Another run (a sweep's other member, another `goemo exp run`) built the same key while
    /// this one waited for it; the entry is taken as it is.
    BuiltElsewhere { stage: &'a str, waited_s: f64 },
    /// The stage's entry was pulled from the shared cache instead of built (after waiting
    /// `waited_s` for the worker that built it).
    Pulled { stage: &'a str, waited_s: f64 },
    /// A stage ran and its entry is committed.
    Finished { stage: &'a str, wall_s: f64 },
    /// A stage failed (not sent for one cancelled by an interrupt); `detail` is its error.
    Failed { stage: &'a str, detail: &'a str },
}

/// Receives the engine's events; called from the thread that drives the run.
pub trait Reporter {
    fn event(&self, event: EngineEvent<'_>);
}

/// Drops every event (tests, library callers that only want the results).
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _: EngineEvent<'_>) {}
}
