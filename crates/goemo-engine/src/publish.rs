//! Copy what pipeline.yaml publishes from cache entries into `outputs/`.
//!
//! Copies, not links: a user who edits a file in `outputs/` must not corrupt the cache. Each
//! target is written beside its final place and renamed over it, so `outputs/` never holds half
//! a file. `outputs/.goemo-published.json` records which entry each target came from, so a no-op
//! run copies nothing. A run killed while publishing leaves its temp copy (`.NAME.goemo-tmp.PID`
//! or `.NAME.goemo-old.PID`); the next run removes it. A target is never reached through a
//! symbolic link: publishing follows nothing out of `outputs/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, EntryManifest};
use crate::pipeline::StageDef;

pub use crate::reserved::{is_leftover_name, STATE_FILE};

/// How published files are made from cache entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    /// outputs/: real copies, so editing one never touches the cache.
    Copy,
    /// An experiment's outputs: hard links into the cache (a sweep of 100 members would
    /// otherwise hold 100 copies of its models); copies where links cannot be made (another
    /// file system). `goemo exp apply` publishes copies into outputs/.
    Link,
}

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
    mode: PublishMode,
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
        refuse_symlinks(outputs, &p.to)?;
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
        replace_with_copy(&src, &dest, mode)
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
        std::fs::create_dir_all(outputs)
            .with_context(|| format!("creating {}", outputs.display()))?;
        let mut bytes = serde_json::to_vec_pretty(&state)?;
        bytes.push(b'\n');
        crate::cache::write_file_atomic(&state_path, &bytes)?;
    }
    Ok(())
}

/// Remove the temp copies that a killed or failed publish left anywhere under `outputs/`.
/// Call only while holding the run lock: then no live process is writing them. Symbolic links
/// are not followed. Returns the paths removed.
pub fn clean_leftovers(outputs: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    clean_leftovers_in(outputs, &mut removed);
    removed
}

fn clean_leftovers_in(dir: &Path, removed: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let Ok(ty) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if is_leftover_name(&entry.file_name().to_string_lossy()) {
            match remove_any(&path) {
                Ok(()) => removed.push(path),
                Err(e) => tracing::warn!(
                    "could not remove {}, left by an interrupted publish: {e}",
                    path.display()
                ),
            }
        } else if ty.is_dir() {
            clean_leftovers_in(&path, removed);
        }
    }
}

/// Fail if `outputs/target`, or a folder on the way to it, is a symbolic link: writing through it
/// would put files (or remove them) outside `outputs/`.
fn refuse_symlinks(outputs: &Path, target: &str) -> anyhow::Result<()> {
    let mut path = outputs.to_path_buf();
    let mut shown = String::from("outputs");
    for component in target.split('/') {
        path.push(component);
        shown.push('/');
        shown.push_str(component);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&path)
                    .map(|t| format!(" (to {})", t.display()))
                    .unwrap_or_default();
                anyhow::bail!(
                    "cannot publish outputs/{target}: {shown} is a symbolic link{to}, and goemo never writes through a link out of outputs/\n  hint: remove the link (goemo recreates {shown} as a real file or folder)"
                );
            }
            Ok(_) => {}
            // Nothing below a missing component exists either.
            Err(_) => break,
        }
    }
    Ok(())
}

/// Copy `src` (file or folder) to a temp name beside `dest`, then swap it in. On failure the temp
/// copy is removed and `dest` is left as it was.
fn replace_with_copy(src: &Path, dest: &Path, mode: PublishMode) -> anyhow::Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let pid = std::process::id();
    let tmp: PathBuf = parent.join(format!(".{name}.goemo-tmp.{pid}"));
    let _ = remove_any(&tmp);
    if let Err(e) = copy_any(src, &tmp, mode) {
        let _ = remove_any(&tmp);
        return Err(e.into());
    }
    let dest_meta = std::fs::symlink_metadata(dest).ok();
    let swap = if dest_meta.is_some_and(|m| m.is_dir() || src.is_dir()) {
        // A folder cannot be renamed over another (nor over a file): move the old one aside.
        let old = parent.join(format!(".{name}.goemo-old.{pid}"));
        let _ = remove_any(&old);
        std::fs::rename(dest, &old).and_then(|()| {
            std::fs::rename(&tmp, dest).inspect_err(|_| {
                let _ = std::fs::rename(&old, dest);
            })?;
            crate::cache::sync_dir(parent);
            // The new copy is in place; an old one that will not go is removed by the next run.
            if let Err(e) = remove_any(&old) {
                tracing::warn!("could not remove {}: {e}", old.display());
            }
            Ok(())
        })
    } else {
        std::fs::rename(&tmp, dest)
    };
    if let Err(e) = swap {
        let _ = remove_any(&tmp);
        return Err(e.into());
    }
    crate::cache::sync_dir(parent);
    Ok(())
}

/// Copy (or link) a file or folder, each file and folder synced to disk before the swap makes
/// it visible.
fn copy_any(src: &Path, dest: &Path, mode: PublishMode) -> std::io::Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(dest)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_any(&e.path(), &dest.join(e.file_name()), mode)?;
        }
        crate::cache::sync_dir(dest);
        Ok(())
    } else if mode == PublishMode::Link && std::fs::hard_link(src, dest).is_ok() {
        Ok(())
    } else {
        std::fs::copy(src, dest)?;
        std::fs::File::open(dest)?.sync_all()
    }
}

/// Remove a file, folder or link (never what a link points to).
fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_are_recognised_exactly() {
        assert!(is_leftover_name(".model.goemo-tmp.4242"));
        assert!(is_leftover_name(".thresholds.json.goemo-old.7"));
        assert!(!is_leftover_name("model.goemo-tmp.4242"), "no leading dot");
        assert!(!is_leftover_name(".model.goemo-tmp."), "no pid");
        assert!(!is_leftover_name(".model.goemo-tmp.12x"));
        assert!(!is_leftover_name(".goemo-tmp.12"), "no target name");
        assert!(!is_leftover_name(STATE_FILE));
    }

    #[test]
    fn a_failed_copy_removes_its_temp_and_keeps_the_old_target() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), "new").unwrap();
        // A dangling link: copying it fails part-way through the folder.
        std::os::unix::fs::symlink(d.path().join("nowhere"), src.join("z")).unwrap();
        let outputs = d.path().join("outputs");
        let dest = outputs.join("model");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("a.txt"), "old").unwrap();
        assert!(replace_with_copy(&src, &dest, PublishMode::Copy).is_err());
        let left: Vec<String> = std::fs::read_dir(&outputs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["model"], "the temp copy is removed");
        assert_eq!(std::fs::read_to_string(dest.join("a.txt")).unwrap(), "old");
        // Without the broken file the swap goes through and leaves nothing beside it.
        std::fs::remove_file(src.join("z")).unwrap();
        replace_with_copy(&src, &dest, PublishMode::Copy).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("a.txt")).unwrap(), "new");
        assert_eq!(std::fs::read_dir(&outputs).unwrap().count(), 1);
    }
}
