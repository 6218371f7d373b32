//! `tokenize`: the backbone's tokenizer over every row, in parallel (rayon over chunks), stored
//! unpadded with the labels as a multi-hot matrix. Changing only `max_len` re-runs this stage
//! and what follows, never load or sample.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data;
use crate::tokens::{length_stats, load_tokenizer, TokenizedData, TokensMeta};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeParams {
    /// Tokens per text, [CLS] and [SEP] included. 320 covers the longest GoEmotions comment
    /// (316 tokens with the BERT uncased vocabulary; p99.9 is 44).
    pub max_len: usize,
}

impl Default for TokenizeParams {
    fn default() -> Self {
        TokenizeParams { max_len: 320 }
    }
}

/// Tokenize `rows` with the tokenizer in `model`: ids, offsets, multi-hot labels, statistics.
pub fn build(
    rows: &[data::Row],
    labels: Vec<String>,
    model: &Path,
    max_len: usize,
) -> anyhow::Result<TokenizedData> {
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let encoded = tokenize_all(model, max_len, &texts)?;
    let n_labels = labels.len();
    let mut ids = Vec::new();
    let mut offsets = vec![0usize];
    let mut multi_hot = vec![0u8; rows.len() * n_labels];
    let mut lengths = Vec::with_capacity(rows.len());
    let mut truncated = 0;
    for (i, ((row_ids, was_truncated), row)) in encoded.into_iter().zip(rows).enumerate() {
        lengths.push(row_ids.len());
        truncated += was_truncated as usize;
        ids.extend_from_slice(&row_ids);
        offsets.push(ids.len());
        for &l in &row.labels {
            multi_hot[i * n_labels + l as usize] = 1;
        }
    }
    let mut rows_per_split = BTreeMap::new();
    for r in rows {
        *rows_per_split.entry(r.split.name().to_owned()).or_insert(0) += 1;
    }
    let tokenizer_file = ["tokenizer.json", "vocab.txt"]
        .iter()
        .map(|f| model.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json or vocab.txt", model.display()))?;
    let tokenizer = load_tokenizer(model, max_len)?;
    let meta = TokensMeta {
        label_names: labels,
        rows: rows.len(),
        rows_per_split,
        max_len,
        vocab_size: tokenizer.get_vocab_size(true),
        pad_id: tokenizer.token_to_id("[PAD]").unwrap_or(0),
        tokenizer_hash: blake3::hash(&std::fs::read(&tokenizer_file)?)
            .to_hex()
            .to_string(),
        lengths: length_stats(&lengths, truncated),
    };
    Ok(TokenizedData {
        ids,
        offsets,
        labels: multi_hot,
        splits: rows.iter().map(|r| r.split).collect(),
        row_ids: rows.iter().map(|r| r.id.clone()).collect(),
        meta,
    })
}

/// Token ids (special tokens included) and whether each text was truncated, in input order.
/// Texts are split into chunks that rayon spreads over the threads of the current pool.
pub fn tokenize_all(
    model_dir: &Path,
    max_len: usize,
    texts: &[&str],
) -> anyhow::Result<Vec<(Vec<u32>, bool)>> {
    let tokenizer = load_tokenizer(model_dir, max_len)?;
    texts
        .par_chunks(256)
        .map(|chunk| {
            chunk
                .iter()
                .map(|t| {
                    let enc = tokenizer
                        .encode_fast(*t, true)
                        .map_err(|e| anyhow::anyhow!("tokenizing {t:?}: {e}"))?;
                    Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<Vec<Vec<_>>>>()
        .map(|v| v.into_iter().flatten().collect())
}
