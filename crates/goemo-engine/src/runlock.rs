//! The run lock: one `goemo run` at a time per project. A second run waits and says so
//! (DVC fails with "busy"); with `--no-wait` it fails at once. The OS releases the lock when the
//! process dies, so a killed run never leaves the project locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

pub struct RunLock {
    _file: File,
}

/// Take the project's run lock. When another run holds it: fail at once unless `wait`, else call
/// `on_wait` with a sentence saying who holds it, and block until it is free.
pub fn acquire(cache_root: &Path, wait: bool, on_wait: &dyn Fn(&str)) -> anyhow::Result<RunLock> {
    std::fs::create_dir_all(cache_root)?;
    let path = cache_root.join("run.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
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
                anyhow::bail!(
                    "another goemo run is running in this project{who}; --no-wait was given\n  hint: wait for it, or drop --no-wait to queue behind it"
                );
            }
            on_wait(&format!(
                "waiting for another goemo run in this project to finish{who}…"
            ));
            file.lock()
                .map_err(|e| anyhow::anyhow!("locking {}: {e}", path.display()))?;
        }
        Err(TryLockError::Error(e)) => anyhow::bail!("locking {}: {e}", path.display()),
    }
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    let _ = write!(file, "pid {}", std::process::id());
    Ok(RunLock { _file: file })
}
