//! Helpers the remote's tests share: cache entries committed through the engine's own path.
#![allow(dead_code)]

use std::collections::BTreeMap;

use goemo_engine::cache::Cache;
use goemo_engine::fingerprint::{Fingerprint, FORMAT};

/// A `command` fingerprint that `tag` makes distinct.
pub fn fingerprint(tag: &str) -> Fingerprint {
    Fingerprint {
        format: FORMAT,
        kind: "command".into(),
        version: 1,
        params: serde_json::json!({ "cmd": tag }),
        inputs: BTreeMap::new(),
    }
}

/// Commit an entry for `tag` holding `files` (`out/…` or `volatile/…` → bytes); its key.
pub fn entry(cache: &Cache, tag: &str, files: &[(&str, &[u8])]) -> String {
    let fp = fingerprint(tag);
    let key = fp.key();
    let pending = cache.begin(&key).unwrap();
    for (rel, bytes) in files {
        let path = pending.dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    cache
        .commit(pending, tag, fp, BTreeMap::new(), 0.5)
        .unwrap();
    key
}
