//! `goemo gc`: remove cache entries pipeline.lock does not reference.

use std::collections::HashSet;
use std::process::ExitCode;

use goemo_engine::engine::Engine;

use super::args::GcArgs;
use super::shell::human_bytes;

pub fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    let p = super::load(&args.pipeline, &[])?;
    let engine = Engine::new(&p, true)?;
    let keep: HashSet<String> = engine.lock.stages.iter().map(|s| s.key.clone()).collect();
    if args.dry_run {
        let doomed: Vec<String> = engine
            .cache
            .keys()
            .into_iter()
            .filter(|k| !keep.contains(k))
            .collect();
        let bytes: u64 = doomed
            .iter()
            .map(|k| goemo_engine::cache::dir_size(&engine.cache.entry_dir(k)))
            .sum();
        println!(
            "would remove {} cache entries ({})",
            doomed.len(),
            human_bytes(bytes)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let _lock =
        goemo_engine::runlock::acquire(&engine.cache.root, true, &|line| eprintln!("{line}"))?;
    let (removed, bytes) = engine.cache.gc(&keep)?;
    println!(
        "removed {removed} cache entries, freed {}; kept {} referenced by pipeline.lock",
        human_bytes(bytes),
        keep.len()
    );
    Ok(ExitCode::SUCCESS)
}
