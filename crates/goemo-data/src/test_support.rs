//! Where tests find GoEmotions and all-MiniLM-L6-v2 (for goemo-testing and this crate's tests;
//! built only under `cfg(test)` or the `test-support` feature, never into a release).

use std::path::PathBuf;

/// The GoEmotions folder tests read slices of: `$GOEMO_DATA`, else the project's
/// `data/goemotions` (what ./setup.sh makes), else the shared mirror beside the project.
/// Panics with the fix when none is there: a data test must never pass by skipping.
pub fn goemotions_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        std::env::var_os("GOEMO_DATA").map(PathBuf::from),
        Some(root.join("data/goemotions")),
        Some(root.join("../shared/goemotions")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("train.tsv").exists())
        .unwrap_or_else(|| panic!("GoEmotions not found: run ./setup.sh or set GOEMO_DATA to the folder holding train.tsv"))
}

/// The all-MiniLM-L6-v2 folder that ./setup.sh unpacks (or `$GOEMO_MODEL`).
pub fn minilm_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        std::env::var_os("GOEMO_MODEL").map(PathBuf::from),
        Some(root.join("models/all-MiniLM-L6-v2")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("model.safetensors").exists())
        .unwrap_or_else(|| panic!("all-MiniLM-L6-v2 not found: run ./setup.sh (it unpacks it into models/) or set GOEMO_MODEL"))
}
