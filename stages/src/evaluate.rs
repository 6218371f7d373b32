//! `evaluate`: the test split at three threshold policies — 0.5 (the seed project's), 0.3 (the
//! GoEmotions paper's) and the thresholds tuned on dev — with per-label precision, recall, F1
//! and support; micro, macro, weighted and samples averages; exact match; hamming loss;
//! per-label ROC-AUC and average precision; and a seeded bootstrap 95% interval of macro-F1.
//! An adapter over [`goemo_report::evaluation`], which owns metrics.json's types.

use std::collections::BTreeMap;

use goemo_data::data::Split;
use goemo_report::evaluation::{evaluate, write_scores, METRICS_FILE, SCORES_FILE};
pub use goemo_report::evaluation::{EvaluateParams, MetricsFile};
use goemo_report::thresholds::{Thresholds, THRESHOLDS_FILE};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

pub struct EvaluateStage;

impl TypedStage for EvaluateStage {
    type Params = EvaluateParams;

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
    fn version_for(&self, p: &EvaluateParams) -> u32 {
        p.precision.stage_version(4)
    }
    fn summary(&self) -> &'static str {
        "test-split metrics at 0.5, 0.3 and tuned thresholds, with ROC-AUC, AP and a bootstrap CI"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage(
                "model",
                "the fine-tuned model from train (or distill)",
                &["train", "distill"],
            ),
            InputSpec::stage("tokens", "tokenized rows from tokenize", &["tokenize"]),
            InputSpec::stage(
                "thresholds",
                "thresholds.json from thresholds",
                &["thresholds"],
            ),
        ];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, p: &EvaluateParams) -> Result<(), ParamError> {
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "batch_size must be > 0"));
        }
        Ok(())
    }

    /// Test-split figures for `goemo exp show`: macro-F1 at each policy (tuned with its
    /// bootstrap 95% interval), micro-F1 tuned, macro ROC AUC.
    fn metrics(&self, out_dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, f64>> {
        let m: goemo_report::evaluation::MetricsFile =
            goemo_fsio::read_json(&out_dir.join(METRICS_FILE))?;
        let ci = m.bootstrap.macro_f1_95ci.tuned;
        let mut out = BTreeMap::from([
            ("test_macro_f1_tuned".to_owned(), m.policies.tuned.macro_.f1),
            ("test_macro_f1_tuned_ci_lo".to_owned(), ci[0]),
            ("test_macro_f1_tuned_ci_hi".to_owned(), ci[1]),
            ("test_macro_f1_at05".to_owned(), m.policies.at_05.macro_.f1),
            ("test_macro_f1_at03".to_owned(), m.policies.at_03.macro_.f1),
            ("test_micro_f1_tuned".to_owned(), m.policies.tuned.micro.f1),
        ]);
        if let Some(auc) = m.macro_roc_auc {
            out.insert("test_macro_roc_auc".to_owned(), auc);
        }
        Ok(out)
    }

    fn run(&self, ctx: &StageContext<'_>, p: EvaluateParams) -> anyhow::Result<()> {
        let t: Thresholds = goemo_fsio::read_json(&ctx.input("thresholds")?.join(THRESHOLDS_FILE))?;
        if let Some(why) = t.scoring_mismatch(p.precision) {
            tracing::warn!("evaluate: {why}");
        }
        let split = crate::scoring::score_split(
            ctx.input("model")?,
            ctx.input("tokens")?,
            Split::Test,
            p.batch_size,
            p.precision,
        )?;
        let (data, scores, truth, test) = (&split.data, &split.scores, &split.truth, &split.rows);
        t.check()?;
        if t.labels != data.meta.label_names {
            anyhow::bail!(
                "thresholds.json's labels differ from the tokenized data's; re-run thresholds on the same data"
            );
        }
        let report = evaluate(scores, truth, &data.meta.label_names, &t.thresholds, &p);
        goemo_fsio::write_json(&ctx.out_dir.join(METRICS_FILE), &report)?;
        write_scores(
            &ctx.out_dir.join(SCORES_FILE),
            scores,
            truth,
            test.len(),
            data.n_labels(),
        )?;
        let [lo, hi] = report.bootstrap.macro_f1_95ci.tuned;
        tracing::info!(
            "evaluate: test macro-F1 {:.4} at 0.5, {:.4} at 0.3, {:.4} tuned (95% CI [{lo},{hi}])",
            report.policies.at_05.macro_.f1,
            report.policies.at_03.macro_.f1,
            report.policies.tuned.macro_.f1,
        );
        Ok(())
    }
}
