//! `load`: GoEmotions into a typed table, every row accounted for.
//!
//! - `source: official`: the paper's `train.tsv`, `dev.tsv`, `test.tsv` (text, label ids, comment
//!   id) and `labels.txt` (or `emotions.txt`, its name upstream).
//! - `source: raw`: the rater files `goemotions_{1,2,3}.csv` (any subset), one row per rater,
//!   aggregated per comment the way the paper does: a label is kept when at least
//!   `min_agreement` raters chose it; comments left with no label, or marked
//!   `example_very_unclear` by a rater, are dropped (and counted). Then seeded train/dev/test
//!   splits.
//!
//! A bad row (wrong field count, a label id that is not a number or out of range, empty text,
//! invalid UTF-8, a duplicate id within a split, a bad CSV cell) stops the stage with
//! `file:line: what is wrong`, or with `on_bad_rows: skip` goes to `rejects.jsonl` with its reason
//! and is counted in `summary.json`. Nothing is dropped silently.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::{self, map_labels, Row, Split, Taxonomy};
use crate::summary::{write_summary, DatasetSummary, Rejected, RowCounts};

pub use crate::summary::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRows {
    #[default]
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadParams {
    pub source: Source,
    /// Raw rater files to read (`source: raw`); any subset works.
    pub raw_files: Vec<String>,
    pub taxonomy: Taxonomy,
    pub on_bad_rows: OnBadRows,
    /// Raters who must choose a label for a comment to keep it (`source: raw`).
    pub min_agreement: u32,
    /// Seed of the train/dev/test split (`source: raw`).
    pub split_seed: u64,
    /// Train, dev, test shares (`source: raw`).
    pub split_fractions: [f64; 3],
}

impl Default for LoadParams {
    fn default() -> Self {
        LoadParams {
            source: Source::Official,
            raw_files: (1..=3).map(|i| format!("goemotions_{i}.csv")).collect(),
            taxonomy: Taxonomy::Original,
            on_bad_rows: OnBadRows::Fail,
            min_agreement: 2,
            split_seed: 42,
            split_fractions: [0.8, 0.1, 0.1],
        }
    }
}

/// A row that could not be read, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reject {
    pub file: String,
    pub line: usize,
    /// A short category (`wrong field count`, `empty text`, …) for the summary's counts.
    pub kind: String,
    pub reason: String,
    pub raw: String,
}

impl Reject {
    fn new(file: &str, line: usize, kind: &str, reason: String, raw: &[u8]) -> Self {
        Reject {
            file: file.to_owned(),
            line,
            kind: kind.to_owned(),
            reason,
            raw: String::from_utf8_lossy(raw).into_owned(),
        }
    }
}

pub const RAW_HEADER: &[&str] = &[
    "text",
    "id",
    "author",
    "subreddit",
    "link_id",
    "parent_id",
    "created_utc",
    "rater_id",
    "example_very_unclear",
];

/// Rows as read, before the taxonomy mapping.
pub struct Loaded {
    pub labels: Vec<String>,
    pub rows: Vec<Row>,
    pub rejects: Vec<Reject>,
    /// Comments left out on purpose (raw aggregation), by reason.
    pub filtered: BTreeMap<String, usize>,
    pub files: BTreeMap<String, usize>,
}

/// Write `dataset.arrow`, `rejects.jsonl` and `summary.json` into `out_dir`, or fail when
/// `on_bad_rows: fail` and a row was rejected. `recorded` turns a file name as messages show it into the one written to `out/`: relative to
/// the data folder, so the results do not depend on where the data lies.
pub fn write_outputs(
    out_dir: &Path,
    params: &LoadParams,
    mut loaded: Loaded,
    recorded: &dyn Fn(&str) -> String,
) -> anyhow::Result<()> {
    if !loaded.rejects.is_empty() && params.on_bad_rows == OnBadRows::Fail {
        let shown: Vec<String> = loaded
            .rejects
            .iter()
            .take(5)
            .map(|r| format!("{}:{}: {}", r.file, r.line, r.reason))
            .collect();
        let more = loaded.rejects.len().saturating_sub(5);
        anyhow::bail!(
            "{} bad row(s):\n  {}{}\n  hint: fix the file, or set `on_bad_rows: skip` on the load stage to drop such rows (each is written with its reason to rejects.jsonl)",
            loaded.rejects.len(),
            shown.join("\n  "),
            if more > 0 { format!("\n  … and {more} more") } else { String::new() }
        );
    }
    let (names, index) = params.taxonomy.mapping(&loaded.labels)?;
    for r in &mut loaded.rows {
        r.labels = map_labels(&r.labels, &index);
    }
    data::write_dataset(out_dir, &names, &loaded.rows)?;
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for r in &loaded.rejects {
        *by_reason.entry(r.kind.clone()).or_default() += 1;
    }
    for r in &mut loaded.rejects {
        r.file = recorded(&r.file);
    }
    loaded.files = loaded
        .files
        .into_iter()
        .map(|(file, lines)| (recorded(&file), lines))
        .collect();
    if params.on_bad_rows == OnBadRows::Skip {
        let mut text = String::new();
        for r in &loaded.rejects {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(out_dir.join("rejects.jsonl"), text)?;
    }
    let splits = data::summarize(&names, &loaded.rows);
    let rows = RowCounts {
        dev: splits.dev.rows,
        test: splits.test.rows,
        total: loaded.rows.len(),
        train: splits.train.rows,
    };
    let summary = DatasetSummary {
        filtered: loaded.filtered,
        labels: names,
        lines_read: loaded.files,
        rejected: Rejected {
            by_reason,
            total: loaded.rejects.len(),
        },
        rows,
        sample: None,
        source: params.source,
        splits,
        taxonomy: params.taxonomy,
    };
    write_summary(out_dir, &summary)?;
    tracing::info!(
        "load: {} rows (train {}, dev {}, test {}), {} labels, {} rejected",
        summary.rows.total,
        summary.rows.train,
        summary.rows.dev,
        summary.rows.test,
        summary.labels.len(),
        summary.rejected.total
    );
    Ok(())
}

/// A data file's bytes; an empty one (or one of blank lines) is an error of its own, not a
/// field-count complaint about line 1.
fn read_file(path: &Path, shown: &dyn Fn(&Path) -> String) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read: {e}\n  hint: run ./setup.sh to fetch GoEmotions, or point the load stage's `inputs.data` at a folder holding it",
            shown(path)
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        anyhow::bail!(
            "{}: empty file ({} bytes, no rows)\n  hint: the copy is incomplete; run `goemo fetch-data --dest {}` again (it checks every file's sha256)",
            shown(path),
            bytes.len(),
            path.parent().map(shown).unwrap_or_default()
        );
    }
    Ok(bytes)
}

pub fn read_label_names(
    dir: &Path,
    shown: &dyn Fn(&Path) -> String,
) -> anyhow::Result<Vec<String>> {
    let path = ["labels.txt", "emotions.txt"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("labels.txt"));
    let bytes = read_file(&path, shown)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not valid UTF-8: {e}", shown(&path)))?;
    let names: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            anyhow::bail!("{}:{}: label `{n}` is listed twice", shown(&path), i + 1);
        }
    }
    if names.is_empty() {
        anyhow::bail!("{}: no label names", shown(&path));
    }
    Ok(names)
}

pub fn load_official(dir: &Path, shown: &dyn Fn(&Path) -> String) -> anyhow::Result<Loaded> {
    let labels = read_label_names(dir, shown)?;
    let mut rows = Vec::new();
    let mut rejects = Vec::new();
    let mut files = BTreeMap::new();
    for split in Split::ALL {
        let path = dir.join(format!("{}.tsv", split.name()));
        let bytes = read_file(&path, shown)?;
        let file = shown(&path);
        let (mut r, lines) = parse_official(&bytes, &file, split, labels.len(), &mut rejects);
        files.insert(file, lines);
        rows.append(&mut r);
    }
    Ok(Loaded {
        labels,
        rows,
        rejects,
        filtered: BTreeMap::new(),
        files,
    })
}

/// Parse one official split file; bad rows go to `rejects`. Returns rows and lines read.
pub fn parse_official(
    bytes: &[u8],
    file: &str,
    split: Split,
    n_labels: usize,
    rejects: &mut Vec<Reject>,
) -> (Vec<Row>, usize) {
    let mut rows = Vec::new();
    let mut first_line_of: HashMap<String, usize> = HashMap::new();
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut lines = 0;
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        lines = line;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let mut reject =
            |kind: &str, reason: String| rejects.push(Reject::new(file, line, kind, reason, raw));
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                reject(
                    "invalid UTF-8",
                    format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
                );
                continue;
            }
        };
        let fields: Vec<&str> = text.split('\t').collect();
        if fields.len() != 3 {
            reject(
                "wrong field count",
                format!(
                    "expected 3 tab-separated fields (text, label ids, comment id), found {}",
                    fields.len()
                ),
            );
            continue;
        }
        let (body_text, label_field, id) = (fields[0], fields[1].trim(), fields[2].trim());
        if body_text.trim().is_empty() {
            reject("empty text", "empty text".into());
            continue;
        }
        if id.is_empty() {
            reject("empty id", "empty comment id".into());
            continue;
        }
        if label_field.is_empty() {
            reject("no label ids", "no label ids".into());
            continue;
        }
        let mut labels = Vec::new();
        let mut bad = None;
        for part in label_field.split(',') {
            match part.trim().parse::<u32>() {
                Ok(l) if (l as usize) < n_labels => labels.push(l),
                Ok(l) => {
                    bad = Some(("label id out of range", format!("label id {l} is out of range: the label file has {n_labels} labels (0–{})", n_labels - 1)));
                    break;
                }
                Err(_) => {
                    bad = Some((
                        "label id not a number",
                        format!("label id `{}` is not a number", part.trim()),
                    ));
                    break;
                }
            }
        }
        if let Some((kind, reason)) = bad {
            reject(kind, reason);
            continue;
        }
        if let Some(first) = first_line_of.get(id) {
            reject(
                "duplicate id",
                format!(
                    "duplicate comment id `{id}` in the {} split (first on line {first})",
                    split.name()
                ),
            );
            continue;
        }
        first_line_of.insert(id.to_owned(), line);
        labels.sort_unstable();
        labels.dedup();
        rows.push(Row {
            id: id.to_owned(),
            text: body_text.to_owned(),
            labels,
            split,
        });
    }
    (rows, lines)
}

struct Votes {
    text: String,
    votes: Vec<u32>,
    unclear: bool,
}

pub fn load_raw(
    dir: &Path,
    params: &LoadParams,
    shown: &dyn Fn(&Path) -> String,
) -> anyhow::Result<Loaded> {
    let labels = read_label_names(dir, shown)?;
    let mut comments: BTreeMap<String, Votes> = BTreeMap::new();
    let mut rejects = Vec::new();
    let mut files = BTreeMap::new();
    for name in &params.raw_files {
        let path: PathBuf = dir.join(name);
        let bytes = read_file(&path, shown)?;
        let file = shown(&path);
        let lines = parse_raw(&bytes, &file, &labels, &mut comments, &mut rejects)?;
        files.insert(file, lines);
    }
    let mut filtered: BTreeMap<String, usize> = BTreeMap::new();
    let mut kept: Vec<(String, String, Vec<u32>)> = Vec::new();
    for (id, c) in comments {
        if c.unclear {
            *filtered
                .entry("marked example_very_unclear".into())
                .or_default() += 1;
            continue;
        }
        let chosen: Vec<u32> = (0..labels.len() as u32)
            .filter(|&l| c.votes[l as usize] >= params.min_agreement)
            .collect();
        if chosen.is_empty() {
            *filtered
                .entry(format!(
                    "no label chosen by at least {} raters",
                    params.min_agreement
                ))
                .or_default() += 1;
            continue;
        }
        kept.push((id, c.text, chosen));
    }
    // Seeded split over comments in id order, so file order does not matter.
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        params.split_seed,
    ));
    let n = kept.len();
    let n_train = (params.split_fractions[0] * n as f64).round() as usize;
    let n_dev = ((params.split_fractions[1] * n as f64).round() as usize).min(n - n_train);
    let mut split_of = vec![Split::Test; n];
    for (pos, &i) in order.iter().enumerate() {
        split_of[i] = if pos < n_train {
            Split::Train
        } else if pos < n_train + n_dev {
            Split::Dev
        } else {
            Split::Test
        };
    }
    let mut rows: Vec<Row> = kept
        .into_iter()
        .zip(split_of)
        .map(|((id, text, labels), split)| Row {
            id,
            text,
            labels,
            split,
        })
        .collect();
    rows.sort_by(|a, b| (a.split, &a.id).cmp(&(b.split, &b.id)));
    Ok(Loaded {
        labels,
        rows,
        rejects,
        filtered,
        files,
    })
}

fn parse_raw(
    bytes: &[u8],
    file: &str,
    labels: &[String],
    comments: &mut BTreeMap<String, Votes>,
    rejects: &mut Vec<Reject>,
) -> anyhow::Result<usize> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(false)
        .from_reader(bytes);
    let mut records = reader.byte_records();
    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => anyhow::bail!("{file}:1: cannot read the header: {e}"),
        None => anyhow::bail!("{file}: empty file (expected the raw GoEmotions header)"),
    };
    check_raw_header(&header, file, labels)?;
    let n_fields = RAW_HEADER.len() + labels.len();
    let mut lines = 1;
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(lines + 1);
                rejects.push(Reject::new(
                    file,
                    line,
                    "unreadable CSV row",
                    format!("unreadable CSV row: {e}"),
                    b"",
                ));
                continue;
            }
        };
        let line = record
            .position()
            .map(|p| p.line() as usize)
            .unwrap_or(lines + 1);
        lines = line;
        let vote = if record.len() == n_fields {
            parse_raw_record(&record, labels)
        } else {
            Err((
                "wrong field count",
                format!(
                    "expected {n_fields} comma-separated fields, found {}",
                    record.len()
                ),
            ))
        };
        match vote {
            Ok(v) => {
                let entry = comments.entry(v.id).or_insert_with(|| Votes {
                    text: v.text,
                    votes: vec![0; labels.len()],
                    unclear: false,
                });
                entry.unclear |= v.unclear;
                for (total, add) in entry.votes.iter_mut().zip(v.votes) {
                    *total += add;
                }
            }
            Err((kind, reason)) => {
                let raw_line: Vec<u8> = record.iter().collect::<Vec<_>>().join(&b","[..]);
                rejects.push(Reject::new(file, line, kind, reason, &raw_line));
            }
        }
    }
    Ok(lines)
}

/// The raw files' header: [`RAW_HEADER`], then the label names in labels.txt order.
fn check_raw_header(header: &csv::ByteRecord, file: &str, labels: &[String]) -> anyhow::Result<()> {
    let expected: Vec<&str> = RAW_HEADER
        .iter()
        .copied()
        .chain(labels.iter().map(String::as_str))
        .collect();
    let found: Vec<String> = header
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_owned())
        .collect();
    if found == expected {
        return Ok(());
    }
    let first_diff = expected
        .iter()
        .zip(&found)
        .position(|(e, f)| e != f)
        .unwrap_or(expected.len().min(found.len()));
    anyhow::bail!(
        "{file}:1: not a raw GoEmotions header: column {} is `{}`, expected `{}` ({} columns found, {} expected: {}, then the {} labels in labels.txt order)\n  hint: these must be the goemotions_N.csv rater files; for train/dev/test .tsv files use `source: official`",
        first_diff + 1,
        found.get(first_diff).map(String::as_str).unwrap_or("(missing)"),
        expected.get(first_diff).copied().unwrap_or("(nothing)"),
        found.len(),
        expected.len(),
        RAW_HEADER.join(","),
        labels.len()
    )
}

/// One rater's row of a raw file.
struct RawVote {
    id: String,
    text: String,
    unclear: bool,
    votes: Vec<u32>,
}

/// A raw row with the right field count, or the reject's (kind, reason).
fn parse_raw_record(
    record: &csv::ByteRecord,
    labels: &[String],
) -> Result<RawVote, (&'static str, String)> {
    let fields: Vec<&str> = record
        .iter()
        .map(std::str::from_utf8)
        .collect::<Result<_, _>>()
        .map_err(|e| ("invalid UTF-8", format!("not valid UTF-8: {e}")))?;
    let field = |i: usize| fields.get(i).copied().unwrap_or_default();
    let (text, id) = (field(0), field(1).trim());
    if text.trim().is_empty() {
        return Err(("empty text", "empty text".into()));
    }
    if id.is_empty() {
        return Err(("empty id", "empty comment id".into()));
    }
    let unclear = match field(8).trim().to_ascii_lowercase().as_str() {
        "true" | "1" => true,
        "false" | "0" => false,
        other => {
            return Err((
                "bad example_very_unclear",
                format!("example_very_unclear is `{other}`, expected True/False"),
            ))
        }
    };
    let cells = fields.get(RAW_HEADER.len()..).unwrap_or_default();
    let votes = cells
        .iter()
        .zip(labels)
        .map(|(cell, label)| match cell.trim() {
            "1" => Ok(1),
            "0" => Ok(0),
            other => Err((
                "bad label cell",
                format!("label column `{label}` is `{other}`, expected 0 or 1"),
            )),
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok(RawVote {
        id: id.to_owned(),
        text: text.to_owned(),
        unclear,
        votes,
    })
}
