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
pub fn map_labels(labels: &[u32], index: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = labels.iter().map(|&l| index[l as usize]).collect();
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
    let labels: Vec<String> = goemo_fsio::read_json(&dir.join(LABELS_FILE))?;
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
        rows.push(Row {
            id: id.unwrap_or_default().to_owned(),
            text: text.unwrap_or_default().to_owned(),
            labels,
            split: split.and_then(Split::parse).ok_or_else(|| bad("split"))?,
        });
    }
    Ok((labels, rows))
}

/// Counts a report shows: rows per split, examples per label, multi-label share.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitSummary {
    pub rows: usize,
    pub examples_per_label: BTreeMap<String, usize>,
    pub multi_label_rows: usize,
    pub multi_label_share: f64,
    pub max_labels_per_row: usize,
}

pub fn summarize(labels: &[String], rows: &[Row]) -> BTreeMap<String, SplitSummary> {
    let mut out = BTreeMap::new();
    for split in Split::ALL {
        let in_split: Vec<&Row> = rows.iter().filter(|r| r.split == split).collect();
        let mut per_label: BTreeMap<String, usize> =
            labels.iter().map(|l| (l.clone(), 0)).collect();
        for r in &in_split {
            for &l in &r.labels {
                *per_label.get_mut(&labels[l as usize]).expect("valid label") += 1;
            }
        }
        let multi = in_split.iter().filter(|r| r.labels.len() > 1).count();
        out.insert(
            split.name().to_owned(),
            SplitSummary {
                rows: in_split.len(),
                examples_per_label: per_label,
                multi_label_rows: multi,
                multi_label_share: if in_split.is_empty() {
                    0.0
                } else {
                    round6(multi as f64 / in_split.len() as f64)
                },
                max_labels_per_row: in_split.iter().map(|r| r.labels.len()).max().unwrap_or(0),
            },
        );
    }
    out
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
