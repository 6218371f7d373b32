//! Multi-label classification metrics, with scikit-learn's conventions: a label with no
//! predicted positives has precision 0 (`zero_division=0`), one with no true positives recall 0.

use serde::{Deserialize, Serialize};

/// Counts for one label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub support: u64,
}

impl Counts {
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
}

/// Six decimals: how every figure is written into goemo's result files.
pub fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

pub fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Per-label counts from scores (rows × labels, row-major), multi-hot truth and per-label
/// thresholds (a score ≥ its threshold is a positive).
pub fn counts(scores: &[f32], truth: &[u8], n_labels: usize, thresholds: &[f32]) -> Vec<Counts> {
    let mut c = vec![Counts::default(); n_labels];
    for (s_row, t_row) in scores
        .chunks_exact(n_labels)
        .zip(truth.chunks_exact(n_labels))
    {
        for l in 0..n_labels {
            let pred = s_row[l] >= thresholds[l];
            let gold = t_row[l] != 0;
            let k = &mut c[l];
            k.support += gold as u64;
            match (pred, gold) {
                (true, true) => k.tp += 1,
                (true, false) => k.fp += 1,
                (false, true) => k.fn_ += 1,
                (false, false) => {}
            }
        }
    }
    c
}

pub fn macro_f1(c: &[Counts]) -> f64 {
    if c.is_empty() {
        return 0.0;
    }
    c.iter().map(Counts::f1).sum::<f64>() / c.len() as f64
}

/// Precision, recall and F1 of one average.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Every figure for one threshold policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    pub thresholds: Vec<f32>,
    pub per_label: Vec<Counts>,
    pub micro: Prf,
    pub macro_: Prf,
    pub weighted: Prf,
    pub samples: Prf,
    pub exact_match: f64,
    pub hamming_loss: f64,
}

pub fn policy_report(
    scores: &[f32],
    truth: &[u8],
    n_labels: usize,
    thresholds: &[f32],
) -> PolicyReport {
    let per_label = counts(scores, truth, n_labels, thresholds);
    let n_rows = truth.len() / n_labels.max(1);
    let (tp, fp, fn_) = per_label
        .iter()
        .fold((0, 0, 0), |a, c| (a.0 + c.tp, a.1 + c.fp, a.2 + c.fn_));
    let micro = Counts {
        tp,
        fp,
        fn_,
        support: tp + fn_,
    };
    let mean =
        |f: &dyn Fn(&Counts) -> f64| per_label.iter().map(f).sum::<f64>() / n_labels.max(1) as f64;
    let support: u64 = per_label.iter().map(|c| c.support).sum();
    let weighted = |f: &dyn Fn(&Counts) -> f64| {
        if support == 0 {
            0.0
        } else {
            per_label
                .iter()
                .map(|c| f(c) * c.support as f64)
                .sum::<f64>()
                / support as f64
        }
    };
    let (mut sp, mut sr, mut sf, mut exact, mut wrong) = (0.0, 0.0, 0.0, 0usize, 0usize);
    for (s_row, t_row) in scores
        .chunks_exact(n_labels)
        .zip(truth.chunks_exact(n_labels))
    {
        let (mut tp, mut pred, mut gold) = (0u64, 0u64, 0u64);
        let mut row_wrong = 0;
        for l in 0..n_labels {
            let p = s_row[l] >= thresholds[l];
            let g = t_row[l] != 0;
            tp += (p && g) as u64;
            pred += p as u64;
            gold += g as u64;
            row_wrong += (p != g) as usize;
        }
        sp += ratio(tp, pred);
        sr += ratio(tp, gold);
        sf += ratio(2 * tp, pred + gold);
        exact += (row_wrong == 0) as usize;
        wrong += row_wrong;
    }
    let rows = n_rows.max(1) as f64;
    PolicyReport {
        thresholds: thresholds.to_vec(),
        micro: Prf {
            precision: micro.precision(),
            recall: micro.recall(),
            f1: micro.f1(),
        },
        macro_: Prf {
            precision: mean(&Counts::precision),
            recall: mean(&Counts::recall),
            f1: mean(&Counts::f1),
        },
        weighted: Prf {
            precision: weighted(&Counts::precision),
            recall: weighted(&Counts::recall),
            f1: weighted(&Counts::f1),
        },
        samples: Prf {
            precision: sp / rows,
            recall: sr / rows,
            f1: sf / rows,
        },
        exact_match: exact as f64 / rows,
        hamming_loss: wrong as f64 / (rows * n_labels.max(1) as f64),
        per_label,
    }
}

/// Scores and truth of one label, as (score, is_positive) sorted by score descending.
fn ranked(scores: &[f32], truth: &[u8], n_labels: usize, label: usize) -> Vec<(f32, bool)> {
    let mut v: Vec<(f32, bool)> = scores
        .chunks_exact(n_labels)
        .zip(truth.chunks_exact(n_labels))
        .map(|(s, t)| (s[label], t[label] != 0))
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    v
}

/// ROC-AUC of one label (ties count half); `None` when the label has no positives or no
/// negatives, where it is undefined.
pub fn roc_auc(scores: &[f32], truth: &[u8], n_labels: usize, label: usize) -> Option<f64> {
    let v = ranked(scores, truth, n_labels, label);
    let pos = v.iter().filter(|x| x.1).count() as f64;
    let neg = v.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    // Walk groups of tied scores from the top: each positive outranks the negatives below it.
    let (mut area, mut neg_above, mut i) = (0.0, 0.0, 0);
    while i < v.len() {
        let j = (i..v.len()).find(|&j| v[j].0 != v[i].0).unwrap_or(v.len());
        let p = v[i..j].iter().filter(|x| x.1).count() as f64;
        let n = (j - i) as f64 - p;
        area += p * (neg - neg_above - n) + p * n * 0.5;
        neg_above += n;
        i = j;
    }
    Some(area / (pos * neg))
}

/// Average precision (scikit-learn's step-wise definition); `None` without positives.
pub fn average_precision(
    scores: &[f32],
    truth: &[u8],
    n_labels: usize,
    label: usize,
) -> Option<f64> {
    let v = ranked(scores, truth, n_labels, label);
    let pos = v.iter().filter(|x| x.1).count() as f64;
    if pos == 0.0 {
        return None;
    }
    let (mut ap, mut tp, mut fp, mut prev_recall, mut i) = (0.0, 0.0, 0.0, 0.0, 0);
    while i < v.len() {
        let j = (i..v.len()).find(|&j| v[j].0 != v[i].0).unwrap_or(v.len());
        let p = v[i..j].iter().filter(|x| x.1).count() as f64;
        tp += p;
        fp += (j - i) as f64 - p;
        let recall = tp / pos;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
        i = j;
    }
    Some(ap)
}

/// Precision-recall points at every distinct score (for plots): (threshold, precision, recall).
pub fn pr_curve(
    scores: &[f32],
    truth: &[u8],
    n_labels: usize,
    label: usize,
) -> Vec<(f32, f64, f64)> {
    let v = ranked(scores, truth, n_labels, label);
    let pos = v.iter().filter(|x| x.1).count().max(1) as f64;
    let (mut tp, mut fp, mut i, mut out) = (0.0, 0.0, 0, Vec::new());
    while i < v.len() {
        let j = (i..v.len()).find(|&j| v[j].0 != v[i].0).unwrap_or(v.len());
        let p = v[i..j].iter().filter(|x| x.1).count() as f64;
        tp += p;
        fp += (j - i) as f64 - p;
        out.push((v[i].0, tp / (tp + fp), tp / pos));
        i = j;
    }
    out
}

/// The threshold that maximises one label's F1: an exact sweep over every distinct score as
/// the cut (`score ≥ t` is positive); ties go to the higher threshold. Returns (threshold, F1).
pub fn best_threshold(scores: &[f32], truth: &[u8], n_labels: usize, label: usize) -> (f32, f64) {
    let v = ranked(scores, truth, n_labels, label);
    let pos = v.iter().filter(|x| x.1).count() as u64;
    let (mut best, mut best_f1) = (1.0f32, 0.0f64);
    let (mut tp, mut fp, mut i) = (0u64, 0u64, 0);
    while i < v.len() {
        let j = (i..v.len()).find(|&j| v[j].0 != v[i].0).unwrap_or(v.len());
        let p = v[i..j].iter().filter(|x| x.1).count() as u64;
        tp += p;
        fp += (j - i) as u64 - p;
        let f1 = ratio(2 * tp, tp + fp + pos);
        if f1 > best_f1 {
            best_f1 = f1;
            best = v[i].0;
        }
        i = j;
    }
    (best, best_f1)
}

/// Seeded bootstrap over rows: (2.5th, 97.5th) percentile of macro-F1.
pub fn bootstrap_macro_f1(
    scores: &[f32],
    truth: &[u8],
    n_labels: usize,
    thresholds: &[f32],
    samples: usize,
    seed: u64,
) -> (f64, f64) {
    use rand::{Rng, SeedableRng};
    let n = truth.len() / n_labels.max(1);
    if n == 0 || samples == 0 {
        return (0.0, 0.0);
    }
    // Per-row per-label outcome (0 none, 1 tp, 2 fp, 3 fn), so each resample is a count.
    let outcome: Vec<u8> = scores
        .iter()
        .zip(truth)
        .enumerate()
        .map(
            |(k, (&s, &t))| match (s >= thresholds[k % n_labels], t != 0) {
                (true, true) => 1,
                (true, false) => 2,
                (false, true) => 3,
                (false, false) => 0,
            },
        )
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut f1s: Vec<f64> = (0..samples)
        .map(|_| {
            let mut c = vec![[0u64; 4]; n_labels];
            for _ in 0..n {
                let r = rng.random_range(0..n);
                for l in 0..n_labels {
                    c[l][outcome[r * n_labels + l] as usize] += 1;
                }
            }
            c.iter()
                .map(|k| ratio(2 * k[1], 2 * k[1] + k[2] + k[3]))
                .sum::<f64>()
                / n_labels as f64
        })
        .collect();
    f1s.sort_by(f64::total_cmp);
    let at = |q: f64| f1s[((q * (samples - 1) as f64).round() as usize).min(samples - 1)];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/sklearn_metrics.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn every_figure_matches_scikit_learn() {
        let f = fixture();
        let truth: Vec<u8> = f["y_true"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u8)
            })
            .collect();
        let scores: Vec<f32> = f["scores"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let k = 5;
        for (name, want) in f["policies"].as_object().unwrap() {
            let t: Vec<f32> = want["thresholds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let got = policy_report(&scores, &truth, k, &t);
            for l in 0..k {
                let c = got.per_label[l];
                assert!(
                    close(c.precision(), want["precision"][l].as_f64().unwrap()),
                    "{name} precision {l}"
                );
                assert!(
                    close(c.recall(), want["recall"][l].as_f64().unwrap()),
                    "{name} recall {l}"
                );
                assert!(
                    close(c.f1(), want["f1"][l].as_f64().unwrap()),
                    "{name} f1 {l}"
                );
                assert_eq!(c.support, want["support"][l].as_u64().unwrap());
            }
            for (avg, prf) in [
                ("micro", got.micro),
                ("macro", got.macro_),
                ("weighted", got.weighted),
                ("samples", got.samples),
            ] {
                let w = &want["averages"][avg];
                assert!(
                    close(prf.precision, w["precision"].as_f64().unwrap()),
                    "{name} {avg} precision {} vs {}",
                    prf.precision,
                    w["precision"]
                );
                assert!(
                    close(prf.recall, w["recall"].as_f64().unwrap()),
                    "{name} {avg} recall"
                );
                assert!(
                    close(prf.f1, w["f1"].as_f64().unwrap()),
                    "{name} {avg} f1 {} vs {}",
                    prf.f1,
                    w["f1"]
                );
            }
            assert!(
                close(got.exact_match, want["exact_match"].as_f64().unwrap()),
                "{name} exact match"
            );
            assert!(
                close(got.hamming_loss, want["hamming_loss"].as_f64().unwrap()),
                "{name} hamming"
            );
        }
        for l in 0..k {
            let (auc, ap) = (
                roc_auc(&scores, &truth, k, l),
                average_precision(&scores, &truth, k, l),
            );
            match f["roc_auc"][l].as_f64() {
                Some(w) => assert!(close(auc.unwrap(), w), "auc {l}: {auc:?} vs {w}"),
                None => assert_eq!(auc, None),
            }
            match f["average_precision"][l].as_f64() {
                Some(w) => assert!(close(ap.unwrap(), w), "ap {l}: {ap:?} vs {w}"),
                None => assert_eq!(ap, None),
            }
        }
    }

    #[test]
    fn threshold_sweep_finds_the_known_optimum() {
        // Positives at 0.9, 0.6, 0.35; negatives at 0.7, 0.3, 0.1. Cuts: 0.9 → F1 0.5,
        // 0.7 → 0.4, 0.6 → 0.667, 0.35 → 0.857 (tp 3, fp 1), 0.3 → 0.75, 0.1 → 0.667.
        let scores = [0.9f32, 0.7, 0.6, 0.35, 0.3, 0.1];
        let truth = [1u8, 0, 1, 1, 0, 0];
        let (t, f1) = best_threshold(&scores, &truth, 1, 0);
        assert_eq!(t, 0.35);
        assert!(close(f1, 6.0 / 7.0));
        // Ties go to the higher threshold.
        let (t, _) = best_threshold(&[0.8, 0.5], &[1, 0], 1, 0);
        assert_eq!(t, 0.8);
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate_and_repeats() {
        let f = fixture();
        let truth: Vec<u8> = f["y_true"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u8)
            })
            .collect();
        let scores: Vec<f32> = f["scores"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let t = vec![0.5; 5];
        let point = policy_report(&scores, &truth, 5, &t).macro_.f1;
        let (lo, hi) = bootstrap_macro_f1(&scores, &truth, 5, &t, 500, 1);
        assert!(lo < point && point < hi, "{lo} < {point} < {hi}");
        assert_eq!((lo, hi), bootstrap_macro_f1(&scores, &truth, 5, &t, 500, 1));
    }
}
