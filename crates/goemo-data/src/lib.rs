//! GoEmotions as goemo reads it: the official splits or the raw rater files parsed into one
//! typed table ([`data`], stored as Arrow IPC through polars), per-split sampling ([`sample`]),
//! tokenizing into packed token ids ([`tokenize`], [`tokens`]) and fetching the files with
//! their checksums ([`fetch`]); [`summary`] types `summary.json`, the counts a report shows.
//! Knows nothing of pipelines, caching or models: the stages call it with paths and params.
//! Errors are [`DataError`] where a function has been moved off `anyhow`.

pub mod data;
mod error;
pub mod fetch;
pub mod load;
pub mod sample;
pub mod summary;
pub mod tokenize;
pub mod tokens;

pub use error::DataError;

#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
