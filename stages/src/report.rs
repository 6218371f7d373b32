//! `report`: what a person reads at the end, an adapter over [`goemo_report`].
//!
//! Results (content-hashed, in `out/`):
//! - `emotion_classification_report.csv` at the tuned thresholds (and `…_at_0.5.csv`,
//!   `…_at_0.3.csv`): label, precision, recall, f1, support, threshold, then the micro, macro,
//!   weighted and samples averages, like scikit-learn's classification report;
//! - `overall_metrics.json`: flat Trainer-style keys (`eval_macro_f1`, …, `_at_0.5`, `_at_0.3`
//!   variants) beside the nested per-policy, per-label blocks.
//!
//! The human report (in `volatile/`, because it shows wall times): `report.html`, one
//! self-contained page with the charts inlined as SVG, and `report.md` for terminals and CI logs.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use goemo_data::data::Split;
use goemo_data::summary::{read_summary, DatasetSummary};
use goemo_data::tokens::TokensMeta;
use goemo_report::evaluation::{classification_csv, overall_metrics, MetricsFile, METRICS_FILE};
use goemo_report::page::{
    BackboneConfig, DatasetFacts, Page, RunStage, SplitFacts, TokenFacts, TrainMetrics,
};
use goemo_stage::{InputSpec, Inputs, StageContext, StageRecord, TypedStage};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    /// A title for the report page.
    pub title: Option<String>,
}

pub use goemo_report::page::PAPER_MACRO_F1;

pub struct ReportStage;

impl TypedStage for ReportStage {
    type Params = ReportParams;

    fn kind(&self) -> &'static str {
        "report"
    }
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "classification report CSV, overall_metrics.json, and an HTML + Markdown report"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage("evaluate", "metrics from evaluate", &["evaluate"]),
            InputSpec::stage(
                "train",
                "the model and training log from train (or distill)",
                &["train", "distill"],
            ),
            InputSpec::stage("tokens", "token statistics from tokenize", &["tokenize"]),
            InputSpec::stage(
                "dataset",
                "the data summary from sample or load",
                &["sample", "load"],
            )
            .optional(),
        ];
        Inputs::Fixed(SPECS)
    }

    fn run(&self, ctx: &StageContext<'_>, p: ReportParams) -> anyhow::Result<()> {
        let eval_dir = ctx.input("evaluate")?;
        let train_dir = ctx.input("train")?;
        let m: MetricsFile = goemo_fsio::read_json(&eval_dir.join(METRICS_FILE))?;
        for (policy, suffix) in [("tuned", ""), ("0.5", "_at_0.5"), ("0.3", "_at_0.3")] {
            let path = ctx
                .out_dir
                .join(format!("emotion_classification_report{suffix}.csv"));
            std::fs::write(&path, classification_csv(&m, policy)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        goemo_fsio::write_json(
            &ctx.out_dir.join("overall_metrics.json"),
            &overall_metrics(&m),
        )?;

        let charts = crate::plot::read_chart_data(eval_dir, train_dir)?;
        let tokens: TokensMeta =
            goemo_fsio::read_json(&ctx.input("tokens")?.join(goemo_data::tokens::META_FILE))?;
        let dataset = match ctx.optional_input("dataset") {
            Some(dir) => Some(dataset_facts(&read_summary(dir)?)),
            None => None,
        };
        let train = match ctx.upstream_volatile.get("train") {
            Some(dir) => optional_json::<TrainMetrics>(&dir.join("train_metrics.json"))?,
            None => None,
        };
        let backbone = optional_json::<BackboneConfig>(&train_dir.join("model/config.json"))?
            .unwrap_or_default();
        let run = ctx
            .run_record
            .stages
            .iter()
            .map(run_stage)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let l = &tokens.lengths;
        let title = p
            .title
            .unwrap_or_else(|| "goemo: GoEmotions emotion classification".into());
        let page = Page {
            title: &title,
            metrics: &m,
            charts: &charts,
            dataset: dataset.as_ref(),
            tokens: &TokenFacts {
                mean: l.mean,
                p50: l.p50,
                p95: l.p95,
                p99: l.p99,
                max: l.max,
                truncated: l.truncated,
                max_len: tokens.max_len,
            },
            train: train.as_ref(),
            backbone: &backbone,
            run: &run,
        };
        std::fs::write(ctx.volatile_dir.join("report.html"), page.html()?)?;
        std::fs::write(ctx.volatile_dir.join("report.md"), page.markdown()?)?;
        Ok(())
    }
}

/// A JSON file that may be absent (an older or a hand-made upstream folder); one that is there
/// must parse.
fn optional_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(goemo_fsio::read_json(path)?))
}

fn dataset_facts(s: &DatasetSummary) -> DatasetFacts {
    DatasetFacts {
        splits: Split::ALL
            .iter()
            .map(|&split| SplitFacts {
                name: split.name(),
                rows: s.rows_kept(split),
                multi_label_share: s.splits.get(split).multi_label_share,
            })
            .collect(),
        labels: s.labels.len(),
        taxonomy: s.taxonomy.name(),
        rejected: s.rejected.total,
        sample_fraction: s.sample.as_ref().map(|x| x.fraction),
    }
}

fn run_stage(s: &StageRecord) -> anyhow::Result<RunStage> {
    Ok(RunStage {
        name: s.name.clone(),
        kind: s.kind.clone(),
        key: s.key.get(..12).unwrap_or(&s.key).to_owned(),
        wall_s: s.wall_s,
        params: serde_json::to_string(&s.params)?,
    })
}
