//! The training checkpoint in the work folder: weights, the best epoch's weights, AdamW's
//! moments and the loop's state (step, log, position inside an epoch), written after each
//! epoch and every `checkpoint_every_secs` inside one, so a killed run resumes to the same
//! bytes as one never stopped.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use goemo_nn::model::{NamedTensors, Params};
use goemo_nn::optim::AdamW;

use super::TrainLog;

#[derive(Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    pub(crate) epochs_done: usize,
    pub(crate) step: usize,
    pub(crate) adam_t: u64,
    pub(crate) log: TrainLog,
    pub(crate) epochs_since_best: usize,
    /// Inside epoch `epochs_done + 1`: the batches already trained on (0 at an epoch's end),
    /// the dropout RNG's position after them and the running train loss.
    #[serde(default)]
    pub(crate) batches_done: usize,
    #[serde(default)]
    pub(crate) dropout_rng_word_pos: u128,
    #[serde(default)]
    pub(crate) epoch_loss_sum: f64,
    /// The time and work of the processes that trained before this checkpoint, so that the
    /// metrics of a resumed run cover all of it.
    #[serde(default)]
    pub(crate) so_far: Tally,
}

/// Running totals for `train_metrics.json`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Tally {
    pub(crate) runtime_secs: f64,
    pub(crate) train_secs: f64,
    pub(crate) examples: usize,
    pub(crate) tokens: usize,
    pub(crate) fwd_bwd_secs: f64,
    pub(crate) opt_secs: f64,
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
pub(crate) type EpochPosition = (usize, u128, f64);

impl CheckpointState {
    pub(crate) fn new(
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

pub(crate) fn save_checkpoint(
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
        .zip(opt.moments.leaves())
        .flat_map(|(n, mo)| {
            let (m, v) = (&mo.m, &mo.v);
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
    let mut moments: NamedTensors = moments;
    if let Some(avg) = &opt.average {
        for (n, w) in params.names.iter().zip(avg.weights.leaves()) {
            moments.push((
                format!("average.{n}"),
                Tensor::from_slice(w, w.len(), &Device::Cpu)?,
            ));
        }
    }
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

pub(crate) fn load_checkpoint(
    work: &Path,
    params: &Params,
    opt: &mut AdamW,
) -> anyhow::Result<Option<(CheckpointState, NamedTensors)>> {
    let dir = work.join(CKPT);
    if !dir.join("state.json").exists() {
        return Ok(None);
    }
    let state: CheckpointState = goemo_fsio::read_json(&dir.join("state.json"))?;
    let device = params.tree.embeddings.word.device();
    let weights = candle_core::safetensors::load(dir.join("weights.safetensors"), device)?;
    for (n, v) in params.names.iter().zip(&params.vars) {
        v.set(
            weights
                .get(n)
                .with_context(|| format!("{}: checkpoint lacks {n}", dir.display()))?,
        )?;
    }
    let adam = candle_core::safetensors::load(dir.join("adam.safetensors"), &Device::Cpu)?;
    for (n, mo) in params.names.iter().zip(opt.moments.leaves_mut()) {
        for (key, dst) in [(format!("m.{n}"), &mut mo.m), (format!("v.{n}"), &mut mo.v)] {
            *dst = adam
                .get(&key)
                .with_context(|| format!("{}: checkpoint lacks `{key}`", dir.display()))?
                .to_vec1()?;
        }
    }
    if let Some(avg) = opt.average.as_mut() {
        for (n, dst) in params.names.iter().zip(avg.weights.leaves_mut()) {
            let key = format!("average.{n}");
            *dst = adam
                .get(&key)
                .with_context(|| {
                    format!(
                        "{}: checkpoint lacks `{key}` (the weight average)",
                        dir.display()
                    )
                })?
                .to_vec1()?;
        }
    }
    opt.t = state.adam_t;
    let best_map = candle_core::safetensors::load(dir.join("best.safetensors"), device)?;
    let best = params
        .names
        .iter()
        .map(|n| {
            let t = best_map
                .get(n)
                .with_context(|| format!("{}: best weights lack `{n}`", dir.display()))?;
            Ok((n.clone(), t.clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Some((state, best)))
}
