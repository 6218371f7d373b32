//! `package`: the model folder to upload to the Hugging Face Hub, in `out/model/`:
//! - an exact copy of every file of train's exported `model/` (config.json, model.safetensors,
//!   tokenizer files);
//! - `thresholds.json`, an exact copy of the thresholds stage's;
//! - `README.md`, the model card ([`goemo_report::card`]) written from the run's results:
//!   evaluate's metrics.json, thresholds.json, train's `train_log.json` and the model's
//!   config.json, plus row counts (sample or load) and `max_len` (tokenize) when those are
//!   connected.
//!
//! The card holds only what this stage's inputs hold, so it is a function of the stage key:
//! train's resolved params are not among them (the engine's run record has them, but it is not
//! in the key: two params that train identical weights would give one key and two cards), so
//! the card lists what train_log.json records, and every param only when train's results carry
//! them (`train_params.json`). For the same reason `base_model` is a param: the exported
//! config.json drops `_name_or_path`, and the backbone folder's name is a place, not content.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use goemo_data::data::Split;
use goemo_data::summary::{read_summary, Source};
use goemo_data::tokens::{TokensMeta, META_FILE};
use goemo_report::card::{
    DataFacts, EpochFacts, ModelCard, ModelFacts, SampleFacts, TrainFacts, CARD_FILE,
};
use goemo_report::evaluation::{MetricsFile, METRICS_FILE};
use goemo_report::thresholds::{Thresholds, THRESHOLDS_FILE};
use goemo_stage::{InputSpec, Inputs, ParamError, StageContext, TypedStage};

use crate::trainer::TrainLog;

/// The folder in train's results, and in this stage's, that holds the model.
pub const MODEL_DIR: &str = "model";
/// Train's log in its results.
pub const TRAIN_LOG_FILE: &str = "train_log.json";
/// Train's resolved params in its results (train from version 4, distill): the card lists
/// every one.
pub use crate::trainer::TRAIN_PARAMS_FILE;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackageParams {
    /// The backbone's Hub id (`sentence-transformers/all-MiniLM-L6-v2`): the card's
    /// `base_model`; left out of the card when unset.
    pub base_model: Option<String>,
    /// The card's title and model-index name; default `<base model>-goemotions`, or
    /// `goemo-goemotions` without a base model.
    pub name: Option<String>,
    /// The license id in the card's front matter.
    pub license: String,
    /// Labels with fewer test examples than this are named under the card's "Known limits".
    pub rare_support: u64,
}

impl Default for PackageParams {
    fn default() -> Self {
        PackageParams {
            base_model: None,
            name: None,
            license: "apache-2.0".into(),
            rare_support: 20,
        }
    }
}

impl PackageParams {
    fn model_name(&self) -> String {
        match (&self.name, &self.base_model) {
            (Some(name), _) => name.clone(),
            (None, Some(base)) => {
                let short = base.rsplit('/').next().unwrap_or(base);
                format!("{short}-goemotions")
            }
            (None, None) => "goemo-goemotions".into(),
        }
    }
}

pub struct PackageStage;

impl TypedStage for PackageStage {
    type Params = PackageParams;

    fn kind(&self) -> &'static str {
        "package"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "the Hub model folder: train's exported model, thresholds.json and a model card (README.md) from the run's metrics"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage(
                "train",
                "the exported model and training log from train",
                &["train", "distill"],
            ),
            InputSpec::stage(
                "thresholds",
                "thresholds.json from thresholds",
                &["thresholds"],
            ),
            InputSpec::stage("evaluate", "metrics.json from evaluate", &["evaluate"]),
            InputSpec::stage(
                "tokens",
                "max_len from tokenize, for the card",
                &["tokenize"],
            )
            .optional(),
            InputSpec::stage(
                "dataset",
                "row counts and taxonomy from sample or load, for the card",
                &["sample", "load"],
            )
            .optional(),
        ];
        Inputs::Fixed(SPECS)
    }
    fn validate(&self, p: &PackageParams) -> Result<(), ParamError> {
        let word = |key: &str, v: &str| {
            if v.is_empty() || v.chars().any(char::is_whitespace) {
                Err(ParamError::new(
                    key,
                    format!("{key} must be one word without spaces, got {v:?}"),
                ))
            } else {
                Ok(())
            }
        };
        word("license", &p.license)?;
        if let Some(b) = &p.base_model {
            word("base_model", b)?;
        }
        if let Some(n) = &p.name {
            if n.trim().is_empty() || n.contains('\n') {
                return Err(ParamError::new(
                    "name",
                    format!("name must be one non-empty line, got {n:?}"),
                ));
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>, p: PackageParams) -> anyhow::Result<()> {
        let stage = ctx.name;
        let train_dir = ctx.input("train")?;
        let model_dir = train_dir.join(MODEL_DIR);
        let eval_dir = ctx.input("evaluate")?;
        let thresholds_path = ctx.input("thresholds")?.join(THRESHOLDS_FILE);

        let metrics: MetricsFile = goemo_fsio::read_json(&eval_dir.join(METRICS_FILE))
            .with_context(|| {
                format!("stage {stage}: the card's figures come from evaluate's {METRICS_FILE}; re-run evaluate")
            })?;
        let thresholds: Thresholds = goemo_fsio::read_json(&thresholds_path).with_context(|| {
            format!("stage {stage}: the model folder needs the thresholds stage's {THRESHOLDS_FILE}; re-run thresholds")
        })?;
        let model = model_facts(&model_dir).with_context(|| {
            format!("stage {stage}: reading train's exported model; re-run train")
        })?;
        let train = train_facts(train_dir)
            .with_context(|| format!("stage {stage}: reading train's results; re-run train"))?;
        let max_len = match ctx.optional_input("tokens") {
            Some(dir) => {
                let meta: TokensMeta = goemo_fsio::read_json(&dir.join(META_FILE))
                    .with_context(|| format!("stage {stage}: reading tokenize's results"))?;
                Some(meta.max_len)
            }
            None => None,
        };
        let data = match ctx.optional_input("dataset") {
            Some(dir) => Some(
                data_facts(dir)
                    .with_context(|| format!("stage {stage}: reading the data summary"))?,
            ),
            None => None,
        };

        let name = p.model_name();
        let card = ModelCard {
            name: &name,
            license: &p.license,
            base_model: p.base_model.as_deref(),
            rare_support: p.rare_support,
            model: &model,
            metrics: &metrics,
            thresholds: &thresholds,
            train: &train,
            data: data.as_ref(),
            max_len,
        }
        .render()
        .with_context(|| format!("stage {stage}: writing the model card"))?;

        let out = ctx.out_dir.join(MODEL_DIR);
        copy_tree(&model_dir, &out, &[CARD_FILE, THRESHOLDS_FILE])
            .with_context(|| format!("stage {stage}: copying train's model folder"))?;
        goemo_fsio::copy_atomic(&thresholds_path, &out.join(THRESHOLDS_FILE))?;
        let card_path = out.join(CARD_FILE);
        goemo_fsio::write_atomic(&card_path, card.as_bytes())
            .with_context(|| format!("writing {}", card_path.display()))?;
        tracing::info!(
            "package: {} files in model/ with thresholds.json and a model card (test macro-F1 {:.4} tuned)",
            std::fs::read_dir(&out)?.count(),
            metrics.policies.tuned.macro_.f1
        );
        Ok(())
    }
}

/// What the card shows of the exported model: config.json (BERT's names or DistilBERT's) and
/// the size of model.safetensors' tensors.
fn model_facts(dir: &Path) -> anyhow::Result<ModelFacts> {
    let config_path = dir.join("config.json");
    let config: serde_json::Value = goemo_fsio::read_json(&config_path)?;
    let num = |keys: &[&str]| keys.iter().find_map(|k| config.get(*k)?.as_u64());
    let id2label = config
        .get("id2label")
        .and_then(|v| v.as_object())
        .with_context(|| format!("{}: no `id2label` object", config_path.display()))?;
    // Keys are ids as strings ("0", "1", …, "10"): order them as numbers.
    let mut by_id = BTreeMap::new();
    for (id, label) in id2label {
        let id: usize = id.parse().with_context(|| {
            format!(
                "{}: id2label key {id:?} is not an id",
                config_path.display()
            )
        })?;
        let label = label.as_str().with_context(|| {
            format!("{}: id2label[{id}] is not a string", config_path.display())
        })?;
        by_id.insert(id, label.to_owned());
    }
    if by_id.keys().copied().ne(0..by_id.len()) {
        anyhow::bail!(
            "{}: id2label's ids are not 0..{}",
            config_path.display(),
            by_id.len()
        );
    }
    Ok(ModelFacts {
        architecture: config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or_default()
            .to_owned(),
        layers: num(&["num_hidden_layers", "n_layers"]),
        hidden: num(&["hidden_size", "dim"]),
        heads: num(&["num_attention_heads", "n_heads"]),
        max_positions: num(&["max_position_embeddings"]),
        parameters: Some(safetensors_parameters(&dir.join("model.safetensors"))?),
        labels: by_id.into_values().collect(),
        custom_code: config.get("auto_map").is_some(),
    })
}

/// The number of values in a safetensors file's tensors, from its header alone (a u64 length,
/// then JSON), so the weights are not read.
fn safetensors_parameters(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let bad = |what: String| anyhow::anyhow!("{}: {what}", path.display());
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    // safetensors' own limit on a header.
    if len > 100_000_000 {
        return Err(bad(format!("a {len}-byte header is not safetensors")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("its header is cut short: {e}")))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
    let mut total = 0u64;
    for (name, tensor) in header.iter().filter(|(n, _)| *n != "__metadata__") {
        let shape = tensor
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
        total += shape
            .iter()
            .map(|d| d.as_u64().unwrap_or(0))
            .product::<u64>();
    }
    Ok(total)
}

/// What the card shows of training: train_log.json, and train_params.json when train wrote it.
fn train_facts(train_dir: &Path) -> anyhow::Result<TrainFacts> {
    let log: TrainLog = goemo_fsio::read_json(&train_dir.join(TRAIN_LOG_FILE))?;
    let params_path = train_dir.join(TRAIN_PARAMS_FILE);
    let params = if params_path.exists() {
        Some(goemo_fsio::read_json(&params_path)?)
    } else {
        None
    };
    Ok(TrainFacts {
        epochs: log
            .epochs
            .iter()
            .map(|e| EpochFacts {
                epoch: e.epoch,
                train_loss: e.train_loss,
                dev_loss: e.dev_loss,
                dev_macro_f1: e.dev_macro_f1,
            })
            .collect(),
        best_epoch: log.best_epoch,
        best_dev_macro_f1: log.best_dev_macro_f1,
        stopped_early: log.stopped_early,
        total_steps: log.total_steps,
        steps_taken: log.steps.len(),
        peak_lr: log.steps.iter().map(|s| s.learning_rate).reduce(f64::max),
        pos_weight: log.pos_weight,
        params,
    })
}

fn data_facts(dir: &Path) -> anyhow::Result<DataFacts> {
    let s = read_summary(dir)?;
    Ok(DataFacts {
        source: match s.source {
            Source::Official => "official",
            Source::Raw => "raw",
        }
        .to_owned(),
        taxonomy: s.taxonomy.name().to_owned(),
        rows: Split::ALL
            .iter()
            .map(|&split| (split.name().to_owned(), s.rows_kept(split)))
            .collect(),
        sample: s.sample.as_ref().and_then(|x| {
            // The splits it shrank: the sample stage's `splits` param is not in the summary.
            let splits: Vec<String> = Split::ALL
                .iter()
                .filter(|&&split| x.splits_after.get(split).rows < *x.rows_before.get(split))
                .map(|split| split.name().to_owned())
                .collect();
            (!splits.is_empty()).then_some(SampleFacts {
                fraction: x.fraction,
                stratified: x.stratify,
                splits,
            })
        }),
    })
}

/// Copy every file under `from` into `to` (created), keeping sub-folders; refuse the names this
/// stage writes itself, so a model folder that already has them is never half overwritten.
fn copy_tree(from: &Path, to: &Path, reserved: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut entries = std::fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", from.display()))?;
    // Sorted, so the copy order (and any error) is the same on every run.
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let (src, dst) = (entry.path(), to.join(&name));
        if reserved.iter().any(|r| name == *r) {
            anyhow::bail!(
                "{} is in train's model folder, but package writes its own {}",
                src.display(),
                name.to_string_lossy()
            );
        }
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", src.display()))?;
        if kind.is_dir() {
            copy_tree(&src, &dst, &[])?;
        } else if kind.is_file() {
            goemo_fsio::copy_atomic(&src, &dst)?;
        } else {
            anyhow::bail!(
                "{} is neither a file nor a folder; a model folder holds only files",
                src.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use goemo_stage::Stage;

    #[test]
    fn params_resolve_and_bad_ones_are_named() {
        let stage = super::PackageStage;
        let v = stage
            .resolve_params(&serde_yaml::from_str("{}").unwrap())
            .unwrap();
        assert_eq!(v["license"], "apache-2.0");
        assert_eq!(v["rare_support"], 20);
        for (yaml, param) in [
            ("{base_model: 'two words'}", "base_model"),
            ("{license: ''}", "license"),
            ("{name: \"a\\nb\"}", "name"),
        ] {
            let e = stage
                .resolve_params(&serde_yaml::from_str(yaml).unwrap())
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{yaml}: {}", e.message);
        }
        let name = |yaml: &str| {
            let p: super::PackageParams = serde_yaml::from_str(yaml).unwrap();
            p.model_name()
        };
        assert_eq!(
            name("base_model: sentence-transformers/all-MiniLM-L6-v2"),
            "all-MiniLM-L6-v2-goemotions"
        );
        assert_eq!(name("{}"), "goemo-goemotions");
        assert_eq!(name("{name: mine, base_model: a/b}"), "mine");
    }
}
