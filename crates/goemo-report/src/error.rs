//! The one error type of this crate.

use std::path::PathBuf;

/// What can go wrong reading goemo's result files or drawing and writing the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("drawing a chart: {0}")]
    Chart(String),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Scores { path: PathBuf, message: String },
    /// A JSON file that does not parse as its type: serde's message names the missing or
    /// mistyped key, this names the file.
    #[error("parsing {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A file that parses but lacks what was asked of it (a policy, a label).
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("metrics.json has no `{0}` policy; re-run evaluate")]
    UnknownPolicy(String),
    #[error("metrics.json: policy `{policy}` has no figures for label `{label}`; re-run evaluate")]
    MissingLabel { policy: String, label: String },
    #[error("writing the classification report CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("{0}")]
    Mismatch(String),
}
