//! `goemo status`: each stage fresh or stale and why, and where external inputs live.

use std::process::ExitCode;

use goemo_engine::engine::Engine;
use goemo_engine::pipeline::{self, Pipeline};

use super::args::StatusArgs;

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let p = super::load(&args.pipeline, &args.set)?;
    let engine = Engine::new(&p, true)?;
    let rows = engine.status()?;
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    for (name, fresh, why) in &rows {
        let external = external_inputs(&p, name);
        if *fresh {
            println!("{name:<width$}  fresh{external}");
        } else {
            println!("{name:<width$}  stale: {why}{external}");
        }
    }
    engine.hasher.save();
    Ok(ExitCode::SUCCESS)
}

/// Inputs outside the project folder: a clone elsewhere must provide them too.
fn external_inputs(p: &Pipeline, name: &str) -> String {
    let Some(def) = p.get(name) else {
        return String::new();
    };
    def.inputs
        .iter()
        .filter_map(|(role, path)| {
            pipeline::external_location(&p.root, path)
                .map(|abs| format!("  (external {role}: {})", abs.display()))
        })
        .collect()
}
