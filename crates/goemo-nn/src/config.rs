//! An HF `config.json` as the model code needs it ([`EncoderConfig`]), and where a model folder
//! is ([`ModelDir`]). Imported by the candle model, the packed encoder and the trainer alike,
//! so none of them imports another for it.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    DistilBert,
}

impl Arch {
    /// The activation after the head's first layer: tanh after BERT's pooler, ReLU after
    /// DistilBERT's pre_classifier.
    pub fn pool_activation(self, x: f32) -> f32 {
        match self {
            Arch::Bert => x.tanh(),
            Arch::DistilBert => x.max(0.0),
        }
    }

    /// `d` (∂L/∂output) becomes ∂L/∂input of [`Arch::pool_activation`], given its output `y`.
    pub fn pool_backward(self, d: &mut f32, y: f32) {
        match self {
            Arch::Bert => *d *= 1.0 - y * y,
            Arch::DistilBert => *d = if y > 0.0 { *d } else { 0.0 },
        }
    }
}

/// What the head reads from the last hidden states: the first (`[CLS]`) token's, as HF's
/// BERT/DistilBERT classifiers do, or the mean over the row's tokens (how all-MiniLM-L6-v2 was
/// trained). Read from and written to config.json's `classifier_pooling` (ModernBERT's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    #[default]
    Cls,
    Mean,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
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
    pub pooling: Pooling,
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
        let pooling = match raw["classifier_pooling"].as_str() {
            None | Some("cls") => Pooling::Cls,
            Some("mean") => Pooling::Mean,
            Some(other) => {
                anyhow::bail!("`classifier_pooling: {other}` is not supported (cls, mean)")
            }
        };
        // goemo's mean-pooling exports name their own model_type (see model::export), so that
        // transformers loads them only with their modeling code, never silently as plain BERT.
        let cfg = match raw["model_type"].as_str() {
            Some("bert" | GOEMO_BERT) => EncoderConfig {
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
                pooling,
                raw: raw.clone(),
            },
            Some("distilbert" | GOEMO_DISTILBERT) => EncoderConfig {
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
                pooling,
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

    pub fn architecture_name(&self) -> &'static str {
        match self.arch {
            Arch::Bert => "BertForSequenceClassification",
            Arch::DistilBert => "DistilBertForSequenceClassification",
        }
    }
}

/// model_type of a mean-pooling BERT export (transformers needs `trust_remote_code=True`).
pub const GOEMO_BERT: &str = "goemo_bert";
/// model_type of a mean-pooling DistilBERT export.
pub const GOEMO_DISTILBERT: &str = "goemo_distilbert";

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
