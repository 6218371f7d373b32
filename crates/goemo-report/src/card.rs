//! The model card: the `README.md` of a model folder for the Hugging Face Hub, written from a
//! run's own results so that it is never stale. YAML front matter (license, language, datasets,
//! tags, `base_model`, and a `model-index` with the test results) between `---` lines, then
//! Markdown: intended use, data, training, results overall and per label, how the thresholds
//! were tuned, known limits, and how to use the model with transformers.
//!
//! Built from typed inputs only, like [`crate::page`]: metrics.json, thresholds.json and plain
//! facts the caller reads from the model, the training log and the data summary. The text is a
//! pure function of them (no dates, no paths, maps in a fixed order), because the card is a
//! stage's content-hashed result.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::evaluation::MetricsFile;
use crate::page::PAPER_MACRO_F1;
use crate::thresholds::{Policy, Precision, Thresholds};
use crate::ReportError;

/// The file name of a card in a Hub model folder.
pub const CARD_FILE: &str = "README.md";

/// The fine-tuned model as its `config.json` and weights describe it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelFacts {
    /// `architectures[0]`: `BertForSequenceClassification`.
    pub architecture: String,
    pub layers: Option<u64>,
    pub hidden: Option<u64>,
    pub heads: Option<u64>,
    pub max_positions: Option<u64>,
    /// Weights in model.safetensors.
    pub parameters: Option<u64>,
    /// `id2label`, in id order: the order of the model's outputs.
    pub labels: Vec<String>,
    /// config.json maps its classes to modeling code shipped in the folder (`auto_map`: goemo's
    /// mean-pooling head), so transformers needs `trust_remote_code=True`.
    pub custom_code: bool,
}

/// One epoch of the training log.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochFacts {
    pub epoch: usize,
    pub train_loss: f64,
    pub dev_loss: f64,
    /// At threshold 0.5 for every label.
    pub dev_macro_f1: f64,
}

/// What the training run recorded in its results.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainFacts {
    pub epochs: Vec<EpochFacts>,
    pub best_epoch: usize,
    pub best_dev_macro_f1: f64,
    pub stopped_early: bool,
    /// Optimizer steps planned for every epoch.
    pub total_steps: usize,
    /// Optimizer steps taken.
    pub steps_taken: usize,
    /// The largest learning rate the schedule reached (the backbone's).
    pub peak_lr: Option<f64>,
    /// Per label, in label order; `None`: every positive weighs 1.
    pub pos_weight: Option<Vec<f64>>,
    /// Every train param as resolved, when the training run recorded them with its results.
    pub params: Option<BTreeMap<String, serde_json::Value>>,
}

/// The data the model was trained and tested on, as the load and sample stages summarised it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFacts {
    /// `official` (the published splits) or `raw` (the rater files, aggregated).
    pub source: String,
    /// `original`, `ekman` or `sentiment`.
    pub taxonomy: String,
    /// Rows used per split (after any sample), train, dev, test.
    pub rows: Vec<(String, usize)>,
    /// The sample stage's, when it kept less than all of a split.
    pub sample: Option<SampleFacts>,
}

/// What the sample stage kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleFacts {
    pub fraction: f64,
    /// Every label in proportion.
    pub stratified: bool,
    /// The splits it sampled; the others were kept whole.
    pub splits: Vec<String>,
}

impl SampleFacts {
    /// `a stratified 5% sample of the train and dev splits`.
    fn describe(&self) -> String {
        format!(
            "a {}{} sample of the {} split{}",
            if self.stratified { "stratified " } else { "" },
            percent(self.fraction),
            and_list(&self.splits),
            if self.splits.len() == 1 { "" } else { "s" }
        )
    }
}

/// Everything one card shows.
pub struct ModelCard<'a> {
    /// The model's name: the card's title and the model-index entry's name.
    pub name: &'a str,
    /// The license id in the front matter (`apache-2.0`).
    pub license: &'a str,
    /// The backbone's Hub id, when known.
    pub base_model: Option<&'a str>,
    /// Labels with fewer test examples than this are named under "Known limits".
    pub rare_support: u64,
    pub model: &'a ModelFacts,
    pub metrics: &'a MetricsFile,
    pub thresholds: &'a Thresholds,
    pub train: &'a TrainFacts,
    pub data: Option<&'a DataFacts>,
    /// Tokens per text in training (tokenize's `max_len`), when known.
    pub max_len: Option<usize>,
}

/// The card's YAML front matter, in the Hub's model-card metadata schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrontMatter {
    pub license: String,
    pub language: Vec<String>,
    pub datasets: Vec<String>,
    pub metrics: Vec<String>,
    pub pipeline_tag: String,
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(rename = "model-index")]
    pub model_index: Vec<ModelIndex>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelIndex {
    pub name: String,
    pub results: Vec<IndexResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexResult {
    pub task: IndexTask,
    pub dataset: IndexDataset,
    pub metrics: Vec<IndexMetric>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexTask {
    #[serde(rename = "type")]
    pub type_: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexDataset {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub split: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexMetric {
    #[serde(rename = "type")]
    pub type_: String,
    pub name: String,
    pub value: f64,
}

/// The model-index metric names, in the order the front matter lists them.
pub const INDEX_METRICS: [&str; 4] = [
    "Test macro-F1 (per-label thresholds tuned on dev)",
    "Test macro-F1 (threshold 0.5)",
    "Test macro-F1 (threshold 0.3)",
    "Test micro-F1 (per-label thresholds tuned on dev)",
];

impl ModelCard<'_> {
    /// The model, thresholds.json and metrics.json must name the same labels in the same order:
    /// the card's tables and the snippet's thresholds are matched by position.
    pub fn check(&self) -> Result<(), ReportError> {
        self.thresholds.check()?;
        let model = &self.model.labels;
        if &self.thresholds.labels != model {
            return Err(ReportError::Mismatch(format!(
                "thresholds.json's labels differ from the model's config.json id2label ({} vs {} labels); re-run thresholds on this model",
                self.thresholds.labels.len(),
                model.len()
            )));
        }
        if &self.metrics.labels != model {
            return Err(ReportError::Mismatch(format!(
                "metrics.json's labels differ from the model's config.json id2label ({} vs {} labels); re-run evaluate on this model",
                self.metrics.labels.len(),
                model.len()
            )));
        }
        if let Some(w) = &self.train.pos_weight {
            if w.len() != model.len() {
                return Err(ReportError::Mismatch(format!(
                    "train_log.json has {} pos_weight values for {} labels; re-run train",
                    w.len(),
                    model.len()
                )));
            }
        }
        Ok(())
    }

    pub fn front_matter(&self) -> FrontMatter {
        let p = &self.metrics.policies;
        let values = [
            p.tuned.macro_.f1,
            p.at_05.macro_.f1,
            p.at_03.macro_.f1,
            p.tuned.micro.f1,
        ];
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        FrontMatter {
            license: self.license.to_owned(),
            language: strings(&["en"]),
            datasets: strings(&["go_emotions"]),
            metrics: strings(&["f1"]),
            pipeline_tag: "text-classification".into(),
            tags: strings(&["multi-label-classification", "emotion", "goemotions"]),
            base_model: self.base_model.map(str::to_owned),
            model_index: vec![ModelIndex {
                name: self.name.to_owned(),
                results: vec![IndexResult {
                    task: IndexTask {
                        type_: "text-classification".into(),
                    },
                    dataset: IndexDataset {
                        name: "GoEmotions".into(),
                        type_: "go_emotions".into(),
                        split: "test".into(),
                    },
                    metrics: INDEX_METRICS
                        .iter()
                        .zip(values)
                        .map(|(name, value)| IndexMetric {
                            type_: "f1".into(),
                            name: (*name).to_owned(),
                            value,
                        })
                        .collect(),
                }],
            }],
        }
    }

    /// The whole README.md: front matter, then Markdown.
    pub fn render(&self) -> Result<String, ReportError> {
        self.check()?;
        let yaml = serde_yaml::to_string(&self.front_matter())
            .map_err(|e| ReportError::Mismatch(format!("writing the card's front matter: {e}")))?;
        let mut s = format!("---\n{yaml}---\n\n");
        self.summary(&mut s);
        self.intended_use(&mut s);
        self.data_section(&mut s);
        self.training(&mut s);
        self.results(&mut s)?;
        self.thresholds_section(&mut s);
        self.limits(&mut s)?;
        self.how_to_use(&mut s);
        Ok(s)
    }

    fn summary(&self, s: &mut String) {
        let p = &self.metrics.policies;
        let _ = writeln!(s, "# {}\n", one_line(self.name));
        let from = self
            .base_model
            .map(|b| format!(" fine-tuned from [`{b}`](https://huggingface.co/{b})"))
            .unwrap_or_else(|| " fine-tuned".into());
        let _ = writeln!(
            s,
            "A multi-label emotion classifier for English text: {}{from} on [GoEmotions](https://github.com/google-research/goemotions), with {} labels and a decision threshold per label tuned on GoEmotions' dev split (`thresholds.json`). On the test split it reaches macro-F1 **{:.4}** with those thresholds ({:.4} at 0.5 for every label, {:.4} at 0.3).\n",
            self.describe_model(),
            self.model.labels.len(),
            p.tuned.macro_.f1,
            p.at_05.macro_.f1,
            p.at_03.macro_.f1,
        );
        s.push_str("goemo's `package` stage wrote this card from the run's own results (the exported model, `thresholds.json`, the evaluation's `metrics.json` and the training log), so every figure in it is the one this model scored.\n\n");
    }

    /// `BertForSequenceClassification (6 layers, hidden 384, 22.7M parameters)`.
    fn describe_model(&self) -> String {
        let m = self.model;
        let mut parts = Vec::new();
        if let Some(l) = m.layers {
            parts.push(format!("{l} layers"));
        }
        if let Some(h) = m.hidden {
            parts.push(format!("hidden {h}"));
        }
        if let Some(h) = m.heads {
            parts.push(format!("{h} attention heads"));
        }
        if let Some(n) = m.parameters {
            parts.push(format!("{:.1}M parameters", n as f64 / 1e6));
        }
        let arch = if m.architecture.is_empty() {
            "a transformer encoder".to_owned()
        } else {
            format!("`{}`", m.architecture)
        };
        if parts.is_empty() {
            arch
        } else {
            format!("{arch} ({})", parts.join(", "))
        }
    }

    fn intended_use(&self, s: &mut String) {
        s.push_str("## Intended use\n\n");
        s.push_str("Multi-label emotion classification of short English comments such as Reddit's. Each text gets every label whose probability (the sigmoid of its logit) reaches that label's threshold, so a text can carry several labels; `neutral` is a label like the others. Research, analytics over many texts, and as a starting point for further fine-tuning. It is not meant for decisions about a person (moderation, hiring, health) without human review, nor for languages other than English.\n\n");
        let taxonomy = self.data.map(|d| d.taxonomy.as_str());
        let _ = writeln!(
            s,
            "The {} labels ({}), in the model's output order:\n",
            self.model.labels.len(),
            taxonomy_description(taxonomy)
        );
        let list: Vec<String> = self.model.labels.iter().map(|l| format!("`{l}`")).collect();
        let _ = writeln!(s, "{}\n", list.join(", "));
    }

    fn data_section(&self, s: &mut String) {
        s.push_str("## Data\n\n");
        s.push_str("[GoEmotions](https://github.com/google-research/goemotions) (Demszky et al., 2020, [arXiv:2005.00547](https://arxiv.org/abs/2005.00547)): English Reddit comments, each labelled by several raters with the emotions it expresses, or neutral.\n\n");
        let Some(d) = self.data else {
            let _ = writeln!(
                s,
                "The test split had {} comments (the run that packaged this model did not record the other splits' sizes).\n",
                thousands(self.metrics.test_rows as u64)
            );
            return;
        };
        let source = match d.source.as_str() {
            "official" => "the dataset's official train, dev and test splits".to_owned(),
            "raw" => {
                "the raw rater files (`goemotions_{1,2,3}.csv`), aggregated per comment and split"
                    .to_owned()
            }
            other => format!("the `{other}` source"),
        };
        let _ = writeln!(
            s,
            "Rows from {source}; labels: {}.\n",
            taxonomy_description(Some(&d.taxonomy))
        );
        s.push_str("| split | comments used |\n|---|---|\n");
        for (split, rows) in &d.rows {
            let _ = writeln!(s, "| {split} | {} |", thousands(*rows as u64));
        }
        s.push('\n');
        if let Some(sample) = &d.sample {
            let whole = if sample.splits.len() < 3 {
                " (the other splits whole)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "The rows are {}{whole}, not the whole dataset.\n",
                sample.describe()
            );
        }
    }

    fn training(&self, s: &mut String) {
        let t = self.train;
        s.push_str("## Training\n\n");
        s.push_str("Fine-tuned with goemo's `train` stage: a new classification head on the encoder, binary cross-entropy with logits over every label, AdamW with a linear warmup then a linear decay of the learning rate, gradient clipping; the dev split was scored after each epoch (macro-F1 at 0.5) and the best epoch's weights were exported.\n\n");
        match &t.params {
            Some(params) => {
                s.push_str("Every training param, as resolved:\n\n| param | value |\n|---|---|\n");
                for (k, v) in params {
                    let _ = writeln!(s, "| `{k}` | `{}` |", cell(&v.to_string()));
                }
                s.push('\n');
            }
            None => s.push_str("The training run's results record the figures below; its other params (batch size, weight decay, seed, …) are in the `train` stage of the pipeline that made it (`pipeline.yaml`, `pipeline.lock`).\n\n"),
        }
        let _ = writeln!(
            s,
            "- epochs run: {}{}",
            t.epochs.len(),
            if t.stopped_early {
                " (stopped early: dev macro-F1 stopped improving)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "- optimizer steps: {} of {} planned",
            thousands(t.steps_taken as u64),
            thousands(t.total_steps as u64)
        );
        if let Some(lr) = t.peak_lr {
            let _ = writeln!(s, "- peak learning rate (the encoder's): {lr:e}");
        }
        let _ = writeln!(
            s,
            "- best epoch: {} (dev macro-F1 {:.4} at 0.5), the weights in this folder",
            t.best_epoch, t.best_dev_macro_f1
        );
        match &t.pos_weight {
            None => s.push_str("- pos_weight: none (every positive weighs 1)\n"),
            Some(w) => {
                let list: Vec<String> = self
                    .model
                    .labels
                    .iter()
                    .zip(w)
                    .map(|(l, w)| format!("{l} {}", trim_float(*w, 3)))
                    .collect();
                let _ = writeln!(
                    s,
                    "- pos_weight (a positive's weight in the loss, per label): {}",
                    list.join(", ")
                );
            }
        }
        if let Some(n) = self.max_len {
            let _ = writeln!(
                s,
                "- tokens per text: at most {n} (longer texts were truncated)"
            );
        }
        s.push_str(
            "\n| epoch | train loss | dev loss | dev macro-F1 (at 0.5) |\n|---|---|---|---|\n",
        );
        for e in &t.epochs {
            let best = if e.epoch == t.best_epoch {
                " (best)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "| {}{best} | {:.4} | {:.4} | {:.4} |",
                e.epoch, e.train_loss, e.dev_loss, e.dev_macro_f1
            );
        }
        s.push('\n');
    }

    fn results(&self, s: &mut String) -> Result<(), ReportError> {
        let m = self.metrics;
        let (p, ci) = (&m.policies, &m.bootstrap.macro_f1_95ci);
        s.push_str("## Results\n\n");
        let _ = writeln!(
            s,
            "On the {} comments of the test split, which neither training nor threshold tuning saw. The 95% intervals are the 2.5th and 97.5th percentiles of macro-F1 over {} bootstrap resamples of the test rows (seed {}).\n",
            thousands(m.test_rows as u64),
            thousands(m.bootstrap.samples as u64),
            m.bootstrap.seed
        );
        s.push_str(
            "| thresholds | macro-F1 | macro-F1 95% interval | micro-F1 |\n|---|---|---|---|\n",
        );
        for (name, policy, [lo, hi]) in [
            (
                "per label, tuned on dev (`thresholds.json`)",
                &p.tuned,
                ci.tuned,
            ),
            ("0.5 for every label", &p.at_05, ci.at_05),
            (
                "0.3 for every label (the GoEmotions paper's)",
                &p.at_03,
                ci.at_03,
            ),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.4} | {lo:.4}–{hi:.4} | {:.4} |",
                policy.macro_.f1, policy.micro.f1
            );
        }
        s.push('\n');
        let threshold_free: Vec<String> = [
            ("macro ROC-AUC", m.macro_roc_auc),
            ("macro average precision", m.macro_average_precision),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} {v:.4}")))
        .collect();
        if !threshold_free.is_empty() {
            let _ = writeln!(
                s,
                "Without thresholds: {}. For reference, the GoEmotions paper's BERT-base reached macro-F1 {PAPER_MACRO_F1:.2} at 0.3.\n",
                threshold_free.join(", ")
            );
        }
        s.push_str("### Per label\n\nAt the tuned thresholds; support is the label's positives among the test comments.\n\n| label | threshold | precision | recall | F1 | support |\n|---|---|---|---|---|---|\n");
        for label in &m.labels {
            let r = p.tuned.label("tuned", label)?;
            let _ = writeln!(
                s,
                "| {label} | {:.4} | {:.4} | {:.4} | {:.4} | {} |",
                r.threshold, r.precision, r.recall, r.f1, r.support
            );
        }
        s.push('\n');
        Ok(())
    }

    fn thresholds_section(&self, s: &mut String) {
        let t = self.thresholds;
        s.push_str("## Thresholds\n\n");
        match t.policy {
            Policy::Tuned => {
                s.push_str("Tuned on the dev split only, never on test: for each label, the threshold that maximises that label's dev F1 over every distinct dev score, never below a floor. ");
                if t.fallback.is_empty() {
                    s.push_str("Every label had enough dev positives to be tuned.");
                } else {
                    // A fallback label's threshold is the global one.
                    let global = t
                        .labels
                        .iter()
                        .position(|l| Some(l) == t.fallback.first())
                        .and_then(|i| t.thresholds.get(i))
                        .map(|&x| format!(" ({})", trim_float(f64::from(x), 4)))
                        .unwrap_or_default();
                    let _ = write!(
                        s,
                        "Labels with too few dev positives to tune on kept the global threshold{global}: {}.",
                        t.fallback.join(", ")
                    );
                }
            }
            Policy::Global => {
                let value = t.thresholds.first().copied().unwrap_or(0.5);
                let _ = write!(
                    s,
                    "One threshold, {}, for every label (the global policy: nothing was tuned).",
                    trim_float(f64::from(value), 4)
                );
            }
        }
        let n = t.dev_f1.len().max(1) as f64;
        let _ = writeln!(
            s,
            " Dev macro-F1 at these thresholds: {:.4}.\n",
            t.dev_f1.iter().sum::<f64>() / n
        );
        if t.precision != Precision::F32 {
            let _ = writeln!(
                s,
                "The dev scores they were tuned on came from goemo's {} encoder; transformers computes in f32, whose probabilities differ slightly.\n",
                t.precision.name()
            );
        }
        s.push_str("`thresholds.json` holds them: `labels` and `thresholds` are parallel lists in the model's output order (`config.json`'s `id2label`), `dev_f1` is each label's dev F1 at its threshold, `fallback` lists the labels that kept the global threshold, `policy` is `tuned` or `global`. A label is predicted when its probability is greater than or equal to its threshold.\n\n");
    }

    fn limits(&self, s: &mut String) -> Result<(), ReportError> {
        let m = self.metrics;
        s.push_str("## Known limits\n\n");
        let mut rare = Vec::new();
        for label in &m.labels {
            let r = m.policies.tuned.label("tuned", label)?;
            if r.support < self.rare_support {
                rare.push((r.support, label.as_str(), r.f1));
            }
        }
        rare.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)));
        if rare.is_empty() {
            let _ = writeln!(
                s,
                "- Every label has at least {} test examples; the rarest labels' F1s still vary more than the common ones'.",
                self.rare_support
            );
        } else {
            let list: Vec<String> = rare
                .iter()
                .map(|(n, l, f1)| format!("{l} ({n}, F1 {f1:.2})"))
                .collect();
            let _ = writeln!(
                s,
                "- Few test examples (fewer than {}): {}. Their F1s rest on a handful of comments and would move a lot on another sample; their thresholds were tuned on as few dev examples.",
                self.rare_support,
                list.join(", ")
            );
        }
        let never: Vec<&str> = m
            .labels
            .iter()
            .filter(|l| {
                m.policies
                    .tuned
                    .per_label
                    .get(*l)
                    .is_some_and(|r| r.support > 0 && r.f1 == 0.0)
            })
            .map(String::as_str)
            .collect();
        if !never.is_empty() {
            let _ = writeln!(s, "- Never right on test (F1 0): {}.", never.join(", "));
        }
        s.push_str("- Reddit data: the comments come from Reddit, whose users skew young and male, and from the subreddits the dataset's authors chose; what the labels capture, and the model's errors, follow that. Names and religions are masked in the data (`[NAME]`, `[RELIGION]`), so the model learned from those tokens rather than real names.\n");
        s.push_str("- English only; short, informal comments. Longer or formal text (news, reviews, transcripts) is outside what it was trained on.\n");
        if let Some(n) = self.max_len {
            let _ = writeln!(
                s,
                "- Trained on at most {n} tokens per text; later tokens of a longer text were never seen."
            );
        }
        if let Some(sample) = self.data.and_then(|d| d.sample.as_ref()) {
            let _ = writeln!(
                s,
                "- Made from {} of GoEmotions: fewer examples per label than the full dataset gives, and noisier figures.",
                sample.describe()
            );
        }
        s.push_str("- The probabilities are not calibrated, and the thresholds maximise each label's dev F1: for another trade-off between precision and recall, tune your own on your data.\n\n");
        Ok(())
    }

    fn how_to_use(&self, s: &mut String) {
        let max_len = self
            .max_len
            .map(|n| n as u64)
            .or(self.model.max_positions)
            .unwrap_or(512);
        s.push_str("## How to use\n\n");
        s.push_str("With transformers (and PyTorch): the sigmoid of each logit, then each label's threshold from `thresholds.json`.\n\n");
        let remote = if self.model.custom_code {
            s.push_str("This model reads the mean of the token states (`classifier_pooling: mean`), a head transformers does not ship: its code is `modeling_goemo.py` in this folder, so loading needs `trust_remote_code=True` (without it, loading fails rather than silently reading the first token).\n\n");
            ", trust_remote_code=True"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"```python
import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_id = "path/to/this/folder"  # or its id on the Hub

tokenizer = AutoTokenizer.from_pretrained(model_id{remote})
model = AutoModelForSequenceClassification.from_pretrained(model_id{remote}).eval()

local = Path(model_id) / "thresholds.json"
path = local if local.exists() else hf_hub_download(model_id, "thresholds.json")
t = json.loads(Path(path).read_text())
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
assert t["labels"] == labels, "thresholds.json is not this model's"
thresholds = torch.tensor(t["thresholds"])

texts = ["thank you so much, this made my day", "ugh, not again"]
batch = tokenizer(texts, padding=True, truncation=True, max_length={max_len}, return_tensors="pt")
with torch.no_grad():
    probs = torch.sigmoid(model(**batch).logits)
for text, p in zip(texts, probs):
    predicted = [labels[i] for i in (p >= thresholds).nonzero().flatten().tolist()]
    print(text, predicted)
```"#
        );
        s.push_str("\ngoemo's own CLI reads this folder as it is: `goemo predict --model path/to/this/folder \"some text\"`.\n");
    }
}

/// What the taxonomy's labels are.
fn taxonomy_description(taxonomy: Option<&str>) -> &'static str {
    match taxonomy {
        Some("original") => "GoEmotions' 27 emotions plus neutral",
        Some("ekman") => "Ekman's six basic emotions plus neutral, grouped from GoEmotions' 27 by the paper's mapping",
        Some("sentiment") => "positive, negative and ambiguous plus neutral, grouped from GoEmotions' 27 by the paper's mapping",
        _ => "the labels of the data the model was trained on",
    }
}

/// `43,410`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `5%`, `2.5%`.
fn percent(fraction: f64) -> String {
    format!("{}%", trim_float(fraction * 100.0, 2))
}

/// At most `decimals` decimals, trailing zeros dropped: `9.12`, `10`, `0.5`.
fn trim_float(x: f64, decimals: usize) -> String {
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// A value safe inside a Markdown table cell.
fn cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metrics() -> MetricsFile {
        let per = |f1: f64, support: u64| json!({"precision": 0.5, "recall": 0.25, "f1": f1, "support": support, "threshold": 0.5});
        let policy = json!({
            "micro": {"precision": 0.5, "recall": 0.5, "f1": 0.5}, "macro": {"precision": 0.4, "recall": 0.3, "f1": 0.35},
            "weighted": {"precision": 0.45, "recall": 0.35, "f1": 0.4}, "samples": {"precision": 0.6, "recall": 0.5, "f1": 0.55},
            "exact_match": 0.2, "hamming_loss": 0.1, "per_label": {"joy": per(0.3, 40), "grief": per(0.0, 3)}
        });
        serde_json::from_value(json!({"labels": ["joy", "grief"], "test_rows": 60, "policies": {"0.5": policy, "0.3": policy, "tuned": policy},
               "roc_auc": {"joy": 0.9, "grief": null}, "average_precision": {"joy": 0.8, "grief": null},
               "macro_roc_auc": null, "macro_average_precision": null,
               "bootstrap": {"samples": 10, "seed": 1, "macro_f1_95ci": {"0.5": [0.3, 0.4], "0.3": [0.3, 0.4], "tuned": [0.3, 0.4]}}}))
        .unwrap()
    }

    /// The branches the stage's own test does not reach: a global policy, int8 thresholds, no
    /// data summary, every train param listed; and labels that disagree are refused.
    #[test]
    fn a_global_policy_card_without_data_and_with_params() {
        let labels = vec!["joy".to_owned(), "grief".to_owned()];
        let model = ModelFacts {
            architecture: "GoemoDistilBertForSequenceClassification".into(),
            labels: labels.clone(),
            custom_code: true,
            ..Default::default()
        };
        let thresholds = Thresholds {
            policy: Policy::Global,
            labels: labels.clone(),
            thresholds: vec![0.5, 0.5],
            dev_f1: vec![0.2, 0.0],
            fallback: vec![],
            precision: Precision::Int8,
            int8_arithmetic: Some(crate::precision::INT8_ARITHMETIC),
        };
        let train = TrainFacts {
            params: Some(BTreeMap::from([
                ("lr".to_owned(), json!(1e-4)),
                ("note".to_owned(), json!("a|b")),
            ])),
            ..Default::default()
        };
        let m = metrics();
        let card = ModelCard {
            name: "tiny",
            license: "mit",
            base_model: None,
            rare_support: 20,
            model: &model,
            metrics: &m,
            thresholds: &thresholds,
            train: &train,
            data: None,
            max_len: None,
        };
        let text = card.render().unwrap();
        assert!(!text.contains("base_model"), "{text}");
        assert!(text.contains("license: mit\n"));
        assert!(text.contains("One threshold, 0.5, for every label"));
        assert!(text.contains("goemo's int8 encoder"));
        assert!(text.contains("The test split had 60 comments"));
        assert!(
            text.contains("| `lr` | `0.0001` |\n| `note` | `\"a\\|b\"` |"),
            "{text}"
        );
        assert!(text.contains("Few test examples (fewer than 20): grief (3, F1 0.00)."));
        assert!(text.contains("Never right on test (F1 0): grief."));
        assert!(
            text.contains("max_length=512,"),
            "the default without max_len or config"
        );
        // The mean-pooling head's code ships in the folder: the snippet opts in to it.
        assert!(text.contains(
            "AutoModelForSequenceClassification.from_pretrained(model_id, trust_remote_code=True)"
        ));
        assert!(text.contains("modeling_goemo.py"));
        assert_eq!(text, card.render().unwrap());

        let other = Thresholds {
            labels: vec!["joy".into(), "relief".into()],
            ..thresholds.clone()
        };
        let err = ModelCard {
            thresholds: &other,
            ..card
        }
        .render()
        .unwrap_err();
        assert!(err.to_string().contains("re-run thresholds"), "{err}");
    }

    #[test]
    fn numbers_are_written_plainly() {
        assert_eq!(thousands(43_410), "43,410");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(percent(0.05), "5%");
        assert_eq!(percent(0.025), "2.5%");
        assert_eq!(trim_float(9.1234, 3), "9.123");
        assert_eq!(trim_float(10.0, 3), "10");
        assert_eq!(cell("a|b\nc"), "a\\|b c");
        let sample = |splits: &[&str]| SampleFacts {
            fraction: 0.05,
            stratified: true,
            splits: splits.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            sample(&["train", "dev", "test"]).describe(),
            "a stratified 5% sample of the train, dev and test splits"
        );
        assert_eq!(
            sample(&["train"]).describe(),
            "a stratified 5% sample of the train split"
        );
    }
}
