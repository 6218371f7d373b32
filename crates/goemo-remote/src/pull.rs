//! `pull`: download remote entries into the local cache through the engine's own commit path.
//! For each key, under its build lock (`cache/locks/<key>.lock`, the one runs take): the
//! manifest is read and checked against the key, every file is downloaded into a fresh
//! `cache/tmp/` folder and its size and blake3 checked against the manifest, and only when all
//! match is the entry installed (fsync, rename, COMPLETE written last). A damaged object, an
//! interrupted pull or a killed process leaves nothing under `cache/entries/`.

use goemo_engine::cache::{Cache, Lookup};
use goemo_engine::entrylock::EntryLock;
use tokio::sync::Semaphore;

use crate::error::RemoteError;
use crate::store::Remote;
use crate::transfer::{
    check_files, check_manifest, download, each_entry, move_all, Ctx, EntryReport, Item, Options,
    Outcome, Progress, Report, VolatileRecord, Wanted,
};

/// Pull the entries `wanted` names from `remote` into `cache`. An error is returned only when
/// the remote cannot be used at all; each entry's own trouble is in its report.
pub fn pull(
    remote: &Remote,
    cache: &Cache,
    wanted: &[Wanted],
    opts: &Options,
    progress: &dyn Fn(Progress<'_>),
) -> Result<Report, RemoteError> {
    each_entry(
        remote,
        cache,
        wanted,
        opts,
        progress,
        async |sem, ctx, report| pull_entry(remote, cache, sem, ctx, report, false).await,
    )
}

/// [`pull`] for one entry whose build lock the caller already holds (a run about to build the
/// stage asks the shared cache first).
pub(crate) fn pull_held(
    remote: &Remote,
    cache: &Cache,
    wanted: &Wanted,
    opts: &Options,
) -> Result<EntryReport, RemoteError> {
    let mut report = each_entry(
        remote,
        cache,
        std::slice::from_ref(wanted),
        opts,
        &|_| {},
        async |sem, ctx, report| pull_entry(remote, cache, sem, ctx, report, true).await,
    )?;
    Ok(report.entries.remove(0))
}

async fn pull_entry(
    remote: &Remote,
    cache: &Cache,
    sem: &Semaphore,
    ctx: &Ctx<'_>,
    report: &mut EntryReport,
    lock_held: bool,
) -> Result<Outcome, RemoteError> {
    if !crate::is_key(ctx.key) {
        return Ok(Outcome::Missing(format!(
            "`{}` is not a cache key (64 hex digits): pipeline.lock is damaged",
            ctx.key
        )));
    }
    if let Lookup::Hit(_) = cache.lookup(ctx.key) {
        return Ok(Outcome::AlreadyThere);
    }
    let _building = match lock_held {
        true => None,
        false => Some(lock_entry(cache, ctx).await?),
    };
    // Another run or pull may have committed it while this one waited.
    if let Lookup::Hit(_) = cache.lookup(ctx.key) {
        return Ok(Outcome::AlreadyThere);
    }
    let Some(bytes) = remote
        .get_small(&format!("entries/{}.json", ctx.key))
        .await?
    else {
        return Ok(Outcome::Missing("not on the remote".into()));
    };
    let bad = |why: String| RemoteError::BadManifest {
        url: remote.url().to_owned(),
        stage: ctx.stage.to_owned(),
        key: ctx.key.to_owned(),
        why,
    };
    let manifest = check_manifest(&bytes, ctx.key).map_err(bad)?;
    let volatile = match remote
        .get_small(&format!("volatile/{}.json", ctx.key))
        .await?
    {
        None => VolatileRecord {
            key: ctx.key.to_owned(),
            files: Default::default(),
        },
        Some(b) => check_volatile(&b, ctx.key)
            .map_err(|why| bad(format!("volatile/{}.json: {why}", ctx.key)))?,
    };
    let pending = cache.begin(ctx.key).map_err(|e| RemoteError::Local {
        stage: ctx.stage.to_owned(),
        key: ctx.key.to_owned(),
        path: cache.root.join("tmp"),
        detail: format!("{e:#}"),
        hint: "check the cache folder's permissions and free space".into(),
    })?;
    let (out, vol) = (pending.out_dir(), pending.volatile_dir());
    let mut items: Vec<Item> = manifest
        .outputs
        .iter()
        .map(|(rel, d)| Item {
            name: format!("out/{rel}"),
            local: out.join(rel),
            digest: d.clone(),
        })
        .collect();
    items.extend(volatile.files.iter().map(|(rel, d)| Item {
        name: format!("volatile/{rel}"),
        local: vol.join(rel),
        digest: d.clone(),
    }));
    report.files = items.len();
    let moved = move_all(&items, sem, ctx, report, |item| async move {
        download(remote, item, ctx).await.map(|_| true)
    })
    .await;
    if let Err(e) = moved {
        drop(pending); // removes the temp folder
        let _ = std::fs::remove_dir(cache.work_dir(ctx.key)); // only if empty
        return Err(e);
    }
    cache
        .install(pending, &manifest)
        .map_err(|e| RemoteError::Local {
            stage: ctx.stage.to_owned(),
            key: ctx.key.to_owned(),
            path: cache.entry_dir(ctx.key),
            detail: format!("{e:#}"),
            hint: "check the cache folder's permissions and free space".into(),
        })?;
    Ok(Outcome::Pulled)
}

/// The key's build lock; while another process holds it, wait without blocking the transfers.
async fn lock_entry(cache: &Cache, ctx: &Ctx<'_>) -> Result<EntryLock, RemoteError> {
    if let Some(lock) = EntryLock::try_acquire(&cache.root, ctx.key) {
        return Ok(lock);
    }
    (ctx.progress)(Progress::Waiting {
        stage: ctx.stage,
        key: ctx.key,
    });
    let (root, key) = (cache.root.clone(), ctx.key.to_owned());
    let waited = tokio::task::spawn_blocking(move || EntryLock::acquire(&root, &key, &|| {})).await;
    let lock_path = cache.root.join("locks").join(format!("{}.lock", ctx.key));
    match waited {
        Ok(Ok(lock)) => Ok(lock),
        Ok(Err(e)) => Err(ctx.local(&lock_path, std::io::Error::other(format!("{e:#}")))),
        Err(e) => Err(ctx.local(&lock_path, std::io::Error::other(e.to_string()))),
    }
}

fn check_volatile(bytes: &[u8], key: &str) -> Result<VolatileRecord, String> {
    let record: VolatileRecord =
        serde_json::from_slice(bytes).map_err(|e| format!("it does not parse ({e})"))?;
    if record.key != key {
        return Err(format!("it names the key {}", record.key));
    }
    check_files(&record.files)?;
    Ok(record)
}
