//! `goemo plots diff`: several runs' per-label F1 in one chart, and their training curves
//! overlaid, from the cache entries their records name.

use std::path::PathBuf;
use std::process::ExitCode;

use goemo_engine::engine::Engine;
use goemo_engine::experiment::{self, BASELINE};
use goemo_report::compare::{write_compare, RunSeries};

use super::args::{PlotsCommand, PlotsDiffArgs};

pub fn dispatch(cmd: PlotsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PlotsCommand::Diff(args) => diff(args),
    }
}

/// The `out` folders of the run's `evaluate` and `train` entries (found by stage kind).
fn entries(engine: &Engine<'_>, run: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let keys: Vec<(String, String)> = if run == BASELINE {
        engine
            .lock
            .stages
            .iter()
            .map(|s| (s.kind.clone(), s.key.clone()))
            .collect()
    } else {
        let r = experiment::read(&engine.pipeline.root, run)?;
        r.stages
            .iter()
            .map(|s| (s.kind.clone(), s.key.clone()))
            .collect()
    };
    let out = |kind: &str| {
        keys.iter()
            .find(|(k, _)| k == kind)
            .map(|(_, key)| engine.cache.entry_dir(key).join("out"))
            .filter(|d| d.is_dir())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{run}: no cached `{kind}` result; run it again (goemo exp run / goemo run)"
                )
            })
    };
    Ok((out("evaluate")?, out("train")?))
}

pub fn diff(args: PlotsDiffArgs) -> anyhow::Result<ExitCode> {
    let p = super::load(&args.pipeline, &[])?;
    let engine = Engine::new(&p, true)?;
    let mut runs = Vec::new();
    for name in &args.runs {
        let (eval, train) = entries(&engine, name)?;
        runs.push(RunSeries::from_files(
            name.clone(),
            &eval.join("metrics.json"),
            &train.join("train_log.json"),
            &args.policy,
        )?);
    }
    let dir = args
        .out
        .unwrap_or_else(|| p.root.join(experiment::DIR).join("_compare"));
    std::fs::create_dir_all(&dir)?;
    let stem = args.runs.join("-vs-");
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    for path in write_compare(&dir, &stem, &runs)? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
