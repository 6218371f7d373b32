//! `goemo run`: take the run lock, install the interrupt handler, run, print the closing table.

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::Context;
use goemo_engine::engine::{Engine, Outcome, RunOptions, INTERRUPTED};
use goemo_engine::error::{Interrupted, LockDrift};

use super::args::RunArgs;
use super::shell::{print_summary, Shell};

pub fn run(args: RunArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let p = super::load(&args.pipeline, &args.set)?;
    // Take the run lock before reading pipeline.lock, which the holder may be rewriting.
    let _lock = if args.dry_run {
        None
    } else {
        Some(goemo_engine::runlock::acquire(
            &p.root.join("cache"),
            !args.no_wait,
            &|line| eprintln!("{line}"),
        )?)
    };
    let remote = if args.dry_run {
        None
    } else {
        super::run_remote::open(&p, args.remote)?
    };
    let shared = remote.map(|(r, mode)| (super::run_remote::shared(r, mode), mode));
    let mut engine = Engine::new(&p, !args.verify)?;
    if let Some((s, _)) = &shared {
        engine.shared = Some(s);
    }
    install_interrupt_handler()?;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = RunOptions {
        from: args.from,
        until: args.until,
        only: args.only,
        force: args.force,
        dry_run: args.dry_run,
        jobs,
        verify: args.verify,
        locked: args.locked,
    };
    let report = engine.run(&opts, &Shell)?;
    if report.interrupted {
        print_summary(&report.results);
        return Err(Interrupted.into());
    }
    if !report.drift.is_empty() {
        print_summary(&report.results);
        return Err(LockDrift(report.drift).into());
    }
    if !opts.dry_run && !quiet {
        print_summary(&report.results);
    }
    if let Some((s, super::args::RemoteMode::ReadWrite)) = &shared {
        super::run_remote::push_done(&p, s.remote(), &report)?;
        let unshared = s.unshared();
        if !unshared.is_empty() {
            eprintln!(
                "error: built here but not shared with {}:\n  {}",
                s.remote().url(),
                unshared.join("\n  ")
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    let failed: Vec<&str> = report
        .results
        .iter()
        .filter(|r| r.outcome == Outcome::Failed)
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        // Each stage's error was logged when it failed; printing it again here doubled it.
        eprintln!(
            "error: stage(s) failed: {} (each error is shown above, where it happened)",
            failed.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    if opts.locked {
        println!("pipeline.lock reproduced: every key and output hash matches");
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C, SIGTERM and SIGHUP (ctrlc's `termination` feature) ask running stages to stop; the
/// run then exits 130 with nothing half-written. A second signal leaves at once.
pub(super) fn install_interrupt_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // Second signal: leave now, taking the commands' process groups along; temp
            // folders are cleaned by the next run.
            goemo_stage::process::kill_running_groups();
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping running stages (Ctrl-C again to quit at once)…");
    })
    .context("installing the Ctrl-C handler")
}
