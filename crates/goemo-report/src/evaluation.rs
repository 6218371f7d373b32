//! `metrics.json`, what evaluation writes and the report and charts read, as serde types: a
//! renamed or missing key is a parse error, never a silent 0. Also the test scores file beside
//! it, and what the report derives from it: scikit-learn's classification report as CSV and the
//! flat Trainer-style `overall_metrics.json`.
//!
//! Struct fields are declared in the files' key order, which is alphabetical (the files were
//! first written through `serde_json::Value`, whose maps sort their keys): the bytes stay the
//! same.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::metrics::{self, round6, PolicyReport, Prf};
use crate::ReportError;

/// The file evaluation writes.
pub const METRICS_FILE: &str = "metrics.json";
/// Test-split scores and truth (safetensors: `scores` f32 and `truth` u8, rows × labels).
pub const SCORES_FILE: &str = "test_scores.safetensors";

/// One value per threshold policy: 0.5 (the seed project's), 0.3 (the GoEmotions paper's) and
/// the per-label thresholds tuned on dev.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByPolicy<T> {
    #[serde(rename = "0.3")]
    pub at_03: T,
    #[serde(rename = "0.5")]
    pub at_05: T,
    pub tuned: T,
}

impl<T> ByPolicy<T> {
    /// The value of the policy named `name` (`0.5`, `0.3` or `tuned`).
    pub fn get(&self, name: &str) -> Option<&T> {
        match name {
            "0.5" => Some(&self.at_05),
            "0.3" => Some(&self.at_03),
            "tuned" => Some(&self.tuned),
            _ => None,
        }
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> ByPolicy<U> {
        ByPolicy {
            at_05: f(&self.at_05),
            at_03: f(&self.at_03),
            tuned: f(&self.tuned),
        }
    }
}

/// Precision, recall and F1 of one average, rounded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Average {
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
}

impl From<&Prf> for Average {
    fn from(p: &Prf) -> Self {
        Average {
            f1: round6(p.f1),
            precision: round6(p.precision),
            recall: round6(p.recall),
        }
    }
}

/// One label's figures at one policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelMetrics {
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    pub support: u64,
    pub threshold: f64,
}

/// Every figure of one threshold policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMetrics {
    pub exact_match: f64,
    pub hamming_loss: f64,
    #[serde(rename = "macro")]
    pub macro_: Average,
    pub micro: Average,
    pub per_label: BTreeMap<String, LabelMetrics>,
    pub samples: Average,
    pub weighted: Average,
}

impl PolicyMetrics {
    pub fn new(r: &PolicyReport, labels: &[String]) -> PolicyMetrics {
        let per_label = labels
            .iter()
            .zip(&r.per_label)
            .zip(&r.thresholds)
            .map(|((l, c), t)| {
                let m = LabelMetrics {
                    f1: round6(c.f1()),
                    precision: round6(c.precision()),
                    recall: round6(c.recall()),
                    support: c.support,
                    threshold: *t as f64,
                };
                (l.clone(), m)
            })
            .collect();
        PolicyMetrics {
            exact_match: round6(r.exact_match),
            hamming_loss: round6(r.hamming_loss),
            macro_: (&r.macro_).into(),
            micro: (&r.micro).into(),
            per_label,
            samples: (&r.samples).into(),
            weighted: (&r.weighted).into(),
        }
    }

    /// One label's figures; an error names the policy and label when metrics.json lacks them.
    pub fn label(&self, policy: &str, label: &str) -> Result<&LabelMetrics, ReportError> {
        self.per_label
            .get(label)
            .ok_or_else(|| ReportError::MissingLabel {
                policy: policy.to_owned(),
                label: label.to_owned(),
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// (2.5th, 97.5th) percentile of macro-F1 per policy.
    pub macro_f1_95ci: ByPolicy<[f64; 2]>,
    pub samples: usize,
    pub seed: u64,
}

/// metrics.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Per label; `null` without positives.
    pub average_precision: BTreeMap<String, Option<f64>>,
    pub bootstrap: Bootstrap,
    pub labels: Vec<String>,
    pub macro_average_precision: Option<f64>,
    pub macro_roc_auc: Option<f64>,
    pub policies: ByPolicy<PolicyMetrics>,
    /// Per label; `null` without positives or without negatives.
    pub roc_auc: BTreeMap<String, Option<f64>>,
    pub test_rows: usize,
}

/// How evaluation runs (the `evaluate` stage's params).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateParams {
    pub bootstrap_samples: usize,
    pub seed: u64,
    /// Rows scored at once.
    pub batch_size: usize,
    /// The GoEmotions paper's global threshold.
    pub paper_threshold: f32,
    /// The encoder's arithmetic; thresholds should have been tuned with the same one.
    #[serde(skip_serializing_if = "crate::precision::Precision::is_f32")]
    pub precision: crate::precision::Precision,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        EvaluateParams {
            bootstrap_samples: 1000,
            seed: 42,
            batch_size: 64,
            paper_threshold: 0.3,
            precision: crate::precision::Precision::F32,
        }
    }
}

/// Every figure of the test split at the three policies: scores (rows × labels, row-major),
/// multi-hot truth, and the thresholds tuned on dev.
pub fn evaluate(
    scores: &[f32],
    truth: &[u8],
    labels: &[String],
    tuned: &[f32],
    p: &EvaluateParams,
) -> MetricsFile {
    let n = labels.len();
    let thresholds = ByPolicy {
        at_05: vec![0.5; n],
        at_03: vec![p.paper_threshold; n],
        tuned: tuned.to_vec(),
    };
    let policies = thresholds
        .map(|t| PolicyMetrics::new(&metrics::policy_report(scores, truth, n, t), labels));
    let ci = thresholds.map(|t| {
        let (lo, hi) =
            metrics::bootstrap_macro_f1(scores, truth, n, t, p.bootstrap_samples, p.seed);
        [round6(lo), round6(hi)]
    });
    let auc: Vec<Option<f64>> = (0..n)
        .map(|l| metrics::roc_auc(scores, truth, n, l).map(round6))
        .collect();
    let ap: Vec<Option<f64>> = (0..n)
        .map(|l| metrics::average_precision(scores, truth, n, l).map(round6))
        .collect();
    let mean = |v: &[Option<f64>]| {
        let d: Vec<f64> = v.iter().flatten().copied().collect();
        if d.is_empty() {
            None
        } else {
            Some(round6(d.iter().sum::<f64>() / d.len() as f64))
        }
    };
    let by_label = |v: &[Option<f64>]| labels.iter().cloned().zip(v.iter().copied()).collect();
    MetricsFile {
        average_precision: by_label(&ap),
        bootstrap: Bootstrap {
            macro_f1_95ci: ci,
            samples: p.bootstrap_samples,
            seed: p.seed,
        },
        labels: labels.to_vec(),
        macro_average_precision: mean(&ap),
        macro_roc_auc: mean(&auc),
        policies,
        roc_auc: by_label(&auc),
        test_rows: truth.len() / n.max(1),
    }
}

/// Write the test scores and truth (`rows` × `n_labels`) to `path`.
pub fn write_scores(
    path: &Path,
    scores: &[f32],
    truth: &[u8],
    rows: usize,
    n_labels: usize,
) -> Result<(), ReportError> {
    let bad = |e: safetensors::SafeTensorError| ReportError::Scores {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let score_bytes: Vec<u8> = scores.iter().flat_map(|x| x.to_le_bytes()).collect();
    safetensors::serialize_to_file(
        vec![
            (
                "scores",
                TensorView::new(Dtype::F32, vec![rows, n_labels], &score_bytes).map_err(bad)?,
            ),
            (
                "truth",
                TensorView::new(Dtype::U8, vec![rows, n_labels], truth).map_err(bad)?,
            ),
        ],
        None,
        path,
    )
    .map_err(bad)
}

/// Read what [`write_scores`] wrote: (scores, truth), checked to be the same shape.
pub fn read_scores(path: &Path) -> Result<(Vec<f32>, Vec<u8>), ReportError> {
    let bytes = std::fs::read(path).map_err(|source| ReportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| ReportError::Scores {
        path: path.to_owned(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let tensor = |name: &str, dtype: Dtype| {
        let t = st.tensor(name).map_err(|e| bad(format!("`{name}`: {e}")))?;
        if t.dtype() != dtype {
            return Err(bad(format!(
                "`{name}` is {:?}, expected {dtype:?}",
                t.dtype()
            )));
        }
        Ok(t)
    };
    let scores_view = tensor("scores", Dtype::F32)?;
    let truth_view = tensor("truth", Dtype::U8)?;
    if scores_view.shape() != truth_view.shape() {
        return Err(bad(format!(
            "`scores` is {:?} but `truth` is {:?}; re-run evaluate",
            scores_view.shape(),
            truth_view.shape()
        )));
    }
    let scores = scores_view
        .data()
        .chunks_exact(4)
        .map(|c| <[u8; 4]>::try_from(c).map(f32::from_le_bytes))
        .collect::<Result<Vec<f32>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    Ok((scores, truth_view.data().to_vec()))
}

/// scikit-learn's classification report as CSV, one policy: a row per label (precision,
/// recall, f1, support, threshold), then the micro, macro, weighted and samples averages.
pub fn classification_csv(m: &MetricsFile, policy: &str) -> Result<Vec<u8>, ReportError> {
    let p = m
        .policies
        .get(policy)
        .ok_or_else(|| ReportError::UnknownPolicy(policy.to_owned()))?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["label", "precision", "recall", "f1", "support", "threshold"])?;
    let mut total = 0u64;
    for l in &m.labels {
        let r = p.label(policy, l)?;
        total += r.support;
        w.write_record([
            l.clone(),
            format!("{:.6}", r.precision),
            format!("{:.6}", r.recall),
            format!("{:.6}", r.f1),
            r.support.to_string(),
            format!("{:.6}", r.threshold),
        ])?;
    }
    for (name, r) in [
        ("micro", &p.micro),
        ("macro", &p.macro_),
        ("weighted", &p.weighted),
        ("samples", &p.samples),
    ] {
        w.write_record([
            format!("{name} avg"),
            format!("{:.6}", r.precision),
            format!("{:.6}", r.recall),
            format!("{:.6}", r.f1),
            total.to_string(),
            String::new(),
        ])?;
    }
    w.into_inner()
        .map_err(|e| ReportError::Csv(e.into_error().into()))
}

/// A flat `overall_metrics.json` value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Flat {
    Figure(f64),
    Maybe(Option<f64>),
    Interval([f64; 2]),
    Count(usize),
}

/// overall_metrics.json: flat Trainer-style keys (`eval_macro_f1`, …; tuned thresholds
/// unsuffixed, `_at_0.5` and `_at_0.3` variants) beside the nested blocks of metrics.json.
#[derive(Debug, Clone, Serialize)]
pub struct OverallMetrics<'a> {
    pub average_precision: &'a BTreeMap<String, Option<f64>>,
    pub bootstrap: &'a Bootstrap,
    /// Every `eval_…` key; they sort between `bootstrap` and `per_label`, so the file's keys
    /// stay in alphabetical order.
    #[serde(flatten)]
    pub flat: BTreeMap<String, Flat>,
    /// The tuned policy's.
    pub per_label: &'a BTreeMap<String, LabelMetrics>,
    pub policies: &'a ByPolicy<PolicyMetrics>,
    pub roc_auc: &'a BTreeMap<String, Option<f64>>,
}

pub fn overall_metrics(m: &MetricsFile) -> OverallMetrics<'_> {
    let mut flat = BTreeMap::new();
    let policies = [
        ("", &m.policies.tuned, m.bootstrap.macro_f1_95ci.tuned),
        (
            "_at_0.5",
            &m.policies.at_05,
            m.bootstrap.macro_f1_95ci.at_05,
        ),
        (
            "_at_0.3",
            &m.policies.at_03,
            m.bootstrap.macro_f1_95ci.at_03,
        ),
    ];
    for (suffix, p, ci) in policies {
        for (avg, a) in [
            ("macro", &p.macro_),
            ("micro", &p.micro),
            ("weighted", &p.weighted),
            ("samples", &p.samples),
        ] {
            for (k, v) in [
                ("f1", a.f1),
                ("precision", a.precision),
                ("recall", a.recall),
            ] {
                flat.insert(format!("eval_{avg}_{k}{suffix}"), Flat::Figure(v));
            }
        }
        let mut put = |key: &str, v: Flat| flat.insert(format!("eval_{key}{suffix}"), v);
        put("exact_match", Flat::Figure(p.exact_match));
        put("hamming_loss", Flat::Figure(p.hamming_loss));
        put("macro_f1_ci95", Flat::Interval(ci));
    }
    flat.insert("eval_macro_roc_auc".into(), Flat::Maybe(m.macro_roc_auc));
    flat.insert(
        "eval_macro_average_precision".into(),
        Flat::Maybe(m.macro_average_precision),
    );
    flat.insert("eval_samples".into(), Flat::Count(m.test_rows));
    OverallMetrics {
        average_precision: &m.average_precision,
        bootstrap: &m.bootstrap,
        flat,
        per_label: &m.policies.tuned.per_label,
        policies: &m.policies,
        roc_auc: &m.roc_auc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn metrics() -> MetricsFile {
        let per = |f1: f64| json!({"precision": 0.5, "recall": 0.25, "f1": f1, "support": 4, "threshold": 0.3});
        let policy = json!({
            "micro": {"precision": 0.5, "recall": 0.5, "f1": 0.5}, "macro": {"precision": 0.4, "recall": 0.3, "f1": 0.35},
            "weighted": {"precision": 0.45, "recall": 0.35, "f1": 0.4}, "samples": {"precision": 0.6, "recall": 0.5, "f1": 0.55},
            "exact_match": 0.2, "hamming_loss": 0.1, "per_label": {"joy": per(0.3), "anger": per(0.4)}
        });
        serde_json::from_value(json!({"labels": ["joy", "anger"], "test_rows": 10, "policies": {"0.5": policy, "0.3": policy, "tuned": policy},
               "roc_auc": {"joy": 0.9, "anger": null}, "average_precision": {"joy": 0.8, "anger": null},
               "macro_roc_auc": 0.9, "macro_average_precision": 0.8,
               "bootstrap": {"samples": 10, "seed": 1, "macro_f1_95ci": {"0.5": [0.3, 0.4], "0.3": [0.3, 0.4], "tuned": [0.3, 0.4]}}}))
        .unwrap()
    }

    #[test]
    fn csv_has_a_row_per_label_then_the_averages() {
        let csv = String::from_utf8(classification_csv(&metrics(), "tuned").unwrap()).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "label,precision,recall,f1,support,threshold");
        assert_eq!(lines[1], "joy,0.500000,0.250000,0.300000,4,0.300000");
        assert_eq!(lines[3], "micro avg,0.500000,0.500000,0.500000,8,");
        assert_eq!(lines[4], "macro avg,0.400000,0.300000,0.350000,8,");
        assert_eq!(lines.len(), 7);
        assert!(csv.ends_with(",\n") && !csv.contains('\r'), "{csv:?}");
        assert!(classification_csv(&metrics(), "0.7").is_err());
    }

    #[test]
    fn overall_metrics_has_flat_trainer_keys_and_nested_blocks() {
        let o = serde_json::to_value(overall_metrics(&metrics())).unwrap();
        assert_eq!(o["eval_macro_f1"], json!(0.35));
        assert_eq!(o["eval_samples_f1_at_0.5"], json!(0.55));
        assert_eq!(o["eval_hamming_loss_at_0.3"], json!(0.1));
        assert_eq!(o["eval_macro_f1_ci95"], json!([0.3, 0.4]));
        assert_eq!(o["eval_samples"], json!(10));
        assert_eq!(o["per_label"]["anger"]["f1"], json!(0.4));
        assert!(o["policies"]["0.5"]["micro"].is_object());
        // Keys in alphabetical order, as the file had them when it was a `serde_json::Value`.
        let text = serde_json::to_string(&overall_metrics(&metrics())).unwrap();
        let resorted = serde_json::to_string(&o).unwrap();
        assert_eq!(text, resorted);
    }

    #[test]
    fn metrics_file_round_trips_and_a_renamed_key_is_an_error() {
        let m = metrics();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            serde_json::to_string(&serde_json::to_value(&m).unwrap()).unwrap()
        );
        let back: MetricsFile = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        let renamed = text.replacen("\"exact_match\"", "\"exact\"", 1);
        assert!(serde_json::from_str::<MetricsFile>(&renamed).is_err());
    }
}
