//! BERT- and DistilBERT-architecture encoders with HF's sequence-classification heads, for
//! training in candle.
//!
//! Parameters carry exactly the names `BertForSequenceClassification` /
//! `DistilBertForSequenceClassification` use (`bert.encoder.layer.0.attention.self.query.weight`,
//! `distilbert.transformer.layer.0.ffn.lin1.weight`, `classifier.weight`, …), so the export
//! loads in transformers without renaming. Where candle-transformers' modules fall short for
//! training (reference.md) this module differs on purpose:
//! - LayerNorm is composed from differentiable ops (candle-nn's fused op has no backward);
//! - dropout is real in training and seeded, so runs are reproducible;
//! - GELU is the erf form HF uses (candle's DistilBERT uses the tanh approximation);
//! - the padding mask is HF's: positions with `attention_mask == 0` get a large negative score,
//!   broadcast as `(batch, 1, 1, seq)`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;
use serde_json::Value;

pub use crate::classifier::Classifier;
pub use crate::config::{resolve_model_dir, Activation, Arch, EncoderConfig, ModelDir, Pooling};
use crate::config::{GOEMO_BERT, GOEMO_DISTILBERT};
use crate::params::{Dense, Encoder, Init, LayerNorm, Spec};

/// Tensors by their HF names, in the tree's order: a weight snapshot or a checkpoint part.
pub type NamedTensors = Vec<(String, Tensor)>;

/// The trainable parameters: candle variables in the typed tree.
pub struct Params {
    pub cfg: EncoderConfig,
    pub num_labels: usize,
    pub tree: Encoder<Var>,
    /// The tree's names and variables in its fixed order (`Encoder::slots`,
    /// `Encoder::leaves`; the variables share the tree's storage), for code that treats every
    /// parameter alike: checkpoints, gradient checks, test helpers.
    pub names: Vec<String>,
    pub vars: Vec<Var>,
}

impl Params {
    /// Seeded random initialisation (HF's: normal(0, initializer_range) weights, zero biases,
    /// unit LayerNorm weights), drawn leaf by leaf in the tree's order.
    pub fn init(
        cfg: &EncoderConfig,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Params> {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0.0f32, cfg.initializer_range as f32)
            .map_err(|e| anyhow::anyhow!("initializer_range {}: {e}", cfg.initializer_range))?;
        let tree = Encoder::<Spec>::new(cfg, num_labels).map(|_, spec| -> anyhow::Result<Var> {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = match spec.init {
                Init::Normal => (0..n).map(|_| normal.sample(&mut rng)).collect(),
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
            };
            Ok(Var::from_tensor(&Tensor::from_vec(
                data,
                spec.shape.clone(),
                device,
            )?)?)
        })?;
        Ok(Params::from_tree(cfg, num_labels, tree))
    }

    fn from_tree(cfg: &EncoderConfig, num_labels: usize, tree: Encoder<Var>) -> Params {
        let names = tree.slots().into_iter().map(|s| s.name).collect();
        let vars = tree.leaves().into_iter().cloned().collect();
        Params {
            cfg: cfg.clone(),
            num_labels,
            tree,
            names,
            vars,
        }
    }

    pub fn total(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Copy the backbone's weights from an HF `model.safetensors`. The head is new (absent from
    /// a base checkpoint) and keeps its initialisation; everything else must be there with the
    /// shape config.json implies. Names are matched with or without the `bert.`/`distilbert.`
    /// prefix, and `gamma`/`beta` stand for LayerNorm `weight`/`bias`.
    pub fn load_backbone(&self, file: &Path) -> anyhow::Result<LoadReport> {
        let bytes = std::fs::read(file)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: not a valid safetensors file: {e}", file.display())
        })?;
        let available: HashMap<String, String> = st
            .names()
            .into_iter()
            .flat_map(|n| {
                let canonical = n.replace(".gamma", ".weight").replace(".beta", ".bias");
                let with_prefix = format!("{}.{canonical}", self.cfg.prefix());
                [(canonical, n.to_string()), (with_prefix, n.to_string())]
            })
            .collect();
        let mut report = LoadReport::default();
        for (slot, var) in self.tree.slots().into_iter().zip(&self.vars) {
            let name = &slot.name;
            let Some(file_name) = available.get(name) else {
                if slot.head {
                    report.new_params.push(name.clone());
                    continue;
                }
                anyhow::bail!(
                    "{}: tensor `{name}` is missing\n  hint: the file does not match config.json (model_type `{}`); use the model.safetensors saved with this config",
                    file.display(),
                    self.cfg.raw["model_type"].as_str().unwrap_or("?")
                );
            };
            let view = st.tensor(file_name)?;
            if view.shape() != var.dims() {
                anyhow::bail!(
                    "{}: tensor `{file_name}` has shape {:?}, config.json implies {:?}\n  hint: config.json and model.safetensors come from different models",
                    file.display(),
                    view.shape(),
                    var.dims()
                );
            }
            let t = tensor_from_view(&view, var.device())
                .with_context(|| format!("{}: tensor `{file_name}`", file.display()))?;
            var.set(&t)?;
            report.loaded += 1;
        }
        Ok(report)
    }

    /// A copy of every parameter's current value (for the best epoch's weights).
    pub fn snapshot(&self) -> candle_core::Result<NamedTensors> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// The parameters as plain tensors (no autograd), for inference.
    pub fn detached(&self) -> Encoder<Tensor> {
        self.tree.map_each(|v| v.as_tensor().detach())
    }

    /// The parameters as tensors that track gradients, for candle's autograd.
    pub fn tensors(&self) -> Encoder<Tensor> {
        self.tree.map_each(|v| v.as_tensor().clone())
    }
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Parameters the checkpoint did not have (the new head).
    pub new_params: Vec<String>,
}

pub fn tensor_from_view(
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> anyhow::Result<Tensor> {
    use safetensors::tensor::Dtype as S;
    let shape = view.shape().to_vec();
    let data = view.data();
    let t = match view.dtype() {
        S::F32 => Tensor::from_vec(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        S::F16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        S::BF16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        other => anyhow::bail!("dtype {other:?} is not supported (F32, F16, BF16)"),
    };
    Ok(t)
}

/// Dropout that is active only when given an RNG (training), seeded so runs repeat.
fn dropout(x: &Tensor, p: f32, rng: &mut Option<&mut ChaCha8Rng>) -> candle_core::Result<Tensor> {
    let Some(rng) = rng.as_deref_mut() else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// LayerNorm from differentiable ops (candle-nn's fused op has no backward pass).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

fn linear(x: &Tensor, d: &Dense<Tensor>) -> candle_core::Result<Tensor> {
    let (w, b) = (&d.weight, &d.bias);
    // As one 2-D matmul over all rows: `broadcast_matmul` would broadcast the weight to
    // (batch, in, out), and its backward pass would then allocate and sum a gradient that size
    // for every linear layer in every step.
    let inner = x.dim(D::Minus1)?;
    let rows = x.elem_count() / inner.max(1);
    let y = x
        .reshape((rows, inner))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out_dims)
}

fn activate(x: &Tensor, a: Activation) -> candle_core::Result<Tensor> {
    match a {
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}

/// A padded batch: `ids` and `mask` are (batch, seq) u32.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
}

impl Batch {
    pub fn new(rows: &[&[u32]], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![pad_id; rows.len() * len];
        let mut mask = vec![0u32; rows.len() * len];
        for (i, r) in rows.iter().enumerate() {
            ids[i * len..i * len + r.len()].copy_from_slice(r);
            mask[i * len..i * len + r.len()]
                .iter_mut()
                .for_each(|m| *m = 1);
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (rows.len(), len), device)?,
            mask: Tensor::from_vec(mask, (rows.len(), len), device)?,
        })
    }
}

/// Logits (batch, labels) for a batch. `rng: Some` = training (dropout on).
pub fn forward(
    cfg: &EncoderConfig,
    p: &Encoder<Tensor>,
    batch: &Batch,
    mut rng: Option<&mut ChaCha8Rng>,
) -> candle_core::Result<Tensor> {
    let x = encode(cfg, p, batch, rng.as_deref_mut())?;
    let head_input = match cfg.pooling {
        Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => {
            // Padding excluded: Σ mask·x / Σ mask over each row.
            let mask = batch.mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let sum = x.broadcast_mul(&mask)?.sum(1)?;
            sum.broadcast_div(&mask.sum(1)?)?
        }
    };
    let pooled = linear(&head_input, &p.pool)?;
    // Arch::pool_activation, as tensor ops.
    let pooled = match cfg.arch {
        Arch::Bert => pooled.tanh()?,
        Arch::DistilBert => pooled.relu()?,
    };
    let pooled = dropout(&pooled, cfg.classifier_dropout, &mut rng)?;
    linear(&pooled, &p.classifier)
}

/// The encoder's last hidden states (batch, seq, hidden).
pub fn encode(
    cfg: &EncoderConfig,
    p: &Encoder<Tensor>,
    batch: &Batch,
    mut rng: Option<&mut ChaCha8Rng>,
) -> candle_core::Result<Tensor> {
    let (b, s) = batch.ids.dims2()?;
    let device = batch.ids.device();
    let e = &p.embeddings;
    let words = e.word.embedding(&batch.ids.flatten_all()?)?;
    let positions = Tensor::arange(0u32, s as u32, device)?;
    let pos = e.position.embedding(&positions)?;
    let mut x = words.reshape((b, s, cfg.hidden))?.broadcast_add(&pos)?;
    if let Some(token_type) = &e.token_type {
        // Single-segment input: token type 0 everywhere.
        x = x.broadcast_add(&token_type.get(0)?)?;
    }
    x = norm(&x, &e.norm, cfg.layer_norm_eps)?;
    x = dropout(&x, cfg.hidden_dropout, &mut rng)?;

    // HF's extended mask: (1 - mask) * large negative, shape (b, 1, 1, s).
    let bias = ((batch.mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, s))?;
    let (heads, dh) = (cfg.heads, cfg.hidden / cfg.heads);
    let scale = 1.0 / (dh as f64).sqrt();
    for layer in &p.layers {
        let split = |t: Tensor| t.reshape((b, s, heads, dh))?.transpose(1, 2)?.contiguous();
        let q = split((linear(&x, &layer.query)? * scale)?)?;
        let k = split(linear(&x, &layer.key)?)?;
        let v = split(linear(&x, &layer.value)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let probs = dropout(&probs, cfg.attention_dropout, &mut rng)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, cfg.hidden))?;
        let attn = dropout(
            &linear(&ctx, &layer.attn_out)?,
            cfg.hidden_dropout,
            &mut rng,
        )?;
        x = norm(&(attn + &x)?, &layer.attn_norm, cfg.layer_norm_eps)?;
        let hmid = activate(&linear(&x, &layer.ffn_in)?, cfg.activation)?;
        let ffn = dropout(
            &linear(&hmid, &layer.ffn_out)?,
            cfg.hidden_dropout,
            &mut rng,
        )?;
        x = norm(&(ffn + &x)?, &layer.ffn_norm, cfg.layer_norm_eps)?;
    }
    Ok(x)
}

fn norm(x: &Tensor, n: &LayerNorm<Tensor>, eps: f64) -> candle_core::Result<Tensor> {
    layer_norm(x, &n.weight, &n.bias, eps)
}

/// The Python modeling code of mean-pooling exports (transformers loads it with
/// `trust_remote_code=True`).
pub const MODELING_FILE: &str = "modeling_goemo.py";
const MODELING_PY: &str = include_str!("modeling_goemo.py");

/// config.json's keys that say which head reads the encoder: transformers' own classes for
/// [CLS] pooling; for mean pooling, goemo's model_type, `classifier_pooling: mean` and the
/// `auto_map` to [`MODELING_FILE`]'s classes. Keys a previous export left are replaced.
fn export_head(config: &mut Value, cfg: &EncoderConfig) {
    let (plain, goemo, class) = match cfg.arch {
        Arch::Bert => ("bert", GOEMO_BERT, "GoemoBertForSequenceClassification"),
        Arch::DistilBert => (
            "distilbert",
            GOEMO_DISTILBERT,
            "GoemoDistilBertForSequenceClassification",
        ),
    };
    let Some(o) = config.as_object_mut() else {
        return;
    };
    match cfg.pooling {
        Pooling::Cls => {
            o.insert("model_type".into(), plain.into());
            o.insert(
                "architectures".into(),
                serde_json::json!([cfg.architecture_name()]),
            );
            o.remove("classifier_pooling");
            o.remove("auto_map");
        }
        Pooling::Mean => {
            let config_class = match cfg.arch {
                Arch::Bert => "GoemoBertConfig",
                Arch::DistilBert => "GoemoDistilBertConfig",
            };
            o.insert("model_type".into(), goemo.into());
            o.insert("architectures".into(), serde_json::json!([class]));
            o.insert("classifier_pooling".into(), "mean".into());
            o.insert(
                "auto_map".into(),
                serde_json::json!({
                    "AutoConfig": format!("modeling_goemo.{config_class}"),
                    "AutoModelForSequenceClassification": format!("modeling_goemo.{class}"),
                }),
            );
        }
    }
}

/// Write an HF folder: config.json with the head's keys, model.safetensors with
/// `{"format": "pt"}` metadata (transformers refuses a file without it), tokenizer files.
pub fn export(
    dir: &Path,
    cfg: &EncoderConfig,
    tensors: &[(String, Tensor)],
    labels: &[String],
    tokenizer_from: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config = cfg.raw.clone();
    export_head(&mut config, cfg);
    config["id2label"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::String(l.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into();
    config["label2id"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    config["problem_type"] = "multi_label_classification".into();
    if let Some(o) = config.as_object_mut() {
        o.remove("_name_or_path");
    }
    goemo_fsio::write_json(&dir.join("config.json"), &config)?;

    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok((
                n.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.dims().to_vec(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, b, s)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::tensor::Dtype::F32,
                    s.clone(),
                    b,
                )?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, &dir.join("model.safetensors"))?;
    if cfg.pooling == Pooling::Mean {
        goemo_fsio::write_atomic(&dir.join(MODELING_FILE), MODELING_PY.as_bytes())?;
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        let src = tokenizer_from.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}
