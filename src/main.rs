//! The `goemo` binary: parse the command line, run one command (each in `cli/`), and turn its
//! error into a message and an exit code. Also home of the process-wide settings (allocator
//! tuning, logging).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use goemo_engine::error::{ConfigError, Interrupted, LockDrift};

fn main() -> ExitCode {
    goemo_stages::runtime::tune_allocator();
    let cli = cli::Cli::parse();
    cli::shell::init_logging(cli.verbose, cli.quiet);
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => exit_code(&e),
    }
}

/// Print `e` and map it to goemo's exit codes: 2 config, 3 --locked drift, 130 interrupted,
/// 1 anything else.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if let Some(c) = e.downcast_ref::<ConfigError>() {
        eprintln!("error: {c}");
        ExitCode::from(2)
    } else if let Some(d) = e.downcast_ref::<LockDrift>() {
        eprintln!("error: {d}");
        ExitCode::from(3)
    } else if e.downcast_ref::<Interrupted>().is_some() {
        eprintln!("{e}");
        ExitCode::from(130)
    } else {
        eprintln!("error: {}", goemo_engine::error::chain_text(e));
        ExitCode::FAILURE
    }
}
