//! Tokenizers and tokenized data.
//!
//! The tokenizer comes from the backbone folder: `tokenizer.json`, or `vocab.txt` for a BERT
//! WordPiece model. Padding is always switched off (all-MiniLM-L6-v2 ships with fixed padding to
//! 128: every text would become 128 tokens) and truncation is set from goemo's own `max_len`.
//!
//! `tokens.safetensors` stores all rows compactly, unpadded: `ids` (u16 when the vocabulary
//! fits, else u32) concatenated, `offsets` (u64, n+1), `labels` (u8 multi-hot, n × labels) and
//! `split` (u8: 0 train, 1 dev, 2 test). `meta.json` holds names, lengths and special ids;
//! `row_ids.txt` the comment ids, for messages that must name a row.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::Split;

pub const TOKENS_FILE: &str = "tokens.safetensors";
pub const META_FILE: &str = "meta.json";
pub const ROW_IDS_FILE: &str = "row_ids.txt";

/// Load the backbone's tokenizer, unpadded, truncating to `max_len` tokens.
pub fn load_tokenizer(model_dir: &Path, max_len: usize) -> anyhow::Result<Tokenizer> {
    let json = model_dir.join("tokenizer.json");
    let vocab = model_dir.join("vocab.txt");
    let mut tokenizer = if json.exists() {
        Tokenizer::from_file(&json).map_err(|e| {
            anyhow::anyhow!("{}: not a valid tokenizer.json: {e}\n  hint: re-run ./setup.sh, or give the model folder from a transformers `save_pretrained`", json.display())
        })?
    } else if vocab.exists() {
        wordpiece_from_vocab(model_dir)?
    } else {
        anyhow::bail!(
            "{}: no tokenizer.json or vocab.txt\n  hint: the model folder needs the tokenizer files that `save_pretrained` writes",
            model_dir.display()
        );
    };
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| anyhow::anyhow!("setting truncation to {max_len}: {e}"))?;
    Ok(tokenizer)
}

/// A BERT WordPiece tokenizer from `vocab.txt` (lower-cased unless tokenizer_config.json says
/// `do_lower_case: false`).
fn wordpiece_from_vocab(model_dir: &Path) -> anyhow::Result<Tokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    let vocab = model_dir.join("vocab.txt");
    let lowercase = std::fs::read(model_dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["do_lower_case"].as_bool())
        .unwrap_or(true);
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow::anyhow!("{}: {e}", vocab.display()))?;
    let mut t = Tokenizer::new(model);
    let id = |tok: &str| {
        t.token_to_id(tok)
            .ok_or_else(|| anyhow::anyhow!("{}: no `{tok}` token", vocab.display()))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    t.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .map_err(|e| anyhow::anyhow!("{}: {e}", vocab.display()))?;
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(t)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LengthStats {
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub p99: usize,
    pub max: usize,
    pub truncated: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokensMeta {
    pub label_names: Vec<String>,
    pub rows: usize,
    /// Sorted by split name: a `HashMap` here wrote its keys in a random order, so the file's
    /// hash (and every downstream key) changed from one process to the next.
    pub rows_per_split: BTreeMap<String, usize>,
    pub max_len: usize,
    pub vocab_size: usize,
    pub pad_id: u32,
    /// blake3 of the tokenizer file used, so a model/tokenizer mismatch can be caught.
    pub tokenizer_hash: String,
    pub lengths: LengthStats,
}

/// Tokenized rows, unpadded.
pub struct TokenizedData {
    pub ids: Vec<u32>,
    pub offsets: Vec<usize>,
    /// Multi-hot, rows × labels.
    pub labels: Vec<u8>,
    pub splits: Vec<Split>,
    pub row_ids: Vec<String>,
    pub meta: TokensMeta,
}

impl TokenizedData {
    pub fn len(&self) -> usize {
        self.splits.len()
    }
    pub fn is_empty(&self) -> bool {
        self.splits.is_empty()
    }
    pub fn n_labels(&self) -> usize {
        self.meta.label_names.len()
    }
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[self.offsets[i]..self.offsets[i + 1]]
    }
    pub fn row_labels(&self, i: usize) -> &[u8] {
        let l = self.n_labels();
        &self.labels[i * l..(i + 1) * l]
    }
    pub fn rows_in(&self, split: Split) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.splits[i] == split)
            .collect()
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let ids_bytes: Vec<u8> = if self.meta.vocab_size <= u16::MAX as usize + 1 {
            self.ids
                .iter()
                .flat_map(|&x| (x as u16).to_le_bytes())
                .collect()
        } else {
            self.ids.iter().flat_map(|&x| x.to_le_bytes()).collect()
        };
        let ids_dtype = if self.meta.vocab_size <= u16::MAX as usize + 1 {
            Dtype::U16
        } else {
            Dtype::U32
        };
        let offsets: Vec<u8> = self
            .offsets
            .iter()
            .flat_map(|&x| (x as u64).to_le_bytes())
            .collect();
        let splits: Vec<u8> = self.splits.iter().map(|&s| s as u8).collect();
        let n = self.len();
        let views = vec![
            (
                "ids",
                TensorView::new(ids_dtype, vec![self.ids.len()], &ids_bytes)?,
            ),
            (
                "offsets",
                TensorView::new(Dtype::U64, vec![n + 1], &offsets)?,
            ),
            (
                "labels",
                TensorView::new(Dtype::U8, vec![n, self.n_labels()], &self.labels)?,
            ),
            ("split", TensorView::new(Dtype::U8, vec![n], &splits)?),
        ];
        safetensors::serialize_to_file(views, None, &dir.join(TOKENS_FILE))?;
        goemo_fsio::write_json(&dir.join(META_FILE), &self.meta)?;
        let mut ids = self.row_ids.join("\n");
        ids.push('\n');
        std::fs::write(dir.join(ROW_IDS_FILE), ids)?;
        Ok(())
    }

    pub fn read(dir: &Path) -> anyhow::Result<TokenizedData> {
        let meta: TokensMeta = goemo_fsio::read_json(&dir.join(META_FILE))?;
        let path = dir.join(TOKENS_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let get = |name: &str| {
            st.tensor(name)
                .with_context(|| format!("{}: no tensor `{name}`", path.display()))
        };
        let ids_view = get("ids")?;
        let ids: Vec<u32> = match ids_view.dtype() {
            Dtype::U16 => ids_view
                .data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
            Dtype::U32 => ids_view
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            other => anyhow::bail!(
                "{}: ids have dtype {other:?}, expected U16 or U32",
                path.display()
            ),
        };
        let offsets: Vec<usize> = get("offsets")?
            .data()
            .chunks_exact(8)
            .map(|c| <[u8; 8]>::try_from(c).map(|b| u64::from_le_bytes(b) as usize))
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: tensor `offsets`", path.display()))?;
        let labels = get("labels")?.data().to_vec();
        let splits: Vec<Split> = get("split")?
            .data()
            .iter()
            .map(|&b| {
                Split::ALL.get(b as usize).copied().ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: split byte {b} is not 0 (train), 1 (dev) or 2 (test)",
                        path.display()
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let row_ids: Vec<String> = std::fs::read_to_string(dir.join(ROW_IDS_FILE))?
            .lines()
            .map(str::to_owned)
            .collect();
        let n = splits.len();
        if offsets.len() != n + 1
            || labels.len() != n * meta.label_names.len()
            || row_ids.len() != n
            || offsets.last() != Some(&ids.len())
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            anyhow::bail!("{}: tensors disagree in length; re-run the tokenize stage (`goemo run --from tokenize`)", path.display());
        }
        Ok(TokenizedData {
            ids,
            offsets,
            labels,
            splits,
            row_ids,
            meta,
        })
    }
}

pub fn length_stats(lengths: &[usize], truncated: usize) -> LengthStats {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let pct = |p: f64| {
        if sorted.is_empty() {
            0
        } else {
            sorted[((p * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
        }
    };
    LengthStats {
        mean: if sorted.is_empty() {
            0.0
        } else {
            crate::data::round6(sorted.iter().sum::<usize>() as f64 / sorted.len() as f64)
        },
        p50: pct(0.5),
        p95: pct(0.95),
        p99: pct(0.99),
        max: sorted.last().copied().unwrap_or(0),
        truncated,
    }
}
