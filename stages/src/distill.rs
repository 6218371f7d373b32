//! `distill`: one student trained on an ensemble's averaged probabilities.
//!
//! The teachers are trained models (train or distill stages, given as deps whose roles start with
//! `teacher`); they score every train, dev and test row, and their probabilities are averaged.
//! The student (the `model` input, e.g. all-MiniLM-L6-v2) is trained exactly as the train stage
//! trains (its `train:` params), with each train row's targets (1 − α)·labels + α·(the teachers'
//! mean), α = `soft_weight`. Its outputs have train's layout (an HF model folder, train_log.json),
//! so thresholds, evaluate, package, report and plot take it like a train stage.
//!
//! The ensemble itself is reported as the upper reference the student aims at: thresholds tuned
//! on its dev probabilities, then scored once on test (`ensemble.json`). Nothing is chosen on
//! test: the student's best epoch is chosen on dev, like train's.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use goemo_data::data::Split;
use goemo_data::tokens::TokenizedData;
use goemo_report::metrics;
use goemo_report::precision::Precision;
use goemo_report::thresholds::{tune, ThresholdParams};
use goemo_stage::{Inputs, ParamError, StageContext, TypedStage};

use crate::scoring::{load_scorer, score_rows_of};
use crate::trainer::{self, SoftTargets, TrainLog, TrainParams, TrainStage};

/// The ensemble's figures, next to the student's model.
pub const ENSEMBLE_FILE: &str = "ensemble.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillParams {
    /// α: how much of each train row's target comes from the teachers (0: the labels alone,
    /// 1: the teachers' probabilities alone).
    pub soft_weight: f64,
    /// The arithmetic the teachers score in (int8 is about 2.5× faster on CPUs with VNNI;
    /// `GOEMO_KERNELS=portable` gives the same bits anywhere).
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub teacher_precision: Precision,
    /// Rows a teacher scores at once.
    pub batch_size: usize,
    /// The student's training: every param of the train stage.
    pub train: TrainParams,
}

impl Default for DistillParams {
    fn default() -> Self {
        DistillParams {
            soft_weight: 0.5,
            teacher_precision: Precision::F32,
            batch_size: 64,
            train: TrainParams::default(),
        }
    }
}

/// ensemble.json: what averaging the teachers gives, with thresholds tuned on dev.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleReport {
    /// The teachers' roles, in the order averaged.
    pub teachers: Vec<String>,
    pub dev_macro_f1_tuned: f64,
    pub dev_macro_f1_at05: f64,
    pub test_macro_f1_tuned: f64,
    pub test_macro_f1_at05: f64,
    pub test_macro_f1_at03: f64,
    pub test_micro_f1_tuned: f64,
    /// Each teacher alone on test with its own dev-tuned thresholds (the same tuning), for the
    /// gain the ensemble makes.
    pub teacher_test_macro_f1_tuned: Vec<f64>,
    pub thresholds: Vec<f32>,
}

pub struct DistillStage;

/// Roles naming a teacher (`teacher`, `teacher_1`, `teacher-seed2`, …), sorted so that the
/// average is taken in one fixed order.
fn teacher_roles(inputs: &BTreeMap<String, std::path::PathBuf>) -> Vec<String> {
    inputs
        .keys()
        .filter(|r| r.starts_with("teacher"))
        .cloned()
        .collect()
}

impl TypedStage for DistillStage {
    type Params = DistillParams;

    fn kind(&self) -> &'static str {
        "distill"
    }
    fn version(&self) -> u32 {
        1
    }
    fn version_for(&self, p: &DistillParams) -> u32 {
        p.teacher_precision.stage_version(1)
    }
    fn summary(&self) -> &'static str {
        "train one student on the averaged probabilities of several trained models (deps with roles teacher*), and report the ensemble"
    }
    fn inputs(&self) -> Inputs {
        // Roles: tokens, model and any number of teacher* (checked in run: the engine has no
        // "one or more" role).
        Inputs::Any
    }
    fn validate(&self, p: &DistillParams) -> Result<(), ParamError> {
        if !(0.0..=1.0).contains(&p.soft_weight) {
            return Err(ParamError::new(
                "soft_weight",
                format!("soft_weight must be in [0, 1], got {}", p.soft_weight),
            ));
        }
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "batch_size must be > 0"));
        }
        TrainStage.validate(&p.train).map_err(|e| ParamError {
            param: Some(format!("train.{}", e.param.unwrap_or_default())),
            message: e.message,
        })
    }

    fn metrics(&self, out_dir: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
        let log: TrainLog = goemo_fsio::read_json(&out_dir.join("train_log.json"))?;
        let e: EnsembleReport = goemo_fsio::read_json(&out_dir.join(ENSEMBLE_FILE))?;
        Ok(BTreeMap::from([
            ("dev_macro_f1".to_owned(), log.best_dev_macro_f1),
            ("best_epoch".to_owned(), log.best_epoch as f64),
            (
                "ensemble_dev_macro_f1_tuned".to_owned(),
                e.dev_macro_f1_tuned,
            ),
            (
                "ensemble_test_macro_f1_tuned".to_owned(),
                e.test_macro_f1_tuned,
            ),
        ]))
    }

    fn run(&self, ctx: &StageContext<'_>, p: DistillParams) -> anyhow::Result<()> {
        let stage = ctx.name;
        let teachers = teacher_roles(ctx.inputs);
        let unknown: Vec<&String> = ctx
            .inputs
            .keys()
            .filter(|r| !r.starts_with("teacher") && *r != "tokens" && *r != "model")
            .collect();
        if teachers.is_empty() || !unknown.is_empty() || !ctx.inputs.contains_key("tokens") {
            anyhow::bail!(
                "stage `{stage}`: distill takes the roles tokens (a tokenize stage), model (the student's backbone folder) and one or more teacher* (trained models){}{}\n  hint: e.g. deps: {{tokens: tokenize, teacher_1: train_seed1, teacher_2: train_seed2}} and inputs: {{model: models/all-MiniLM-L6-v2}}",
                if teachers.is_empty() { "; no teacher* role was given" } else { "" },
                if unknown.is_empty() { String::new() } else { format!("; unknown roles: {unknown:?}") },
            );
        }
        let data = TokenizedData::read(ctx.input("tokens")?)?;
        let labels = data.n_labels();

        // Every teacher scores every split; the average is taken in role order.
        let mut mean: BTreeMap<Split, Vec<f32>> = BTreeMap::new();
        let mut alone: Vec<f64> = Vec::new();
        let mut rows_of: BTreeMap<Split, Vec<usize>> = BTreeMap::new();
        let tuning = ThresholdParams::default();
        for role in &teachers {
            // One load per teacher, the tokens read once: every split is scored from them.
            let classifier = load_scorer(ctx.input(role)?, p.teacher_precision).map_err(|e| {
                anyhow::anyhow!("stage `{stage}`, teacher `{role}`: {e}\n  hint: a teacher is a train or distill stage's output (its model/ folder)")
            })?;
            let teacher_labels = classifier.labels.len();
            if teacher_labels != labels {
                anyhow::bail!(
                    "stage `{stage}`, teacher `{role}`: the model has {teacher_labels} labels but the tokens have {labels}\n  hint: teachers must be trained on the same taxonomy as the student"
                );
            }
            let mut per_split = BTreeMap::new();
            for split in [Split::Train, Split::Dev, Split::Test] {
                let (rows, scores, truth) = score_rows_of(&classifier, &data, split, p.batch_size)?;
                tracing::info!(
                    "{stage}: teacher {role} scored {} {} rows",
                    rows.len(),
                    split.name()
                );
                let sum = mean.entry(split).or_insert_with(|| vec![0.0; scores.len()]);
                sum.iter_mut().zip(&scores).for_each(|(a, b)| *a += b);
                rows_of.insert(split, rows);
                per_split.insert(split, (scores, truth));
            }
            let ((dev, dev_truth), (test, test_truth)) =
                (&per_split[&Split::Dev], &per_split[&Split::Test]);
            let t = tune(dev, dev_truth, &data.meta.label_names, &tuning);
            alone.push(metrics::round6(metrics::macro_f1(&metrics::counts(
                test,
                test_truth,
                labels,
                &t.thresholds,
            ))));
        }
        let n = teachers.len() as f32;
        mean.values_mut()
            .for_each(|v| v.iter_mut().for_each(|x| *x /= n));
        let truth = |split: Split| -> Vec<u8> {
            rows_of[&split]
                .iter()
                .flat_map(|&i| data.row_labels(i).to_vec())
                .collect()
        };
        let report = ensemble_report(
            &teachers,
            &mean,
            &truth(Split::Dev),
            &truth(Split::Test),
            &data.meta.label_names,
            alone,
            &tuning,
        );
        tracing::info!(
            "{stage}: the ensemble of {} teachers: test macro-F1 {:.4} tuned on dev (teachers alone: {:?})",
            teachers.len(),
            report.test_macro_f1_tuned,
            report.teacher_test_macro_f1_tuned
        );
        goemo_fsio::write_json(&ctx.out_dir.join(ENSEMBLE_FILE), &report)?;

        // The student's soft targets, indexed by data row.
        let mut probs = vec![0f32; data.len() * labels];
        for (k, &i) in rows_of[&Split::Train].iter().enumerate() {
            probs[i * labels..(i + 1) * labels]
                .copy_from_slice(&mean[&Split::Train][k * labels..(k + 1) * labels]);
        }
        let soft = SoftTargets {
            weight: p.soft_weight as f32,
            probs,
        };
        // The student's recipe for the model card: its train params, and how it was distilled.
        let mut recipe = ctx.params["train"].clone();
        if let Some(o) = recipe.as_object_mut() {
            o.insert("distill_soft_weight".into(), p.soft_weight.into());
            o.insert("distill_teachers".into(), serde_json::json!(teachers));
        }
        trainer::train_and_export(ctx, p.train, &data, Some(&soft), &recipe)
    }
}

/// The ensemble's figures from its averaged probabilities: thresholds tuned on dev (the same
/// tuning as the thresholds stage's defaults), then test scored once.
fn ensemble_report(
    teachers: &[String],
    mean: &BTreeMap<Split, Vec<f32>>,
    dev_truth: &[u8],
    test_truth: &[u8],
    label_names: &[String],
    alone: Vec<f64>,
    tuning: &ThresholdParams,
) -> EnsembleReport {
    let labels = label_names.len();
    let (dev, test) = (&mean[&Split::Dev], &mean[&Split::Test]);
    let t = tune(dev, dev_truth, label_names, tuning);
    let f1 = |scores: &[f32], truth: &[u8], th: &[f32]| {
        metrics::round6(metrics::macro_f1(&metrics::counts(
            scores, truth, labels, th,
        )))
    };
    let at = |x: f32| vec![x; labels];
    let tuned = metrics::policy_report(test, test_truth, labels, &t.thresholds);
    EnsembleReport {
        teachers: teachers.to_vec(),
        dev_macro_f1_tuned: f1(dev, dev_truth, &t.thresholds),
        dev_macro_f1_at05: f1(dev, dev_truth, &at(0.5)),
        test_macro_f1_tuned: metrics::round6(tuned.macro_.f1),
        test_macro_f1_at05: f1(test, test_truth, &at(0.5)),
        test_macro_f1_at03: f1(test, test_truth, &at(0.3)),
        test_micro_f1_tuned: metrics::round6(tuned.micro.f1),
        teacher_test_macro_f1_tuned: alone,
        thresholds: t.thresholds,
    }
}
