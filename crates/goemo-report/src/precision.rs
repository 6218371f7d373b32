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

/// The revision of goemo-nn's int8 arithmetic, raised whenever an int8 score can change: 1 since
/// activations are quantized over each row's own range with a zero point of their own (they were
/// symmetric around 128); 2 since GELU is a piecewise cubic (goemo-nn's `gelu`), 2.4e-6 from
/// exact. Int8 scoring stages key on it ([`Precision::stage_version`]) and thresholds.json
/// records it, so `goemo predict` can say when a file was tuned on other int8 scores.
pub const INT8_ARITHMETIC: u32 = 2;

impl Precision {
    /// Params and files leave the default out, so entries and files written before this param
    /// existed keep their keys and bytes.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The version of a scoring stage's run in this precision, given the stage's own (that of
    /// its f32 runs). Int8's arithmetic changes on its own; its runs then get new keys while
    /// f32 entries and locks keep theirs: f32's version plus [`INT8_ARITHMETIC`].
    pub fn stage_version(self, f32_version: u32) -> u32 {
        match self {
            Precision::F32 => f32_version,
            Precision::Int8 => f32_version + INT8_ARITHMETIC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}
