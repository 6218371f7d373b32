//! goemo-remote pulls in no ML crate, and the engine does not depend on it (the arrow from
//! engine to remote would put object_store and tokio under every engine test). Checked from
//! Cargo.lock, every dependency kind included, without running cargo.

#[path = "../../../tests/support/lock_graph.rs"]
mod lock_graph;

use lock_graph::{lock_graph, ml_crates, reach};

#[test]
fn the_remote_pulls_in_no_ml_crate_and_the_engine_not_the_remote() {
    let graph = lock_graph();
    let remote = reach(&graph, "goemo-remote");
    assert!(
        remote.contains("object_store") && remote.contains("goemo-engine"),
        "{remote:?}"
    );
    let ml = ml_crates(&remote);
    assert!(ml.is_empty(), "goemo-remote depends on ML crates: {ml:?}");
    let engine = reach(&graph, "goemo-engine");
    assert!(!engine.contains("goemo-remote") && !engine.contains("object_store"));
}
