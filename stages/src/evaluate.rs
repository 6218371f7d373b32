//! `evaluate`: the test split at three threshold policies — 0.5 (the seed project's), 0.3 (the
//! GoEmotions paper's) and the thresholds tuned on dev — with per-label precision, recall, F1
//! and support; micro, macro, weighted and samples averages; exact match; hamming loss;
//! per-label ROC-AUC and average precision; and a seeded bootstrap 95% interval of macro-F1.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::thresholds::Thresholds;
use goemo_data::data::{round6, Split};
use goemo_report::metrics::{self, PolicyReport, Prf};
use goemo_stage::{resolve_typed, InputSpec, Inputs, ParamError, Stage, StageContext};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateParams {
    pub bootstrap_samples: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// The GoEmotions paper's global threshold.
    pub paper_threshold: f32,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        EvaluateParams {
            bootstrap_samples: 1000,
            seed: 42,
            batch_size: 64,
            paper_threshold: 0.3,
        }
    }
}

pub const POLICIES: [&str; 3] = ["0.5", "0.3", "tuned"];

pub struct EvaluateStage;

impl Stage for EvaluateStage {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        // 2: scores from the packed CPU encoder (infer.rs), equal to the old path's within
        // float rounding, not bit for bit. 3: its erf, exp and sums vectorised (same scores
        // within 1e-6, again not bit for bit). 4: matrix products in fixed blocks
        // (infer::K_BLOCK): the same bits on every machine.
        4
    }
    fn summary(&self) -> &'static str {
        "test-split metrics at 0.5, 0.3 and tuned thresholds, with ROC-AUC, AP and a bootstrap CI"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage("model", "the fine-tuned model from train", &["train"]),
            InputSpec::stage("tokens", "tokenized rows from tokenize", &["tokenize"]),
            InputSpec::stage(
                "thresholds",
                "thresholds.json from thresholds",
                &["thresholds"],
            ),
        ];
        Inputs::Fixed(SPECS)
    }
    fn resolve_params(&self, raw: &goemo_stage::RawParams) -> Result<serde_json::Value, ParamError> {
        let v = resolve_typed::<EvaluateParams>(raw)?;
        if v["batch_size"].as_u64() == Some(0) {
            return Err(ParamError::new("batch_size", "batch_size must be > 0"));
        }
        Ok(v)
    }

    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let p: EvaluateParams = ctx.params()?;
        let t: Thresholds =
            goemo_fsio::read_json(&ctx.input("thresholds")?.join("thresholds.json"))?;
        let split = crate::train::score_split(
            ctx.input("model")?,
            ctx.input("tokens")?,
            Split::Test,
            p.batch_size,
        )?;
        let (data, scores, truth, test) = (&split.data, &split.scores, &split.truth, &split.rows);
        let report = evaluate(scores, truth, &data.meta.label_names, &t.thresholds, &p);
        goemo_fsio::write_json(&ctx.out_dir.join("metrics.json"), &report)?;
        let n = data.n_labels();
        let score_bytes: Vec<u8> = scores.iter().flat_map(|x| x.to_le_bytes()).collect();
        safetensors::serialize_to_file(
            vec![
                (
                    "scores",
                    TensorView::new(Dtype::F32, vec![test.len(), n], &score_bytes)?,
                ),
                (
                    "truth",
                    TensorView::new(Dtype::U8, vec![test.len(), n], truth)?,
                ),
            ],
            None,
            &ctx.out_dir.join("test_scores.safetensors"),
        )?;
        tracing::info!(
            "evaluate: test macro-F1 {:.4} at 0.5, {:.4} at 0.3, {:.4} tuned (95% CI {})",
            report["policies"]["0.5"]["macro"]["f1"]
                .as_f64()
                .unwrap_or(0.0),
            report["policies"]["0.3"]["macro"]["f1"]
                .as_f64()
                .unwrap_or(0.0),
            report["policies"]["tuned"]["macro"]["f1"]
                .as_f64()
                .unwrap_or(0.0),
            report["bootstrap"]["macro_f1_95ci"]["tuned"]
        );
        Ok(())
    }
}

fn prf_json(p: &Prf) -> Value {
    json!({"precision": round6(p.precision), "recall": round6(p.recall), "f1": round6(p.f1)})
}

fn policy_json(r: &PolicyReport, labels: &[String]) -> Value {
    let per_label: BTreeMap<&str, Value> = labels
        .iter()
        .zip(&r.per_label)
        .zip(&r.thresholds)
        .map(|((l, c), t)| {
            (l.as_str(), json!({"precision": round6(c.precision()), "recall": round6(c.recall()), "f1": round6(c.f1()), "support": c.support, "threshold": *t as f64}))
        })
        .collect();
    json!({
        "micro": prf_json(&r.micro),
        "macro": prf_json(&r.macro_),
        "weighted": prf_json(&r.weighted),
        "samples": prf_json(&r.samples),
        "exact_match": round6(r.exact_match),
        "hamming_loss": round6(r.hamming_loss),
        "per_label": per_label,
    })
}

/// Everything evaluate reports, as the JSON it writes.
pub fn evaluate(
    scores: &[f32],
    truth: &[u8],
    labels: &[String],
    tuned: &[f32],
    p: &EvaluateParams,
) -> Value {
    let n = labels.len();
    let thresholds: [Vec<f32>; 3] = [vec![0.5; n], vec![p.paper_threshold; n], tuned.to_vec()];
    let mut policies = serde_json::Map::new();
    let mut ci = serde_json::Map::new();
    for (name, t) in POLICIES.iter().zip(&thresholds) {
        let r = metrics::policy_report(scores, truth, n, t);
        policies.insert((*name).into(), policy_json(&r, labels));
        let (lo, hi) =
            metrics::bootstrap_macro_f1(scores, truth, n, t, p.bootstrap_samples, p.seed);
        ci.insert((*name).into(), json!([round6(lo), round6(hi)]));
    }
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
    json!({
        "labels": labels,
        "test_rows": truth.len() / n.max(1),
        "policies": policies,
        "roc_auc": labels.iter().zip(&auc).map(|(l, a)| (l.clone(), json!(a))).collect::<serde_json::Map<_, _>>(),
        "average_precision": labels.iter().zip(&ap).map(|(l, a)| (l.clone(), json!(a))).collect::<serde_json::Map<_, _>>(),
        "macro_roc_auc": mean(&auc),
        "macro_average_precision": mean(&ap),
        "bootstrap": {"samples": p.bootstrap_samples, "seed": p.seed, "macro_f1_95ci": ci},
    })
}
