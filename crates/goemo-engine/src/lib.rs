//! goemo's engine: pipeline.yaml, the DAG, fingerprints, the cache, the lock and the executor.
//!
//! It runs stages through the [`goemo_stage::Stage`] trait, looked up in the
//! [`goemo_stage::Registry`] the caller passes to [`pipeline::load`], and knows nothing about
//! what they compute: this crate depends on no ML crate (no candle, polars, plotters or
//! tokenizers), and `cargo tree -p goemo-engine` shows it.
//!
//! Where to start reading: [`fingerprint`] (what a stage key is made of, and why a stage is
//! stale), then [`cache`] (entries, commit points, gc), then [`engine`] (one `goemo run`).

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
