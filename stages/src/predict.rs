//! `goemo predict`: classify texts with a fine-tuned model folder and its thresholds, printing
//! one JSON line per input: `{"text": …, "labels": [{"label": …, "score": …}, …]}`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::thresholds::Thresholds;
use goemo_data::tokens::load_tokenizer;
use goemo_nn::model::Classifier;

pub struct PredictOptions {
    pub model: PathBuf,
    /// thresholds.json; default: beside the model folder or inside it.
    pub thresholds: Option<PathBuf>,
    /// One threshold for every label, overriding thresholds.json.
    pub threshold: Option<f32>,
    /// The K best labels whatever their score.
    pub top_k: Option<usize>,
    pub batch_size: usize,
    /// The encoder's arithmetic; default: the one thresholds.json was tuned with.
    pub precision: Option<goemo_report::precision::Precision>,
}

/// One input text and where it came from (for messages).
pub struct InputText {
    pub origin: String,
    pub text: String,
}

#[derive(Serialize)]
struct LabelScore<'a> {
    label: &'a str,
    score: f32,
}

#[derive(Serialize)]
struct Prediction<'a> {
    text: &'a str,
    labels: Vec<LabelScore<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
}

pub struct PredictStats {
    pub texts: usize,
    pub seconds: f64,
    pub truncated: usize,
}

/// Where the thresholds of a model folder are: `--thresholds`, else `thresholds.json` inside the
/// folder or beside it (`outputs/thresholds.json` next to `outputs/model`).
pub fn find_thresholds(model: &Path, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(g) = given {
        return Some(g.to_path_buf());
    }
    [
        model.join("thresholds.json"),
        model
            .parent()
            .unwrap_or(Path::new("."))
            .join("thresholds.json"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Bytes of text encoded first: far more than `limit` tokens ever need in real text (a token
/// covers a few bytes), and little enough that a 20 MB paste costs what a page does.
const FIRST_PREFIX_BYTES: usize = 16 * 1024;

/// Encode `text` as the tokenizer (truncating at its limit) would, without tokenizing all of a
/// huge text: encode a prefix that ends at white space, which splits no word, and stop once it
/// already overflows the limit; otherwise try a prefix twice as long. Also returns how many
/// bytes of `text` the final encoding read.
fn encode_prefix(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
) -> tokenizers::Result<(tokenizers::Encoding, usize)> {
    let mut budget = FIRST_PREFIX_BYTES;
    loop {
        if text.len() <= budget {
            return Ok((tokenizer.encode_fast(text, true)?, text.len()));
        }
        let mut cut = budget;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        // Cut after the last white space, so the prefix's words are all whole.
        if let Some(space) = text[..cut].rfind(char::is_whitespace) {
            cut = space;
        }
        let enc = tokenizer.encode_fast(&text[..cut], true)?;
        if !enc.get_overflowing().is_empty() {
            return Ok((enc, cut));
        }
        budget *= 2;
    }
}

pub fn predict(
    inputs: &[InputText],
    opts: &PredictOptions,
    out: &mut dyn Write,
) -> anyhow::Result<PredictStats> {
    let device = crate::scoring::select_device(crate::scoring::DeviceChoice::Auto)?;
    let file = match opts.threshold {
        Some(_) => None,
        None => find_thresholds(&opts.model, opts.thresholds.as_deref())
            .map(|path| -> anyhow::Result<(PathBuf, Thresholds)> {
                let t: Thresholds = goemo_fsio::read_json(&path)?;
                t.check()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Ok((path, t))
            })
            .transpose()?,
    };
    // Score as the thresholds were tuned, unless told otherwise.
    let precision = opts
        .precision
        .or(file.as_ref().map(|(_, t)| t.precision))
        .unwrap_or_default();
    if let Some((path, t)) = &file {
        if let Some(why) = t.scoring_mismatch(precision) {
            tracing::warn!("{}: {why}", path.display());
        }
    }
    let classifier = Classifier::load_with(
        &opts.model,
        &device,
        crate::scoring::nn_precision(precision),
    )?;
    let n = classifier.labels.len();
    let thresholds: Vec<f32> = match (opts.threshold, file) {
        (Some(t), _) => vec![t; n],
        (None, Some((path, t))) => {
            if t.labels != classifier.labels {
                anyhow::bail!("{}: its labels differ from the model's config.json; pass the thresholds.json made for this model, or --threshold", path.display());
            }
            t.thresholds
        }
        (None, None) => {
            tracing::warn!("no thresholds.json beside {}; using 0.5 for every label (pass --thresholds or --threshold)", opts.model.display());
            vec![0.5; n]
        }
    };
    let limit = classifier.cfg.max_positions.min(512);
    let tokenizer = load_tokenizer(&classifier.dir, limit)?;
    let pad = tokenizer.token_to_id("[PAD]").unwrap_or(0);
    let started = Instant::now();
    let mut truncated = 0;
    let mut encoded: Vec<Vec<u32>> = Vec::with_capacity(inputs.len());
    let mut warnings: Vec<Option<String>> = Vec::with_capacity(inputs.len());
    for input in inputs {
        if input.text.trim().is_empty() {
            tracing::warn!("{}: empty text; no labels predicted", input.origin);
            encoded.push(Vec::new());
            warnings.push(Some("empty text".into()));
            continue;
        }
        let (enc, _) = encode_prefix(&tokenizer, &input.text)
            .map_err(|e| anyhow::anyhow!("{}: cannot tokenize: {e}", input.origin))?;
        let mut warning = None;
        if !enc.get_overflowing().is_empty() {
            truncated += 1;
            tracing::warn!(
                "{}: longer than the model's {limit} tokens; truncated",
                input.origin
            );
            warning = Some(format!("truncated to {limit} tokens"));
        }
        encoded.push(enc.get_ids().to_vec());
        warnings.push(warning);
    }
    // Batches of similar length; results go back in input order.
    let mut order: Vec<usize> = (0..inputs.len())
        .filter(|&i| !encoded[i].is_empty())
        .collect();
    order.sort_by_key(|&i| encoded[i].len());
    let mut scores = vec![Vec::new(); inputs.len()];
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
        let s = classifier.scores(&rows, pad)?;
        for (j, &i) in chunk.iter().enumerate() {
            scores[i] = s[j * n..(j + 1) * n].to_vec();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for (i, input) in inputs.iter().enumerate() {
        let mut labels: Vec<LabelScore<'_>> = scores[i]
            .iter()
            .enumerate()
            .filter(|(l, s)| opts.top_k.is_some() || **s >= thresholds[*l])
            .map(|(l, &s)| LabelScore {
                label: &classifier.labels[l],
                score: s,
            })
            .collect();
        labels.sort_by(|a, b| b.score.total_cmp(&a.score));
        if let Some(k) = opts.top_k {
            labels.truncate(k);
        }
        let line = serde_json::to_string(&Prediction {
            text: &input.text,
            labels,
            warning: warnings[i].clone(),
        })?;
        writeln!(out, "{line}")?;
    }
    Ok(PredictStats {
        texts: inputs.len(),
        seconds,
        truncated,
    })
}

/// Texts from a file or stdin: one per line, or JSON lines with a `text` field (a `.jsonl`
/// file, or input whose first line is a JSON object). Names the line of any bad input.
pub fn parse_texts(
    bytes: &[u8],
    origin: &str,
    jsonl: Option<bool>,
) -> anyhow::Result<Vec<InputText>> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let mut lines = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| {
            anyhow::anyhow!(
                "{origin}:{}: not valid UTF-8 (byte {}); goemo predict reads UTF-8 text",
                i + 1,
                e.valid_up_to() + 1
            )
        })?;
        lines.push(text);
    }
    let jsonl = jsonl.unwrap_or_else(|| {
        lines
            .first()
            .is_some_and(|l| l.trim_start().starts_with('{'))
    });
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let origin = format!("{origin}:{}", i + 1);
            let text = if jsonl {
                let v: serde_json::Value = serde_json::from_str(l)
                    .map_err(|e| anyhow::anyhow!("{origin}: not a JSON object: {e}"))?;
                v["text"]
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("{origin}: no string field `text`"))?
                    .to_owned()
            } else {
                l.to_owned()
            };
            Ok(InputText { origin, text })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use goemo_data::tokens::load_tokenizer;
    use goemo_testing::minilm_dir;

    /// A 20 MB paste took 10 s and 2 GB when it was tokenized whole; its first 128 tokens come
    /// from its first few hundred bytes, and the prefix gives exactly those ids.
    #[test]
    fn a_huge_text_is_encoded_from_a_prefix_with_the_same_ids() {
        let tokenizer = load_tokenizer(&minilm_dir(), 128).unwrap();
        let sentence = "I can't believe this actually worked, thank you so much! ";
        let huge = sentence.repeat(20 * 1024 * 1024 / sentence.len());
        let (got, read) = encode_prefix(&tokenizer, &huge).unwrap();
        assert!(read <= FIRST_PREFIX_BYTES, "read {read} bytes of 20 MB");
        let want = tokenizer
            .encode_fast(sentence.repeat(40).as_str(), true)
            .unwrap();
        assert_eq!(got.get_ids().len(), 128);
        assert_eq!(got.get_ids(), want.get_ids());
        assert!(!got.get_overflowing().is_empty(), "reported as truncated");

        // Short texts, and a long one without white space, are encoded whole as before.
        for text in ["ugh, not again", &"x".repeat(40_000)] {
            let (got, read) = encode_prefix(&tokenizer, text).unwrap();
            let want = tokenizer.encode_fast(text, true).unwrap();
            assert_eq!(got.get_ids(), want.get_ids());
            assert_eq!(read, text.len());
        }
    }
}
