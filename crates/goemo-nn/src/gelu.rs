//! GELU (the erf form) for int8 scoring, by table: Φ(x) = ½(1 + erf(x/√2)) as a cubic in
//! each of 32 equal intervals of [−5, 5], GELU(x) = x · Φ(x). Its largest error against the
//! exact GELU is 2.4e-6 on [−8, 8] (test below): a thousandth of the u8 step the result is
//! quantized to next, so int8's scores cannot tell it from the rational erf the f32 encoder
//! keeps (whose bytes pipeline.lock records). It is about half the work of the rational: no
//! division, and the interval's coefficients come from two registers by one permute each.
//!
//! The AVX-512 kernel does the scalar reference's float operations in the same order (a
//! multiply, then an add: no fused multiply-add), so both give the same bytes (tested): the
//! portable path reproduces VNNI runs' int8 entries.

/// Φ is evaluated on [−LIMIT, LIMIT]; outside it the end intervals' values hold (Φ(−5) =
/// 2.9e-7, Φ(5) = 1 − 2.9e-7).
const LIMIT: f32 = 5.0;
/// Intervals per unit of x: 32 over [−5, 5].
const PER_UNIT: f32 = 3.2;
/// The last interval's index.
const LAST: f32 = 31.0;

/// COEFFS[k][i]: the coefficient of uᵏ in interval i, u ∈ [0, 1] the position within it;
/// fitted to Φ in f64 (least squares reweighted towards the largest error), then rounded to
/// f32.
#[rustfmt::skip]
static COEFFS: [[f32; 32]; 4] = [
    [
        2.8563295e-7, 1.3792966e-6, 6.060824e-6, 2.4245606e-5,
        8.8347006e-5, 2.9340872e-4, 8.887625e-4, 2.4575074e-3,
        6.2092002e-3, 1.4352662e-2, 3.03964e-2, 5.9085786e-2,
        1.0565111e-1, 1.742524e-1, 2.6598695e-1, 3.7733084e-1,
        4.999994e-1, 6.2266827e-1, 7.340127e-1, 8.257479e-1,
        8.943495e-1, 9.409148e-1, 9.69604e-1, 9.8564744e-1,
        9.9379075e-1, 9.975424e-1, 9.991111e-1, 9.997065e-1,
        9.999116e-1, 9.9997574e-1, 9.999939e-1, 9.999986e-1,
    ],
    [
        4.949993e-7, 2.216399e-6, 9.024118e-6, 3.3399218e-5,
        1.1233408e-4, 3.432483e-4, 9.5260935e-4, 2.400651e-3,
        5.492365e-3, 1.1405766e-2, 2.1495746e-2, 3.6760177e-2,
        5.703589e-2, 8.028147e-2, 1.0250335e-1, 1.1870844e-1,
        1.2468583e-1, 1.1877335e-1, 1.0260468e-1, 8.0379404e-2,
        5.7100255e-2, 3.6782276e-2, 2.1484708e-2, 1.1379231e-2,
        5.4648826e-3, 2.379743e-3, 9.396334e-4, 3.3640699e-4,
        1.0920679e-4, 3.2144966e-5, 8.579389e-6, 2.0762586e-6,
    ],
    [
        2.2223546e-7, 1.0542682e-6, 4.4169165e-6, 1.6421889e-5,
        5.4339496e-5, 1.6028062e-4, 4.2166718e-4, 9.891093e-4,
        2.0661098e-3, 3.833779e-3, 6.2925187e-3, 9.073335e-3,
        1.1351625e-2, 1.203682e-2, 1.0254202e-2, 5.9064366e-3,
        -7.0955226e-5, -6.015786e-3, -1.0286379e-2, -1.1991873e-2,
        -1.1266729e-2, -8.994004e-3, -6.2451586e-3, -3.8207532e-3,
        -2.075121e-3, -1.0054659e-3, -4.3610422e-4, -1.6973332e-4,
        -5.9385653e-5, -1.8703924e-5, -5.308719e-6, -1.3590233e-6,
    ],
    [
        3.7892903e-7, 1.4181492e-6, 4.7623325e-6, 1.4321244e-5,
        3.8464583e-5, 9.194114e-5, 1.9459942e-4, 3.6200375e-4,
        5.8488076e-4, 8.037928e-4, 9.004945e-4, 7.311311e-4,
        2.1341634e-4, -5.8347976e-4, -1.4128046e-3, -1.9451595e-3,
        -1.9451596e-3, -1.4128049e-3, -5.8348017e-4, 2.1341602e-4,
        7.3113095e-4, 9.004945e-4, 8.037929e-4, 5.848809e-4,
        3.6200383e-4, 1.9459949e-4, 9.1941176e-5, 3.8464597e-5,
        1.4321251e-5, 4.762335e-6, 1.4181501e-6, 3.789292e-7,
    ],
];

/// GELU of one value: the reference the vector kernel matches bit for bit.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let t = x.clamp(-LIMIT, LIMIT);
    let f = (t + LIMIT) * PER_UNIT;
    let start = f.floor().min(LAST);
    let u = f - start;
    let i = start as usize;
    // Rust never fuses a multiply and an add: each rounds, as in the vector kernel.
    let p = ((COEFFS[3][i] * u + COEFFS[2][i]) * u + COEFFS[1][i]) * u + COEFFS[0][i];
    x * p
}

/// GELU of every value of `row`, in place.
pub(crate) fn gelu_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if !crate::portable_kernels_forced() && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::gelu_in_place(row) };
    }
    row.iter_mut().for_each(|v| *v = gelu(*v));
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{COEFFS, LAST, LIMIT, PER_UNIT};

    /// `super::gelu` on 16 values at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_in_place(row: &mut [f32]) {
        // Each coefficient's 32 values in two registers: the interval index's bit 4 picks one.
        let table = |k: usize| {
            (
                _mm512_loadu_ps(COEFFS[k].as_ptr()),
                _mm512_loadu_ps(COEFFS[k].as_ptr().add(16)),
            )
        };
        let (c0, c1, c2, c3) = (table(0), table(1), table(2), table(3));
        let (lo, hi) = (_mm512_set1_ps(-LIMIT), _mm512_set1_ps(LIMIT));
        let (per_unit, last) = (_mm512_set1_ps(PER_UNIT), _mm512_set1_ps(LAST));
        let n = row.len() / 16 * 16;
        for c in (0..n).step_by(16) {
            let ptr = row.as_mut_ptr().add(c);
            let x = _mm512_loadu_ps(ptr);
            let t = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
            let f = _mm512_mul_ps(_mm512_add_ps(t, hi), per_unit);
            let start = _mm512_min_ps(
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(f),
                last,
            );
            let u = _mm512_sub_ps(f, start);
            let i = _mm512_cvttps_epi32(start);
            let pick = |(a, b): (__m512, __m512)| _mm512_permutex2var_ps(a, i, b);
            let mut p = _mm512_mul_ps(pick(c3), u);
            p = _mm512_add_ps(p, pick(c2));
            p = _mm512_mul_ps(p, u);
            p = _mm512_add_ps(p, pick(c1));
            p = _mm512_mul_ps(p, u);
            p = _mm512_add_ps(p, pick(c0));
            _mm512_storeu_ps(ptr, _mm512_mul_ps(x, p));
        }
        row[n..].iter_mut().for_each(|v| *v = super::gelu(*v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(x: f64) -> f64 {
        x * 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2))
    }

    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (-80_000..=80_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([
            -5.0,
            5.0,
            -4.999_999_5,
            4.999_999_5,
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            30.0,
            -30.0,
            1e6,
            -1e6,
        ]);
        xs.push(f32::MIN_POSITIVE);
        xs
    }

    #[test]
    fn within_2_5e_6_of_the_exact_gelu() {
        for x in inputs() {
            let (got, want) = (gelu(x) as f64, exact(x as f64));
            // Beyond ±5 the end intervals hold: x · (1 − 2.9e-7), in f32 within 4e-7 of x.
            let tol = 2.5e-6f64.max(4e-7 * (x as f64).abs());
            assert!(
                (got - want).abs() <= tol,
                "gelu({x}) = {got}, exactly {want}"
            );
        }
    }

    #[test]
    fn the_vector_kernel_gives_the_scalar_bytes() {
        let xs = inputs();
        // Lengths with every tail of a 16-value register.
        for len in [xs.len(), xs.len() - 1, 15, 17, 1] {
            let mut fast = xs[..len].to_vec();
            gelu_in_place(&mut fast);
            for (x, f) in xs.iter().zip(&fast) {
                assert_eq!(f.to_bits(), gelu(*x).to_bits(), "gelu({x})");
            }
        }
    }
}
