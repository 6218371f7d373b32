//! One module per command; `dispatch` picks it. Each returns the exit code for a normal end and
//! an error (mapped to an exit code in `main`) otherwise.

mod args;
mod dag;
mod exp;
mod gc;
mod plots;
mod predict;
mod remote;
mod run;
mod run_remote;
pub mod shell;
mod status;

use std::process::ExitCode;

pub use args::Cli;
use args::{Command, PipelineArg};
use goemo_engine::pipeline::{self, Override};

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args, cli.quiet),
        Command::Status(args) => status::status(args),
        Command::Dag(args) => dag::dag(args),
        Command::Exp(cmd) => exp::dispatch(cmd),
        Command::Plots(cmd) => plots::dispatch(cmd),
        Command::Gc(args) => gc::gc(args),
        Command::Predict(args) => predict::predict(args),
        Command::FetchData(args) => {
            goemo_data::fetch::fetch(&args.dest, args.mirror.as_deref(), &mut |line| {
                eprintln!("{line}")
            })?;
            println!("GoEmotions is in {} (sha256 verified)", args.dest.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Push(args) => remote::push(args),
        Command::Pull(args) => remote::pull(args),
        Command::Kinds => {
            for s in goemo_stages::registry().iter() {
                println!("{:<12} v{}  {}", s.kind(), s.version(), s.summary());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// pipeline.yaml with `--set` overrides applied, against the stages this binary knows.
fn load(pipeline: &PipelineArg, set: &[String]) -> anyhow::Result<pipeline::Pipeline> {
    let overrides = set
        .iter()
        .map(|s| Override::parse(s, &pipeline.pipeline))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pipeline::load(
        &pipeline.pipeline,
        &overrides,
        &goemo_stages::registry(),
    )?)
}
