//! The engine must build without any ML crate: `cargo tree -p goemo-engine` lists no candle,
//! polars, plotters or tokenizers. Checked here from Cargo.lock (every dependency kind, dev
//! ones included, so this is stricter than `cargo tree`), without running cargo.

#[path = "../../../tests/support/lock_graph.rs"]
mod lock_graph;

use lock_graph::{lock_graph, ml_crates, reach};

#[test]
fn the_engine_and_what_it_depends_on_pull_in_no_ml_crate() {
    let graph = lock_graph();
    for root in ["goemo-engine", "goemo-stage", "goemo-fsio"] {
        assert!(graph.contains_key(root), "{root} is not in Cargo.lock");
        let seen = reach(&graph, root);
        let ml = ml_crates(&seen);
        assert!(ml.is_empty(), "{root} depends on ML crates: {ml:?}");
        // The walk itself works: the engine's own dependencies are found.
        if root == "goemo-engine" {
            assert!(
                seen.contains("blake3") && seen.contains("goemo-stage"),
                "{seen:?}"
            );
        }
    }
}
