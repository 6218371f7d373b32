//! The arithmetic a scoring stage's encoder uses (`precision:` of thresholds and evaluate).
//! Named here, beside the other scoring params, so params need no ML crate; the stages map it
//! onto goemo-nn's `infer::Precision`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 products: the reference, and the arithmetic of every entry made before the param.
    #[default]
    F32,
    /// The encoder layers' products in int8 (weights per output channel, activations per row).
    Int8,
}

impl Precision {
    /// Params and files leave the default out, so entries and files written before this param
    /// existed keep their keys and bytes.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}
