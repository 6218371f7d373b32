//! The dataset the data stages pass along: rows of (id, text, labels, split), stored as an
//! Arrow IPC table (`dataset.arrow`, via polars) with the label names in `labels.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use polars::prelude::*;
use serde::{Deserialize, Serialize};

pub const DATASET_FILE: &str = "dataset.arrow";
pub const LABELS_FILE: &str = "labels.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Split> {
        Split::ALL.into_iter().find(|x| x.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: String,
    pub text: String,
    /// Sorted, unique label indices into the label names.
    pub labels: Vec<u32>,
    pub split: Split,
}

/// The paper's label groupings (GoEmotions `ekman_mapping.json`, `sentiment_mapping.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Taxonomy {
    #[default]
    Original,
    Ekman,
    Sentiment,
}

const EKMAN: &[(&str, &[&str])] = &[
    ("anger", &["anger", "annoyance", "disapproval"]),
    ("disgust", &["disgust"]),
    ("fear", &["fear", "nervousness"]),
    (
        "joy",
        &[
            "joy",
            "amusement",
            "approval",
            "excitement",
            "gratitude",
            "love",
            "optimism",
            "relief",
            "pride",
            "admiration",
            "desire",
            "caring",
        ],
    ),
    (
        "sadness",
        &[
            "sadness",
            "disappointment",
            "embarrassment",
            "grief",
            "remorse",
        ],
    ),
    (
        "surprise",
        &["surprise", "realization", "confusion", "curiosity"],
    ),
];

const SENTIMENT: &[(&str, &[&str])] = &[
    (
        "positive",
        &[
            "amusement",
            "excitement",
            "joy",
            "love",
            "desire",
            "optimism",
            "caring",
            "pride",
            "admiration",
            "gratitude",
            "relief",
            "approval",
        ],
    ),
    (
        "negative",
        &[
            "fear",
            "nervousness",
            "remorse",
            "embarrassment",
            "disappointment",
            "sadness",
            "grief",
            "disgust",
            "anger",
            "annoyance",
            "disapproval",
        ],
    ),
    (
        "ambiguous",
        &["realization", "surprise", "curiosity", "confusion"],
    ),
];

impl Taxonomy {
    /// The name pipeline.yaml and summary.json give it.
    pub fn name(self) -> &'static str {
        match self {
            Taxonomy::Original => "original",
            Taxonomy::Ekman => "ekman",
            Taxonomy::Sentiment => "sentiment",
        }
    }

    /// The mapped label names and, for each original label, its mapped index.
    pub fn mapping(self, original: &[String]) -> anyhow::Result<(Vec<String>, Vec<u32>)> {
        let groups = match self {
            Taxonomy::Original => {
                return Ok((original.to_vec(), (0..original.len() as u32).collect()));
            }
            Taxonomy::Ekman => EKMAN,
            Taxonomy::Sentiment => SENTIMENT,
        };
        let mut names: Vec<String> = groups.iter().map(|(g, _)| g.to_string()).collect();
        names.push("neutral".into());
        let index = original
            .iter()
            .map(|label| {
                if label == "neutral" {
                    return Ok(groups.len() as u32);
                }
                groups
                    .iter()
                    .position(|(_, members)| members.contains(&label.as_str()))
                    .map(|g| g as u32)
                    .ok_or_else(|| anyhow::anyhow!("label `{label}` has no group in the {self:?} taxonomy; use taxonomy: original"))
            })
            .collect::<anyhow::Result<Vec<u32>>>()?;
        Ok((names, index))
    }
}

/// Map a row's original labels to the union of their groups (sorted, unique).
/// Labels without an entry in `index` are dropped (load checks every id against the label file).
pub fn map_labels(labels: &[u32], index: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = labels
        .iter()
        .filter_map(|&l| index.get(l as usize).copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

pub fn write_dataset(dir: &Path, labels: &[String], rows: &[Row]) -> anyhow::Result<()> {
    let n = rows.len();
    let mut label_col =
        ListPrimitiveChunkedBuilder::<UInt32Type>::new("labels".into(), n, n * 2, DataType::UInt32);
    for r in rows {
        label_col.append_slice(&r.labels);
    }
    let columns = vec![
        Column::new(
            "id".into(),
            rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "text".into(),
            rows.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
        ),
        label_col.finish().into_series().into(),
        Column::new(
            "split".into(),
            rows.iter().map(|r| r.split.name()).collect::<Vec<_>>(),
        ),
    ];
    let mut df = DataFrame::new(n, columns)?;
    let path = dir.join(DATASET_FILE);
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    IpcWriter::new(file)
        .finish(&mut df)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    goemo_fsio::write_json(&dir.join(LABELS_FILE), &labels)?;
    Ok(())
}

pub fn read_dataset(dir: &Path) -> anyhow::Result<(Vec<String>, Vec<Row>)> {
    let names: Vec<String> = goemo_fsio::read_json(&dir.join(LABELS_FILE))?;
    let path = dir.join(DATASET_FILE);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let df = IpcReader::new(file)
        .finish()
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let bad =
        |what: &str| anyhow::anyhow!("{}: column `{what}` is missing or mistyped", path.display());
    let ids = df
        .column("id")
        .map_err(|_| bad("id"))?
        .str()
        .map_err(|_| bad("id"))?;
    let texts = df
        .column("text")
        .map_err(|_| bad("text"))?
        .str()
        .map_err(|_| bad("text"))?;
    let splits = df
        .column("split")
        .map_err(|_| bad("split"))?
        .str()
        .map_err(|_| bad("split"))?;
    let label_lists = df
        .column("labels")
        .map_err(|_| bad("labels"))?
        .list()
        .map_err(|_| bad("labels"))?;
    let mut rows = Vec::with_capacity(df.height());
    for (((id, text), split), ls) in ids
        .iter()
        .zip(texts.iter())
        .zip(splits.iter())
        .zip(label_lists.amortized_iter())
    {
        let ls = ls.ok_or_else(|| bad("labels"))?;
        let labels: Vec<u32> = ls
            .as_ref()
            .u32()
            .map_err(|_| bad("labels"))?
            .into_no_null_iter()
            .collect();
        if let Some(l) = labels.iter().find(|&&l| l as usize >= names.len()) {
            anyhow::bail!(
                "{}: row `{}` has label index {l}, but {LABELS_FILE} names {} labels; re-run the load stage",
                path.display(),
                id.unwrap_or_default(),
                names.len()
            );
        }
        rows.push(Row {
            id: id.unwrap_or_default().to_owned(),
            text: text.unwrap_or_default().to_owned(),
            labels,
            split: split.and_then(Split::parse).ok_or_else(|| bad("split"))?,
        });
    }
    Ok((names, rows))
}

/// Counts a report shows for one split: examples per label, multi-label rows, rows. Fields in
/// alphabetical order: summary.json's key order since it was first written through
/// `serde_json::Value` (whose maps sort their keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitSummary {
    pub examples_per_label: BTreeMap<String, usize>,
    pub max_labels_per_row: usize,
    pub multi_label_rows: usize,
    pub multi_label_share: f64,
    pub rows: usize,
}

/// One value per split, serialized as `{"dev": …, "test": …, "train": …}` (alphabetical).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PerSplit<T> {
    pub dev: T,
    pub test: T,
    pub train: T,
}

impl<T> PerSplit<T> {
    pub fn get(&self, split: Split) -> &T {
        match split {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }

    /// Build one from a value per split.
    pub fn from_fn(mut f: impl FnMut(Split) -> T) -> PerSplit<T> {
        let train = f(Split::Train);
        let dev = f(Split::Dev);
        let test = f(Split::Test);
        PerSplit { dev, test, train }
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> PerSplit<U> {
        PerSplit::from_fn(|s| f(self.get(s)))
    }
}

/// Per split: rows, examples per label and multi-label rows. `rows` must carry label indices
/// below `labels.len()` (what [`read_dataset`] checks); others are not counted.
pub fn summarize(labels: &[String], rows: &[Row]) -> PerSplit<SplitSummary> {
    PerSplit::from_fn(|split| {
        let in_split: Vec<&Row> = rows.iter().filter(|r| r.split == split).collect();
        let mut counts = vec![0usize; labels.len()];
        for r in &in_split {
            for &l in &r.labels {
                if let Some(c) = counts.get_mut(l as usize) {
                    *c += 1;
                }
            }
        }
        let multi = in_split.iter().filter(|r| r.labels.len() > 1).count();
        SplitSummary {
            examples_per_label: labels.iter().cloned().zip(counts).collect(),
            max_labels_per_row: in_split.iter().map(|r| r.labels.len()).max().unwrap_or(0),
            multi_label_rows: multi,
            multi_label_share: if in_split.is_empty() {
                0.0
            } else {
                round6(multi as f64 / in_split.len() as f64)
            },
            rows: in_split.len(),
        }
    })
}

pub fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_round_trips_through_arrow() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec!["a".to_string(), "b".to_string()];
        let rows = vec![
            Row {
                id: "x1".into(),
                text: "héllo 😀".into(),
                labels: vec![0, 1],
                split: Split::Train,
            },
            Row {
                id: "x2".into(),
                text: "bye".into(),
                labels: vec![1],
                split: Split::Test,
            },
        ];
        write_dataset(dir.path(), &labels, &rows).unwrap();
        let first = std::fs::read(dir.path().join(DATASET_FILE)).unwrap();
        let (l2, r2) = read_dataset(dir.path()).unwrap();
        assert_eq!((l2, r2), (labels.clone(), rows.clone()));
        write_dataset(dir.path(), &labels, &rows).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(DATASET_FILE)).unwrap(),
            first,
            "same rows, same bytes"
        );
    }

    #[test]
    fn ekman_and_sentiment_mappings_cover_every_emotion() {
        let dir = crate::test_support::goemotions_dir();
        let names: Vec<String> = std::fs::read_to_string(dir.join("labels.txt"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let (ekman, idx) = Taxonomy::Ekman.mapping(&names).unwrap();
        assert_eq!(
            ekman,
            ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
        );
        let grief = names.iter().position(|n| n == "grief").unwrap() as u32;
        let curiosity = names.iter().position(|n| n == "curiosity").unwrap() as u32;
        // grief → sadness, curiosity → surprise: a row with both carries both.
        assert_eq!(map_labels(&[grief, curiosity], &idx), vec![4, 5]);
        let (sent, idx) = Taxonomy::Sentiment.mapping(&names).unwrap();
        assert_eq!(sent, ["positive", "negative", "ambiguous", "neutral"]);
        assert_eq!(map_labels(&[grief, 27], &idx), vec![1, 3]);
        let joy = names.iter().position(|n| n == "joy").unwrap() as u32;
        let love = names.iter().position(|n| n == "love").unwrap() as u32;
        assert_eq!(
            map_labels(&[joy, love], &idx),
            vec![0],
            "union, not duplicates"
        );
    }
}
