//! goemo's engine: pipeline.yaml, the DAG, fingerprints, the cache, the lock and the scheduler.
//!
//! It runs stages through the [`goemo_stage::Stage`] trait, looked up in the
//! [`goemo_stage::Registry`] the caller passes to [`pipeline::load`], and knows nothing about
//! what they compute.
//!
//! **May depend on:** `goemo-stage`, `goemo-fsio` and small general crates (serde, blake3,
//! rayon, walkdir). **May not depend on:** any ML crate (candle, polars, plotters, tokenizers)
//! nor `goemo-stages`; `tests/no_ml_dependencies.rs` checks Cargo.lock for it, so the engine's
//! tests build in seconds. It never prints: progress goes out as [`events::EngineEvent`]s to
//! the caller's [`events::Reporter`], errors as values (the CLI formats both).
//!
//! Where to start reading: [`fingerprint`] (what a stage key is made of, and why a stage is
//! stale), then [`cache`] (entries, commit points, gc), then [`engine`] (one `goemo run`: each
//! ready stage is assessed, taken from the cache or run; the per-stage slots live in the private
//! `scheduler` module). [`pipeline`] reads pipeline.yaml in four steps (parse → resolve deps →
//! validate → order); [`dag`] holds the graph algorithms, each linear in stages + edges.

pub mod cache;
pub mod dag;
pub mod edit;
pub mod engine;
pub mod entrylock;
pub mod error;
pub mod events;
pub mod experiment;
pub mod fingerprint;
pub mod hashing;
pub mod lockfile;
pub mod pipeline;
pub mod publish;
pub mod render;
pub mod reserved;
pub mod runlock;
mod scheduler;
pub mod shared;
pub mod sweep;
