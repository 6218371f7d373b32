//! Per-label decision thresholds tuned on the dev split, and `thresholds.json`, the file that
//! carries them to evaluation and prediction.
//!
//! For each label, the threshold maximising that label's dev F1 over every distinct dev score
//! (an exact sweep, [`metrics::best_threshold`]), never below `floor`; a label with fewer than
//! `min_positives` dev positives keeps `global_threshold` (too few examples to tune on).
//! `policy: global` uses `global_threshold` for every label (0.5 is the seed project's).

use serde::{Deserialize, Serialize};

pub use crate::precision::Precision;

use crate::metrics::{self, round6};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Tuned,
    Global,
}

/// How thresholds are chosen (the `thresholds` stage's params).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdParams {
    pub policy: Policy,
    pub global_threshold: f32,
    /// Tuned thresholds never go below this.
    pub floor: f32,
    /// Labels with fewer dev positives keep `global_threshold`.
    pub min_positives: usize,
    /// Rows scored at once.
    pub batch_size: usize,
    /// The encoder's arithmetic; evaluate and `goemo predict` score with the same one.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for ThresholdParams {
    fn default() -> Self {
        ThresholdParams {
            policy: Policy::Tuned,
            global_threshold: 0.5,
            floor: 0.05,
            min_positives: 5,
            batch_size: 64,
            precision: Precision::F32,
        }
    }
}

/// thresholds.json: what evaluation and `goemo predict` read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub policy: Policy,
    pub labels: Vec<String>,
    pub thresholds: Vec<f32>,
    /// Dev F1 of each label at its threshold.
    pub dev_f1: Vec<f64>,
    /// Labels that kept the global threshold (too few dev positives).
    pub fallback: Vec<String>,
    /// The arithmetic the dev scores were computed with (absent: f32).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Thresholds {
    /// One threshold per label, or an error saying how the file disagrees with itself.
    pub fn check(&self) -> Result<(), crate::ReportError> {
        if self.thresholds.len() != self.labels.len() {
            return Err(crate::ReportError::Mismatch(format!(
                "thresholds.json has {} thresholds for {} labels; re-run the thresholds stage",
                self.thresholds.len(),
                self.labels.len()
            )));
        }
        Ok(())
    }
}

/// The file name the thresholds stage writes.
pub const THRESHOLDS_FILE: &str = "thresholds.json";

/// Thresholds for `labels` from dev scores (rows × labels, row-major) and multi-hot truth.
pub fn tune(scores: &[f32], truth: &[u8], labels: &[String], p: &ThresholdParams) -> Thresholds {
    let n = labels.len();
    let mut thresholds = vec![p.global_threshold; n];
    let mut fallback = Vec::new();
    if p.policy == Policy::Tuned {
        for (l, (label, threshold)) in labels.iter().zip(&mut thresholds).enumerate() {
            let positives = truth
                .chunks_exact(n)
                .filter(|r| r.get(l).is_some_and(|&x| x != 0))
                .count();
            if positives < p.min_positives {
                fallback.push(label.clone());
                continue;
            }
            *threshold = metrics::best_threshold(scores, truth, n, l).0.max(p.floor);
        }
    }
    let c = metrics::counts(scores, truth, n, &thresholds);
    Thresholds {
        policy: p.policy,
        labels: labels.to_vec(),
        dev_f1: c.iter().map(|k| round6(k.f1())).collect(),
        thresholds,
        fallback,
        precision: p.precision,
    }
}
