//! The cache: one entry per stage key, written so that a killed run never leaves anything a later
//! run trusts.
//!
//! ```text
//! cache/
//!   entries/<key>/out/…          the stage's results (content-hashed)
//!   entries/<key>/volatile/…     logs, timings, human reports (stored, never hashed)
//!   entries/<key>/manifest.json  fingerprint, input files, output hashes and sizes, wall time,
//!                                where it was made (goemo version, CPU, threads; not in the key)
//!   entries/<key>/COMPLETE       written last; holds the outputs hash
//!   tmp/<key>.<pid>.<n>/         an entry being written
//!   work/<key>/                  a stage's scratch that survives a killed attempt (checkpoints)
//!   locks/<key>.lock             held while a run builds <key> (see `entrylock`)
//!   gc.lock                      shared by runs, exclusive for `goemo gc`
//!   run.lock                     held by the running `goemo run` (it owns outputs/, pipeline.lock)
//! ```
//!
//! Commit order: the stage writes into `tmp/`; the engine hashes its outputs, writes the
//! manifest, fsyncs every file and folder, renames the folder into `entries/`, and only then
//! writes `COMPLETE`. An entry is trusted only when `COMPLETE` matches its manifest and every
//! output file has the recorded size; anything else is reported and rebuilt. Entries stay until
//! `goemo gc`, so returning to an earlier param value restores results without running.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::entrylock::{key_of, EntryLock};
use crate::fingerprint::Fingerprint;
use crate::hashing::{hash_file_contents, list_files, rel_string, tree_hash, FileDigest};

pub const MANIFEST: &str = "manifest.json";
pub const COMPLETE: &str = "COMPLETE";

/// What an entry's `manifest.json` holds: readable, and what `status` explains changes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryManifest {
    pub key: String,
    /// The stage name that produced it (for people; not part of the key).
    pub stage: String,
    pub fingerprint: Fingerprint,
    /// For external inputs: the files they held, so `status` can say which changed.
    pub input_files: BTreeMap<String, BTreeMap<String, FileDigest>>,
    /// `out/`-relative path → digest.
    pub outputs: BTreeMap<String, FileDigest>,
    pub outputs_hash: String,
    pub wall_s: f64,
    pub created_unix: u64,
    /// Where the entry was produced; not part of the key. Absent (default) in older manifests.
    #[serde(default)]
    pub provenance: Provenance,
}

/// The program and machine that produced an entry: what to compare when the same key gives
/// different outputs on two machines (float results depend on FMA, AVX-512 paths, thread count).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    pub goemo_version: String,
    pub arch: String,
    pub os: String,
    /// The x86 features that change numeric kernels, those this CPU has.
    pub cpu_features: Vec<String>,
    /// rayon's thread count.
    pub threads: usize,
}

impl Provenance {
    pub fn this_machine() -> Provenance {
        Provenance {
            goemo_version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            os: std::env::consts::OS.to_owned(),
            cpu_features: numeric_cpu_features(),
            threads: rayon::current_num_threads(),
        }
    }

    /// `x86_64 linux avx2 fma, 2 threads, goemo 0.1.0`.
    pub fn describe(&self) -> String {
        let mut parts = vec![self.arch.clone(), self.os.clone()];
        parts.extend(self.cpu_features.iter().cloned());
        format!(
            "{}, {} threads, goemo {}",
            parts.join(" "),
            self.threads,
            self.goemo_version
        )
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn numeric_cpu_features() -> Vec<String> {
    let detected = [
        ("avx2", is_x86_feature_detected!("avx2")),
        ("fma", is_x86_feature_detected!("fma")),
        ("avx512f", is_x86_feature_detected!("avx512f")),
        ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
        ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
    ];
    detected
        .iter()
        .filter(|(_, has)| *has)
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
fn numeric_cpu_features() -> Vec<String> {
    Vec::new()
}

pub enum Lookup {
    Hit(Box<EntryManifest>),
    Missing,
    Corrupt(String),
}

pub struct Cache {
    pub root: PathBuf,
}

/// An entry being written: the stage fills `out` and `volatile`.
pub struct PendingEntry {
    pub dir: PathBuf,
    pub key: String,
}

impl PendingEntry {
    pub fn out_dir(&self) -> PathBuf {
        self.dir.join("out")
    }
    pub fn volatile_dir(&self) -> PathBuf {
        self.dir.join("volatile")
    }
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        // Committed entries were renamed away; anything left here is an abandoned attempt.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static PENDING_SEQ: AtomicU64 = AtomicU64::new(0);

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(key)
    }

    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }

    /// Trust an entry only if it is complete and every output has its recorded size.
    pub fn lookup(&self, key: &str) -> Lookup {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return Lookup::Missing;
        }
        let manifest: EntryManifest = match std::fs::read(dir.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(m) => m,
            None => return Lookup::Corrupt("manifest.json is missing or unreadable".into()),
        };
        match std::fs::read_to_string(dir.join(COMPLETE)) {
            Ok(marker) if marker.trim() == manifest.outputs_hash => {}
            Ok(_) => {
                return Lookup::Corrupt("completion marker does not match the manifest".into())
            }
            Err(_) => {
                return Lookup::Corrupt("no completion marker (an interrupted run wrote it)".into())
            }
        }
        for (rel, d) in &manifest.outputs {
            match std::fs::metadata(dir.join("out").join(rel)) {
                Ok(m) if m.len() == d.size => {}
                Ok(m) => {
                    return Lookup::Corrupt(format!(
                        "out/{rel} is {} bytes, the manifest says {}",
                        m.len(),
                        d.size
                    ))
                }
                Err(_) => return Lookup::Corrupt(format!("out/{rel} is missing")),
            }
        }
        Lookup::Hit(Box::new(manifest))
    }

    /// Re-hash every output of a complete entry, and list `out/` for files the manifest does not
    /// name (they would reach downstream stages unhashed); the differences, if any.
    pub fn verify(&self, manifest: &EntryManifest) -> Vec<String> {
        let out = self.entry_dir(&manifest.key).join("out");
        let mut bad = Vec::new();
        for (rel, d) in &manifest.outputs {
            match hash_file_contents(&out.join(rel), d.size) {
                Ok(h) if h == d.blake3 => {}
                Ok(_) => bad.push(format!("out/{rel} content differs from its recorded hash")),
                Err(e) => bad.push(format!("out/{rel}: {e}")),
            }
        }
        match list_files(&out) {
            Ok(rels) => {
                let mut extra: Vec<String> = rels
                    .iter()
                    .map(|r| rel_string(r))
                    .filter(|r| !manifest.outputs.contains_key(r))
                    .collect();
                extra.sort();
                bad.extend(
                    extra
                        .into_iter()
                        .map(|r| format!("out/{r} is not in the manifest (an unexpected file)")),
                );
            }
            Err(e) => bad.push(format!("listing out/: {e}")),
        }
        bad
    }

    pub fn remove(&self, key: &str) -> std::io::Result<()> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return Ok(());
        }
        // Rename first so a half-deleted entry is never seen under its key.
        let doomed = self
            .root
            .join("tmp")
            .join(format!("{key}.removing.{}", std::process::id()));
        std::fs::create_dir_all(self.root.join("tmp"))?;
        std::fs::rename(&dir, &doomed)?;
        // The entry is gone from under its key only once `entries/` is on disk.
        sync_dir(&self.root.join("entries"));
        std::fs::remove_dir_all(&doomed)
    }

    /// A fresh, empty place to write an entry.
    pub fn begin(&self, key: &str) -> anyhow::Result<PendingEntry> {
        let seq = PENDING_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{key}.{}.{seq}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        for sub in ["out", "volatile"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let work = self.work_dir(key);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        Ok(PendingEntry {
            dir,
            key: key.to_owned(),
        })
    }

    /// Hash the outputs, write the manifest, fsync, rename into place, then write COMPLETE.
    pub fn commit(
        &self,
        pending: PendingEntry,
        stage: &str,
        fingerprint: Fingerprint,
        input_files: BTreeMap<String, BTreeMap<String, FileDigest>>,
        wall_s: f64,
    ) -> anyhow::Result<EntryManifest> {
        use rayon::prelude::*;
        let out = pending.out_dir();
        let rels = list_files(&out).with_context(|| {
            format!("listing the outputs of stage {stage} in {}", out.display())
        })?;
        let outputs: BTreeMap<String, FileDigest> = rels
            .par_iter()
            .map(|rel| {
                let path = out.join(rel);
                let digest = std::fs::metadata(&path).and_then(|m| {
                    Ok(FileDigest {
                        blake3: hash_file_contents(&path, m.len())?,
                        size: m.len(),
                    })
                });
                digest
                    .map(|d| (rel_string(rel), d))
                    .with_context(|| format!("hashing {}", path.display()))
            })
            .collect::<anyhow::Result<_>>()
            .with_context(|| format!("hashing the outputs of stage {stage}"))?;
        let manifest = EntryManifest {
            key: pending.key.clone(),
            stage: stage.to_owned(),
            fingerprint,
            input_files,
            outputs_hash: tree_hash(&outputs),
            outputs,
            wall_s,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            provenance: Provenance::this_machine(),
        };
        self.install(pending, &manifest)?;
        Ok(manifest)
    }

    /// The second half of [`Cache::commit`], for an entry whose `out/` the caller has already
    /// checked against `manifest` (commit hashed it; `goemo pull` verified every downloaded
    /// file's blake3 and size): write the manifest, fsync, rename into place, write COMPLETE.
    pub fn install(&self, pending: PendingEntry, manifest: &EntryManifest) -> anyhow::Result<()> {
        anyhow::ensure!(
            manifest.key == pending.key,
            "installing entry {}: its manifest is for key {}",
            pending.key,
            manifest.key
        );
        let mut bytes = serde_json::to_vec_pretty(manifest)?;
        bytes.push(b'\n');
        let manifest_path = pending.dir.join(MANIFEST);
        std::fs::write(&manifest_path, bytes)
            .with_context(|| format!("writing {}", manifest_path.display()))?;
        fsync_tree(&pending.dir)?;

        let dest = self.entry_dir(&pending.key);
        let entries = self.root.join("entries");
        std::fs::create_dir_all(&entries)
            .with_context(|| format!("creating {}", entries.display()))?;
        if dest.exists() {
            // A damaged entry under the same key (reported by lookup): replace it.
            self.remove(&pending.key)
                .with_context(|| format!("removing the damaged entry {}", dest.display()))?;
        }
        std::fs::rename(&pending.dir, &dest)
            .with_context(|| format!("moving the new entry into {}", dest.display()))?;
        sync_dir(&entries);
        let complete = dest.join(COMPLETE);
        write_file_atomic(&complete, manifest.outputs_hash.as_bytes())?;
        sync_dir(&dest);
        let _ = std::fs::remove_dir_all(self.work_dir(&pending.key));
        std::mem::forget(pending); // renamed away: nothing for Drop to clean
        Ok(())
    }

    /// Call `f` with each item of `cache/<sub>/` whose key no live build holds, while holding
    /// that key's build lock (so no run starts building it meanwhile). `key` maps an item's
    /// name to its key; items it rejects are skipped.
    fn for_each_unheld<E>(
        &self,
        sub: &str,
        key: fn(&str) -> Option<&str>,
        mut f: impl FnMut(&Path, &str) -> Result<(), E>,
    ) -> Result<(), E> {
        let Ok(rd) = std::fs::read_dir(self.root.join(sub)) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(k) = key(&name) else { continue };
            if let Some(_held) = EntryLock::try_acquire(&self.root, k) {
                f(&e.path(), k)?;
            }
        }
        Ok(())
    }

    /// Stop the process groups of `command` stages that a killed run left running, recorded in
    /// their work folders. A work folder whose key a live build holds is that build's: skipped.
    pub fn stop_leftover_commands(&self) -> anyhow::Result<()> {
        self.for_each_unheld(
            "work",
            |n| Some(key_of(n)),
            |path, _| goemo_stage::process::stop_leftover_group(path),
        )
    }

    /// Remove the temp folders that killed or failed runs abandoned; a folder whose key a live
    /// build holds (another run in this project) is left alone.
    pub fn clean_tmp(&self) {
        // One folder that will not go does not stop the others (the next run tries again).
        let _ = self.for_each_unheld(
            "tmp",
            |n| Some(key_of(n)),
            |path, _| {
                let _ = std::fs::remove_dir_all(path);
                Ok::<(), ()>(())
            },
        );
    }

    /// Remove the build-lock files of keys not in `keep` that no live build holds.
    fn clean_locks(&self, keep: &HashSet<String>) {
        let _ = self.for_each_unheld(
            "locks",
            |n| n.strip_suffix(".lock"),
            |path, key| {
                if !keep.contains(key) {
                    let _ = std::fs::remove_file(path);
                }
                Ok::<(), ()>(())
            },
        );
    }

    /// Keys of all entries on disk.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.root.join("entries"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Delete entries (and work folders) whose key is not in `keep`; (entries removed, bytes).
    pub fn gc(&self, keep: &HashSet<String>) -> std::io::Result<(usize, u64)> {
        let (mut removed, mut bytes) = (0, 0);
        for key in self.keys() {
            if keep.contains(&key) {
                continue;
            }
            bytes += dir_size(&self.entry_dir(&key));
            self.remove(&key)?;
            removed += 1;
        }
        if let Ok(rd) = std::fs::read_dir(self.root.join("work")) {
            for e in rd.flatten() {
                if !keep.contains(&e.file_name().to_string_lossy().to_string()) {
                    bytes += dir_size(&e.path());
                    std::fs::remove_dir_all(e.path())?;
                }
            }
        }
        bytes += dir_size(&self.root.join("tmp"));
        self.clean_tmp();
        self.clean_locks(keep);
        Ok((removed, bytes))
    }
}

/// Bytes of a file, or of all files under a folder.
pub fn dir_size_or_len(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => dir_size(path),
        Err(_) => 0,
    }
}

pub fn dir_size(path: &Path) -> u64 {
    let Ok(rels) = list_files(path) else {
        return 0;
    };
    rels.iter()
        .filter_map(|r| std::fs::metadata(path.join(r)).ok())
        .map(|m| m.len())
        .sum()
}

/// fsync every file and folder under `dir`; an error names the path it happened on.
fn fsync_tree(dir: &Path) -> anyhow::Result<()> {
    // Deepest first, so each folder is synced after what it holds. Links are not followed: an
    // entry's own files and folders are what must be durable.
    for entry in walkdir::WalkDir::new(dir).contents_first(true) {
        let entry = entry.with_context(|| format!("syncing {} to disk", dir.display()))?;
        let ty = entry.file_type();
        if ty.is_dir() {
            sync_dir(entry.path());
        } else if ty.is_file() {
            std::fs::File::open(entry.path())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {} to disk", entry.path().display()))?;
        }
    }
    Ok(())
}

/// [`goemo_fsio::write_atomic`] with an error that names `path`, once. The temp file's
/// library appends its own temp name (`… at path "/x/.tmpAb12"`), which is not where a person
/// should look, and which made a full disk read as two paths.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    goemo_fsio::write_atomic(path, bytes).map_err(|e| {
        let text = e.to_string();
        let cause = text.split(" at path \"").next().unwrap_or(&text);
        anyhow::anyhow!("writing {}: {cause}", path.display())
    })
}

/// fsync a folder so a rename or create inside it is durable (best effort off Unix).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_atomic_write_names_the_target_not_the_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("missing/COMPLETE");
        let text = write_file_atomic(&target, b"x").unwrap_err().to_string();
        assert_eq!(
            text,
            format!(
                "writing {}: {}",
                target.display(),
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
    }

    #[test]
    fn manifests_record_where_they_were_made_and_old_ones_still_read() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path());
        let pending = cache.begin("k").unwrap();
        std::fs::write(pending.out_dir().join("x"), "1").unwrap();
        let fingerprint = Fingerprint {
            format: crate::fingerprint::FORMAT,
            kind: "command".into(),
            version: 1,
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
        };
        let made = cache
            .commit(pending, "s", fingerprint, BTreeMap::new(), 0.0)
            .unwrap();
        let Lookup::Hit(stored) = cache.lookup("k") else {
            panic!("the entry was just committed");
        };
        assert_eq!(stored.provenance, made.provenance);
        assert_eq!(stored.provenance.goemo_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(stored.provenance.arch, std::env::consts::ARCH);
        assert_eq!(stored.provenance.os, std::env::consts::OS);
        assert_eq!(stored.provenance.threads, rayon::current_num_threads());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            stored.provenance.cpu_features.contains(&"avx2".to_owned()),
            is_x86_feature_detected!("avx2")
        );
        // A manifest written before provenance existed.
        let path = cache.entry_dir("k").join(MANIFEST);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("provenance");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let Lookup::Hit(old) = cache.lookup("k") else {
            panic!("an old manifest is still a hit");
        };
        assert_eq!(old.provenance, Provenance::default());
        assert_eq!(old.outputs_hash, made.outputs_hash);
    }
}
