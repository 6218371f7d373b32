//! `summary.json`, the dataset's summary that load writes, sample extends and the report reads,
//! as serde types: a renamed or missing key is a parse error, never a silent 0.
//!
//! Fields are declared in the file's key order, which is alphabetical (the file was first
//! written through `serde_json::Value`, whose maps sort their keys), so its bytes stay the same.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::{PerSplit, SplitSummary, Taxonomy};
use crate::DataError;

pub const SUMMARY_FILE: &str = "summary.json";

/// Where load read the rows: the official splits or the raw rater files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Official,
    Raw,
}

/// Rows kept per split, and in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowCounts {
    pub dev: usize,
    pub test: usize,
    pub total: usize,
    pub train: usize,
}

/// Rows that could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejected {
    /// Count per reject kind (`wrong field count`, …).
    pub by_reason: BTreeMap<String, usize>,
    pub total: usize,
}

/// What the sample stage adds: its params and the counts after sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSummary {
    pub fraction: f64,
    pub rows_before: PerSplit<usize>,
    pub seed: u64,
    pub splits_after: PerSplit<SplitSummary>,
    pub stratify: bool,
}

/// summary.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSummary {
    /// Comments left out on purpose (raw aggregation), by reason.
    pub filtered: BTreeMap<String, usize>,
    pub labels: Vec<String>,
    /// Lines read per file, named relative to the data folder.
    pub lines_read: BTreeMap<String, usize>,
    pub rejected: Rejected,
    /// Rows loaded (before any sample).
    pub rows: RowCounts,
    /// Present once the sample stage has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<SampleSummary>,
    pub source: Source,
    /// Counts per split as loaded (before any sample).
    pub splits: PerSplit<SplitSummary>,
    pub taxonomy: Taxonomy,
}

impl DatasetSummary {
    /// Rows of `split` that go downstream: after the sample when there is one.
    pub fn rows_kept(&self, split: crate::data::Split) -> usize {
        match &self.sample {
            Some(s) => s.splits_after.get(split).rows,
            None => *self.rows_per_split().get(split),
        }
    }

    fn rows_per_split(&self) -> PerSplit<usize> {
        PerSplit {
            dev: self.rows.dev,
            test: self.rows.test,
            train: self.rows.train,
        }
    }
}

/// The summary.json in a load or sample stage's folder.
pub fn read_summary(dir: &Path) -> Result<DatasetSummary, DataError> {
    Ok(goemo_fsio::read_json(&dir.join(SUMMARY_FILE))?)
}

/// Write `summary` as `dir/summary.json`.
pub fn write_summary(dir: &Path, summary: &DatasetSummary) -> Result<(), DataError> {
    Ok(goemo_fsio::write_json(&dir.join(SUMMARY_FILE), summary)?)
}
