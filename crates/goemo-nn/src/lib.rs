//! Transformer encoders (BERT, DistilBERT) for multi-label classification, on the CPU without a
//! framework's autograd, and through candle as the reference.
//!
//! - [`model`]: the HF `config.json` ([`model::EncoderConfig`]), the parameters, weight
//!   import/export in the HF checkpoint layout, candle's padded forward (the reference, and the
//!   CUDA path) and the [`model::Classifier`] that scores text.
//! - [`infer`]: the packed encoder: rows concatenated without padding, products through gemm in
//!   a fixed summation order, so the same weights give the same bits on any x86-64 with FMA.
//! - [`backprop`]: the packed trainer's forward and backward passes over the same kernels.
//! - [`loss`]: binary cross-entropy on logits.
//!
//! Knows nothing of pipelines, stages or datasets: callers pass token ids and labels.

pub mod backprop;
pub mod infer;
pub mod loss;
pub mod model;

#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
