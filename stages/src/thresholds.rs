//! `thresholds`: per-label decision thresholds tuned on the dev split (never on test), an
//! adapter over [`goemo_report::thresholds`] (which says how they are chosen).

use std::collections::BTreeMap;

use goemo_data::data::Split;
use goemo_report::metrics;
use goemo_report::thresholds::{tune, Precision, THRESHOLDS_FILE};
pub use goemo_report::thresholds::{Policy, ThresholdParams, Thresholds};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

pub struct ThresholdsStage;

impl TypedStage for ThresholdsStage {
    type Params = ThresholdParams;

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
    fn version_for(&self, p: &ThresholdParams) -> u32 {
        // Int8 runs: +1 since thresholds.json records the int8 arithmetic's revision.
        p.precision.stage_version(4) + u32::from(p.precision == Precision::Int8)
    }
    fn summary(&self) -> &'static str {
        "per-label thresholds that maximise dev F1 (or one global threshold)"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage(
                "model",
                "the fine-tuned model from train (or distill)",
                &["train", "distill"],
            ),
            InputSpec::stage("tokens", "tokenized rows from tokenize", &["tokenize"]),
        ];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, p: &ThresholdParams) -> Result<(), ParamError> {
        for (key, x) in [("global_threshold", p.global_threshold), ("floor", p.floor)] {
            if !(0.0..=1.0).contains(&x) {
                return Err(ParamError::new(
                    key,
                    format!("{key} must be in [0, 1], got {x}"),
                ));
            }
        }
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "batch_size must be > 0"));
        }
        Ok(())
    }

    /// The dev split's macro-F1 at the chosen thresholds: what experiments are compared on
    /// (the test split is never used to choose).
    fn metrics(&self, out_dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, f64>> {
        let t: goemo_report::thresholds::Thresholds =
            goemo_fsio::read_json(&out_dir.join(THRESHOLDS_FILE))?;
        let n = t.dev_f1.len().max(1) as f64;
        let macro_f1 = t.dev_f1.iter().sum::<f64>() / n;
        Ok(BTreeMap::from([(
            "dev_macro_f1".to_owned(),
            (macro_f1 * 1e6).round() / 1e6,
        )]))
    }

    fn run(&self, ctx: &StageContext<'_>, p: ThresholdParams) -> anyhow::Result<()> {
        let split = crate::scoring::score_split(
            ctx.input("model")?,
            ctx.input("tokens")?,
            Split::Dev,
            p.batch_size,
            p.precision,
        )?;
        let (data, scores, truth) = (&split.data, &split.scores, &split.truth);
        let n = data.n_labels();
        let t = tune(scores, truth, &data.meta.label_names, &p);
        goemo_fsio::write_json(&ctx.out_dir.join(THRESHOLDS_FILE), &t)?;
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

#[cfg(test)]
mod tests {
    use goemo_stage::Stage;

    /// `precision` at its default is left out of the resolved params, so the key of every
    /// thresholds and evaluate entry made before the param existed is unchanged; int8 is in.
    #[test]
    fn precision_f32_leaves_the_key_unchanged_and_int8_changes_it() {
        let stages: [&dyn Stage; 2] = [&super::ThresholdsStage, &crate::evaluate::EvaluateStage];
        for stage in stages {
            let resolve = |yaml: &str| {
                stage
                    .resolve_params(&serde_yaml::from_str(yaml).unwrap())
                    .unwrap()
            };
            let before = resolve("{}");
            assert!(before.get("precision").is_none(), "{before}");
            assert_eq!(resolve("{precision: f32}"), before);
            let int8 = resolve("{precision: int8}");
            assert_eq!(int8["precision"], "int8");
            let err = stage
                .resolve_params(&serde_yaml::from_str("{precision: int4}").unwrap())
                .unwrap_err();
            assert_eq!(err.param.as_deref(), Some("precision"), "{}", err.message);
            assert!(
                err.message.contains("expected `f32` or `int8`"),
                "{}",
                err.message
            );
        }
    }

    /// Int8 runs key on a version of their own (int8's arithmetic changed without f32's), so
    /// a changed int8 scheme reruns int8 entries and leaves f32 entries and locks alone. The
    /// same for distill's teachers.
    #[test]
    fn int8_runs_have_a_version_of_their_own() {
        // Thresholds' int8 runs one more: their thresholds.json records the arithmetic.
        let stages: [(&dyn Stage, &str, u32); 3] = [
            (&super::ThresholdsStage, "precision", 1),
            (&crate::evaluate::EvaluateStage, "precision", 0),
            (&crate::distill::DistillStage, "teacher_precision", 0),
        ];
        for (stage, param, format) in stages {
            let resolve = |yaml: &str| {
                stage
                    .resolve_params(&serde_yaml::from_str(yaml).unwrap())
                    .unwrap()
            };
            let f32_version = stage.version_for(&resolve("{}"));
            assert_eq!(f32_version, stage.version(), "{}", stage.kind());
            let int8 = resolve(&format!("{{{param}: int8}}"));
            assert_eq!(
                stage.version_for(&int8),
                stage.version() + goemo_report::precision::INT8_ARITHMETIC + format,
                "{}",
                stage.kind()
            );
        }
    }
}
