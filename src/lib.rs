//! goemo's engine: pipeline.yaml, the DAG, fingerprints, the cache, the executor. It runs
//! stages through the [`goemo_stages::Stage`] trait and knows nothing about what they compute.

pub mod cache;
pub mod dag;
pub mod engine;
pub mod error;
pub mod fingerprint;
pub mod hashing;
pub mod lockfile;
pub mod pipeline;
pub mod publish;
pub mod runlock;
