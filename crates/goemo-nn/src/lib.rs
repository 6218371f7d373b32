//! Transformer encoders (BERT, DistilBERT) for multi-label classification, on the CPU without a
//! framework's autograd, and through candle as the reference.
//!
//! - [`config`]: the HF `config.json` ([`config::EncoderConfig`]) and model folders.
//! - [`params`]: the parameters as one typed tree ([`params::Encoder`]) whose leaves are
//!   candle variables, tensors, packed weights, gradients or optimizer moments; HF's tensor
//!   names come from it alone.
//! - [`model`]: the candle parameters, weight import/export in the HF checkpoint layout and
//!   candle's padded forward (the reference, and the CUDA path).
//! - [`infer`]: the packed encoder: rows concatenated without padding, products through gemm in
//!   a fixed summation order, so the same weights give the same bits on any x86-64 with FMA.
//! - [`classifier`]: a fine-tuned model loaded for scoring text.
//! - [`backprop`]: the packed trainer's forward and backward passes over the same kernels.
//! - [`bf16`]: bf16 matrix products with f32 sums for training (`vdpbf16ps`, or a portable
//!   kernel giving the same bits).
//! - [`optim`]: AdamW over the parameter tree.
//! - [`loss`]: binary cross-entropy on logits.
//!
//! Knows nothing of pipelines, stages or datasets: callers pass token ids and labels.

/// `fn NAME(args) [-> T] => BODY`: NAME calls BODY (an `#[inline(always)]` function) compiled
/// for AVX-512 when this CPU has it, else as it is. Only for code whose float operations are the
/// same either way: elementwise formulas and sums in explicit lanes. Rust never reassociates or
/// fuses float operations, so wider registers give the same bytes, only sooner.
macro_rules! wide_fn {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) => $body:path) => {
        wide_fn!($(#[$m])* fn $name($($arg: $ty),*) -> () => $body);
    };
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $body:path) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                // avx512dq for its 64-bit multiply (the dropout hash's, three per element).
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// The environment variable that makes every dispatching kernel (bf16 products, int8 products,
/// attention for scoring and training) take its portable path, as on a CPU without AVX-512 BF16
/// or VNNI: `GOEMO_KERNELS=portable`.
/// The portable kernels give the same bits, so a run under it must reproduce a lock written
/// without it (CI checks that); it is only slower.
pub const KERNELS_ENV: &str = "GOEMO_KERNELS";

/// Whether `GOEMO_KERNELS=portable` is set (read once per process).
pub fn portable_kernels_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(KERNELS_ENV).is_ok_and(|v| v.trim() == "portable"))
}

mod attention;
pub mod backprop;
pub mod bf16;
pub mod classifier;
pub mod config;
mod gelu;
pub mod infer;
pub mod int8;
pub mod loss;
pub mod model;
pub mod optim;
pub mod params;

#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

/// What goes wrong between the parameter tree and the tensors given to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the model has no tensor `{name}`")]
    MissingTensor { name: String },
    #[error("two parameter trees of different shapes (architecture or layer count)")]
    TreeShape,
}
