//! `goemo gc`: remove cache entries that neither pipeline.lock nor any experiment references.

use std::collections::HashSet;
use std::process::ExitCode;

use goemo_engine::engine::Engine;
use goemo_engine::entrylock::GcLock;
use goemo_engine::experiment;

use super::args::GcArgs;
use super::shell::human_bytes;

pub fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    let p = super::load(&args.pipeline, &[])?;
    let engine = Engine::new(&p, true)?;
    // Exclusive: runs (and experiments) hold it shared, so none is about to take an entry.
    let _gc = if args.dry_run {
        None
    } else {
        Some(GcLock::for_gc(&engine.cache.root, &|| {
            eprintln!("waiting for running goemo runs in this project to finish…")
        })?)
    };
    let mut keep: HashSet<String> = engine.lock.stages.iter().map(|s| s.key.clone()).collect();
    let from_lock = keep.len();
    let records = experiment::list(&p.root)?;
    for r in &records {
        keep.extend(r.keys().map(str::to_owned));
    }
    let kept_by = format!(
        "{} referenced by pipeline.lock ({from_lock}) and {} experiment(s)",
        keep.len(),
        records.len()
    );
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
            "would remove {} cache entries ({}); would keep {kept_by}",
            doomed.len(),
            human_bytes(bytes)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (removed, bytes) = engine.cache.gc(&keep)?;
    println!(
        "removed {removed} cache entries, freed {}; kept {kept_by}",
        human_bytes(bytes)
    );
    Ok(ExitCode::SUCCESS)
}
