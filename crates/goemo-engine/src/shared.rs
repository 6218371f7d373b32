//! A cache shared with other machines (an object store, a team's bucket), as the engine sees
//! it. The engine asks it for an entry at the moment a stage would be built, and hands it each
//! entry built here. The engine knows no store: `goemo-remote` implements [`SharedCache`].
//!
//! Both calls are made under the key's local build lock (`cache/locks/<key>.lock`), so within
//! one machine a key is fetched or built once; across machines the implementation decides how
//! workers agree (goemo-remote: a lease object created with a conditional put).

use std::sync::atomic::AtomicBool;

use crate::cache::Cache;

/// What the shared cache did with a key the local cache lacks.
pub enum Fetched {
    /// The entry is now in the local cache, verified; `waited_s` is how long another worker's
    /// build of it was waited for (0 when it was on the shared cache already).
    Pulled { waited_s: f64 },
    /// Build it here. `claim`, when set, tells other workers this one is building the key
    /// (a lease); it is dropped once [`SharedCache::built`] has shared the entry, or the build
    /// failed, so they stop waiting.
    Build { claim: Option<Box<dyn Send>> },
}

pub trait SharedCache: Sync {
    /// Bring `key` (stage `stage`'s entry) into `cache` if the shared cache has it, or wait for
    /// a worker building it elsewhere. Trouble with the remote is not an error of the run: the
    /// implementation reports it and answers `Build`. `cancel` is set on Ctrl-C.
    fn fetch(&self, stage: &str, key: &str, cache: &Cache, cancel: &AtomicBool) -> Fetched;

    /// The entry for `key` was built and committed in `cache`: share it (if this cache is
    /// writable). A failure is reported by the implementation, and never fails the stage.
    fn built(&self, stage: &str, key: &str, cache: &Cache);
}
