//! A fine-tuned classifier loaded from an HF folder for scoring: the packed encoder on the
//! CPU, candle's padded forward elsewhere.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{EncoderConfig, ModelDir};
use crate::infer::{PackedEncoder, Precision};
use crate::model::{forward, Batch};
use crate::params::{Encoder, Spec};

/// A fine-tuned classifier loaded for inference from an HF folder (goemo's export, or any
/// `*ForSequenceClassification` checkpoint of a supported architecture).
pub struct Classifier {
    pub dir: PathBuf,
    pub cfg: EncoderConfig,
    pub labels: Vec<String>,
    pub device: Device,
    scorer: Scorer,
}

/// How a classifier computes its scores. On the CPU only the packed copy of the weights is
/// kept once loaded; the candle tensors are freed then (while loading, both copies exist, so
/// the peak memory is not lower, only what stays resident while scoring).
enum Scorer {
    /// The padding-free CPU encoder (infer.rs).
    Packed(Box<PackedEncoder>),
    /// `forward` on padded batches, on other devices.
    Graph(Encoder<Tensor>),
}

impl Classifier {
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Classifier> {
        Classifier::load_with(path, device, Precision::F32)
    }

    /// [`Classifier::load`], the packed encoder's products in `precision` (on the CPU; other
    /// devices score in f32).
    pub fn load_with(
        path: &Path,
        device: &Device,
        precision: Precision,
    ) -> anyhow::Result<Classifier> {
        let md = ModelDir::open(path)?;
        let config_path = md.dir.join("config.json");
        let id2label = md.cfg.raw["id2label"].as_object().ok_or_else(|| {
            anyhow::anyhow!("{}: no `id2label`; this is a base model, not a fine-tuned classifier (train one with `goemo run`)", config_path.display())
        })?;
        let mut labels = vec![String::new(); id2label.len()];
        for (k, v) in id2label {
            let i: usize = k.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: id2label key `{k}` is not an index",
                    config_path.display()
                )
            })?;
            let slot = labels.get_mut(i).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: id2label index {i} is out of range",
                    config_path.display()
                )
            })?;
            *slot = v.as_str().unwrap_or_default().to_owned();
        }
        let file = &md.weights;
        let loaded = candle_core::safetensors::load(file, device)
            .map_err(|e| anyhow::anyhow!("{}: cannot load: {e}", file.display()))?;
        let specs = Encoder::<Spec>::new(&md.cfg, labels.len());
        let weights = specs.map(|name, spec| -> anyhow::Result<Tensor> {
            let t = loaded.get(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: tensor `{name}` is missing; is this a fine-tuned {} export?",
                    file.display(),
                    md.cfg.architecture_name()
                )
            })?;
            if t.dims() != spec.shape.as_slice() {
                anyhow::bail!(
                    "{}: tensor `{name}` has shape {:?}, config.json implies {:?}",
                    file.display(),
                    t.dims(),
                    spec.shape
                );
            }
            Ok(t.to_dtype(DType::F32)?)
        })?;
        let scorer = match device {
            Device::Cpu => Scorer::Packed(Box::new(PackedEncoder::with_precision(
                &md.cfg, &weights, precision,
            )?)),
            _ => Scorer::Graph(weights),
        };
        Ok(Classifier {
            dir: md.dir,
            cfg: md.cfg,
            labels,
            device: device.clone(),
            scorer,
        })
    }

    /// Sigmoid scores for pre-tokenized rows (row-major, rows × labels).
    pub fn scores(&self, rows: &[&[u32]], pad_id: u32) -> anyhow::Result<Vec<f32>> {
        match &self.scorer {
            Scorer::Packed(packed) => packed.scores(rows),
            Scorer::Graph(weights) => {
                let batch = Batch::new(rows, pad_id, &self.device)?;
                let logits = forward(&self.cfg, weights, &batch, None)?;
                Ok(candle_nn::ops::sigmoid(&logits)?.flatten_all()?.to_vec1()?)
            }
        }
    }
}
