//! Scoring tokenized rows with a model: the per-epoch dev evaluation of train, and the splits
//! thresholds and evaluate score with the exported model (predict uses [`select_device`]).
//! Built on the inference side of goemo-nn (the packed encoder, `Classifier`); nothing here
//! trains.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use goemo_data::data::Split;
use goemo_data::tokens::TokenizedData;
use goemo_nn::model::{self, Batch};
use goemo_nn::params::Encoder;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The params' precision as goemo-nn names it.
pub fn nn_precision(p: goemo_report::precision::Precision) -> goemo_nn::infer::Precision {
    match p {
        goemo_report::precision::Precision::F32 => goemo_nn::infer::Precision::F32,
        goemo_report::precision::Precision::Int8 => goemo_nn::infer::Precision::Int8,
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

/// Sigmoid scores (rows × labels) for `rows`, batched, without autograd (the train stage's
/// per-epoch dev evaluation): the packed encoder on the CPU, candle's forward elsewhere.
pub fn predict_scores(
    cfg: &model::EncoderConfig,
    weights: &Encoder<Tensor>,
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
    precision: goemo_report::precision::Precision,
) -> anyhow::Result<SplitScores> {
    let data = TokenizedData::read(tokens)?;
    let classifier = load_scorer(train_out, precision)?;
    let (rows, scores, truth) = score_rows_of(&classifier, &data, split, batch)?;
    Ok(SplitScores {
        data,
        rows,
        scores,
        truth,
    })
}

/// The model train (or distill) exported into `train_out/model`, ready to score.
pub fn load_scorer(
    train_out: &Path,
    precision: goemo_report::precision::Precision,
) -> anyhow::Result<model::Classifier> {
    model::Classifier::load_with(
        &train_out.join("model"),
        &select_device(DeviceChoice::Auto)?,
        nn_precision(precision),
    )
}

/// `classifier`'s scores on `split`'s rows of `data`: (the rows, their scores rows × labels,
/// the truth rows × labels).
pub fn score_rows_of(
    classifier: &model::Classifier,
    data: &TokenizedData,
    split: Split,
    batch: usize,
) -> anyhow::Result<(Vec<usize>, Vec<f32>, Vec<u8>)> {
    let rows = data.rows_in(split);
    if rows.is_empty() {
        anyhow::bail!("no {} rows: check the load and sample stages", split.name());
    }
    let scores = scores_by_length(data, &rows, batch, |seqs| {
        classifier.scores(seqs, data.meta.pad_id)
    })?;
    let truth: Vec<u8> = rows
        .iter()
        .flat_map(|&i| data.row_labels(i).to_vec())
        .collect();
    Ok((rows, scores, truth))
}
