//! `sample`: a seeded fraction of each split (1.0 = all; 0.2 = the seed project's 20%).
//!
//! The same seed gives the same rows on every machine (ChaCha8, rows in file order). With
//! `stratify: true` the sample is multi-label aware: labels are visited rarest first, and each
//! gets `round(fraction × its count)` rows (at least one) from rows carrying it, counting rows
//! already taken for rarer labels; the rest of the quota is filled at random. A 20% sample keeps
//! grief and relief.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::{Row, Split};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleParams {
    pub fraction: f64,
    pub seed: u64,
    pub stratify: bool,
    /// Splits the fraction applies to; the others are kept whole.
    pub splits: Vec<Split>,
}

impl Default for SampleParams {
    fn default() -> Self {
        SampleParams {
            fraction: 1.0,
            seed: 42,
            stratify: true,
            splits: Split::ALL.to_vec(),
        }
    }
}

/// Seed for one split: the user's seed mixed with the split, so splits are sampled independently.
fn split_rng(seed: u64, split: Split) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(split as u64 + 1)),
    )
}

pub fn sample(rows: &[Row], n_labels: usize, params: &SampleParams) -> Vec<Row> {
    let mut keep = vec![false; rows.len()];
    for split in Split::ALL {
        let members: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].split == split)
            .collect();
        if !params.splits.contains(&split) || params.fraction >= 1.0 {
            members.iter().for_each(|&i| keep[i] = true);
            continue;
        }
        let mut rng = split_rng(params.seed, split);
        let quota = ((params.fraction * members.len() as f64).round() as usize)
            .max(1)
            .min(members.len());
        let mut taken = 0usize;
        if params.stratify {
            let mut count = vec![0usize; n_labels];
            for &i in &members {
                for &l in &rows[i].labels {
                    count[l as usize] += 1;
                }
            }
            let mut in_sample = vec![0usize; n_labels];
            let mut order: Vec<usize> = (0..n_labels).filter(|&l| count[l] > 0).collect();
            order.sort_by_key(|&l| (count[l], l));
            for l in order {
                let want = ((params.fraction * count[l] as f64).round() as usize).max(1);
                let mut candidates: Vec<usize> = members
                    .iter()
                    .copied()
                    .filter(|&i| !keep[i] && rows[i].labels.contains(&(l as u32)))
                    .collect();
                candidates.shuffle(&mut rng);
                for i in candidates {
                    if in_sample[l] >= want {
                        break;
                    }
                    keep[i] = true;
                    taken += 1;
                    for &m in &rows[i].labels {
                        in_sample[m as usize] += 1;
                    }
                }
            }
        }
        let mut rest: Vec<usize> = members.iter().copied().filter(|&i| !keep[i]).collect();
        rest.shuffle(&mut rng);
        for i in rest.into_iter().take(quota.saturating_sub(taken)) {
            keep[i] = true;
        }
    }
    rows.iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(r, _)| r.clone())
        .collect()
}
