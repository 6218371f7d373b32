//! goemo-remote pulls in no ML crate, and the engine does not depend on it (the arrow from
//! engine to remote would put object_store and tokio under every engine test). Checked from
//! Cargo.lock, every dependency kind included, without running cargo.

use std::collections::{BTreeMap, BTreeSet};

const FORBIDDEN: &[&str] = &[
    "candle",
    "polars",
    "plotters",
    "tokenizers",
    "gemm",
    "safetensors",
];

/// Package name → the names it depends on, for every package in the workspace's Cargo.lock.
fn lock_graph() -> BTreeMap<String, BTreeSet<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock");
    let text = std::fs::read_to_string(path).expect("reading the workspace's Cargo.lock");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let mut name = None;
        let mut deps = BTreeSet::new();
        let mut in_deps = false;
        for line in block.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("name = ") {
                name = Some(n.trim_matches('"').to_owned());
            } else if line.starts_with("dependencies = [") {
                in_deps = !line.ends_with(']');
            } else if in_deps && line == "]" {
                in_deps = false;
            } else if in_deps {
                // `"name"` or `"name version"` or `"name version (source)"`.
                let dep = line.trim_end_matches(',').trim_matches('"');
                deps.insert(dep.split(' ').next().unwrap_or(dep).to_owned());
            }
        }
        if let Some(name) = name {
            graph.entry(name).or_default().extend(deps);
        }
    }
    graph
}

/// Every package `root` reaches in the lock graph, itself included.
fn reach(graph: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(name) = stack.pop() {
        if seen.insert(name.clone()) {
            stack.extend(graph.get(&name).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_remote_pulls_in_no_ml_crate_and_the_engine_not_the_remote() {
    let graph = lock_graph();
    let remote = reach(&graph, "goemo-remote");
    assert!(
        remote.contains("object_store") && remote.contains("goemo-engine"),
        "{remote:?}"
    );
    let ml: Vec<&String> = remote
        .iter()
        .filter(|n| FORBIDDEN.iter().any(|f| n.starts_with(f)))
        .collect();
    assert!(ml.is_empty(), "goemo-remote depends on ML crates: {ml:?}");
    let engine = reach(&graph, "goemo-engine");
    assert!(!engine.contains("goemo-remote") && !engine.contains("object_store"));
}
