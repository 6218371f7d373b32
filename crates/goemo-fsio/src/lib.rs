//! Files that a reader never sees half-written: every write goes to a temp file in the same
//! folder, is fsynced, renamed over the target, and the folder is fsynced so the rename survives
//! a crash. JSON is written pretty with a trailing newline and read back bit-exact
//! (serde_json's `float_roundtrip`). Used by every goemo crate; depends on nothing of goemo's
//! and may not (only serde, serde_json, tempfile, thiserror). Start at [`write_atomic`].

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A file that could not be written, read or parsed, with its path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Write `bytes` to `path` via a temp file in the same folder and a rename, so a reader never
/// sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // A bare file name (`pipeline.yaml`) has the empty path as its parent: the current folder.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A temp file is created owner-only (0600); results are ordinary files that others on the
    // machine may read (0644, less the umask), like any file a tool writes.
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the folder's entry is on disk.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Copy the file `from` to `to` as [`write_atomic`] writes: a temp file beside `to`, fsynced,
/// renamed over it, the folder fsynced. Streamed, so a model's weights are never held in memory
/// whole. Returns the bytes copied; errors name the file that could not be read or written.
pub fn copy_atomic(from: &Path, to: &Path) -> Result<u64, FsError> {
    use std::io::{Read, Write};
    let read_err = |source| FsError::Read {
        path: from.to_owned(),
        source,
    };
    let write_err = |source| FsError::Write {
        path: to.to_owned(),
        source,
    };
    let mut src = std::fs::File::open(from).map_err(read_err)?;
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder.tempfile_in(dir).map_err(write_err)?;
    // By hand rather than `io::copy`, so a failed read names `from` and a failed write `to`.
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        tmp.write_all(&buf[..n]).map_err(write_err)?;
        total += n as u64;
    }
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(to).map_err(|e| write_err(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(total)
}

/// Pretty JSON with a trailing newline, written atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), FsError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| FsError::Write {
        path: path.to_owned(),
        source: e.into(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| FsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Read and parse a JSON file; errors name it.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, FsError> {
    let bytes = std::fs::read(path).map_err(|source| FsError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| FsError::Parse {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn atomic_writes_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        write_atomic(&path, b"{}").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // 0644 less the umask; the usual umask (022) leaves it whole.
        assert_eq!(mode & 0o600, 0o600, "mode {mode:o}");
        assert_eq!(mode & !0o644, 0, "mode {mode:o}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
    }

    #[test]
    fn copies_are_whole_and_name_the_missing_source() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("model.safetensors");
        // Larger than the copy buffer, so the loop runs more than once.
        let bytes: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&from, &bytes).unwrap();
        let to = dir.path().join("copy.safetensors");
        std::fs::write(&to, b"old").unwrap();
        assert_eq!(copy_atomic(&from, &to).unwrap(), bytes.len() as u64);
        assert_eq!(std::fs::read(&to).unwrap(), bytes);
        let missing = dir.path().join("absent.json");
        let err = copy_atomic(&missing, &dir.path().join("x.json")).unwrap_err();
        assert!(matches!(err, FsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("absent.json"), "{err}");
        assert!(!dir.path().join("x.json").exists());
    }

    /// A checkpoint's log is written and read back: every float must keep every bit, or a
    /// resumed run's train_log.json differs from an uninterrupted one's (9.400000000000001e-05
    /// came back as 9.4e-05 with serde_json's default parser).
    #[test]
    fn json_floats_survive_a_write_and_read_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.json");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut values: Vec<f64> = vec![9.400000000000001e-05, 1e-4 * 0.94, 0.1 + 0.2, 5e-324];
        values.extend((0..20_000).map(|_| {
            let mantissa: f64 = rng.random_range(0.0..1.0);
            mantissa * 10f64.powi(rng.random_range(-12..4))
        }));
        write_json(&path, &values).unwrap();
        let back: Vec<f64> = read_json(&path).unwrap();
        let differing: Vec<String> = values
            .iter()
            .zip(&back)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .take(3)
            .map(|(a, b)| format!("{a:e} read back as {b:e}"))
            .collect();
        assert!(differing.is_empty(), "{}", differing.join("; "));
    }
}
