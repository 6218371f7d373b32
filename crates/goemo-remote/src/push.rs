//! `push`: upload local cache entries. For each entry: its files as content-addressed objects
//! (skipped when an object of that hash and size is there), then its volatile record, then its
//! manifest with a conditional create, so the manifest appears only once everything it names is
//! there, and of two pushers of one key exactly one writes it.

use goemo_engine::cache::{Cache, EntryManifest, Lookup, MANIFEST};
use goemo_engine::entrylock::GcLock;
use goemo_engine::hashing::{hash_file_contents, list_files, rel_string, FileDigest};
use tokio::sync::Semaphore;

use crate::error::RemoteError;
use crate::store::{Created, Remote};
use crate::transfer::{
    each_entry, move_all, upload, Ctx, EntryReport, Item, ObjectGates, Options, Outcome, Progress,
    Report, VolatileRecord, Wanted,
};

/// Push the entries `wanted` names from `cache` to `remote`. An error is returned only when
/// the remote cannot be used at all; each entry's own trouble is in its report.
pub fn push(
    remote: &Remote,
    cache: &Cache,
    wanted: &[Wanted],
    opts: &Options,
    progress: &dyn Fn(Progress<'_>),
) -> Result<Report, RemoteError> {
    if !remote.writable() {
        return Err(remote.read_only_error());
    }
    let gates = ObjectGates::default();
    each_entry(
        remote,
        cache,
        wanted,
        opts,
        progress,
        async |sem, ctx, report| push_entry(remote, cache, opts, (sem, &gates), ctx, report).await,
    )
}

/// `cache/gc.lock`, shared: `goemo gc` does not remove an entry while it is pushed or pulled.
pub(crate) fn gc_lock(
    cache: &Cache,
    progress: &dyn Fn(Progress<'_>),
) -> Result<GcLock, RemoteError> {
    GcLock::for_run(&cache.root, &|| progress(Progress::WaitingForGc)).map_err(|e| {
        RemoteError::Local {
            stage: "-".into(),
            key: "-".into(),
            path: cache.root.join("gc.lock"),
            detail: format!("{e:#}"),
            hint: "check the cache folder's permissions".into(),
        }
    })
}

impl EntryReport {
    pub(crate) fn new(w: &Wanted) -> EntryReport {
        EntryReport {
            stage: w.stage.clone(),
            key: w.key.clone(),
            outcome: Outcome::AlreadyThere,
            files: 0,
            files_moved: 0,
            bytes_moved: 0,
            bytes_skipped: 0,
        }
    }
}

async fn push_entry(
    remote: &Remote,
    cache: &Cache,
    opts: &Options,
    (sem, gates): (&Semaphore, &ObjectGates),
    ctx: &Ctx<'_>,
    report: &mut EntryReport,
) -> Result<Outcome, RemoteError> {
    if !crate::is_key(ctx.key) {
        return Ok(Outcome::Missing(format!(
            "`{}` is not a cache key (64 hex digits): pipeline.lock is damaged",
            ctx.key
        )));
    }
    let manifest = match cache.lookup(ctx.key) {
        Lookup::Hit(m) => m,
        Lookup::Missing => {
            return Ok(Outcome::Missing(
                "not in the local cache (`goemo run` builds it)".into(),
            ))
        }
        Lookup::Corrupt(why) => {
            return Ok(Outcome::Missing(format!(
                "the local entry is damaged ({why}); `goemo run` rebuilds it"
            )))
        }
    };
    let entry_rel = format!("entries/{}.json", ctx.key);
    if let Some(existing) = remote.get_small(&entry_rel).await? {
        return compare(remote, ctx, &existing, &manifest);
    }
    let dir = cache.entry_dir(ctx.key);
    let manifest_path = dir.join(MANIFEST);
    let manifest_bytes = std::fs::read(&manifest_path).map_err(|e| ctx.local(&manifest_path, e))?;
    let mut items: Vec<Item> = manifest
        .outputs
        .iter()
        .map(|(rel, d)| Item {
            name: format!("out/{rel}"),
            local: dir.join("out").join(rel),
            digest: d.clone(),
        })
        .collect();
    let volatile = volatile_files(&dir.join("volatile"), ctx)?;
    items.extend(volatile.files.iter().map(|(rel, d)| Item {
        name: format!("volatile/{rel}"),
        local: dir.join("volatile").join(rel),
        digest: d.clone(),
    }));
    report.files = items.len();
    move_all(&items, sem, ctx, report, |item| {
        upload(remote, item, opts.part_size, gates, ctx)
    })
    .await?;
    if !volatile.files.is_empty() {
        let record = serde_json::to_vec_pretty(&volatile).expect("a record serializes");
        // First pusher's record wins: volatile files are never hashed into the key, any
        // complete set is a valid one.
        remote
            .create(&format!("volatile/{}.json", ctx.key), record)
            .await?;
    }
    match remote.create(&entry_rel, manifest_bytes).await? {
        Created::Yes => Ok(Outcome::Pushed),
        Created::AlreadyThere => {
            let existing = remote.get_small(&entry_rel).await?.unwrap_or_default();
            compare(remote, ctx, &existing, &manifest)
        }
    }
}

/// The remote already holds this key: the same outputs (nothing to do), or others (kept).
fn compare(
    remote: &Remote,
    ctx: &Ctx<'_>,
    existing: &[u8],
    local: &EntryManifest,
) -> Result<Outcome, RemoteError> {
    let theirs = crate::transfer::check_manifest(existing, ctx.key).map_err(|why| {
        RemoteError::BadManifest {
            url: remote.url().to_owned(),
            stage: ctx.stage.to_owned(),
            key: ctx.key.to_owned(),
            why,
        }
    })?;
    if theirs.outputs_hash == local.outputs_hash {
        return Ok(Outcome::AlreadyThere);
    }
    Ok(Outcome::Diverged {
        remote: format!(
            "outputs {} made on {}",
            goemo_engine::fingerprint::short(&theirs.outputs_hash),
            theirs.provenance.describe()
        ),
        local: format!(
            "outputs {} made on {}",
            goemo_engine::fingerprint::short(&local.outputs_hash),
            local.provenance.describe()
        ),
    })
}

/// The entry's `volatile/` files with their digests (they are not in the manifest).
fn volatile_files(dir: &std::path::Path, ctx: &Ctx<'_>) -> Result<VolatileRecord, RemoteError> {
    let mut record = VolatileRecord {
        key: ctx.key.to_owned(),
        files: Default::default(),
    };
    if !dir.exists() {
        return Ok(record);
    }
    for rel in list_files(dir).map_err(|e| ctx.local(dir, e))? {
        let path = dir.join(&rel);
        let size = std::fs::metadata(&path)
            .map_err(|e| ctx.local(&path, e))?
            .len();
        let blake3 = hash_file_contents(&path, size).map_err(|e| ctx.local(&path, e))?;
        record
            .files
            .insert(rel_string(&rel), FileDigest { blake3, size });
    }
    Ok(record)
}
