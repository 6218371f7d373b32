//! Helpers for goemo's tests, shared by every crate's integration tests and the binary's: where
//! the data and the model are, small real token sets, tiny random models, gradient checks, and a
//! stage runner. A dev-dependency only: nothing here is in a release build.

use std::path::PathBuf;

pub use goemo_data::test_support::{goemotions_dir, minilm_dir};
pub use goemo_nn::test_support::{
    check_finite_differences, max_abs_diff, random_token_rows, tiny_config,
};

/// A small real slice: the first `n_train` train rows and `n_dev` dev rows of GoEmotions,
/// tokenized with the all-MiniLM-L6-v2 tokenizer.
pub fn real_tokens(
    n_train: usize,
    n_dev: usize,
    max_len: usize,
) -> goemo_data::tokens::TokenizedData {
    use goemo_data::data::Split;
    let dir = goemotions_dir();
    let shown = |p: &std::path::Path| p.display().to_string();
    let labels = goemo_data::load::read_label_names(&dir, &shown).expect("labels.txt");
    let mut rows = Vec::new();
    for (split, n) in [(Split::Train, n_train), (Split::Dev, n_dev)] {
        let bytes = std::fs::read(dir.join(format!("{}.tsv", split.name()))).expect("split file");
        let mut rejects = Vec::new();
        let (r, _) = goemo_data::load::parse_official(
            &bytes,
            split.name(),
            split,
            labels.len(),
            &mut rejects,
        );
        rows.extend(r.into_iter().take(n));
    }
    goemo_data::tokenize::build(&rows, labels, &minilm_dir(), max_len).expect("tokenize")
}

/// Write a tiny random base model folder (config.json, model.safetensors with base-model names,
/// the MiniLM tokenizer files) into `dir`.
pub fn write_tiny_model(
    dir: &std::path::Path,
    arch: goemo_nn::model::Arch,
    dropout: f64,
    seed: u64,
) {
    use goemo_nn::model::{EncoderConfig, Params};
    std::fs::create_dir_all(dir).unwrap();
    let raw = tiny_config(arch, dropout);
    goemo_fsio::write_json(&dir.join("config.json"), &raw).unwrap();
    let cfg = EncoderConfig::from_json(raw).unwrap();
    let params = Params::init(&cfg, 28, seed, &candle_core::Device::Cpu).unwrap();
    // A base checkpoint: no classification head.
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = params
        .names
        .iter()
        .zip(&params.vars)
        .filter(|(n, _)| !n.starts_with("classifier.") && !n.starts_with("pre_classifier."))
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    for f in [
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = minilm_dir().join(f);
        if src.exists() {
            std::fs::copy(src, dir.join(f)).unwrap();
        }
    }
}

/// Run one stage outside the engine, as the engine would: params resolved from YAML, fresh
/// `out/`, `volatile/` and `work/` folders in the returned temp dir.
pub fn run_stage(
    stage: &dyn goemo_stage::Stage,
    params_yaml: &str,
    inputs: &[(&str, &std::path::Path)],
) -> anyhow::Result<tempfile::TempDir> {
    let raw: serde_yaml::Value = serde_yaml::from_str(params_yaml)?;
    let params = stage
        .resolve_params(&raw)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let dir = tempfile::tempdir()?;
    for sub in ["out", "volatile", "work"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    let inputs: std::collections::BTreeMap<String, PathBuf> = inputs
        .iter()
        .map(|(r, p)| (r.to_string(), p.to_path_buf()))
        .collect();
    let volatile = std::collections::BTreeMap::new();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let record = goemo_stage::RunRecord::default();
    let (out, vol, work) = (
        dir.path().join("out"),
        dir.path().join("volatile"),
        dir.path().join("work"),
    );
    let ctx = goemo_stage::StageContext {
        name: stage.kind(),
        params: &params,
        inputs: &inputs,
        upstream_volatile: &volatile,
        out_dir: &out,
        volatile_dir: &vol,
        work_dir: &work,
        project_dir: std::path::Path::new("/"),
        run_record: &record,
        cancel: &cancel,
        interactive: false,
    };
    stage.run(&ctx)?;
    Ok(dir)
}
