//! `goemo exp apply` (an experiment becomes the baseline) and `goemo exp remove`.

use std::process::ExitCode;

use anyhow::Context;
use goemo_engine::engine::{Engine, RunOptions};
use goemo_engine::error::ConfigError;
use goemo_engine::experiment::{self, Status};
use goemo_engine::lockfile::LockFile;

use crate::cli::args::{ExpApplyArgs, ExpRemoveArgs};
use crate::cli::shell::{print_summary, Shell};

/// Write the experiment's params into pipeline.yaml (comments and layout kept), then run the
/// baseline, which takes every stage from the cache: outputs/ and pipeline.lock become the
/// experiment's. pipeline.yaml is written only after the edit is checked against the
/// experiment's own lock.
pub fn apply(args: ExpApplyArgs) -> anyhow::Result<ExitCode> {
    let file = &args.pipeline.pipeline;
    let registry = goemo_stages::registry();
    let current = crate::cli::load(&args.pipeline, &[])?;
    let root = current.root.clone();
    let record = experiment::read(&root, &args.name)?;
    if record.status != Status::Done {
        return Err(ConfigError::new(
            file,
            format!(
                "experiment {} did not finish ({:?}); only a finished one can become the baseline",
                record.name, record.status
            ),
        )
        .hint(format!("rerun it: goemo exp run --name {} …", record.name))
        .into());
    }
    let _lock = goemo_engine::runlock::acquire(&root.join("cache"), true, &|l| eprintln!("{l}"))?;
    let mut text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    for set in &record.set {
        let o = goemo_engine::pipeline::Override::parse(set, file)?;
        let value = set
            .split_once('=')
            .map(|(_, v)| v.trim())
            .unwrap_or_default();
        text = goemo_engine::edit::set_param(&text, &o.stage, &o.path, value)
            .map_err(|e| ConfigError::new(file, format!("exp apply {}: {e}", record.name)))?;
    }
    let edited = goemo_engine::pipeline::load_text(&text, file, &registry)?;
    let exp_lock =
        LockFile::read(&experiment::dir(&root, &record.name).join(experiment::LOCK_FILE))?;
    for s in &exp_lock.stages {
        let same = edited.get(&s.name).is_some_and(|d| d.params == s.params);
        if !same {
            return Err(ConfigError::new(
                file,
                format!("exp apply {}: after the edit, stage {}'s params still differ from the experiment's; pipeline.yaml changed since it ran?", record.name, s.name),
            )
            .hint(format!("compare with `goemo exp diff {}`, or edit pipeline.yaml by hand", record.name))
            .into());
        }
    }
    goemo_engine::cache::write_file_atomic(file, text.as_bytes())?;
    let engine = Engine::new(&edited, true)?;
    let report = engine.run(
        &RunOptions {
            jobs: 1,
            ..RunOptions::default()
        },
        &Shell,
    )?;
    print_summary(&report.results);
    println!(
        "experiment {} is the baseline now: {} param(s) written into {}, pipeline.lock and outputs/ are its results",
        record.name,
        record.set.len(),
        file.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn remove(args: ExpRemoveArgs) -> anyhow::Result<ExitCode> {
    let p = crate::cli::load(&args.pipeline, &[])?;
    let mut names = args.names.clone();
    if let Some(s) = &args.sweep {
        names.extend(
            experiment::list(&p.root)?
                .into_iter()
                .filter(|r| r.sweep.as_deref() == Some(s.as_str()))
                .map(|r| r.name),
        );
    }
    if names.is_empty() {
        return Err(
            ConfigError::new(&args.pipeline.pipeline, "exp remove: no experiment named")
                .hint("give names (goemo exp show lists them) or --sweep NAME")
                .into(),
        );
    }
    for n in &names {
        experiment::read(&p.root, n)?;
    }
    for n in &names {
        experiment::remove(&p.root, n)?;
    }
    println!(
        "removed {} experiment(s); `goemo gc` frees the cache entries no one else references",
        names.len()
    );
    Ok(ExitCode::SUCCESS)
}
