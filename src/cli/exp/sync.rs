//! `goemo exp push` / `goemo exp pull`: experiment records (and, on push, their cache entries)
//! to and from the shared cache, so a sweep run by workers elsewhere is listed everywhere.

use std::process::ExitCode;

use goemo_engine::cache::Cache;
use goemo_engine::experiment::{self, LOCK_FILE, RECORD_FILE};
use goemo_engine::pipeline::Pipeline;
use goemo_remote::{Options, Outcome, Remote, Wanted};

use crate::cli::args::{ExpSyncArgs, RemoteMode};

fn remote(p: &Pipeline) -> anyhow::Result<Remote> {
    let (r, _) = crate::cli::run_remote::open(p, Some(RemoteMode::ReadWrite))?
        .ok_or_else(|| anyhow::anyhow!("no remote"))?;
    Ok(r)
}

/// Push experiments' entries, then their records (a listed record's entries are there).
pub fn push_names(p: &Pipeline, remote: &Remote, names: &[String]) -> anyhow::Result<usize> {
    let cache = Cache::new(p.root.join("cache"));
    for name in names {
        let record = experiment::read(&p.root, name)?;
        let wanted: Vec<Wanted> = record
            .stages
            .iter()
            .map(|s| Wanted {
                stage: s.name.clone(),
                key: s.key.clone(),
            })
            .collect();
        let report = goemo_remote::push(remote, &cache, &wanted, &Options::default(), &|_| {})?;
        if let Some(bad) = report
            .entries
            .iter()
            .find(|e| matches!(e.outcome, Outcome::Failed(_) | Outcome::Missing(_)))
        {
            anyhow::bail!("experiment {name}: stage {}'s entry could not be pushed ({:?}); its record is not pushed", bad.stage, bad.outcome);
        }
        let dir = experiment::dir(&p.root, name);
        let files = [LOCK_FILE, RECORD_FILE]
            .into_iter()
            .map(|f| Ok((f, std::fs::read(dir.join(f))?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        remote.put_record(name, &files)?;
    }
    Ok(names.len())
}

pub fn push(args: ExpSyncArgs) -> anyhow::Result<ExitCode> {
    let p = crate::cli::load(&args.pipeline, &[])?;
    let remote = remote(&p)?;
    let names = if args.names.is_empty() {
        experiment::list(&p.root)?
            .into_iter()
            .map(|r| r.name)
            .collect()
    } else {
        args.names
    };
    let n = push_names(&p, &remote, &names)?;
    println!(
        "pushed {n} experiment record(s) and their entries to {}",
        remote.url()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn pull(args: ExpSyncArgs) -> anyhow::Result<ExitCode> {
    let p = crate::cli::load(&args.pipeline, &[])?;
    let remote = remote(&p)?;
    let names = if args.names.is_empty() {
        remote.record_names()?
    } else {
        args.names
    };
    for name in &names {
        experiment::check_name(name, &p.file)?;
        let dir = experiment::dir(&p.root, name);
        std::fs::create_dir_all(&dir)?;
        // The lock first: a record is listed only once its lock is in place.
        for (file, bytes) in remote.get_record(name)?.into_iter().rev() {
            goemo_engine::cache::write_file_atomic(&dir.join(file), &bytes)?;
        }
    }
    println!(
        "pulled {} experiment record(s) from {}",
        names.len(),
        remote.url()
    );
    Ok(ExitCode::SUCCESS)
}
