//! What push and pull share: the options, the progress events, the per-entry report, and the
//! transfer of one file (uploaded in parts when large, hashed on the way either way).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use goemo_engine::cache::EntryManifest;
use goemo_engine::hashing::{tree_hash, FileDigest};
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::RemoteError;
use crate::store::Remote;

/// An entry to move: the key, and the stage it is for (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub stage: String,
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Transfers (files up or down) at once, across all entries.
    pub jobs: usize,
    /// Files larger than this are uploaded in parts of this size (S3 needs at least 5 MiB).
    pub part_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            jobs: 8,
            part_size: 8 << 20,
        }
    }
}

/// What push and pull report while they work.
pub enum Progress<'a> {
    /// `goemo gc` holds the cache; waiting for it.
    WaitingForGc,
    /// Another goemo process is building or pulling this key; waiting for it.
    Waiting { stage: &'a str, key: &'a str },
    /// One file is done: moved, or already where it had to go (`moved` false).
    File {
        stage: &'a str,
        file: &'a str,
        bytes: u64,
        moved: bool,
    },
    /// One entry is done.
    Entry(&'a EntryReport),
}

/// How one entry's push or pull ended.
#[derive(Debug)]
pub enum Outcome {
    /// Uploaded; its manifest is now on the remote.
    Pushed,
    /// Downloaded, verified and committed to the local cache.
    Pulled,
    /// Nothing to do: the entry already is where it had to go.
    AlreadyThere,
    /// The remote holds this key with other outputs (a stage that is not deterministic, or a
    /// machine whose floats differ): the remote's is kept.
    Diverged {
        remote: String,
        local: String,
    },
    /// Not where it would be moved from (the reason says where).
    Missing(String),
    Failed(RemoteError),
}

#[derive(Debug)]
pub struct EntryReport {
    pub stage: String,
    pub key: String,
    pub outcome: Outcome,
    /// Files the entry holds (out/ and volatile/).
    pub files: usize,
    pub files_moved: usize,
    pub bytes_moved: u64,
    /// Bytes of files that needed no transfer (an identical object was already there).
    pub bytes_skipped: u64,
}

/// What a push or pull came to, entries in the order asked for.
#[derive(Debug)]
pub struct Report {
    pub entries: Vec<EntryReport>,
    pub elapsed: Duration,
}

impl Report {
    pub fn bytes_moved(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes_moved).sum()
    }
    pub fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.entries.iter().filter(|e| pred(&e.outcome)).count()
    }
}

/// `volatile/<key>.json` on the remote: the entry's `volatile/` files (logs, timings, human
/// reports: stored and publishable, never hashed into the key). Written before the manifest.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolatileRecord {
    pub key: String,
    pub files: BTreeMap<String, FileDigest>,
}

/// One file of an entry: its name within the entry (`out/x`, `volatile/y`), where it is (or goes)
/// locally, and its digest.
pub(crate) struct Item {
    pub name: String,
    pub local: PathBuf,
    pub digest: FileDigest,
}

impl Item {
    pub fn object(&self) -> String {
        format!("objects/{}", self.digest.blake3)
    }
}

/// One gate per object hash within a push: of two entries holding the same file, the second
/// waits for the first's upload and then finds the object there, instead of sending it again.
#[derive(Default)]
pub(crate) struct ObjectGates(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl ObjectGates {
    fn gate(&self, hash: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.0.lock().expect("poisoned");
        gates.entry(hash.to_owned()).or_default().clone()
    }
}

/// Upload `item` unless an object of its size is there already; `Ok(true)` when it moved.
/// The bytes are hashed as they are read: a local file that no longer matches its digest is
/// an error and nothing is uploaded under its name.
pub(crate) async fn upload(
    remote: &Remote,
    item: &Item,
    part_size: usize,
    gates: &ObjectGates,
    ctx: &Ctx<'_>,
) -> Result<bool, RemoteError> {
    let object = item.object();
    let gate = gates.gate(&item.digest.blake3);
    let _only_one_upload_of_this_object = gate.lock().await;
    if remote.size_of(&object).await? == Some(item.digest.size) {
        return Ok(false);
    }
    let mut file = std::fs::File::open(&item.local).map_err(|e| ctx.local(&item.local, e))?;
    let mut hasher = blake3::Hasher::new();
    let path = remote.path(&object);
    if item.digest.size <= part_size as u64 {
        let mut bytes = Vec::with_capacity(item.digest.size as usize);
        file.read_to_end(&mut bytes)
            .map_err(|e| ctx.local(&item.local, e))?;
        hasher.update(&bytes);
        ctx.check_local(item, &hasher, bytes.len() as u64)?;
        remote
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| remote.error("uploading", &object, &e))?;
        return Ok(true);
    }
    let upload = remote
        .store
        .put_multipart(&path)
        .await
        .map_err(|e| remote.error("starting the upload of", &object, &e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
    let mut buf = vec![0u8; part_size];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(|e| ctx.local(&item.local, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        // At most two parts of this file in flight: memory stays at a few parts per transfer.
        writer
            .wait_for_capacity(2)
            .await
            .map_err(|e| remote.error("uploading", &object, &e))?;
        writer.write(&buf[..n]);
    }
    if let Err(e) = ctx.check_local(item, &hasher, size) {
        let _ = writer.abort().await;
        return Err(e);
    }
    writer
        .finish()
        .await
        .map_err(|e| remote.error("finishing the upload of", &object, &e))?;
    Ok(true)
}

/// Fill `buf` unless the file ends first; the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// Download `item`'s object into `item.local`, checking size and blake3 on the way; any
/// difference is [`RemoteError::Corrupt`] naming the object and the stage.
pub(crate) async fn download(
    remote: &Remote,
    item: &Item,
    ctx: &Ctx<'_>,
) -> Result<u64, RemoteError> {
    let object = item.object();
    let got = match remote.store.get(&remote.path(&object)).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(ctx.corrupt(remote, item, "it is missing from the remote".into()))
        }
        Err(e) => return Err(remote.error("downloading", &object, &e)),
    };
    if let Some(dir) = item.local.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ctx.local(dir, e))?;
    }
    let mut file = std::fs::File::create(&item.local).map_err(|e| ctx.local(&item.local, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| remote.error("downloading", &object, &e))?;
        size += chunk.len() as u64;
        if size > item.digest.size {
            let what = format!(
                "it is larger than the {} bytes the manifest says",
                item.digest.size
            );
            return Err(ctx.corrupt(remote, item, what));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .map_err(|e| ctx.local(&item.local, e))?;
    }
    if size != item.digest.size {
        let what = format!("it is {size} bytes, the manifest says {}", item.digest.size);
        return Err(ctx.corrupt(remote, item, what));
    }
    let hash = hasher.finalize().to_hex().to_string();
    if hash != item.digest.blake3 {
        let what = format!("its content hashes to {hash}");
        return Err(ctx.corrupt(remote, item, what));
    }
    Ok(size)
}

/// Move every item, at most `sem`'s permits at once across all entries; reports each file and
/// returns the first error once all have ended.
pub(crate) async fn move_all<'i, F, Fut>(
    items: &'i [Item],
    sem: &Semaphore,
    ctx: &Ctx<'_>,
    report: &mut EntryReport,
    one: F,
) -> Result<(), RemoteError>
where
    F: Fn(&'i Item) -> Fut,
    Fut: std::future::Future<Output = Result<bool, RemoteError>>,
{
    let done = futures::future::join_all(items.iter().map(|item| {
        let fut = one(item);
        async move {
            let _permit = sem.acquire().await.expect("the semaphore is never closed");
            fut.await
        }
    }))
    .await;
    let mut first_error = None;
    for (item, result) in items.iter().zip(done) {
        match result {
            Ok(moved) => {
                report.files_moved += usize::from(moved);
                if moved {
                    report.bytes_moved += item.digest.size;
                } else {
                    report.bytes_skipped += item.digest.size;
                }
                (ctx.progress)(Progress::File {
                    stage: ctx.stage,
                    file: &item.name,
                    bytes: item.digest.size,
                    moved,
                });
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The frame push and pull share: probe the remote, hold the cache's gc lock (shared), run
/// `entry` for every wanted entry with up to `opts.jobs` transfers at once (one semaphore for
/// all of them), report each as it ends, and return the reports in `wanted`'s order.
pub(crate) fn each_entry<F>(
    remote: &Remote,
    cache: &goemo_engine::cache::Cache,
    wanted: &[Wanted],
    opts: &Options,
    progress: &dyn Fn(Progress<'_>),
    entry: F,
) -> Result<Report, RemoteError>
where
    F: AsyncFn(&Semaphore, &Ctx<'_>, &mut EntryReport) -> Result<Outcome, RemoteError>,
{
    remote.probe()?;
    let _gc = crate::push::gc_lock(cache, progress)?;
    let start = std::time::Instant::now();
    let sem = Semaphore::new(opts.jobs.max(1));
    let (sem, entry) = (&sem, &entry);
    let mut entries = remote.runtime.block_on(
        futures::stream::iter(wanted.iter().enumerate())
            .map(|(i, w)| async move {
                let ctx = Ctx {
                    stage: &w.stage,
                    key: &w.key,
                    progress,
                };
                let mut report = EntryReport::new(w);
                report.outcome = entry(sem, &ctx, &mut report)
                    .await
                    .unwrap_or_else(Outcome::Failed);
                progress(Progress::Entry(&report));
                (i, report)
            })
            .buffer_unordered(opts.jobs.max(1))
            .collect::<Vec<_>>(),
    );
    entries.sort_by_key(|(i, _)| *i);
    Ok(Report {
        entries: entries.into_iter().map(|(_, r)| r).collect(),
        elapsed: start.elapsed(),
    })
}

/// The entry being moved, for messages and progress.
pub(crate) struct Ctx<'a> {
    pub stage: &'a str,
    pub key: &'a str,
    pub progress: &'a dyn Fn(Progress<'_>),
}

impl Ctx<'_> {
    pub fn local(&self, path: &std::path::Path, e: std::io::Error) -> RemoteError {
        RemoteError::Local {
            stage: self.stage.to_owned(),
            key: self.key.to_owned(),
            path: path.to_path_buf(),
            detail: e.to_string(),
            hint: "check the cache folder's permissions and free space".into(),
        }
    }

    fn check_local(
        &self,
        item: &Item,
        hasher: &blake3::Hasher,
        size: u64,
    ) -> Result<(), RemoteError> {
        let hash = hasher.finalize().to_hex().to_string();
        if size == item.digest.size && hash == item.digest.blake3 {
            return Ok(());
        }
        Err(RemoteError::Local {
            stage: self.stage.to_owned(),
            key: self.key.to_owned(),
            path: item.local.clone(),
            detail: format!(
                "the local file ({size} bytes, blake3 {hash}) no longer matches its manifest ({} bytes, blake3 {}); nothing was uploaded under its name",
                item.digest.size, item.digest.blake3
            ),
            hint: "the local cache entry is damaged: `goemo run --verify` rebuilds it".into(),
        })
    }

    fn corrupt(&self, remote: &Remote, item: &Item, what: String) -> RemoteError {
        RemoteError::Corrupt {
            url: remote.url().to_owned(),
            stage: self.stage.to_owned(),
            key: self.key.to_owned(),
            object: item.object(),
            file: item.name.clone(),
            what,
        }
    }
}

/// A remote manifest, checked against the key it is stored under before anything is trusted:
/// its key, its fingerprint's key, its outputs' tree hash, and every file name and digest.
pub(crate) fn check_manifest(bytes: &[u8], key: &str) -> Result<EntryManifest, String> {
    let m: EntryManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("it does not parse ({e})"))?;
    if m.key != key {
        return Err(format!("it names the key {}", m.key));
    }
    let from_fingerprint = m.fingerprint.key();
    if from_fingerprint != key {
        return Err(format!("its fingerprint gives the key {from_fingerprint}"));
    }
    if tree_hash(&m.outputs) != m.outputs_hash {
        return Err("its outputs do not hash to its outputs_hash".into());
    }
    check_files(&m.outputs)?;
    Ok(m)
}

/// File names stay inside the entry (no `..`, no absolute paths) and digests are blake3 hex.
pub(crate) fn check_files(files: &BTreeMap<String, FileDigest>) -> Result<(), String> {
    for (rel, d) in files {
        let safe = !rel.contains('\\')
            && rel
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..");
        if !safe {
            return Err(format!("the file name `{rel}` leaves the entry's folder"));
        }
        let hex = d.blake3.len() == 64
            && d.blake3
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        if !hex {
            return Err(format!(
                "`{rel}` has the digest `{}`, not a blake3 hex",
                d.blake3
            ));
        }
    }
    Ok(())
}
