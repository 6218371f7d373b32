//! The `sample` stage: an adapter over [`goemo_data::sample`].

use goemo_data::data;
use goemo_data::sample::{sample, SampleParams};
use goemo_data::summary::{read_summary, write_summary, SampleSummary};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

pub struct SampleStage;

impl TypedStage for SampleStage {
    type Params = SampleParams;

    fn kind(&self) -> &'static str {
        "sample"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "seeded (optionally label-stratified) fraction of each split"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[InputSpec::stage(
            "dataset",
            "the dataset from load",
            &["load"],
        )];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, params: &SampleParams) -> Result<(), ParamError> {
        let f = params.fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(ParamError::new(
                "fraction",
                format!("fraction must be in (0, 1], got {f}"),
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>, params: SampleParams) -> anyhow::Result<()> {
        let input = ctx.input("dataset")?;
        let (labels, rows) = data::read_dataset(input)?;
        let sampled = sample(&rows, labels.len(), &params);
        data::write_dataset(ctx.out_dir, &labels, &sampled)?;
        let before = data::summarize(&labels, &rows);
        let mut summary = read_summary(input)?;
        // Downstream reads one summary: the load counts, with the sample's on top.
        summary.sample = Some(SampleSummary {
            fraction: params.fraction,
            rows_before: before.map(|s| s.rows),
            seed: params.seed,
            splits_after: data::summarize(&labels, &sampled),
            stratify: params.stratify,
        });
        write_summary(ctx.out_dir, &summary)?;
        tracing::info!(
            "sample: kept {} of {} rows (fraction {})",
            sampled.len(),
            rows.len(),
            params.fraction
        );
        Ok(())
    }
}
