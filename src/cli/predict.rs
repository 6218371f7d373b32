//! `goemo predict`: classify texts from arguments, a file or stdin; one JSON line per text.

use std::process::ExitCode;

use anyhow::Context;
use goemo_engine::error::ConfigError;
use goemo_stages::predict::{parse_texts, predict as classify, InputText, PredictOptions};

use super::args::PredictArgs;

pub fn predict(args: PredictArgs) -> anyhow::Result<ExitCode> {
    if args.top_k == Some(0) {
        return Err(ConfigError::new("--top-k", "--top-k must be at least 1").into());
    }
    let inputs = read_inputs(&args)?;
    let opts = PredictOptions {
        model: args.model,
        thresholds: args.thresholds,
        threshold: args.threshold,
        top_k: args.top_k,
        batch_size: args.batch_size,
        precision: args.precision.as_deref().map(|p| match p {
            "int8" => goemo_report::precision::Precision::Int8,
            _ => goemo_report::precision::Precision::F32,
        }),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let s = classify(&inputs, &opts, &mut out)?;
    std::io::Write::flush(&mut out)?;
    if args.stats {
        eprintln!(
            "predicted {} texts in {:.3}s ({:.1} texts/s); {} truncated",
            s.texts,
            s.seconds,
            s.texts as f64 / s.seconds.max(1e-9),
            s.truncated
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--file`, else the arguments, else stdin.
fn read_inputs(args: &PredictArgs) -> anyhow::Result<Vec<InputText>> {
    if let Some(path) = &args.file {
        let bytes =
            std::fs::read(path).map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
        let jsonl = path.extension().map(|e| e == "jsonl" || e == "ndjson");
        return parse_texts(&bytes, &path.display().to_string(), jsonl.filter(|j| *j));
    }
    if !args.texts.is_empty() {
        return Ok(args
            .texts
            .iter()
            .enumerate()
            .map(|(i, text)| InputText {
                origin: format!("argument {}", i + 1),
                text: text.clone(),
            })
            .collect());
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("reading stdin")?;
    parse_texts(&bytes, "stdin", None)
}
