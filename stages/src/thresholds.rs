//! `thresholds`: per-label decision thresholds tuned on the dev split (never on test).
//!
//! For each label, the threshold maximising that label's dev F1 over every distinct dev score
//! (an exact sweep), never below `floor`; a label with fewer than `min_positives` dev positives
//! keeps `global_threshold` (too few examples to tune on). `policy: global` uses
//! `global_threshold` for every label (0.5 is the seed project's).

use serde::{Deserialize, Serialize};

use goemo_data::data::Split;
use goemo_report::metrics;
use goemo_stage::{resolve_typed, InputSpec, Inputs, ParamError, Stage, StageContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Tuned,
    Global,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdParams {
    pub policy: Policy,
    pub global_threshold: f32,
    /// Tuned thresholds never go below this.
    pub floor: f32,
    /// Labels with fewer dev positives keep `global_threshold`.
    pub min_positives: usize,
    pub batch_size: usize,
}

impl Default for ThresholdParams {
    fn default() -> Self {
        ThresholdParams {
            policy: Policy::Tuned,
            global_threshold: 0.5,
            floor: 0.05,
            min_positives: 5,
            batch_size: 64,
        }
    }
}

/// thresholds.json: what evaluate and `goemo predict` read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub policy: Policy,
    pub labels: Vec<String>,
    pub thresholds: Vec<f32>,
    /// Dev F1 of each label at its threshold.
    pub dev_f1: Vec<f64>,
    /// Labels that kept the global threshold (too few dev positives).
    pub fallback: Vec<String>,
}

pub struct ThresholdsStage;

impl Stage for ThresholdsStage {
    fn kind(&self) -> &'static str {
        "thresholds"
    }
    fn version(&self) -> u32 {
        // 2: scores from the packed CPU encoder (infer.rs), equal to the old path's within
        // float rounding, not bit for bit. 3: its erf, exp and sums vectorised (same scores
        // within 1e-6, again not bit for bit). 4: matrix products in fixed blocks
        // (infer::K_BLOCK): the same bits on every machine.
        4
    }
    fn summary(&self) -> &'static str {
        "per-label thresholds that maximise dev F1 (or one global threshold)"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage("model", "the fine-tuned model from train", &["train"]),
            InputSpec::stage("tokens", "tokenized rows from tokenize", &["tokenize"]),
        ];
        Inputs::Fixed(SPECS)
    }
    fn resolve_params(&self, raw: &goemo_stage::RawParams) -> Result<serde_json::Value, ParamError> {
        let v = resolve_typed::<ThresholdParams>(raw)?;
        for key in ["global_threshold", "floor"] {
            let x = v[key].as_f64().unwrap_or(-1.0);
            if !(0.0..=1.0).contains(&x) {
                return Err(ParamError::new(
                    key,
                    format!("{key} must be in [0, 1], got {x}"),
                ));
            }
        }
        if v["batch_size"].as_u64() == Some(0) {
            return Err(ParamError::new("batch_size", "batch_size must be > 0"));
        }
        Ok(v)
    }

    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let p: ThresholdParams = ctx.params()?;
        let split = crate::train::score_split(
            ctx.input("model")?,
            ctx.input("tokens")?,
            Split::Dev,
            p.batch_size,
        )?;
        let (data, scores, truth) = (&split.data, &split.scores, &split.truth);
        let n = data.n_labels();
        let t = tune(scores, truth, &data.meta.label_names, &p);
        goemo_fsio::write_json(&ctx.out_dir.join("thresholds.json"), &t)?;
        let tuned = metrics::macro_f1(&metrics::counts(scores, truth, n, &t.thresholds));
        let at_global = metrics::macro_f1(&metrics::counts(
            scores,
            truth,
            n,
            &vec![p.global_threshold; n],
        ));
        tracing::info!(
            "thresholds: dev macro-F1 {:.4} at {} vs {:.4} at {}",
            tuned,
            if p.policy == Policy::Tuned {
                "tuned thresholds"
            } else {
                "the global threshold"
            },
            at_global,
            p.global_threshold
        );
        Ok(())
    }
}

pub fn tune(scores: &[f32], truth: &[u8], labels: &[String], p: &ThresholdParams) -> Thresholds {
    let n = labels.len();
    let mut thresholds = vec![p.global_threshold; n];
    let mut fallback = Vec::new();
    if p.policy == Policy::Tuned {
        for l in 0..n {
            let positives = truth.chunks_exact(n).filter(|r| r[l] != 0).count();
            if positives < p.min_positives {
                fallback.push(labels[l].clone());
                continue;
            }
            thresholds[l] = metrics::best_threshold(scores, truth, n, l).0.max(p.floor);
        }
    }
    let c = metrics::counts(scores, truth, n, &thresholds);
    Thresholds {
        policy: p.policy,
        labels: labels.to_vec(),
        dev_f1: c.iter().map(|k| goemo_data::data::round6(k.f1())).collect(),
        thresholds,
        fallback,
    }
}
