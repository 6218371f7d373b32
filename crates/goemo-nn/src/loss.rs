//! The training loss: binary cross-entropy on logits, per label, for multi-label targets.

use candle_core::{DType, Tensor};

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
