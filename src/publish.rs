//! Copy what pipeline.yaml publishes from cache entries into `outputs/`.
//!
//! Copies, not links: a user who edits a file in `outputs/` must not corrupt the cache. Each
//! target is written beside its final place and renamed over it, so `outputs/` never holds half
//! a file. `outputs/.goemo-published.json` records which entry each target came from, so a no-op
//! run copies nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, EntryManifest};
use crate::pipeline::StageDef;

const STATE_FILE: &str = ".goemo-published.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Published {
    key: String,
    from: String,
    /// Total bytes, to notice a target a person changed or deleted.
    bytes: u64,
}

pub fn publish(
    outputs: &Path,
    cache: &Cache,
    def: &StageDef,
    manifest: &EntryManifest,
) -> anyhow::Result<()> {
    if def.publish.is_empty() {
        return Ok(());
    }
    let state_path = outputs.join(STATE_FILE);
    let mut state: BTreeMap<String, Published> = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut changed = false;
    for p in &def.publish {
        let src = cache.entry_dir(&manifest.key).join(&p.from);
        let dest = outputs.join(&p.to);
        let up_to_date = state.get(&p.to).is_some_and(|s| {
            s.key == manifest.key
                && s.from == p.from
                && dest.exists()
                && crate::cache::dir_size_or_len(&dest) == s.bytes
        });
        if up_to_date {
            continue;
        }
        if !src.exists() {
            anyhow::bail!(
                "stage {}: `{}` is not in its cache entry, so outputs/{} cannot be published; run `goemo run --from {}`",
                def.name, p.from, p.to, def.name
            );
        }
        replace_with_copy(&src, &dest)
            .with_context(|| format!("publishing {} to {}", p.from, dest.display()))?;
        state.insert(
            p.to.clone(),
            Published {
                key: manifest.key.clone(),
                from: p.from.clone(),
                bytes: crate::cache::dir_size_or_len(&dest),
            },
        );
        changed = true;
    }
    if changed {
        std::fs::create_dir_all(outputs)?;
        goemo_stages::write_json(&state_path, &state)?;
    }
    Ok(())
}

/// Copy `src` (file or folder) to a temp name beside `dest`, then swap it in.
fn replace_with_copy(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp: PathBuf = parent.join(format!(".{name}.goemo-tmp.{}", std::process::id()));
    let _ = remove_any(&tmp);
    copy_any(src, &tmp)?;
    if dest.is_dir() {
        // A folder cannot be renamed over another: move the old one aside first.
        let old = parent.join(format!(".{name}.goemo-old.{}", std::process::id()));
        std::fs::rename(dest, &old)?;
        std::fs::rename(&tmp, dest)?;
        remove_any(&old)?;
    } else {
        std::fs::rename(&tmp, dest)?;
    }
    crate::cache::sync_dir(parent);
    Ok(())
}

fn copy_any(src: &Path, dest: &Path) -> std::io::Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(dest)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_any(&e.path(), &dest.join(e.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(src, dest).map(|_| ())
    }
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else if p.exists() {
        std::fs::remove_file(p)
    } else {
        Ok(())
    }
}
