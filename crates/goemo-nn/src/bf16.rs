//! bf16 matrix products for training: operands rounded to bf16 (round to nearest even), sums in
//! f32. The training path's `train.precision: bf16`.
//!
//! The AVX-512 BF16 instruction `vdpbf16ps` multiplies 16 pairs of bf16 and adds both products
//! to 16 f32 sums, each addition rounded: `sum = (sum + a₁·b₁) + a₀·b₀` (the odd element first;
//! measured on these CPUs against Intel's pseudo-code, bit for bit). A product of two bf16 is
//! exact in f32, so the portable kernel does the same two additions in the same order and gets
//! the same bits on any CPU. Results therefore depend neither on which kernel ran nor on the
//! thread count: each output is one chain of additions over the inner dimension in order,
//! starting from the destination's value, whatever the tiling. (Both kernels flush results
//! below f32's smallest normal to zero, as the instruction does; the rounding of operands
//! flushes bf16 subnormals, as `vcvtneps2bf16` does.)
//!
//! Layout: both operands are converted once per product into pairs along the inner dimension
//! (one `u32` per pair, the even element in the low half: what the instruction reads). The
//! left operand stays in the orientation it came in (row by row, or pair by pair for a
//! transposed one), since the kernel reads it one broadcast at a time; the right one is packed
//! in panels of [`NR`] columns, pair by pair, the [`NR`] columns side by side (what a vector
//! load reads). Rows and panels past the matrix's edge are zero-padded.

use rayon::prelude::*;

use crate::infer::{product_needed, Operand};

/// Rows of the left operand one kernel call holds.
pub const MR: usize = 8;
/// Columns of the right operand one kernel call holds: three 512-bit registers of sums.
pub const NR: usize = 48;
/// Pairs of the inner dimension per block where the L1 data cache's size is unknown or under
/// 48 KiB: a panel's block (128 × 48 × 4 bytes = 24 KiB) stays in a 32 KiB L1 while the tiles
/// of a task stream past it.
const KC: usize = 128;
/// Pairs per block with an L1 data cache of 48 KiB or more (AMD Zen 5): each tile's sums are
/// loaded and stored half as often, and a block (48 KiB) still fits. Measured on Zen 5 over a
/// DistilBERT layer's products: 2 threads 750 → 800–830 GFLOP/s, one 410 → 420–429.
const KC_LARGE_L1: usize = 256;

/// Pairs of the inner dimension per block on this CPU. The block size changes no result: each
/// output's chain of additions continues through the destination across blocks.
fn block_pairs() -> usize {
    static PAIRS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAIRS.get_or_init(|| match l1_data_bytes() {
        Some(bytes) if bytes >= 48 * 1024 => KC_LARGE_L1,
        _ => KC,
    })
}

/// The first CPU's level-1 data cache size as Linux reports it (`None` elsewhere).
fn l1_data_bytes() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..4).find_map(|i| {
        let index = dir.join(format!("index{i}"));
        let read = |name: &str| std::fs::read_to_string(index.join(name)).ok();
        if read("level")?.trim() != "1" || read("type")?.trim() != "Data" {
            return None;
        }
        parse_cache_size(&read("size")?)
    })
}

/// "48K" → 49152 (sysfs's cache sizes: a number with an optional K or M).
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1024),
        None => match text.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1024 * 1024),
            None => (text, 1),
        },
    };
    digits.parse::<usize>().ok().map(|n| n * unit)
}
/// Row tiles per parallel task.
const TILES_PER_TASK: usize = 16;

/// Which kernel a bf16 product uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX-512 BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`), on x86-64 with avx512f, avx512bw and
    /// avx512bf16.
    Avx512Bf16,
    /// Plain Rust for any CPU: the same bits, several times slower.
    Portable,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU runs (the portable one under `GOEMO_KERNELS=portable`).
    pub fn detect() -> Bf16Kernel {
        #[cfg(target_arch = "x86_64")]
        if !crate::portable_kernels_forced()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
        {
            return Bf16Kernel::Avx512Bf16;
        }
        Bf16Kernel::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
            Bf16Kernel::Portable => "portable",
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits. Subnormals become a zero of
/// their sign and NaN stays NaN (quiet), as `vcvtneps2bf16` does.
#[inline(always)]
pub fn round_to_bf16(x: f32) -> u16 {
    round_bits(x.to_bits()) as u16
}

/// [`round_to_bf16`] on the bits, as selects rather than branches so that loops over it
/// vectorize.
#[inline(always)]
fn round_bits(bits: u32) -> u32 {
    let top = bits >> 16;
    let rounded = bits.wrapping_add(0x7fff + (top & 1)) >> 16;
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    let subnormal = bits & 0x7f80_0000 == 0;
    if nan {
        top | 0x40
    } else if subnormal {
        top & 0x8000
    } else {
        rounded
    }
}

/// The f32 a bf16 stands for (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Two consecutive elements of the inner dimension as one packed pair.
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    round_bits(even.to_bits()) | round_bits(odd.to_bits()) << 16
}

/// `dst[p]` = the pair (src[2p], src[2p + 1]).
#[inline(always)]
fn line_pairs(src: &[f32], dst: &mut [u32]) {
    for (d, two) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = pair(two[0], two[1]);
    }
}

/// `dst[i]` = the pair (even[i], odd[i]).
#[inline(always)]
fn interleave(even: &[f32], odd: &[f32], dst: &mut [u32]) {
    for ((d, &e), &o) in dst.iter_mut().zip(even).zip(odd) {
        *d = pair(e, o);
    }
}

wide_fn!(fn line_pairs_wide(src: &[f32], dst: &mut [u32]) => line_pairs);
wide_fn!(fn interleave_wide(even: &[f32], odd: &[f32], dst: &mut [u32]) => interleave);

/// [`line_pairs`] by the CPU's own conversion where `kernel` is the AVX-512 one (the same bits:
/// `round_to_bf16` is that conversion; a test checks every path), else compiled wide.
fn line_pairs_by(kernel: Bf16Kernel, src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Avx512Bf16 {
        // SAFETY: `Bf16Kernel::Avx512Bf16` comes from `detect`, which checked the features.
        return unsafe { avx512::line_pairs(src, dst) };
    }
    let _ = kernel;
    line_pairs_wide(src, dst)
}

/// [`interleave`], as [`line_pairs_by`].
fn interleave_by(kernel: Bf16Kernel, even: &[f32], odd: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Avx512Bf16 {
        // SAFETY: as in `line_pairs_by`.
        return unsafe { avx512::interleave(even, odd, dst) };
    }
    let _ = kernel;
    interleave_wide(even, odd, dst)
}

/// An operand packed in pairs: `groups` tiles (or panels) of `width` lines × `pairs` pairs.
struct Packed<'a> {
    data: &'a [u32],
    pairs: usize,
}

impl Packed<'_> {
    /// The block of pairs `from..` of group `g` (its `width` lines side by side).
    fn block(&self, g: usize, width: usize, from: usize) -> &[u32] {
        &self.data[(g * self.pairs + from) * width..]
    }
}

/// The right operand (k × n) of a bf16 product: a strided matrix, or row blocks read where
/// they are (the query, key and value weights, not copied into one matrix first).
#[derive(Clone, Copy)]
pub(crate) enum Rhs<'a> {
    Operand(Operand<'a>),
    /// The rows of `parts` stacked, each part `part_rows` rows of n (row-major).
    StackedRows {
        parts: &'a [&'a [f32]],
        part_rows: usize,
    },
    /// The transpose of the rows of `parts` stacked: column j of the operand is row j of the
    /// stack (each part `part_rows` rows of k): a dense layer's weights, as `x·Wᵀ` reads them.
    StackedLines {
        parts: &'a [&'a [f32]],
        part_rows: usize,
    },
}

impl<'a> From<Operand<'a>> for Rhs<'a> {
    fn from(op: Operand<'a>) -> Rhs<'a> {
        Rhs::Operand(op)
    }
}

impl<'a> Rhs<'a> {
    /// Panics, naming the product, unless the operand holds k × n.
    fn check(&self, k: usize, n: usize, what: &str) {
        let parts_hold = |parts: &[&[f32]], part_rows: usize, rows: usize, cols: usize| {
            assert!(
                parts.len() * part_rows == rows
                    && parts.iter().all(|p| p.len() == part_rows * cols),
                "{what} rhs: {} parts of {part_rows} rows do not make {rows} × {cols}",
                parts.len()
            )
        };
        match *self {
            Rhs::Operand(op) => op.check(k, n, what, "rhs"),
            Rhs::StackedRows { parts, part_rows } => parts_hold(parts, part_rows, k, n),
            Rhs::StackedLines { parts, part_rows } => parts_hold(parts, part_rows, n, k),
        }
    }

    /// Whether each column (a packed line) is contiguous over the inner dimension.
    fn lines_contiguous(&self) -> bool {
        match self {
            Rhs::Operand(op) => op.row_stride == 1,
            Rhs::StackedRows { .. } => false,
            Rhs::StackedLines { .. } => true,
        }
    }

    /// Column `j`'s k elements (when [`Self::lines_contiguous`]).
    fn line(&self, j: usize, k: usize) -> &'a [f32] {
        match *self {
            Rhs::Operand(op) => &op.data[j * op.col_stride..][..k],
            Rhs::StackedLines { parts, part_rows } => {
                &parts[j / part_rows][(j % part_rows) * k..][..k]
            }
            Rhs::StackedRows { .. } => unreachable!("stacked rows are read row by row"),
        }
    }

    /// Row `i`'s columns `first..first + count` (when not [`Self::lines_contiguous`]).
    fn row(&self, i: usize, n: usize, first: usize, count: usize) -> &'a [f32] {
        match *self {
            Rhs::Operand(op) => &op.data[i * op.row_stride + first..][..count],
            Rhs::StackedRows { parts, part_rows } => {
                &parts[i / part_rows][(i % part_rows) * n + first..][..count]
            }
            Rhs::StackedLines { .. } => unreachable!("stacked lines are read line by line"),
        }
    }
}

/// Pack the k × n right operand's `lines` (= n) columns of `k` elements into groups of `width`
/// columns, in `buffer` (grown as needed, kept between calls: the packings of a step are the
/// same sizes every step, so after the first no page is faulted in or cleared again). Every
/// element of the result is written, padding included.
fn pack<'b>(
    kernel: Bf16Kernel,
    buffer: &'b mut Vec<u32>,
    rhs: Rhs,
    lines: usize,
    k: usize,
    width: usize,
) -> Packed<'b> {
    if let Rhs::Operand(op) = rhs {
        assert!(
            op.row_stride == 1 || op.col_stride == 1,
            "pack: an operand is plain or transposed, so one of its strides is 1"
        );
    }
    let contiguous = rhs.lines_contiguous();
    let pairs = k.div_ceil(2);
    let len = lines.div_ceil(width) * width * pairs;
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    let packed = &mut buffer[..len];
    packed
        .par_chunks_mut(width * pairs)
        .enumerate()
        .for_each(|(g, group)| {
            let first = g * width;
            let count = width.min(lines - first);
            if contiguous {
                // Each line's elements are contiguous. On AVX-512, 16 lines at a time are
                // converted and transposed in registers, 16 pairs by 16 lines.
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if kernel == Bf16Kernel::Avx512Bf16 {
                    while done + 16 <= count {
                        let lines: [&[f32]; 16] =
                            std::array::from_fn(|i| rhs.line(first + done + i, k));
                        // SAFETY: the AVX-512 BF16 kernel is only detected where the CPU has
                        // those features (as in `line_pairs_by`).
                        unsafe { avx512::pack_lines(&lines, &mut group[done..], width) };
                        done += 16;
                    }
                }
                // Else, and for the last lines: convert a line, then spread its pairs over the
                // group's columns.
                let mut line_buf = vec![0u32; pairs];
                for l in done..count {
                    let line = rhs.line(first + l, k);
                    line_pairs_by(kernel, line, &mut line_buf);
                    if k % 2 == 1 {
                        line_buf[pairs - 1] = pair(line[k - 1], 0.0);
                    }
                    for (p, &v) in line_buf.iter().enumerate() {
                        group[p * width + l] = v;
                    }
                }
                for l in count..width {
                    for p in 0..pairs {
                        group[p * width + l] = 0;
                    }
                }
            } else {
                // The lines are contiguous: interleave two rows of elements at a time.
                for p in 0..pairs {
                    let out = &mut group[p * width..][..width];
                    let even = rhs.row(2 * p, lines, first, count);
                    if 2 * p + 1 < k {
                        let odd = rhs.row(2 * p + 1, lines, first, count);
                        interleave_by(kernel, even, odd, &mut out[..count]);
                    } else {
                        for (o, &e) in out.iter_mut().zip(even) {
                            *o = pair(e, 0.0);
                        }
                    }
                    out[count..].fill(0);
                }
            }
        });
    Packed {
        data: packed,
        pairs,
    }
}

/// The left operand in bf16 pairs, kept in the orientation it came in (so converting it is
/// one streaming pass, no transpose): element (row r, pair p) at `data[r·row_step +
/// p·pair_step]`, rows zero-padded to a multiple of [`MR`].
struct Lhs<'a> {
    data: &'a [u32],
    row_step: usize,
    pair_step: usize,
    pairs: usize,
}

impl Lhs<'_> {
    fn pair_major(&self) -> bool {
        self.row_step == 1
    }

    /// From row `row`, pair `from` on.
    fn at(&self, row: usize, from: usize) -> &[u32] {
        &self.data[row * self.row_step + from * self.pair_step..]
    }
}

/// Convert the m × k left operand (element (r, i) at `data[r·row_stride + i·k_stride]`) into
/// `buffer`: pairs of rows interleaved when its columns are contiguous (a transposed
/// operand), else row by row.
fn convert_lhs<'b>(
    kernel: Bf16Kernel,
    buffer: &'b mut Vec<u32>,
    data: &[f32],
    m: usize,
    k: usize,
    (row_stride, k_stride): (usize, usize),
) -> Lhs<'b> {
    assert!(
        k_stride == 1 || row_stride == 1,
        "convert_lhs: an operand is plain or transposed, so one of its strides is 1"
    );
    let pairs = k.div_ceil(2);
    let rows = m.div_ceil(MR) * MR;
    if buffer.len() < rows * pairs {
        buffer.resize(rows * pairs, 0);
    }
    let out = &mut buffer[..rows * pairs];
    if row_stride == 1 && k_stride != 1 {
        out.par_chunks_mut(rows).enumerate().for_each(|(p, out)| {
            let even = &data[2 * p * k_stride..][..m];
            if 2 * p + 1 < k {
                interleave_by(
                    kernel,
                    even,
                    &data[(2 * p + 1) * k_stride..][..m],
                    &mut out[..m],
                );
            } else {
                for (o, &e) in out.iter_mut().zip(even) {
                    *o = pair(e, 0.0);
                }
            }
            out[m..].fill(0);
        });
        return Lhs {
            data: out,
            row_step: 1,
            pair_step: rows,
            pairs,
        };
    }
    out.par_chunks_mut(pairs)
        .with_min_len(8)
        .enumerate()
        .for_each(|(r, out)| {
            if r >= m {
                out.fill(0);
            } else {
                // Row-major here means the elements of a row are contiguous (k_stride is 1).
                let row = &data[r * row_stride..][..k];
                line_pairs_by(kernel, row, out);
                if k % 2 == 1 {
                    out[pairs - 1] = pair(row[k - 1], 0.0);
                }
            }
        });
    Lhs {
        data: out,
        row_step: pairs,
        pair_step: 1,
        pairs,
    }
}

thread_local! {
    /// The packing buffers of the products this thread starts (left, right operand).
    static BUFFERS: std::cell::RefCell<[Vec<u32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// A destination shared by the tasks of one product, each writing its own tiles: one or more
/// buffers of `part_rows` rows each, stacked (the rows of part i follow those of part i − 1).
#[derive(Clone, Copy)]
struct Dst<'p> {
    parts: &'p [*mut f32],
    part_rows: usize,
}
// SAFETY: tasks write disjoint tiles of the destination (see `matmul_bf16_split`).
unsafe impl Send for Dst<'_> {}
unsafe impl Sync for Dst<'_> {}

impl Dst<'_> {
    /// Row `row`, column `col` of the stacked destination (`n` columns).
    ///
    /// # Safety
    /// The element must lie inside its part.
    unsafe fn at(self, row: usize, col: usize, n: usize) -> *mut f32 {
        self.parts[row / self.part_rows].add((row % self.part_rows) * n + col)
    }
}

/// `dst` (m × n, row-major) = `lhs` (m × k) · `rhs` (k × n) with both operands rounded to bf16
/// and the sums in f32, or `dst` += that product.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    add: bool,
    kernel: Bf16Kernel,
) {
    if !product_needed(dst, (m, n, k), lhs, rhs, add, "matmul_bf16") {
        return;
    }
    let start = if add { Start::Dst } else { Start::Zero };
    // SAFETY: `product_needed` checked dst (m × n, initialised) and both operands.
    unsafe {
        product(
            &[dst.as_mut_ptr()],
            m,
            (m, n, k),
            lhs,
            rhs.into(),
            start,
            kernel,
            block_pairs(),
        )
    }
}

/// Where each output's chain of additions starts.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// From the destination's value (`dst +=` the product).
    Dst,
    /// From zero (`dst =` the product).
    Zero,
    /// From the bias of its column (`dst =` bias + the product, a dense layer's output).
    Bias(&'a [f32]),
}

/// A new m × n buffer holding `start` + `lhs` · `rhs` ([`Start::Zero`] or [`Start::Bias`]),
/// written by the product's tasks alone: no serial pass fills it first (a dense layer's
/// output, with the bias it starts from, as [`matmul_bf16`] would give it after a fill).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Rhs,
    start: Start,
    kernel: Bf16Kernel,
) -> Vec<f32> {
    let mut parts = matmul_bf16_split_new(1, m, n, k, lhs, rhs, start, kernel);
    parts.pop().expect("one part")
}

/// [`matmul_bf16_new`] into `parts` new buffers, equal blocks of rows (buffer i holds rows
/// i·m/parts..), each a multiple of [`MR`] rows unless there is one: the gradients of the
/// query, key and value weights, each written whole by the one product, with no pass clearing
/// them first, and the bits [`matmul_bf16_split`] gives from zeroed parts.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_split_new(
    parts: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Rhs,
    start: Start,
    kernel: Bf16Kernel,
) -> Vec<Vec<f32>> {
    assert!(parts > 0, "matmul_bf16_split_new: {m} rows in no parts");
    let part_rows = part_rows(m, parts, "matmul_bf16_split_new");
    if let Start::Bias(bias) = start {
        assert_eq!(bias.len(), n, "matmul_bf16_split_new: a bias per column");
    }
    assert!(
        !matches!(start, Start::Dst),
        "matmul_bf16_split_new: a new buffer has no values to start from (Start::Zero or Start::Bias)"
    );
    if m == 0 || n == 0 || k == 0 {
        let part = match start {
            Start::Bias(bias) => bias.repeat(part_rows),
            _ => vec![0.0; part_rows * n],
        };
        return vec![part; parts];
    }
    lhs.check(m, k, "matmul_bf16_split_new", "lhs");
    rhs.check(k, n, "matmul_bf16_split_new");
    let mut out: Vec<Vec<f32>> = (0..parts)
        .map(|_| Vec::with_capacity(part_rows * n))
        .collect();
    let ptrs: Vec<*mut f32> = out.iter_mut().map(|part| part.as_mut_ptr()).collect();
    // SAFETY: each part has room for part_rows × n; with a start other than `Dst`, the product
    // writes every output (its first block of pairs starts from zero or the bias, not from
    // memory) before reading any, so the lengths are set only over written elements.
    unsafe {
        product(
            &ptrs,
            part_rows,
            (m, n, k),
            lhs,
            rhs,
            start,
            kernel,
            block_pairs(),
        );
        out.iter_mut().for_each(|part| part.set_len(part_rows * n));
    }
    out
}

/// The rows of each of `parts` equal blocks of m rows; panics, naming the product, unless they
/// split m evenly and (with more than one) each holds whole tiles of [`MR`] rows, so no tile
/// straddles two parts.
fn part_rows(m: usize, parts: usize, what: &str) -> usize {
    let part_rows = m / parts.max(1);
    assert!(
        part_rows * parts == m && (parts == 1 || part_rows.is_multiple_of(MR)),
        "{what}: {m} rows in {parts} parts"
    );
    part_rows
}

/// [`matmul_bf16`] into a destination held as equal parts stacked by rows (`dst[i]` holds rows
/// i·m/parts.. of the m × n result): one product where the caller keeps the blocks of rows
/// apart (the query, key and value gradients). Each part's rows are a multiple of [`MR`], so no
/// tile straddles two parts, and every output gets the bits `matmul_bf16` would give it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_split(
    dst: &mut [&mut [f32]],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Rhs,
    start: Start,
    kernel: Bf16Kernel,
) {
    let part_rows = part_rows(m, dst.len(), "matmul_bf16_split");
    for part in dst.iter() {
        assert_eq!(
            part.len(),
            part_rows * n,
            "matmul_bf16_split: a part's size"
        );
    }
    lhs.check(m, k, "matmul_bf16_split", "lhs");
    rhs.check(k, n, "matmul_bf16_split");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for part in dst.iter_mut() {
            match start {
                Start::Dst => {}
                Start::Zero => part.fill(0.0),
                Start::Bias(bias) => part
                    .chunks_exact_mut(n)
                    .for_each(|row| row.copy_from_slice(bias)),
            }
        }
        return;
    }
    let parts: Vec<*mut f32> = dst.iter_mut().map(|part| part.as_mut_ptr()).collect();
    // SAFETY: each part is a live buffer of part_rows × n (checked above).
    unsafe {
        product(
            &parts,
            part_rows,
            (m, n, k),
            lhs,
            rhs,
            start,
            kernel,
            block_pairs(),
        )
    }
}

/// The product's tasks over a destination given as raw parts of `part_rows` rows each (a
/// multiple of [`MR`] unless there is one part), `kc` pairs of the inner dimension at a time.
///
/// # Safety
/// Each part points at part_rows × n writable f32, aliasing neither operand; with
/// [`Start::Dst`] they are initialised (otherwise they may not be: every output is written
/// before it is read).
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    parts: &[*mut f32],
    part_rows: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Rhs,
    start: Start,
    kernel: Bf16Kernel,
    kc: usize,
) {
    let [mut a_buf, mut b_buf] = BUFFERS.with_borrow_mut(std::mem::take);
    let a = convert_lhs(
        kernel,
        &mut a_buf,
        lhs.data,
        m,
        k,
        (lhs.row_stride, lhs.col_stride),
    );
    let b = pack(kernel, &mut b_buf, rhs, n, k, NR);
    let (tiles, panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let tasks = tiles.div_ceil(TILES_PER_TASK) * panels;
    let out = Dst { parts, part_rows };
    (0..tasks).into_par_iter().for_each(|task| {
        let (chunk, panel) = (task / panels, task % panels);
        let tile_range = chunk * TILES_PER_TASK..((chunk + 1) * TILES_PER_TASK).min(tiles);
        let cols = NR.min(n - panel * NR);
        let mut scratch = [0f32; MR * NR];
        for from in (0..a.pairs).step_by(kc) {
            let len = kc.min(a.pairs - from);
            let b_block = b.block(panel, NR, from);
            for tile in tile_range.clone() {
                let rows = MR.min(m - tile * MR);
                let a_block = a.at(tile * MR, from);
                // SAFETY: this task alone writes rows tile·MR.. × columns panel·NR.. of dst
                // (tasks split rows by chunk and columns by panel); the tile's rows lie in one
                // part (checked above), inside its buffer.
                unsafe {
                    let c = out.at(tile * MR, panel * NR, n);
                    // The first block of pairs starts each chain: from the destination, or
                    // from zero or the bias, written here into the tile just before the
                    // kernel reads it (in cache, and in parallel: no serial pass over dst).
                    let first = match start {
                        Start::Dst => None,
                        _ if from > 0 => None,
                        Start::Zero => Some(None),
                        Start::Bias(bias) => Some(Some(&bias[panel * NR..][..cols])),
                    };
                    let init = |row: *mut f32| match first {
                        Some(Some(bias)) => std::ptr::copy_nonoverlapping(bias.as_ptr(), row, cols),
                        _ => std::ptr::write_bytes(row, 0, cols),
                    };
                    if rows == MR && cols == NR {
                        if first.is_some() {
                            (0..MR).for_each(|r| init(c.add(r * n)));
                        }
                        run_tile(kernel, (a_block, &a), b_block, len, c, n);
                    } else {
                        for r in 0..rows {
                            let row = scratch.as_mut_ptr().add(r * NR);
                            if first.is_some() {
                                init(row);
                            } else {
                                std::ptr::copy_nonoverlapping(c.add(r * n), row, cols);
                            }
                        }
                        run_tile(
                            kernel,
                            (a_block, &a),
                            b_block,
                            len,
                            scratch.as_mut_ptr(),
                            NR,
                        );
                        for r in 0..rows {
                            std::ptr::copy_nonoverlapping(
                                scratch.as_ptr().add(r * NR),
                                c.add(r * n),
                                cols,
                            );
                        }
                    }
                }
            }
        }
    });
    BUFFERS.with_borrow_mut(|b| *b = [a_buf, b_buf]);
}

/// One MR × NR tile: `c` (rows `ldc` apart) += the products of `len` pairs, `a` from the
/// tile's first row and pair in `lhs`'s layout.
///
/// # Safety
/// `c` must point at MR rows of NR writable f32, `ldc` apart; `a` holds MR rows of `len`
/// pairs in `lhs`'s layout, `b` at least `len` pairs of NR columns.
unsafe fn run_tile(
    kernel: Bf16Kernel,
    (a, lhs): (&[u32], &Lhs),
    b: &[u32],
    len: usize,
    c: *mut f32,
    ldc: usize,
) {
    let (rs, ps) = (lhs.row_step, lhs.pair_step);
    debug_assert!(a.len() > (MR - 1) * rs + (len - 1) * ps && b.len() >= len * NR);
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Avx512Bf16 {
        return if lhs.pair_major() {
            avx512::tile::<true>(a.as_ptr(), (1, ps), b.as_ptr(), len, c, ldc)
        } else {
            avx512::tile::<false>(a.as_ptr(), (rs, 1), b.as_ptr(), len, c, ldc)
        };
    }
    let _ = kernel;
    portable_tile(a, (rs, ps), b, len, c, ldc)
}

/// Results below f32's smallest normal become a zero of their sign (the instruction's FTZ).
#[inline(always)]
fn flush(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0 {
        f32::from_bits(bits & 0x8000_0000)
    } else {
        x
    }
}

/// The portable kernel: per pair, the odd product then the even one, each addition rounded.
///
/// # Safety
/// As [`run_tile`].
unsafe fn portable_tile(
    a: &[u32],
    (row_step, pair_step): (usize, usize),
    b: &[u32],
    len: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = flush(*c.add(r * ldc + j));
        }
    }
    let mut b_even = [0f32; NR];
    let mut b_odd = [0f32; NR];
    for p in 0..len {
        for (j, &w) in b[p * NR..][..NR].iter().enumerate() {
            b_even[j] = bf16_to_f32(w as u16);
            b_odd[j] = bf16_to_f32((w >> 16) as u16);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let w = a[r * row_step + p * pair_step];
            let (a_even, a_odd) = (bf16_to_f32(w as u16), bf16_to_f32((w >> 16) as u16));
            for ((v, &be), &bo) in row.iter_mut().zip(&b_even).zip(&b_odd) {
                // Both products are exact in f32: only the additions round.
                *v = flush((*v + a_odd * bo) + a_even * be);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            *c.add(r * ldc + j) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `super::line_pairs` by `vcvtne2ps2bf16`, 32 elements (16 pairs) at a time: in the
    /// element order, the even element of each pair lands in the low half.
    ///
    /// # Safety
    /// On a CPU with avx512f and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn line_pairs(src: &[f32], dst: &mut [u32]) {
        let n = dst.len().min(src.len() / 2);
        let mut p = 0;
        while p + 16 <= n {
            let low = _mm512_loadu_ps(src.as_ptr().add(2 * p));
            let high = _mm512_loadu_ps(src.as_ptr().add(2 * p + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
            _mm512_storeu_si512(dst.as_mut_ptr().add(p) as *mut _, v);
            p += 16;
        }
        super::line_pairs(&src[2 * p..], &mut dst[p..n]);
    }

    /// `super::interleave` by `vcvtne2ps2bf16` (16 even, then 16 odd elements) and a word
    /// permutation that puts each odd element beside its even one.
    ///
    /// # Safety
    /// On a CPU with avx512f, avx512bw and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn interleave(even: &[f32], odd: &[f32], dst: &mut [u32]) {
        let n = dst.len().min(even.len()).min(odd.len());
        // Word 2i from word i (even i), word 2i + 1 from word 16 + i (odd i).
        let order: [u16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as u16);
        let order = _mm512_loadu_si512(order.as_ptr() as *const _);
        let mut i = 0;
        while i + 16 <= n {
            let e = _mm512_loadu_ps(even.as_ptr().add(i));
            let o = _mm512_loadu_ps(odd.as_ptr().add(i));
            let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
            let pairs = _mm512_permutexvar_epi16(order, halves);
            _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut _, pairs);
            i += 16;
        }
        super::interleave(&even[i..n], &odd[i..n], &mut dst[i..n]);
    }

    /// Sixteen lines of a contiguous right operand into their columns of a packed group
    /// (`dst[p·width + i]` = pair p of line i, the layout `super::pack` writes): each block of
    /// 16 pairs is converted line by line, then transposed in registers (16 × 16 words), so the
    /// group is written 16 columns at a time instead of one word at a time; the pairs past the
    /// last whole block (and an odd last element, paired with zero) as `super::pair` gives them.
    ///
    /// # Safety
    /// On a CPU with avx512f and avx512bf16; the lines are equally long, `width` ≥ 16 and
    /// `dst` holds `width` words for each of the lines' pairs (the last row its first 16).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_lines(lines: &[&[f32]; 16], dst: &mut [u32], width: usize) {
        let k = lines[0].len();
        let pairs = k.div_ceil(2);
        assert!(
            width >= 16
                && lines.iter().all(|l| l.len() == k)
                && dst.len() >= pairs.saturating_sub(1) * width + 16
        );
        let out = dst.as_mut_ptr();
        let mut p0 = 0;
        while p0 + 16 <= k / 2 {
            let rows: [__m512i; 16] = std::array::from_fn(|i| {
                let src = lines[i].as_ptr().add(2 * p0);
                let low = _mm512_loadu_ps(src);
                let high = _mm512_loadu_ps(src.add(16));
                std::mem::transmute(_mm512_cvtne2ps_pbh(high, low))
            });
            let columns = transpose_16x16(rows);
            for (p, column) in columns.iter().enumerate() {
                _mm512_storeu_si512(out.add((p0 + p) * width) as *mut _, *column);
            }
            p0 += 16;
        }
        for p in p0..pairs {
            for (i, line) in lines.iter().enumerate() {
                let odd = line.get(2 * p + 1).copied().unwrap_or(0.0);
                *out.add(p * width + i) = super::pair(line[2 * p], odd);
            }
        }
    }

    /// The transpose of 16 rows of 16 words: word j of row i becomes word i of row j. Pairs
    /// of rows interleave by words, then by word pairs (each 128-bit lane then holds four
    /// rows' words of one column), then the lanes are gathered by column.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_16x16(r: [__m512i; 16]) -> [__m512i; 16] {
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4g + q], lane j: column 4j + q of rows 4g..4g + 4.
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (g, q) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + q / 2], t[4 * g + 2 + q / 2]);
            if q % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        let mut out = [_mm512_setzero_si512(); 16];
        for q in 0..4 {
            let s0 = _mm512_shuffle_i32x4::<0x44>(u[q], u[4 + q]);
            let s1 = _mm512_shuffle_i32x4::<0xee>(u[q], u[4 + q]);
            let s2 = _mm512_shuffle_i32x4::<0x44>(u[8 + q], u[12 + q]);
            let s3 = _mm512_shuffle_i32x4::<0xee>(u[8 + q], u[12 + q]);
            out[q] = _mm512_shuffle_i32x4::<0x88>(s0, s2);
            out[4 + q] = _mm512_shuffle_i32x4::<0xdd>(s0, s2);
            out[8 + q] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
            out[12 + q] = _mm512_shuffle_i32x4::<0xdd>(s1, s3);
        }
        out
    }

    /// The tile in 24 registers of sums (8 rows × 3 × 16 columns).
    ///
    /// # Safety
    /// As `run_tile`, on a CPU with avx512f and avx512bf16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const PAIR_MAJOR: bool>(
        a: *const u32,
        (row_step, pair_step): (usize, usize),
        b: *const u32,
        len: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        // One of the steps is 1; naming which lets the compiler fold it.
        let (row_step, pair_step) = if PAIR_MAJOR {
            (1, pair_step)
        } else {
            (row_step, 1)
        };
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(c.add(r * ldc + 16 * j));
            }
        }
        for p in 0..len {
            let bp = b.add(p * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
            let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
            let ap = a.add(p * pair_step);
            for (r, row) in acc.iter_mut().enumerate() {
                let x: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(r * row_step) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                row[1] = _mm512_dpbf16_ps(row[1], x, b1);
                row[2] = _mm512_dpbf16_ps(row[2], x, b2);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + 16 * j), *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::matmul;
    use rand::{Rng, SeedableRng};

    use crate::test_support::random_floats as random;

    fn rounded(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| bf16_to_f32(round_to_bf16(v))).collect()
    }

    /// Every layout the trainer uses: (lhs transposed?, rhs transposed?).
    const LAYOUTS: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

    fn operand(data: &[f32], rows: usize, cols: usize, transposed: bool) -> Operand<'_> {
        // `data` holds the matrix itself (rows × cols) or, transposed, its transpose.
        if transposed {
            Operand::transposed(data, rows)
        } else {
            Operand::plain(data, cols)
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_and_flushes_subnormals() {
        assert_eq!(round_to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and the next bf16: ties go to the even one (1.0).
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between two bf16: ties go to the even one, upward here.
        assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 4096.0), 0x3f81);
        assert_eq!(round_to_bf16(-2.5), 0xc020);
        assert_eq!(round_to_bf16(f32::MIN_POSITIVE / 2.0), 0);
        assert_eq!(round_to_bf16(-f32::MIN_POSITIVE / 2.0), 0x8000);
        assert!(bf16_to_f32(round_to_bf16(f32::NAN)).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), 0x7f80);
        // The largest finite f32 rounds up to infinity, as in IEEE arithmetic.
        assert_eq!(round_to_bf16(f32::MAX), 0x7f80);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rounding_matches_the_cpus_conversion() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn cpu(x: &[f32; 16]) -> [u16; 16] {
            use std::arch::x86_64::*;
            let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr()));
            std::mem::transmute(v)
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..20_000 {
            let x: [f32; 16] = std::array::from_fn(|_| f32::from_bits(rng.random::<u32>()));
            // SAFETY: the CPU has the features (checked above).
            let got = unsafe { cpu(&x) };
            for (v, g) in x.iter().zip(got) {
                let want = round_to_bf16(*v);
                if v.is_nan() {
                    assert!(bf16_to_f32(g).is_nan() && bf16_to_f32(want).is_nan());
                } else {
                    assert_eq!(g, want, "{v:e} ({:#010x})", v.to_bits());
                }
            }
        }
    }

    /// The conversions into pairs give the scalar rounding's bits on every path this CPU can
    /// take (the CPU's own conversion, the wide loop), for every length around the 16-pair
    /// blocks and for any bit pattern but NaN (whose payload may differ; it stays NaN).
    #[test]
    fn pair_conversions_give_the_scalar_bits_on_every_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut kernels = vec![Bf16Kernel::Portable, Bf16Kernel::detect()];
        kernels.dedup();
        for n in [0, 1, 15, 16, 17, 31, 32, 33, 70] {
            let mut value = || loop {
                let v = f32::from_bits(rng.random::<u32>());
                if !v.is_nan() {
                    // Half ordinary magnitudes, half any exponent (subnormals, infinities).
                    break if rng.random::<bool>() {
                        v
                    } else {
                        (v.to_bits() % 1000) as f32 / 7.0 - 70.0
                    };
                }
            };
            let src: Vec<f32> = (0..2 * n + 1).map(|_| value()).collect();
            let (even, odd): (Vec<f32>, Vec<f32>) = (0..n).map(|_| (value(), value())).unzip();
            let want_lines: Vec<u32> = src.chunks_exact(2).map(|p| pair(p[0], p[1])).collect();
            let want_pairs: Vec<u32> = even.iter().zip(&odd).map(|(&e, &o)| pair(e, o)).collect();
            for &kernel in &kernels {
                let mut lines = vec![u32::MAX; n + 1];
                line_pairs_by(kernel, &src, &mut lines);
                assert_eq!(&lines[..n], &want_lines[..], "{kernel:?}, {n} pairs");
                assert_eq!(lines[n], u32::MAX, "{kernel:?}: wrote past the pairs");
                let mut pairs = vec![u32::MAX; n];
                interleave_by(kernel, &even, &odd, &mut pairs);
                assert_eq!(pairs, want_pairs, "{kernel:?}, {n} pairs");
            }
        }
    }

    /// Packing the right operand gives the same words on every kernel, for both orientations:
    /// line counts around the 16 lines the AVX-512 path transposes at a time (and a last,
    /// partial group), inner lengths around its 16-pair blocks, odd ones included.
    #[test]
    fn packing_gives_the_same_words_on_every_kernel() {
        let mut kernels = vec![Bf16Kernel::Portable, Bf16Kernel::detect()];
        kernels.dedup();
        for (case, &(k, n)) in [(1, 16), (31, 17), (32, 48), (33, 50), (65, 100), (300, 96)]
            .iter()
            .enumerate()
        {
            let data = random(k * n, 300 + case as u64);
            for transposed in [false, true] {
                // Plain: k × n row-major, lines strided; transposed: each line contiguous.
                let op = operand(&data, k, n, transposed);
                let packs: Vec<Vec<u32>> = kernels
                    .iter()
                    .map(|&kernel| {
                        let mut buffer = vec![u32::MAX; 7];
                        pack(kernel, &mut buffer, op.into(), n, k, NR).data.to_vec()
                    })
                    .collect();
                let want: Vec<u32> = (0..n.div_ceil(NR) * NR * k.div_ceil(2))
                    .map(|w| {
                        let (g, rest) = (w / (NR * k.div_ceil(2)), w % (NR * k.div_ceil(2)));
                        let (p, l) = (rest / NR, g * NR + rest % NR);
                        let at = |i: usize| match (i < k && l < n, transposed) {
                            (false, _) => 0.0,
                            (true, false) => data[i * n + l],
                            (true, true) => data[l * k + i],
                        };
                        pair(at(2 * p), at(2 * p + 1))
                    })
                    .collect();
                for (kernel, got) in kernels.iter().zip(&packs) {
                    assert!(
                        got == &want,
                        "{kernel:?}, k {k}, n {n}, transposed {transposed}"
                    );
                }
            }
        }
    }

    /// Against an f64 product of the bf16-rounded operands, on every layout, sizes that leave
    /// partial tiles, panels and pairs (odd k), with and without `add`; the portable kernel
    /// gives the same bits as the AVX-512 one where the CPU has it.
    #[test]
    fn products_match_an_f64_reference_and_both_kernels_agree() {
        let mut kernels = vec![Bf16Kernel::Portable, Bf16Kernel::detect()];
        kernels.dedup();
        for (case, &(m, n, k)) in [
            (1, 1, 1),
            (9, 50, 3),
            (17, 96, 300),
            (40, 30, 257),
            (8, 48, 256),
        ]
        .iter()
        .enumerate()
        {
            for (lt, rt) in LAYOUTS {
                let (x, y) = (random(m * k, case as u64), random(k * n, 100 + case as u64));
                let (xr, yr) = (rounded(&x), rounded(&y));
                let init = random(m * n, 200 + case as u64);
                let mut outs = Vec::new();
                for &kernel in &kernels {
                    for add in [false, true] {
                        let mut dst = init.clone();
                        matmul_bf16(
                            &mut dst,
                            m,
                            n,
                            k,
                            operand(&transpose_if(&x, m, k, lt), m, k, lt),
                            operand(&transpose_if(&y, k, n, rt), k, n, rt),
                            add,
                            kernel,
                        );
                        for i in 0..m {
                            for j in 0..n {
                                let mut want = if add { init[i * n + j] as f64 } else { 0.0 };
                                let mut size = want.abs();
                                for t in 0..k {
                                    let p = xr[i * k + t] as f64 * yr[t * n + j] as f64;
                                    want += p;
                                    size += p.abs();
                                }
                                // f32 sums of k terms: within k·2⁻²⁴ of the sum of magnitudes.
                                let tol = (k as f64 + 1.0) * size * 6e-8 + 1e-30;
                                let got = dst[i * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{kernel:?} {m}×{n}×{k} lhs_t={lt} rhs_t={rt} add={add} [{i},{j}]: {got} vs {want}"
                                );
                            }
                        }
                        outs.push((kernel, add, dst));
                    }
                }
                for (kernel, add, dst) in &outs[2..] {
                    let (_, _, first) = &outs[*add as usize];
                    assert!(
                        dst.iter()
                            .zip(first)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kernel:?} differs from the portable kernel ({m}×{n}×{k}, add={add})"
                    );
                }
            }
        }
    }

    fn transpose_if(x: &[f32], rows: usize, cols: usize, t: bool) -> Vec<f32> {
        if !t {
            return x.to_vec();
        }
        let mut out = vec![0f32; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                out[j * rows + i] = x[i * cols + j];
            }
        }
        out
    }

    /// The same bits on one thread as on several (the tiling of tasks changes, each output's
    /// chain of additions does not).
    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (300, 100, 700);
        let (x, y) = (random(m * k, 1), random(k * n, 2));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut dst = vec![0f32; m * n];
                matmul_bf16(
                    &mut dst,
                    m,
                    n,
                    k,
                    Operand::plain(&x, k),
                    Operand::plain(&y, n),
                    false,
                    Bf16Kernel::detect(),
                );
                dst
            })
        };
        let one = run(1);
        assert!(run(3)
            .iter()
            .zip(&one)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// A product into stacked parts, or into a new buffer from zero or a bias, gives each output
    /// the bits `matmul_bf16` gives it after the destination is filled the same way: both
    /// kernels, every layout, edge tiles included (m and n not multiples of the tile).
    #[test]
    fn split_and_new_products_give_matmul_bf16_bits() {
        let mut kernels = vec![Bf16Kernel::Portable, Bf16Kernel::detect()];
        kernels.dedup();
        // Three parts of 24 rows (a multiple of MR), and shapes with edge tiles.
        for (case, &(m, n, k)) in [(72, 50, 37), (72, 96, 300), (48, 7, 2)].iter().enumerate() {
            for (lt, rt) in LAYOUTS {
                let (x, y) = (random(m * k, case as u64), random(k * n, 50 + case as u64));
                let (xt, yt) = (transpose_if(&x, m, k, lt), transpose_if(&y, k, n, rt));
                let (lhs, rhs) = (operand(&xt, m, k, lt), operand(&yt, k, n, rt));
                let init = random(m * n, 100 + case as u64);
                let bias = random(n, 200 + case as u64);
                for &kernel in &kernels {
                    let mut want = init.clone();
                    matmul_bf16(&mut want, m, n, k, lhs, rhs, true, kernel);
                    let mut got = init.clone();
                    let (a, rest) = got.split_at_mut(m / 3 * n);
                    let (b, c) = rest.split_at_mut(m / 3 * n);
                    matmul_bf16_split(&mut [a, b, c], m, n, k, lhs, rhs.into(), Start::Dst, kernel);
                    assert!(
                        same_bits(&got, &want),
                        "split, case {case} {lt} {rt} {kernel:?}"
                    );

                    let mut want = bias.repeat(m);
                    matmul_bf16(&mut want, m, n, k, lhs, rhs, true, kernel);
                    let got = matmul_bf16_new(m, n, k, lhs, rhs.into(), Start::Bias(&bias), kernel);
                    assert!(
                        same_bits(&got, &want),
                        "bias, case {case} {lt} {rt} {kernel:?}"
                    );

                    let mut want = init.clone();
                    matmul_bf16(&mut want, m, n, k, lhs, rhs, false, kernel);
                    let got = matmul_bf16_new(m, n, k, lhs, rhs.into(), Start::Zero, kernel);
                    assert!(
                        same_bits(&got, &want),
                        "zero, case {case} {lt} {rt} {kernel:?}"
                    );

                    // New parts from zero: the bits of adding the product onto zeros.
                    let mut want = vec![0.0; m * n];
                    matmul_bf16(&mut want, m, n, k, lhs, rhs, true, kernel);
                    let got =
                        matmul_bf16_split_new(3, m, n, k, lhs, rhs.into(), Start::Zero, kernel);
                    assert!(got.iter().all(|part| part.len() == m / 3 * n));
                    assert!(
                        same_bits(&got.concat(), &want),
                        "new parts, case {case} {lt} {rt} {kernel:?}"
                    );
                }
            }
        }
        // No inner dimension: the start alone.
        let empty = Operand::plain(&[], 0);
        let got = matmul_bf16_new(
            2,
            3,
            0,
            empty,
            empty.into(),
            Start::Bias(&[1.0, 2.0, 3.0]),
            kernels[0],
        );
        assert_eq!(got, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    /// The inner dimension's block size (chosen by the L1 cache's size) changes no bit: every
    /// block size, on both kernels and every layout, gives `matmul_bf16`'s result for a product
    /// whose inner dimension spans several blocks of each (and a short last one).
    #[test]
    fn block_size_changes_no_bit() {
        let mut kernels = vec![Bf16Kernel::Portable, Bf16Kernel::detect()];
        kernels.dedup();
        let (m, n, k) = (19, 53, 2 * KC_LARGE_L1 + 2 * 37 + 1);
        for (lt, rt) in LAYOUTS {
            let (x, y) = (random(m * k, 7), random(k * n, 8));
            let (xt, yt) = (transpose_if(&x, m, k, lt), transpose_if(&y, k, n, rt));
            let (lhs, rhs) = (operand(&xt, m, k, lt), operand(&yt, k, n, rt));
            let init = random(m * n, 9);
            for &kernel in &kernels {
                let mut want = init.clone();
                matmul_bf16(&mut want, m, n, k, lhs, rhs, true, kernel);
                for kc in [1, 37, KC, KC_LARGE_L1, k] {
                    let mut got = init.clone();
                    // SAFETY: `got` is m × n, initialised.
                    unsafe {
                        product(
                            &[got.as_mut_ptr()],
                            m,
                            (m, n, k),
                            lhs,
                            rhs.into(),
                            Start::Dst,
                            kernel,
                            kc,
                        )
                    };
                    assert!(same_bits(&got, &want), "kc {kc}, {lt} {rt} {kernel:?}");
                }
            }
        }
        assert!([KC, KC_LARGE_L1].contains(&block_pairs()));
    }

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("48K\n"), Some(48 * 1024));
        assert_eq!(parse_cache_size("32K"), Some(32 * 1024));
        assert_eq!(parse_cache_size("1M"), Some(1024 * 1024));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("many"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    /// A right operand read from stacked row blocks (the query, key and value weights where
    /// they lie) gives the bits of the same operand copied into one matrix, both ways round
    /// (x·Wᵀ over stacked weights, dy·W over stacked rows), on both kernels, with part sizes
    /// that are not multiples of the panel or of a pair.
    #[test]
    fn stacked_operands_give_the_bits_of_one_matrix() {
        let mut kernels = vec![Bf16Kernel::Portable, Bf16Kernel::detect()];
        kernels.dedup();
        for (case, &(m, h, inputs)) in [(37, 32, 40), (20, 51, 17), (9, 64, 96)].iter().enumerate()
        {
            let parts: Vec<Vec<f32>> = (0..3)
                .map(|p| random(h * inputs, 10 * case as u64 + p))
                .collect();
            let stacked: Vec<f32> = parts.concat();
            let refs: Vec<&[f32]> = parts.iter().map(|p| &p[..]).collect();
            let x = random(m * inputs, 7 + case as u64);
            let dy = random(m * 3 * h, 8 + case as u64);
            let bias = random(3 * h, 9 + case as u64);
            for &kernel in &kernels {
                // x·Wᵀ: m × 3h over `inputs` terms.
                let want = matmul_bf16_new(
                    m,
                    3 * h,
                    inputs,
                    Operand::plain(&x, inputs),
                    Operand::transposed(&stacked, inputs).into(),
                    Start::Bias(&bias),
                    kernel,
                );
                let lines = Rhs::StackedLines {
                    parts: &refs,
                    part_rows: h,
                };
                let got = matmul_bf16_new(
                    m,
                    3 * h,
                    inputs,
                    Operand::plain(&x, inputs),
                    lines,
                    Start::Bias(&bias),
                    kernel,
                );
                assert!(same_bits(&got, &want), "lines, case {case} {kernel:?}");
                // dy·W: m × inputs over 3h terms, added to what dst holds.
                let mut want = x.clone();
                matmul_bf16(
                    &mut want,
                    m,
                    inputs,
                    3 * h,
                    Operand::plain(&dy, 3 * h),
                    Operand::plain(&stacked, inputs),
                    true,
                    kernel,
                );
                let mut got = x.clone();
                let rows = Rhs::StackedRows {
                    parts: &refs,
                    part_rows: h,
                };
                matmul_bf16_split(
                    &mut [&mut got],
                    m,
                    inputs,
                    3 * h,
                    Operand::plain(&dy, 3 * h),
                    rows,
                    Start::Dst,
                    kernel,
                );
                assert!(same_bits(&got, &want), "rows, case {case} {kernel:?}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "rhs: 3 parts of 4 rows do not make 13 × 5")]
    fn stacked_parts_must_make_the_operand() {
        let parts = [vec![0f32; 20], vec![0f32; 20], vec![0f32; 20]];
        let refs: Vec<&[f32]> = parts.iter().map(|p| &p[..]).collect();
        let x = vec![0f32; 2 * 13];
        let rows = Rhs::StackedRows {
            parts: &refs,
            part_rows: 4,
        };
        matmul_bf16_new(
            2,
            5,
            13,
            Operand::plain(&x, 13),
            rows,
            Start::Zero,
            Bf16Kernel::Portable,
        );
    }

    #[test]
    #[should_panic(expected = "matmul_bf16_split: 20 rows in 2 parts")]
    fn split_parts_must_hold_whole_tiles() {
        let (x, y) = (random(20 * 4, 1), random(4 * 5, 2));
        let mut dst = vec![0f32; 20 * 5];
        let (a, b) = dst.split_at_mut(10 * 5);
        let (lhs, rhs) = (Operand::plain(&x, 4), Operand::plain(&y, 5));
        matmul_bf16_split(
            &mut [a, b],
            20,
            5,
            4,
            lhs,
            rhs.into(),
            Start::Dst,
            Bf16Kernel::Portable,
        );
    }

    /// Close to the f32 product: bf16 operands keep 8 significant bits, so each product is off
    /// by at most about 2⁻⁸ relative (measured: well inside it for sums of random terms).
    #[test]
    fn products_are_close_to_the_f32_product() {
        let (m, n, k) = (64, 96, 384);
        let (x, y) = (random(m * k, 3), random(k * n, 4));
        let mut f32_out = vec![0f32; m * n];
        matmul(
            &mut f32_out,
            m,
            n,
            k,
            Operand::plain(&x, k),
            Operand::plain(&y, n),
            false,
        );
        let mut bf16_out = vec![0f32; m * n];
        matmul_bf16(
            &mut bf16_out,
            m,
            n,
            k,
            Operand::plain(&x, k),
            Operand::plain(&y, n),
            false,
            Bf16Kernel::detect(),
        );
        let scale = (k as f32 / 9.0).sqrt(); // the size of a sum of k products of U(−1, 1)
        let worst = f32_out
            .iter()
            .zip(&bf16_out)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        assert!(worst < 2e-2, "worst relative error {worst}");
        assert!(
            worst > 0.0,
            "bf16 rounding left no trace: is the f32 path running?"
        );
    }
}
