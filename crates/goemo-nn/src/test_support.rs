//! Tiny random models and gradient checks (for goemo-testing and this crate's tests; built only
//! under `cfg(test)` or the `test-support` feature, never into a release).

/// config.json of a tiny random model: BERT or DistilBERT shaped, the MiniLM vocabulary.
pub fn tiny_config(arch: crate::config::Arch, dropout: f64) -> serde_json::Value {
    match arch {
        crate::config::Arch::Bert => serde_json::json!({
            "model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 128,
            "type_vocab_size": 2, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0
        }),
        crate::config::Arch::DistilBert => serde_json::json!({
            "model_type": "distilbert", "vocab_size": 30522, "dim": 16, "n_layers": 2, "n_heads": 2,
            "hidden_dim": 32, "max_position_embeddings": 128, "dropout": dropout, "attention_dropout": dropout,
            "seq_classif_dropout": dropout, "activation": "gelu", "initializer_range": 0.02, "pad_token_id": 0
        }),
    }
}

/// The largest elementwise difference of two equally long float slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `len` reproducible floats, uniform in [-1, 1).
pub fn random_floats(len: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
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
    grads: &crate::params::Encoder<Vec<f32>>,
    loss_at: impl Fn(&crate::model::Params) -> f64,
    skip: impl Fn(&str) -> bool,
    what: &str,
) -> usize {
    check_finite_differences_within(params, grads, loss_at, skip, 0.05, what)
}

/// [`check_finite_differences`] with the relative tolerance given (0.05 there).
pub fn check_finite_differences_within(
    params: &crate::model::Params,
    grads: &crate::params::Encoder<Vec<f32>>,
    loss_at: impl Fn(&crate::model::Params) -> f64,
    skip: impl Fn(&str) -> bool,
    rel_tol: f64,
    what: &str,
) -> usize {
    let grads = grads.leaves();
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
            err <= rel_tol * (g as f64).abs() + 1e-5,
            "{what} {name}[{j}]: backprop {g}, finite difference {fd}"
        );
        checked += 1;
    }
    checked
}
