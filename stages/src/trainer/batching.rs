//! What each step trains on: length-bucketed batches in a seeded order, a batch's token rows
//! and 0/1 targets (packed, or padded for candle), and `pos_weight: auto`.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use goemo_data::tokens::TokenizedData;
use goemo_nn::model::Batch;

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
pub(crate) fn mix(seed: u64, epoch: u64, stream: u64) -> u64 {
    seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
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

/// A distilled student's targets: for each data row, the teachers' mean probabilities, mixed
/// into the labels as (1 − `weight`)·label + `weight`·probability (BCE is linear in its target,
/// so this is the same as mixing the hard and the soft loss).
#[derive(Debug, Clone)]
pub struct SoftTargets {
    pub weight: f32,
    /// data rows × labels; rows the student never trains on may hold anything.
    pub probs: Vec<f32>,
}

impl SoftTargets {
    /// `targets` (rows × labels, the hard labels of `rows`) mixed with the soft ones in place.
    pub fn mix(&self, rows: &[usize], targets: &mut [f32]) {
        let labels = targets.len() / rows.len().max(1);
        for (t, &i) in targets.chunks_exact_mut(labels).zip(rows) {
            let p = &self.probs[i * labels..(i + 1) * labels];
            t.iter_mut()
                .zip(p)
                .for_each(|(t, p)| *t = (1.0 - self.weight) * *t + self.weight * p);
        }
    }
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

pub(crate) fn first_ids(data: &TokenizedData, rows: &[usize]) -> String {
    rows.iter()
        .take(3)
        .map(|&i| data.row_ids[i].as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
