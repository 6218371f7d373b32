//! The `load` stage: an adapter over [`goemo_data::load`].

use std::path::Path;

use goemo_data::load::{load_official, load_raw, write_outputs, LoadParams, Source};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

pub struct LoadStage;

impl TypedStage for LoadStage {
    type Params = LoadParams;

    fn kind(&self) -> &'static str {
        "load"
    }
    fn version(&self) -> u32 {
        // 2: files are named relative to the data folder in out/ (they were project-relative,
        // or absolute for data outside the project, so the bytes depended on where it lay).
        2
    }
    fn summary(&self) -> &'static str {
        "read GoEmotions (official splits or raw rater files) into dataset.arrow + summary.json"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[InputSpec::path("data", "the GoEmotions folder")];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, p: &LoadParams) -> Result<(), ParamError> {
        let sum: f64 = p.split_fractions.iter().sum();
        if p.split_fractions.iter().any(|f| !(0.0..=1.0).contains(f)) || (sum - 1.0).abs() > 1e-9 {
            return Err(ParamError::new(
                "split_fractions",
                format!(
                    "split_fractions must be three shares in [0, 1] adding up to 1, got {:?}",
                    p.split_fractions
                ),
            ));
        }
        if p.min_agreement == 0 {
            return Err(ParamError::new(
                "min_agreement",
                "min_agreement must be at least 1",
            ));
        }
        if p.source == Source::Raw && p.raw_files.is_empty() {
            return Err(ParamError::new(
                "raw_files",
                "raw_files is empty: name at least one goemotions_N.csv",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>, params: LoadParams) -> anyhow::Result<()> {
        let dir = ctx.input("data")?;
        let shown = |p: &Path| {
            p.strip_prefix(ctx.project_dir)
                .unwrap_or(p)
                .display()
                .to_string()
        };
        let loaded = match params.source {
            Source::Official => load_official(dir, &shown)?,
            Source::Raw => load_raw(dir, &params, &shown)?,
        };
        let data_prefix = format!("{}/", shown(dir));
        let recorded = |file: &str| file.strip_prefix(&data_prefix).unwrap_or(file).to_owned();
        write_outputs(ctx.out_dir, &params, loaded, &recorded)
    }
}
