//! AdamW on host memory, over the parameter tree: each parameter's moments live in an
//! [`Encoder<Moments>`] of the parameters' shape, and a step walks parameters, gradients and
//! moments together, one pass per parameter (rayon over parameters). Biases and LayerNorm
//! parameters are not decayed, as in HF's Trainer; the new head may learn faster
//! ([`AdamWConfig::head_lr_scale`]). The word-embedding rows a step's batch does not touch may
//! take their updates when next read ([`AdamW::defer_word_rows`]), with the same bits.

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
#[derive(Debug, Clone, Copy)]
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

/// Elements of a row [`catch_up`] carries through all its steps at a time (in registers).
const CATCH_UP_RUN: usize = 64;
/// A zero gradient for [`catch_up`]: what a row outside a step's batch receives.
const ZERO_GRADIENT: [f32; CATCH_UP_RUN] = [0.0; CATCH_UP_RUN];

/// The updates of `steps` (in order) with a zero gradient, as [`update`] makes them: the same
/// operations on each element, so the same bits as running `update` step by step.
#[inline(always)]
fn catch_up(w: &mut [f32], m: &mut [f32], v: &mut [f32], steps: &[Hyper]) {
    for ((w, m), v) in w
        .chunks_mut(CATCH_UP_RUN)
        .zip(m.chunks_mut(CATCH_UP_RUN))
        .zip(v.chunks_mut(CATCH_UP_RUN))
    {
        let zero = &ZERO_GRADIENT[..w.len()];
        for &h in steps {
            update(w, m, v, zero, h);
        }
    }
}

wide_fn!(fn catch_up_wide(w: &mut [f32], m: &mut [f32], v: &mut [f32], steps: &[Hyper]) => catch_up);

/// The word-embedding rows whose updates are deferred ([`AdamW::defer_word_rows`]). A step's
/// word-embedding gradient is exactly zero outside the rows of the batch's tokens, and with a
/// zero gradient AdamW's update of an element depends only on the step's constants: so a row
/// that no batch reads can take its updates later, all at once, with the same operations in
/// the same order (the same bits), and a step touches only its batch's rows instead of the
/// whole table (half of MiniLM's weights; its moments and gradient too).
#[derive(Debug, Clone)]
struct DeferredRows {
    /// Elements per row (the hidden size).
    width: usize,
    /// The step each row was last brought up to date with (or `first`, if later).
    synced: Vec<u64>,
    /// Every row is up to date with step `first`; `steps[i]` are the table's constants at step
    /// `first + 1 + i`.
    first: u64,
    steps: Vec<Hyper>,
}

impl DeferredRows {
    /// The constants of the steps a row last synced at `synced` is behind by. (A row is
    /// up to date with step `max(synced, first)`: moving `first` syncs every row at once.)
    fn pending(&self, synced: u64) -> &[Hyper] {
        &self.steps[(synced.max(self.first) - self.first) as usize..]
    }

    /// The last step taken.
    fn now(&self) -> u64 {
        self.first + self.steps.len() as u64
    }
}

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

/// `rows` (token ids) sorted, without repeats, each checked against the table's `len` rows.
pub fn sorted_rows(rows: &[u32], len: usize) -> anyhow::Result<Vec<usize>> {
    let mut out: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
    out.sort_unstable();
    out.dedup();
    if let Some(&last) = out.last() {
        anyhow::ensure!(
            last < len,
            "token id {last} is outside the word-embedding table ({len} rows)"
        );
    }
    Ok(out)
}

/// `f(weights, first moments, second moments, row)` on each of `rows` (sorted, unique) of a
/// table of rows of `width`, the rows in parallel.
fn for_each_row(
    w: &mut [f32],
    mo: &mut Moments,
    width: usize,
    rows: &[usize],
    f: impl Fn(&mut [f32], &mut [f32], &mut [f32], usize) + Sync,
) {
    let (ws, ms, vs) = (
        row_slices(w, width, rows),
        row_slices(&mut mo.m, width, rows),
        row_slices(&mut mo.v, width, rows),
    );
    ws.into_par_iter()
        .zip(ms)
        .zip(vs)
        .zip(rows)
        .for_each(|(((w, m), v), &r)| f(w, m, v, r));
}

/// The rows `rows` (sorted, unique) of a table of rows of `width`, as disjoint slices.
fn row_slices<'a>(mut data: &'a mut [f32], width: usize, rows: &[usize]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(rows.len());
    let mut next = 0;
    for &r in rows {
        let rest = std::mem::take(&mut data);
        let (row, rest) = rest[(r - next) * width..].split_at_mut(width);
        out.push(row);
        data = rest;
        next = r + 1;
    }
    out
}

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
    /// Word-embedding rows updated only when read ([`AdamW::defer_word_rows`]).
    deferred: Option<DeferredRows>,
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
            deferred: None,
        }
    }

    /// Defer the updates of word-embedding rows outside each step's batch until something reads
    /// them (the same bits, far less memory traffic a step). The caller's side of the bargain:
    /// [`AdamW::step_rows`] names every row the step's gradient may touch; the rows a forward
    /// pass reads are brought up to date first ([`AdamW::settle_rows`]); and the whole table
    /// before anything else reads the weights or the moments ([`AdamW::settle`]: scoring,
    /// snapshots, checkpoints, export). Not with a weight average, which reads every weight
    /// every step: then this changes nothing.
    pub fn defer_word_rows(mut self, params: &Params) -> AdamW {
        if self.average.is_some() {
            return self;
        }
        let dims = params.tree.embeddings.word.dims();
        let (rows, width) = (dims[0], dims.get(1).copied().unwrap_or(1));
        self.deferred = Some(DeferredRows {
            width,
            synced: vec![self.t; rows],
            first: self.t,
            steps: Vec::new(),
        });
        self
    }

    /// Whether word-embedding rows may lag behind ([`AdamW::defer_word_rows`]).
    pub fn defers_word_rows(&self) -> bool {
        self.deferred.is_some()
    }

    /// The deferred rows, checked against the step count (which a checkpoint's restore sets):
    /// with nothing pending, a changed count just moves the baseline.
    fn deferred_in_step(&mut self) -> anyhow::Result<Option<&mut DeferredRows>> {
        let t = self.t;
        let Some(d) = self.deferred.as_mut() else {
            return Ok(None);
        };
        if d.now() != t {
            anyhow::ensure!(
                d.steps.is_empty(),
                "AdamW's step count was changed to {t} while word-embedding rows were still \
                 behind step {}: settle them first",
                d.now()
            );
            d.first = t;
        }
        Ok(Some(d))
    }

    /// Bring every deferred word-embedding row up to date: after this the weights and moments
    /// are exactly those of an optimizer that never deferred.
    pub fn settle(&mut self, params: &Params) -> anyhow::Result<()> {
        let mo = &mut self.moments.embeddings.word;
        let t = self.t;
        let Some(d) = self.deferred.as_mut() else {
            return Ok(());
        };
        if d.steps.is_empty() {
            d.first = t;
            return Ok(());
        }
        let (width, d_ref) = (d.width, &*d);
        update_var(&params.tree.embeddings.word, |w| {
            w.par_chunks_mut(width)
                .zip(mo.m.par_chunks_mut(width))
                .zip(mo.v.par_chunks_mut(width))
                .zip(d_ref.synced.par_iter())
                .with_min_len(64)
                .for_each(|(((w, m), v), &s)| catch_up_wide(w, m, v, d_ref.pending(s)));
        })?;
        d.first = d.now();
        d.steps.clear();
        Ok(())
    }

    /// Bring these word-embedding rows (token ids, any order, repeats allowed) up to date: what
    /// a forward pass over them reads.
    pub fn settle_rows(&mut self, params: &Params, rows: &[u32]) -> anyhow::Result<()> {
        self.deferred_in_step()?;
        let mo = &mut self.moments.embeddings.word;
        let Some(d) = self.deferred.as_mut() else {
            return Ok(());
        };
        let rows = sorted_rows(rows, d.synced.len())?;
        if d.steps.is_empty() {
            return Ok(());
        }
        let now = d.now();
        let lagging: Vec<usize> = rows
            .into_iter()
            .filter(|&r| d.synced[r].max(d.first) < now)
            .collect();
        let (width, d_ref) = (d.width, &*d);
        update_var(&params.tree.embeddings.word, |w| {
            for_each_row(w, mo, width, &lagging, |w, m, v, r| {
                catch_up_wide(w, m, v, d_ref.pending(d_ref.synced[r]))
            });
        })?;
        for &r in &lagging {
            d.synced[r] = now;
        }
        Ok(())
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
        self.settle(params)?;
        self.step_inner(params, grads, lr, None)?;
        if let Some(d) = self.deferred.as_mut() {
            d.first = self.t;
        }
        Ok(())
    }

    /// [`AdamW::step`] where the word-embedding gradient is zero outside `word_rows` (the token
    /// ids of the step's batches, any order, repeats allowed): with deferred rows
    /// ([`AdamW::defer_word_rows`]) only those rows of the table are updated now (each first
    /// brought up to date); the others take this step when they are next settled.
    pub fn step_rows(
        &mut self,
        params: &Params,
        grads: &Encoder<Vec<f32>>,
        lr: f64,
        word_rows: &[u32],
    ) -> anyhow::Result<()> {
        if self.deferred_in_step()?.is_none() {
            return self.step(params, grads, lr);
        }
        let rows = sorted_rows(
            word_rows,
            self.deferred.as_ref().map_or(0, |d| d.synced.len()),
        )?;
        #[cfg(debug_assertions)]
        {
            let g = &grads.embeddings.word;
            let width = self.deferred.as_ref().map_or(1, |d| d.width);
            let mut listed = vec![false; g.len() / width.max(1)];
            rows.iter().for_each(|&r| listed[r] = true);
            debug_assert!(
                g.chunks(width.max(1))
                    .zip(&listed)
                    .all(|(row, &l)| l || row.iter().all(|&x| x == 0.0)),
                "step_rows: a word-embedding row outside the listed rows has a gradient"
            );
        }
        self.step_inner(params, grads, lr, Some(&rows))
    }

    /// The update of every parameter, or (with `word_rows`, sorted and unique, and deferred
    /// rows on) of every parameter but the word table's rows outside `word_rows`.
    fn step_inner(
        &mut self,
        params: &Params,
        grads: &Encoder<Vec<f32>>,
        lr: f64,
        word_rows: Option<&[usize]>,
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
        let hyper_of = |slot: &Slot| {
            let lr = lr * c.lr_scale(slot, layers);
            Hyper {
                b1,
                b2,
                shrink: (1.0 - lr * c.weight_decay) as f32,
                decay: slot.decay,
                step_size: (lr / bc1) as f32,
                bc2_sqrt,
                eps,
            }
        };
        let deferred = match (word_rows, self.deferred.as_mut()) {
            (Some(rows), Some(d)) => Some((rows, d)),
            _ => None,
        };
        let leaves = pairs.leaves();
        let mut moments = moments;
        // The word table's touched rows (the table is leaf 0): each brought up to date, then
        // this step's update from its gradient; the other rows take this step later.
        let skip = if let Some((rows, d)) = deferred {
            let (var, g) = *leaves[0];
            let hyper = hyper_of(&slots[0]);
            let mo = &mut *moments[0];
            let (width, d_ref) = (d.width, &*d);
            update_var(var, |w| {
                for_each_row(w, mo, width, rows, |w, m, v, r| {
                    catch_up_wide(w, m, v, d_ref.pending(d_ref.synced[r]));
                    update_wide(w, m, v, &g[r * width..][..width], hyper);
                });
            })?;
            for &r in rows {
                d.synced[r] = self.t;
            }
            d.steps.push(hyper);
            1
        } else {
            0
        };
        leaves
            .into_par_iter()
            .zip(moments)
            .zip(slots)
            .zip(averages.par_iter_mut())
            .skip(skip)
            .map(|(((&(var, g), mo), slot), avg)| {
                let hyper = hyper_of(&slot);
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

    /// Deferred word-embedding rows: the rows a forward reads (settled first) and, once
    /// settled, every weight and moment have the bits of an optimizer that never deferred, over
    /// steps whose batches touch few rows (some rows untouched for several steps, one never),
    /// with a checkpoint-style change of the step count in between.
    #[test]
    fn deferred_word_rows_give_the_dense_bits() {
        let dense_params = tiny(2);
        let lazy_params = tiny(2);
        let mut dense = AdamW::new(&dense_params, config(0.9));
        let mut lazy = AdamW::new(&lazy_params, config(0.9)).defer_word_rows(&lazy_params);
        assert!(lazy.defers_word_rows());
        let width = lazy_params.cfg.hidden;
        let flat = |v: &candle_core::Var| -> Vec<u32> {
            let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            x.iter().map(|x| x.to_bits()).collect()
        };
        let bits = |x: &[f32]| -> Vec<u32> { x.iter().map(|x| x.to_bits()).collect() };
        // Token ids of each step's batch: 7 is read at steps 0 and 5 only; 3 every step; 9 at
        // step 2 (a repeat in the list); 30521 (the last row) at step 4.
        let batches: [&[u32]; 6] = [
            &[3, 7, 100],
            &[3, 101],
            &[9, 3, 9],
            &[3],
            &[30521, 3],
            &[7, 3],
        ];
        for (t, batch) in batches.iter().enumerate() {
            // What the forward reads: settled rows equal the dense optimizer's.
            lazy.settle_rows(&lazy_params, batch).unwrap();
            let (dw, lw) = (
                flat(&dense_params.tree.embeddings.word),
                flat(&lazy_params.tree.embeddings.word),
            );
            for &r in *batch {
                let r = r as usize;
                assert_eq!(
                    dw[r * width..][..width],
                    lw[r * width..][..width],
                    "row {r}, step {t}"
                );
            }
            let grads = lazy_params
                .tree
                .map_each(|v| crate::test_support::random_floats(v.elem_count(), 10 + t as u64));
            let mut grads = grads;
            // The word gradient is zero outside the batch's rows, as backprop leaves it.
            let word = &mut grads.embeddings.word;
            for (r, row) in word.chunks_mut(width).enumerate() {
                if !batch.contains(&(r as u32)) {
                    row.fill(0.0);
                }
            }
            dense
                .step(&dense_params, &grads, 1e-3 * (t + 1) as f64)
                .unwrap();
            lazy.step_rows(&lazy_params, &grads, 1e-3 * (t + 1) as f64, batch)
                .unwrap();
            if t == 2 {
                // Not settled: row 7 (last read at step 0) lags behind.
                let r = 7 * width;
                assert_ne!(
                    flat(&dense_params.tree.embeddings.word)[r..][..width],
                    flat(&lazy_params.tree.embeddings.word)[r..][..width]
                );
                // A step count changed with rows pending is refused.
                lazy.t += 1;
                assert!(lazy.settle_rows(&lazy_params, &[1]).is_err());
                lazy.t -= 1;
            }
            if t == 3 {
                // Settled in full, as a checkpoint would be, then the count set as a restore
                // sets it: nothing pending, so the baseline just moves.
                lazy.settle(&lazy_params).unwrap();
                lazy.t = dense.t;
            }
        }
        lazy.settle(&lazy_params).unwrap();
        for (d, l) in dense_params.vars.iter().zip(&lazy_params.vars) {
            assert_eq!(flat(d), flat(l));
        }
        for (d, l) in dense
            .moments
            .leaves()
            .into_iter()
            .zip(lazy.moments.leaves())
        {
            assert_eq!(bits(&d.m), bits(&l.m));
            assert_eq!(bits(&d.v), bits(&l.v));
        }
        // A dense step after deferred ones (e.g. a caller that does not know the rows).
        let grads = lazy_params
            .tree
            .map_each(|v| crate::test_support::random_floats(v.elem_count(), 99));
        lazy.step_rows(
            &lazy_params,
            &grads_with_rows(&grads, width, &[5]),
            1e-3,
            &[5],
        )
        .unwrap();
        dense
            .step(&dense_params, &grads_with_rows(&grads, width, &[5]), 1e-3)
            .unwrap();
        lazy.step(&lazy_params, &grads, 1e-3).unwrap();
        dense.step(&dense_params, &grads, 1e-3).unwrap();
        lazy.settle(&lazy_params).unwrap();
        for (d, l) in dense_params.vars.iter().zip(&lazy_params.vars) {
            assert_eq!(flat(d), flat(l));
        }
        // A token id past the table is an error, not a panic.
        let err = lazy.settle_rows(&lazy_params, &[30522]).err().unwrap();
        assert!(err.to_string().contains("token id 30522"), "{err}");
        // With a weight average, rows are never deferred (it reads every weight every step).
        let avg = AdamW::new(&lazy_params, config(0.9))
            .with_average(&lazy_params, 0.99)
            .unwrap()
            .defer_word_rows(&lazy_params);
        assert!(!avg.defers_word_rows());
    }

    /// `grads` with the word gradient zero outside `rows`.
    fn grads_with_rows(
        grads: &Encoder<Vec<f32>>,
        width: usize,
        rows: &[usize],
    ) -> Encoder<Vec<f32>> {
        let mut g = grads.clone();
        for (r, row) in g.embeddings.word.chunks_mut(width).enumerate() {
            if !rows.contains(&r) {
                row.fill(0.0);
            }
        }
        g
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
