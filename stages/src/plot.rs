//! `plot`: the charts people look at, as PNG and SVG: `f1_scores_barplot` (labels sorted by F1,
//! tuned thresholds beside 0.5), `training_curves` (loss per step, dev macro-F1 per epoch) and
//! `pr_curves` (precision–recall per label, with the tuned threshold marked).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::train::TrainLog;
use goemo_report::charts::{self, Curves, F1Bars, PrCurves};
use goemo_report::metrics;
use goemo_stage::{resolve_typed, InputSpec, Inputs, ParamError, Stage, StageContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Png,
    Svg,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlotParams {
    pub formats: Vec<Format>,
    /// Width of the bar plot in pixels (its height follows the number of labels).
    pub width: u32,
}

impl Default for PlotParams {
    fn default() -> Self {
        PlotParams {
            formats: vec![Format::Png, Format::Svg],
            width: 1000,
        }
    }
}

/// What the charts are drawn from: evaluate's metrics and scores, train's log.
pub struct ChartData {
    pub labels: Vec<String>,
    pub f1_tuned: Vec<f64>,
    pub f1_05: Vec<f64>,
    pub operating: Vec<(f64, f64, f32)>,
    pub pr: Vec<Vec<(f64, f64)>>,
    pub loss: Vec<(f64, f64)>,
    pub dev_f1: Vec<(f64, f64)>,
}

impl ChartData {
    pub fn read(evaluate_dir: &Path, train_dir: &Path) -> anyhow::Result<ChartData> {
        let m: Value = goemo_fsio::read_json(&evaluate_dir.join("metrics.json"))?;
        let labels: Vec<String> = serde_json::from_value(m["labels"].clone())?;
        let per = |policy: &str, l: &str, key: &str| {
            m["policies"][policy]["per_label"][l][key]
                .as_f64()
                .unwrap_or(0.0)
        };
        let f1_tuned = labels.iter().map(|l| per("tuned", l, "f1")).collect();
        let f1_05 = labels.iter().map(|l| per("0.5", l, "f1")).collect();
        let operating = labels
            .iter()
            .map(|l| {
                (
                    per("tuned", l, "recall"),
                    per("tuned", l, "precision"),
                    per("tuned", l, "threshold") as f32,
                )
            })
            .collect();
        let (scores, truth) = read_scores(&evaluate_dir.join("test_scores.safetensors"))?;
        let n = labels.len();
        let pr = (0..n)
            .map(|l| {
                metrics::pr_curve(&scores, &truth, n, l)
                    .into_iter()
                    .map(|(_, p, r)| (r, p))
                    .collect()
            })
            .collect();
        let log: TrainLog = goemo_fsio::read_json(&train_dir.join("train_log.json"))?;
        Ok(ChartData {
            labels,
            f1_tuned,
            f1_05,
            operating,
            pr,
            loss: log.steps.iter().map(|s| (s.step as f64, s.loss)).collect(),
            dev_f1: log
                .epochs
                .iter()
                .map(|e| (e.epoch as f64, e.dev_macro_f1))
                .collect(),
        })
    }

    pub fn bars(&self) -> F1Bars<'_> {
        F1Bars {
            labels: &self.labels,
            tuned: &self.f1_tuned,
            fixed: &self.f1_05,
            fixed_name: "0.5",
        }
    }
    pub fn curves(&self) -> Curves<'_> {
        Curves {
            loss: &self.loss,
            dev_f1: &self.dev_f1,
        }
    }
    pub fn pr_curves(&self) -> PrCurves<'_> {
        PrCurves {
            labels: &self.labels,
            curves: &self.pr,
            operating: &self.operating,
        }
    }
    pub fn bar_size(&self, width: u32) -> (u32, u32) {
        (width, 120 + 26 * self.labels.len() as u32)
    }
}

pub fn read_scores(path: &Path) -> anyhow::Result<(Vec<f32>, Vec<u8>)> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let scores = st
        .tensor("scores")?
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let truth = st.tensor("truth")?.data().to_vec();
    Ok((scores, truth))
}

pub const CURVES_SIZE: (u32, u32) = (1100, 420);
pub const PR_SIZE: (u32, u32) = (1400, 860);

pub struct PlotStage;

impl Stage for PlotStage {
    fn kind(&self) -> &'static str {
        "plot"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "F1 bar plot, training curves and precision-recall curves (PNG, SVG)"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage(
                "evaluate",
                "metrics and test scores from evaluate",
                &["evaluate"],
            ),
            InputSpec::stage("train", "train_log.json from train", &["train"]),
        ];
        Inputs::Fixed(SPECS)
    }
    fn resolve_params(&self, raw: &goemo_stage::RawParams) -> Result<serde_json::Value, ParamError> {
        let v = resolve_typed::<PlotParams>(raw)?;
        let w = v["width"].as_u64().unwrap_or(0);
        if !(400..=8000).contains(&w) {
            return Err(ParamError::new(
                "width",
                format!("width must be between 400 and 8000 pixels, got {w}"),
            ));
        }
        if v["formats"].as_array().is_some_and(|f| f.is_empty()) {
            return Err(ParamError::new(
                "formats",
                "formats is empty: give png, svg or both",
            ));
        }
        Ok(v)
    }

    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let p: PlotParams = ctx.params()?;
        let d = ChartData::read(ctx.input("evaluate")?, ctx.input("train")?)?;
        let out = ctx.out_dir;
        let bar_size = d.bar_size(p.width);
        for f in &p.formats {
            match f {
                Format::Png => {
                    charts::png(&out.join("f1_scores_barplot.png"), bar_size, |a| {
                        charts::f1_bars(a, &d.bars())
                    })?;
                    charts::png(&out.join("training_curves.png"), CURVES_SIZE, |a| {
                        charts::training_curves(a, &d.curves())
                    })?;
                    charts::png(&out.join("pr_curves.png"), PR_SIZE, |a| {
                        charts::pr_curves(a, &d.pr_curves())
                    })?;
                }
                Format::Svg => {
                    std::fs::write(
                        out.join("f1_scores_barplot.svg"),
                        charts::svg(bar_size, |a| charts::f1_bars(a, &d.bars()))?,
                    )?;
                    std::fs::write(
                        out.join("training_curves.svg"),
                        charts::svg(CURVES_SIZE, |a| charts::training_curves(a, &d.curves()))?,
                    )?;
                    std::fs::write(
                        out.join("pr_curves.svg"),
                        charts::svg(PR_SIZE, |a| charts::pr_curves(a, &d.pr_curves()))?,
                    )?;
                }
            }
        }
        Ok(())
    }
}
