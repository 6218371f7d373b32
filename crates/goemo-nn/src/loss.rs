//! The training loss on logits, per label, for multi-label targets: [`Loss`] (BCE, focal or
//! asymmetric, with label smoothing and pos_weight) as the packed trainer computes it, value
//! and ∂loss/∂logits in one pass; and [`bce_with_logits`], candle's graph of plain BCE (the
//! autograd reference and the CUDA path).

use candle_core::{DType, Tensor};

/// Which per-label loss the trainer minimises. With p = σ(z) and targets y ∈ [0, 1]:
/// ℓ = −w·y·(1 − p)^γ₊·log p − (1 − y)·p_m^γ₋·log(1 − p_m), p_m = max(p − clip, 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// γ₊ = γ₋ = 0, clip 0.
    Bce,
    /// Lin et al. 2017: γ₊ = γ₋ = `gamma`, clip 0 (easy examples weigh less).
    Focal { gamma: f32 },
    /// Ridnik et al. 2021 (ASL): easy negatives weigh less (γ₋ > γ₊), and negatives the model
    /// already scores below `clip` count for nothing (probability shifting).
    Asymmetric {
        gamma_neg: f32,
        gamma_pos: f32,
        clip: f32,
    },
}

/// The whole objective: the loss, label smoothing (targets pulled toward ½ by `label_smoothing`
/// / 2 on both sides) and one positive-class weight per label.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub kind: LossKind,
    pub label_smoothing: f32,
    pub pos_weight: Option<Vec<f32>>,
}

impl Loss {
    /// Plain BCE, optionally with pos_weight: the loss every run used before the others.
    pub fn bce(pos_weight: Option<Vec<f32>>) -> Loss {
        Loss {
            kind: LossKind::Bce,
            label_smoothing: 0.0,
            pos_weight,
        }
    }

    /// Plain BCE without smoothing: computed exactly as before the other losses existed, so its
    /// runs keep their bits.
    pub fn is_plain_bce(&self) -> bool {
        self.kind == LossKind::Bce && self.label_smoothing == 0.0
    }

    /// (mean loss over rows × labels, ∂mean/∂logits); `labels` is the row width of `logits`
    /// and `targets`.
    pub fn value_and_grad(
        &self,
        logits: &[f32],
        targets: &[f32],
        labels: usize,
    ) -> (f64, Vec<f32>) {
        assert_eq!(
            logits.len(),
            targets.len(),
            "logits and targets differ in size"
        );
        let pos_weight = self.pos_weight.as_deref();
        if self.is_plain_bce() {
            return bce(logits, targets, pos_weight, labels);
        }
        let (gamma_pos, gamma_neg, clip) = match self.kind {
            LossKind::Bce => (0.0, 0.0, 0.0),
            LossKind::Focal { gamma } => (gamma as f64, gamma as f64, 0.0),
            LossKind::Asymmetric {
                gamma_neg,
                gamma_pos,
                clip,
            } => (gamma_pos as f64, gamma_neg as f64, clip as f64),
        };
        let eps = self.label_smoothing as f64;
        let n = logits.len() as f64;
        let mut loss = 0f64;
        let mut d_logits = vec![0f32; logits.len()];
        for (i, (&z, &y)) in logits.iter().zip(targets).enumerate() {
            let z = z as f64;
            let y = y as f64 * (1.0 - eps) + eps / 2.0;
            let w = pos_weight.map_or(1.0, |p| p[i % labels] as f64);
            let (pos, d_pos) = positive_term(z, gamma_pos);
            let (neg, d_neg) = negative_term(z, gamma_neg, clip);
            loss -= w * y * pos + (1.0 - y) * neg;
            d_logits[i] = (-(w * y * d_pos + (1.0 - y) * d_neg) / n) as f32;
        }
        (loss / n, d_logits)
    }
}

/// softplus(x) = log(1 + eˣ) without overflow.
fn softplus(x: f64) -> f64 {
    (-x.abs()).exp().ln_1p() + x.max(0.0)
}

/// (1 − p)^γ·log p and its derivative in z: (1 − p)^γ·((1 − p) − γ·p·log p).
fn positive_term(z: f64, gamma: f64) -> (f64, f64) {
    let log_p = -softplus(-z);
    let q = 1.0 / (1.0 + z.exp()); // 1 − p, without cancellation
    let p = 1.0 / (1.0 + (-z).exp());
    let focus = q.powf(gamma);
    (focus * log_p, focus * (q - gamma * p * log_p))
}

/// p_m^γ·log(1 − p_m), p_m = max(p − clip, 0), and its derivative in z:
/// p(1 − p)·(γ·p_m^(γ−1)·log(1 − p_m) − p_m^γ / (1 − p_m)); zero where p ≤ clip.
fn negative_term(z: f64, gamma: f64, clip: f64) -> (f64, f64) {
    let p = 1.0 / (1.0 + (-z).exp());
    let q = 1.0 / (1.0 + z.exp());
    if clip == 0.0 {
        // p_m = p: log(1 − p) = −softplus(z) and p(1 − p)/(1 − p) = p, stable for any z.
        let log_q = -softplus(z);
        let pg = p.powf(gamma);
        return (pg * log_q, gamma * pg * q * log_q - pg * p);
    }
    let pm = p - clip;
    if pm <= 0.0 {
        return (0.0, 0.0);
    }
    let log_1m = (-pm).ln_1p();
    let pg = pm.powf(gamma);
    let d_pm = gamma * pg * log_1m / pm - pg / (1.0 - pm);
    (pg * log_1m, p * q * d_pm)
}

/// BCE with logits, mean over rows × labels: (loss, ∂loss/∂logits). ℓ = (1 − y)·z +
/// w_y·softplus(−z) with w_y = 1 + (pos_weight − 1)·y; ∂ℓ/∂z = (1 − y) − w_y·σ(−z). In f32, in
/// this order: the bits of every plain-BCE entry and lock.
fn bce(
    logits: &[f32],
    targets: &[f32],
    pos_weight: Option<&[f32]>,
    labels: usize,
) -> (f64, Vec<f32>) {
    let n = logits.len() as f64;
    let mut loss = 0f64;
    let mut d_logits = vec![0f32; logits.len()];
    for (i, (&z, &y)) in logits.iter().zip(targets).enumerate() {
        let pw = pos_weight.map_or(1.0, |p| p[i % labels]);
        let wy = 1.0 + (pw - 1.0) * y;
        let softplus_neg = (-z.abs()).exp().ln_1p() + (-z).max(0.0);
        loss += ((1.0 - y) * z + wy * softplus_neg) as f64;
        let sig_neg = 1.0 / (1.0 + z.exp());
        d_logits[i] = (((1.0 - y) - wy * sig_neg) as f64 / n) as f32;
    }
    (loss / n, d_logits)
}

/// BCE-with-logits, stable form, mean over all elements; `pos_weight` broadcast over labels.
pub fn bce_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    pos_weight: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let y = targets.to_dtype(DType::F32)?;
    // log(1 + e^-|x|) + max(-x, 0): the softplus of -x without overflow.
    let softplus_neg = ((x.abs()?.neg()?.exp()? + 1.0)?.log()? + x.neg()?.relu()?)?;
    let weighted = match pos_weight {
        Some(w) => {
            let w = (y.broadcast_mul(&(w - 1.0)?)? + 1.0)?;
            (w * softplus_neg)?
        }
        None => softplus_neg,
    };
    let one_minus_y = (y.neg()? + 1.0)?;
    ((one_minus_y * &x)? + weighted)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases() -> Vec<Loss> {
        let pw = Some((0..5).map(|k| 0.5 + k as f32).collect());
        vec![
            Loss::bce(None),
            Loss::bce(pw.clone()),
            Loss {
                label_smoothing: 0.1,
                ..Loss::bce(pw.clone())
            },
            Loss {
                kind: LossKind::Focal { gamma: 2.0 },
                ..Loss::bce(None)
            },
            Loss {
                kind: LossKind::Focal { gamma: 0.5 },
                label_smoothing: 0.05,
                pos_weight: pw.clone(),
            },
            Loss {
                kind: LossKind::Asymmetric {
                    gamma_neg: 4.0,
                    gamma_pos: 0.0,
                    clip: 0.05,
                },
                ..Loss::bce(None)
            },
            Loss {
                kind: LossKind::Asymmetric {
                    gamma_neg: 2.0,
                    gamma_pos: 1.0,
                    clip: 0.0,
                },
                label_smoothing: 0.1,
                pos_weight: pw,
            },
        ]
    }

    /// Logits over a wide range (saturated ones included), hard and soft targets.
    fn batch() -> (Vec<f32>, Vec<f32>) {
        let logits: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 40) as f32 - 20.0) * 0.45)
            .collect();
        let targets: Vec<f32> = (0..40)
            .map(|i| match i % 5 {
                0 => 1.0,
                1 => 0.3,
                _ => 0.0,
            })
            .collect();
        (logits, targets)
    }

    /// Every loss's gradient equals central differences of its value (in f64, so the check is
    /// tight), element by element.
    #[test]
    fn loss_gradients_match_finite_differences() {
        let (logits, targets) = batch();
        for loss in cases() {
            let (_, grad) = loss.value_and_grad(&logits, &targets, 5);
            for i in 0..logits.len() {
                let h = 1e-2f32;
                let at = |dz: f32| {
                    let mut z = logits.clone();
                    z[i] += dz;
                    loss.value_and_grad(&z, &targets, 5).0
                };
                let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                let g = grad[i] as f64;
                assert!(
                    (g - fd).abs() <= 2e-3 * fd.abs().max(1e-3) + 1e-6,
                    "{loss:?}: logit {i} (z = {}): gradient {g} vs differences {fd}",
                    logits[i]
                );
            }
        }
    }

    /// The general path with γ = 0, clip 0 and no smoothing is plain BCE (checked against the
    /// f32 path), and focal's γ = 0 is BCE too.
    #[test]
    fn zero_focus_is_bce() {
        let (logits, targets) = batch();
        let pw: Vec<f32> = (0..5).map(|k| 0.5 + k as f32).collect();
        let (want, want_grad) = Loss::bce(Some(pw.clone())).value_and_grad(&logits, &targets, 5);
        for kind in [
            LossKind::Focal { gamma: 0.0 },
            LossKind::Asymmetric {
                gamma_neg: 0.0,
                gamma_pos: 0.0,
                clip: 0.0,
            },
        ] {
            let loss = Loss {
                kind,
                label_smoothing: 0.0,
                pos_weight: Some(pw.clone()),
            };
            let (got, grad) = loss.value_and_grad(&logits, &targets, 5);
            assert!((got - want).abs() < 1e-6, "{kind:?}: {got} vs {want}");
            for (g, w) in grad.iter().zip(&want_grad) {
                assert!((g - w).abs() < 1e-6, "{kind:?}: gradient {g} vs {w}");
            }
        }
    }

    /// The properties each loss exists for: focal weighs a confident right answer less than
    /// BCE does; ASL's clip zeroes the loss of negatives scored below it; smoothing pulls the
    /// optimum off ±∞ (a confident right answer then has a non-zero gradient back).
    #[test]
    fn each_loss_does_what_it_is_for() {
        let one = |loss: &Loss, z: f32, y: f32| loss.value_and_grad(&[z], &[y], 1);
        let bce = Loss::bce(None);
        let focal = Loss {
            kind: LossKind::Focal { gamma: 2.0 },
            ..Loss::bce(None)
        };
        assert!(one(&focal, 3.0, 1.0).0 < 0.01 * one(&bce, 3.0, 1.0).0);
        let asl = Loss {
            kind: LossKind::Asymmetric {
                gamma_neg: 4.0,
                gamma_pos: 0.0,
                clip: 0.05,
            },
            ..Loss::bce(None)
        };
        // σ(−3.5) ≈ 0.029 < 0.05: nothing to learn from this negative.
        assert_eq!(one(&asl, -3.5, 0.0), (0.0, vec![0.0]));
        assert!(one(&bce, -3.5, 0.0).0 > 0.0);
        let smooth = Loss {
            label_smoothing: 0.1,
            ..Loss::bce(None)
        };
        assert!(
            one(&smooth, 8.0, 1.0).1[0] > 0.0,
            "smoothing pulls z = 8 back down"
        );
        assert!(one(&bce, 8.0, 1.0).1[0] < 0.0);
    }

    /// Saturated logits give finite values and gradients under every loss.
    #[test]
    fn extreme_logits_stay_finite() {
        let logits = [-80.0f32, -30.0, 30.0, 80.0];
        for loss in cases() {
            for y in [0.0f32, 1.0] {
                let (v, g) = loss.value_and_grad(&logits, &[y; 4], 1);
                assert!(
                    v.is_finite() && g.iter().all(|x| x.is_finite()),
                    "{loss:?} y {y}: {v} {g:?}"
                );
            }
        }
    }
}
