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

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use goemo_data::data::Split;
use goemo_data::tokens::TokenizedData;
pub use goemo_nn::loss::bce_with_logits;
use goemo_nn::model::{self, Batch, ModelDir, NamedTensors, Params};
use goemo_report::metrics;
use goemo_stage::{resolve_typed, InputSpec, Inputs, ParamError, Stage, StageContext};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
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
    /// Log a line every this many steps when there is no progress bar.
    pub log_every: usize,
    /// Also checkpoint inside an epoch once this many seconds have passed since the last one,
    /// so a kill costs at most this much work (an epoch of the full data is hours on 2 cores).
    /// Not a param: it changes no output, so it stays out of the stage's key.
    #[serde(skip)]
    pub checkpoint_every_secs: f64,
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
            pos_weight_cap: 10.0,
            seed: 42,
            patience: 0,
            bucket_batches: 50,
            max_steps: 0,
            device: DeviceChoice::Auto,
            log_every: 100,
            checkpoint_every_secs: 600.0,
        }
    }
}

pub struct TrainStage;

impl Stage for TrainStage {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: on the CPU, gradients from the packed trainer (backprop.rs) with hashed dropout
        // masks, and dev scores from the packed encoder: same model, different bits. 3: matrix
        // products summed in fixed blocks of the inner dimension (infer::K_BLOCK), so the bits
        // no longer depend on the L1 cache gemm detects; and the checkpoint's floats read back
        // exactly, so a resumed run's train_log.json is the uninterrupted one's.
        3
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
    fn resolve_params(&self, raw: &goemo_stage::RawParams) -> Result<serde_json::Value, ParamError> {
        let v = resolve_typed::<TrainParams>(raw)?;
        let p: TrainParams = serde_json::from_value(v.clone()).map_err(|e| ParamError {
            param: None,
            message: e.to_string(),
        })?;
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
        if let PosWeight::List(l) = &p.pos_weight {
            if l.iter().any(|w| !(*w > 0.0 && w.is_finite())) {
                return Err(ParamError::new(
                    "pos_weight",
                    "pos_weight: every weight in the list must be a positive number",
                ));
            }
        }
        Ok(v)
    }

    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let mut params: TrainParams = ctx.params()?;
        if let Some(secs) = checkpoint_interval_from_env()? {
            params.checkpoint_every_secs = secs;
        }
        let data = TokenizedData::read(ctx.input("tokens")?)?;
        let model_dir = ModelDir::open(ctx.input("model")?)?;
        let device = select_device(params.device)?;
        let outcome = train(
            &params,
            &data,
            &model_dir,
            &device,
            ctx.work_dir,
            &|| ctx.check_cancelled(),
            ctx.interactive,
        )?;
        let export_dir = ctx.out_dir.join("model");
        let tensors: NamedTensors = outcome.best_weights;
        model::export(
            &export_dir,
            &model_dir.cfg,
            &tensors,
            &data.meta.label_names,
            &model_dir.dir,
        )?;
        goemo_fsio::write_json(&ctx.out_dir.join("train_log.json"), &outcome.log)?;
        goemo_fsio::write_json(
            &ctx.volatile_dir.join("train_metrics.json"),
            &outcome.metrics,
        )?;
        Ok(())
    }
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

pub fn select_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        DeviceChoice::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!("device: cuda, but this goemo was built without CUDA\n  hint: build with `cargo build --release --features cuda`, or set device: auto");
            }
            Ok(Device::new_cuda(0)?)
        }
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

/// neg/pos per label over the train rows, capped.
pub fn auto_pos_weight(data: &TokenizedData, rows: &[usize], cap: f64) -> Vec<f64> {
    let l = data.n_labels();
    let mut pos = vec![0usize; l];
    for &i in rows {
        for (k, &y) in data.row_labels(i).iter().enumerate() {
            pos[k] += y as usize;
        }
    }
    pos.iter()
        .map(|&p| {
            if p == 0 {
                cap
            } else {
                ((rows.len() - p) as f64 / p as f64).min(cap)
            }
        })
        .collect()
}

/// Length-bucketed batches for one epoch.
pub fn epoch_batches(
    data: &TokenizedData,
    rows: &[usize],
    batch: usize,
    bucket_batches: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch as u64, 1));
    let mut order = rows.to_vec();
    order.shuffle(&mut rng);
    let mut batches = Vec::new();
    for chunk in order.chunks(batch * bucket_batches) {
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(|&i| data.offsets[i + 1] - data.offsets[i]);
        batches.extend(chunk.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

fn mix(seed: u64, epoch: u64, stream: u64) -> u64 {
    seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Linear warmup to `lr`, then linear decay to 0 at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64) -> f64 {
    if step < warmup {
        lr * (step + 1) as f64 / warmup as f64
    } else {
        lr * (total.saturating_sub(step)) as f64 / (total - warmup).max(1) as f64
    }
}

/// AdamW on host memory: one pass per parameter, parameters in parallel.
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub t: u64,
    decay: Vec<bool>,
    /// Per parameter, its learning rate as a multiple of the schedule's.
    lr_scale: Vec<f64>,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(params: &Params, p: &TrainParams) -> AdamW {
        AdamW {
            m: params
                .vars
                .iter()
                .map(|v| vec![0.0; v.elem_count()])
                .collect(),
            v: params
                .vars
                .iter()
                .map(|v| vec![0.0; v.elem_count()])
                .collect(),
            t: 0,
            decay: params.names.iter().map(|n| !model::no_decay(n)).collect(),
            lr_scale: params
                .names
                .iter()
                .map(|n| {
                    let head = n.starts_with("classifier.")
                        || n.starts_with(&format!("{}.", params.cfg.pool_layer()));
                    if head {
                        p.head_lr_scale
                    } else {
                        1.0
                    }
                })
                .collect(),
            betas: p.betas,
            eps: p.eps,
            weight_decay: p.weight_decay,
        }
    }

    pub fn step(&mut self, params: &Params, grads: &[Vec<f32>], lr: f64) -> anyhow::Result<()> {
        self.t += 1;
        let (b1, b2) = (self.betas[0] as f32, self.betas[1] as f32);
        let bc1 = 1.0 - self.betas[0].powi(self.t as i32);
        let bc2 = 1.0 - self.betas[1].powi(self.t as i32);
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.eps as f32;
        // Each parameter is written back as soon as it is updated, so at most one parameter per
        // thread exists twice (not the whole model).
        params
            .vars
            .par_iter()
            .zip(self.m.par_iter_mut())
            .zip(self.v.par_iter_mut())
            .zip(grads.par_iter())
            .zip(self.decay.par_iter())
            .zip(self.lr_scale.par_iter())
            .map(|(((((var, m), v), g), &decay), &scale)| {
                let lr = lr * scale;
                let step_size = (lr / bc1) as f32;
                let shrink = (1.0 - lr * self.weight_decay) as f32;
                let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
                for j in 0..w.len() {
                    m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                    v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                    if decay {
                        w[j] *= shrink;
                    }
                    w[j] -= step_size * m[j] / (v[j].sqrt() / bc2_sqrt + eps);
                }
                var.set(&Tensor::from_vec(w, var.shape(), var.device())?)
            })
            .collect::<candle_core::Result<()>>()?;
        Ok(())
    }
}

/// Forward + backward for one micro-batch: (loss, gradients on host in parameter order). On
/// the CPU the packed trainer (`backprop`) computes them; elsewhere candle's autograd.
pub fn loss_and_grads(
    params: &Params,
    data: &TokenizedData,
    rows: &[usize],
    pos_weight: Option<&Tensor>,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
) -> anyhow::Result<(f64, Vec<Vec<f32>>)> {
    if !device.is_cpu() {
        return loss_and_grads_autograd(params, data, rows, pos_weight, rng, device);
    }
    let (seqs, targets) = packed_batch(data, rows);
    let pos_weight = pos_weight.map(|w| w.to_vec1::<f32>()).transpose()?;
    goemo_nn::backprop::loss_and_grads(params, &seqs, &targets, pos_weight.as_deref(), rng)
}

/// Token ids and labels (rows × labels, 0/1) of `rows`: the packed trainer's inputs, and what
/// `make_batch` pads.
pub fn packed_batch<'a>(data: &'a TokenizedData, rows: &[usize]) -> (Vec<&'a [u32]>, Vec<f32>) {
    let seqs = rows.iter().map(|&i| data.row(i)).collect();
    let targets = rows
        .iter()
        .flat_map(|&i| data.row_labels(i).iter().map(|&b| b as f32))
        .collect();
    (seqs, targets)
}

/// `loss_and_grads` by candle's autograd over the padded `model::forward`: the reference the
/// packed trainer is tested against, and the path on CUDA.
pub fn loss_and_grads_autograd(
    params: &Params,
    data: &TokenizedData,
    rows: &[usize],
    pos_weight: Option<&Tensor>,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
) -> anyhow::Result<(f64, Vec<Vec<f32>>)> {
    let (batch, targets) = make_batch(data, rows, device)?;
    let logits = model::forward(&params.cfg, &params.tensors(), &batch, rng)?;
    let loss = bce_with_logits(&logits, &targets, pos_weight)?;
    let mut grads = loss.backward()?;
    let loss_value = loss.to_scalar::<f32>()? as f64;
    // Peak memory: free the forward graph's activations, and each gradient tensor once it is
    // copied out, so the gradients never exist twice in full.
    drop((loss, logits));
    let host: Vec<Vec<f32>> = params
        .vars
        .iter()
        .map(|v| match grads.remove(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>(),
            None => Ok(vec![0.0; v.elem_count()]),
        })
        .collect::<candle_core::Result<_>>()?;
    Ok((loss_value, host))
}

pub fn make_batch(
    data: &TokenizedData,
    rows: &[usize],
    device: &Device,
) -> candle_core::Result<(Batch, Tensor)> {
    let (seqs, y) = packed_batch(data, rows);
    let batch = Batch::new(&seqs, data.meta.pad_id, device)?;
    Ok((
        batch,
        Tensor::from_vec(y, (rows.len(), data.n_labels()), device)?,
    ))
}

/// Sigmoid scores (rows × labels) for `rows`, batched, without autograd (the train stage's
/// per-epoch dev evaluation): the packed encoder on the CPU, candle's forward elsewhere.
pub fn predict_scores(
    cfg: &model::EncoderConfig,
    weights: &HashMap<String, Tensor>,
    data: &TokenizedData,
    rows: &[usize],
    batch: usize,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    if device.is_cpu() {
        let packed = goemo_nn::infer::PackedEncoder::new(cfg, weights)?;
        return scores_by_length(data, rows, batch, |seqs| packed.scores(seqs));
    }
    scores_by_length(data, rows, batch, |seqs| {
        let b = Batch::new(seqs, data.meta.pad_id, device)?;
        let probs = candle_nn::ops::sigmoid(&model::forward(cfg, weights, &b, None)?)?;
        Ok(probs.flatten_all()?.to_vec1()?)
    })
}

/// Scores (rows × labels, in `rows` order) from `score`, called on batches of rows sorted by
/// length so that a padded batch wastes little.
pub fn scores_by_length(
    data: &TokenizedData,
    rows: &[usize],
    batch: usize,
    score: impl Fn(&[&[u32]]) -> anyhow::Result<Vec<f32>>,
) -> anyhow::Result<Vec<f32>> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&k| data.row(rows[k]).len());
    let l = data.n_labels();
    let mut out = vec![0f32; rows.len() * l];
    for chunk in order.chunks(batch.max(1)) {
        let seqs: Vec<&[u32]> = chunk.iter().map(|&k| data.row(rows[k])).collect();
        let probs = score(&seqs)?;
        for (j, &k) in chunk.iter().enumerate() {
            out[k * l..(k + 1) * l].copy_from_slice(&probs[j * l..(j + 1) * l]);
        }
    }
    Ok(out)
}

/// What thresholds and evaluate need: the tokenized rows, and the trained model's scores and
/// the truth (rows × labels) on one split.
pub struct SplitScores {
    pub data: TokenizedData,
    pub rows: Vec<usize>,
    pub scores: Vec<f32>,
    pub truth: Vec<u8>,
}

/// Score `split` with the model train exported into `train_out/model`.
pub fn score_split(
    train_out: &Path,
    tokens: &Path,
    split: Split,
    batch: usize,
) -> anyhow::Result<SplitScores> {
    let data = TokenizedData::read(tokens)?;
    let classifier = model::Classifier::load(
        &train_out.join("model"),
        &select_device(DeviceChoice::Auto)?,
    )?;
    let rows = data.rows_in(split);
    if rows.is_empty() {
        anyhow::bail!("no {} rows: check the load and sample stages", split.name());
    }
    let scores = scores_by_length(&data, &rows, batch, |seqs| {
        classifier.scores(seqs, data.meta.pad_id)
    })?;
    let truth: Vec<u8> = rows
        .iter()
        .flat_map(|&i| data.row_labels(i).to_vec())
        .collect();
    Ok(SplitScores {
        data,
        rows,
        scores,
        truth,
    })
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    epochs_done: usize,
    step: usize,
    adam_t: u64,
    log: TrainLog,
    epochs_since_best: usize,
    /// Inside epoch `epochs_done + 1`: the batches already trained on (0 at an epoch's end),
    /// the dropout RNG's position after them and the running train loss.
    #[serde(default)]
    batches_done: usize,
    #[serde(default)]
    dropout_rng_word_pos: u128,
    #[serde(default)]
    epoch_loss_sum: f64,
    /// The time and work of the processes that trained before this checkpoint, so that the
    /// metrics of a resumed run cover all of it.
    #[serde(default)]
    so_far: Tally,
}

/// Running totals for `train_metrics.json`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Tally {
    runtime_secs: f64,
    train_secs: f64,
    examples: usize,
    tokens: usize,
    fwd_bwd_secs: f64,
    opt_secs: f64,
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            runtime_secs: self.runtime_secs + o.runtime_secs,
            train_secs: self.train_secs + o.train_secs,
            examples: self.examples + o.examples,
            tokens: self.tokens + o.tokens,
            fwd_bwd_secs: self.fwd_bwd_secs + o.fwd_bwd_secs,
            opt_secs: self.opt_secs + o.opt_secs,
        }
    }
}

/// Inside an epoch: (batches done, dropout RNG word position, running train-loss sum).
type EpochPosition = (usize, u128, f64);

impl CheckpointState {
    fn new(
        epochs_done: usize,
        (batches_done, dropout_rng_word_pos, epoch_loss_sum): EpochPosition,
        step: usize,
        opt: &AdamW,
        log: &TrainLog,
        epochs_since_best: usize,
        so_far: Tally,
    ) -> CheckpointState {
        CheckpointState {
            epochs_done,
            step,
            adam_t: opt.t,
            log: log.clone(),
            epochs_since_best,
            batches_done,
            dropout_rng_word_pos,
            epoch_loss_sum,
            so_far,
        }
    }
}

const CKPT: &str = "checkpoint";

fn save_checkpoint(
    work: &Path,
    params: &Params,
    opt: &AdamW,
    best: &[(String, Tensor)],
    state: &CheckpointState,
) -> anyhow::Result<()> {
    let tmp = work.join(format!("{CKPT}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let weights: NamedTensors = params
        .names
        .iter()
        .cloned()
        .zip(params.vars.iter().map(|v| v.as_tensor().clone()))
        .collect();
    save_tensors(&tmp.join("weights.safetensors"), &weights)?;
    save_tensors(&tmp.join("best.safetensors"), best)?;
    let moments: NamedTensors = params
        .names
        .iter()
        .zip(opt.m.iter().zip(&opt.v))
        .flat_map(|(n, (m, v))| {
            [
                (
                    format!("m.{n}"),
                    Tensor::from_slice(m, m.len(), &Device::Cpu),
                ),
                (
                    format!("v.{n}"),
                    Tensor::from_slice(v, v.len(), &Device::Cpu),
                ),
            ]
        })
        .map(|(n, t)| t.map(|t| (n, t)))
        .collect::<candle_core::Result<_>>()?;
    save_tensors(&tmp.join("adam.safetensors"), &moments)?;
    goemo_fsio::write_json(&tmp.join("state.json"), state)?;
    let dest = work.join(CKPT);
    let old = work.join(format!("{CKPT}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dest.exists() {
        std::fs::rename(&dest, &old)?;
    }
    std::fs::rename(&tmp, &dest)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))
}

fn load_checkpoint(
    work: &Path,
    params: &Params,
    opt: &mut AdamW,
) -> anyhow::Result<Option<(CheckpointState, NamedTensors)>> {
    let dir = work.join(CKPT);
    if !dir.join("state.json").exists() {
        return Ok(None);
    }
    let state: CheckpointState = goemo_fsio::read_json(&dir.join("state.json"))?;
    let device = params.vars[0].device();
    let weights = candle_core::safetensors::load(dir.join("weights.safetensors"), device)?;
    for (n, v) in params.names.iter().zip(&params.vars) {
        v.set(
            weights
                .get(n)
                .with_context(|| format!("checkpoint lacks {n}"))?,
        )?;
    }
    let adam = candle_core::safetensors::load(dir.join("adam.safetensors"), &Device::Cpu)?;
    for (k, n) in params.names.iter().enumerate() {
        opt.m[k] = adam
            .get(&format!("m.{n}"))
            .context("checkpoint moments")?
            .to_vec1()?;
        opt.v[k] = adam
            .get(&format!("v.{n}"))
            .context("checkpoint moments")?
            .to_vec1()?;
    }
    opt.t = state.adam_t;
    let best_map = candle_core::safetensors::load(dir.join("best.safetensors"), device)?;
    let best = params
        .names
        .iter()
        .map(|n| (n.clone(), best_map[n].clone()))
        .collect();
    Ok(Some((state, best)))
}

/// The training loop. `check` is polled between steps (Ctrl-C).
pub fn train(
    p: &TrainParams,
    data: &TokenizedData,
    model_dir: &ModelDir,
    device: &Device,
    work_dir: &Path,
    check: &dyn Fn() -> anyhow::Result<()>,
    interactive: bool,
) -> anyhow::Result<TrainOutcome> {
    let cfg = &model_dir.cfg;
    validate_against_model(data, model_dir)?;
    let started = Instant::now();
    let params = Params::init(cfg, data.n_labels(), p.seed, device)?;
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
    train_params(
        p,
        data,
        params,
        device,
        work_dir,
        check,
        interactive,
        started,
    )
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

#[allow(clippy::too_many_arguments)]
pub fn train_params(
    p: &TrainParams,
    data: &TokenizedData,
    params: Params,
    device: &Device,
    work_dir: &Path,
    check: &dyn Fn() -> anyhow::Result<()>,
    interactive: bool,
    started: Instant,
) -> anyhow::Result<TrainOutcome> {
    let train_rows = data.rows_in(Split::Train);
    let dev_rows = data.rows_in(Split::Dev);
    if train_rows.is_empty() {
        anyhow::bail!("no train rows: check the load and sample stages");
    }
    let pos_weight_values: Option<Vec<f64>> = match &p.pos_weight {
        PosWeight::Mode(PosWeightMode::None) => None,
        PosWeight::Mode(PosWeightMode::Auto) => {
            Some(auto_pos_weight(data, &train_rows, p.pos_weight_cap))
        }
        PosWeight::List(l) if l.len() == data.n_labels() => Some(l.clone()),
        PosWeight::List(l) => anyhow::bail!(
            "pos_weight lists {} weights but the data has {} labels",
            l.len(),
            data.n_labels()
        ),
    };
    let pos_weight = pos_weight_values
        .as_ref()
        .map(|w| {
            Tensor::from_vec(
                w.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                w.len(),
                device,
            )
        })
        .transpose()?;
    let batches_per_epoch = train_rows.len().div_ceil(p.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(p.grad_accum);
    let mut total_steps = steps_per_epoch * p.epochs;
    if p.max_steps > 0 {
        total_steps = total_steps.min(p.max_steps);
    }
    let warmup = (p.warmup_fraction * total_steps as f64).round() as usize;
    let mut opt = AdamW::new(&params, p);
    let mut log = TrainLog {
        total_steps,
        pos_weight: pos_weight_values.clone(),
        ..Default::default()
    };
    let mut best: NamedTensors = params.snapshot()?;
    let mut step = 0usize;
    let mut start_epoch = 0usize;
    let mut epochs_since_best = 0usize;
    let mut best_f1 = f64::NEG_INFINITY;
    // Where a mid-epoch checkpoint left the first epoch to run: batches done, RNG, loss sum.
    let mut resume_in_epoch: Option<EpochPosition> = None;
    let mut before_this_process = Tally::default();
    if let Some((state, saved_best)) = load_checkpoint(work_dir, &params, &mut opt)? {
        tracing::info!(
            "train: resuming at epoch {}, batch {} (step {}) from the checkpoint in {}",
            state.epochs_done + 1,
            state.batches_done,
            state.step,
            work_dir.display()
        );
        start_epoch = state.epochs_done;
        if state.batches_done > 0 {
            resume_in_epoch = Some((
                state.batches_done,
                state.dropout_rng_word_pos,
                state.epoch_loss_sum,
            ));
        }
        step = state.step;
        before_this_process = state.so_far;
        log = state.log;
        epochs_since_best = state.epochs_since_best;
        best_f1 = if log.epochs.is_empty() {
            f64::NEG_INFINITY
        } else {
            log.best_dev_macro_f1
        };
        best = saved_best;
    }
    // This process's work; its clock times are filled in by `so_far`.
    let mut this_process = Tally::default();
    let train_started = Instant::now();
    let mut last_checkpoint = Instant::now();
    let so_far = |this_process: &Tally| {
        before_this_process
            + Tally {
                runtime_secs: started.elapsed().as_secs_f64(),
                train_secs: train_started.elapsed().as_secs_f64(),
                ..*this_process
            }
    };

    'epochs: for epoch in start_epoch..p.epochs {
        if log.stopped_early || (p.max_steps > 0 && step >= p.max_steps) {
            break;
        }
        let batches = epoch_batches(
            data,
            &train_rows,
            p.batch_size,
            p.bucket_batches,
            p.seed,
            epoch,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(mix(p.seed, epoch as u64, 2));
        let bar = progress_bar(interactive, steps_per_epoch, epoch, p.epochs);
        let mut epoch_loss = 0f64;
        let mut epoch_batches_seen = 0usize;
        let mut skip_batches = 0usize;
        if let Some((done, word_pos, loss_sum)) = resume_in_epoch.take() {
            skip_batches = done;
            rng.set_word_pos(word_pos);
            epoch_loss = loss_sum;
            epoch_batches_seen = done;
            if let Some(bar) = &bar {
                bar.set_position((done / p.grad_accum) as u64);
                // The jump is not progress made now: rate and ETA start from here.
                bar.reset_eta();
            }
        }
        let mut accum: Option<Vec<Vec<f32>>> = None;
        let mut accum_loss = 0f64;
        let mut accum_rows: Vec<String> = Vec::new();
        let mut in_accum = 0usize;
        let epoch_started = Instant::now();
        let mut reached_max_steps = false;
        for (bi, rows) in batches.iter().enumerate().skip(skip_batches) {
            check()?;
            let t0 = Instant::now();
            let (loss, grads) = loss_and_grads(
                &params,
                data,
                rows,
                pos_weight.as_ref(),
                Some(&mut rng),
                device,
            )?;
            this_process.fwd_bwd_secs += t0.elapsed().as_secs_f64();
            if !loss.is_finite() {
                anyhow::bail!(
                    "loss is {loss} at epoch {}, step {} (batch {} of the epoch); first rows of the batch: {}\n  hint: lower lr, cap pos_weight (pos_weight_cap), or check those rows",
                    epoch + 1, step + 1, bi + 1, first_ids(data, rows)
                );
            }
            let scale = 1.0 / p.grad_accum as f32;
            if let Some(acc) = accum.as_mut() {
                acc.par_iter_mut()
                    .zip(grads.par_iter())
                    .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, g)| *a += g * scale));
            } else {
                accum = Some(
                    grads
                        .into_iter()
                        .map(|g| g.into_iter().map(|x| x * scale).collect())
                        .collect(),
                );
            }
            accum_loss += loss / p.grad_accum as f64;
            if accum_rows.is_empty() {
                accum_rows.push(first_ids(data, rows));
            }
            in_accum += 1;
            this_process.examples += rows.len();
            this_process.tokens += rows
                .iter()
                .map(|&i| data.offsets[i + 1] - data.offsets[i])
                .sum::<usize>();
            epoch_loss += loss;
            epoch_batches_seen += 1;
            let last = bi + 1 == batches.len();
            if in_accum < p.grad_accum && !last {
                continue;
            }
            let mut grads = accum.take().expect("accumulated");
            if in_accum < p.grad_accum {
                // A short final accumulation: rescale to a mean over the micro-batches it had.
                let fix = p.grad_accum as f32 / in_accum as f32;
                grads
                    .par_iter_mut()
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= fix));
                accum_loss *= p.grad_accum as f64 / in_accum as f64;
            }
            let norm = grads
                .par_iter()
                .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect::<Vec<f64>>()
                .iter()
                .sum::<f64>()
                .sqrt();
            if !norm.is_finite() {
                anyhow::bail!(
                    "gradient norm is {norm} at epoch {}, step {}; first rows of the batch: {}\n  hint: lower lr or cap pos_weight",
                    epoch + 1, step + 1, accum_rows.join(", ")
                );
            }
            if p.max_grad_norm > 0.0 && norm > p.max_grad_norm {
                let c = (p.max_grad_norm / (norm + 1e-6)) as f32;
                grads
                    .par_iter_mut()
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
            }
            let lr = lr_at(step, total_steps, warmup, p.lr);
            let t1 = Instant::now();
            opt.step(&params, &grads, lr)?;
            this_process.opt_secs += t1.elapsed().as_secs_f64();
            step += 1;
            let entry = StepLog {
                step,
                epoch: goemo_data::data::round6(
                    epoch as f64 + (bi + 1) as f64 / batches.len() as f64,
                ),
                loss: goemo_data::data::round6(accum_loss),
                learning_rate: lr,
                grad_norm: goemo_data::data::round6(norm),
            };
            if let Some(bar) = &bar {
                bar.set_message(format!(
                    "loss {:.4}  {:.1} ex/s",
                    entry.loss,
                    this_process.examples as f64 / train_started.elapsed().as_secs_f64()
                ));
                bar.inc(1);
            } else if step.is_multiple_of(p.log_every.max(1)) {
                // From the batches this process ran: a resumed epoch skipped the ones before.
                let ran = (bi + 1 - skip_batches) as f64;
                let left = (batches.len() - bi - 1) as f64;
                let eta = epoch_started.elapsed().as_secs_f64() / ran * left;
                tracing::info!(
                    "epoch {}/{} step {step}/{total_steps}: loss {:.4}, lr {:.2e}, grad norm {:.3}, {:.1} ex/s, epoch ETA {:.0}s",
                    epoch + 1, p.epochs, entry.loss, lr, norm, this_process.examples as f64 / train_started.elapsed().as_secs_f64(), eta
                );
            }
            log.steps.push(entry);
            accum_loss = 0.0;
            accum_rows.clear();
            in_accum = 0;
            if p.max_steps > 0 && step >= p.max_steps {
                reached_max_steps = true;
                break;
            }
            let epoch_ends = bi + 1 == batches.len();
            if !epoch_ends && last_checkpoint.elapsed().as_secs_f64() >= p.checkpoint_every_secs {
                let position = (bi + 1, rng.get_word_pos(), epoch_loss);
                let state = CheckpointState::new(
                    epoch,
                    position,
                    step,
                    &opt,
                    &log,
                    epochs_since_best,
                    so_far(&this_process),
                );
                save_checkpoint(work_dir, &params, &opt, &best, &state)?;
                last_checkpoint = Instant::now();
            }
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        finish_epoch(
            p,
            data,
            &params,
            &dev_rows,
            device,
            epoch,
            epoch_loss / epoch_batches_seen.max(1) as f64,
            &mut log,
            &mut best,
            &mut best_f1,
            &mut epochs_since_best,
        )?;
        // A run cut short by max_steps ends here, without an end-of-epoch checkpoint.
        if reached_max_steps {
            break 'epochs;
        }
        let state = CheckpointState::new(
            epoch + 1,
            (0, 0, 0.0),
            step,
            &opt,
            &log,
            epochs_since_best,
            so_far(&this_process),
        );
        save_checkpoint(work_dir, &params, &opt, &best, &state)?;
        last_checkpoint = Instant::now();
    }
    // Over every process that trained this model, when it was stopped and resumed.
    let total = so_far(&this_process);
    let train_secs = total.train_secs.max(1e-9);
    tracing::info!(
        "train: best epoch {} (dev macro-F1 {:.4} at 0.5); {} steps in {:.0}s",
        log.best_epoch,
        log.best_dev_macro_f1,
        step,
        total.runtime_secs
    );
    let metrics = serde_json::json!({
        "train_runtime": total.runtime_secs,
        "train_samples": total.examples,
        "train_samples_per_second": total.examples as f64 / train_secs,
        "train_tokens_per_second": total.tokens as f64 / train_secs,
        "train_steps_per_second": log.steps.len() as f64 / train_secs,
        "forward_backward_seconds": total.fwd_bwd_secs,
        "optimizer_seconds": total.opt_secs,
        "train_loss": log.epochs.last().map(|e| e.train_loss),
        "epoch": log.epochs.len(),
        "best_epoch": log.best_epoch,
        "eval_macro_f1": log.best_dev_macro_f1,
        "threads": rayon::current_num_threads(),
        "device": format!("{device:?}"),
    });
    Ok(TrainOutcome {
        log,
        best_weights: best,
        metrics,
    })
}

#[allow(clippy::too_many_arguments)]
fn finish_epoch(
    p: &TrainParams,
    data: &TokenizedData,
    params: &Params,
    dev_rows: &[usize],
    device: &Device,
    epoch: usize,
    train_loss: f64,
    log: &mut TrainLog,
    best: &mut NamedTensors,
    best_f1: &mut f64,
    epochs_since_best: &mut usize,
) -> anyhow::Result<()> {
    let weights = params.detached();
    let (dev_f1, dev_loss) = if dev_rows.is_empty() {
        (0.0, 0.0)
    } else {
        let scores = predict_scores(&params.cfg, &weights, data, dev_rows, 64, device)?;
        let truth: Vec<u8> = dev_rows
            .iter()
            .flat_map(|&i| data.row_labels(i).to_vec())
            .collect();
        let c = metrics::counts(
            &scores,
            &truth,
            data.n_labels(),
            &vec![0.5; data.n_labels()],
        );
        let loss = scores
            .iter()
            .zip(&truth)
            .map(|(&s, &y)| {
                let s = (s as f64).clamp(1e-7, 1.0 - 1e-7);
                if y == 1 {
                    -s.ln()
                } else {
                    -(1.0 - s).ln()
                }
            })
            .sum::<f64>()
            / scores.len().max(1) as f64;
        (metrics::macro_f1(&c), loss)
    };
    log.epochs.push(EpochLog {
        epoch: epoch + 1,
        train_loss: goemo_data::data::round6(train_loss),
        dev_loss: goemo_data::data::round6(dev_loss),
        dev_macro_f1: goemo_data::data::round6(dev_f1),
    });
    tracing::info!(
        "epoch {}: train loss {:.4}, dev loss {:.4}, dev macro-F1 {:.4} (threshold 0.5)",
        epoch + 1,
        train_loss,
        dev_loss,
        dev_f1
    );
    if dev_f1 > *best_f1 || dev_rows.is_empty() {
        *best_f1 = dev_f1;
        *best = params.snapshot()?;
        log.best_epoch = epoch + 1;
        log.best_dev_macro_f1 = goemo_data::data::round6(dev_f1);
        *epochs_since_best = 0;
    } else {
        *epochs_since_best += 1;
        if p.patience > 0 && *epochs_since_best >= p.patience {
            tracing::info!(
                "early stopping: dev macro-F1 has not improved for {} epoch(s)",
                p.patience
            );
            log.stopped_early = true;
        }
    }
    Ok(())
}

fn first_ids(data: &TokenizedData, rows: &[usize]) -> String {
    rows.iter()
        .take(3)
        .map(|&i| data.row_ids[i].as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn progress_bar(
    interactive: bool,
    steps: usize,
    epoch: usize,
    epochs: usize,
) -> Option<indicatif::ProgressBar> {
    if !interactive {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
    Some(bar)
}
