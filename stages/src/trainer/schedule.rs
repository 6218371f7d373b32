//! The learning-rate schedule: linear warmup, then linear decay to 0.

/// Linear warmup to `lr`, then linear decay to 0 at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64) -> f64 {
    if step < warmup {
        lr * (step + 1) as f64 / warmup as f64
    } else {
        lr * (total.saturating_sub(step)) as f64 / (total - warmup).max(1) as f64
    }
}
