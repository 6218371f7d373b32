//! The run lock: one `goemo run` at a time per project. A second run waits and says so
//! (DVC fails with "busy"); with `--no-wait` it fails at once. The OS releases the lock when the
//! process dies, so a killed run never leaves the project locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct RunLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    /// Another run holds the lock and `--no-wait` was given. `who` is its ` (pid N)`, if known.
    #[error("another goemo run is running in this project{who}; --no-wait was given\n  hint: wait for it, or drop --no-wait to queue behind it")]
    Busy { who: String },
    /// The cache folder is a symbolic link whose target is missing (a shared cache not yet made).
    #[error("{} is a symbolic link to {}, which does not exist\n  hint: create {} to share that cache through the link, or remove the link to give this project its own cache", path.display(), target.display(), target.display())]
    DanglingLink { path: PathBuf, target: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RunLockError + 'a {
    move |source| RunLockError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Take the project's run lock. When another run holds it: fail at once unless `wait`, else call
/// `on_wait` with a sentence saying who holds it, and block until it is free.
pub fn acquire(
    cache_root: &Path,
    wait: bool,
    on_wait: &dyn Fn(&str),
) -> Result<RunLock, RunLockError> {
    if let Err(e) = std::fs::create_dir_all(cache_root) {
        // create_dir_all reports only "File exists" for a link to nowhere; say what it is.
        if let (Ok(link), false) = (std::fs::read_link(cache_root), cache_root.exists()) {
            let target = cache_root.parent().unwrap_or(Path::new("")).join(link);
            return Err(RunLockError::DanglingLink {
                path: cache_root.to_owned(),
                target,
            });
        }
        return Err(io("creating", cache_root)(e));
    }
    let path = cache_root.join("run.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("opening", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" ({holder})")
            };
            if !wait {
                return Err(RunLockError::Busy { who });
            }
            on_wait(&format!(
                "waiting for another goemo run in this project to finish{who}…"
            ));
            file.lock().map_err(io("locking", &path))?;
        }
        Err(TryLockError::Error(e)) => return Err(io("locking", &path)(e)),
    }
    let note = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| write!(file, "pid {}", std::process::id()));
    note.map_err(io("writing", &path))?;
    Ok(RunLock { _file: file })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_cache_linked_to_a_missing_folder_is_named_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        std::os::unix::fs::symlink("shared-cache", &cache).unwrap();
        let err = acquire(&cache, false, &|_| {})
            .err()
            .expect("a dangling link must fail");
        let text = err.to_string();
        assert!(text.contains("is a symbolic link to"), "{text}");
        assert!(
            text.contains("shared-cache, which does not exist"),
            "{text}"
        );
        assert!(text.contains("hint: create"), "{text}");
        // Once the target exists, the link is followed and the lock is taken inside it.
        std::fs::create_dir(tmp.path().join("shared-cache")).unwrap();
        let _lock = acquire(&cache, false, &|_| {}).unwrap();
        assert!(tmp.path().join("shared-cache/run.lock").is_file());
    }
}
