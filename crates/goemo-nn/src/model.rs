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
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    DistilBert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

/// What the model code needs from an HF `config.json`, whichever architecture it names.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
    pub classifier_dropout: f32,
    pub activation: Activation,
    pub initializer_range: f64,
    /// The file as read, kept so the export is the base config plus the head's keys.
    pub raw: Value,
}

impl EncoderConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<EncoderConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("{}: cannot read: {e}\n  hint: a model folder needs config.json, model.safetensors and tokenizer.json (what `save_pretrained` writes)", path.display())
        })?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
        Self::from_json(raw).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_json(raw: Value) -> anyhow::Result<EncoderConfig> {
        let num = |keys: &[&str]| -> anyhow::Result<usize> {
            keys.iter()
                .find_map(|k| raw[*k].as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| anyhow::anyhow!("missing or non-integer `{}`", keys[0]))
        };
        let float = |key: &str, default: f64| raw[key].as_f64().unwrap_or(default);
        let act = |key: &str| -> anyhow::Result<Activation> {
            match raw[key].as_str().unwrap_or("gelu") {
                "gelu" => Ok(Activation::GeluErf),
                "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
                "relu" => Ok(Activation::Relu),
                other => anyhow::bail!("`{key}: {other}` is not supported (gelu, gelu_new, relu)"),
            }
        };
        let cfg = match raw["model_type"].as_str() {
            Some("bert") => EncoderConfig {
                arch: Arch::Bert,
                vocab_size: num(&["vocab_size"])?,
                hidden: num(&["hidden_size"])?,
                layers: num(&["num_hidden_layers"])?,
                heads: num(&["num_attention_heads"])?,
                intermediate: num(&["intermediate_size"])?,
                max_positions: num(&["max_position_embeddings"])?,
                type_vocab_size: num(&["type_vocab_size"]).unwrap_or(2),
                layer_norm_eps: float("layer_norm_eps", 1e-12),
                hidden_dropout: float("hidden_dropout_prob", 0.1) as f32,
                attention_dropout: float("attention_probs_dropout_prob", 0.1) as f32,
                classifier_dropout: raw["classifier_dropout"].as_f64().unwrap_or(float("hidden_dropout_prob", 0.1)) as f32,
                activation: act("hidden_act")?,
                initializer_range: float("initializer_range", 0.02),
                raw: raw.clone(),
            },
            Some("distilbert") => EncoderConfig {
                arch: Arch::DistilBert,
                vocab_size: num(&["vocab_size"])?,
                hidden: num(&["dim"])?,
                layers: num(&["n_layers"])?,
                heads: num(&["n_heads"])?,
                intermediate: num(&["hidden_dim"])?,
                max_positions: num(&["max_position_embeddings"])?,
                type_vocab_size: 0,
                layer_norm_eps: 1e-12,
                hidden_dropout: float("dropout", 0.1) as f32,
                attention_dropout: float("attention_dropout", 0.1) as f32,
                classifier_dropout: float("seq_classif_dropout", 0.2) as f32,
                activation: act("activation")?,
                initializer_range: float("initializer_range", 0.02),
                raw: raw.clone(),
            },
            Some(other) => anyhow::bail!("model_type `{other}` is not supported; goemo trains `bert` (BERT, all-MiniLM-L6-v2) and `distilbert`"),
            None => anyhow::bail!("no `model_type`; goemo trains `bert` and `distilbert` models"),
        };
        if cfg.heads == 0 || cfg.hidden % cfg.heads != 0 {
            anyhow::bail!(
                "hidden size {} is not a multiple of the {} attention heads",
                cfg.hidden,
                cfg.heads
            );
        }
        if cfg.arch == Arch::DistilBert && raw["sinusoidal_pos_embds"].as_bool() == Some(true) {
            anyhow::bail!("sinusoidal_pos_embds: true is not supported");
        }
        Ok(cfg)
    }

    /// The backbone's tensor-name prefix in HF checkpoints.
    pub(crate) fn prefix(&self) -> &'static str {
        match self.arch {
            Arch::Bert => "bert",
            Arch::DistilBert => "distilbert",
        }
    }

    /// The head's first layer: BERT's pooler (tanh after it), DistilBERT's pre_classifier
    /// (ReLU after it).
    pub fn pool_layer(&self) -> &'static str {
        match self.arch {
            Arch::Bert => "bert.pooler.dense",
            Arch::DistilBert => "pre_classifier",
        }
    }

    pub fn architecture_name(&self) -> &'static str {
        match self.arch {
            Arch::Bert => "BertForSequenceClassification",
            Arch::DistilBert => "DistilBertForSequenceClassification",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal,
    Zeros,
    Ones,
}

/// Every parameter of the classifier: name, shape, initialisation.
pub fn param_specs(cfg: &EncoderConfig, num_labels: usize) -> Vec<(String, Vec<usize>, Init)> {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let mut v: Vec<(String, Vec<usize>, Init)> = Vec::new();
    let lin = |v: &mut Vec<(String, Vec<usize>, Init)>, name: String, out: usize, inp: usize| {
        v.push((format!("{name}.weight"), vec![out, inp], Init::Normal));
        v.push((format!("{name}.bias"), vec![out], Init::Zeros));
    };
    let ln = |v: &mut Vec<(String, Vec<usize>, Init)>, name: String| {
        v.push((format!("{name}.weight"), vec![h], Init::Ones));
        v.push((format!("{name}.bias"), vec![h], Init::Zeros));
    };
    let p = cfg.prefix();
    v.push((
        format!("{p}.embeddings.word_embeddings.weight"),
        vec![cfg.vocab_size, h],
        Init::Normal,
    ));
    v.push((
        format!("{p}.embeddings.position_embeddings.weight"),
        vec![cfg.max_positions, h],
        Init::Normal,
    ));
    if cfg.arch == Arch::Bert {
        v.push((
            format!("{p}.embeddings.token_type_embeddings.weight"),
            vec![cfg.type_vocab_size.max(1), h],
            Init::Normal,
        ));
    }
    ln(&mut v, format!("{p}.embeddings.LayerNorm"));
    for l in 0..cfg.layers {
        let n = LayerNames::new(cfg, l);
        for name in [&n.q, &n.k, &n.v, &n.attn_out] {
            lin(&mut v, name.clone(), h, h);
        }
        ln(&mut v, n.attn_norm.clone());
        lin(&mut v, n.ffn_in.clone(), i, h);
        lin(&mut v, n.ffn_out.clone(), h, i);
        ln(&mut v, n.ffn_norm.clone());
    }
    lin(&mut v, cfg.pool_layer().into(), h, h);
    lin(&mut v, "classifier".into(), num_labels, h);
    v
}

/// HF's names for one encoder layer.
pub(crate) struct LayerNames {
    pub q: String,
    pub k: String,
    pub v: String,
    pub attn_out: String,
    pub attn_norm: String,
    pub ffn_in: String,
    pub ffn_out: String,
    pub ffn_norm: String,
}

impl LayerNames {
    pub(crate) fn new(cfg: &EncoderConfig, l: usize) -> LayerNames {
        match cfg.arch {
            Arch::Bert => {
                let b = format!("bert.encoder.layer.{l}");
                LayerNames {
                    q: format!("{b}.attention.self.query"),
                    k: format!("{b}.attention.self.key"),
                    v: format!("{b}.attention.self.value"),
                    attn_out: format!("{b}.attention.output.dense"),
                    attn_norm: format!("{b}.attention.output.LayerNorm"),
                    ffn_in: format!("{b}.intermediate.dense"),
                    ffn_out: format!("{b}.output.dense"),
                    ffn_norm: format!("{b}.output.LayerNorm"),
                }
            }
            Arch::DistilBert => {
                let b = format!("distilbert.transformer.layer.{l}");
                LayerNames {
                    q: format!("{b}.attention.q_lin"),
                    k: format!("{b}.attention.k_lin"),
                    v: format!("{b}.attention.v_lin"),
                    attn_out: format!("{b}.attention.out_lin"),
                    attn_norm: format!("{b}.sa_layer_norm"),
                    ffn_in: format!("{b}.ffn.lin1"),
                    ffn_out: format!("{b}.ffn.lin2"),
                    ffn_norm: format!("{b}.output_layer_norm"),
                }
            }
        }
    }
}

/// Is this parameter exempt from weight decay (biases and LayerNorm weights, as HF's Trainer)?
pub fn no_decay(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("LayerNorm") || name.contains("layer_norm")
}

/// Tensors by their HF names, in parameter order: a weight snapshot or a checkpoint part.
pub type NamedTensors = Vec<(String, Tensor)>;

/// The trainable parameters, in `param_specs` order.
pub struct Params {
    pub cfg: EncoderConfig,
    pub num_labels: usize,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    index: HashMap<String, usize>,
}

impl Params {
    /// Seeded random initialisation (HF's: normal(0, initializer_range) weights, zero biases,
    /// unit LayerNorm weights).
    pub fn init(
        cfg: &EncoderConfig,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Params> {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal =
            rand_distr::Normal::new(0.0f32, cfg.initializer_range as f32).expect("positive std");
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for (name, shape, init) in param_specs(cfg, num_labels) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = match init {
                Init::Normal => (0..n).map(|_| normal.sample(&mut rng)).collect(),
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
            };
            vars.push(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?);
            names.push(name);
        }
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Params {
            cfg: cfg.clone(),
            num_labels,
            names,
            vars,
            index,
        })
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.vars[self.index[name]].as_tensor()
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
        for (name, var) in self.names.iter().zip(&self.vars) {
            let Some(file_name) = available.get(name) else {
                if name.starts_with("classifier.")
                    || name.starts_with("pre_classifier.")
                    || name.contains(".pooler.")
                {
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
    pub fn detached(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().detach()))
            .collect()
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().clone()))
            .collect()
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

fn linear(x: &Tensor, p: &HashMap<String, Tensor>, name: &str) -> candle_core::Result<Tensor> {
    let w = &p[&format!("{name}.weight")];
    let b = &p[&format!("{name}.bias")];
    // As one 2-D matmul over all rows: `broadcast_matmul` would broadcast the weight to
    // (batch, in, out), and its backward pass would then allocate and sum a gradient that size
    // for every linear layer in every step.
    let dims = x.dims();
    let inner = *dims
        .last()
        .expect("a linear layer's input has at least one dimension");
    let rows = x.elem_count() / inner.max(1);
    let y = x
        .reshape((rows, inner))?
        .matmul(&w.t()?)?
        .broadcast_add(b)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = w.dim(0)?;
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
    p: &HashMap<String, Tensor>,
    batch: &Batch,
    mut rng: Option<&mut ChaCha8Rng>,
) -> candle_core::Result<Tensor> {
    let x = encode(cfg, p, batch, rng.as_deref_mut())?;
    let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
    let pooled = linear(&cls, p, cfg.pool_layer())?;
    let pooled = match cfg.arch {
        Arch::Bert => pooled.tanh()?,
        Arch::DistilBert => pooled.relu()?,
    };
    let pooled = dropout(&pooled, cfg.classifier_dropout, &mut rng)?;
    linear(&pooled, p, "classifier")
}

/// The encoder's last hidden states (batch, seq, hidden).
pub fn encode(
    cfg: &EncoderConfig,
    p: &HashMap<String, Tensor>,
    batch: &Batch,
    mut rng: Option<&mut ChaCha8Rng>,
) -> candle_core::Result<Tensor> {
    let (b, s) = batch.ids.dims2()?;
    let pre = cfg.prefix();
    let device = batch.ids.device();
    let words = p[&format!("{pre}.embeddings.word_embeddings.weight")]
        .embedding(&batch.ids.flatten_all()?)?;
    let positions = Tensor::arange(0u32, s as u32, device)?;
    let pos = p[&format!("{pre}.embeddings.position_embeddings.weight")].embedding(&positions)?;
    let mut x = words.reshape((b, s, cfg.hidden))?.broadcast_add(&pos)?;
    if cfg.arch == Arch::Bert {
        // Single-segment input: token type 0 everywhere.
        let tt = p[&format!("{pre}.embeddings.token_type_embeddings.weight")].get(0)?;
        x = x.broadcast_add(&tt)?;
    }
    x = layer_norm(
        &x,
        &p[&format!("{pre}.embeddings.LayerNorm.weight")],
        &p[&format!("{pre}.embeddings.LayerNorm.bias")],
        cfg.layer_norm_eps,
    )?;
    x = dropout(&x, cfg.hidden_dropout, &mut rng)?;

    // HF's extended mask: (1 - mask) * large negative, shape (b, 1, 1, s).
    let bias = ((batch.mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, s))?;
    let (heads, dh) = (cfg.heads, cfg.hidden / cfg.heads);
    let scale = 1.0 / (dh as f64).sqrt();
    for l in 0..cfg.layers {
        let n = LayerNames::new(cfg, l);
        let split = |t: Tensor| t.reshape((b, s, heads, dh))?.transpose(1, 2)?.contiguous();
        let q = split((linear(&x, p, &n.q)? * scale)?)?;
        let k = split(linear(&x, p, &n.k)?)?;
        let v = split(linear(&x, p, &n.v)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let probs = dropout(&probs, cfg.attention_dropout, &mut rng)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, cfg.hidden))?;
        let attn = dropout(&linear(&ctx, p, &n.attn_out)?, cfg.hidden_dropout, &mut rng)?;
        x = layer_norm(
            &(attn + &x)?,
            &p[&format!("{}.weight", n.attn_norm)],
            &p[&format!("{}.bias", n.attn_norm)],
            cfg.layer_norm_eps,
        )?;
        let hmid = activate(&linear(&x, p, &n.ffn_in)?, cfg.activation)?;
        let ffn = dropout(&linear(&hmid, p, &n.ffn_out)?, cfg.hidden_dropout, &mut rng)?;
        x = layer_norm(
            &(ffn + &x)?,
            &p[&format!("{}.weight", n.ffn_norm)],
            &p[&format!("{}.bias", n.ffn_norm)],
            cfg.layer_norm_eps,
        )?;
    }
    Ok(x)
}

/// A model folder as users give it: config, weights, tokenizer.
pub struct ModelDir {
    pub dir: PathBuf,
    pub cfg: EncoderConfig,
    pub weights: PathBuf,
}

impl ModelDir {
    /// Resolve a local HF folder, or a model id in the HF cache (`~/.cache/huggingface/hub`).
    pub fn open(path: &Path) -> anyhow::Result<ModelDir> {
        let dir = resolve_model_dir(path)?;
        let cfg = EncoderConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            anyhow::bail!(
                "{}: no model.safetensors\n  hint: goemo reads safetensors weights; convert pytorch_model.bin with transformers' `save_pretrained(safe_serialization=True)`",
                dir.display()
            );
        }
        Ok(ModelDir { dir, cfg, weights })
    }
}

/// `path` itself when it holds config.json, else a snapshot of it in the HF hub cache layout
/// (`models--ORG--NAME/snapshots/<rev>/`).
pub fn resolve_model_dir(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    let id = path.to_string_lossy().replace('/', "--");
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        });
    if let Some(hub) = hub {
        let repo = hub.join(format!("models--{id}"));
        let rev = std::fs::read_to_string(repo.join("refs/main")).ok();
        let snapshot = match rev {
            Some(r) => Some(repo.join("snapshots").join(r.trim())),
            None => std::fs::read_dir(repo.join("snapshots"))
                .ok()
                .and_then(|rd| rd.flatten().map(|e| e.path()).next()),
        };
        if let Some(s) = snapshot.filter(|s| s.join("config.json").exists()) {
            return Ok(s);
        }
    }
    anyhow::bail!(
        "{}: no config.json there, and no such model in the Hugging Face cache\n  hint: give a folder holding config.json, model.safetensors and tokenizer.json (./setup.sh makes models/all-MiniLM-L6-v2)",
        path.display()
    )
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
    config["architectures"] = serde_json::json!([cfg.architecture_name()]);
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

/// A fine-tuned classifier loaded for inference from an HF folder (goemo's export, or any
/// `*ForSequenceClassification` checkpoint of a supported architecture).
pub struct Classifier {
    pub dir: PathBuf,
    pub cfg: EncoderConfig,
    pub labels: Vec<String>,
    pub device: Device,
    scorer: Scorer,
}

/// How a classifier computes its scores. On the CPU only the packed copy of the weights is
/// kept once loaded; the candle tensors are freed then (while loading, both copies exist, so
/// the peak memory is not lower, only what stays resident while scoring).
enum Scorer {
    /// The padding-free CPU encoder (infer.rs).
    Packed(Box<crate::infer::PackedEncoder>),
    /// `forward` on padded batches, on other devices.
    Graph(HashMap<String, Tensor>),
}

impl Classifier {
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Classifier> {
        let md = ModelDir::open(path)?;
        let config_path = md.dir.join("config.json");
        let id2label = md.cfg.raw["id2label"].as_object().ok_or_else(|| {
            anyhow::anyhow!("{}: no `id2label`; this is a base model, not a fine-tuned classifier (train one with `goemo run`)", config_path.display())
        })?;
        let mut labels = vec![String::new(); id2label.len()];
        for (k, v) in id2label {
            let i: usize = k.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: id2label key `{k}` is not an index",
                    config_path.display()
                )
            })?;
            let slot = labels.get_mut(i).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: id2label index {i} is out of range",
                    config_path.display()
                )
            })?;
            *slot = v.as_str().unwrap_or_default().to_owned();
        }
        let file = &md.weights;
        let loaded = candle_core::safetensors::load(file, device)
            .map_err(|e| anyhow::anyhow!("{}: cannot load: {e}", file.display()))?;
        let mut weights = HashMap::new();
        for (name, shape, _) in param_specs(&md.cfg, labels.len()) {
            let t = loaded.get(&name).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: tensor `{name}` is missing; is this a fine-tuned {} export?",
                    file.display(),
                    md.cfg.architecture_name()
                )
            })?;
            if t.dims() != shape.as_slice() {
                anyhow::bail!(
                    "{}: tensor `{name}` has shape {:?}, config.json implies {:?}",
                    file.display(),
                    t.dims(),
                    shape
                );
            }
            weights.insert(name, t.to_dtype(DType::F32)?);
        }
        let scorer = match device {
            Device::Cpu => Scorer::Packed(Box::new(crate::infer::PackedEncoder::new(
                &md.cfg, &weights,
            )?)),
            _ => Scorer::Graph(weights),
        };
        Ok(Classifier {
            dir: md.dir,
            cfg: md.cfg,
            labels,
            device: device.clone(),
            scorer,
        })
    }

    /// Sigmoid scores for pre-tokenized rows (row-major, rows × labels).
    pub fn scores(&self, rows: &[&[u32]], pad_id: u32) -> anyhow::Result<Vec<f32>> {
        match &self.scorer {
            Scorer::Packed(packed) => packed.scores(rows),
            Scorer::Graph(weights) => {
                let batch = Batch::new(rows, pad_id, &self.device)?;
                let logits = forward(&self.cfg, weights, &batch, None)?;
                Ok(candle_nn::ops::sigmoid(&logits)?.flatten_all()?.to_vec1()?)
            }
        }
    }
}
