//! `plot`: the charts people look at, as PNG and SVG, an adapter over
//! [`goemo_report::charts`] (which says what each chart shows).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::trainer::TrainLog;
use goemo_report::charts::ChartData;
use goemo_report::evaluation::{read_scores, MetricsFile, METRICS_FILE, SCORES_FILE};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

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

/// The chart data from an evaluate folder (metrics.json, test scores) and a train folder
/// (train_log.json); also what the report stage draws from.
pub fn read_chart_data(evaluate_dir: &Path, train_dir: &Path) -> anyhow::Result<ChartData> {
    let m: MetricsFile = goemo_fsio::read_json(&evaluate_dir.join(METRICS_FILE))?;
    let (scores, truth) = read_scores(&evaluate_dir.join(SCORES_FILE))?;
    let log: TrainLog = goemo_fsio::read_json(&train_dir.join("train_log.json"))?;
    let loss = log.steps.iter().map(|s| (s.step as f64, s.loss)).collect();
    let dev_f1 = log
        .epochs
        .iter()
        .map(|e| (e.epoch as f64, e.dev_macro_f1))
        .collect();
    Ok(ChartData::new(&m, (&scores, &truth), loss, dev_f1)?)
}

pub struct PlotStage;

impl TypedStage for PlotStage {
    type Params = PlotParams;

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
            InputSpec::stage(
                "train",
                "train_log.json from train (or distill)",
                &["train", "distill"],
            ),
        ];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, p: &PlotParams) -> Result<(), ParamError> {
        let w = p.width;
        if !(400..=8000).contains(&w) {
            return Err(ParamError::new(
                "width",
                format!("width must be between 400 and 8000 pixels, got {w}"),
            ));
        }
        if p.formats.is_empty() {
            return Err(ParamError::new(
                "formats",
                "formats is empty: give png, svg or both",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>, p: PlotParams) -> anyhow::Result<()> {
        let d = read_chart_data(ctx.input("evaluate")?, ctx.input("train")?)?;
        for f in &p.formats {
            match f {
                Format::Png => d.write_png(ctx.out_dir, p.width)?,
                Format::Svg => d.write_svg(ctx.out_dir, p.width)?,
            }
        }
        Ok(())
    }
}
