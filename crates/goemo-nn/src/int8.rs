//! Int8 matrix products for inference: weights quantized once per output channel (symmetric,
//! int8), activations per row as they come (dynamic, u8 over the row's own range with a zero
//! point of its own), products summed exactly in i32 and scaled back to f32.
//!
//! Activations are asymmetric because the rows are: GELU's outputs lie in [−0.17, max], and a
//! scale of max |x| / 127 around a fixed zero point of 128 would leave half of the 256 codes
//! unused, doubling the step (the error) of the largest product, the feed-forward's second.
//!
//! The kernel uses AVX-512 VNNI (`vpdpbusd`: 64 u8×i8 products summed into 16 i32 lanes per
//! instruction) where the CPU has it, and a portable loop elsewhere. Integer sums are exact, so
//! both give the same i32 and the same f32 after scaling: the output bytes do not depend on
//! which path ran, nor on the thread count.
//!
//! Layout (the one VNNI reads): the weight matrix, (outputs, inputs) as HF stores it, is padded
//! to a multiple of 16 outputs and 4 inputs and packed in blocks of 16 outputs; within a block,
//! for each group of 4 inputs, 16 × 4 bytes: output j's 4 weights side by side.

use rayon::prelude::*;

/// Outputs per packed block: one 512-bit register of i32 sums.
const LANES: usize = 16;
/// Rows of the activation matrix one kernel call holds in registers.
const ROW_TILE: usize = 4;
/// Blocks of 16 outputs one kernel call holds: 4 × 4 registers of sums, 4 of weights and one
/// broadcast activation (21 of 32). Wide rather than tall because every row costs a broadcast
/// per group of 4 inputs and every block a plain load: 8 rows × 2 blocks (8 broadcasts per 16
/// `vpdpbusd`) ran 10% slower end to end on these cores, and 6 × 4, 5 × 4, 4 × 6, 2 × 8, 3 × 4 and
/// 7 × 3 slower still or no faster.
const BLOCK_TILE: usize = 4;
/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Which kernel a product uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 VNNI (x86-64 with avx512f, avx512bw and avx512vnni).
    Vnni,
    /// Plain Rust, for any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs (the portable one under `GOEMO_KERNELS=portable`).
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if !crate::portable_kernels_forced()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return Kernel::Vnni;
        }
        Kernel::Portable
    }
}

/// What [`QuantizedWeight::product`] adds the product to, row by row.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// What `dst` holds.
    Dst,
    /// The bias (one per output); `dst`'s contents are not read.
    Bias(&'a [f32]),
    /// What `dst` holds plus the bias (a residual connection), summed first.
    DstPlusBias(&'a [f32]),
}

/// A dense layer's weight, quantized and packed.
pub struct QuantizedWeight {
    outputs: usize,
    inputs: usize,
    /// `inputs` rounded up to a multiple of 4.
    k4: usize,
    /// Blocks of [`LANES`] outputs × `k4` inputs, as described in the module docs.
    packed: Vec<i8>,
    /// Per output: the scale that turns an int8 weight back into f32.
    scales: Vec<f32>,
    /// Per output: the sum of its int8 weights; a row's zero point times it is what that
    /// zero point adds to the row's sums.
    weight_sums: Vec<i32>,
}

impl QuantizedWeight {
    /// Quantize `weight` ((outputs, inputs) row-major): per output, scale = max |w| / 127.
    pub fn new(weight: &[f32], outputs: usize, inputs: usize) -> QuantizedWeight {
        assert_eq!(weight.len(), outputs * inputs, "weight size");
        let k4 = padded_width(inputs);
        let blocks = outputs.div_ceil(LANES);
        let mut packed = vec![0i8; blocks * LANES * k4];
        let mut scales = vec![0f32; outputs];
        let mut sums = vec![0i32; outputs];
        for o in 0..outputs {
            let row = &weight[o * inputs..][..inputs];
            let max = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            scales[o] = scale;
            let (block, lane) = (o / LANES, o % LANES);
            for (k, &w) in row.iter().enumerate() {
                let q = (w / scale).round().clamp(-127.0, 127.0) as i8;
                sums[o] += q as i32;
                packed[block * LANES * k4 + (k / 4) * LANES * 4 + lane * 4 + k % 4] = q;
            }
        }
        QuantizedWeight {
            outputs,
            inputs,
            k4,
            packed,
            scales,
            weight_sums: sums,
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `dst` (rows × outputs) += `x` (rows × inputs) · weightᵀ, with `x` quantized per row.
    pub fn accumulate(&self, x: &[f32], dst: &mut [f32], kernel: Kernel) {
        self.product(x, dst, Base::Dst, kernel)
    }

    /// `dst` (rows × outputs) = `base` + `x` (rows × inputs) · weightᵀ, with `x` quantized
    /// per row. The VNNI kernel adds the base in registers (no pass of its own over `dst`).
    pub fn product(&self, x: &[f32], dst: &mut [f32], base: Base, kernel: Kernel) {
        let rows = x.len() / self.inputs.max(1);
        assert_eq!(x.len(), rows * self.inputs, "input width");
        let mut q = QuantizedRows::default();
        q.quantize(x, self.inputs, kernel);
        self.product_of_quantized(&q, dst, base, kernel)
    }

    /// [`QuantizedWeight::product`] of rows quantized beforehand (by [`QuantizedRows`]: the
    /// same bytes as quantizing here), so a pass that already holds each row (LayerNorm, the
    /// activation) quantizes it while it is in cache.
    pub fn product_of_quantized(
        &self,
        x: &QuantizedRows,
        dst: &mut [f32],
        base: Base,
        kernel: Kernel,
    ) {
        assert_eq!(dst.len(), x.rows() * self.outputs, "output size");
        self.product_of_quantized_strided(x, dst, self.outputs, base, kernel)
    }

    /// [`QuantizedWeight::product_of_quantized`] into rows `stride` apart: row r's outputs go
    /// to `dst[r·stride..][..outputs]` and the rest of each row is left as it was (so a layer
    /// can write its part of a wider matrix in place). The same bytes as a product into rows
    /// of their own.
    pub fn product_of_quantized_strided(
        &self,
        x: &QuantizedRows,
        dst: &mut [f32],
        stride: usize,
        base: Base,
        kernel: Kernel,
    ) {
        assert_eq!(x.width, self.inputs, "input width");
        assert_eq!(x.bytes.len(), x.rows() * self.k4, "quantized rows");
        if let Base::Bias(b) | Base::DstPlusBias(b) = base {
            assert_eq!(b.len(), self.outputs, "bias size");
        }
        assert!(stride >= self.outputs, "row stride below the outputs");
        if x.rows() == 0 || self.outputs == 0 {
            return;
        }
        let needed = (x.rows() - 1) * stride + self.outputs;
        assert!(dst.len() >= needed, "output size");
        // Each task's rows; the last row of the last task needs only its outputs.
        dst[..needed]
            .par_chunks_mut(ROWS_PER_TASK * stride)
            .zip(x.bytes.par_chunks(ROWS_PER_TASK * self.k4))
            .zip(x.scales.par_chunks(ROWS_PER_TASK))
            .zip(x.zero_points.par_chunks(ROWS_PER_TASK))
            .for_each(|(((dst, qx), scales), zero_points)| {
                self.product_of_task(
                    qx,
                    RowScales {
                        scales,
                        zero_points,
                    },
                    (dst, stride),
                    base,
                    kernel,
                )
            });
    }

    /// One task's rows: `qx` (m × k4 u8) with their scales, into `dst`'s m rows `stride`
    /// apart (outputs values each; the last may end there).
    fn product_of_task(
        &self,
        qx: &[u8],
        rows: RowScales,
        (dst, stride): (&mut [f32], usize),
        base: Base,
        kernel: Kernel,
    ) {
        let (k4, n, m) = (self.k4, self.outputs, rows.scales.len());
        debug_assert!(dst.len() >= (m - 1) * stride + n);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni {
            assert_eq!(
                Kernel::detect(),
                Kernel::Vnni,
                "this CPU has no AVX-512 VNNI"
            );
            let w = vnni::Weights {
                packed: &self.packed,
                k4,
                outputs: n,
                weight_sums: &self.weight_sums,
                scales: &self.scales,
                base,
            };
            // SAFETY: the CPU has the features (checked above); `qx` holds m × k4
            // activations, `rows` m scales and zero points, and `dst` m rows `stride` apart.
            return unsafe { vnni::products_into(qx, rows, &w, (dst, stride)) };
        }
        for row in dst.chunks_mut(stride).map(|row| &mut row[..n]) {
            match base {
                Base::Dst => {}
                Base::Bias(b) => row.copy_from_slice(b),
                Base::DstPlusBias(b) => row.iter_mut().zip(b).for_each(|(o, b)| *o += b),
            }
        }
        let width = self.outputs.div_ceil(LANES) * LANES;
        let mut acc = vec![0i32; m * width];
        portable_products(qx, m, k4, &self.packed, &mut acc);
        for (((out, acc), &sx), &zx) in dst
            .chunks_mut(stride)
            .map(|row| &mut row[..n])
            .zip(acc.chunks(width))
            .zip(rows.scales)
            .zip(rows.zero_points)
        {
            self.scale_into(out, &acc[..n], sx, zx);
        }
    }

    /// `out[o]` += (acc[o] − zx · weight sum[o]) · (sx · scale[o]): one row (scale `sx`, zero
    /// point `zx`) back to f32. The VNNI kernel rounds the same way (a multiply, then an add;
    /// no fused multiply-add).
    fn scale_into(&self, out: &mut [f32], acc: &[i32], sx: f32, zx: i32) {
        for (((o, &a), &ws), &s) in out
            .iter_mut()
            .zip(acc)
            .zip(&self.weight_sums)
            .zip(&self.scales)
        {
            *o += (a - zx * ws) as f32 * (sx * s);
        }
    }
}

/// Rows of activations as the int8 products read them: each row as u8 over its own range
/// ([`RowQuantizer`]), padded to a multiple of 4 bytes with its zero point, with its scale and
/// zero point. Buffers are kept between uses.
#[derive(Debug, Default)]
pub struct QuantizedRows {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
    /// Values per row before padding.
    width: usize,
}

impl QuantizedRows {
    pub fn rows(&self) -> usize {
        self.scales.len()
    }

    /// Copy the rows at `indices`, in that order, as they are (bytes, scales, zero points).
    pub fn select(&self, indices: impl IntoIterator<Item = usize>) -> QuantizedRows {
        let k4 = padded_width(self.width);
        let mut out = QuantizedRows {
            width: self.width,
            ..QuantizedRows::default()
        };
        for r in indices {
            out.bytes.extend_from_slice(&self.bytes[r * k4..][..k4]);
            out.scales.push(self.scales[r]);
            out.zero_points.push(self.zero_points[r]);
        }
        out
    }

    /// Quantize every row of `x` (rows of `width`), rows in parallel.
    pub fn quantize(&mut self, x: &[f32], width: usize, kernel: Kernel) {
        let slots = self.slots(x.len(), width, kernel);
        x.par_chunks(width.max(1))
            .zip(slots)
            .for_each(|(row, slot)| slot.fill(row, kernel));
    }

    /// `prepare` each row of `x` (rows of `width`) in place, then quantize it while it is in
    /// cache (a pass that writes an int8 layer's input: LayerNorm, the activation); rows in
    /// parallel.
    pub fn prepare_and_quantize(
        &mut self,
        x: &mut [f32],
        width: usize,
        kernel: Kernel,
        prepare: impl Fn(&mut [f32]) + Sync,
    ) {
        let slots = self.slots(x.len(), width, kernel);
        x.par_chunks_mut(width.max(1))
            .zip(slots)
            .for_each(|(row, slot)| {
                prepare(row);
                slot.fill(row, kernel);
            });
    }

    /// Room for the rows of `values` values of `width`: one slot per row. Panics unless this
    /// CPU runs `kernel` (what makes [`RowSlot::fill`] safe).
    fn slots(&mut self, values: usize, width: usize, kernel: Kernel) -> Vec<RowSlot<'_>> {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni {
            assert!(
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
                "this CPU has no AVX-512"
            );
        }
        let rows = values / width.max(1);
        let k4 = padded_width(width);
        self.width = width;
        self.bytes.resize(rows * k4, 0);
        self.scales.resize(rows, 0.0);
        self.zero_points.resize(rows, 0);
        self.bytes
            .chunks_mut(k4.max(1))
            .zip(self.scales.iter_mut())
            .zip(self.zero_points.iter_mut())
            .take(rows)
            .map(|((bytes, scale), zero_point)| RowSlot {
                bytes,
                scale,
                zero_point,
            })
            .collect()
    }
}

/// Bytes a row of `width` values takes in the packed layouts: a multiple of 4 (one
/// `vpdpbusd` group).
fn padded_width(width: usize) -> usize {
    width.div_ceil(4) * 4
}

/// Where one quantized row goes.
struct RowSlot<'a> {
    bytes: &'a mut [u8],
    scale: &'a mut f32,
    zero_point: &'a mut i32,
}

impl RowSlot<'_> {
    /// `row` as u8 (the bytes past it, up to the next multiple of 4, set to the zero point).
    /// Only through [`QuantizedRows::slots`], which checked the CPU for `kernel`.
    fn fill(self, row: &[f32], kernel: Kernel) {
        let k = row.len();
        assert!(
            self.bytes.len() >= k && self.bytes.len() < k + 4,
            "quantized row size"
        );
        let (lo, hi) = match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `QuantizedRows::slots` checked that this CPU has the features these
            // functions are compiled for.
            Kernel::Vnni => unsafe { vnni::range(row) },
            _ => range(row),
        };
        let q = RowQuantizer::new(lo, hi);
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Vnni => unsafe { vnni::quantize_row(row, &mut self.bytes[..k], q) },
            _ => q.quantize(row, &mut self.bytes[..k]),
        }
        self.bytes[k..].fill(q.zero_point as u8);
        *self.scale = q.scale;
        *self.zero_point = q.zero_point;
    }
}

/// The smallest and largest value of a row, with 0 always inside (so the zero point is a
/// code, and a row of zeros is exact).
fn range(row: &[f32]) -> (f32, f32) {
    row.iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// How one row maps to u8: x ≈ scale · (code − zero point), with the row's range [lo, hi]
/// spread over the 256 codes. Codes round half to even, as the vector conversion does.
#[derive(Debug, Clone, Copy)]
struct RowQuantizer {
    scale: f32,
    /// 1 / scale, multiplied rather than divided by.
    inv: f32,
    zero_point: i32,
}

impl RowQuantizer {
    fn new(lo: f32, hi: f32) -> RowQuantizer {
        let span = hi - lo;
        let scale = if span > 0.0 { span / 255.0 } else { 1.0 };
        let inv = 1.0 / scale;
        let zero_point = (-lo * inv).round_ties_even().clamp(0.0, 255.0) as i32;
        RowQuantizer {
            scale,
            inv,
            zero_point,
        }
    }

    /// The code of one value.
    #[inline]
    fn code(&self, v: f32) -> u8 {
        ((v * self.inv).round_ties_even() as i32 + self.zero_point).clamp(0, 255) as u8
    }

    fn quantize(&self, row: &[f32], out: &mut [u8]) {
        for (d, &v) in out.iter_mut().zip(row) {
            *d = self.code(v);
        }
    }
}

/// A task's rows' scales and zero points.
#[derive(Clone, Copy)]
struct RowScales<'a> {
    scales: &'a [f32],
    zero_points: &'a [i32],
}

fn portable_products(qx: &[u8], m: usize, k4: usize, packed: &[i8], acc: &mut [i32]) {
    let blocks = packed.len() / (LANES * k4);
    let width = blocks * LANES;
    for r in 0..m {
        let a = &qx[r * k4..][..k4];
        for b in 0..blocks {
            let w = &packed[b * LANES * k4..][..LANES * k4];
            let mut sums = [0i32; LANES];
            for g in 0..k4 / 4 {
                for (lane, s) in sums.iter_mut().enumerate() {
                    for t in 0..4 {
                        *s += a[g * 4 + t] as i32 * w[g * LANES * 4 + lane * 4 + t] as i32;
                    }
                }
            }
            acc[r * width + b * LANES..][..LANES].copy_from_slice(&sums);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Base, RowQuantizer, RowScales, BLOCK_TILE, LANES, ROW_TILE};

    /// `super::range`, 16 values at a time (min and max are exact: the same pair).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn range(row: &[f32]) -> (f32, f32) {
        let n = row.len() / 16 * 16;
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for c in (0..n).step_by(16) {
            let v = _mm512_loadu_ps(row.as_ptr().add(c));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        row[n..].iter().fold(
            (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi)),
            |(lo, hi), &v| (lo.min(v), hi.max(v)),
        )
    }

    /// `RowQuantizer::quantize`, 16 values at a time: the same bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn quantize_row(row: &[f32], out: &mut [u8], q: RowQuantizer) {
        let n = row.len() / 16 * 16;
        let (inv, zero, lo, hi) = (
            _mm512_set1_ps(q.inv),
            _mm512_set1_epi32(q.zero_point),
            _mm512_setzero_si512(),
            _mm512_set1_epi32(255),
        );
        for c in (0..n).step_by(16) {
            let v = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr().add(c)), inv);
            // Round to nearest, ties to even (the default rounding mode), then the zero point.
            let i = _mm512_add_epi32(_mm512_cvtps_epi32(v), zero);
            let bytes = _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(i, lo), hi));
            _mm_storeu_si128(out.as_mut_ptr().add(c) as *mut __m128i, bytes);
        }
        q.quantize(&row[n..], &mut out[n..]);
    }

    /// A quantized weight as the kernel reads it.
    pub(super) struct Weights<'a> {
        /// Blocks of 16 outputs × `k4` inputs (the module docs' layout).
        pub(super) packed: &'a [i8],
        pub(super) k4: usize,
        pub(super) outputs: usize,
        pub(super) weight_sums: &'a [i32],
        pub(super) scales: &'a [f32],
        pub(super) base: Base<'a>,
    }

    /// `dst` (m × outputs) += the products of `qx` (m × k4, u8) and the weights, each sum
    /// scaled back to f32 in registers as `QuantizedWeight::scale_into` does (the same bytes):
    /// 4 rows × 4 blocks of 16 outputs at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn products_into(
        qx: &[u8],
        rows: RowScales,
        w: &Weights,
        (dst, stride): (&mut [f32], usize),
    ) {
        let m = rows.scales.len();
        assert_eq!(rows.zero_points.len(), m, "zero points");
        assert!(
            m > 0
                && stride >= w.outputs
                && qx.len() >= m * w.k4
                && dst.len() >= (m - 1) * stride + w.outputs,
            "int8 product sizes"
        );
        let blocks = w.outputs.div_ceil(LANES);
        assert!(
            w.packed.len() >= blocks * LANES * w.k4,
            "packed weight size"
        );
        let mut b = 0;
        while b < blocks {
            let width = [BLOCK_TILE, 2, 1]
                .into_iter()
                .find(|&t| blocks - b >= t)
                .unwrap_or(1);
            let mut r = 0;
            while r < m {
                // Rows in tiles of 4, then 2, 1 (a one-row tile loads as much as it
                // multiplies).
                let height = [ROW_TILE, 2, 1]
                    .into_iter()
                    .find(|&t| m - r >= t)
                    .unwrap_or(1);
                let at = (r, b);
                match (height, width) {
                    (ROW_TILE, BLOCK_TILE) => {
                        tile::<ROW_TILE, BLOCK_TILE>(qx, rows, w, at, (dst, stride))
                    }
                    (ROW_TILE, 2) => tile::<ROW_TILE, 2>(qx, rows, w, at, (dst, stride)),
                    (ROW_TILE, _) => tile::<ROW_TILE, 1>(qx, rows, w, at, (dst, stride)),
                    (2, BLOCK_TILE) => tile::<2, BLOCK_TILE>(qx, rows, w, at, (dst, stride)),
                    (2, 2) => tile::<2, 2>(qx, rows, w, at, (dst, stride)),
                    (2, _) => tile::<2, 1>(qx, rows, w, at, (dst, stride)),
                    (_, BLOCK_TILE) => tile::<1, BLOCK_TILE>(qx, rows, w, at, (dst, stride)),
                    (_, 2) => tile::<1, 2>(qx, rows, w, at, (dst, stride)),
                    (_, _) => tile::<1, 1>(qx, rows, w, at, (dst, stride)),
                }
                r += height;
            }
            b += width;
        }
    }

    /// Rows `r..r + R` × blocks `b..b + B`: the i32 sums in registers, then into `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize, const B: usize>(
        qx: &[u8],
        rows: RowScales,
        w: &Weights,
        (r, b): (usize, usize),
        (dst, stride): (&mut [f32], usize),
    ) {
        let k4 = w.k4;
        let mut sums = [[_mm512_setzero_si512(); B]; R];
        let a = qx.as_ptr().add(r * k4);
        let packed = w.packed.as_ptr().add(b * LANES * k4);
        for g in 0..k4 / 4 {
            let mut ws = [_mm512_setzero_si512(); B];
            for (j, wj) in ws.iter_mut().enumerate() {
                *wj = _mm512_loadu_si512(packed.add(j * LANES * k4 + g * LANES * 4) as *const _);
            }
            for (i, row) in sums.iter_mut().enumerate() {
                let four = (a.add(i * k4 + g * 4) as *const i32).read_unaligned();
                let av = _mm512_set1_epi32(four);
                for (s, wj) in row.iter_mut().zip(&ws) {
                    *s = _mm512_dpbusd_epi32(*s, av, *wj);
                }
            }
        }
        let n = w.outputs;
        for j in 0..B {
            let first = (b + j) * LANES;
            // The last block may hold fewer than 16 outputs: only those lanes are read and
            // written.
            let mask: __mmask16 = if first + LANES <= n {
                !0
            } else {
                (1u16 << (n - first)) - 1
            };
            let weight_sums =
                _mm512_maskz_loadu_epi32(mask, w.weight_sums.as_ptr().add(first) as *const _);
            let scales = _mm512_maskz_loadu_ps(mask, w.scales.as_ptr().add(first));
            let bias = match w.base {
                Base::Dst => _mm512_setzero_ps(),
                Base::Bias(b) | Base::DstPlusBias(b) => {
                    _mm512_maskz_loadu_ps(mask, b.as_ptr().add(first))
                }
            };
            for (i, row) in sums.iter().enumerate() {
                let zero_point = _mm512_set1_epi32(rows.zero_points[r + i]);
                let exact = _mm512_sub_epi32(row[j], _mm512_mullo_epi32(zero_point, weight_sums));
                let s = _mm512_mul_ps(_mm512_set1_ps(rows.scales[r + i]), scales);
                let add = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s);
                let o = dst.as_mut_ptr().add((r + i) * stride + first);
                // The base as the portable path forms it, then the product on top.
                let base = match w.base {
                    Base::Dst => _mm512_maskz_loadu_ps(mask, o),
                    Base::Bias(_) => bias,
                    Base::DstPlusBias(_) => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), bias),
                };
                _mm512_mask_storeu_ps(o, mask, _mm512_add_ps(base, add));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::random_floats as random;

    fn reference(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
        let m = x.len() / k;
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for o in 0..n {
                out[r * n + o] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// Shapes with tails everywhere: rows not a multiple of 8 or 64, outputs not of 16 or 32,
    /// inputs not of 4.
    /// Rows and output blocks around the kernel's 4 × 4 tiles and their 2- and 1-wide
    /// remainders, partial last blocks included.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 4, 16),
        (7, 13, 5),
        (9, 37, 48),
        (70, 384, 1152),
        (131, 1536, 33),
        (6, 40, 87),
        (5, 8, 112),
    ];

    #[test]
    fn int8_products_are_within_quantization_error_of_f32() {
        for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
            let x = random(m * k, 1 + i as u64);
            let w = random(n * k, 100 + i as u64);
            let q = QuantizedWeight::new(&w, n, k);
            let mut got = vec![0.5f32; m * n];
            q.accumulate(&x, &mut got, Kernel::detect());
            let want = reference(&x, &w, k, n);
            // Each operand is off by at most half a step (the weights' max/254, the rows'
            // range/510); summed over k terms of size ≤ 1, the error stays well under 2% of √k
            // (the products' typical size).
            let tol = 0.02 * (k as f32).sqrt();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - 0.5 - w).abs() <= tol,
                    "{m}×{k}×{n}: {g} vs {}",
                    w + 0.5
                );
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_bytes_on_any_thread_count() {
        for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
            let x = random(m * k, 7 + i as u64);
            let w = random(n * k, 70 + i as u64);
            let q = QuantizedWeight::new(&w, n, k);
            let mut portable = vec![0f32; m * n];
            q.accumulate(&x, &mut portable, Kernel::Portable);
            if Kernel::detect() == Kernel::Vnni {
                let mut fast = vec![0f32; m * n];
                q.accumulate(&x, &mut fast, Kernel::Vnni);
                assert_eq!(fast, portable, "{m}×{k}×{n}");
            }
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut single = vec![0f32; m * n];
            one.install(|| q.accumulate(&x, &mut single, Kernel::detect()));
            assert_eq!(single, portable, "{m}×{k}×{n}, one thread");
        }
    }

    #[test]
    fn every_base_gives_the_portable_bytes() {
        for (i, &(m, k, n)) in SHAPES.iter().enumerate() {
            let x = random(m * k, 17 + i as u64);
            let w = random(n * k, 170 + i as u64);
            let bias = random(n, 1700 + i as u64);
            let start = random(m * n, 17000 + i as u64);
            let q = QuantizedWeight::new(&w, n, k);
            let mut plain = start.clone();
            q.accumulate(&x, &mut plain, Kernel::Portable);
            for (base, want) in [
                // Bias: dst's contents are not read; the row is the bias plus the product.
                (Base::Bias(&bias), {
                    let mut zero = vec![0f32; m * n];
                    q.accumulate(&x, &mut zero, Kernel::Portable);
                    let mut with_bias: Vec<f32> = vec![0f32; m * n];
                    for ((o, p), b) in with_bias.iter_mut().zip(&zero).zip(bias.iter().cycle()) {
                        // The product's f32 on top of the bias, as the kernels add it.
                        *o = b + p;
                    }
                    with_bias
                }),
                (Base::DstPlusBias(&bias), {
                    let mut summed = start.clone();
                    summed
                        .iter_mut()
                        .zip(bias.iter().cycle())
                        .for_each(|(o, b)| *o += b);
                    let mut out = summed;
                    q.accumulate(&x, &mut out, Kernel::Portable);
                    out
                }),
                (Base::Dst, plain.clone()),
            ] {
                for kernel in [Kernel::Portable, Kernel::detect()] {
                    let mut got = start.clone();
                    q.product(&x, &mut got, base, kernel);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{m}×{k}×{n}, {base:?}, {kernel:?}");
                }
            }
        }
    }

    #[test]
    fn a_row_spreads_its_own_range_over_all_256_codes() {
        // A GELU output: nothing below −0.17. Its smallest value is code 0, its largest 255,
        // and 0 is a code of its own (the zero point), so zeros stay exact.
        let row = [-0.17f32, 0.0, 0.5, 3.0, 6.0, -0.01];
        for kernel in [Kernel::Portable, Kernel::detect()] {
            let mut q = QuantizedRows::default();
            q.quantize(&row, row.len(), kernel);
            let (scale, zero) = (q.scales[0], q.zero_points[0]);
            assert!(
                (scale - 6.17 / 255.0).abs() < 1e-6,
                "{kernel:?}: scale {scale}"
            );
            assert_eq!(
                zero, 7,
                "{kernel:?}: -0.17 / scale rounds to 7 codes below zero"
            );
            assert_eq!(&q.bytes[..6], &[0, 7, 28, 131, 255, 7], "{kernel:?}");
            // Padding to a multiple of 4 holds the zero point (the weights there are 0).
            assert_eq!(&q.bytes[6..8], &[7, 7], "{kernel:?}");
            for (&v, &c) in row.iter().zip(&q.bytes) {
                let back = scale * (c as i32 - zero) as f32;
                assert!((back - v).abs() <= scale / 2.0 + 1e-6, "{v} → {c} → {back}");
            }
        }
    }

    #[test]
    fn skewed_rows_cost_half_the_error_of_a_symmetric_scale() {
        // Rows as GELU leaves them (mostly small, a few large, nothing below −0.17): the
        // product's error against f32 is about half what a scale of max |x| / 127 around a
        // fixed zero point gives (its step is twice as long).
        let (m, k, n) = (32, 1536, 64);
        let x: Vec<f32> = random(m * k, 5)
            .iter()
            .map(|v| {
                let t = 3.0 * v;
                t * 0.5 * (1.0 + (t * 0.7978846 * (1.0 + 0.044715 * t * t)).tanh())
            })
            .collect();
        let w = random(n * k, 6);
        let q = QuantizedWeight::new(&w, n, k);
        // Both schemes against the weights as quantized, so only the activations' error
        // differs: the symmetric one computed here in f64.
        // Each row at max |x| / 127, rounded and scaled back.
        let symmetric = |v: &[f32]| -> Vec<f32> {
            v.chunks(k)
                .flat_map(|row| {
                    let step = row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                    row.iter().map(move |v| (v / step).round() * step)
                })
                .collect()
        };
        let wq = symmetric(&w);
        let want = reference(&x, &wq, k, n);
        let mut got = vec![0f32; m * n];
        q.accumulate(&x, &mut got, Kernel::detect());
        let rms = |v: &[f32]| (v.iter().map(|e| e * e).sum::<f32>() / v.len() as f32).sqrt();
        let err: Vec<f32> = got.iter().zip(&want).map(|(g, w)| g - w).collect();
        let sym_err: Vec<f32> = reference(&symmetric(&x), &wq, k, n)
            .iter()
            .zip(&want)
            .map(|(g, w)| g - w)
            .collect();
        let (ours, symmetric) = (rms(&err), rms(&sym_err));
        assert!(
            ours < 0.7 * symmetric,
            "rms error {ours} against the symmetric scale's {symmetric}"
        );
    }

    #[test]
    fn strided_and_split_products_give_the_fused_bytes() {
        // A (3·16 + 5)-output layer split after 16 outputs, as the last layer's query is from
        // its keys and values: each part's outputs equal the fused layer's columns bit for
        // bit, written in place into rows of the fused width, and a selection of rows gives
        // those rows' outputs.
        let (m, k, n, split) = (70, 40, 53, 16);
        let x = random(m * k, 31);
        let w = random(n * k, 32);
        let bias = random(n, 33);
        let fused = QuantizedWeight::new(&w, n, k);
        let (front, back) = (
            QuantizedWeight::new(&w[..split * k], split, k),
            QuantizedWeight::new(&w[split * k..], n - split, k),
        );
        for kernel in [Kernel::Portable, Kernel::detect()] {
            let mut q = QuantizedRows::default();
            q.quantize(&x, k, kernel);
            let mut want = vec![0f32; m * n];
            fused.product_of_quantized(&q, &mut want, Base::Bias(&bias), kernel);
            let mut got = vec![f32::NAN; m * n];
            back.product_of_quantized_strided(
                &q,
                &mut got[split..],
                n,
                Base::Bias(&bias[split..]),
                kernel,
            );
            let chosen = [69, 0, 7, 8, 40];
            let mut firsts = vec![0f32; chosen.len() * split];
            front.product_of_quantized(
                &q.select(chosen),
                &mut firsts,
                Base::Bias(&bias[..split]),
                kernel,
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for r in 0..m {
                let (w_row, g_row) = (&want[r * n..][..n], &got[r * n..][..n]);
                assert_eq!(
                    bits(&g_row[split..]),
                    bits(&w_row[split..]),
                    "{kernel:?} row {r}"
                );
                // The front of each row was not written.
                assert!(
                    g_row[..split].iter().all(|v| v.is_nan()),
                    "{kernel:?} row {r}"
                );
            }
            for (i, &r) in chosen.iter().enumerate() {
                assert_eq!(
                    bits(&firsts[i * split..][..split]),
                    bits(&want[r * n..][..split]),
                    "{kernel:?} chosen row {r}"
                );
            }
        }
    }

    #[test]
    fn zero_rows_and_zero_weights_give_zero() {
        let q = QuantizedWeight::new(&[0.0; 12], 3, 4);
        let mut out = vec![0f32; 6];
        q.accumulate(
            &[1.0, -2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 0.0],
            &mut out,
            Kernel::detect(),
        );
        assert_eq!(out, [0.0; 6]);
    }
}
