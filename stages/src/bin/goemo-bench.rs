//! goemo's side of the benchmarks in scripts/bench.sh, printed as `RESULT …` lines like
//! ../shared/bench/torch_reference.py, on the same data and the same batches.
//!
//!   goemo-bench tokenize                 43,410 train texts, best of 3
//!   goemo-bench train minilm|distilbert  30 timed steps after 5 warm-up, batch 32 (BENCH_BATCHES);
//!                                        --precision f32|bf16|bf16-portable
//!   goemo-bench infer minilm|distilbert  the dev split, batch 64
//!
//! Env: MODEL_DIR (all-MiniLM-L6-v2), GE_DATA (GoEmotions), BENCH_BATCHES, RAYON_NUM_THREADS.

use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use goemo_data::data::{Row, Split};
use goemo_nn::model::{EncoderConfig, ModelDir, Params};
use goemo_stages::trainer::{self as train, AdamW, TrainParams};

fn env_path(key: &str, default: &str) -> PathBuf {
    std::env::var_os(key)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

fn read_split(split: Split) -> anyhow::Result<(Vec<String>, Vec<Row>)> {
    let dir = env_path("GE_DATA", "data/goemotions");
    let shown = |p: &std::path::Path| p.display().to_string();
    let labels = goemo_data::load::read_label_names(&dir, &shown)?;
    let bytes = std::fs::read(dir.join(format!("{}.tsv", split.name())))?;
    let mut rejects = Vec::new();
    let (rows, _) =
        goemo_data::load::parse_official(&bytes, split.name(), split, labels.len(), &mut rejects);
    Ok((labels, rows))
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn model_config(which: &str, model: &std::path::Path) -> anyhow::Result<(EncoderConfig, bool)> {
    match which {
        "minilm" => Ok((ModelDir::open(model)?.cfg, true)),
        // transformers' DistilBertConfig defaults: dim 768, 6 layers, 12 heads, hidden 3072.
        "distilbert" => Ok((
            EncoderConfig::from_json(serde_json::json!({
                "model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12,
                "hidden_dim": 3072, "max_position_embeddings": 512, "dropout": 0.1, "attention_dropout": 0.1,
                "seq_classif_dropout": 0.2, "activation": "gelu"
            }))?,
            false,
        )),
        other => anyhow::bail!("unknown model {other}: minilm or distilbert"),
    }
}

fn main() -> anyhow::Result<()> {
    goemo_stages::runtime::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = env_path("MODEL_DIR", "models/all-MiniLM-L6-v2");
    let which = args.get(1).map(String::as_str).unwrap_or("minilm");
    let precision = args
        .iter()
        .position(|a| a == "--precision")
        .map(|i| args.get(i + 1).map(String::as_str));
    match args.first().map(String::as_str) {
        Some("tokenize") => bench_tokenize(&model),
        Some("train") => {
            let products = match precision {
                None | Some(Some("f32")) => goemo_nn::backprop::Products::F32,
                Some(Some("bf16")) => goemo_nn::backprop::Products::bf16(),
                Some(Some("bf16-portable")) => goemo_nn::backprop::Products::Bf16(
                    goemo_nn::bf16::Bf16Kernel::Portable,
                ),
                Some(other) => {
                    anyhow::bail!("--precision {other:?}: use f32, bf16 or bf16-portable")
                }
            };
            bench_train(which, &model, products)
        }
        Some("infer") => {
            let precision = match precision {
                None | Some(Some("f32")) => goemo_nn::infer::Precision::F32,
                Some(Some("int8")) => goemo_nn::infer::Precision::Int8,
                Some(other) => anyhow::bail!("--precision {other:?}: use f32 or int8"),
            };
            bench_infer(which, &model, args.iter().any(|a| a == "--padded"), precision)
        }
        _ => anyhow::bail!(
            "usage: goemo-bench tokenize | train minilm|distilbert [--precision f32|bf16|bf16-portable] | infer minilm|distilbert [--padded | --precision f32|int8]"
        ),
    }
}

/// 43,410 train texts, best of 3.
fn bench_tokenize(model: &std::path::Path) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    let (_, rows) = read_split(Split::Train)?;
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    let mut best = f64::INFINITY;
    let mut tokens = 0;
    for run in 0..3 {
        let t = Instant::now();
        let enc = goemo_data::tokenize::tokenize_all(model, 128, &texts)?;
        let dt = t.elapsed().as_secs_f64();
        tokens = enc.iter().map(|e| e.0.len()).sum::<usize>();
        println!("run {run}: {dt:.3}s {:.0} texts/s", texts.len() as f64 / dt);
        best = best.min(dt);
    }
    println!("RESULT tokenize threads={threads} texts={} best_s={best:.3} texts_per_s={:.0} tokens_per_s={:.0}", texts.len(), texts.len() as f64 / best, tokens as f64 / best);
    Ok(())
}

/// 30 timed optimizer steps after 5 warm-up ones, on the batches of BENCH_BATCHES.
fn bench_train(
    which: &str,
    model: &std::path::Path,
    products: goemo_nn::backprop::Products,
) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    let (labels, rows) = read_split(Split::Train)?;
    let data = goemo_data::tokenize::build(&rows, labels, model, 128)?;
    let batches_file = env_path("BENCH_BATCHES", "bench-results/bench_batches.json");
    let batches: Vec<Vec<usize>> = std::fs::read(&batches_file)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?))
        .with_context(|| {
            format!(
                "reading the benchmark's batches from {}\n  hint: `scripts/bench.sh train` writes it (the references' length-grouped batches); or set BENCH_BATCHES",
                batches_file.display()
            )
        })?;
    let (cfg, pretrained) = model_config(which, model)?;
    let params = Params::init(&cfg, 28, 0, &Device::Cpu)?;
    if pretrained {
        params.load_backbone(&model.join("model.safetensors"))?;
    }
    let p = TrainParams {
        lr: 5e-5,
        ..Default::default()
    };
    // As the trainer runs it: word-embedding rows outside a batch take their updates when read.
    let mut opt = AdamW::new(&params, p.adamw()).defer_word_rows(&params);
    // BENCH_AUTOGRAD=1: candle's autograd over padded batches instead of the packed
    // trainer, to compare the two in one build.
    let autograd = std::env::var_os("BENCH_AUTOGRAD").is_some();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    // As the trainer does: each step writes into the last one's word-embedding gradient.
    let mut spare = None;
    let (mut tsum, mut fb, mut o, mut ex, mut toks) = (0.0, 0.0, 0.0, 0usize, 0usize);
    // The packed trainer times its forward and backward passes; autograd's are one call.
    let (mut fwd_sum, mut bwd_sum) = (0.0, 0.0);
    for (step, b) in batches.iter().take(35).enumerate() {
        let t = Instant::now();
        let tokens: Vec<u32> = b
            .iter()
            .flat_map(|&i| data.row(i).iter().copied())
            .collect();
        opt.settle_rows(&params, &tokens)?;
        let (loss, grads, split) = if autograd {
            let (loss, grads) = train::loss_and_grads_autograd(
                &params,
                &data,
                b,
                train::Objective::hard(&goemo_nn::loss::Loss::bce(None)),
                Some(&mut rng),
                &Device::Cpu,
            )?;
            (loss, grads, None)
        } else {
            let (seqs, targets) = train::packed_batch(&data, b);
            let s = goemo_nn::backprop::step(
                &params,
                &seqs,
                &targets,
                &goemo_nn::loss::Loss::bce(None),
                Some(&mut rng),
                products,
                spare.take(),
            )?;
            (s.loss, s.grads, Some((s.forward_secs, s.backward_secs)))
        };
        let t1 = Instant::now();
        opt.step_rows(&params, &grads, 5e-5, &tokens)?;
        spare = Some(goemo_nn::backprop::Spare::new(grads, tokens));
        let (f, s) = ((t1 - t).as_secs_f64(), t1.elapsed().as_secs_f64());
        let len = b.iter().map(|&i| data.row(i).len()).max().unwrap_or(0);
        let (fwd, bwd) = split.unwrap_or((f64::NAN, f64::NAN));
        println!(
                "step {step} L={len} loss={loss:.4} {:.3}s fwd+bwd={f:.3} (fwd={fwd:.3} bwd={bwd:.3}) opt={s:.3}",
                f + s
            );
        if step >= 5 {
            tsum += f + s;
            fb += f;
            fwd_sum += fwd;
            bwd_sum += bwd;
            o += s;
            ex += b.len();
            toks += b.len() * len;
        }
    }
    let n = batches.len().min(35).saturating_sub(5).max(1) as f64;
    println!(
            "RESULT train model={which} path={} precision={products:?} threads={threads} steps={n} secs={tsum:.2} ex_per_s={:.2} padded_tok_per_s={:.0} s_per_step={:.3} peak_rss_mib={:.0} split_s_per_step fwd_bwd={:.3} fwd={:.3} bwd={:.3} opt={:.3}",
            if autograd { "autograd" } else { "packed" },
            ex as f64 / tsum, toks as f64 / tsum, tsum / n, peak_rss_mib(), fb / n, fwd_sum / n, bwd_sum / n, o / n
        );
    Ok(())
}

/// The dev split in file order, batches of 64; `padded`: candle's padded forward instead of
/// the packed encoder.
fn bench_infer(
    which: &str,
    model: &std::path::Path,
    padded: bool,
    precision: goemo_nn::infer::Precision,
) -> anyhow::Result<()> {
    let threads = rayon::current_num_threads();
    let (labels, rows) = read_split(Split::Dev)?;
    let data = goemo_data::tokenize::build(&rows, labels, model, 128)?;
    let (cfg, pretrained) = model_config(which, model)?;
    let params = Params::init(&cfg, 28, 0, &Device::Cpu)?;
    if pretrained {
        params.load_backbone(&model.join("model.safetensors"))?;
    }
    let weights = params.detached();
    // `--padded`: the candle forward training uses, on padded batches (the path
    // thresholds, evaluate and predict took before the packed encoder).
    // Built only for the packed path, so `--padded`'s peak memory is that path's own.
    let packed = if padded {
        None
    } else {
        Some(goemo_nn::infer::PackedEncoder::with_precision(
            &cfg, &weights, precision,
        )?)
    };
    let score = |chunk: &[usize]| -> anyhow::Result<Vec<f32>> {
        match &packed {
            Some(packed) => packed.scores(&chunk.iter().map(|&i| data.row(i)).collect::<Vec<_>>()),
            None => train::predict_scores(&cfg, &weights, &data, chunk, 64, &Device::Cpu),
        }
    };
    let all: Vec<usize> = (0..data.len()).collect();
    score(&all[..64])?;
    let t = Instant::now();
    // In file order, like the reference (no length sorting across batches).
    let mut checksum = 0.0f64;
    for chunk in all.chunks(64) {
        checksum += score(chunk)?.iter().map(|&x| x as f64).sum::<f64>();
    }
    let dt = t.elapsed().as_secs_f64();
    // Real (non-padding) tokens, [CLS] and [SEP] included: the same count for any
    // runner of these texts, so tokens/s compares across them.
    let tokens = data.offsets[data.len()];
    println!("RESULT infer model={which} path={} precision={} threads={threads} n={} tokens={tokens} secs={dt:.2} ex_per_s={:.1} nonpad_tok_per_s={:.0} peak_rss_mib={:.0} checksum={checksum:.2}", if padded { "padded" } else { "packed" }, precision.name(), data.len(), data.len() as f64 / dt, tokens as f64 / dt, peak_rss_mib());
    Ok(())
}
