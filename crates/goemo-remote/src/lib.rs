//! goemo's shared cache on object stores: `push` uploads local cache entries, `pull` downloads
//! them, verified, into the local cache, so a colleague's, CI's or another machine's run is not
//! recomputed.
//!
//! A remote is configured by URL (see [`config`]): `s3://bucket/prefix` (S3, or an
//! S3-compatible server such as MinIO or Ceph through `AWS_ENDPOINT_URL`) or
//! `file:///abs/folder` (a local or network folder), through the `object_store` crate.
//! Credentials come only from each store's standard environment; no goemo file holds them and
//! no message shows them ([`error::scrub`]).
//!
//! Layout on the remote (see [`store`]): `objects/<blake3>` holds each distinct file once;
//! `volatile/<key>.json` lists an entry's volatile files; `entries/<key>.json` is the entry's
//! `manifest.json`, uploaded last with a conditional create, so a reader never sees half an
//! entry and two pushers of one key leave one good entry. A pull checks every file's size and
//! blake3 against the manifest before the entry is committed locally ([`pull`]).
//! `leases/<key>.json`, created with a conditional put, says which worker is building a key
//! ([`lease`]); [`RemoteCache`] is how a run uses all this, stage by stage.
//!
//! **May depend on:** `goemo-engine` (the cache, its locks and manifests),
//! `object_store` and what it needs (tokio, futures, bytes, url). **May not depend on:** any ML
//! crate, nor `goemo-stages`; and `goemo-engine` never depends on this crate.

pub mod config;
pub mod error;
pub mod lease;
pub mod location;
pub mod pull;
pub mod push;
pub mod records;
pub mod shared;
pub mod store;
pub mod transfer;

pub use config::resolve;
pub use error::RemoteError;
pub use location::RemoteUrl;
pub use pull::pull;
pub use push::push;
pub use shared::{Notice, RemoteCache};
pub use store::Remote;
pub use transfer::{EntryReport, Options, Outcome, Progress, Report, Wanted};

/// A stage key as goemo writes them: 64 lowercase hex digits (blake3). Anything else (from a
/// damaged pipeline.lock) is refused before it becomes a path, locally or on the remote.
pub fn is_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}
