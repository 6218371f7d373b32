//! Inference on the CPU without padding: the packed encoder.
//!
//! `model::forward` is the reference (and the training path): it pads every row of a batch to
//! the longest, keeps an autograd-capable graph of candle ops, and spends most of its time
//! outside the matrix products (broadcast ops, temporaries, per-head batched matmuls; README,
//! "Inference profile"). For scoring only, this encoder runs the same arithmetic on plain
//! buffers:
//! - tokens of all rows are packed one after the other (no padding rows at all); attention
//!   runs per row over that row's own tokens, which is what the padding mask computes;
//! - query, key and value are one matrix product, the attention scale folded into the query
//!   weights; bias and residual are written into the product's destination first, so `gemm`
//!   adds the product on top instead of needing extra passes;
//! - in the last layer only the `[CLS]` rows are carried past attention: the head reads nothing
//!   else.
//!
//! Tests check its logits against `model::forward` on tiny random BERT and DistilBERT models.

use std::mem::MaybeUninit;

use candle_core::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

use crate::attention::{attend, ScoreOrder};
use crate::config::{Activation, Arch, EncoderConfig, Pooling};
use crate::int8::{Base, Kernel, QuantizedRows, QuantizedWeight};
use crate::params;

/// The arithmetic of the encoder's matrix products when scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and sums (the reference; training's own arithmetic).
    #[default]
    F32,
    /// The encoder layers' weights int8 per output channel, activations u8 per row, exact i32
    /// sums ([`crate::int8`]); embeddings, LayerNorm, attention, the pooler and the classifier
    /// stay f32.
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

/// A matrix operand of `matmul`: its buffer and the strides of its rows and columns.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with `cols` columns.
    pub(crate) fn plain(data: &'a [f32], cols: usize) -> Operand<'a> {
        Operand {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns, read in place.
    pub(crate) fn transposed(data: &'a [f32], cols: usize) -> Operand<'a> {
        Operand {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// Panics, naming the product and the side, unless `rows` × `cols` fit in the buffer.
    pub(crate) fn check(&self, rows: usize, cols: usize, what: &str, side: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "{what} {side}: operand too small");
        }
    }
}

/// The most terms of the inner dimension that one gemm call sums.
///
/// gemm splits a long inner dimension into blocks whose length it derives from the L1 cache it
/// detects (48 KiB, 12-way Intel cores get 1,024; 32 KiB, 8-way AMD cores 512), and the rounding
/// of a sum depends on where the blocks fall: the same model trained on two machines came out
/// with different bytes. gemm never makes a block shorter than 512, so a call with at most 512
/// terms is one block everywhere; `matmul` makes the blocks itself, splitting as gemm does on a
/// 512-term L1 (into equal parts), so results are those machines' bytes on every x86-64 with
/// AVX2 and FMA (gemm's kernel there; each output is one FMA chain per block, whatever the
/// vector width or the thread count).
pub(crate) const K_BLOCK: usize = 512;

/// Where the blocks of an inner dimension of `k` terms start: equal parts of at most
/// [`K_BLOCK`], the first ones longer by one when `k` does not divide evenly (gemm's split).
pub(crate) fn k_blocks(k: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let parts = k.div_ceil(K_BLOCK).max(1);
    let len = k.div_ceil(parts);
    (0..parts).map(move |p| (p * len).min(k)..((p + 1) * len).min(k))
}

/// What every matrix product checks first (`what` names it in a panic): the destination and
/// operand sizes. Returns false when there is nothing to multiply (m, n or k is 0), the
/// destination then already holding the result (zeroed unless `add`).
pub(crate) fn product_needed(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    add: bool,
    what: &str,
) -> bool {
    assert_eq!(dst.len(), m * n, "{what}: destination size");
    lhs.check(m, k, what, "lhs");
    rhs.check(k, n, what, "rhs");
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !add {
            dst.fill(0.0);
        }
        return false;
    }
    true
}

/// `dst` (m × n, row-major) = `lhs` (m × k) · `rhs` (k × n), or `dst` += that product.
pub(crate) fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    add: bool,
) {
    if product_needed(dst, (m, n, k), lhs, rhs, add, "matmul") {
        gemm_blocks(dst, n, (m, n, k), lhs, rhs, add);
    }
}

/// [`matmul`] into the m × n block whose rows start `ldc` apart in `dst` (a block of columns of
/// a wider matrix: the query, key and value side by side), with the same bits as into a
/// buffer of its own: gemm's kernels accumulate the same way whatever the destination's
/// stride (the f32 CI lock checks it).
pub(crate) fn matmul_rows_apart(
    dst: &mut [f32],
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    add: bool,
) {
    assert!(
        ldc >= n && (m == 0 || (m - 1) * ldc + n <= dst.len()),
        "matmul_rows_apart: destination size"
    );
    lhs.check(m, k, "matmul_rows_apart", "lhs");
    rhs.check(k, n, "matmul_rows_apart", "rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            dst.chunks_mut(ldc).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    gemm_blocks(dst, ldc, (m, n, k), lhs, rhs, add);
}

/// The product itself, block by block of [`k_blocks`], once the caller has checked the sizes
/// (m, n and k not 0; every element the strides reach inside its buffer).
fn gemm_blocks(
    dst: &mut [f32],
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    add: bool,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    for (b, block) in k_blocks(k).enumerate() {
        let lhs_block = &lhs.data[block.start * lhs.col_stride..];
        let rhs_block = &rhs.data[block.start * rhs.row_stride..];
        // SAFETY: every element the strides reach lies inside its buffer (checked by the caller
        // for the whole product; a block starts inside it and reaches no further); dst holds m
        // rows of n, ldc apart, and, being a distinct `&mut`, aliases neither operand.
        unsafe {
            gemm::gemm(
                m,
                n,
                block.len(),
                dst.as_mut_ptr(),
                1,
                ldc as isize,
                add || b > 0,
                lhs_block.as_ptr(),
                lhs.col_stride as isize,
                lhs.row_stride as isize,
                rhs_block.as_ptr(),
                rhs.col_stride as isize,
                rhs.row_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// A dense layer as HF stores it: `weight` is (out, in) row-major.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    /// The weight quantized, when the products run in int8 (with the kernel they use).
    int8: Option<(QuantizedWeight, Kernel)>,
}

impl Dense {
    fn load(d: &params::Dense<Tensor>) -> anyhow::Result<Dense> {
        let (outputs, inputs) = d.weight.dims2()?;
        Ok(Dense {
            weight: d.weight.flatten_all()?.to_vec1()?,
            bias: d.bias.flatten_all()?.to_vec1()?,
            inputs,
            outputs,
            int8: None,
        })
    }

    /// Layers reading the same input, as one: their weights' rows and biases one after the
    /// other, so the outputs come side by side.
    fn stacked(parts: Vec<Dense>) -> Dense {
        let inputs = parts[0].inputs;
        assert!(parts.iter().all(|d| d.inputs == inputs && d.int8.is_none()));
        Dense {
            outputs: parts.iter().map(|d| d.outputs).sum(),
            weight: parts
                .iter()
                .flat_map(|d| d.weight.iter().copied())
                .collect(),
            bias: parts.iter().flat_map(|d| d.bias.iter().copied()).collect(),
            inputs,
            int8: None,
        }
    }

    /// Run this layer's products in `precision` from now on.
    fn quantize(mut self, precision: Precision) -> Dense {
        if precision == Precision::Int8 {
            let q = QuantizedWeight::new(&self.weight, self.outputs, self.inputs);
            self.int8 = Some((q, Kernel::detect()));
            // The f32 copy is not read again: give its memory back.
            self.weight = Vec::new();
        }
        self
    }

    /// `out` = `x` · weightᵀ + bias, for `x` of `rows` × inputs.
    fn apply(&self, x: Rows, out: &mut Vec<f32>) {
        // Not cleared: every element is written below (a buffer reused across layers would
        // otherwise be zeroed on one thread first).
        out.resize(x.rows(self.inputs) * self.outputs, 0.0);
        if self.int8.is_none() {
            out.par_chunks_mut(self.outputs)
                .for_each(|row| row.copy_from_slice(&self.bias));
        }
        self.product(x, out, Base::Bias(&self.bias));
    }

    /// `acc` += bias, then += `x` · weightᵀ: the residual connection, with no extra pass for
    /// the sum.
    fn add_to(&self, x: Rows, acc: &mut [f32]) {
        if self.int8.is_none() {
            acc.par_chunks_mut(self.outputs)
                .for_each(|row| row.iter_mut().zip(&self.bias).for_each(|(a, b)| *a += b));
        }
        self.product(x, acc, Base::DstPlusBias(&self.bias));
    }

    /// `dst` = `base` + `x` · weightᵀ in int8; in f32, `dst` += `x` · weightᵀ (the caller
    /// has put the base in `dst`: gemm adds onto it).
    fn product(&self, x: Rows, dst: &mut [f32], base: Base) {
        match (&self.int8, x) {
            (Some((q, kernel)), Rows::F32(x)) => q.product(x, dst, base, *kernel),
            (Some((q, kernel)), Rows::Quantized(x)) => {
                q.product_of_quantized(x, dst, base, *kernel)
            }
            (None, Rows::F32(x)) => self.accumulate(x, dst),
            (None, Rows::Quantized(_)) => unreachable!("quantized rows for an f32 layer"),
        }
    }

    /// `dst` += `x` · weightᵀ.
    fn accumulate(&self, x: &[f32], dst: &mut [f32]) {
        let rows = x.len() / self.inputs;
        assert_eq!(x.len(), rows * self.inputs, "input width");
        assert_eq!(dst.len(), rows * self.outputs, "output size");
        if let Some((q, kernel)) = &self.int8 {
            return q.accumulate(x, dst, *kernel);
        }
        matmul(
            dst,
            rows,
            self.outputs,
            self.inputs,
            Operand::plain(x, self.inputs),
            Operand::transposed(&self.weight, self.inputs),
            true,
        );
    }
}

/// A layer's input: f32 rows, or rows already quantized for an int8 layer.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Quantized(&'a QuantizedRows),
}

impl<'a> Rows<'a> {
    /// The quantized rows when scoring in int8, else the f32 ones.
    fn of(int8: Option<Kernel>, x: &'a [f32], quantized: &'a QuantizedRows) -> Rows<'a> {
        match int8 {
            Some(_) => Rows::Quantized(quantized),
            None => Rows::F32(x),
        }
    }

    fn rows(&self, width: usize) -> usize {
        match self {
            Rows::F32(x) => x.len() / width,
            Rows::Quantized(q) => q.rows(),
        }
    }
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(n: &params::LayerNorm<Tensor>, eps: f64) -> anyhow::Result<Norm> {
        Ok(Norm {
            weight: n.weight.to_vec1()?,
            bias: n.bias.to_vec1()?,
            eps: eps as f32,
        })
    }

    /// LayerNorm of every row of `x`, in place; with `quantized`, each row also quantized for
    /// an int8 layer while it is in cache.
    fn apply(&self, x: &mut [f32], quantized: Option<(&mut QuantizedRows, Kernel)>) {
        let h = self.weight.len();
        let norm = |row: &mut [f32]| norm_row_wide(row, &self.weight, &self.bias, self.eps);
        match quantized {
            None => x.par_chunks_mut(h).for_each(norm),
            Some((q, kernel)) => q.prepare_and_quantize(x, h, kernel, norm),
        }
    }
}

wide_fn!(fn norm_row_wide(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) => norm_row);

#[inline(always)]
fn norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    normalise(row, eps);
    for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *v = *v * w + b;
    }
}

/// A row normalised in place to x̂ = (x − mean)/σ, σ = √(var + eps); returns 1/σ. LayerNorm's
/// formula (`model::layer_norm`'s, in a fixed summation order) for the packed encoder and the
/// packed trainer alike; the scale and shift follow.
#[inline(always)]
pub(crate) fn normalise(row: &mut [f32], eps: f32) -> f32 {
    let h = row.len();
    let mean = lane_sum(row) / h as f32;
    row.iter_mut().for_each(|v| *v -= mean);
    let var = dot(row, row) / h as f32;
    let inv = 1.0 / (var + eps).sqrt();
    row.iter_mut().for_each(|v| *v *= inv);
    inv
}

struct Layer {
    qkv: Projections,
    attn_out: Dense,
    attn_norm: Norm,
    ffn_in: Dense,
    ffn_out: Dense,
    ffn_norm: Norm,
}

/// A layer's query, key and value projections; the query's rows carry 1/√d_head.
enum Projections {
    /// One (3·hidden, hidden) layer.
    Fused(Dense),
    /// Int8 with `[CLS]` pooling, the last layer: only the `[CLS]` rows' queries are read, so
    /// the query is a layer of its own run on those rows alone, and keys and values one run
    /// on every row, written in place beside them. The same bytes as the fused layer (each
    /// output has its own scale and an exact sum), a third fewer of this layer's products.
    ClsQuery { query: Dense, key_value: Dense },
}

impl Projections {
    /// Query, key and value of every token (3·hidden each, in that order; with `ClsQuery`,
    /// the query of each row's first token only: the others' are not written).
    fn apply(&self, x: Rows, start: &[usize], out: &mut Vec<f32>) {
        match self {
            Projections::Fused(qkv) => qkv.apply(x, out),
            Projections::ClsQuery { query, key_value } => {
                let (Some((q_weight, kernel)), Some((kv_weight, _)), Rows::Quantized(quantized)) =
                    (&query.int8, &key_value.int8, x)
                else {
                    unreachable!("a split query is built for int8 scoring only");
                };
                let h = query.outputs;
                let tokens = quantized.rows();
                out.resize(tokens * 3 * h, 0.0);
                if tokens == 0 {
                    return;
                }
                kv_weight.product_of_quantized_strided(
                    quantized,
                    &mut out[h..],
                    3 * h,
                    Base::Bias(&key_value.bias),
                    *kernel,
                );
                let firsts = quantized.select(start[..start.len() - 1].iter().copied());
                let mut queries = vec![0f32; firsts.rows() * h];
                q_weight.product_of_quantized(
                    &firsts,
                    &mut queries,
                    Base::Bias(&query.bias),
                    *kernel,
                );
                for (&s, q) in start.iter().zip(queries.chunks(h)) {
                    out[s * 3 * h..][..h].copy_from_slice(q);
                }
            }
        }
    }
}

/// A classifier's weights laid out for `PackedEncoder::logits`.
pub struct PackedEncoder {
    precision: Precision,
    arch: Arch,
    hidden: usize,
    heads: usize,
    activation: Activation,
    vocab: usize,
    max_positions: usize,
    word: Vec<f32>,
    position: Vec<f32>,
    /// BERT's token-type 0 embedding (single-segment input); absent for DistilBERT.
    token_type: Option<Vec<f32>>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    pooling: Pooling,
    /// BERT's pooler or DistilBERT's pre_classifier.
    pool: Dense,
    classifier: Dense,
}

impl PackedEncoder {
    /// Copy the weights into the packed layout (f32 products).
    pub fn new(cfg: &EncoderConfig, p: &params::Encoder<Tensor>) -> anyhow::Result<PackedEncoder> {
        PackedEncoder::with_precision(cfg, p, Precision::F32)
    }

    /// Copy the weights into the packed layout, the encoder layers' products in `precision`.
    pub fn with_precision(
        cfg: &EncoderConfig,
        p: &params::Encoder<Tensor>,
        precision: Precision,
    ) -> anyhow::Result<PackedEncoder> {
        let eps = cfg.layer_norm_eps;
        let scale = 1.0 / ((cfg.hidden / cfg.heads) as f32).sqrt();
        let last = p.layers.len().saturating_sub(1);
        let layers = p
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                let (mut q, k, v) = (
                    Dense::load(&layer.query)?,
                    Dense::load(&layer.key)?,
                    Dense::load(&layer.value)?,
                );
                q.weight.iter_mut().for_each(|w| *w *= scale);
                q.bias.iter_mut().for_each(|b| *b *= scale);
                let split =
                    precision == Precision::Int8 && l == last && cfg.pooling == Pooling::Cls;
                let qkv = if split {
                    Projections::ClsQuery {
                        query: q.quantize(precision),
                        key_value: Dense::stacked(vec![k, v]).quantize(precision),
                    }
                } else {
                    Projections::Fused(Dense::stacked(vec![q, k, v]).quantize(precision))
                };
                Ok(Layer {
                    qkv,
                    attn_out: Dense::load(&layer.attn_out)?.quantize(precision),
                    attn_norm: Norm::load(&layer.attn_norm, eps)?,
                    ffn_in: Dense::load(&layer.ffn_in)?.quantize(precision),
                    ffn_out: Dense::load(&layer.ffn_out)?.quantize(precision),
                    ffn_norm: Norm::load(&layer.ffn_norm, eps)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let e = &p.embeddings;
        Ok(PackedEncoder {
            precision,
            arch: cfg.arch,
            hidden: cfg.hidden,
            heads: cfg.heads,
            activation: cfg.activation,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_positions,
            word: e.word.flatten_all()?.to_vec1()?,
            position: e.position.flatten_all()?.to_vec1()?,
            token_type: match &e.token_type {
                Some(t) => Some(t.get(0)?.to_vec1()?),
                None => None,
            },
            embed_norm: Norm::load(&e.norm, eps)?,
            layers,
            pooling: cfg.pooling,
            pool: Dense::load(&p.pool)?,
            classifier: Dense::load(&p.classifier)?,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.classifier.outputs
    }

    /// Logits (rows × labels, row-major) for token-id rows of any lengths.
    pub fn logits(&self, rows: &[&[u32]]) -> anyhow::Result<Vec<f32>> {
        check_rows(rows, self.max_positions, self.vocab)?;
        let h = self.hidden;
        let x = match self.precision {
            Precision::Int8 => self.encode_in_groups(rows),
            // gemm picks its kernel (and so its summation order) by the product's shape, and a
            // group's rows would be a new shape: f32 keeps the whole batch together.
            Precision::F32 => self.encode(rows),
        };
        let mut pooled = Vec::new();
        self.pool.apply(Rows::F32(&x), &mut pooled);
        pooled
            .iter_mut()
            .for_each(|v| *v = self.arch.pool_activation(*v));
        let mut logits = Vec::new();
        self.classifier.apply(Rows::F32(&pooled), &mut logits);
        debug_assert_eq!(x.len(), rows.len() * h);
        Ok(logits)
    }

    /// [`PackedEncoder::encode`] with the rows split into one group per thread, about equal in
    /// tokens, each carried through every layer as a task of its own: a batch then waits for
    /// its threads once, not at the end of each layer's every step (where the uneven last
    /// pieces of work left a core idle). The layers' own loops still split their work, so a
    /// thread that finishes early takes over part of another's. Only for int8, whose layers
    /// compute each row by the same operations whatever else is in the batch (per-row
    /// quantization, exact integer sums, per-row attention and LayerNorm), so the bytes do not
    /// change.
    fn encode_in_groups(&self, rows: &[&[u32]]) -> Vec<f32> {
        let groups = rayon::current_num_threads().min(rows.len()).max(1);
        if groups == 1 {
            return self.encode(rows);
        }
        let tokens: usize = rows.iter().map(|r| r.len()).sum();
        let mut bounds = vec![0];
        let mut seen = 0;
        for (i, r) in rows.iter().enumerate() {
            seen += r.len();
            if seen * groups >= tokens * bounds.len() && bounds.len() < groups {
                bounds.push(i + 1);
            }
        }
        bounds.push(rows.len());
        bounds.dedup();
        let parts: Vec<Vec<f32>> = bounds
            .par_windows(2)
            .map(|w| self.encode(&rows[w[0]..w[1]]))
            .collect();
        parts.concat()
    }

    /// What the head reads for each row (rows × hidden): the last layer's `[CLS]` token or the
    /// mean of its tokens.
    fn encode(&self, rows: &[&[u32]]) -> Vec<f32> {
        let h = self.hidden;
        // Row r's tokens are rows start[r]..start[r + 1] of every activation matrix.
        let mut start = Vec::with_capacity(rows.len() + 1);
        start.push(0usize);
        for r in rows {
            start.push(start.last().copied().unwrap_or(0) + r.len());
        }
        let tokens = packed_tokens(rows);
        let mut x = embed(
            &tokens,
            &self.word,
            &self.position,
            self.token_type.as_deref(),
            h,
        );
        // In int8, the rows an int8 layer reads next are quantized by the pass that wrote them
        // (LayerNorm, the activation) while they are in cache: `qx` for the hidden states,
        // `qmid` for the feed-forward's middle. The same bytes as quantizing in the product.
        let int8 = (self.precision == Precision::Int8).then(Kernel::detect);
        let (mut qx, mut qmid) = (QuantizedRows::default(), QuantizedRows::default());
        self.embed_norm.apply(&mut x, int8.map(|k| (&mut qx, k)));

        let (mut qkv, mut ctx, mut mid) = (Vec::new(), Vec::new(), Vec::new());
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.qkv.apply(Rows::of(int8, &x, &qx), &start, &mut qkv);
            // With [CLS] pooling the head reads one token per row: past the last attention,
            // carry only those.
            let cls_only = l == last && self.pooling == Pooling::Cls;
            self.attention(&qkv, &start, cls_only, &mut ctx);
            if cls_only {
                x = first_tokens(&x, &start, h);
            }
            layer.attn_out.add_to(Rows::F32(&ctx), &mut x);
            layer.attn_norm.apply(&mut x, int8.map(|k| (&mut qx, k)));
            layer.ffn_in.apply(Rows::of(int8, &x, &qx), &mut mid);
            activate_rows(
                &mut mid,
                layer.ffn_in.outputs,
                self.activation,
                int8.map(|k| (&mut qmid, k)),
            );
            layer.ffn_out.add_to(Rows::of(int8, &mid, &qmid), &mut x);
            // The last layer's output goes to the f32 head: nothing to quantize.
            let next = if l == last { None } else { int8 };
            layer.ffn_norm.apply(&mut x, next.map(|k| (&mut qx, k)));
        }
        if self.pooling == Pooling::Mean || self.layers.is_empty() {
            x = pool_rows(&x, &start, h, self.pooling);
        }
        x
    }

    /// Sigmoid scores (rows × labels, row-major).
    pub fn scores(&self, rows: &[&[u32]]) -> anyhow::Result<Vec<f32>> {
        let mut s = self.logits(rows)?;
        s.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        Ok(s)
    }

    /// Scaled dot-product attention of each row over its own tokens. `qkv` holds, per token,
    /// query, key and value (3·hidden); `ctx` gets the heads' outputs side by side (hidden per
    /// token), for every token or, with `cls_only`, for each row's first token.
    fn attention(&self, qkv: &[f32], start: &[usize], cls_only: bool, ctx: &mut Vec<f32>) {
        let (h, heads) = (self.hidden, self.heads);
        let n_rows = start.len() - 1;
        let out_len = |r: usize| if cls_only { 1 } else { start[r + 1] - start[r] };
        // Not cleared: `attend` writes every element.
        ctx.resize((0..n_rows).map(out_len).sum::<usize>() * h, 0.0);
        // Each row of the batch writes its own slice of ctx.
        let mut slices = Vec::with_capacity(n_rows);
        let mut rest = ctx.as_mut_slice();
        for r in 0..n_rows {
            let (mine, tail) = rest.split_at_mut(out_len(r) * h);
            slices.push((r, mine));
            rest = tail;
        }
        let order = match self.precision {
            Precision::F32 => ScoreOrder::DotLanes,
            Precision::Int8 => ScoreOrder::ByKeys,
        };
        slices.into_par_iter().for_each(|(r, out)| {
            attend(
                order,
                qkv,
                (h, heads),
                (start[r], start[r + 1] - start[r]),
                out,
            )
        });
    }
}

/// Refuse rows a model cannot take: empty, longer than its `max_positions`, or holding an id
/// outside its vocabulary.
pub(crate) fn check_rows(
    rows: &[&[u32]],
    max_positions: usize,
    vocab: usize,
) -> anyhow::Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if r.is_empty() || r.len() > max_positions {
            anyhow::bail!(
                "row {i} has {} tokens; the model takes 1 to {max_positions}",
                r.len()
            );
        }
        if let Some(&id) = r.iter().find(|&&id| id as usize >= vocab) {
            anyhow::bail!(
                "row {i} has token id {id}, outside the model's vocabulary of {vocab}\n  hint: tokenize with the model's own tokenizer.json"
            );
        }
    }
    Ok(())
}

/// (position in its row, id) of every token of `rows`, the rows one after the other.
pub(crate) fn packed_tokens(rows: &[&[u32]]) -> Vec<(usize, u32)> {
    rows.iter()
        .flat_map(|r| r.iter().enumerate().map(|(t, &id)| (t, id)))
        .collect()
}

/// The input embedding of each packed token (tokens × h): word + position, plus BERT's
/// token-type-0 row when given.
pub(crate) fn embed(
    tokens: &[(usize, u32)],
    word: &[f32],
    position: &[f32],
    token_type: Option<&[f32]>,
    h: usize,
) -> Vec<f32> {
    let mut x = vec![0f32; tokens.len() * h];
    x.par_chunks_mut(h).zip(tokens).for_each(|(out, &(t, id))| {
        let w = &word[id as usize * h..][..h];
        let p = &position[t * h..][..h];
        for ((o, w), p) in out.iter_mut().zip(w).zip(p) {
            *o = w + p;
        }
        if let Some(tt) = token_type {
            out.iter_mut().zip(tt).for_each(|(o, t)| *o += t);
        }
    });
    x
}

/// What the head reads for each packed row r (tokens `start[r]..start[r + 1]` of `x`, rows of
/// width `h`): its first (`[CLS]`) token, or the mean of its tokens, summed in token order.
pub(crate) fn pool_rows(x: &[f32], start: &[usize], h: usize, pooling: Pooling) -> Vec<f32> {
    match pooling {
        Pooling::Cls => first_tokens(x, start, h),
        Pooling::Mean => {
            let mut out = vec![0f32; (start.len() - 1) * h];
            for (r, o) in out.chunks_exact_mut(h).enumerate() {
                let tokens = &x[start[r] * h..start[r + 1] * h];
                for t in tokens.chunks_exact(h) {
                    o.iter_mut().zip(t).for_each(|(o, v)| *o += v);
                }
                let n = (start[r + 1] - start[r]) as f32;
                o.iter_mut().for_each(|o| *o /= n);
            }
            out
        }
    }
}

/// Row `start[r]` of `x` (rows of width `h`) for every packed row r: the `[CLS]` tokens.
fn first_tokens(x: &[f32], start: &[usize], h: usize) -> Vec<f32> {
    start[..start.len() - 1]
        .iter()
        .flat_map(|&s| x[s * h..(s + 1) * h].iter().copied())
        .collect()
}

/// A sum in eight independent lanes (see `dot`).
#[inline]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let x8 = x.chunks_exact(8);
    let tail: f32 = x8.remainder().iter().sum();
    for c in x8 {
        for i in 0..8 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A dot product in eight independent lanes, so the compiler can vectorise it (a single
/// running sum is a serial dependency it may not reorder).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// e^x for x ≤ 88, branch-free so the softmax loop vectorises (libm's `expf` is a call per
/// element; it was 4% of an inference profile). x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its
/// Taylor polynomial to degree 6, 2^n written into the exponent bits. Relative error ≤ 3e-7
/// (test below); inputs below −87 give e^−87 instead of something smaller, which a softmax
/// over a row whose largest term is 1 cannot tell from 0.
#[inline]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so n·LN2_HI is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// erf(x) as a ratio of two polynomials, branch-free so the GELU loop vectorises (libm's
/// scalar `erff` was 8% of an inference profile). The coefficients are the float
/// approximation Eigen and XLA use; erf is 1 − 1.5e-8 at |x| = 4, so the input is clamped
/// there. Largest absolute error against libm 4.2e-7 (test below).
#[inline]
pub(crate) fn erf_rational(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let numerator = x
        * (-1.609_603_3e-2
            + x2 * (-2.954_6e-3
                + x2 * (-7.349_906_3e-4
                    + x2 * (-5.692_506_4e-5
                        + x2 * (-2.101_024e-6 + x2 * (2.770_681_4e-8 + x2 * -2.726_142_3e-10))))));
    let denominator = -1.426_474e-2
        + x2 * (-7.373_329_2e-3
            + x2 * (-1.682_827e-3 + x2 * (-2.133_740_6e-4 + x2 * -1.456_607_2e-5)));
    numerator / denominator
}

/// √(2/π), in the tanh form of GELU.
pub(crate) const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// The activation in place: the formulas candle's ops use, with erf and tanh's GELU as there.
/// The packed encoder's and the packed trainer's forward pass.
pub(crate) fn activate(x: &mut [f32], a: Activation) {
    x.par_chunks_mut(4096)
        .for_each(|c| activate_chunk_wide(c, a));
}

/// [`activate`] over rows of `width`; with `quantized`, each row also quantized for an int8
/// layer while it is in cache.
fn activate_rows(
    x: &mut [f32],
    width: usize,
    a: Activation,
    quantized: Option<(&mut QuantizedRows, Kernel)>,
) {
    match quantized {
        None => activate(x, a),
        // Int8 quantizes the activation's output to a u8 step next: GELU by table
        // ([`crate::gelu`]), 2.4e-6 from exact and half the rational erf's work.
        Some((q, kernel)) => q.prepare_and_quantize(x, width, kernel, |row| match a {
            Activation::GeluErf => crate::gelu::gelu_in_place(row),
            _ => activate_chunk_wide(row, a),
        }),
    }
}

wide_fn!(fn activate_chunk_wide(c: &mut [f32], a: Activation) => activate_chunk);

#[inline(always)]
fn activate_chunk(c: &mut [f32], a: Activation) {
    match a {
        Activation::GeluErf => c.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        Activation::GeluTanh => c.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
        Activation::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// The activation of `src` into `dst` (fresh memory, every element written): the numbers
/// [`activate`] gives in place, without first copying `src` to where they go.
pub(crate) fn activate_into(src: &[f32], dst: &mut [MaybeUninit<f32>], a: Activation) {
    assert_eq!(src.len(), dst.len(), "activation sizes");
    dst.par_chunks_mut(4096)
        .zip(src.par_chunks(4096))
        .for_each(|(d, s)| activate_chunk_into_wide(s, d, a));
}

wide_fn!(fn activate_chunk_into_wide(src: &[f32], dst: &mut [MaybeUninit<f32>], a: Activation) => activate_chunk_into);

#[inline(always)]
fn activate_chunk_into(src: &[f32], dst: &mut [MaybeUninit<f32>], a: Activation) {
    match a {
        Activation::GeluErf => {
            for (d, &x) in dst.iter_mut().zip(src) {
                d.write(gelu_erf(x));
            }
        }
        Activation::GeluTanh => {
            for (d, &x) in dst.iter_mut().zip(src) {
                d.write(gelu_tanh(x));
            }
        }
        Activation::Relu => {
            for (d, &x) in dst.iter_mut().zip(src) {
                d.write(x.max(0.0));
            }
        }
    }
}

/// GELU with erf, as candle's `gelu_erf`: x·(erf(x/√2) + 1)/2.
#[inline(always)]
fn gelu_erf(v: f32) -> f32 {
    (erf_rational(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
}

/// GELU's tanh form, as candle's `gelu`.
#[inline(always)]
fn gelu_tanh(v: f32) -> f32 {
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{forward, Batch, Params};
    use crate::test_support::{max_abs_diff, random_token_rows, tiny_config};
    use candle_core::Device;

    /// Each activation written into fresh memory gives the bits of the same activation in
    /// place, for every element of a buffer longer than one parallel chunk.
    #[test]
    fn activating_into_new_memory_gives_the_in_place_bits() {
        let src: Vec<f32> = crate::test_support::random_floats(10_001, 3)
            .into_iter()
            .map(|x| 6.0 * x)
            .collect();
        for a in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            let mut in_place = src.clone();
            activate(&mut in_place, a);
            let mut into = Vec::with_capacity(src.len());
            activate_into(&src, &mut into.spare_capacity_mut()[..src.len()], a);
            // SAFETY: `activate_into` wrote every element.
            unsafe { into.set_len(src.len()) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&into), bits(&in_place), "{a:?}");
            assert!(
                in_place.iter().zip(&src).any(|(y, x)| y != x),
                "{a:?} changed nothing"
            );
        }
    }

    /// What `matmul` promises for its bits: each output is, block by block of [`k_blocks`], one
    /// fused multiply-add chain over the block's terms from zero, and the blocks are added in
    /// order. This scalar form depends on nothing about the machine (`mul_add` is an exact FMA
    /// everywhere), so a match here means the same bytes on any CPU that runs gemm's FMA kernel,
    /// whatever its caches or vector width, and on one thread or two.
    fn reference_product(m: usize, n: usize, k: usize, lhs: Operand, rhs: Operand) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut total = 0f32;
                for (b, block) in k_blocks(k).enumerate() {
                    let mut acc = 0f32;
                    for t in block {
                        let a = lhs.data[r * lhs.row_stride + t * lhs.col_stride];
                        let x = rhs.data[t * rhs.row_stride + c * rhs.col_stride];
                        acc = a.mul_add(x, acc);
                    }
                    total = if b == 0 { acc } else { total + acc };
                }
                out[r * n + c] = total;
            }
        }
        out
    }

    #[test]
    fn k_blocks_split_as_gemm_does_on_a_512_term_cache() {
        let lens = |k| k_blocks(k).map(|b| b.len()).collect::<Vec<_>>();
        assert_eq!(lens(384), [384]);
        assert_eq!(lens(512), [512]);
        assert_eq!(lens(513), [257, 256]);
        assert_eq!(lens(600), [300, 300]);
        assert_eq!(lens(1536), [512, 512, 512]);
        assert_eq!(lens(3072), [512; 6]);
        assert_eq!(lens(1537), [385, 385, 385, 382]);
        // Contiguous and complete.
        for k in [1, 7, 511, 1025, 2049] {
            let blocks: Vec<_> = k_blocks(k).collect();
            assert_eq!(blocks[0].start, 0);
            assert_eq!(blocks.last().unwrap().end, k);
            assert!(blocks.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    /// Random operands in the three layouts the trainer reads its buffers in: row-major ·
    /// row-major, row-major · transposed, transposed · row-major.
    fn products_in_every_layout(
        (m, n, k): (usize, usize, usize),
        seed: u64,
        check: &dyn Fn(&str, Operand, Operand),
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        check("a·b", Operand::plain(&a, k), Operand::plain(&b, n));
        check("a·bᵀ", Operand::plain(&a, k), Operand::transposed(&b, k));
        check("aᵀ·b", Operand::transposed(&a, m), Operand::plain(&b, n));
    }

    fn on_threads(threads: usize, f: impl FnOnce() + Send) {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f);
    }

    /// Every product of the shapes training runs (projections with k = 384, 1,536, 3,072;
    /// weight gradients with k = a batch's token count) takes gemm's packed kernel, and there
    /// its bits are the FMA-chain reference's, on one thread or two: nothing of the machine
    /// enters them.
    #[test]
    fn matmul_bits_are_the_fma_chain_reference() {
        let shapes = [
            (37, 384, 384),
            (29, 64, 1536),
            (33, 48, 3072),
            (40, 96, 600),
            (64, 40, 1537),
            (300, 384, 1536),
        ];
        for (seed, (m, n, k)) in shapes.into_iter().enumerate() {
            products_in_every_layout((m, n, k), seed as u64, &|layout, lhs, rhs| {
                let want = reference_product(m, n, k, lhs, rhs);
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; m * n];
                    on_threads(threads, || matmul(&mut got, m, n, k, lhs, rhs, false));
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{layout} {m}x{k} · {k}x{n} on {threads} threads: bits differ from the FMA-chain reference (max diff {})",
                        max_abs_diff(&got, &want)
                    );
                }
            });
        }
    }

    /// The trainer's f32 query, key and value products: into a block of columns of a wider
    /// destination, and from a block of columns of a wider operand (read with its stride),
    /// each gives the bits of the same product on buffers of their own (and the FMA chain).
    #[test]
    fn products_on_blocks_of_columns_give_the_contiguous_bits() {
        let (rows, h, inputs) = (600, 64, 96);
        let x = crate::test_support::random_floats(rows * inputs, 1);
        let w = crate::test_support::random_floats(h * inputs, 2);
        let wide = crate::test_support::random_floats(rows * 3 * h, 3);
        for threads in [1, 2] {
            // Forward: x·Wᵀ into columns h..2h of a rows × 3h buffer, on top of what is there.
            let mut own = (0..rows)
                .flat_map(|r| wide[r * 3 * h + h..][..h].to_vec())
                .collect::<Vec<_>>();
            let (xs, wt) = (Operand::plain(&x, inputs), Operand::transposed(&w, inputs));
            on_threads(threads, || matmul(&mut own, rows, h, inputs, xs, wt, true));
            let mut block = wide.clone();
            on_threads(threads, || {
                matmul_rows_apart(&mut block[h..], 3 * h, (rows, h, inputs), xs, wt, true)
            });
            for r in 0..rows {
                let got = &block[r * 3 * h..][..3 * h];
                assert!(got[h..2 * h]
                    .iter()
                    .zip(&own[r * h..][..h])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                assert_eq!(
                    got[..h],
                    wide[r * 3 * h..][..h],
                    "columns outside the block"
                );
                assert_eq!(
                    got[2 * h..],
                    wide[r * 3 * h + 2 * h..][..h],
                    "columns outside the block"
                );
            }
            // Backward: dy (columns 2h..3h of `wide`) read in place, transposed and plain.
            let dy: Vec<f32> = (0..rows)
                .flat_map(|r| wide[r * 3 * h + 2 * h..][..h].to_vec())
                .collect();
            let in_place = |row_stride, col_stride| Operand {
                data: &wide[2 * h..],
                row_stride,
                col_stride,
            };
            let (mut gw_own, mut gw_block) = (vec![0f32; h * inputs], vec![0f32; h * inputs]);
            let xs = Operand::plain(&x, inputs);
            on_threads(threads, || {
                matmul(
                    &mut gw_own,
                    h,
                    inputs,
                    rows,
                    Operand::transposed(&dy, h),
                    xs,
                    true,
                );
                matmul(&mut gw_block, h, inputs, rows, in_place(1, 3 * h), xs, true);
            });
            assert!(gw_own
                .iter()
                .zip(&gw_block)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            let want = reference_product(h, inputs, rows, in_place(1, 3 * h), xs);
            assert!(gw_block
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            let (mut dx_own, mut dx_block) = (x.clone(), x.clone());
            let ws = Operand::plain(&w, inputs);
            on_threads(threads, || {
                matmul(
                    &mut dx_own,
                    rows,
                    inputs,
                    h,
                    Operand::plain(&dy, h),
                    ws,
                    true,
                );
                matmul(&mut dx_block, rows, inputs, h, in_place(3 * h, 1), ws, true);
            });
            assert!(dx_own
                .iter()
                .zip(&dx_block)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// Small products (a single row or column, or at most 256 outputs read as dot products) take
    /// gemm's gemv and horizontal kernels: their blocking is fixed in gemm's source (1,024
    /// terms), not read from the cache, so again only the operands decide the bits. They are
    /// not the scalar chain, so check thread-count independence and closeness; `add` adds the
    /// product once.
    #[test]
    fn small_matmuls_are_thread_independent_and_add_once() {
        for (seed, (m, n, k)) in [(5, 28, 384), (1, 17, 700), (9, 1, 1536), (16, 16, 2000)]
            .into_iter()
            .enumerate()
        {
            products_in_every_layout((m, n, k), seed as u64, &|layout, lhs, rhs| {
                let want = reference_product(m, n, k, lhs, rhs);
                let mut one = vec![f32::NAN; m * n];
                on_threads(1, || matmul(&mut one, m, n, k, lhs, rhs, false));
                let mut two = vec![f32::NAN; m * n];
                on_threads(2, || matmul(&mut two, m, n, k, lhs, rhs, false));
                assert!(
                    one.iter()
                        .zip(&two)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{layout} {m}x{k} · {k}x{n}: 1 and 2 threads differ"
                );
                let diff = max_abs_diff(&one, &want);
                assert!(diff < 1e-4, "{layout} {m}x{k} · {k}x{n}: off by {diff}");
                let start: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.25 - 3.0).collect();
                let mut added = start.clone();
                matmul(&mut added, m, n, k, lhs, rhs, true);
                let diff = added
                    .iter()
                    .zip(&start)
                    .zip(&want)
                    .map(|((sum, before), product)| (sum - before - product).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-4,
                    "{layout} {m}x{k} · {k}x{n}: add mode off by {diff}"
                );
            });
        }
    }

    /// The packed encoder's logits against `model::forward` on a padded batch (the padding mask
    /// path), for both architectures and every activation.
    #[test]
    fn packed_logits_match_the_padded_forward() {
        let cases = [
            (Arch::Bert, "hidden_act", "gelu", "cls"),
            (Arch::Bert, "hidden_act", "gelu_new", "cls"),
            (Arch::Bert, "hidden_act", "relu", "cls"),
            (Arch::DistilBert, "activation", "gelu", "cls"),
            (Arch::DistilBert, "activation", "relu", "cls"),
            (Arch::Bert, "hidden_act", "gelu", "mean"),
            (Arch::DistilBert, "activation", "gelu", "mean"),
        ];
        for (seed, (arch, key, act, pooling)) in cases.into_iter().enumerate() {
            let mut raw = tiny_config(arch, 0.0);
            raw[key] = act.into();
            raw["classifier_pooling"] = pooling.into();
            let act = format!("{act} {pooling}");
            // Three layers, so a middle layer runs besides the first and the [CLS]-only last.
            raw[if arch == Arch::Bert {
                "num_hidden_layers"
            } else {
                "n_layers"
            }] = 3.into();
            let cfg = EncoderConfig::from_json(raw).unwrap();
            // A larger init than HF's 0.02, so the layers change the hidden states visibly and
            // a wrong mask or a missed residual shows in the logits.
            let mut cfg_init = cfg.clone();
            cfg_init.initializer_range = 0.3;
            let params = Params::init(&cfg_init, 28, seed as u64, &Device::Cpu).unwrap();
            let weights = params.detached();
            let packed = PackedEncoder::new(&cfg, &weights).unwrap();
            let rows = random_token_rows(13, 40, seed as u64);
            let seqs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
            let batch = Batch::new(&seqs, 0, &Device::Cpu).unwrap();
            let want: Vec<f32> = forward(&cfg, &weights, &batch, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = packed.logits(&seqs).unwrap();
            let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                spread > 0.05,
                "{arch:?} {act}: logits too small to compare ({spread})"
            );
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{arch:?} {act}: max logit difference {diff}");
            // One row at a time gives the same as the packed batch: rows do not see each other.
            let alone = packed.logits(&seqs[4..5]).unwrap();
            let diff = max_abs_diff(&alone, &got[4 * 28..5 * 28]);
            assert!(diff < 1e-5, "{arch:?} {act}: alone vs in the batch {diff}");
        }
    }

    /// The int8 encoder against the f32 one on tiny random BERT and DistilBERT models: the
    /// logits agree to within the quantization error, and a row alone gives what it gives in
    /// a batch (activations are scaled per row, never per batch).
    #[test]
    fn int8_logits_are_near_f32_and_independent_of_the_batch() {
        for (seed, arch) in [Arch::Bert, Arch::DistilBert].into_iter().enumerate() {
            let cfg = EncoderConfig::from_json(tiny_config(arch, 0.0)).unwrap();
            let mut cfg_init = cfg.clone();
            cfg_init.initializer_range = 0.3;
            let params = Params::init(&cfg_init, 28, 10 + seed as u64, &Device::Cpu).unwrap();
            let weights = params.detached();
            let f32_enc = PackedEncoder::new(&cfg, &weights).unwrap();
            let int8_enc = PackedEncoder::with_precision(&cfg, &weights, Precision::Int8).unwrap();
            let rows = random_token_rows(13, 40, 5 + seed as u64);
            let seqs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
            let want = f32_enc.logits(&seqs).unwrap();
            let got = int8_enc.logits(&seqs).unwrap();
            let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < 0.03 * spread && diff > 0.0,
                "{arch:?}: int8 vs f32 {diff} (logits up to {spread})"
            );
            // (Not bit for bit: the f32 pooler and classifier run as one product per batch.)
            let alone = int8_enc.logits(&seqs[4..5]).unwrap();
            let diff = max_abs_diff(&alone, &got[4 * 28..5 * 28]);
            assert!(diff < 1e-5, "{arch:?}: alone vs in the batch {diff}");
        }
    }

    /// Int8 scoring splits a batch into one group of rows per thread: the logits' bytes are
    /// those of one thread, whatever the thread count (a group of one row included); f32's
    /// too (it keeps the batch whole).
    #[test]
    fn logits_do_not_depend_on_the_thread_count() {
        let cases = [Arch::Bert, Arch::DistilBert]
            .into_iter()
            .flat_map(|arch| [(arch, Precision::F32), (arch, Precision::Int8)]);
        for (seed, (arch, precision)) in cases.enumerate() {
            let cfg = EncoderConfig::from_json(tiny_config(arch, 0.0)).unwrap();
            let params = Params::init(&cfg, 28, 20 + seed as u64, &Device::Cpu).unwrap();
            let enc = PackedEncoder::with_precision(&cfg, &params.detached(), precision).unwrap();
            let rows = random_token_rows(9, 40, 50 + seed as u64);
            let seqs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let mut one = Vec::new();
            on_threads(1, || one = bits(enc.logits(&seqs).unwrap()));
            for threads in [2, 3, 4, 9, 12] {
                let mut many = Vec::new();
                on_threads(threads, || many = bits(enc.logits(&seqs).unwrap()));
                assert_eq!(many, one, "{arch:?} {precision:?} on {threads} threads");
            }
        }
    }

    #[test]
    fn packed_scores_are_sigmoids_of_the_logits() {
        let cfg = EncoderConfig::from_json(tiny_config(Arch::Bert, 0.0)).unwrap();
        let params = Params::init(&cfg, 28, 3, &Device::Cpu).unwrap();
        let packed = PackedEncoder::new(&cfg, &params.detached()).unwrap();
        let rows = random_token_rows(3, 10, 1);
        let seqs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let logits = packed.logits(&seqs).unwrap();
        let scores = packed.scores(&seqs).unwrap();
        for (l, s) in logits.iter().zip(&scores) {
            assert!((s - 1.0 / (1.0 + (-l).exp())).abs() < 1e-7);
        }
        assert_eq!(packed.num_labels(), 28);
    }

    /// erf_rational against libm's erff (what candle's `erf` op calls) on a fine grid through
    /// the range where it is not ±1, and past it.
    #[test]
    fn rational_erf_is_within_5e_7_of_libm() {
        let mut worst = (0f32, 0f32);
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let err = (erf_rational(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 < 5e-7, "error {} at x = {}", worst.0, worst.1);
        assert_eq!(erf_rational(0.0), 0.0);
        // Past the clamp: erf(4) within the bound, which is where erf is 1 in f32.
        assert!((erf_rational(10.0) - 1.0).abs() < 5e-7);
        assert_eq!(erf_rational(-10.0), -erf_rational(10.0));
        assert!((erf_rational(0.5) - 0.520_499_9).abs() < 1e-6);
    }

    /// exp_approx against f32::exp over the softmax's inputs (x − max ≤ 0) and a little above.
    #[test]
    fn approximate_exp_is_within_3e_7_relative() {
        let mut worst = (0f32, 0f32);
        for i in -870_000..=10_000 {
            let x = i as f32 * 1e-4;
            let want = x.exp();
            let err = ((exp_approx(x) - want) / want).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 < 3e-7,
            "relative error {} at x = {}",
            worst.0,
            worst.1
        );
        assert_eq!(exp_approx(0.0), 1.0);
        // Far below: clamped to e^-87, a softmax term of nothing next to the row's 1.
        assert!(exp_approx(-1e4) < 2e-38);
    }

    #[test]
    fn bad_rows_are_refused_with_the_reason() {
        let cfg = EncoderConfig::from_json(tiny_config(Arch::DistilBert, 0.0)).unwrap();
        let params = Params::init(&cfg, 28, 3, &Device::Cpu).unwrap();
        let packed = PackedEncoder::new(&cfg, &params.detached()).unwrap();
        let too_long = vec![101u32; 129];
        let cases: [(&[u32], &str); 3] = [
            (&[], "row 1 has 0 tokens; the model takes 1 to 128"),
            (&too_long, "row 1 has 129 tokens; the model takes 1 to 128"),
            (
                &[101, 30522, 102],
                "row 1 has token id 30522, outside the model's vocabulary of 30522",
            ),
        ];
        for (row, want) in cases {
            let err = packed.logits(&[&[101, 102], row]).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        // Weights by name (what a checkpoint holds) without one: refused, naming it.
        let mut named: std::collections::HashMap<String, Tensor> = params
            .detached()
            .named()
            .map(|(n, t)| (n, t.clone()))
            .collect();
        named.remove("classifier.bias");
        let err = crate::params::Encoder::from_named(&cfg, 28, &named)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no tensor `classifier.bias`"), "{err}");
    }
}
