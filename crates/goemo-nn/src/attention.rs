//! Attention for scoring: each row of a packed batch over its own tokens, head by head.
//!
//! Two arithmetics, each defined by a scalar function here that is the reference:
//! - [`ScoreOrder::DotLanes`] ([`attend_row`]): f32 throughout, each score a [`dot`] (eight
//!   lanes, then their sum), the f32 encoder's order, whose bytes pipeline.lock records;
//! - [`ScoreOrder::Bf16Pairs`] ([`attend_row_bf16`]): the int8 encoder's, as OpenVINO runs
//!   attention in low precision: queries, keys, the softmax's weights and values rounded to
//!   bf16 and summed in pairs as `vdpbf16ps` sums them (crate::bf16: `(sum + odd·odd) +
//!   even·even`, each addition rounded, results below f32's smallest normal flushed); the
//!   softmax itself in f32. Half the instructions of an f32 sum per score and per output.
//!
//! The AVX-512 kernels do the same float operations in the same order on 16 keys (or 16
//! features) at a time, so each order gives its reference's bytes (a test checks it); they are
//! faster because the keys are laid out transposed once per row and every sum stays in a
//! register (the scalar loops kept the scores in memory: attention was a fifth of an int8
//! inference profile). The f32 kernel multiplies and adds in two instructions, never one fused
//! multiply-add, because the scalar order rounds twice.

use std::cell::RefCell;

use crate::bf16::{flush, pair, unpair, Bf16Kernel};
use crate::infer::{dot, exp_approx, lane_sum};

/// The arithmetic of a query's scores and its output (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScoreOrder {
    DotLanes,
    Bf16Pairs,
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
    if avx512::usable(order, h / heads) {
        // SAFETY: `usable` checked the CPU's features and the head width; the asserts above
        // the slices' sizes.
        return unsafe {
            match order {
                ScoreOrder::DotLanes => avx512::attend(qkv, (h, heads), (s, len), out),
                ScoreOrder::Bf16Pairs => avx512::attend_bf16(qkv, (h, heads), (s, len), out),
            }
        };
    }
    // The references add into `out`, from zero.
    out.fill(0.0);
    match order {
        ScoreOrder::DotLanes => attend_row_wide(qkv, h, heads, s, len, out),
        ScoreOrder::Bf16Pairs => attend_row_bf16_wide(qkv, h, heads, s, len, out),
    }
}

wide_fn!(fn attend_row_wide(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) => attend_row);
wide_fn!(fn attend_row_bf16_wide(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) => attend_row_bf16);

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

/// The reference of [`ScoreOrder::Bf16Pairs`] (`dh` even). A score: from zero, for each pair of
/// the head's features in order, `(score + q_odd·k_odd) + q_even·k_even`. The weights: the f32
/// softmax of [`softmax_weights`]. An output feature: from zero (`out` holds zeros), for each
/// pair of keys in order (a missing last odd key weighing zero), `(o + w_odd·v_odd) +
/// w_even·v_even`. Every operand rounded to bf16 first; each addition flushed as the
/// instruction flushes.
#[inline(always)]
fn attend_row_bf16(qkv: &[f32], h: usize, heads: usize, s: usize, len: usize, out: &mut [f32]) {
    let dh = h / heads;
    let token = |t: usize| &qkv[(s + t) * 3 * h..][..3 * h];
    // keys[c2 · len + j]: features 2·c2 and 2·c2 + 1 of key j.
    let mut keys = vec![0u32; h / 2 * len];
    for j in 0..len {
        let k = &token(j)[h..][..h];
        for (c2, two) in k.chunks_exact(2).enumerate() {
            keys[c2 * len + j] = pair(two[0], two[1]);
        }
    }
    let mut scores = vec![0f32; len];
    let zeros = vec![0f32; dh];
    for (qt, out_t) in out.chunks_mut(h).enumerate() {
        let q = &token(qt)[..h];
        for head in 0..heads {
            scores.fill(0.0);
            for p in 0..dh / 2 {
                let c2 = head * dh / 2 + p;
                let (qe, qo) = unpair(pair(q[2 * c2], q[2 * c2 + 1]));
                for (score, &k) in scores.iter_mut().zip(&keys[c2 * len..][..len]) {
                    let (ke, ko) = unpair(k);
                    *score = flush((*score + qo * ko) + qe * ke);
                }
            }
            softmax_weights(&mut scores);
            let o = &mut out_t[head * dh..][..dh];
            let value = |j: usize| {
                if j < len {
                    &token(j)[2 * h + head * dh..][..dh]
                } else {
                    &zeros[..]
                }
            };
            for j in (0..len).step_by(2) {
                let (we, wo) = unpair(pair(scores[j], scores.get(j + 1).copied().unwrap_or(0.0)));
                for ((o, &ve), &vo) in o.iter_mut().zip(value(j)).zip(value(j + 1)) {
                    let (ve, vo) = unpair(pair(ve, vo));
                    *o = flush((*o + wo * vo) + we * ve);
                }
            }
        }
    }
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
    softmax_weights(probs);
    for (j, &w) in probs.iter().enumerate() {
        let v = value(j);
        let o = &mut out_t[at..][..v.len()];
        o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}

/// Scores to softmax weights in place: exp_approx of each minus their max, times 1 / their
/// [`lane_sum`].
#[inline(always)]
fn softmax_weights(probs: &mut [f32]) {
    let max = probs.iter().fold(f32::NEG_INFINITY, |m, &p| m.max(p));
    probs.iter_mut().for_each(|p| *p = exp_approx(*p - max));
    let inv_sum = 1.0 / lane_sum(probs);
    probs.iter_mut().for_each(|p| *p *= inv_sum);
}

/// Queries the AVX-512 kernels take at once (per head).
const QUERIES: usize = 4;

thread_local! {
    /// The AVX-512 kernels' f32 scratch (transposed keys, scores), kept per thread between rows.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The bf16 kernel's pairs (keys, values, queries, weights), kept per thread between rows.
    static PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Bf16Kernel, ScoreOrder, PAIRS, QUERIES, SCRATCH};

    /// Head widths the kernels handle: 16, 32, 48 or 64 features (one to four registers).
    const MAX_HEAD_REGS: usize = 4;

    /// Whether this CPU and head width can take `order`'s kernel (not under
    /// `GOEMO_KERNELS=portable`, which runs the scalar references: same bytes, slower). The
    /// bf16 kernel needs AVX-512 BF16 (and BW for its conversions).
    pub(super) fn usable(order: ScoreOrder, dh: usize) -> bool {
        let features = match order {
            ScoreOrder::DotLanes => is_x86_feature_detected!("avx512f"),
            ScoreOrder::Bf16Pairs => Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16,
        };
        dh.is_multiple_of(16)
            && dh / 16 <= MAX_HEAD_REGS
            && !crate::portable_kernels_forced()
            && features
    }

    /// [`ScoreOrder::DotLanes`]: see [`super::attend`]. Caller: the CPU has avx512f, `dh` is a
    /// multiple of 16 up to 64, `qkv` holds tokens `s..s + len` and `out` one or `len` tokens × h.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend(
        qkv: &[f32],
        (h, heads): (usize, usize),
        (s, len): (usize, usize),
        out: &mut [f32],
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
        let stride = 3 * h;
        transpose(
            qkv.as_ptr().add(s * stride + h),
            stride,
            h,
            len,
            lp,
            keys.as_mut_ptr(),
        );
        let queries = out.len() / h;
        for head in 0..heads {
            let keys = keys.as_ptr().add(head * dh * lp);
            let v = qkv.as_ptr().add(s * stride + 2 * h + head * dh);
            // Up to QUERIES queries at once: they share each load of a value, and their sums
            // are independent chains of adds (2-3% faster end to end than one query at a time).
            let mut first = 0;
            while first < queries {
                let n = (queries - first).min(QUERIES);
                let q = qkv.as_ptr().add((s + first) * stride + head * dh);
                for i in 0..n {
                    let p = probs.as_mut_ptr().add(i * lp);
                    scores_dot_lanes(q.add(i * stride), keys, dh, lp, p);
                }
                let p = probs.as_mut_ptr();
                match n {
                    1 => softmax_weights::<1>(p, lp, len),
                    2 => softmax_weights::<2>(p, lp, len),
                    3 => softmax_weights::<3>(p, lp, len),
                    _ => softmax_weights::<4>(p, lp, len),
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

    /// [`ScoreOrder::Bf16Pairs`]: see [`super::attend`]. Caller: the CPU has avx512f, avx512bw
    /// and avx512bf16, `dh` is a multiple of 16 up to 64, `qkv` holds tokens `s..s + len` and
    /// `out` one or `len` tokens × h.
    ///
    /// Per row, once: the keys as pairs of features, transposed (pair c2 of keys j..j + 16 is
    /// one register); the values as pairs of consecutive keys (features c..c + 16 of keys 2jp
    /// and 2jp + 1 are one register); the queries as pairs of features. Per head and group of
    /// queries: scores by `vdpbf16ps` (a broadcast query pair against 16 keys), the f32
    /// softmax, its weights rounded to pairs, outputs by `vdpbf16ps` (a broadcast weight pair
    /// against 16 features).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn attend_bf16(
        qkv: &[f32],
        (h, heads): (usize, usize),
        (s, len): (usize, usize),
        out: &mut [f32],
    ) {
        let (dh, half, stride) = (h / heads, h / 2, 3 * h);
        let lp = len.div_ceil(16) * 16;
        let key_pairs = len.div_ceil(2);
        let queries = out.len() / h;
        let token = |t: usize| &qkv[(s + t) * stride..][..stride];

        let mut pairs = PAIRS.with(|c| c.take());
        let sizes = [
            len * half,
            half * lp,
            key_pairs * h,
            queries * half,
            QUERIES * lp / 2,
        ];
        let need: usize = sizes.iter().sum();
        if pairs.len() < need {
            pairs.resize(need, 0);
        }
        let (rows, rest) = pairs[..need].split_at_mut(sizes[0]);
        let (keys, rest) = rest.split_at_mut(sizes[1]);
        let (values, rest) = rest.split_at_mut(sizes[2]);
        let (query_pairs, weight_pairs) = rest.split_at_mut(sizes[3]);

        let mut scratch = SCRATCH.with(|c| c.take());
        let need = QUERIES * lp + h;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (probs, zeros) = scratch[..need].split_at_mut(QUERIES * lp);
        zeros.fill(0.0);

        for j in 0..len {
            pairs_of(
                token(j)[h..][..h].as_ptr(),
                h,
                rows[j * half..][..half].as_mut_ptr(),
            );
        }
        // Pairs move as 32-bit lanes: the transposition only shuffles bits.
        transpose(
            rows.as_ptr() as *const f32,
            half,
            half,
            len,
            lp,
            keys.as_mut_ptr() as *mut f32,
        );
        // Word 2i from word i (even i), word 2i + 1 from word 16 + i (odd i).
        let order: [u16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as u16);
        let order = _mm512_loadu_si512(order.as_ptr() as *const _);
        for (jp, dst) in values.chunks_exact_mut(h).enumerate() {
            let even = token(2 * jp)[2 * h..].as_ptr();
            let odd = if 2 * jp + 1 < len {
                token(2 * jp + 1)[2 * h..].as_ptr()
            } else {
                zeros.as_ptr()
            };
            for c in (0..h).step_by(16) {
                let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(odd.add(c)),
                    _mm512_loadu_ps(even.add(c)),
                ));
                let pairs = _mm512_permutexvar_epi16(order, halves);
                _mm512_storeu_si512(dst.as_mut_ptr().add(c) as *mut _, pairs);
            }
        }
        for (t, dst) in query_pairs.chunks_exact_mut(half).enumerate() {
            pairs_of(token(t).as_ptr(), h, dst.as_mut_ptr());
        }

        for head in 0..heads {
            let keys = keys.as_ptr().add(head * dh / 2 * lp);
            let values = values.as_ptr().add(head * dh);
            let mut first = 0;
            while first < queries {
                let n = (queries - first).min(QUERIES);
                let q = query_pairs.as_ptr().add(first * half + head * dh / 2);
                let p = probs.as_mut_ptr();
                match n {
                    1 => score_pairs::<1>(q, half, keys, dh / 2, lp, p),
                    2 => score_pairs::<2>(q, half, keys, dh / 2, lp, p),
                    3 => score_pairs::<3>(q, half, keys, dh / 2, lp, p),
                    _ => score_pairs::<4>(q, half, keys, dh / 2, lp, p),
                }
                match n {
                    1 => softmax_weights::<1>(p, lp, len),
                    2 => softmax_weights::<2>(p, lp, len),
                    3 => softmax_weights::<3>(p, lp, len),
                    _ => softmax_weights::<4>(p, lp, len),
                }
                for i in 0..n {
                    let weights = &mut probs[i * lp..][..lp];
                    // The padding keys weigh nothing (a missing odd key included).
                    weights[len..].fill(0.0);
                    pairs_of(
                        weights.as_ptr(),
                        lp,
                        weight_pairs[i * lp / 2..].as_mut_ptr(),
                    );
                }
                let o = out.as_mut_ptr().add(first * h + head * dh);
                let weights = (weight_pairs.as_ptr(), lp / 2, key_pairs);
                macro_rules! values_for {
                    ($($n:literal, $t:literal);*) => {
                        match (n, dh / 16) {
                            $(($n, $t) => value_pairs::<$n, $t>(weights, (values, h), o, h),)*
                            _ => unreachable!("1 to 4 queries, 1 to 4 registers a head"),
                        }
                    };
                }
                values_for!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4;
                            3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4);
                first += n;
            }
        }
        PAIRS.with(|c| c.replace(pairs));
        SCRATCH.with(|c| c.replace(scratch));
    }

    /// dst[p] = the pair (src[2p], src[2p + 1]) for the first `floats` / 2 pairs (`floats` a
    /// multiple of 16): `crate::bf16::pair`'s bits, by `vcvtne2ps2bf16` and `vcvtneps2bf16`,
    /// which round as `round_to_bf16` does (crate::bf16's tests).
    #[inline(always)]
    unsafe fn pairs_of(src: *const f32, floats: usize, dst: *mut u32) {
        debug_assert!(floats.is_multiple_of(16));
        // 32 floats a conversion (`vcvtne2ps2bf16`: the first 16 in the low half), then 16.
        let mut c = 0;
        while c + 32 <= floats {
            let words: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(src.add(c + 16)),
                _mm512_loadu_ps(src.add(c)),
            ));
            _mm512_storeu_si512(dst.add(c / 2) as *mut _, words);
            c += 32;
        }
        if c < floats {
            let words: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(src.add(c))));
            _mm256_storeu_si256(dst.add(c / 2) as *mut __m256i, words);
        }
    }

    /// out[c·lp + j] = src[j·row_stride + c] for the first `len` rows and `cols` columns: 8
    /// rows × 8 columns at a time transposed in registers (LLVM had turned the plain loop into
    /// scatters, a quarter of the kernel's time on these cores); a last block of fewer than 8
    /// rows is padded with zeros, columns past it up to `lp` are left as they were. `cols` is
    /// a multiple of 8, `lp` of 16 and at least `len`.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose(
        src: *const f32,
        row_stride: usize,
        cols: usize,
        len: usize,
        lp: usize,
        out: *mut f32,
    ) {
        debug_assert!(cols.is_multiple_of(8) && lp >= len.div_ceil(8) * 8);
        let row = |j: usize| src.add(j * row_stride);
        for j0 in (0..len).step_by(8) {
            for c0 in (0..cols).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|a| {
                    if j0 + a < len {
                        _mm256_loadu_ps(row(j0 + a).add(c0))
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

    /// For each of Q queries (query i's pairs at `q + i·stride`): scores[i·lp + j] = the
    /// `vdpbf16ps` chain over the head's `pairs` feature pairs in order, from zero
    /// (`attend_row_bf16`'s score), 16 keys a register, up to four registers of keys a pass.
    #[inline(always)]
    unsafe fn score_pairs<const Q: usize>(
        q: *const u32,
        stride: usize,
        keys: *const u32,
        pairs: usize,
        lp: usize,
        scores: *mut f32,
    ) {
        let blocks = lp / 16;
        let mut b = 0;
        while b < blocks {
            match blocks - b {
                1 => score_pairs_block::<Q, 1>(q, stride, keys, pairs, lp, b, scores),
                2 => score_pairs_block::<Q, 2>(q, stride, keys, pairs, lp, b, scores),
                3 => score_pairs_block::<Q, 3>(q, stride, keys, pairs, lp, b, scores),
                _ => score_pairs_block::<Q, 4>(q, stride, keys, pairs, lp, b, scores),
            }
            b += (blocks - b).min(4);
        }
    }

    #[inline(always)]
    unsafe fn score_pairs_block<const Q: usize, const G: usize>(
        q: *const u32,
        stride: usize,
        keys: *const u32,
        pairs: usize,
        lp: usize,
        b: usize,
        scores: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); G]; Q];
        for p in 0..pairs {
            let row = keys.add(p * lp + b * 16);
            // Plain loops, not `array::from_fn`: its closure does not inherit the target
            // features, and LLVM had left it (and the intrinsics in it) out of line.
            let mut k = [_mm512_setzero_si512(); G];
            for (g, k) in k.iter_mut().enumerate() {
                *k = _mm512_loadu_si512(row.add(16 * g) as *const _);
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let qp: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*q.add(i * stride + p) as i32));
                for (acc, k) in acc.iter_mut().zip(&k) {
                    *acc = _mm512_dpbf16_ps(*acc, qp, std::mem::transmute::<__m512i, __m512bh>(*k));
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (g, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(scores.add(i * lp + (b + g) * 16), *acc);
            }
        }
    }

    /// For each of Q queries i: out_i[..16·T] = the `vdpbf16ps` chain over the key pairs in
    /// order, from zero, of weight pair jp (at `weights + i·w_stride + jp`) against value pair
    /// jp (at `values + jp·v_stride`): `attend_row_bf16`'s output.
    #[inline(always)]
    unsafe fn value_pairs<const Q: usize, const T: usize>(
        (weights, w_stride, key_pairs): (*const u32, usize, usize),
        (values, v_stride): (*const u32, usize),
        out: *mut f32,
        h: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; Q];
        for jp in 0..key_pairs {
            let row = values.add(jp * v_stride);
            let mut v = [_mm512_setzero_si512(); T];
            for (t, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(row.add(16 * t) as *const _);
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let w: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*weights.add(i * w_stride + jp) as i32));
                for (acc, v) in acc.iter_mut().zip(&v) {
                    *acc = _mm512_dpbf16_ps(*acc, w, std::mem::transmute::<__m512i, __m512bh>(*v));
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (t, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * h + 16 * t), *acc);
            }
        }
    }

    /// scores[j] = `dot(q, key j)` (infer::dot: lane i sums features i, i + 8, … in order from
    /// 0; then the eight lanes in order; then the empty remainder, dh being a multiple of 16),
    /// for 16 keys a register.
    #[inline(always)]
    unsafe fn scores_dot_lanes(
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
        let mut maxes = [_mm512_setzero_ps(); Q];
        for (i, max) in maxes.iter_mut().enumerate() {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in (0..last).step_by(16) {
                m = _mm512_max_ps(m, _mm512_loadu_ps(query(i).add(c)));
            }
            let m = _mm512_mask_max_ps(m, tail, m, _mm512_loadu_ps(query(i).add(last)));
            *max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        }
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
            let mut value = [_mm512_setzero_ps(); T];
            for (t, value) in value.iter_mut().enumerate() {
                *value = _mm512_loadu_ps(vj.add(16 * t));
            }
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

    /// Every row length around the 16-key blocks (odd and even, for the bf16 key pairs), both
    /// orders, [CLS] alone or every query: the kernel this CPU picks gives the scalar
    /// reference's bytes.
    #[test]
    fn the_fast_kernel_gives_the_references_bytes() {
        for (h, heads) in [(64, 2), (64, 4), (128, 2), (96, 2), (24, 3), (384, 12)] {
            for len in [1, 2, 3, 15, 16, 17, 31, 33, 64, 65, 70] {
                let s = 3;
                let qkv = random((s + len + 2) * 3 * h, (h * 1000 + len) as u64);
                for order in [ScoreOrder::DotLanes, ScoreOrder::Bf16Pairs] {
                    for queries in [1, len] {
                        // Whatever `out` held is overwritten.
                        let mut fast = vec![f32::NAN; queries * h];
                        attend(order, &qkv, (h, heads), (s, len), &mut fast);
                        let mut reference = vec![0f32; queries * h];
                        match order {
                            ScoreOrder::DotLanes => {
                                attend_row(&qkv, h, heads, s, len, &mut reference)
                            }
                            ScoreOrder::Bf16Pairs => {
                                attend_row_bf16(&qkv, h, heads, s, len, &mut reference)
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

    /// The kernels are the ones that ran above on a CPU with AVX-512 (else the test compared a
    /// reference with itself, which says nothing).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_cpus_run_the_kernel() {
        if is_x86_feature_detected!("avx512f") && !crate::portable_kernels_forced() {
            let order = ScoreOrder::DotLanes;
            assert!(avx512::usable(order, 32) && avx512::usable(order, 64));
            assert!(!avx512::usable(order, 8));
        }
        if Bf16Kernel::detect() == Bf16Kernel::Avx512Bf16 {
            assert!(avx512::usable(ScoreOrder::Bf16Pairs, 32));
        }
    }

    /// Each head's output is a convex combination of that head's values: with every value of
    /// head 0 equal to 1 and of head 1 equal to −2, the outputs are those numbers (in bf16, up to
    /// the rounding of the weights: each within 2⁻⁹ of its f32 value, so their sum within 2⁻⁹
    /// of one).
    #[test]
    fn outputs_are_averages_of_the_values() {
        let (h, heads, len) = (64, 2, 21);
        let mut qkv = random(len * 3 * h, 7);
        for t in 0..len {
            let v = &mut qkv[t * 3 * h + 2 * h..][..h];
            v[..32].fill(1.0);
            v[32..].fill(-2.0);
        }
        for (order, tolerance) in [(ScoreOrder::DotLanes, 1e-5), (ScoreOrder::Bf16Pairs, 4e-3)] {
            let mut out = vec![0f32; len * h];
            attend(order, &qkv, (h, heads), (0, len), &mut out);
            for t in out.chunks(h) {
                assert!(
                    t[..32].iter().all(|&x| (x - 1.0).abs() < tolerance),
                    "{order:?}"
                );
                assert!(
                    t[32..].iter().all(|&x| (x + 2.0).abs() < 2.0 * tolerance),
                    "{order:?}"
                );
            }
        }
    }

    /// bf16 attention stays near f32's: on MiniLM's shape (12 heads of 32) and random keys and
    /// values in [-3, 3), queries too but scaled by 1/√32 as the encoder scales them, every
    /// output within 0.05 of the f32 kernel's and on average within 0.005 (measured: 0.030–0.033
    /// and 0.0034–0.0037 for 5, 19 and 40 tokens; operands carry 8 significant bits, 2⁻⁹
    /// relative each, and a score sums 32 products of them).
    #[test]
    fn bf16_outputs_are_near_f32() {
        let (h, heads) = (384, 12);
        for len in [5, 19, 40] {
            let mut qkv = random(len * 3 * h, len as u64);
            for token in qkv.chunks_mut(3 * h) {
                token[..h].iter_mut().for_each(|q| *q /= 32f32.sqrt());
            }
            let mut exact = vec![0f32; len * h];
            let mut low = vec![0f32; len * h];
            attend(ScoreOrder::DotLanes, &qkv, (h, heads), (0, len), &mut exact);
            attend(ScoreOrder::Bf16Pairs, &qkv, (h, heads), (0, len), &mut low);
            let diffs: Vec<f32> = exact.iter().zip(&low).map(|(a, b)| (a - b).abs()).collect();
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            let max = diffs.iter().fold(0f32, |m, &d| m.max(d));
            assert!(
                max < 0.05 && mean < 0.005,
                "len {len}: max {max}, mean {mean}"
            );
            assert!(max > 0.0, "bf16 rounds something");
        }
    }
}
