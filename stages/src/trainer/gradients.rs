//! One micro-batch's loss and gradients: goemo-nn's packed trainer on the CPU, candle's
//! autograd over the padded forward elsewhere (and as the reference in tests).

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use goemo_data::tokens::TokenizedData;
use goemo_nn::backprop::{Grads, Products, Spare};
use goemo_nn::loss::{bce_with_logits, Loss};
use goemo_nn::model::{self, Params};

use super::batching::{make_batch, packed_batch, SoftTargets};

/// What a micro-batch is trained toward: the loss, and soft targets mixed into the labels (a
/// distilled student) or none.
#[derive(Clone, Copy)]
pub struct Objective<'a> {
    pub loss: &'a Loss,
    pub soft: Option<&'a SoftTargets>,
}

impl<'a> Objective<'a> {
    /// The labels alone.
    pub fn hard(loss: &'a Loss) -> Objective<'a> {
        Objective { loss, soft: None }
    }

    /// The batch's targets (rows × labels): its labels, mixed with the soft targets if any.
    fn targets(&self, rows: &[usize], mut labels: Vec<f32>) -> Vec<f32> {
        if let Some(soft) = self.soft {
            soft.mix(rows, &mut labels);
        }
        labels
    }
}

/// Forward + backward for one micro-batch: (loss, gradients on host in parameter order). On
/// the CPU the packed trainer (`backprop`) computes them, its products in `products`, into
/// `spare`'s buffer where given; elsewhere candle's autograd (f32).
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads(
    params: &Params,
    data: &TokenizedData,
    rows: &[usize],
    objective: Objective<'_>,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
    products: Products,
    spare: Option<Spare>,
) -> anyhow::Result<(f64, Grads)> {
    if !device.is_cpu() {
        return loss_and_grads_autograd(params, data, rows, objective, rng, device);
    }
    let (seqs, labels) = packed_batch(data, rows);
    let targets = objective.targets(rows, labels);
    let loss = objective.loss;
    let step = goemo_nn::backprop::step(params, &seqs, &targets, loss, rng, products, spare)?;
    Ok((step.loss, step.grads))
}

/// `loss_and_grads` by candle's autograd over the padded `model::forward`: the reference the
/// packed trainer is tested against, and the path on CUDA. Plain BCE is candle's graph; the
/// other losses are computed on the host ([`Loss::value_and_grad`]) and enter the graph as
/// Σ logits ⊙ ∂loss/∂logits, whose gradient is the loss's.
pub fn loss_and_grads_autograd(
    params: &Params,
    data: &TokenizedData,
    rows: &[usize],
    objective: Objective<'_>,
    rng: Option<&mut ChaCha8Rng>,
    device: &Device,
) -> anyhow::Result<(f64, Grads)> {
    let loss = objective.loss;
    let (batch, mut targets) = make_batch(data, rows, device)?;
    if objective.soft.is_some() {
        let host = objective.targets(rows, targets.flatten_all()?.to_vec1()?);
        targets = Tensor::from_vec(host, targets.shape(), device)?;
    }
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
