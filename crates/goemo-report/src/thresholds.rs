//! Per-label decision thresholds tuned on the dev split, and `thresholds.json`, the file that
//! carries them to evaluation and prediction.
//!
//! For each label, the threshold maximising that label's dev F1 over every distinct dev score
//! (an exact sweep, [`metrics::best_threshold`]), never below `floor`; a label with fewer than
//! `min_positives` dev positives keeps `global_threshold` (too few examples to tune on).
//! `policy: global` uses `global_threshold` for every label (0.5 is the seed project's).

use serde::{Deserialize, Serialize};

pub use crate::precision::{Precision, INT8_ARITHMETIC};

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
    /// With int8: the revision of the int8 arithmetic ([`INT8_ARITHMETIC`]; absent in files
    /// tuned before goemo recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8_arithmetic: Option<u32>,
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

    /// Why scores in `precision` by this build are not the scores these thresholds were tuned
    /// on, if they are not: another precision, or int8 arithmetic of another revision. The
    /// thresholds still apply, only less exactly (int8 and f32 scores differ by ~1e-2).
    pub fn scoring_mismatch(&self, precision: Precision) -> Option<String> {
        if self.precision != precision {
            return Some(format!(
                "scoring in {} with thresholds tuned on {} scores; tune them in {0} (thresholds.precision: {0}) or score in {1} (--precision {1})",
                precision.name(),
                self.precision.name()
            ));
        }
        if precision == Precision::Int8 && self.int8_arithmetic != Some(INT8_ARITHMETIC) {
            let tuned = match self.int8_arithmetic {
                Some(r) => format!("int8 scores of revision {r} of goemo's int8 arithmetic"),
                None => "int8 scores of an older goemo, which did not record its int8 arithmetic"
                    .to_owned(),
            };
            return Some(format!(
                "thresholds tuned on {tuned}, but this goemo's int8 arithmetic is revision {INT8_ARITHMETIC} (scores differ by ~1e-2); re-run the thresholds stage (goemo run --from thresholds) to tune them on its scores"
            ));
        }
        None
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
        int8_arithmetic: (p.precision == Precision::Int8).then_some(INT8_ARITHMETIC),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuned(precision: Precision) -> Thresholds {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let scores = [0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.1, 0.6];
        let truth = [1, 0, 0, 1, 1, 0, 0, 1];
        let p = ThresholdParams {
            min_positives: 1,
            precision,
            ..ThresholdParams::default()
        };
        tune(&scores, &truth, &labels, &p)
    }

    /// f32 files keep the bytes they had before int8 existed (no precision, no revision); int8
    /// files record both, and read back equal.
    #[test]
    fn int8_files_record_the_arithmetic_they_were_tuned_on() {
        let f32_json = serde_json::to_string(&tuned(Precision::F32)).unwrap();
        assert!(
            !f32_json.contains("precision") && !f32_json.contains("int8"),
            "{f32_json}"
        );
        let int8 = tuned(Precision::Int8);
        let json = serde_json::to_string(&int8).unwrap();
        assert!(
            json.contains(&format!("\"int8_arithmetic\":{INT8_ARITHMETIC}")),
            "{json}"
        );
        let back: Thresholds = serde_json::from_str(&json).unwrap();
        assert_eq!(back, int8);
    }

    #[test]
    fn scoring_with_other_arithmetic_is_named_with_its_fix() {
        let f32_file = tuned(Precision::F32);
        assert_eq!(f32_file.scoring_mismatch(Precision::F32), None);
        let m = f32_file.scoring_mismatch(Precision::Int8).unwrap();
        assert!(
            m.contains("tuned on f32") && m.contains("--precision f32"),
            "{m}"
        );

        let int8_file = tuned(Precision::Int8);
        assert_eq!(int8_file.scoring_mismatch(Precision::Int8), None);
        assert!(int8_file.scoring_mismatch(Precision::F32).is_some());

        // A file from an older build: another revision, or none recorded.
        let older = Thresholds {
            int8_arithmetic: Some(INT8_ARITHMETIC - 1),
            ..int8_file.clone()
        };
        let m = older.scoring_mismatch(Precision::Int8).unwrap();
        assert!(
            m.contains(&format!("revision {}", INT8_ARITHMETIC - 1))
                && m.contains("--from thresholds"),
            "{m}"
        );
        let json = serde_json::to_string(&int8_file).unwrap();
        let unrecorded: Thresholds = serde_json::from_str(
            &json.replace(&format!(",\"int8_arithmetic\":{INT8_ARITHMETIC}"), ""),
        )
        .unwrap();
        assert_eq!(unrecorded.int8_arithmetic, None);
        assert!(unrecorded
            .scoring_mismatch(Precision::Int8)
            .unwrap()
            .contains("older"));
    }
}
