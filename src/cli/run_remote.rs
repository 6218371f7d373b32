//! `goemo run --remote read|read-write`: before the run, pull from the shared cache the entries
//! the run needs and lacks (layer by layer: a pulled entry's outputs give its downstream keys);
//! after it, push what the run built (read-write). The engine itself never talks to a remote.

use std::collections::HashSet;

use goemo_engine::cache::Cache;
use goemo_engine::engine::{Engine, RunReport};
use goemo_engine::error::ConfigError;
use goemo_engine::pipeline::Pipeline;
use goemo_remote::{Options, Outcome, Progress, Remote, RemoteError, Wanted};

use super::args::RemoteMode;

/// The remote this run uses, if any. An explicit `--remote read|read-write` with no usable
/// remote is a configuration error; the default only uses one that is configured.
pub fn open(
    p: &Pipeline,
    mode: Option<RemoteMode>,
) -> anyhow::Result<Option<(Remote, RemoteMode)>> {
    if mode == Some(RemoteMode::Off) {
        return Ok(None);
    }
    let url = goemo_remote::resolve(&p.root, None);
    if mode.is_none() && matches!(url, Err(RemoteError::NotConfigured { .. })) {
        return Ok(None);
    }
    let mode = mode.unwrap_or(RemoteMode::Read);
    match url.and_then(|url| Remote::open(&url)) {
        Ok(r) => Ok(Some((r, mode))),
        Err(e) => Err(ConfigError::new(&p.file, format!("--remote: {e}"))
            .hint("set GOEMO_REMOTE or `remote:` in goemo.yaml, or run with --remote off")
            .into()),
    }
}

fn quiet(p: Progress<'_>) {
    if let Progress::Entry(e) = p {
        if let Outcome::Pulled = e.outcome {
            tracing::info!(
                "{}: pulled from the shared cache ({} files, verified)",
                e.stage,
                e.files
            );
        } else if let Outcome::Failed(err) = &e.outcome {
            tracing::warn!("{}: not pulled ({err}); it will be built here", e.stage);
        }
    }
}

/// Pull what the run lacks, until nothing more can come from the remote.
pub fn pull_missing(p: &Pipeline, remote: &Remote) -> anyhow::Result<usize> {
    let mut tried = HashSet::new();
    let mut pulled = 0;
    for _ in 0..p.stages.len() {
        let engine = Engine::new(p, true)?;
        let wanted: Vec<Wanted> = engine
            .missing_entries()?
            .into_iter()
            .filter(|(_, key)| tried.insert(key.clone()))
            .map(|(stage, key)| Wanted { stage, key })
            .collect();
        if wanted.is_empty() {
            break;
        }
        let report =
            goemo_remote::pull(remote, &engine.cache, &wanted, &Options::default(), &quiet)?;
        let now = report.count(|o| matches!(o, Outcome::Pulled));
        if now == 0 {
            break;
        }
        pulled += now;
    }
    Ok(pulled)
}

/// Push every entry the run built or took (the remote skips what it has).
pub fn push_done(p: &Pipeline, remote: &Remote, report: &RunReport) -> anyhow::Result<()> {
    let wanted: Vec<Wanted> = report
        .done
        .iter()
        .map(|(i, m)| Wanted {
            stage: p.stages[*i].name.clone(),
            key: m.key.clone(),
        })
        .collect();
    let cache = Cache::new(p.root.join("cache"));
    let r = goemo_remote::push(remote, &cache, &wanted, &Options::default(), &|_| {})?;
    tracing::info!(
        "pushed {} entries to {} ({} already there)",
        r.count(|o| matches!(o, Outcome::Pushed)),
        remote.url(),
        r.count(|o| matches!(o, Outcome::AlreadyThere))
    );
    Ok(())
}
