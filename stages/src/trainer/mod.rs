//! `train`: fine-tune a BERT/DistilBERT encoder with a multi-label head.
//!
//! - Loss: BCE-with-logits in the stable form `(1−y)·x + w·(log(1+e^−|x|) + max(−x, 0))` with
//!   `w = 1 + (pos_weight − 1)·y`, in f32, mean over labels and batch.
//! - AdamW (no decay on biases and LayerNorm weights), linear warmup then linear decay, clipping
//!   by global norm, `grad_accum` micro-batches per step scaled to match one larger batch. The
//!   optimizer runs on host memory in one pass per parameter (rayon over parameters).
//! - Batches: length-bucketed shuffling (seeded shuffle, then sort by length within chunks of
//!   `bucket_batches` batches, then shuffle the batches), padded to the longest row of each.
//! - Dev macro-F1 (threshold 0.5) after each epoch; the best epoch's weights are exported;
//!   optional early stopping.
//! - Reproducible: every random draw comes from ChaCha8 seeded by (`seed`, epoch), and the
//!   arithmetic is fixed (infer::K_BLOCK), so the same config and data give byte-identical
//!   weights on any x86-64 with FMA and any thread count. A checkpoint (weights,
//!   optimizer moments, step, log, best epoch) is written to the work folder after each epoch
//!   and every 10 minutes inside one (with the batch position and the dropout RNG's stream
//!   position); batch order is a function of (seed, epoch), so resuming from it finishes with
//!   the same weights as a run that was never stopped.

//!
//! The parts, the way llm.c splits GPT-2's trainer: [`batching`] (what a step trains on),
//! [`gradients`] (forward, loss and backward of a micro-batch, over goemo-nn's packed
//! trainer), the optimizer (goemo-nn's AdamW over the parameter tree), [`schedule`] (the
//! learning rate), [`checkpoint`] (kill and resume), [`run`] (the loop that ties them), and this
//! module: the stage, its params and the log it writes. Scoring lives in `crate::scoring`.

pub mod batching;
pub mod checkpoint;
pub mod gradients;
pub mod run;
pub mod schedule;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use goemo_data::tokens::TokenizedData;
use goemo_nn::backprop::Products;
use goemo_nn::bf16::Bf16Kernel;
use goemo_nn::loss::LossKind;
use goemo_nn::model::{self, EncoderConfig, ModelDir, NamedTensors, Params, Pooling};
use goemo_nn::optim::AdamWConfig;
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

pub use batching::{auto_pos_weight, epoch_batches, make_batch, packed_batch, SoftTargets};
pub use goemo_nn::loss::bce_with_logits;
pub use goemo_nn::optim::AdamW;
pub use gradients::{loss_and_grads, loss_and_grads_autograd, Objective};
pub use run::{train_params, train_params_with};
pub use schedule::lr_at;
// Scoring moved to crate::scoring; these names stay here for the stages that import them from
// the trainer until they switch.
pub use crate::scoring::{
    predict_scores, score_split, scores_by_length, select_device, DeviceChoice, SplitScores,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PosWeight {
    /// `none` or `auto`.
    Mode(PosWeightMode),
    /// One weight per label.
    List(Vec<f64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosWeightMode {
    None,
    Auto,
}

/// `train.precision`: what the trainer's matrix products compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    #[default]
    F32,
    Bf16,
    /// bf16 on a CPU with AVX512-BF16, f32 elsewhere: decided on the machine that resolves the
    /// params, which is why it is written (and keyed) as what it resolved to.
    Auto,
}

impl TrainPrecision {
    /// `auto` decided for this CPU; `f32` and `bf16` as they are.
    pub fn resolve(self) -> TrainPrecision {
        match self {
            TrainPrecision::Auto => match Bf16Kernel::detect() {
                Bf16Kernel::Avx512Bf16 => TrainPrecision::Bf16,
                Bf16Kernel::Portable => TrainPrecision::F32,
            },
            p => p,
        }
    }

    fn resolves_to_f32(&self) -> bool {
        self.resolve() == TrainPrecision::F32
    }

    pub fn name(self) -> &'static str {
        match self.resolve() {
            TrainPrecision::Bf16 => "bf16",
            _ => "f32",
        }
    }

    /// The packed trainer's arithmetic: bf16 through the fastest kernel this CPU has (the
    /// portable one gives the same bits, slower).
    pub fn products(self) -> Products {
        match self.resolve() {
            TrainPrecision::Bf16 => Products::bf16(),
            _ => Products::F32,
        }
    }
}

/// `train.loss`: the per-label loss (goemo_nn::loss::LossKind); its shape params are
/// `focal_gamma` and `asl_gamma_neg`, `asl_gamma_pos`, `asl_clip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossName {
    #[default]
    Bce,
    Focal,
    Asl,
}

impl LossName {
    pub fn name(self) -> &'static str {
        match self {
            LossName::Bce => "bce",
            LossName::Focal => "focal",
            LossName::Asl => "asl",
        }
    }

    fn is_bce(&self) -> bool {
        *self == LossName::Bce
    }
}

/// `train.pooling` (goemo_nn's [`Pooling`], as a param).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolingName {
    #[default]
    Cls,
    Mean,
}

impl PoolingName {
    fn is_cls(&self) -> bool {
        *self == PoolingName::Cls
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl Serialize for TrainPrecision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    /// The new head's (pooler or pre_classifier, and classifier) learning rate as a multiple
    /// of `lr`.
    pub head_lr_scale: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Share of the steps spent warming the learning rate up from 0.
    pub warmup_fraction: f64,
    /// Clip gradients to this global norm; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub pos_weight: PosWeight,
    /// `bce` | `focal` | `asl`. Params added after the first locks (this one, its shape params,
    /// `label_smoothing`, `layer_lr_decay`, `ema_decay`) are left out of the key at their
    /// defaults, so every entry made before them keeps its key.
    #[serde(skip_serializing_if = "LossName::is_bce")]
    pub loss: LossName,
    /// Focal loss's γ (default 2): both terms scaled by (1 − p_t)^γ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub focal_gamma: Option<f64>,
    /// ASL's γ₋ for negatives (default 4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asl_gamma_neg: Option<f64>,
    /// ASL's γ₊ for positives (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asl_gamma_pos: Option<f64>,
    /// ASL's probability margin: negatives scored below it add nothing (default 0.05).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asl_clip: Option<f64>,
    /// Targets become y·(1 − ε) + ε/2.
    #[serde(skip_serializing_if = "is_zero")]
    pub label_smoothing: f64,
    /// Layer-wise learning-rate decay ξ: the top encoder layer learns at `lr`, each one below
    /// at ξ times the one above, the embeddings at ξ^layers (1: off). The head keeps
    /// `head_lr_scale`.
    #[serde(skip_serializing_if = "is_one")]
    pub layer_lr_decay: f64,
    /// Keep an exponential moving average of the weights, updated after every step with this
    /// decay (0: off; e.g. 0.999). When on, dev is scored, the best epoch chosen and the model
    /// exported with the averaged weights.
    #[serde(skip_serializing_if = "is_zero")]
    pub ema_decay: f64,
    /// What the head reads: `cls` (the first token, transformers' BERT/DistilBERT classifiers)
    /// or `mean` (the mean of the row's token states, how all-MiniLM-L6-v2 was trained; the
    /// export then loads in transformers with `trust_remote_code=True`).
    #[serde(skip_serializing_if = "PoolingName::is_cls")]
    pub pooling: PoolingName,
    /// Upper bound for `pos_weight: auto` (uncapped weights have sent runs to NaN).
    pub pos_weight_cap: f64,
    pub seed: u64,
    /// Stop when dev macro-F1 has not improved for this many epochs (0: never).
    pub patience: usize,
    /// Length bucketing: rows are sorted by length within chunks of this many batches.
    pub bucket_batches: usize,
    /// Stop after this many optimizer steps (0: no limit); for smoke tests.
    pub max_steps: usize,
    pub device: DeviceChoice,
    /// The matrix products' arithmetic on the CPU trainer: `f32`, `bf16` (bf16 operands, f32
    /// sums; f32 master weights, AdamW moments, softmax, LayerNorm and loss) or `auto` (bf16
    /// where the CPU has AVX512-BF16, else f32). Resolved when params are: the key and
    /// pipeline.lock hold `bf16` or nothing (f32, so keys from before this param stay valid).
    #[serde(skip_serializing_if = "TrainPrecision::resolves_to_f32")]
    pub precision: TrainPrecision,
    /// Log a line every this many steps when there is no progress bar.
    pub log_every: usize,
    /// Also checkpoint inside an epoch once this many seconds have passed since the last one,
    /// so a kill costs at most this much work (an epoch of the full data is hours on 2 cores).
    /// Not a param: it changes no output, so it stays out of the stage's key.
    #[serde(skip)]
    pub checkpoint_every_secs: f64,
}

impl TrainParams {
    /// The optimizer's part of the params.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            head_lr_scale: self.head_lr_scale,
            layer_lr_decay: self.layer_lr_decay,
        }
    }

    /// The backbone's config with the head these params ask for (`pooling`).
    pub fn model_config(&self, base: &EncoderConfig) -> EncoderConfig {
        EncoderConfig {
            pooling: match self.pooling {
                PoolingName::Cls => Pooling::Cls,
                PoolingName::Mean => Pooling::Mean,
            },
            ..base.clone()
        }
    }

    /// Combinations that are valid but work against each other, each as a warning with the
    /// fix. Today one: label smoothing with ASL, where every negative's target ε/2 at or above
    /// the clip leaves the clip nothing to discard (measured: dev −0.015 at ε = 0.1 with the
    /// default clip 0.05, README "Levers").
    pub fn conflicts(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // The clip as the loss gets it (its default resolved once, in `loss_kind`), compared
        // in the loss's own f32.
        if let LossKind::Asymmetric { clip, .. } = self.loss_kind() {
            let target = self.label_smoothing as f32 / 2.0;
            if target > 0.0 && target >= clip {
                warnings.push(format!(
                    "label_smoothing {ls} sets every negative's target to {target}, at or above \
                     asl_clip {clip}: ASL's clip discards negatives scored below it, the smoothed \
                     target pulls them up to it, and the two work against each other (dev \
                     macro-F1 fell 0.015 with 0.1 and the default clip); use label_smoothing \
                     below {max} (2 × asl_clip), or loss: bce or focal with label_smoothing",
                    ls = self.label_smoothing,
                    max = 2.0 * clip,
                ));
            }
        }
        warnings
    }

    /// The loss these params name (pos_weight resolved by the caller).
    pub fn loss_kind(&self) -> LossKind {
        match self.loss {
            LossName::Bce => LossKind::Bce,
            LossName::Focal => LossKind::Focal {
                gamma: self.focal_gamma.unwrap_or(2.0) as f32,
            },
            LossName::Asl => LossKind::Asymmetric {
                gamma_neg: self.asl_gamma_neg.unwrap_or(4.0) as f32,
                gamma_pos: self.asl_gamma_pos.unwrap_or(0.0) as f32,
                clip: self.asl_clip.unwrap_or(0.05) as f32,
            },
        }
    }
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            epochs: 3,
            batch_size: 32,
            grad_accum: 1,
            lr: 1e-4,
            // The new head learns 30× faster than the backbone: at 1× all-MiniLM-L6-v2 sat at
            // the label priors for the first ~1,500 steps (its pooler passes on a tiny,
            // nearly constant signal), README "Training".
            head_lr_scale: 30.0,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_fraction: 0.1,
            max_grad_norm: 1.0,
            pos_weight: PosWeight::Mode(PosWeightMode::None),
            loss: LossName::Bce,
            focal_gamma: None,
            asl_gamma_neg: None,
            asl_gamma_pos: None,
            asl_clip: None,
            label_smoothing: 0.0,
            layer_lr_decay: 1.0,
            ema_decay: 0.0,
            pooling: PoolingName::Cls,
            pos_weight_cap: 10.0,
            seed: 42,
            patience: 0,
            bucket_batches: 50,
            max_steps: 0,
            device: DeviceChoice::Auto,
            precision: TrainPrecision::F32,
            log_every: 100,
            checkpoint_every_secs: 600.0,
        }
    }
}

pub struct TrainStage;

/// The resolved params (as keyed) in train's results, so what reads the model (the package
/// stage's model card) can list the recipe that made it.
pub const TRAIN_PARAMS_FILE: &str = "train_params.json";

impl TypedStage for TrainStage {
    type Params = TrainParams;

    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: on the CPU, gradients from the packed trainer (backprop.rs) with hashed dropout
        // masks, and dev scores from the packed encoder: same model, different bits. 3: matrix
        // products summed in fixed blocks of the inner dimension (infer::K_BLOCK), so the bits
        // no longer depend on the L1 cache gemm detects; and the checkpoint's floats read back
        // exactly, so a resumed run's train_log.json is the uninterrupted one's. 4: its results
        // hold train_params.json (the model card lists the recipe).
        4
    }
    fn summary(&self) -> &'static str {
        "fine-tune a BERT/DistilBERT encoder with a multi-label head (candle); exports an HF model folder"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage("tokens", "tokenized rows from tokenize", &["tokenize"]),
            InputSpec::path(
                "model",
                "the backbone: an HF folder (config.json, model.safetensors, tokenizer.json)",
            ),
        ];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, p: &TrainParams) -> Result<(), ParamError> {
        let positive = |name: &str, x: f64| {
            if x > 0.0 {
                Ok(())
            } else {
                Err(ParamError::new(
                    name,
                    format!("{name} must be > 0, got {x}"),
                ))
            }
        };
        positive("epochs", p.epochs as f64)?;
        positive("batch_size", p.batch_size as f64)?;
        positive("grad_accum", p.grad_accum as f64)?;
        positive("lr", p.lr)?;
        positive("head_lr_scale", p.head_lr_scale)?;
        positive("eps", p.eps)?;
        positive("pos_weight_cap", p.pos_weight_cap)?;
        positive("bucket_batches", p.bucket_batches as f64)?;
        if !(0.0..1.0).contains(&p.warmup_fraction) {
            return Err(ParamError::new(
                "warmup_fraction",
                format!(
                    "warmup_fraction must be in [0, 1), got {}",
                    p.warmup_fraction
                ),
            ));
        }
        if p.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(ParamError::new(
                "betas",
                format!("betas must be in [0, 1), got {:?}", p.betas),
            ));
        }
        for (name, value, applies) in [
            ("focal_gamma", p.focal_gamma, p.loss == LossName::Focal),
            ("asl_gamma_neg", p.asl_gamma_neg, p.loss == LossName::Asl),
            ("asl_gamma_pos", p.asl_gamma_pos, p.loss == LossName::Asl),
            ("asl_clip", p.asl_clip, p.loss == LossName::Asl),
        ] {
            let Some(v) = value else { continue };
            if !applies {
                let loss = if name.starts_with("focal") {
                    "focal"
                } else {
                    "asl"
                };
                return Err(ParamError::new(
                    name,
                    format!("{name} shapes loss: {loss}, but loss is {}; set loss: {loss}, or remove {name}", p.loss.name()),
                ));
            }
            let ok = if name == "asl_clip" {
                (0.0..1.0).contains(&v)
            } else {
                (0.0..=20.0).contains(&v)
            };
            if !ok {
                let range = if name == "asl_clip" {
                    "[0, 1)"
                } else {
                    "[0, 20]"
                };
                return Err(ParamError::new(
                    name,
                    format!("{name} must be in {range}, got {v}"),
                ));
            }
        }
        if !(0.0..1.0).contains(&p.label_smoothing) {
            return Err(ParamError::new(
                "label_smoothing",
                format!(
                    "label_smoothing must be in [0, 1), got {}",
                    p.label_smoothing
                ),
            ));
        }
        if !(p.layer_lr_decay > 0.0 && p.layer_lr_decay <= 1.0) {
            return Err(ParamError::new(
                "layer_lr_decay",
                format!(
                    "layer_lr_decay must be in (0, 1] (1: off), got {}",
                    p.layer_lr_decay
                ),
            ));
        }
        if !(0.0..1.0).contains(&p.ema_decay) {
            return Err(ParamError::new(
                "ema_decay",
                format!(
                    "ema_decay must be in [0, 1) (0: off; e.g. 0.999), got {}",
                    p.ema_decay
                ),
            ));
        }
        if let PosWeight::List(l) = &p.pos_weight {
            if l.iter().any(|w| !(*w > 0.0 && w.is_finite())) {
                return Err(ParamError::new(
                    "pos_weight",
                    "pos_weight: every weight in the list must be a positive number",
                ));
            }
        }
        Ok(())
    }

    fn param_note(&self, param: &str) -> Option<String> {
        (param == "precision").then(|| {
            let here = match Bf16Kernel::detect() {
                Bf16Kernel::Avx512Bf16 => "this CPU has AVX512-BF16, so auto is bf16 here",
                Bf16Kernel::Portable if goemo_nn::portable_kernels_forced() => {
                    "GOEMO_KERNELS=portable is set, so auto is f32 here, as on a CPU without AVX512-BF16"
                }
                Bf16Kernel::Portable => "this CPU has no AVX512-BF16, so auto is f32 here",
            };
            format!(
                "train.precision `auto` is decided per CPU: {here}. To reproduce a lock made with bf16 on any CPU, set train.precision: bf16 (a portable kernel gives the same bits, several times slower than AVX512-BF16); or keep auto and accept this machine's own lock"
            )
        })
    }

    /// The best epoch's dev macro-F1 (at 0.5, the early-stopping criterion) and which epoch.
    fn metrics(&self, out_dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
        let log: TrainLog = goemo_fsio::read_json(&out_dir.join("train_log.json"))?;
        Ok(std::collections::BTreeMap::from([
            ("dev_macro_f1".to_owned(), log.best_dev_macro_f1),
            ("best_epoch".to_owned(), log.best_epoch as f64),
        ]))
    }

    fn run(&self, ctx: &StageContext<'_>, params: TrainParams) -> anyhow::Result<()> {
        let data = TokenizedData::read(ctx.input("tokens")?)?;
        train_and_export(ctx, params, &data, None, ctx.params)
    }
}

/// What train and distill share: train on `data` from the `model` input (checkpoints in the
/// work folder, optionally toward soft targets), then write train's results: the exported
/// model, train_log.json, `recipe` as train_params.json, and train_metrics.json.
pub fn train_and_export(
    ctx: &StageContext<'_>,
    mut params: TrainParams,
    data: &TokenizedData,
    soft: Option<&SoftTargets>,
    recipe: &serde_json::Value,
) -> anyhow::Result<()> {
    if let Some(secs) = checkpoint_interval_from_env()? {
        params.checkpoint_every_secs = secs;
    }
    let model_dir = ModelDir::open(ctx.input("model")?)?;
    let device = select_device(params.device)?;
    if !device.is_cpu() && params.precision.resolve() == TrainPrecision::Bf16 {
        anyhow::bail!(
            "train.precision is bf16, but bf16 products run on the CPU trainer only and this run chose {device:?}\n  hint: set train.precision: f32 for CUDA, or train.device: cpu"
        );
    }
    let check = || ctx.check_cancelled();
    let env = TrainEnv {
        device: &device,
        work_dir: ctx.work_dir,
        check: &check,
        interactive: ctx.interactive,
    };
    let outcome = train_with(&params, data, &model_dir, &env, soft)?;
    let tensors: NamedTensors = outcome.best_weights;
    model::export(
        &ctx.out_dir.join("model"),
        &params.model_config(&model_dir.cfg),
        &tensors,
        &data.meta.label_names,
        &model_dir.dir,
    )?;
    goemo_fsio::write_json(&ctx.out_dir.join("train_log.json"), &outcome.log)?;
    goemo_fsio::write_json(&ctx.out_dir.join(TRAIN_PARAMS_FILE), recipe)?;
    goemo_fsio::write_json(
        &ctx.volatile_dir.join("train_metrics.json"),
        &outcome.metrics,
    )?;
    Ok(())
}

/// Checkpoints inside an epoch at most this many seconds apart, when a machine may be taken
/// away sooner than the default 10 minutes (spot instances, tests). Not a param: it changes no
/// output, so it stays out of the stage's key.
pub const CHECKPOINT_ENV: &str = "GOEMO_CHECKPOINT_EVERY_SECS";

fn checkpoint_interval_from_env() -> anyhow::Result<Option<f64>> {
    let Ok(text) = std::env::var(CHECKPOINT_ENV) else {
        return Ok(None);
    };
    match text.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(Some(secs)),
        _ => anyhow::bail!(
            "{CHECKPOINT_ENV}={text:?} is not a number of seconds\n  hint: e.g. {CHECKPOINT_ENV}=60, or unset it for the default (600)"
        ),
    }
}

/// One optimizer step's record (HF Trainer's log history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub dev_loss: f64,
    pub dev_macro_f1: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    pub steps: Vec<StepLog>,
    pub epochs: Vec<EpochLog>,
    pub best_epoch: usize,
    pub best_dev_macro_f1: f64,
    pub stopped_early: bool,
    pub total_steps: usize,
    pub pos_weight: Option<Vec<f64>>,
}

pub struct TrainOutcome {
    pub log: TrainLog,
    pub best_weights: NamedTensors,
    pub metrics: serde_json::Value,
}

/// Where and how a training run runs: not params (they change no result).
pub struct TrainEnv<'a> {
    pub device: &'a Device,
    /// The stage's work folder: the checkpoint lives there.
    pub work_dir: &'a Path,
    /// Polled between steps (Ctrl-C).
    pub check: &'a dyn Fn() -> anyhow::Result<()>,
    /// Show a progress bar (a terminal) rather than log lines.
    pub interactive: bool,
}

/// Fine-tune the model in `model_dir` on `data`: its backbone loaded, a new head, the loop.
pub fn train(
    p: &TrainParams,
    data: &TokenizedData,
    model_dir: &ModelDir,
    env: &TrainEnv<'_>,
) -> anyhow::Result<TrainOutcome> {
    train_with(p, data, model_dir, env, None)
}

/// [`train`] with the labels mixed with soft targets (the distill stage's student).
pub fn train_with(
    p: &TrainParams,
    data: &TokenizedData,
    model_dir: &ModelDir,
    env: &TrainEnv<'_>,
    soft: Option<&SoftTargets>,
) -> anyhow::Result<TrainOutcome> {
    let cfg = &p.model_config(&model_dir.cfg);
    validate_against_model(data, model_dir)?;
    let started = Instant::now();
    let params = Params::init(cfg, data.n_labels(), p.seed, env.device)?;
    let report = params.load_backbone(&model_dir.weights)?;
    tracing::info!(
        "train: {} ({} parameters); {} tensors from {}, new: {}",
        cfg.architecture_name(),
        params.total(),
        report.loaded,
        model_dir.weights.display(),
        if report.new_params.is_empty() {
            "none".to_owned()
        } else {
            report.new_params.join(", ")
        }
    );
    train_params_with(p, data, params, env, started, soft)
}

/// Check the tokens fit the model: ids within its vocabulary, lengths within its positions.
pub fn validate_against_model(data: &TokenizedData, model_dir: &ModelDir) -> anyhow::Result<()> {
    let cfg = &model_dir.cfg;
    let max_id = data.ids.iter().copied().max().unwrap_or(0) as usize;
    if max_id >= cfg.vocab_size || data.meta.vocab_size > cfg.vocab_size {
        anyhow::bail!(
            "{}: the tokenizer has {} tokens (ids up to {max_id}) but config.json says vocab_size {}\n  hint: tokenizer and model come from different checkpoints; tokenize with the model's own tokenizer.json",
            model_dir.dir.join("tokenizer.json").display(),
            data.meta.vocab_size,
            cfg.vocab_size
        );
    }
    let longest = (0..data.len())
        .map(|i| data.offsets[i + 1] - data.offsets[i])
        .max()
        .unwrap_or(0);
    if longest > cfg.max_positions {
        anyhow::bail!("tokenized rows reach {longest} tokens but the model has {} positions; lower the tokenize stage's max_len", cfg.max_positions);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use goemo_nn::bf16::Bf16Kernel;
    use goemo_stage::Stage;

    /// `precision: f32` (the default) is left out of the resolved params, so every train key
    /// and lock made before the param existed is unchanged; bf16 is keyed; `auto` is keyed as
    /// what it resolved to on this CPU; a bad value names the param and the choices.
    #[test]
    fn precision_f32_leaves_the_key_unchanged_bf16_changes_it_and_auto_resolves() {
        let stage = super::TrainStage;
        let resolve = |yaml: &str| {
            stage
                .resolve_params(&serde_yaml::from_str(yaml).unwrap())
                .unwrap()
        };
        let before = resolve("{}");
        assert!(before.get("precision").is_none(), "{before}");
        assert_eq!(resolve("{precision: f32}"), before);
        let bf16 = resolve("{precision: bf16}");
        assert_eq!(bf16["precision"], "bf16");
        let auto = resolve("{precision: auto}");
        match Bf16Kernel::detect() {
            Bf16Kernel::Avx512Bf16 => assert_eq!(auto, bf16),
            Bf16Kernel::Portable => assert_eq!(auto, before),
        }
        let typed: super::TrainParams = serde_json::from_value(bf16).unwrap();
        assert_eq!(typed.precision, super::TrainPrecision::Bf16);
        let err = stage
            .resolve_params(&serde_yaml::from_str("{precision: fp16}").unwrap())
            .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("precision"), "{}", err.message);
        assert!(err.message.contains("`bf16`"), "{}", err.message);
    }

    /// `--locked` explains a train key that moved because `auto` resolved differently here,
    /// and names the fix; other params get no note.
    #[test]
    fn a_precision_drift_under_locked_says_why_and_what_to_set() {
        let stage: &dyn Stage = &super::TrainStage;
        let note = stage.param_note("precision").unwrap();
        assert!(note.contains("decided per CPU"), "{note}");
        assert!(note.contains("set train.precision: bf16"), "{note}");
        assert!(stage.param_note("lr").is_none());
    }

    /// The levers' params at their defaults leave the key as it was; set, they are keyed; a
    /// shape param for another loss, or a value out of range, names the param and the fix.
    #[test]
    fn lever_params_are_keyed_only_when_set_and_checked() {
        let stage = super::TrainStage;
        let resolve = |yaml: &str| stage.resolve_params(&serde_yaml::from_str(yaml).unwrap());
        let before = resolve("{}").unwrap();
        for yaml in [
            "{loss: bce}",
            "{label_smoothing: 0}",
            "{layer_lr_decay: 1}",
            "{ema_decay: 0}",
        ] {
            assert_eq!(resolve(yaml).unwrap(), before, "{yaml}");
        }
        let asl = resolve("{loss: asl, asl_gamma_neg: 2, asl_clip: 0.1}").unwrap();
        assert_eq!(asl["loss"], "asl");
        assert_eq!(asl["asl_gamma_neg"], 2.0);
        assert!(asl.get("asl_gamma_pos").is_none());
        let typed: super::TrainParams = serde_json::from_value(asl).unwrap();
        assert_eq!(
            typed.loss_kind(),
            goemo_nn::loss::LossKind::Asymmetric {
                gamma_neg: 2.0,
                gamma_pos: 0.0,
                clip: 0.1
            }
        );
        for (yaml, param, says) in [
            ("{focal_gamma: 2}", "focal_gamma", "set loss: focal"),
            ("{loss: focal, asl_clip: 0.1}", "asl_clip", "set loss: asl"),
            ("{loss: asl, asl_clip: 1.5}", "asl_clip", "[0, 1)"),
            ("{loss: focal, focal_gamma: -1}", "focal_gamma", "[0, 20]"),
            ("{label_smoothing: 1}", "label_smoothing", "[0, 1)"),
            ("{layer_lr_decay: 0}", "layer_lr_decay", "(0, 1]"),
            ("{ema_decay: 1}", "ema_decay", "0.999"),
            ("{loss: mse}", "loss", "`bce`"),
        ] {
            let err = resolve(yaml).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{yaml}: {}", err.message);
            assert!(err.message.contains(says), "{yaml}: {}", err.message);
        }
    }

    /// Label smoothing with ASL warns (with the largest ε that does not conflict) exactly when
    /// the negatives' target ε/2 reaches the clip; other losses, or a small ε, do not.
    #[test]
    fn label_smoothing_against_asl_clip_warns_with_the_fix() {
        let stage = super::TrainStage;
        let typed = |yaml: &str| -> super::TrainParams {
            let params = stage
                .resolve_params(&serde_yaml::from_str(yaml).unwrap())
                .unwrap();
            serde_json::from_value(params).unwrap()
        };
        let warned = typed("{loss: asl, label_smoothing: 0.1}").conflicts();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("asl_clip 0.05") && warned[0].contains("below 0.1"));
        let warned = typed("{loss: asl, asl_clip: 0.2, label_smoothing: 0.5}").conflicts();
        assert!(
            warned.len() == 1 && warned[0].contains("below 0.4"),
            "{warned:?}"
        );
        for quiet in [
            "{loss: asl, label_smoothing: 0.05}",
            "{loss: asl, asl_clip: 0.1, label_smoothing: 0.1}",
            "{loss: asl}",
            "{loss: bce, label_smoothing: 0.1}",
            "{loss: focal, label_smoothing: 0.2}",
        ] {
            assert!(typed(quiet).conflicts().is_empty(), "{quiet}");
        }
    }
}
