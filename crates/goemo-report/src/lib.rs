//! What goemo reports: multi-label metrics ([`metrics`]: per-label counts, macro-F1, ROC-AUC,
//! average precision, PR curves, threshold search, bootstrap intervals) and charts ([`charts`],
//! plotters, PNG and SVG). Knows nothing of pipelines or models.

pub mod charts;
pub mod metrics;
