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
    #[error("metrics.json has no `{0}` policy; re-run evaluate")]
    UnknownPolicy(String),
    #[error("metrics.json: policy `{policy}` has no figures for label `{label}`; re-run evaluate")]
    MissingLabel { policy: String, label: String },
    #[error("writing the classification report CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("{0}")]
    Mismatch(String),
}
