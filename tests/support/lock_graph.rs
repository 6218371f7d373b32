//! Cargo.lock as a dependency graph, for the tests that keep ML crates out of the engine and the
//! remote cache (crates/goemo-engine/tests/no_ml_dependencies.rs,
//! crates/goemo-remote/tests/dependencies.rs include it with `#[path]`): read without running
//! cargo, every dependency kind included, so it is stricter than `cargo tree`.

use std::collections::{BTreeMap, BTreeSet};

/// Crate-name prefixes the engine and the remote cache must never reach.
pub const FORBIDDEN: &[&str] = &[
    "candle",
    "polars",
    "plotters",
    "tokenizers",
    "gemm",
    "safetensors",
];

/// Package name → the names it depends on, for every package in the workspace's Cargo.lock.
pub fn lock_graph() -> BTreeMap<String, BTreeSet<String>> {
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
pub fn reach(graph: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(name) = stack.pop() {
        if seen.insert(name.clone()) {
            stack.extend(graph.get(&name).into_iter().flatten().cloned());
        }
    }
    seen
}

/// The packages in `names` that are ML crates.
pub fn ml_crates(names: &BTreeSet<String>) -> Vec<&String> {
    names
        .iter()
        .filter(|n| FORBIDDEN.iter().any(|f| n.starts_with(f)))
        .collect()
}
