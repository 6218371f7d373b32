//! AdamW on host memory, over the parameter tree: each parameter's moments live in an
//! [`Encoder<Moments>`] of the parameters' shape, and a step walks parameters, gradients and
//! moments together, one pass per parameter (rayon over parameters). Biases and LayerNorm
//! parameters are not decayed, as in HF's Trainer; the new head may learn faster
//! ([`AdamWConfig::head_lr_scale`]).

use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::Params;
use crate::params::Encoder;

/// AdamW's hyperparameters (the learning rate comes with each step, from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// The head's (pool and classifier) learning rate as a multiple of the schedule's.
    pub head_lr_scale: f64,
}

/// Elements per parallel task of one parameter's update.
const CHUNK: usize = 1 << 16;

/// One step's constants for one parameter.
#[derive(Clone, Copy)]
struct Hyper {
    b1: f32,
    b2: f32,
    shrink: f32,
    decay: bool,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

/// AdamW on a run of elements. Elementwise, each element's operations in a fixed order with no
/// fused multiply-add (Rust never contracts), so vector registers of any width give the same
/// bits as one element at a time.
#[inline(always)]
fn update(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: Hyper) {
    for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
        *m = h.b1 * *m + (1.0 - h.b1) * g;
        *v = h.b2 * *v + (1.0 - h.b2) * g * g;
        if h.decay {
            *w *= h.shrink;
        }
        *w -= h.step_size * *m / (v.sqrt() / h.bc2_sqrt + h.eps);
    }
}

wide_fn!(fn update_wide(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: Hyper) => update);

/// One parameter's first and second moments.
#[derive(Debug, Clone)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct AdamW {
    pub moments: Encoder<Moments>,
    /// Steps taken (the bias correction's t).
    pub t: u64,
    config: AdamWConfig,
}

impl AdamW {
    /// Zero moments for every parameter of `params`.
    pub fn new(params: &Params, config: AdamWConfig) -> AdamW {
        AdamW {
            moments: params.tree.map_each(|v| Moments {
                m: vec![0.0; v.elem_count()],
                v: vec![0.0; v.elem_count()],
            }),
            t: 0,
            config,
        }
    }

    /// One update of every parameter from its gradient, at learning rate `lr`.
    pub fn step(
        &mut self,
        params: &Params,
        grads: &Encoder<Vec<f32>>,
        lr: f64,
    ) -> anyhow::Result<()> {
        self.t += 1;
        let c = self.config;
        let (b1, b2) = (c.betas[0] as f32, c.betas[1] as f32);
        let bc1 = 1.0 - c.betas[0].powi(self.t as i32);
        let bc2 = 1.0 - c.betas[1].powi(self.t as i32);
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = c.eps as f32;
        let pairs = params.tree.zip(grads)?;
        let slots = params.tree.slots();
        let moments = self.moments.leaves_mut();
        anyhow::ensure!(
            moments.len() == slots.len(),
            "the optimizer's moments do not match the model's parameters"
        );
        // Each parameter is written back as soon as it is updated, so at most one parameter per
        // thread exists twice (not the whole model).
        pairs
            .leaves()
            .into_par_iter()
            .zip(moments)
            .zip(slots)
            .map(|((&(var, g), mo), slot)| {
                let scale = if slot.head { c.head_lr_scale } else { 1.0 };
                let lr = lr * scale;
                let step_size = (lr / bc1) as f32;
                let shrink = (1.0 - lr * c.weight_decay) as f32;
                let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
                assert!(
                    g.len() == w.len() && mo.m.len() == w.len() && mo.v.len() == w.len(),
                    "AdamW: a gradient or moment does not match its parameter's size"
                );
                let hyper = Hyper {
                    b1,
                    b2,
                    shrink,
                    decay: slot.decay,
                    step_size,
                    bc2_sqrt,
                    eps,
                };
                // Chunks in parallel: the word embeddings alone are half of MiniLM's weights.
                w.par_chunks_mut(CHUNK)
                    .zip(mo.m.par_chunks_mut(CHUNK))
                    .zip(mo.v.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(((w, m), v), g)| update_wide(w, m, v, g, hyper));
                var.set(&Tensor::from_vec(w, var.shape(), var.device())?)
            })
            .collect::<candle_core::Result<()>>()?;
        Ok(())
    }
}
