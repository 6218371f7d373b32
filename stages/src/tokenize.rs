//! The `tokenize` stage: an adapter over [`goemo_data::tokenize`].

use goemo_data::data;
use goemo_data::tokenize::{build, TokenizeParams};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

pub struct TokenizeStage;

impl TypedStage for TokenizeStage {
    type Params = TokenizeParams;

    fn kind(&self) -> &'static str {
        "tokenize"
    }
    fn version(&self) -> u32 {
        // 2: meta.json's rows_per_split in sorted order (it was in HashMap order).
        2
    }
    fn summary(&self) -> &'static str {
        "tokenize every row with the backbone's tokenizer (parallel), unpadded, with multi-hot labels"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage("dataset", "rows from sample or load", &["sample", "load"]),
            InputSpec::path(
                "model",
                "the backbone folder holding tokenizer.json or vocab.txt",
            ),
        ];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, params: &TokenizeParams) -> Result<(), ParamError> {
        let m = params.max_len;
        if !(3..=8192).contains(&m) {
            return Err(ParamError::new(
                "max_len",
                format!("max_len must be between 3 and 8192 tokens, got {m}"),
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>, params: TokenizeParams) -> anyhow::Result<()> {
        let (labels, rows) = data::read_dataset(ctx.input("dataset")?)?;
        let model = ctx.input("model")?;
        let started = std::time::Instant::now();
        let data = build(&rows, labels, model, params.max_len)?;
        let secs = started.elapsed().as_secs_f64();
        data.write(ctx.out_dir)?;
        let tokens = data.ids.len();
        goemo_fsio::write_json(
            &ctx.volatile_dir.join("tokenize_timing.json"),
            &serde_json::json!({"texts": rows.len(), "tokens": tokens, "seconds": secs, "texts_per_s": rows.len() as f64 / secs, "threads": rayon::current_num_threads()}),
        )?;
        tracing::info!(
            "tokenize: {} texts, {} tokens in {:.2}s ({:.0} texts/s); lengths mean {:.1}, p95 {}, max {}, {} truncated at {}",
            rows.len(), tokens, secs, rows.len() as f64 / secs, data.meta.lengths.mean, data.meta.lengths.p95, data.meta.lengths.max, data.meta.lengths.truncated, params.max_len
        );
        Ok(())
    }
}
