//! Content hashes of files and folders (blake3).
//!
//! - A folder's hash is blake3 over its sorted `relative/path`, file hash and size lines, so it
//!   depends on names and bytes only: never on mtimes, owners or where the project lives.
//! - Large files are hashed memory-mapped with blake3's rayon tree hashing; the files of a
//!   folder are hashed in parallel.
//! - Within one run a file is hashed once ([`ContentHasher`] memoises by path).
//! - Across runs, a stat cache (`cache/stat-cache.json`) skips re-reading a file whose size,
//!   mtime, ctime and inode are unchanged, like git's index. It only saves the read: the key
//!   still holds the content hash. A file modified within two seconds of being hashed is not
//!   trusted (git's "racy" rule), and `goemo run --verify` ignores the stat cache altogether.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub blake3: String,
    pub size: u64,
}

/// A file or folder: its files by relative path (`.` for a lone file) and one hash over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    pub hash: String,
    pub files: BTreeMap<String, FileDigest>,
}

/// Folders whose hash would be noise (editor and VCS droppings).
const SKIPPED_NAMES: &[&str] = &[".git", ".DS_Store", "__pycache__"];

/// Files at least this large are memory-mapped and hashed with rayon.
const LARGE_FILE: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StatKey {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StatEntry {
    stat: StatKey,
    blake3: String,
    hashed_at_ns: i128,
}

pub struct ContentHasher {
    memo: Mutex<HashMap<PathBuf, FileDigest>>,
    stat_cache_file: Option<PathBuf>,
    stat_cache: Mutex<HashMap<PathBuf, StatEntry>>,
    stat_cache_dirty: Mutex<bool>,
}

impl ContentHasher {
    /// `stat_cache_file`: where to keep the stat cache; `None` re-reads every file.
    pub fn new(stat_cache_file: Option<PathBuf>) -> Self {
        let stat_cache = stat_cache_file
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Vec<(PathBuf, StatEntry)>>(&b).ok())
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
        ContentHasher {
            memo: Mutex::default(),
            stat_cache_file,
            stat_cache: Mutex::new(stat_cache),
            stat_cache_dirty: Mutex::new(false),
        }
    }

    pub fn file(&self, path: &Path) -> std::io::Result<FileDigest> {
        if let Some(d) = self.memo.lock().expect("poisoned").get(path) {
            return Ok(d.clone());
        }
        let meta = std::fs::metadata(path)?;
        let stat = stat_key(&meta);
        let trusted = self.stat_cache_file.is_some().then(|| {
            let cache = self.stat_cache.lock().expect("poisoned");
            cache
                .get(path)
                .filter(|e| {
                    e.stat == stat
                        && e.hashed_at_ns - stat.mtime_ns.max(stat.ctime_ns) > 2_000_000_000
                })
                .map(|e| e.blake3.clone())
        });
        let blake3 = match trusted.flatten() {
            Some(h) => h,
            None => {
                let h = hash_file_contents(path, meta.len())?;
                if self.stat_cache_file.is_some() {
                    self.stat_cache.lock().expect("poisoned").insert(
                        path.to_path_buf(),
                        StatEntry {
                            stat: stat.clone(),
                            blake3: h.clone(),
                            hashed_at_ns: now_ns(),
                        },
                    );
                    *self.stat_cache_dirty.lock().expect("poisoned") = true;
                }
                h
            }
        };
        let digest = FileDigest {
            blake3,
            size: stat.size,
        };
        self.memo
            .lock()
            .expect("poisoned")
            .insert(path.to_path_buf(), digest.clone());
        Ok(digest)
    }

    /// A file or a folder (recursively; symlinks followed).
    pub fn tree(&self, path: &Path) -> std::io::Result<TreeDigest> {
        let meta = std::fs::metadata(path)?;
        if !meta.is_file() && !meta.is_dir() {
            return Err(not_regular(path, &meta));
        }
        let files: BTreeMap<String, FileDigest> = if meta.is_file() {
            BTreeMap::from([(".".to_owned(), self.file(path)?)])
        } else {
            list_files(path)?
                .par_iter()
                .map(|rel| {
                    let d = self.file(&path.join(rel))?;
                    Ok((rel_string(rel), d))
                })
                .collect::<std::io::Result<_>>()?
        };
        Ok(TreeDigest {
            hash: tree_hash(&files),
            files,
        })
    }

    /// Write the stat cache back if it learned anything (best effort: it is only a shortcut).
    pub fn save(&self) {
        let (Some(file), true) = (
            &self.stat_cache_file,
            *self.stat_cache_dirty.lock().expect("poisoned"),
        ) else {
            return;
        };
        let cache = self.stat_cache.lock().expect("poisoned");
        let mut entries: Vec<(&PathBuf, &StatEntry)> =
            cache.iter().filter(|(p, _)| p.exists()).collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        if let Ok(bytes) = serde_json::to_vec(&entries) {
            if let Some(dir) = file.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = goemo_fsio::write_atomic(file, &bytes);
        }
    }
}

/// The hash of a set of files: what a folder's content is.
pub fn tree_hash(files: &BTreeMap<String, FileDigest>) -> String {
    let mut h = blake3::Hasher::new();
    for (rel, d) in files {
        h.update(rel.as_bytes());
        h.update(b"\0");
        h.update(d.blake3.as_bytes());
        h.update(b"\0");
        h.update(d.size.to_string().as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

pub fn hash_file_contents(path: &Path, size: u64) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    if size >= LARGE_FILE {
        h.update_mmap_rayon(path)?;
    } else {
        let mut f = std::fs::File::open(path)?;
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Relative paths of all files under `root`, links followed (in no particular order; callers
/// sort). A link that leads back to a folder above it is an error naming the link, as is
/// anything that is neither a file nor a folder (reading a FIFO or a device would block or
/// never end).
pub fn list_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let walk = walkdir::WalkDir::new(root)
        .follow_links(true)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !SKIPPED_NAMES.iter().any(|s| e.file_name() == *s));
    let mut out = Vec::new();
    for entry in walk {
        let entry = entry.map_err(walk_error)?;
        let ty = entry.file_type();
        if ty.is_file() {
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
            out.push(rel.to_path_buf());
        } else if !ty.is_dir() {
            let meta = entry.metadata().map_err(walk_error)?;
            return Err(not_regular(entry.path(), &meta));
        }
    }
    Ok(out)
}

fn walk_error(e: walkdir::Error) -> std::io::Error {
    if let (Some(ancestor), Some(path)) = (e.loop_ancestor(), e.path()) {
        return std::io::Error::other(format!(
            "{} is a symbolic link loop: it leads back to {}, which holds it; remove the link or point it elsewhere",
            path.display(),
            ancestor.display()
        ));
    }
    let path = e.path().map(Path::to_path_buf);
    match (e.into_io_error(), path) {
        (Some(io), Some(path)) => {
            std::io::Error::new(io.kind(), format!("{}: {io}", path.display()))
        }
        (Some(io), None) => io,
        (None, _) => std::io::Error::other("walking a folder failed"),
    }
}

fn not_regular(path: &Path, meta: &std::fs::Metadata) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "{} is {}, not a regular file or folder",
            path.display(),
            file_type_name(&meta.file_type())
        ),
    )
}

/// "a FIFO", "a socket", … for messages.
pub fn file_type_name(ty: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ty.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ty.is_socket() {
            return "a socket";
        }
        if ty.is_char_device() {
            return "a character device";
        }
        if ty.is_block_device() {
            return "a block device";
        }
    }
    if ty.is_dir() {
        "a folder"
    } else if ty.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// `a/b/c` on every platform.
pub fn rel_string(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

#[cfg(unix)]
fn stat_key(meta: &std::fs::Metadata) -> StatKey {
    use std::os::unix::fs::MetadataExt;
    StatKey {
        size: meta.len(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        inode: meta.ino(),
    }
}

#[cfg(not(unix))]
fn stat_key(meta: &std::fs::Metadata) -> StatKey {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    StatKey {
        size: meta.len(),
        mtime_ns,
        ctime_ns: mtime_ns,
        inode: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_hash_depends_on_names_and_bytes_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/x.txt"), "hello").unwrap();
            std::fs::write(d.join("y.bin"), vec![7u8; 3 << 20]).unwrap();
        }
        let h = ContentHasher::new(None);
        let ta = h.tree(a.path()).unwrap();
        let tb = h.tree(b.path()).unwrap();
        assert_eq!(ta.hash, tb.hash);
        assert_eq!(
            ta.files.keys().collect::<Vec<_>>(),
            vec!["sub/x.txt", "y.bin"]
        );
        // Golden value: blake3("hello").
        assert_eq!(
            ta.files["sub/x.txt"].blake3,
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        std::fs::write(b.path().join("sub/x.txt"), "hellO").unwrap();
        let h2 = ContentHasher::new(None);
        assert_ne!(h2.tree(b.path()).unwrap().hash, ta.hash);
    }

    #[test]
    fn stat_cache_is_used_only_for_settled_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "one").unwrap();
        let cache = d.path().join("stat.json");
        let h = ContentHasher::new(Some(cache.clone()));
        let first = h.file(&f).unwrap();
        h.save();
        // Rewritten at once with the same size: the entry is too fresh to trust.
        std::fs::write(&f, "two").unwrap();
        let h = ContentHasher::new(Some(cache));
        assert_ne!(h.file(&f).unwrap(), first);
    }
}
