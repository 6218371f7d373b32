//! The engine must build without any ML crate: `cargo tree -p goemo-engine` lists no candle,
//! polars, plotters or tokenizers. Checked here from Cargo.lock (every dependency kind, dev
//! ones included, so this is stricter than `cargo tree`), without running cargo.

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

#[test]
fn the_engine_and_what_it_depends_on_pull_in_no_ml_crate() {
    let graph = lock_graph();
    for root in ["goemo-engine", "goemo-stage", "goemo-fsio"] {
        assert!(graph.contains_key(root), "{root} is not in Cargo.lock");
        let mut seen = BTreeSet::new();
        let mut stack = vec![root.to_owned()];
        while let Some(name) = stack.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            stack.extend(graph.get(&name).into_iter().flatten().cloned());
        }
        let ml: Vec<&String> = seen
            .iter()
            .filter(|n| FORBIDDEN.iter().any(|f| n.starts_with(f)))
            .collect();
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
