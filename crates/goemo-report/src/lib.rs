//! What goemo reports, as a library that knows nothing of pipelines, stages or models: it is
//! handed scores, truth and plain facts, and returns figures, files and pages.
//!
//! - [`metrics`]: multi-label metrics with scikit-learn's conventions (per-label counts,
//!   averages, ROC-AUC, average precision, PR curves, threshold search, bootstrap intervals);
//! - [`thresholds`]: per-label thresholds tuned on dev, and `thresholds.json`'s type;
//! - [`evaluation`]: `metrics.json`'s types and how they are computed, the test scores file,
//!   the classification report CSV and `overall_metrics.json`;
//! - [`charts`]: plotters charts as PNG files or SVG strings;
//! - [`compare`]: the same charts for several runs side by side (`goemo plots diff`);
//! - [`page`]: the HTML and Markdown report;
//! - [`card`]: the model card, a Hub model folder's `README.md`.
//!
//! Every file type is a serde struct, so a renamed key is a compile or parse error, never a
//! silent 0. Errors are [`ReportError`].

pub mod card;
pub mod charts;
pub mod compare;
mod error;
pub mod evaluation;
pub mod metrics;
pub mod page;
pub mod precision;
pub mod thresholds;

pub use error::ReportError;
