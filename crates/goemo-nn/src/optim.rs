//! AdamW on host memory, over the parameter tree: each parameter's moments live in an
//! [`Encoder<Moments>`] of the parameters' shape, and a step walks parameters, gradients and
//! moments together, one pass per parameter (rayon over parameters). Biases and LayerNorm
//! parameters are not decayed, as in HF's Trainer; the new head may learn faster
//! ([`AdamWConfig::head_lr_scale`]).

use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::Params;
use crate::params::{Encoder, Slot};

/// AdamW's hyperparameters (the learning rate comes with each step, from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// The head's (pool and classifier) learning rate as a multiple of the schedule's.
    pub head_lr_scale: f64,
    /// Layer-wise decay ξ (1: off): the top encoder layer at the schedule's rate, each one below
    /// at ξ times the one above, the embeddings at ξ^layers.
    pub layer_lr_decay: f64,
}

impl AdamWConfig {
    /// A parameter's learning rate as a multiple of the schedule's, for a model of `layers`
    /// encoder layers.
    pub fn lr_scale(&self, slot: &Slot, layers: usize) -> f64 {
        if slot.head {
            return self.head_lr_scale;
        }
        if self.layer_lr_decay == 1.0 {
            return 1.0;
        }
        // Depth below the top layer: 0 for the top, `layers` for the embeddings.
        let below_top = match slot.layer {
            Some(l) => layers.saturating_sub(l + 1),
            None => layers,
        };
        self.layer_lr_decay.powi(below_top as i32)
    }
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

/// Run `update` on the values of `var`: in place where they live in host memory (through
/// candle's in-place op, so no copy of the model is made each step: copying every parameter out
/// and back, into freshly faulted pages, was a tenth of a MiniLM bf16 training step), else
/// (a GPU) on a host copy written back.
fn update_var(var: &candle_core::Var, update: impl FnOnce(&mut [f32])) -> candle_core::Result<()> {
    if var.device().is_cpu() && var.is_contiguous() {
        return var.inplace_op1(&InPlace(std::cell::Cell::new(Some(update))));
    }
    let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
    update(&mut w);
    var.set(&Tensor::from_vec(w, var.shape(), var.device())?)
}

/// `update_var`'s in-place op: the update, run once on the storage's f32 values.
struct InPlace<F>(std::cell::Cell<Option<F>>);

impl<F: FnOnce(&mut [f32])> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(all) = storage else {
            candle_core::bail!("AdamW updates f32 parameters only");
        };
        let Some(update) = self.0.take() else {
            candle_core::bail!("AdamW's in-place update ran twice");
        };
        update(&mut all[layout.start_offset()..][..layout.shape().elem_count()]);
        Ok(())
    }
}

/// The moving average's step: e ← d·e + (1 − d)·w, elementwise (any vector width, same bits).
#[inline(always)]
fn average(e: &mut [f32], w: &[f32], d: f32) {
    for (e, &w) in e.iter_mut().zip(w) {
        *e = d * *e + (1.0 - d) * w;
    }
}

wide_fn!(fn average_wide(e: &mut [f32], w: &[f32], d: f32) => average);

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
    /// An exponential moving average of the weights, kept up by [`AdamW::step`] (it has each
    /// parameter's new value at hand, so the average costs no extra pass over the weights).
    pub average: Option<WeightAverage>,
}

/// Weights averaged over steps: after step t, e ← d_t·e + (1 − d_t)·w with
/// d_t = min(decay, (1 + t) / (10 + t)), so the first steps' weights (the fresh head's noise)
/// are not kept for thousands of steps.
#[derive(Debug, Clone)]
pub struct WeightAverage {
    pub decay: f64,
    pub weights: Encoder<Vec<f32>>,
}

impl WeightAverage {
    fn decay_at(&self, t: u64) -> f32 {
        self.decay.min((1.0 + t as f64) / (10.0 + t as f64)) as f32
    }

    /// The averaged weights as tensors on `device`, in the parameter tree's order.
    pub fn tensors(&self, params: &Params) -> anyhow::Result<Encoder<Tensor>> {
        let pairs = params.tree.zip(&self.weights)?;
        pairs.map(|_, (var, w)| -> anyhow::Result<Tensor> {
            Ok(Tensor::from_slice(w, var.shape(), var.device())?)
        })
    }
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
            average: None,
        }
    }

    /// Keep a moving average of the weights with this decay, starting from their values now.
    pub fn with_average(mut self, params: &Params, decay: f64) -> anyhow::Result<AdamW> {
        let weights = params.tree.map(|_, v| -> anyhow::Result<Vec<f32>> {
            Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)
        })?;
        self.average = Some(WeightAverage { decay, weights });
        Ok(self)
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
        let layers = params.cfg.layers;
        let moments = self.moments.leaves_mut();
        anyhow::ensure!(
            moments.len() == slots.len(),
            "the optimizer's moments do not match the model's parameters"
        );
        let avg_decay = self.average.as_ref().map(|a| a.decay_at(self.t));
        let mut averages: Vec<Option<&mut Vec<f32>>> = match self.average.as_mut() {
            Some(a) => a.weights.leaves_mut().into_iter().map(Some).collect(),
            None => (0..slots.len()).map(|_| None).collect(),
        };
        anyhow::ensure!(
            averages.len() == slots.len(),
            "the weight average does not match the model's parameters"
        );
        pairs
            .leaves()
            .into_par_iter()
            .zip(moments)
            .zip(slots)
            .zip(averages.par_iter_mut())
            .map(|(((&(var, g), mo), slot), avg)| {
                let lr = lr * c.lr_scale(&slot, layers);
                let step_size = (lr / bc1) as f32;
                let shrink = (1.0 - lr * c.weight_decay) as f32;
                let hyper = Hyper {
                    b1,
                    b2,
                    shrink,
                    decay: slot.decay,
                    step_size,
                    bc2_sqrt,
                    eps,
                };
                let update = |w: &mut [f32]| {
                    assert!(
                        g.len() == w.len() && mo.m.len() == w.len() && mo.v.len() == w.len(),
                        "AdamW: a gradient or moment does not match its parameter's size"
                    );
                    // Chunks in parallel: the word embeddings alone are half of MiniLM's weights.
                    w.par_chunks_mut(CHUNK)
                        .zip(mo.m.par_chunks_mut(CHUNK))
                        .zip(mo.v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((w, m), v), g)| update_wide(w, m, v, g, hyper));
                    if let (Some(avg), Some(d)) = (avg.as_deref_mut(), avg_decay) {
                        avg.par_chunks_mut(CHUNK)
                            .zip(w.par_chunks(CHUNK))
                            .for_each(|(e, w)| average_wide(e, w, d));
                    }
                };
                update_var(var, update)
            })
            .collect::<candle_core::Result<()>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, EncoderConfig};
    use crate::test_support::tiny_config;
    use candle_core::Device;

    fn tiny(layers: usize) -> Params {
        let mut raw = tiny_config(Arch::Bert, 0.0);
        raw["num_hidden_layers"] = layers.into();
        let cfg = EncoderConfig::from_json(raw).unwrap();
        Params::init(&cfg, 5, 0, &Device::Cpu).unwrap()
    }

    fn config(layer_lr_decay: f64) -> AdamWConfig {
        AdamWConfig {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
            head_lr_scale: 30.0,
            layer_lr_decay,
        }
    }

    /// ξ = 0.8 over 3 layers: embeddings 0.8³, layer 0 0.8², layer 1 0.8, layer 2 (the top) 1,
    /// the head its own scale; ξ = 1 changes nothing.
    #[test]
    fn layer_decay_scales_by_depth() {
        let params = tiny(3);
        let slots = params.tree.slots();
        let scale_of = |c: &AdamWConfig, name: &str| {
            let s = slots.iter().find(|s| s.name == name).unwrap();
            c.lr_scale(s, 3)
        };
        let c = config(0.8);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(
            scale_of(&c, "bert.embeddings.word_embeddings.weight"),
            0.512
        ));
        assert!(close(
            scale_of(&c, "bert.embeddings.LayerNorm.weight"),
            0.512
        ));
        assert!(close(
            scale_of(&c, "bert.encoder.layer.0.attention.self.query.weight"),
            0.64
        ));
        assert!(close(
            scale_of(&c, "bert.encoder.layer.1.output.LayerNorm.bias"),
            0.8
        ));
        assert!(close(
            scale_of(&c, "bert.encoder.layer.2.intermediate.dense.weight"),
            1.0
        ));
        assert!(close(scale_of(&c, "classifier.weight"), 30.0));
        assert!(close(scale_of(&c, "bert.pooler.dense.bias"), 30.0));
        let off = config(1.0);
        for s in &slots {
            let want = if s.head { 30.0 } else { 1.0 };
            assert_eq!(off.lr_scale(s, 3), want, "{}", s.name);
        }
        assert!(slots
            .iter()
            .all(|s| s.head || s.name.contains("embeddings") || s.layer.is_some()));
    }

    /// The average after three steps is d₃(d₂(d₁·w₀ + (1 − d₁)·w₁) + …) with
    /// d_t = min(decay, (1 + t)/(10 + t)), bit for bit; the weights themselves are those of a
    /// run without it.
    #[test]
    fn weight_average_follows_its_formula() {
        let with = tiny(2);
        let without = tiny(2);
        let flat = |p: &Params| -> Vec<Vec<f32>> {
            p.vars
                .iter()
                .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let mut expect = flat(&with);
        let mut opt = AdamW::new(&with, config(0.9))
            .with_average(&with, 0.99)
            .unwrap();
        let mut plain = AdamW::new(&without, config(0.9));
        for t in 0..3u64 {
            let grads = with.tree.map_each(|v| {
                (0..v.elem_count())
                    .map(|i| ((i as f32 + t as f32) * 0.37).sin())
                    .collect::<Vec<f32>>()
            });
            opt.step(&with, &grads, 1e-3).unwrap();
            plain.step(&without, &grads, 1e-3).unwrap();
            // Step t + 1 (t counts from 1, as AdamW's bias correction does).
            let n = (t + 1) as f64;
            let d = (0.99f64).min((1.0 + n) / (10.0 + n)) as f32;
            for (e, w) in expect.iter_mut().zip(flat(&with)) {
                e.iter_mut()
                    .zip(&w)
                    .for_each(|(e, &w)| *e = d * *e + (1.0 - d) * w);
            }
        }
        assert_eq!(
            flat(&with),
            flat(&without),
            "the average changed the weights"
        );
        let avg = opt.average.as_ref().unwrap();
        for (got, want) in avg.weights.leaves().into_iter().zip(&expect) {
            assert!(got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        // And it is not simply the weights.
        assert_ne!(avg.weights.leaves()[0], &flat(&with)[0]);
        let tensors = avg.tensors(&with).unwrap();
        assert_eq!(tensors.leaves()[0].dims(), with.vars[0].dims());
    }

    /// AdamW's first step from zero moments, element by element as `update` defines it, against
    /// what `AdamW::step` leaves in the parameters: the same bits, written in place (a clone of
    /// a variable, which shares its storage, sees the new values, as with `Var::set`).
    #[test]
    fn a_step_updates_every_parameter_in_place_by_the_formula() {
        let params = tiny(1);
        let before: Vec<Vec<f32>> = params
            .vars
            .iter()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let grads = params.tree.map_each(|v| {
            crate::test_support::random_floats(v.elem_count(), v.elem_count() as u64)
        });
        let clones: Vec<_> = params.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let c = config(1.0);
        let mut opt = AdamW::new(&params, c);
        let lr = 1e-3;
        opt.step(&params, &grads, lr).unwrap();
        let slots = params.tree.slots();
        for (((w0, g), slot), t) in before.iter().zip(grads.leaves()).zip(&slots).zip(&clones) {
            let lr = lr * c.lr_scale(slot, 1);
            let (b1, b2) = (0.9f32, 0.999f32);
            let step_size = (lr / (1.0 - 0.9)) as f32;
            let bc2_sqrt = (1.0 - 0.999f64).sqrt() as f32;
            let shrink = (1.0 - lr * c.weight_decay) as f32;
            let want: Vec<u32> = w0
                .iter()
                .zip(g)
                .map(|(&w, &g)| {
                    let m = b1 * 0.0 + (1.0 - b1) * g;
                    let v = b2 * 0.0 + (1.0 - b2) * g * g;
                    let w = if slot.decay { w * shrink } else { w };
                    (w - step_size * m / (v.sqrt() / bc2_sqrt + 1e-8)).to_bits()
                })
                .collect();
            let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{}", slot.name);
            assert_ne!(&got, &w0.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }
}
