//! Per-entry build locks, so that any number of runs in one project (a `goemo run`, the members
//! of a sweep, two `goemo exp run` started at once) build each cache entry once: the first that
//! needs a key builds it while holding `cache/locks/<key>.lock`; the others wait on that lock,
//! then find the committed entry and take it. DVC serialises whole runs on one lock instead.
//!
//! The locks are `flock(2)` locks, held per open file: a thread of this process and another
//! process conflict alike, and the OS drops the lock when its holder dies, so a killed run never
//! leaves a key locked. The same lock tells cleaners which temp and work folders are abandoned:
//! a folder whose key nobody holds belongs to no live build.
//!
//! Besides the entry locks, `cache/gc.lock` is held shared by every run and exclusively by
//! `goemo gc`, so gc never removes an entry a run is about to take.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Holds `cache/locks/<key>.lock` until dropped.
pub struct EntryLock {
    _file: File,
}

fn lock_path(cache_root: &Path, key: &str) -> PathBuf {
    cache_root.join("locks").join(format!("{key}.lock"))
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn context<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> anyhow::Error + 'a {
    move |e| anyhow::anyhow!("{what} {}: {e}", path.display())
}

impl EntryLock {
    /// Take the build lock for `key`, waiting for its holder if there is one; `on_wait` is called
    /// once, before waiting.
    pub fn acquire(cache_root: &Path, key: &str, on_wait: &dyn Fn()) -> anyhow::Result<EntryLock> {
        let path = lock_path(cache_root, key);
        let file = open(&path).map_err(context("opening", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                on_wait();
                file.lock().map_err(context("locking", &path))?;
            }
            Err(TryLockError::Error(e)) => return Err(context("locking", &path)(e)),
        }
        Ok(EntryLock { _file: file })
    }

    /// The lock for `key` when nobody holds it (`None`: a live build holds it).
    pub fn try_acquire(cache_root: &Path, key: &str) -> Option<EntryLock> {
        let file = open(&lock_path(cache_root, key)).ok()?;
        file.try_lock().ok()?;
        Some(EntryLock { _file: file })
    }
}

/// The key a folder under `tmp/` or `work/` belongs to (`<key>` or `<key>.<pid>.<n>`).
pub fn key_of(folder_name: &str) -> &str {
    folder_name.split('.').next().unwrap_or(folder_name)
}

/// `cache/gc.lock`: shared by runs, exclusive for gc.
pub struct GcLock {
    _file: File,
}

impl GcLock {
    /// Shared: any number of runs at once; waits while a gc holds it.
    pub fn for_run(cache_root: &Path, on_wait: &dyn Fn()) -> anyhow::Result<GcLock> {
        Self::take(cache_root, true, on_wait)
    }

    /// Exclusive: waits until no run is in progress.
    pub fn for_gc(cache_root: &Path, on_wait: &dyn Fn()) -> anyhow::Result<GcLock> {
        Self::take(cache_root, false, on_wait)
    }

    fn take(cache_root: &Path, shared: bool, on_wait: &dyn Fn()) -> anyhow::Result<GcLock> {
        let path = cache_root.join("gc.lock");
        let file = open(&path).map_err(context("opening", &path))?;
        let tried = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match tried {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                on_wait();
                let locked = if shared {
                    file.lock_shared()
                } else {
                    file.lock()
                };
                locked.map_err(context("locking", &path))?;
            }
            Err(TryLockError::Error(e)) => return Err(context("locking", &path)(e)),
        }
        Ok(GcLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_key_is_refused_until_its_holder_drops_it() {
        let d = tempfile::tempdir().unwrap();
        let held = EntryLock::acquire(d.path(), "abc", &|| panic!("free")).unwrap();
        // Another open of the same file conflicts, in this process as in another.
        assert!(EntryLock::try_acquire(d.path(), "abc").is_none());
        assert!(EntryLock::try_acquire(d.path(), "other").is_some());
        drop(held);
        assert!(EntryLock::try_acquire(d.path(), "abc").is_some());
    }

    #[test]
    fn a_waiter_blocks_until_the_holder_is_done() {
        let d = tempfile::tempdir().unwrap();
        let held = EntryLock::acquire(d.path(), "k", &|| {}).unwrap();
        let waited = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                EntryLock::acquire(d.path(), "k", &|| {
                    waited.store(true, std::sync::atomic::Ordering::SeqCst)
                })
                .unwrap()
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
            h.join().unwrap();
        });
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn runs_share_the_gc_lock_and_gc_excludes_them() {
        let d = tempfile::tempdir().unwrap();
        let a = GcLock::for_run(d.path(), &|| panic!("runs share it")).unwrap();
        let _b = GcLock::for_run(d.path(), &|| panic!("runs share it")).unwrap();
        let path = d.path().join("gc.lock");
        let f = File::open(&path).unwrap();
        assert!(matches!(f.try_lock(), Err(TryLockError::WouldBlock)));
        drop(a);
        assert_eq!(key_of("0123ab.4242.7"), "0123ab");
        assert_eq!(key_of("0123ab"), "0123ab");
    }
}
