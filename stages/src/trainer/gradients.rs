//! One micro-batch's loss and gradients: goemo-nn's packed trainer on the CPU, candle's
//! autograd over the padded forward elsewhere (and as the reference in tests).

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use goemo_data::tokens::TokenizedData;
use goemo_nn::backprop::{Grads, Products};
use goemo_nn::loss::{bce_with_logits, Loss};
use goemo_nn::model::{self, Params};

use super::batching::{make_batch, packed_batch};

/// Forward + backward for one micro-batch: (loss, gradients on host in parameter order). On
/// the CPU the packed trainer (`backprop`) computes them, its products in `products`;
/// elsewhere candle's autograd (f32).
pub fn loss_and_grads(
    params: &Params,
    data: &TokenizedData,
    rows: &[usize],
    loss: &Loss,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
    products: Products,
) -> anyhow::Result<(f64, Grads)> {
    if !device.is_cpu() {
        return loss_and_grads_autograd(params, data, rows, loss, rng, device);
    }
    let (seqs, targets) = packed_batch(data, rows);
    goemo_nn::backprop::loss_and_grads(params, &seqs, &targets, loss, rng, products)
}

/// `loss_and_grads` by candle's autograd over the padded `model::forward`: the reference the
/// packed trainer is tested against, and the path on CUDA. Plain BCE is candle's graph; the
/// other losses are computed on the host ([`Loss::value_and_grad`]) and enter the graph as
/// Σ logits ⊙ ∂loss/∂logits, whose gradient is the loss's.
pub fn loss_and_grads_autograd(
    params: &Params,
    data: &TokenizedData,
    rows: &[usize],
    loss: &Loss,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
) -> anyhow::Result<(f64, Grads)> {
    let (batch, targets) = make_batch(data, rows, device)?;
    let logits = model::forward(&params.cfg, &params.tensors(), &batch, rng)?;
    let (objective, loss_value) = if loss.is_plain_bce() {
        let pos_weight = loss
            .pos_weight
            .as_ref()
            .map(|w| Tensor::new(w.as_slice(), device))
            .transpose()?;
        let bce = bce_with_logits(&logits, &targets, pos_weight.as_ref())?;
        let value = bce.to_scalar::<f32>()? as f64;
        (bce, value)
    } else {
        let host_logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let host_targets: Vec<f32> = targets.flatten_all()?.to_vec1()?;
        let labels = data.n_labels();
        let (value, d) = loss.value_and_grad(&host_logits, &host_targets, labels);
        let d = Tensor::from_vec(d, logits.shape(), device)?;
        ((&logits * d)?.sum_all()?, value)
    };
    let mut grads = objective.backward()?;
    // Peak memory: free the forward graph's activations, and each gradient tensor once it is
    // copied out, so the gradients never exist twice in full.
    drop((objective, logits));
    let host = params.tree.map(|_, v| -> anyhow::Result<Vec<f32>> {
        Ok(match grads.remove(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; v.elem_count()],
        })
    })?;
    Ok((loss_value, host))
}
