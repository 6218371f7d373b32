//! `goemo run --remote read|read-write`: the remote as the engine's shared cache
//! ([`goemo_remote::RemoteCache`]): a stage's entry is pulled when the stage would be built,
//! and read-write, claimed with a lease and pushed as it is built. The engine itself never
//! talks to a remote.

use goemo_engine::cache::Cache;
use goemo_engine::engine::RunReport;
use goemo_engine::error::ConfigError;
use goemo_engine::pipeline::Pipeline;
use goemo_remote::{Notice, Options, Outcome, Remote, RemoteCache, RemoteError, Wanted};

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
        Ok(r) if mode == RemoteMode::ReadWrite && !r.writable() => Err(ConfigError::new(
            &p.file,
            format!("--remote read-write: {}", r.read_only_error()),
        )
        .hint("use --remote read with this remote")
        .into()),
        Ok(r) => Ok(Some((r, mode))),
        Err(e) => Err(ConfigError::new(&p.file, format!("--remote: {e}"))
            .hint("set GOEMO_REMOTE or `remote:` in goemo.yaml, or run with --remote off")
            .into()),
    }
}

/// The remote as the run's shared cache: entries are pulled when a stage would be built and,
/// read-write, claimed with a lease and pushed as they are built. Notices go to the log.
pub fn shared(remote: Remote, mode: RemoteMode) -> RemoteCache {
    RemoteCache::new(remote, mode == RemoteMode::ReadWrite, Box::new(notice))
}

fn notice(n: Notice<'_>) {
    match n {
        Notice::Waiting { stage, holder } => tracing::info!(
            "{stage}: {holder} is building it (its lease is on the shared cache); waiting for its entry"
        ),
        Notice::TakenOver { stage, holder } => tracing::warn!(
            "{stage}: the lease of {holder} was not renewed in time (the worker died?); building it here"
        ),
        Notice::Trouble { stage, detail } => tracing::warn!("{stage}: shared cache: {detail}"),
        Notice::Pushed { stage, files } => {
            tracing::info!("{stage}: pushed to the shared cache ({files} files)")
        }
    }
}

/// Push every entry the run built or took (the remote skips what it has): entries built
/// before the remote was configured, or taken from the local cache, are shared too.
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
