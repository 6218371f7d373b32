//! Helpers shared by unit and integration tests (not part of the API).

use std::path::PathBuf;

/// The GoEmotions folder tests read slices of: `$GOEMO_DATA`, else the project's
/// `data/goemotions` (what ./setup.sh makes), else the shared mirror beside the project.
/// Panics with the fix when none is there: a data test must never pass by skipping.
pub fn goemotions_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
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
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
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

/// A small real slice: the first `n_train` train rows and `n_dev` dev rows of GoEmotions,
/// tokenized with the all-MiniLM-L6-v2 tokenizer.
pub fn real_tokens(n_train: usize, n_dev: usize, max_len: usize) -> crate::tokens::TokenizedData {
    use crate::data::Split;
    let dir = goemotions_dir();
    let shown = |p: &std::path::Path| p.display().to_string();
    let labels = crate::load::read_label_names(&dir, &shown).expect("labels.txt");
    let mut rows = Vec::new();
    for (split, n) in [(Split::Train, n_train), (Split::Dev, n_dev)] {
        let bytes = std::fs::read(dir.join(format!("{}.tsv", split.name()))).expect("split file");
        let mut rejects = Vec::new();
        let (r, _) =
            crate::load::parse_official(&bytes, split.name(), split, labels.len(), &mut rejects);
        rows.extend(r.into_iter().take(n));
    }
    crate::tokenize::build(&rows, labels, &minilm_dir(), max_len).expect("tokenize")
}

/// config.json of a tiny random model: BERT or DistilBERT shaped, the MiniLM vocabulary.
pub fn tiny_config(arch: crate::model::Arch, dropout: f64) -> serde_json::Value {
    match arch {
        crate::model::Arch::Bert => serde_json::json!({
            "model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 128,
            "type_vocab_size": 2, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0
        }),
        crate::model::Arch::DistilBert => serde_json::json!({
            "model_type": "distilbert", "vocab_size": 30522, "dim": 16, "n_layers": 2, "n_heads": 2,
            "hidden_dim": 32, "max_position_embeddings": 128, "dropout": dropout, "attention_dropout": dropout,
            "seq_classif_dropout": dropout, "activation": "gelu", "initializer_range": 0.02, "pad_token_id": 0
        }),
    }
}

/// Write a tiny random base model folder (config.json, model.safetensors with base-model names,
/// the MiniLM tokenizer files) into `dir`.
pub fn write_tiny_model(dir: &std::path::Path, arch: crate::model::Arch, dropout: f64, seed: u64) {
    use crate::model::{EncoderConfig, Params};
    std::fs::create_dir_all(dir).unwrap();
    let raw = tiny_config(arch, dropout);
    crate::write_json(&dir.join("config.json"), &raw).unwrap();
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
    stage: &dyn crate::Stage,
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
    let record = crate::RunRecord::default();
    let (out, vol, work) = (
        dir.path().join("out"),
        dir.path().join("volatile"),
        dir.path().join("work"),
    );
    let ctx = crate::StageContext {
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

/// The largest elementwise difference of two equally long float slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Token rows of lengths 1..=`max_len` in a scrambled order, [CLS] … [SEP] like the
/// tokenizer's, so a padded batch has much padding.
pub fn random_token_rows(n: usize, max_len: usize, seed: u64) -> Vec<Vec<u32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=max_len);
            (0..len)
                .map(|t| match t {
                    0 => 101,
                    t if t + 1 == len && len > 1 => 102,
                    _ => rng.random_range(1000..30000),
                })
                .collect()
        })
        .collect()
}

/// Compare `grads` with central differences (step 1e-2) of `loss_at`, on the element with the
/// largest gradient of every tensor whose name `skip` leaves in and whose largest gradient is
/// at least 1e-4 (a clear signal in f32). Panics, naming the tensor and element, where the two
/// differ by more than 5% + 1e-5; returns how many tensors it checked. Each parameter is put
/// back as it was.
pub fn check_finite_differences(
    params: &crate::model::Params,
    grads: &[Vec<f32>],
    loss_at: impl Fn(&crate::model::Params) -> f64,
    skip: impl Fn(&str) -> bool,
    what: &str,
) -> usize {
    let mut checked = 0;
    for (k, name) in params.names.iter().enumerate() {
        if skip(name) {
            continue;
        }
        let (j, &g) = grads[k]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        if g.abs() < 1e-4 {
            continue;
        }
        let var = &params.vars[k];
        let original: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        let loss_with = |delta: f32| {
            let mut v = original.clone();
            v[j] += delta;
            var.set(&candle_core::Tensor::from_vec(v, var.shape(), var.device()).unwrap())
                .unwrap();
            loss_at(params)
        };
        let h = 1e-2f32;
        let fd = (loss_with(h) - loss_with(-h)) / (2.0 * h as f64);
        loss_with(0.0);
        let err = (fd - g as f64).abs();
        assert!(
            err <= 0.05 * (g as f64).abs() + 1e-5,
            "{what} {name}[{j}]: backprop {g}, finite difference {fd}"
        );
        checked += 1;
    }
    checked
}
