//! The model's parameters as one typed tree, whatever each leaf holds.
//!
//! [`Encoder<T>`] mirrors the modules of HF's `BertForSequenceClassification` /
//! `DistilBertForSequenceClassification`: embeddings, encoder layers, the head's first dense
//! layer (BERT's pooler, DistilBERT's pre_classifier) and the classifier. The same tree holds
//! candle `Var`s (training), plain tensors (inference, export), borrowed `f32` slices (the
//! packed trainer's weights), gradients and AdamW's moments, so code reaches a tensor by field
//! (`layer.attn_norm.weight`), never by a name looked up at run time.
//!
//! HF's tensor names exist in one place, [`Encoder::slots`]: every leaf in a fixed order (the
//! order parameters are initialised, updated and summed in, which the bits of a run depend
//! on), with its name and whether it is decayed and part of the new head. [`Encoder::map`],
//! [`Encoder::zip`] and [`Encoder::leaves`] are built on that order.

use std::collections::HashMap;

use crate::config::{Arch, EncoderConfig};
use crate::Error;

/// A dense layer as HF stores it: `weight` is (out, in), `bias` (out).
#[derive(Debug, Clone)]
pub struct Dense<T> {
    pub weight: T,
    pub bias: T,
}

/// A LayerNorm's scale (`weight`, γ) and shift (`bias`, β).
#[derive(Debug, Clone)]
pub struct LayerNorm<T> {
    pub weight: T,
    pub bias: T,
}

#[derive(Debug, Clone)]
pub struct Embeddings<T> {
    pub word: T,
    pub position: T,
    /// BERT's token-type table (row 0 is used: single-segment input); DistilBERT has none.
    pub token_type: Option<T>,
    pub norm: LayerNorm<T>,
}

/// One encoder layer: self-attention, then the feed-forward block, each closed by a residual
/// connection and a LayerNorm.
#[derive(Debug, Clone)]
pub struct Layer<T> {
    pub query: Dense<T>,
    pub key: Dense<T>,
    pub value: Dense<T>,
    pub attn_out: Dense<T>,
    pub attn_norm: LayerNorm<T>,
    pub ffn_in: Dense<T>,
    pub ffn_out: Dense<T>,
    pub ffn_norm: LayerNorm<T>,
}

/// The whole classifier.
#[derive(Debug, Clone)]
pub struct Encoder<T> {
    pub arch: Arch,
    pub embeddings: Embeddings<T>,
    pub layers: Vec<Layer<T>>,
    /// The head's first layer: BERT's pooler (tanh after it), DistilBERT's pre_classifier
    /// (ReLU after it). New when fine-tuning starts from a base checkpoint.
    pub pool: Dense<T>,
    /// Hidden → labels. New when fine-tuning starts.
    pub classifier: Dense<T>,
}

/// What the tree says about one leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// HF's tensor name (`bert.encoder.layer.0.attention.self.query.weight`, …).
    pub name: String,
    /// Weight decay applies (not to biases and LayerNorm parameters, as HF's Trainer).
    pub decay: bool,
    /// Part of the head (pool and classifier), absent from a base checkpoint.
    pub head: bool,
    /// The encoder layer it belongs to (0 = the one next to the embeddings); `None` for the
    /// embeddings and the head.
    pub layer: Option<usize>,
}

/// How a leaf is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal,
    Zeros,
    Ones,
}

/// A leaf's shape and initialisation: the tree `Encoder::<Spec>::new` builds for a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub shape: Vec<usize>,
    pub init: Init,
}

impl<T> Dense<T> {
    fn map_each<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> Dense<U> {
        Dense {
            weight: f(&self.weight),
            bias: f(&self.bias),
        }
    }
    fn leaves<'a>(&'a self, out: &mut Vec<&'a T>) {
        out.extend([&self.weight, &self.bias]);
    }
    fn leaves_mut<'a>(&'a mut self, out: &mut Vec<&'a mut T>) {
        out.extend([&mut self.weight, &mut self.bias]);
    }
    fn from_leaves(next: &mut impl FnMut() -> Result<T, Error>) -> Result<Dense<T>, Error> {
        Ok(Dense {
            weight: next()?,
            bias: next()?,
        })
    }
    fn slots(path: &str, head: bool, out: &mut Vec<Slot>) {
        out.push(slot(format!("{path}.weight"), true, head));
        out.push(slot(format!("{path}.bias"), false, head));
    }
}

impl<T> LayerNorm<T> {
    fn map_each<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> LayerNorm<U> {
        LayerNorm {
            weight: f(&self.weight),
            bias: f(&self.bias),
        }
    }
    fn leaves<'a>(&'a self, out: &mut Vec<&'a T>) {
        out.extend([&self.weight, &self.bias]);
    }
    fn leaves_mut<'a>(&'a mut self, out: &mut Vec<&'a mut T>) {
        out.extend([&mut self.weight, &mut self.bias]);
    }
    fn from_leaves(next: &mut impl FnMut() -> Result<T, Error>) -> Result<LayerNorm<T>, Error> {
        Ok(LayerNorm {
            weight: next()?,
            bias: next()?,
        })
    }
    fn slots(path: &str, out: &mut Vec<Slot>) {
        out.push(slot(format!("{path}.weight"), false, false));
        out.push(slot(format!("{path}.bias"), false, false));
    }
}

fn slot(name: String, decay: bool, head: bool) -> Slot {
    Slot {
        name,
        decay,
        head,
        layer: None,
    }
}

impl<T> Layer<T> {
    fn map_each<'a, U>(&'a self, f: &mut impl FnMut(&'a T) -> U) -> Layer<U> {
        Layer {
            query: self.query.map_each(f),
            key: self.key.map_each(f),
            value: self.value.map_each(f),
            attn_out: self.attn_out.map_each(f),
            attn_norm: self.attn_norm.map_each(f),
            ffn_in: self.ffn_in.map_each(f),
            ffn_out: self.ffn_out.map_each(f),
            ffn_norm: self.ffn_norm.map_each(f),
        }
    }
    fn leaves<'a>(&'a self, out: &mut Vec<&'a T>) {
        self.query.leaves(out);
        self.key.leaves(out);
        self.value.leaves(out);
        self.attn_out.leaves(out);
        self.attn_norm.leaves(out);
        self.ffn_in.leaves(out);
        self.ffn_out.leaves(out);
        self.ffn_norm.leaves(out);
    }
    fn leaves_mut<'a>(&'a mut self, out: &mut Vec<&'a mut T>) {
        self.query.leaves_mut(out);
        self.key.leaves_mut(out);
        self.value.leaves_mut(out);
        self.attn_out.leaves_mut(out);
        self.attn_norm.leaves_mut(out);
        self.ffn_in.leaves_mut(out);
        self.ffn_out.leaves_mut(out);
        self.ffn_norm.leaves_mut(out);
    }
    fn from_leaves(next: &mut impl FnMut() -> Result<T, Error>) -> Result<Layer<T>, Error> {
        Ok(Layer {
            query: Dense::from_leaves(next)?,
            key: Dense::from_leaves(next)?,
            value: Dense::from_leaves(next)?,
            attn_out: Dense::from_leaves(next)?,
            attn_norm: LayerNorm::from_leaves(next)?,
            ffn_in: Dense::from_leaves(next)?,
            ffn_out: Dense::from_leaves(next)?,
            ffn_norm: LayerNorm::from_leaves(next)?,
        })
    }
    /// HF's module paths of layer `l`, in the order of the fields.
    fn slots(arch: Arch, l: usize, out: &mut Vec<Slot>) {
        let first = out.len();
        let (base, names) = match arch {
            Arch::Bert => (
                format!("bert.encoder.layer.{l}"),
                [
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                    "attention.output.dense",
                    "attention.output.LayerNorm",
                    "intermediate.dense",
                    "output.dense",
                    "output.LayerNorm",
                ],
            ),
            Arch::DistilBert => (
                format!("distilbert.transformer.layer.{l}"),
                [
                    "attention.q_lin",
                    "attention.k_lin",
                    "attention.v_lin",
                    "attention.out_lin",
                    "sa_layer_norm",
                    "ffn.lin1",
                    "ffn.lin2",
                    "output_layer_norm",
                ],
            ),
        };
        for (i, name) in names.iter().enumerate() {
            let path = format!("{base}.{name}");
            // Fields 4 and 7 are the LayerNorms.
            if i == 4 || i == 7 {
                LayerNorm::<()>::slots(&path, out);
            } else {
                Dense::<()>::slots(&path, false, out);
            }
        }
        out[first..].iter_mut().for_each(|s| s.layer = Some(l));
    }
}

impl<T> Encoder<T> {
    /// Every leaf's name, decay and head flags, in the tree's fixed order (that of
    /// [`Encoder::leaves`]).
    pub fn slots(&self) -> Vec<Slot> {
        slots_of(self.arch, self.layers.len())
    }

    /// The leaves in the tree's fixed order.
    pub fn leaves(&self) -> Vec<&T> {
        let mut out = Vec::new();
        let e = &self.embeddings;
        out.extend([&e.word, &e.position]);
        out.extend(e.token_type.as_ref());
        e.norm.leaves(&mut out);
        for layer in &self.layers {
            layer.leaves(&mut out);
        }
        self.pool.leaves(&mut out);
        self.classifier.leaves(&mut out);
        out
    }

    /// The leaves, mutably, in the tree's fixed order.
    pub fn leaves_mut(&mut self) -> Vec<&mut T> {
        let mut out = Vec::new();
        let e = &mut self.embeddings;
        out.extend([&mut e.word, &mut e.position]);
        out.extend(e.token_type.as_mut());
        e.norm.leaves_mut(&mut out);
        for layer in &mut self.layers {
            layer.leaves_mut(&mut out);
        }
        self.pool.leaves_mut(&mut out);
        self.classifier.leaves_mut(&mut out);
        out
    }

    /// Each leaf with its name, in the tree's fixed order.
    pub fn named(&self) -> impl Iterator<Item = (String, &T)> + '_ {
        self.slots().into_iter().map(|s| s.name).zip(self.leaves())
    }

    /// A tree of the same shape whose leaves are `f(leaf)`, leaf by leaf in the fixed order.
    pub fn map_each<'a, U>(&'a self, mut f: impl FnMut(&'a T) -> U) -> Encoder<U> {
        let e = &self.embeddings;
        let word = f(&e.word);
        let position = f(&e.position);
        let token_type = e.token_type.as_ref().map(&mut f);
        let embeddings = Embeddings {
            word,
            position,
            token_type,
            norm: e.norm.map_each(&mut f),
        };
        let layers = self.layers.iter().map(|l| l.map_each(&mut f)).collect();
        Encoder {
            arch: self.arch,
            embeddings,
            layers,
            pool: self.pool.map_each(&mut f),
            classifier: self.classifier.map_each(&mut f),
        }
    }

    /// A tree of the same shape whose leaves are `f(name, leaf)`.
    pub fn map<'a, U, E>(
        &'a self,
        mut f: impl FnMut(&str, &'a T) -> Result<U, E>,
    ) -> Result<Encoder<U>, E>
    where
        E: From<Error>,
    {
        let mut it = self.named();
        self.rebuild(|| match it.next() {
            Some((name, t)) => f(&name, t),
            None => Err(Error::TreeShape.into()),
        })
    }

    /// The two trees leaf by leaf; `other` must have this one's shape.
    pub fn zip<'a, U>(&'a self, other: &'a Encoder<U>) -> Result<Encoder<(&'a T, &'a U)>, Error> {
        if self.arch != other.arch || self.layers.len() != other.layers.len() {
            return Err(Error::TreeShape);
        }
        let mut it = self.leaves().into_iter().zip(other.leaves());
        self.rebuild(|| it.next().ok_or(Error::TreeShape))
    }

    /// A tree of this one's shape from leaves given in the fixed order.
    fn rebuild<U, E>(&self, mut next: impl FnMut() -> Result<U, E>) -> Result<Encoder<U>, E>
    where
        E: From<Error>,
    {
        // The builders take `Error`; carry the caller's error through a side slot.
        let mut failure: Option<E> = None;
        let mut step = || {
            next().map_err(|e| {
                failure = Some(e);
                Error::TreeShape
            })
        };
        let built = Encoder::<U>::from_leaves(
            self.arch,
            self.layers.len(),
            self.embeddings.token_type.is_some(),
            &mut step,
        );
        match (built, failure) {
            (_, Some(e)) => Err(e),
            (Ok(tree), None) => Ok(tree),
            (Err(e), None) => Err(e.into()),
        }
    }

    fn from_leaves(
        arch: Arch,
        layers: usize,
        token_type: bool,
        next: &mut impl FnMut() -> Result<T, Error>,
    ) -> Result<Encoder<T>, Error> {
        let word = next()?;
        let position = next()?;
        let token_type = if token_type { Some(next()?) } else { None };
        let embeddings = Embeddings {
            word,
            position,
            token_type,
            norm: LayerNorm::from_leaves(next)?,
        };
        let layers = (0..layers)
            .map(|_| Layer::from_leaves(next))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Encoder {
            arch,
            embeddings,
            layers,
            pool: Dense::from_leaves(next)?,
            classifier: Dense::from_leaves(next)?,
        })
    }
}

/// The slots of a tree of `arch` with `layers` layers: the one place HF names are made.
fn slots_of(arch: Arch, layers: usize) -> Vec<Slot> {
    let p = match arch {
        Arch::Bert => "bert",
        Arch::DistilBert => "distilbert",
    };
    let mut out = vec![
        slot(
            format!("{p}.embeddings.word_embeddings.weight"),
            true,
            false,
        ),
        slot(
            format!("{p}.embeddings.position_embeddings.weight"),
            true,
            false,
        ),
    ];
    if arch == Arch::Bert {
        out.push(slot(
            format!("{p}.embeddings.token_type_embeddings.weight"),
            true,
            false,
        ));
    }
    LayerNorm::<()>::slots(&format!("{p}.embeddings.LayerNorm"), &mut out);
    for l in 0..layers {
        Layer::<()>::slots(arch, l, &mut out);
    }
    let pool = match arch {
        Arch::Bert => "bert.pooler.dense",
        Arch::DistilBert => "pre_classifier",
    };
    Dense::<()>::slots(pool, true, &mut out);
    Dense::<()>::slots("classifier", true, &mut out);
    out
}

impl Encoder<Spec> {
    /// Every parameter's shape and initialisation for `cfg` with `num_labels` outputs (HF's:
    /// normal weights, zero biases, unit LayerNorm scales).
    pub fn new(cfg: &EncoderConfig, num_labels: usize) -> Encoder<Spec> {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let spec = |shape: Vec<usize>, init| Spec { shape, init };
        let dense = |out: usize, inp: usize| Dense {
            weight: spec(vec![out, inp], Init::Normal),
            bias: spec(vec![out], Init::Zeros),
        };
        let norm = || LayerNorm {
            weight: spec(vec![h], Init::Ones),
            bias: spec(vec![h], Init::Zeros),
        };
        Encoder {
            arch: cfg.arch,
            embeddings: Embeddings {
                word: spec(vec![cfg.vocab_size, h], Init::Normal),
                position: spec(vec![cfg.max_positions, h], Init::Normal),
                token_type: (cfg.arch == Arch::Bert)
                    .then(|| spec(vec![cfg.type_vocab_size.max(1), h], Init::Normal)),
                norm: norm(),
            },
            layers: (0..cfg.layers)
                .map(|_| Layer {
                    query: dense(h, h),
                    key: dense(h, h),
                    value: dense(h, h),
                    attn_out: dense(h, h),
                    attn_norm: norm(),
                    ffn_in: dense(i, h),
                    ffn_out: dense(h, i),
                    ffn_norm: norm(),
                })
                .collect(),
            pool: dense(h, h),
            classifier: dense(num_labels, h),
        }
    }
}

impl<T: Clone> Encoder<T> {
    /// The tree for `cfg` and `num_labels` with each leaf taken from `named` by its HF name; a
    /// missing name is an error naming it.
    pub fn from_named(
        cfg: &EncoderConfig,
        num_labels: usize,
        named: &HashMap<String, T>,
    ) -> Result<Encoder<T>, Error> {
        Encoder::<Spec>::new(cfg, num_labels).map(|name, _| {
            named
                .get(name)
                .cloned()
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_owned(),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tiny_config;

    #[test]
    fn names_are_hf_names_in_a_fixed_order() {
        let cfg = EncoderConfig::from_json(tiny_config(Arch::Bert, 0.0)).unwrap();
        let names: Vec<String> = Encoder::<Spec>::new(&cfg, 28)
            .slots()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names.len(), 3 + 2 + 2 * 16 + 4);
        assert_eq!(names[0], "bert.embeddings.word_embeddings.weight");
        assert_eq!(names[5], "bert.encoder.layer.0.attention.self.query.weight");
        assert_eq!(
            names[13],
            "bert.encoder.layer.0.attention.output.LayerNorm.weight"
        );
        assert_eq!(names[names.len() - 4], "bert.pooler.dense.weight");
        assert_eq!(names[names.len() - 1], "classifier.bias");
        let cfg = EncoderConfig::from_json(tiny_config(Arch::DistilBert, 0.0)).unwrap();
        let slots = Encoder::<Spec>::new(&cfg, 28).slots();
        assert_eq!(
            slots[4].name,
            "distilbert.transformer.layer.0.attention.q_lin.weight"
        );
        assert_eq!(slots[slots.len() - 4].name, "pre_classifier.weight");
        // Decay and head flags: what HF's Trainer and a base checkpoint imply.
        for s in &slots {
            let no_decay = s.name.ends_with(".bias")
                || s.name.contains("layer_norm")
                || s.name.contains("LayerNorm");
            assert_eq!(s.decay, !no_decay, "{}", s.name);
            let head = s.name.starts_with("classifier.") || s.name.starts_with("pre_classifier.");
            assert_eq!(s.head, head, "{}", s.name);
        }
    }

    #[test]
    fn a_missing_tensor_is_an_error_naming_it() {
        let cfg = EncoderConfig::from_json(tiny_config(Arch::DistilBert, 0.0)).unwrap();
        let specs = Encoder::<Spec>::new(&cfg, 28);
        let mut named: HashMap<String, usize> = specs
            .slots()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s.name, i))
            .collect();
        let full = Encoder::from_named(&cfg, 28, &named).unwrap();
        assert_eq!(
            full.leaves().into_iter().copied().collect::<Vec<_>>(),
            (0..named.len()).collect::<Vec<_>>()
        );
        named.remove("classifier.bias");
        let err = Encoder::from_named(&cfg, 28, &named)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tensor `classifier.bias`"), "{err}");
    }
}
