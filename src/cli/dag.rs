//! `goemo dag`: the pipeline drawn as text, Graphviz dot or Mermaid.

use std::process::ExitCode;

use super::args::{DagArgs, DagFormat};

pub fn dag(args: DagArgs) -> anyhow::Result<ExitCode> {
    let p = super::load(&args.pipeline, &[])?;
    let text = match args.format {
        DagFormat::Text => goemo_engine::render::text(&p),
        DagFormat::Dot => goemo_engine::render::dot(&p),
        DagFormat::Mermaid => goemo_engine::render::mermaid(&p),
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
