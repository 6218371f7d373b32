//! `goemo exp`: experiments and sweeps that keep the baseline (run), and what to do with them
//! afterwards (show, diff, apply, remove). The engine runs and records them
//! (`goemo_engine::experiment`); this module parses the flags and prints.

mod apply;
mod show;
mod sync;

use std::process::ExitCode;

use goemo_engine::engine::Outcome;
use goemo_engine::error::{ConfigError, Interrupted};
use goemo_engine::experiment::{self, ExpContext, Status};
use goemo_engine::sweep::{self, SweepSpec};

use super::args::{ExpCommand, ExpRunArgs, RemoteMode};
use super::shell::Shell;

pub fn dispatch(cmd: ExpCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ExpCommand::Run(args) => run(args),
        ExpCommand::Show(args) => show::show(args),
        ExpCommand::Diff(args) => show::diff(args),
        ExpCommand::Apply(args) => apply::apply(args),
        ExpCommand::Remove(args) => apply::remove(args),
        ExpCommand::Push(args) => sync::push(args),
        ExpCommand::Pull(args) => sync::pull(args),
    }
}

/// `--shard I/N`, else Slurm's array task id and count; `None`: every member.
fn shard(
    flag: Option<&str>,
    file: &std::path::Path,
) -> Result<Option<(usize, usize)>, ConfigError> {
    let (text, origin) = match flag {
        Some(t) => (t.to_owned(), "--shard"),
        None => match (
            std::env::var("SLURM_ARRAY_TASK_ID"),
            std::env::var("SLURM_ARRAY_TASK_COUNT"),
        ) {
            (Ok(id), Ok(count)) => {
                // Array ids need not start at 0 (`--array=1-4`): count from the first.
                let min: usize = std::env::var("SLURM_ARRAY_TASK_MIN")
                    .ok()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0);
                let id: usize = id.parse().unwrap_or(usize::MAX);
                (
                    format!("{}/{count}", id.saturating_sub(min)),
                    "SLURM_ARRAY_TASK_ID/COUNT",
                )
            }
            _ => return Ok(None),
        },
    };
    let bad = |why: &str| {
        ConfigError::new(file, format!("{origin} {text}: {why}")).hint(
            "give the worker's index and the number of workers, e.g. --shard 0/4 … --shard 3/4",
        )
    };
    let (i, n) = text.split_once('/').ok_or_else(|| bad("expected I/N"))?;
    let (i, n): (usize, usize) = match (i.trim().parse(), n.trim().parse()) {
        (Ok(i), Ok(n)) => (i, n),
        _ => return Err(bad("I and N must be whole numbers")),
    };
    if n == 0 || i >= n {
        return Err(bad("I must be below N, and N above 0"));
    }
    Ok(Some((i, n)))
}

/// The sweep the flags (and `--sweep FILE`) describe, and its name if one was given.
fn spec(args: &ExpRunArgs) -> Result<(Option<String>, SweepSpec), ConfigError> {
    let file = &args.pipeline.pipeline;
    let flags = sweep::from_flags(&args.set, args.random, args.seed, file)?;
    let Some(path) = &args.sweep else {
        return Ok((args.name.clone(), flags));
    };
    let (name, mut spec) = sweep::from_file(path)?;
    spec.params.extend(flags.params);
    if let Some(r) = flags.random {
        spec.random = Some(r);
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(p) = spec.params.iter().find(|p| !seen.insert(p.name.clone())) {
        return Err(ConfigError::new(
            path,
            format!("{} is set both in the sweep file and by --set", p.name),
        ));
    }
    Ok((args.name.clone().or(name), spec))
}

fn run(args: ExpRunArgs) -> anyhow::Result<ExitCode> {
    let file = args.pipeline.pipeline.clone();
    let (name, spec) = spec(&args)?;
    let members = spec.expand(&file)?;
    let is_sweep = spec.is_sweep();
    let (sweep_name, named): (Option<String>, Vec<_>) = if is_sweep {
        let prefix = name.unwrap_or_else(|| sweep::default_name("sweep", &spec));
        experiment::check_name(&prefix, &file)?;
        let named = members
            .into_iter()
            .enumerate()
            .map(|(i, m)| (format!("{prefix}-{}", i + 1), m))
            .collect();
        (Some(prefix), named)
    } else {
        let one = name.unwrap_or_else(|| sweep::default_name("exp", &spec));
        (
            None,
            members.into_iter().map(|m| (one.clone(), m)).collect(),
        )
    };
    let registry = goemo_stages::registry();
    let mut planned = experiment::plan(&file, &registry, named)?;
    if let Some((index, count)) = shard(args.shard.as_deref(), &file)? {
        // Every member was checked above; this worker runs its share.
        planned = planned
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % count == index)
            .map(|(_, p)| p)
            .collect();
        eprintln!("shard {index}/{count}: {} member(s)", planned.len());
        if planned.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
    }
    if args.dry_run {
        for p in &planned {
            println!("{}  {}", p.name, p.member.set.join(" "));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let root = planned[0].pipeline.root.clone();
    // A remote that cannot be used fails before anything runs.
    let shared = super::run_remote::open(&planned[0].pipeline, args.remote)?
        .map(|(r, mode)| (super::run_remote::shared(r, mode), mode));
    experiment::clean_leftovers(&root);
    super::run::install_interrupt_handler()?;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if let Some(s) = &sweep_name {
        eprintln!(
            "sweep {s}: {} members, up to {} at once",
            planned.len(),
            jobs.min(planned.len())
        );
    }
    let ctx = ExpContext {
        pipeline_file: &file,
        registry: &registry,
        sweep: sweep_name,
        jobs,
        git_commit: experiment::git_commit(&root),
        shared: shared
            .as_ref()
            .map(|(s, _)| s as &dyn goemo_engine::shared::SharedCache),
    };
    // Each member's lines carry its name through a tracing span (`exp{name=lr-2}: …`).
    let results = experiment::run_all(&ctx, &planned, &|_| Box::new(Shell));
    if let Some((s, RemoteMode::ReadWrite)) = &shared {
        let remote = s.remote();
        let done: Vec<String> = results
            .iter()
            .filter(|r| {
                r.record
                    .as_ref()
                    .is_some_and(|rec| rec.status == Status::Done)
            })
            .map(|r| r.name.clone())
            .collect();
        let n = sync::push_names(&planned[0].pipeline, remote, &done)?;
        eprintln!(
            "pushed {n} experiment record(s) and their entries to {}",
            remote.url()
        );
    }
    print_results(&results)
}

/// One line per member: status, stages run, wall time; the exit code for the whole sweep.
fn print_results(results: &[experiment::MemberResult]) -> anyhow::Result<ExitCode> {
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(10);
    println!(
        "{:<width$}  {:<11}  {:>8}  stages",
        "experiment", "status", "wall"
    );
    let (mut failed, mut interrupted) = (0, false);
    for r in results {
        match (&r.report, &r.record) {
            (Ok(report), Some(rec)) => {
                let ran: Vec<&str> = report
                    .results
                    .iter()
                    .filter(|s| s.outcome == Outcome::Ran)
                    .map(|s| s.name.as_str())
                    .collect();
                let status = match rec.status {
                    Status::Done => "done",
                    Status::Failed => {
                        failed += 1;
                        "FAILED"
                    }
                    Status::Interrupted => {
                        interrupted = true;
                        "interrupted"
                    }
                };
                let stages = if ran.is_empty() {
                    "all from the cache".to_owned()
                } else {
                    format!("ran {}", ran.join(", "))
                };
                println!(
                    "{:<width$}  {status:<11}  {:>7.2}s  {stages}",
                    r.name, rec.wall_s
                );
            }
            (Err(e), _) => {
                failed += 1;
                println!(
                    "{:<width$}  {:<11}  {:>8}  {}",
                    r.name,
                    "FAILED",
                    "-",
                    goemo_engine::error::chain_text(e)
                );
            }
            (Ok(_), None) => {}
        }
    }
    if interrupted || goemo_engine::engine::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Interrupted.into());
    }
    if failed > 0 {
        eprintln!("error: {failed} experiment(s) failed (each error is shown above)");
        return Ok(ExitCode::FAILURE);
    }
    println!("compare them: goemo exp show");
    Ok(ExitCode::SUCCESS)
}
