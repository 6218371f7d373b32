//! Attention: each row of a packed batch over its own tokens, head by head, for scoring and
//! (forward and backward) for training.
//!
//! Two summation orders, each defined by a scalar function here that is the reference:
//! - [`ScoreOrder::DotLanes`] ([`attend_row`]): each score a [`dot`] (eight lanes, then their
//!   sum), the f32 encoder's order, whose bytes pipeline.lock records;
//! - [`ScoreOrder::ByKeys`] ([`attend_row_by_keys`]): each score a running sum over the head's
//!   features, the int8 encoder's order.
//!
//! The AVX-512 kernel does the same float operations in the same order on 16 keys at a time,
//! so both give the same bytes (a test checks it); it is faster because the keys are laid out
//! transposed once per row and every sum stays in a register (the scalar loops kept the scores
//! in memory: attention was a fifth of an int8 inference profile). It multiplies and adds in
//! two instructions, never one fused multiply-add, because the scalar order rounds twice.
//!
//! Training's references are the trainer's scalar loops (`backprop::attend_row` and
//! `attend_row_backward`, used where this CPU has no AVX-512): [`attend_for_training`] is the
//! scoring kernel in the `DotLanes` order with the scale, the kept probabilities and the dropout
//! factors added; [`attend_backward_for_training`] takes several queries at once with the
//! same per-sum order. A test in `backprop` compares their bits.

use std::cell::RefCell;

use crate::infer::{dot, exp_approx, lane_sum};

/// The order in which a query's scores against the keys are summed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScoreOrder {
    DotLanes,
    ByKeys,
}

/// One row's attention: `len` tokens from token `s` of `qkv` (per token: query, key, value,
/// `h` each; the query already scaled by 1/√d_head), the heads' outputs written into `out`
/// (one token × h for the `[CLS]` query alone, or `len` tokens × h), whatever it held.
pub(crate) fn attend(
    order: ScoreOrder,
    qkv: &[f32],
    (h, heads): (usize, usize),
    (s, len): (usize, usize),
    out: &mut [f32],
) {
    assert!(len > 0 && (s + len) * 3 * h <= qkv.len(), "attention row");
    assert!(out.len() == h || out.len() == len * h, "attention output");
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(h / heads) {
        // SAFETY: `usable` checked the CPU's features and the head width; the asserts above
        // the slices' sizes.
        return unsafe {
            avx512::attend::<fn(usize) -> f32>(order, qkv, (h, heads), (s, len), out, None)
        };
    }
    // The references add into `out`, from zero.
    out.fill(0.0);
    match order {
        ScoreOrder::DotLanes => attend_row_wide(qkv, h, heads, s, len, out),
        ScoreOrder::ByKeys => attend_row_by_keys_wide(qkv, h, heads, s, len, out),
    }
}

/// Whether [`attend_for_training`] and [`FeatureMajor`] can run here: the AVX-512 kernel on
/// this CPU for heads `dh` wide. Elsewhere training keeps its own scalar loops (the same bits).
pub(crate) fn training_kernel_usable(dh: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::usable(dh)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dh;
        false
    }
}

/// Training's forward attention for one row, all heads, by the AVX-512 kernel: for each head
/// and query i, the scores `scale · dot(q_i, k_j)` ([`dot`]'s order), their softmax
/// (`exp_approx` of each minus the max, times 1 / their [`lane_sum`]) written to
/// `probs[(head·len + i)·len + j]` (before dropout), then `out_i = Σ_j w_ij·v_j` from zero in
/// key order, with `w_ij` the probability times `dropout(index)` where given (the same index
/// into `probs`). These are the operations of the trainer's scalar loop, in its order, so the
/// bits are the same (a test checks it). `qkv` holds per token the query (not scaled), key and
/// value side by side; `out` is `len` tokens × h. Only where [`training_kernel_usable`].
pub(crate) fn attend_for_training<F: Fn(usize) -> f32>(
    qkv: &[f32],
    (h, heads, scale): (usize, usize, f32),
    (s, len): (usize, usize),
    dropout: Option<F>,
    out: &mut [f32],
    probs: &mut [f32],
) {
    assert!(len > 0 && (s + len) * 3 * h <= qkv.len(), "attention row");
    assert!(out.len() == len * h, "attention output");
    assert!(probs.len() == heads * len * len, "attention probabilities");
    assert!(
        training_kernel_usable(h / heads),
        "no AVX-512 attention kernel here"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `training_kernel_usable` checked the CPU's features and the head width; the
    // asserts above the slices' sizes.
    unsafe {
        let keep = avx512::Keep {
            scale,
            probs,
            dropout,
        };
        avx512::attend(
            ScoreOrder::DotLanes,
            qkv,
            (h, heads),
            (s, len),
            out,
            Some(keep),
        )
    }
}

/// One row's keys or values (or any third of its tokens' `qkv`), feature-major: feature c of
/// token j at `c·lp + j`, `lp` the tokens rounded up to 16, so [`FeatureMajor::dots`] takes 16
/// tokens a register. Its buffer is the thread's, taken back from the last row on the thread
/// and returned when dropped. Only where [`training_kernel_usable`].
pub(crate) struct FeatureMajor {
    data: Vec<f32>,
    lp: usize,
    len: usize,
    dh: usize,
}

impl FeatureMajor {
    /// Tokens `s..s + len` of `qkv` (3·h per token), the h features from `part · h` (1 the
    /// keys, 2 the values), in heads `dh` wide.
    pub(crate) fn new(
        qkv: &[f32],
        h: usize,
        dh: usize,
        (s, len): (usize, usize),
        part: usize,
    ) -> FeatureMajor {
        assert!(training_kernel_usable(dh) && h.is_multiple_of(dh) && part < 3);
        assert!(len > 0 && (s + len) * 3 * h <= qkv.len(), "attention row");
        let lp = len.div_ceil(16) * 16;
        let mut buffer = FEATURE_MAJOR.with(|b| b.take());
        // Not cleared: the padding tokens' dot products are computed and never read.
        if buffer.len() < h * lp {
            buffer.resize(h * lp, 0.0);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `training_kernel_usable` checked avx512f; the sizes are asserted above.
        unsafe {
            avx512::transpose_keys(qkv, (h, part * h), s, len, lp, &mut buffer)
        };
        FeatureMajor {
            data: buffer,
            lp,
            len,
            dh,
        }
    }

    /// `out[j] = dot(x, token j's features of head)` for the `len` tokens ([`dot`]'s order:
    /// the same bits); `x` is `dh` long.
    pub(crate) fn dots(&self, head: usize, x: &[f32], out: &mut [f32]) {
        assert!(x.len() == self.dh && out.len() == self.len, "dots sizes");
        assert!((head + 1) * self.dh * self.lp <= self.data.len(), "head");
        let mut scores = [0f32; 512];
        let lp = self.lp;
        let mut full;
        let dst: &mut [f32] = if lp <= scores.len() {
            &mut scores[..lp]
        } else {
            full = vec![0f32; lp];
            &mut full
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `new` checked the CPU and the head width; `data` holds `dh · lp` floats per
        // head (asserted above), `dst` `lp`.
        unsafe {
            avx512::scores_dot_lanes(
                x.as_ptr(),
                self.data.as_ptr().add(head * self.dh * lp),
                self.dh,
                lp,
                dst.as_mut_ptr(),
            )
        };
        out.copy_from_slice(&dst[..self.len]);
    }
}

impl Drop for FeatureMajor {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        FEATURE_MAJOR.with(|b| b.replace(data));
    }
}

/// Training's backward attention for one row, all heads, by the AVX-512 kernel: from ∂L/∂ctx
/// (`d_ctx`, tokens × h, the row's from token `s`), the row's probabilities (before dropout)
/// and dropout factors as [`attend_for_training`] kept them, and its values feature-major,
/// adds into `d_qkv` (the row's tokens × 3·h, ∂q, ∂k, ∂v side by side) what the trainer's
/// scalar loop adds: per head and query i in order, ∂p_ij = m_ij·dot(∂ctx_i, v_j),
/// ∂v_j += (m_ij·p_ij)·∂ctx_i, ∂s_ij = scale·p_ij·(∂p_ij − dot(p_i, ∂p_i)), ∂k_j += ∂s_ij·q_i
/// and ∂q_i = Σ_j ∂s_ij·k_j, each addition skipped where its weight is 0. Several queries go
/// at once: each ∂v_j and ∂k_j still takes its terms in query order and each ∂q_i in key
/// order, so every sum is the same chain of roundings (a test checks the bits). What the
/// scalar loop spent its time on was each query's ∂q_i, one chain of dependent additions;
/// here two to four of them overlap.
pub(crate) fn attend_backward_for_training(
    d_ctx: &[f32],
    qkv: &[f32],
    (probs, factors): (&[f32], Option<&[f32]>),
    (h, heads, scale): (usize, usize, f32),
    (s, len): (usize, usize),
    values: &FeatureMajor,
    d_qkv: &mut [f32],
) {
    let dh = h / heads;
    assert!(
        training_kernel_usable(dh),
        "no AVX-512 attention kernel here"
    );
    assert!(len > 0 && (s + len) * 3 * h <= qkv.len(), "attention row");
    assert!((s + len) * h <= d_ctx.len(), "attention gradient");
    assert!(probs.len() == heads * len * len, "attention probabilities");
    assert!(
        factors.is_none_or(|f| f.len() == probs.len()),
        "dropout factors"
    );
    assert!(d_qkv.len() == len * 3 * h, "attention input gradient");
    assert!(
        values.len == len && values.dh == dh,
        "values of another row"
    );
    // Queries at once: as many as keep their ∂q sums, ∂ctx and q rows in registers.
    let most = if dh <= 32 { 4 } else { 2 };
    let (mut dp, mut w, mut ds) = (
        vec![0f32; most * len],
        vec![0f32; most * len],
        vec![0f32; most * len],
    );
    for head in 0..heads {
        let mut first = 0;
        while first < len {
            let n = (len - first).min(most);
            for b in 0..n {
                let i = first + b;
                let at_p = (head * len + i) * len;
                let p = &probs[at_p..][..len];
                let g = &d_ctx[(s + i) * h + head * dh..][..dh];
                let (dp, w, ds) = (
                    &mut dp[b * len..][..len],
                    &mut w[b * len..][..len],
                    &mut ds[b * len..][..len],
                );
                values.dots(head, g, dp);
                for j in 0..len {
                    let m = factors.map_or(1.0, |f| f[at_p + j]);
                    dp[j] *= m;
                    w[j] = m * p[j];
                }
                let centre = dot(p, dp);
                for j in 0..len {
                    ds[j] = scale * p[j] * (dp[j] - centre);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `training_kernel_usable` checked the CPU and the head width; the sizes
            // are asserted above: queries first..first + n of the row, `len` keys each.
            unsafe {
                let block = avx512::BackwardBlock {
                    weights: (w.as_ptr(), ds.as_ptr(), len),
                    d_ctx: d_ctx.as_ptr().add((s + first) * h + head * dh),
                    qkv: qkv.as_ptr().add(s * 3 * h + head * dh),
                    d_qkv: d_qkv.as_mut_ptr().add(head * dh),
                    first,
                    h,
                };
                macro_rules! block_for {
                    ($($n:literal, $t:literal);*) => {
                        match (n, dh / 16) {
                            $(($n, $t) => block.run::<$n, $t>(),)*
                            _ => unreachable!("1 to 4 queries of 1 or 2 registers, 1 or 2 of 3 or 4"),
                        }
                    };
                }
                block_for!(1, 1; 2, 1; 3, 1; 4, 1; 1, 2; 2, 2; 3, 2; 4, 2; 1, 3; 2, 3; 1, 4; 2, 4);
            }
            first += n;
        }
    }
}

wide_fn!(fn attend_row_wide(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) => attend_row);
wide_fn!(fn attend_row_by_keys_wide(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) => attend_row_by_keys);

/// The reference of [`ScoreOrder::DotLanes`].
#[inline(always)]
fn attend_row(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) {
    let dh = h / heads;
    let token = |t: usize| &qkv[(s + t) * 3 * h..][..3 * h];
    let mut probs = vec![0f32; len];
    for (qt, out_t) in out.chunks_mut(h).enumerate() {
        for head in 0..heads {
            let q = &token(qt)[head * dh..][..dh];
            for (j, p) in probs.iter_mut().enumerate() {
                *p = dot(q, &token(j)[h + head * dh..][..dh]);
            }
            softmax_and_values(
                &mut probs,
                |j| &token(j)[2 * h + head * dh..][..dh],
                out_t,
                head * dh,
            );
        }
    }
}

/// The reference of [`ScoreOrder::ByKeys`]: each head's keys transposed and padded to a
/// multiple of 16 tokens, a query's scores against all keys summed feature by feature.
#[inline(always)]
fn attend_row_by_keys(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) {
    let dh = h / heads;
    let lp = len.div_ceil(16) * 16;
    let token = |t: usize| &qkv[(s + t) * 3 * h..][..3 * h];
    let keys = transposed_keys(qkv, h, s, len, lp);
    let mut probs = vec![0f32; lp];
    for (qt, out_t) in out.chunks_mut(h).enumerate() {
        let q = &token(qt)[..h];
        for head in 0..heads {
            probs.iter_mut().for_each(|p| *p = 0.0);
            for d in 0..dh {
                let c = head * dh + d;
                let qc = q[c];
                for (p, k) in probs.iter_mut().zip(&keys[c * lp..][..lp]) {
                    *p += qc * k;
                }
            }
            softmax_and_values(
                &mut probs[..len],
                |j| &token(j)[2 * h + head * dh..][..dh],
                out_t,
                head * dh,
            );
        }
    }
}

/// keys[c][j]: feature c (head · dh + d) of key j, `lp` ≥ `len` keys per feature, the padding
/// keys zero.
fn transposed_keys(qkv: &[f32], h: usize, s: usize, len: usize, lp: usize) -> Vec<f32> {
    let mut keys = vec![0f32; h * lp];
    for j in 0..len {
        let k = &qkv[(s + j) * 3 * h + h..][..h];
        for (c, &k) in k.iter().enumerate() {
            keys[c * lp + j] = k;
        }
    }
    keys
}

/// Softmax of the scores `probs` (exp_approx of each minus their max, over their
/// [`lane_sum`]), then each value weighted by its probability added into `out_t[at..at + dh]`.
#[inline(always)]
fn softmax_and_values<'v>(
    probs: &mut [f32],
    value: impl Fn(usize) -> &'v [f32],
    out_t: &mut [f32],
    at: usize,
) {
    let max = probs.iter().fold(f32::NEG_INFINITY, |m, &p| m.max(p));
    probs.iter_mut().for_each(|p| *p = exp_approx(*p - max));
    let inv_sum = 1.0 / lane_sum(probs);
    for (j, p) in probs.iter().enumerate() {
        let v = value(j);
        let o = &mut out_t[at..][..v.len()];
        let w = p * inv_sum;
        o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}

/// Queries the AVX-512 kernel takes at once (per head).
const QUERIES: usize = 4;

thread_local! {
    /// The AVX-512 kernel's transposed keys and scores, kept per thread between rows.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// [`FeatureMajor`]'s buffer, likewise.
    static FEATURE_MAJOR: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ScoreOrder, QUERIES, SCRATCH};

    /// What training keeps from the forward pass, and how it changes the weights (see
    /// [`super::attend_for_training`]).
    pub(super) struct Keep<'a, F> {
        pub(super) scale: f32,
        pub(super) probs: &'a mut [f32],
        pub(super) dropout: Option<F>,
    }

    /// Head widths the kernel handles: 16, 32, 48 or 64 features (one to four registers).
    const MAX_HEAD_REGS: usize = 4;

    /// Whether this CPU and head width can take the kernel (not under `GOEMO_KERNELS=portable`,
    /// which runs the scalar references: same bytes, slower).
    pub(super) fn usable(dh: usize) -> bool {
        dh.is_multiple_of(16)
            && dh / 16 <= MAX_HEAD_REGS
            && !crate::portable_kernels_forced()
            && is_x86_feature_detected!("avx512f")
    }

    /// See [`super::attend`]. Caller: the CPU has avx512f, `dh` is a multiple of 16 up to 64,
    /// `qkv` holds tokens `s..s + len` and `out` one or `len` tokens × h.
    /// With `keep` (training), the order is `DotLanes`, every query is computed, each score
    /// is scaled after its dot product, the probabilities are copied out before dropout, and
    /// the dropout factors multiply the weights the values are summed with.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend<F: Fn(usize) -> f32>(
        order: ScoreOrder,
        qkv: &[f32],
        (h, heads): (usize, usize),
        (s, len): (usize, usize),
        out: &mut [f32],
        mut keep: Option<Keep<'_, F>>,
    ) {
        let dh = h / heads;
        let lp = len.div_ceil(16) * 16;
        let mut scratch = SCRATCH.with(|c| c.take());
        // Not cleared between rows: the padding keys' scores are computed and never read.
        let need = h * lp + QUERIES * lp;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (keys, probs) = scratch[..need].split_at_mut(h * lp);
        transpose_keys(qkv, (h, h), s, len, lp, keys);
        let stride = 3 * h;
        let queries = out.len() / h;
        for head in 0..heads {
            let keys = keys.as_ptr().add(head * dh * lp);
            let v = qkv.as_ptr().add(s * stride + 2 * h + head * dh);
            // Up to QUERIES queries at once: they share each load of a key or value, and
            // their sums are independent chains of adds (2-3% faster end to end than one
            // query at a time).
            let mut first = 0;
            while first < queries {
                let n = (queries - first).min(QUERIES);
                let q = qkv.as_ptr().add((s + first) * stride + head * dh);
                match order {
                    ScoreOrder::ByKeys => match n {
                        1 => scores_by_keys::<1>(q, stride, keys, dh, lp, probs.as_mut_ptr()),
                        2 => scores_by_keys::<2>(q, stride, keys, dh, lp, probs.as_mut_ptr()),
                        3 => scores_by_keys::<3>(q, stride, keys, dh, lp, probs.as_mut_ptr()),
                        _ => scores_by_keys::<4>(q, stride, keys, dh, lp, probs.as_mut_ptr()),
                    },
                    ScoreOrder::DotLanes => {
                        for i in 0..n {
                            let p = probs.as_mut_ptr().add(i * lp);
                            scores_dot_lanes(q.add(i * stride), keys, dh, lp, p);
                        }
                    }
                }
                if let Some(keep) = &keep {
                    let scale = _mm512_set1_ps(keep.scale);
                    for c in (0..n * lp).step_by(16) {
                        let p = probs.as_mut_ptr().add(c);
                        _mm512_storeu_ps(p, _mm512_mul_ps(scale, _mm512_loadu_ps(p)));
                    }
                }
                let p = probs.as_mut_ptr();
                match n {
                    1 => softmax_weights::<1>(p, lp, len),
                    2 => softmax_weights::<2>(p, lp, len),
                    3 => softmax_weights::<3>(p, lp, len),
                    _ => softmax_weights::<4>(p, lp, len),
                }
                if let Some(keep) = &mut keep {
                    for i in 0..n {
                        let at = (head * len + first + i) * len;
                        let p = &mut probs[i * lp..][..len];
                        keep.probs[at..at + len].copy_from_slice(p);
                        if let Some(factor) = &keep.dropout {
                            for (j, p) in p.iter_mut().enumerate() {
                                *p *= factor(at + j);
                            }
                        }
                    }
                }
                let o = out.as_mut_ptr().add(first * h + head * dh);
                let weights = (probs.as_ptr(), lp, len);
                let value_rows = (v, stride);
                macro_rules! values_for {
                    ($($n:literal, $t:literal);*) => {
                        match (n, dh / 16) {
                            $(($n, $t) => values::<$n, $t>(weights, value_rows, o, h),)*
                            _ => unreachable!("1 to 4 queries, 1 to 4 registers a head"),
                        }
                    };
                }
                values_for!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4;
                            3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4);
                first += n;
            }
        }
        SCRATCH.with(|c| c.replace(scratch));
    }

    /// Queries `first..first + Q` of one head in the backward pass (see
    /// [`super::attend_backward_for_training`]): their weights `m·p` and score gradients ∂s
    /// (Q rows of `len` at `weights`), their ∂ctx rows from `d_ctx` (h apart), and the row's
    /// q, k (from `qkv`, 3·h a token) and ∂q, ∂k, ∂v (from `d_qkv`, likewise), at the head's
    /// features.
    pub(super) struct BackwardBlock {
        pub(super) weights: (*const f32, *const f32, usize),
        pub(super) d_ctx: *const f32,
        pub(super) qkv: *const f32,
        pub(super) d_qkv: *mut f32,
        pub(super) first: usize,
        pub(super) h: usize,
    }

    impl BackwardBlock {
        /// Q queries, heads 16·T wide. Each addition `acc + w·x` is masked off where w is 0
        /// (the scalar loop's skipped term), rounded as the scalar loop rounds (a product,
        /// then a sum: no fused multiply-add).
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn run<const Q: usize, const T: usize>(&self) {
            let (w, ds, len) = self.weights;
            let (h, stride) = (self.h, 3 * self.h);
            let token = |t: usize| self.qkv.add(t * stride);
            let grad = |t: usize| self.d_qkv.add(t * stride);
            let load = |p: *const f32| -> [__m512; T] {
                std::array::from_fn(|t| _mm512_loadu_ps(p.add(16 * t)))
            };
            let store = |p: *mut f32, x: &[__m512; T]| {
                for (t, x) in x.iter().enumerate() {
                    _mm512_storeu_ps(p.add(16 * t), *x);
                }
            };
            let nonzero = |x: f32| -> __mmask16 {
                if x != 0.0 {
                    !0
                } else {
                    0
                }
            };
            // ∂v_j += (m·p)_ij·∂ctx_i, i in order.
            let g: [[__m512; T]; Q] = std::array::from_fn(|i| load(self.d_ctx.add(i * h)));
            for j in 0..len {
                let dv = grad(j).add(2 * h);
                let mut acc = load(dv);
                for (i, g) in g.iter().enumerate() {
                    let wij = *w.add(i * len + j);
                    let (keep, wv) = (nonzero(wij), _mm512_set1_ps(wij));
                    for (a, g) in acc.iter_mut().zip(g) {
                        *a = _mm512_mask_add_ps(*a, keep, *a, _mm512_mul_ps(wv, *g));
                    }
                }
                store(dv, &acc);
            }
            // ∂k_j += ∂s_ij·q_i, i in order; ∂q_i += ∂s_ij·k_j, j in order.
            let q: [[__m512; T]; Q] = std::array::from_fn(|i| load(token(self.first + i)));
            let mut dq: [[__m512; T]; Q] = std::array::from_fn(|i| load(grad(self.first + i)));
            for j in 0..len {
                let k = load(token(j).add(h));
                let dk = grad(j).add(h);
                let mut acc = load(dk);
                for i in 0..Q {
                    let d = *ds.add(i * len + j);
                    let (keep, dv) = (nonzero(d), _mm512_set1_ps(d));
                    for t in 0..T {
                        acc[t] =
                            _mm512_mask_add_ps(acc[t], keep, acc[t], _mm512_mul_ps(dv, q[i][t]));
                        dq[i][t] =
                            _mm512_mask_add_ps(dq[i][t], keep, dq[i][t], _mm512_mul_ps(dv, k[t]));
                    }
                }
                store(dk, &acc);
            }
            for (i, dq) in dq.iter().enumerate() {
                store(grad(self.first + i), dq);
            }
        }
    }

    /// keys[c·lp + j] = feature c of key j (the features from `part` within each token's
    /// 3·h: h for the keys, 2·h for the values): 8 keys × 8 features at a time transposed in
    /// registers (LLVM had turned the plain loop into scatters, a quarter of the kernel's time
    /// on these cores); a last block of fewer than 8 keys is padded with zeros. `h` is a
    /// multiple of 16, `lp` of 16 and at least `len`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_keys(
        qkv: &[f32],
        (h, part): (usize, usize),
        s: usize,
        len: usize,
        lp: usize,
        keys: &mut [f32],
    ) {
        debug_assert!(
            h.is_multiple_of(8)
                && lp >= len.div_ceil(8) * 8
                && keys.len() >= h * lp
                && (s + len) * 3 * h <= qkv.len()
                && part <= 2 * h
        );
        let key = |j: usize| qkv.as_ptr().add((s + j) * 3 * h + part);
        let out = keys.as_mut_ptr();
        for j0 in (0..len).step_by(8) {
            for c0 in (0..h).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|a| {
                    if j0 + a < len {
                        _mm256_loadu_ps(key(j0 + a).add(c0))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                let t: [__m256; 8] = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                let u: [__m256; 8] = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                for b in 0..4 {
                    let low = _mm256_permute2f128_ps::<0x20>(u[b], u[b + 4]);
                    let high = _mm256_permute2f128_ps::<0x31>(u[b], u[b + 4]);
                    _mm256_storeu_ps(out.add((c0 + b) * lp + j0), low);
                    _mm256_storeu_ps(out.add((c0 + b + 4) * lp + j0), high);
                }
            }
        }
    }

    /// For each of Q queries (query i at `q + i·stride`): scores[i·lp + j] =
    /// Σ_d q_i[d]·keys[d][j], d in order from 0 (`attend_row_by_keys`'s sum), 16 keys a
    /// register, up to four registers of keys a pass over the features.
    #[inline(always)]
    unsafe fn scores_by_keys<const Q: usize>(
        q: *const f32,
        stride: usize,
        keys: *const f32,
        dh: usize,
        lp: usize,
        scores: *mut f32,
    ) {
        let blocks = lp / 16;
        let mut b = 0;
        while b < blocks {
            match blocks - b {
                1 => by_keys::<Q, 1>(q, stride, keys, dh, lp, b, scores),
                2 => by_keys::<Q, 2>(q, stride, keys, dh, lp, b, scores),
                3 => by_keys::<Q, 3>(q, stride, keys, dh, lp, b, scores),
                _ => by_keys::<Q, 4>(q, stride, keys, dh, lp, b, scores),
            }
            b += (blocks - b).min(4);
        }
    }

    #[inline(always)]
    unsafe fn by_keys<const Q: usize, const G: usize>(
        q: *const f32,
        stride: usize,
        keys: *const f32,
        dh: usize,
        lp: usize,
        b: usize,
        scores: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); G]; Q];
        for d in 0..dh {
            let row = keys.add(d * lp + b * 16);
            let k: [__m512; G] = std::array::from_fn(|g| _mm512_loadu_ps(row.add(16 * g)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let qd = _mm512_set1_ps(*q.add(i * stride + d));
                for (acc, k) in acc.iter_mut().zip(&k) {
                    *acc = _mm512_add_ps(*acc, _mm512_mul_ps(qd, *k));
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (g, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(scores.add(i * lp + (b + g) * 16), *acc);
            }
        }
    }

    /// scores[j] = `dot(q, key j)` (infer::dot: lane i sums features i, i + 8, … in order from
    /// 0; then the eight lanes in order; then the empty remainder, dh being a multiple of 16),
    /// for 16 keys a register.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores_dot_lanes(
        q: *const f32,
        keys: *const f32,
        dh: usize,
        lp: usize,
        scores: *mut f32,
    ) {
        let blocks = lp / 16;
        let mut b = 0;
        while b < blocks {
            if blocks - b >= 2 {
                dot_lanes::<2>(q, keys, dh, lp, b, scores);
                b += 2;
            } else {
                dot_lanes::<1>(q, keys, dh, lp, b, scores);
                b += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn dot_lanes<const G: usize>(
        q: *const f32,
        keys: *const f32,
        dh: usize,
        lp: usize,
        b: usize,
        scores: *mut f32,
    ) {
        let mut lanes = [[_mm512_setzero_ps(); 8]; G];
        for chunk in 0..dh / 8 {
            for lane in 0..8 {
                let d = chunk * 8 + lane;
                let qd = _mm512_set1_ps(*q.add(d));
                let row = keys.add(d * lp + b * 16);
                for (g, lanes) in lanes.iter_mut().enumerate() {
                    lanes[lane] = _mm512_add_ps(
                        lanes[lane],
                        _mm512_mul_ps(qd, _mm512_loadu_ps(row.add(16 * g))),
                    );
                }
            }
        }
        // `Iterator::sum` of an empty f32 iterator: what `dot` adds for the remainder.
        let empty = _mm512_set1_ps(std::iter::empty::<f32>().sum());
        for (g, lanes) in lanes.iter().enumerate() {
            // `lanes.iter().sum()` starts from the same empty sum, then adds lane 0, 1, … 7.
            let mut total = _mm512_add_ps(empty, lanes[0]);
            for lane in &lanes[1..] {
                total = _mm512_add_ps(total, *lane);
            }
            _mm512_storeu_ps(scores.add((b + g) * 16), _mm512_add_ps(total, empty));
        }
    }

    /// For each of Q queries' scores (query i's at `probs + i·lp`): each of the first `len`
    /// replaced by its weight exp_approx(score − max) · (1 / their lane_sum), the numbers
    /// `softmax_and_values` forms, one query after another there; here the Q queries go side
    /// by side, so their serial sums overlap. The padding past `len` gets values never read.
    #[inline(always)]
    unsafe fn softmax_weights<const Q: usize>(probs: *mut f32, lp: usize, len: usize) {
        let blocks = lp / 16;
        let last = (blocks - 1) * 16;
        let tail: __mmask16 = if len - last == 16 {
            !0
        } else {
            (1 << (len - last)) - 1
        };
        let query = |i: usize| probs.add(i * lp);
        // The largest score (a max is exact in any order).
        let maxes: [__m512; Q] = std::array::from_fn(|i| {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in (0..last).step_by(16) {
                m = _mm512_max_ps(m, _mm512_loadu_ps(query(i).add(c)));
            }
            let m = _mm512_mask_max_ps(m, tail, m, _mm512_loadu_ps(query(i).add(last)));
            _mm512_set1_ps(_mm512_reduce_max_ps(m))
        });
        for (i, max) in maxes.iter().enumerate() {
            for c in (0..lp).step_by(16) {
                let p = query(i).add(c);
                _mm512_storeu_ps(p, exp_approx(_mm512_sub_ps(_mm512_loadu_ps(p), *max)));
            }
        }
        // lane_sum(probs[..len]): eight lanes, each the sum of its column of 8-wide chunks in
        // order (from zero: the first chunk itself, every term being positive), then the lanes
        // in order, then the leftover terms' own sum.
        let chunks = len / 8;
        let mut sums = [0f32; Q];
        let mut lanes = [[0f32; 8]; Q];
        for (i, lanes) in lanes.iter_mut().enumerate() {
            if chunks > 0 {
                let mut acc = _mm256_loadu_ps(query(i));
                for c in 1..chunks {
                    acc = _mm256_add_ps(acc, _mm256_loadu_ps(query(i).add(8 * c)));
                }
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            }
        }
        for lane in 0..8 {
            for (sum, lanes) in sums.iter_mut().zip(&lanes) {
                *sum += lanes[lane];
            }
        }
        let mut leftover = [0f32; Q];
        for t in chunks * 8..len {
            for (i, l) in leftover.iter_mut().enumerate() {
                *l += *query(i).add(t);
            }
        }
        for (i, (sum, leftover)) in sums.iter().zip(&leftover).enumerate() {
            let inv_sum = _mm512_set1_ps(1.0 / (sum + leftover));
            for c in (0..lp).step_by(16) {
                let p = query(i).add(c);
                _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), inv_sum));
            }
        }
    }

    /// `infer::exp_approx`, 16 at a time: the same operations in the same order.
    #[inline(always)]
    unsafe fn exp_approx(x: __m512) -> __m512 {
        const LOG2_E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0;
        let set = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(x, set(-87.0)), set(88.0));
        let n = _mm512_sub_ps(
            _mm512_add_ps(_mm512_mul_ps(x, set(LOG2_E)), set(ROUND)),
            set(ROUND),
        );
        let r = _mm512_sub_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, set(LN2_HI))),
            _mm512_mul_ps(n, set(LN2_LO)),
        );
        // 1 + r(1 + r(1/2 + r(1/6 + r(1/24 + r(1/120 + r/720))))), innermost first.
        let mut p = _mm512_mul_ps(r, set(1.0 / 720.0));
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0, 1.0] {
            p = _mm512_mul_ps(r, _mm512_add_ps(set(c), p));
        }
        let p = _mm512_add_ps(set(1.0), p);
        let exponent = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvttps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(exponent))
    }

    /// For each of Q queries i: out_i[..16·T] = Σ_j weight_i[j]·value_j, j in order from zero
    /// (value_j at `v + j·stride`, weight_i at `weights + i·lp`, out_i at `out + i·h`), as the
    /// references sum into a zeroed `out`.
    #[inline(always)]
    unsafe fn values<const Q: usize, const T: usize>(
        (weights, lp, len): (*const f32, usize, usize),
        (v, stride): (*const f32, usize),
        out: *mut f32,
        h: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; Q];
        for j in 0..len {
            let vj = v.add(j * stride);
            let value: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(vj.add(16 * t)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*weights.add(i * lp + j));
                for (acc, value) in acc.iter_mut().zip(&value) {
                    *acc = _mm512_add_ps(*acc, _mm512_mul_ps(w, *value));
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (t, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * h + 16 * t), *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-3, 3): scores large enough that the softmax is far from uniform.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        crate::test_support::random_floats(n, seed)
            .into_iter()
            .map(|x| 3.0 * x)
            .collect()
    }

    /// Every row length around the 16-key blocks, both orders, [CLS] alone or every query:
    /// the kernel this CPU picks gives the scalar reference's bytes.
    #[test]
    fn the_fast_kernel_gives_the_references_bytes() {
        for (h, heads) in [(64, 2), (64, 4), (128, 2), (96, 2), (24, 3)] {
            for len in [1, 2, 15, 16, 17, 31, 33, 64, 65, 70] {
                let s = 3;
                let qkv = random((s + len + 2) * 3 * h, (h * 1000 + len) as u64);
                for order in [ScoreOrder::DotLanes, ScoreOrder::ByKeys] {
                    for queries in [1, len] {
                        // Whatever `out` held is overwritten.
                        let mut fast = vec![f32::NAN; queries * h];
                        attend(order, &qkv, (h, heads), (s, len), &mut fast);
                        let mut reference = vec![0f32; queries * h];
                        match order {
                            ScoreOrder::DotLanes => {
                                attend_row(&qkv, h, heads, s, len, &mut reference)
                            }
                            ScoreOrder::ByKeys => {
                                attend_row_by_keys(&qkv, h, heads, s, len, &mut reference)
                            }
                        }
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&fast),
                            bits(&reference),
                            "h {h}, heads {heads}, len {len}, {order:?}, {queries} queries"
                        );
                        assert!(fast.iter().all(|x| x.is_finite()));
                    }
                }
            }
        }
    }

    /// The kernel is the one that ran above on a CPU with AVX-512 (else the test compared the
    /// reference with itself, which says nothing).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_cpus_run_the_kernel() {
        if is_x86_feature_detected!("avx512f") && !crate::portable_kernels_forced() {
            assert!(avx512::usable(32) && avx512::usable(64) && !avx512::usable(8));
        }
    }

    /// Each head's output is a convex combination of that head's values: with every value of
    /// head 0 equal to 1 and of head 1 equal to −2, the outputs are those numbers.
    #[test]
    fn outputs_are_averages_of_the_values() {
        let (h, heads, len) = (64, 2, 20);
        let mut qkv = random(len * 3 * h, 7);
        for t in 0..len {
            let v = &mut qkv[t * 3 * h + 2 * h..][..h];
            v[..32].fill(1.0);
            v[32..].fill(-2.0);
        }
        for order in [ScoreOrder::DotLanes, ScoreOrder::ByKeys] {
            let mut out = vec![0f32; len * h];
            attend(order, &qkv, (h, heads), (0, len), &mut out);
            for t in out.chunks(h) {
                assert!(t[..32].iter().all(|&x| (x - 1.0).abs() < 1e-5), "{order:?}");
                assert!(t[32..].iter().all(|&x| (x + 2.0).abs() < 1e-5), "{order:?}");
            }
        }
    }
}
