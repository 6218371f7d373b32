//! Model and training on tiny random-initialised BERT and DistilBERT configs and a slice of real
//! GoEmotions rows.

use std::time::Instant;

use candle_core::{Device, Tensor};
use goemo_data::tokens::TokenizedData;
use goemo_nn::backprop::Products;
use goemo_nn::loss::{Loss, LossKind};
use goemo_nn::model::{self, Arch, Classifier, EncoderConfig, ModelDir, Params, Pooling};
use goemo_stages::trainer::{self as train, bce_with_logits, Objective, TrainEnv, TrainParams};
use goemo_testing::{
    check_finite_differences, max_abs_diff, real_tokens, tiny_config, write_tiny_model,
};

fn tiny_params(arch: Arch, dropout: f64, seed: u64) -> Params {
    let cfg = EncoderConfig::from_json(tiny_config(arch, dropout)).unwrap();
    Params::init(&cfg, 28, seed, &Device::Cpu).unwrap()
}

fn quick(epochs: usize) -> TrainParams {
    TrainParams {
        epochs,
        batch_size: 16,
        lr: 5e-3,
        warmup_fraction: 0.0,
        log_every: 1000,
        ..Default::default()
    }
}

fn no_check() -> anyhow::Result<()> {
    Ok(())
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    let data = real_tokens(48, 0, 64);
    for arch in [Arch::Bert, Arch::DistilBert] {
        let p = tiny_params(arch, 0.0, 1);
        let rows: Vec<usize> = (0..32).collect();
        let (_, grads) = train::loss_and_grads(
            &p,
            &data,
            &rows,
            Objective::hard(&Loss::bce(None)),
            None,
            &Device::Cpu,
            Products::F32,
            None,
        )
        .unwrap();
        for (name, g) in p.names.iter().zip(grads.leaves()) {
            // Embedding rows of tokens absent from the batch are legitimately zero: check the
            // tensor as a whole, and every element of everything else.
            let nonzero = g.iter().any(|&x| x != 0.0);
            assert!(nonzero, "{arch:?}: {name} got no gradient");
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{arch:?}: {name} has a non-finite gradient"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let data = real_tokens(8, 0, 32);
    let rows: Vec<usize> = (0..8).collect();
    for arch in [Arch::Bert, Arch::DistilBert] {
        // A wider init than HF's 0.02, so that every layer's gradient is well above f32 noise
        // and the check covers the whole encoder, not only the head.
        let mut config = tiny_config(arch, 0.0);
        config["initializer_range"] = serde_json::json!(0.4);
        let cfg = EncoderConfig::from_json(config).unwrap();
        let p = Params::init(&cfg, 28, 2, &Device::Cpu).unwrap();
        let (_, grads) = train::loss_and_grads(
            &p,
            &data,
            &rows,
            Objective::hard(&Loss::bce(None)),
            None,
            &Device::Cpu,
            Products::F32,
            None,
        )
        .unwrap();
        let loss_at = |p: &Params| {
            train::loss_and_grads(
                p,
                &data,
                &rows,
                Objective::hard(&Loss::bce(None)),
                None,
                &Device::Cpu,
                Products::F32,
                None,
            )
            .unwrap()
            .0
        };
        let checked = check_finite_differences(
            &p,
            &grads,
            loss_at,
            |name| name.contains("word_embeddings"),
            &format!("{arch:?}"),
        );
        assert!(checked > 20, "{arch:?}: only {checked} tensors checked");
    }
}

#[test]
fn loss_decreases_over_a_few_dozen_steps() {
    let data = real_tokens(320, 32, 64);
    for arch in [Arch::Bert, Arch::DistilBert] {
        let work = tempfile::tempdir().unwrap();
        let out = train::train_params(
            &quick(2),
            &data,
            tiny_params(arch, 0.1, 3),
            &TrainEnv {
                device: &Device::Cpu,
                work_dir: work.path(),
                check: &no_check,
                interactive: false,
            },
            Instant::now(),
        )
        .unwrap();
        let steps = &out.log.steps;
        assert_eq!(steps.len(), 40);
        let first: f64 = steps[..5].iter().map(|s| s.loss).sum::<f64>() / 5.0;
        let last: f64 = steps[35..].iter().map(|s| s.loss).sum::<f64>() / 5.0;
        assert!(last < 0.8 * first, "{arch:?}: loss {first:.4} → {last:.4}");
        assert_eq!(out.log.epochs.len(), 2);
        assert!(out.log.best_epoch >= 1);
    }
}

#[test]
fn gradient_accumulation_4x8_matches_1x32() {
    let data = real_tokens(32, 0, 64);
    let run = |batch_size: usize, grad_accum: usize| {
        let work = tempfile::tempdir().unwrap();
        // A large eps keeps Adam's first step from amplifying float noise in near-zero gradients
        // (with eps 1e-8 the first update is lr·sign(g), whatever |g| is).
        let p = TrainParams {
            epochs: 1,
            batch_size,
            grad_accum,
            lr: 1e-3,
            eps: 1e-3,
            warmup_fraction: 0.0,
            bucket_batches: 1000,
            ..Default::default()
        };
        let out = train::train_params(
            &p,
            &data,
            tiny_params(Arch::Bert, 0.0, 4),
            &TrainEnv {
                device: &Device::Cpu,
                work_dir: work.path(),
                check: &no_check,
                interactive: false,
            },
            Instant::now(),
        )
        .unwrap();
        assert_eq!(out.log.steps.len(), 1, "one optimizer step either way");
        (out.log.steps[0].clone(), out.best_weights)
    };
    let (s1, w1) = run(32, 1);
    let (s4, w4) = run(8, 4);
    assert!(
        (s1.loss - s4.loss).abs() < 1e-5,
        "loss {} vs {}",
        s1.loss,
        s4.loss
    );
    assert!(
        (s1.grad_norm - s4.grad_norm).abs() < 1e-4 * s1.grad_norm,
        "grad norm {} vs {}",
        s1.grad_norm,
        s4.grad_norm
    );
    for ((name, a), (_, b)) in w1.iter().zip(&w4) {
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{name}: updates differ by {diff}");
    }
}

#[test]
fn pos_weight_follows_the_formula() {
    let logits = Tensor::new(&[[2.0f32, -1.0]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[3.0f32, 2.0], &Device::Cpu).unwrap();
    // label 0: y=1, w=3: 3·log(1+e^-2) = 0.380784; label 1: y=0: -1 + log(1+e) = 0.313262.
    let weighted = bce_with_logits(&logits, &y, Some(&w))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (weighted - (0.380_784 + 0.313_262) / 2.0).abs() < 1e-5,
        "{weighted}"
    );
    let plain = bce_with_logits(&logits, &y, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (plain - (0.126_928 + 0.313_262) / 2.0).abs() < 1e-5,
        "{plain}"
    );
}

#[test]
fn stable_loss_stays_finite_at_extreme_logits() {
    let logits = candle_core::Var::new(&[[100.0f32, -100.0, 100.0, -100.0]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[0.0f32, 1.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    let loss = bce_with_logits(logits.as_tensor(), &y, None).unwrap();
    let v = loss.to_scalar::<f32>().unwrap();
    assert!(
        (v - 50.0).abs() < 1e-3,
        "two wrong at 100 each, two right at ~0: mean 50, got {v}"
    );
    let g = loss.backward().unwrap();
    let g: Vec<f32> = g
        .get(logits.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().all(|x| x.is_finite()));
    assert!(
        (g[0] - 0.25).abs() < 1e-6 && (g[1] + 0.25).abs() < 1e-6,
        "{g:?}"
    );
}

#[test]
fn auto_pos_weight_is_neg_over_pos_capped() {
    let data = real_tokens(200, 0, 64);
    let rows = data.rows_in(goemo_data::data::Split::Train);
    let w = train::auto_pos_weight(&data, &rows, 10.0);
    let neutral_pos = rows
        .iter()
        .filter(|&&i| data.row_labels(i)[27] == 1)
        .count();
    let expect = ((rows.len() - neutral_pos) as f64 / neutral_pos as f64).min(10.0);
    assert!((w[27] - expect).abs() < 1e-12);
    assert!(w.iter().all(|&x| x > 0.0 && x <= 10.0));
}

fn export_bytes(data: &TokenizedData, arch: Arch, seed: u64) -> (Vec<u8>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&dir.path().join("base"), arch, 0.1, seed);
    let md = ModelDir::open(&dir.path().join("base")).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = train::train(
        &quick(1),
        data,
        &md,
        &TrainEnv {
            device: &Device::Cpu,
            work_dir: &work,
            check: &no_check,
            interactive: false,
        },
    )
    .unwrap();
    model::export(
        &dir.path().join("export"),
        &md.cfg,
        &out.best_weights,
        &data.meta.label_names,
        &md.dir,
    )
    .unwrap();
    (
        std::fs::read(dir.path().join("export/model.safetensors")).unwrap(),
        dir,
    )
}

#[test]
fn same_config_same_bytes() {
    let data = real_tokens(96, 16, 64);
    let (a, _da) = export_bytes(&data, Arch::DistilBert, 5);
    let (b, _db) = export_bytes(&data, Arch::DistilBert, 5);
    assert!(
        a == b,
        "two runs of the same config gave different model.safetensors"
    );
}

#[test]
fn export_round_trip_gives_the_same_logits() {
    let data = real_tokens(64, 16, 64);
    let cases = [
        (Arch::Bert, Pooling::Cls),
        (Arch::DistilBert, Pooling::Cls),
        (Arch::Bert, Pooling::Mean),
        (Arch::DistilBert, Pooling::Mean),
    ];
    for (arch, pooling) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut p = tiny_params(arch, 0.0, 6);
        p.cfg.pooling = pooling;
        let tensors: Vec<(String, Tensor)> = p
            .names
            .iter()
            .cloned()
            .zip(p.vars.iter().map(|v| v.as_tensor().clone()))
            .collect();
        write_tiny_model(&dir.path().join("base"), arch, 0.0, 6);
        model::export(
            &dir.path().join("export"),
            &p.cfg,
            &tensors,
            &data.meta.label_names,
            &dir.path().join("base"),
        )
        .unwrap();
        let c = Classifier::load(&dir.path().join("export"), &Device::Cpu).unwrap();
        assert_eq!(c.labels, data.meta.label_names);
        assert_eq!(
            c.cfg.pooling, pooling,
            "{arch:?}: the export's config says its pooling"
        );
        let rows: Vec<usize> = (0..16).collect();
        let before =
            train::predict_scores(&p.cfg, &p.detached(), &data, &rows, 8, &Device::Cpu).unwrap();
        // The exported tensors, through the training forward.
        let exported = candle_core::safetensors::load(
            dir.path().join("export/model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let exported = goemo_nn::params::Encoder::from_named(&c.cfg, 28, &exported).unwrap();
        let after =
            train::predict_scores(&c.cfg, &exported, &data, &rows, 5, &Device::Cpu).unwrap();
        let max = max_abs_diff(&before, &after);
        assert!(max < 1e-6, "{arch:?} {pooling:?}: max difference {max}");
        // What thresholds, evaluate and predict use on the CPU: the packed encoder.
        let packed =
            train::scores_by_length(&data, &rows, 5, |seqs| c.scores(seqs, data.meta.pad_id))
                .unwrap();
        let max = max_abs_diff(&before, &packed);
        assert!(
            max < 1e-6,
            "{arch:?} {pooling:?}: packed encoder, max difference {max}"
        );
        let st = std::fs::read(dir.path().join("export/model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&st).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("export/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["problem_type"], "multi_label_classification");
        assert_eq!(cfg["id2label"]["27"], "neutral");
        assert_eq!(cfg["label2id"]["grief"], 16);
        let (want, model_type) = match (arch, pooling) {
            (Arch::Bert, Pooling::Cls) => ("BertForSequenceClassification", "bert"),
            (Arch::DistilBert, Pooling::Cls) => {
                ("DistilBertForSequenceClassification", "distilbert")
            }
            (Arch::Bert, Pooling::Mean) => ("GoemoBertForSequenceClassification", "goemo_bert"),
            (Arch::DistilBert, Pooling::Mean) => (
                "GoemoDistilBertForSequenceClassification",
                "goemo_distilbert",
            ),
        };
        assert_eq!(cfg["architectures"][0], want);
        assert_eq!(cfg["model_type"], model_type);
        let modeling = dir.path().join("export").join(model::MODELING_FILE);
        if pooling == Pooling::Mean {
            assert_eq!(cfg["classifier_pooling"], "mean");
            let class = cfg["auto_map"]["AutoModelForSequenceClassification"]
                .as_str()
                .unwrap();
            let code = std::fs::read_to_string(&modeling).unwrap();
            assert!(
                code.contains(&format!(
                    "class {}(",
                    class.trim_start_matches("modeling_goemo.")
                )),
                "{class} not in {}",
                modeling.display()
            );
        } else {
            assert!(cfg.get("classifier_pooling").is_none() && cfg.get("auto_map").is_none());
            assert!(!modeling.exists());
        }
        assert!(dir.path().join("export/tokenizer.json").exists());
    }
}

/// Train `p` uninterrupted, then again with a stop (as a kill) after `kill_at` batches, resumed
/// from its checkpoint, which must sit at `(epochs_done, batches_done)`: both runs must end with
/// the same log and bit-identical weights.
fn assert_kill_and_resume_is_exact(p: &TrainParams, kill_at: usize, checkpoint_at: (u64, u64)) {
    let data = real_tokens(96, 16, 64);
    let train = |work: &std::path::Path, check: &dyn Fn() -> anyhow::Result<()>| {
        train::train_params(
            p,
            &data,
            tiny_params(Arch::Bert, 0.1, 7),
            &TrainEnv {
                device: &Device::Cpu,
                work_dir: work,
                check,
                interactive: false,
            },
            Instant::now(),
        )
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = train(full_dir.path(), &no_check).unwrap();

    let work = tempfile::tempdir().unwrap();
    let calls = std::cell::Cell::new(0);
    let stop = || {
        calls.set(calls.get() + 1);
        if calls.get() > kill_at {
            anyhow::bail!("killed")
        } else {
            Ok(())
        }
    };
    let err = train(work.path(), &stop).err().unwrap();
    assert_eq!(err.to_string(), "killed");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("checkpoint/state.json")).unwrap())
            .unwrap();
    let position = (
        state["epochs_done"].as_u64().unwrap(),
        state["batches_done"].as_u64().unwrap(),
    );
    assert_eq!(
        position, checkpoint_at,
        "checkpoint position (epochs, batches)"
    );
    let resumed = train(work.path(), &no_check).unwrap();
    assert_eq!(resumed.log, full.log);
    // The metrics count the work of both processes, not only the one that finished.
    assert_eq!(
        resumed.metrics["train_samples"],
        full.metrics["train_samples"]
    );
    assert_eq!(full.metrics["train_samples"], 96 * p.epochs);
    for ((n, a), (_, b)) in full.best_weights.iter().zip(&resumed.best_weights) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{n} differs after resume");
    }
}

#[test]
fn killed_and_resumed_equals_uninterrupted() {
    // 96 rows in batches of 16: 6 batches an epoch. Stop in the middle of the second epoch;
    // only the end-of-epoch checkpoint of epoch 1 exists.
    assert_kill_and_resume_is_exact(&quick(3), 9, (1, 0));
}

#[test]
fn killed_mid_epoch_resumes_from_the_last_step_checkpoint() {
    // A checkpoint after every optimizer step (2 micro-batches each, dropout on): the stop
    // after batch 10 resumes from epoch 2, batch 4, with the dropout RNG where it was.
    let p = TrainParams {
        grad_accum: 2,
        checkpoint_every_secs: 0.0,
        ..quick(3)
    };
    assert_kill_and_resume_is_exact(&p, 10, (1, 4));
}

/// The training levers (asymmetric loss with smoothing, layer-wise lr decay, a weight average
/// scored and exported) survive a kill and resume bit for bit: the average is in the checkpoint.
#[test]
fn levers_resume_exactly() {
    let p = TrainParams {
        loss: train::LossName::Asl,
        asl_gamma_neg: Some(2.0),
        label_smoothing: 0.1,
        layer_lr_decay: 0.8,
        ema_decay: 0.9,
        checkpoint_every_secs: 0.0,
        ..quick(3)
    };
    assert_kill_and_resume_is_exact(&p, 10, (1, 4));
}

/// Each lever changes what is trained (a param that changed nothing would be a silent no-op),
/// and with `ema_decay` the exported weights are not the last step's.
#[test]
fn each_lever_changes_the_model() {
    let data = real_tokens(64, 16, 64);
    let run = |p: &TrainParams| {
        let work = tempfile::tempdir().unwrap();
        train::train_params(
            p,
            &data,
            tiny_params(Arch::Bert, 0.1, 7),
            &TrainEnv {
                device: &Device::Cpu,
                work_dir: work.path(),
                check: &no_check,
                interactive: false,
            },
            Instant::now(),
        )
        .unwrap()
    };
    let weights = |o: &train::TrainOutcome| -> Vec<Vec<f32>> {
        o.best_weights
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let base = weights(&run(&quick(1)));
    let levers = [
        TrainParams {
            loss: train::LossName::Focal,
            ..quick(1)
        },
        TrainParams {
            loss: train::LossName::Asl,
            ..quick(1)
        },
        TrainParams {
            label_smoothing: 0.1,
            ..quick(1)
        },
        TrainParams {
            layer_lr_decay: 0.8,
            ..quick(1)
        },
        TrainParams {
            ema_decay: 0.9,
            ..quick(1)
        },
    ];
    for p in &levers {
        let got = weights(&run(p));
        assert_ne!(
            got, base,
            "{:?}/{}/{}/{}: the same weights as plain BCE",
            p.loss, p.label_smoothing, p.layer_lr_decay, p.ema_decay
        );
    }
    // Layer-wise decay leaves the head's rate alone but slows the embeddings: their change from
    // the initial weights is smaller.
    let init: Vec<Vec<f32>> = tiny_params(Arch::Bert, 0.1, 7)
        .vars
        .iter()
        .map(|v| v.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let moved = |w: &[Vec<f32>], k: usize| max_abs_diff(&w[k], &init[k]);
    let decayed = weights(&run(&TrainParams {
        layer_lr_decay: 0.5,
        ..quick(1)
    }));
    assert!(
        moved(&decayed, 0) < moved(&base, 0),
        "word embeddings moved as much under decay"
    );
}

#[test]
fn malformed_model_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("m");
    write_tiny_model(&base, Arch::Bert, 0.0, 8);

    let missing = dir.path().join("empty");
    std::fs::create_dir_all(&missing).unwrap();
    let e = ModelDir::open(&missing).err().unwrap().to_string();
    assert!(e.contains("no config.json there"), "{e}");

    let mut cfg = tiny_config(Arch::Bert, 0.0);
    cfg["model_type"] = "roberta".into();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    let e = ModelDir::open(&base).err().unwrap().to_string();
    assert!(
        e.contains("config.json: model_type `roberta` is not supported"),
        "{e}"
    );

    let mut cfg = tiny_config(Arch::Bert, 0.0);
    cfg["hidden_size"] = 32.into();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    let md = ModelDir::open(&base).unwrap();
    let p = Params::init(&md.cfg, 28, 0, &Device::Cpu).unwrap();
    let e = p.load_backbone(&md.weights).err().unwrap().to_string();
    assert!(e.contains("model.safetensors: tensor `bert.embeddings.word_embeddings.weight` has shape [30522, 16], config.json implies [30522, 32]"), "{e}");

    let mut cfg = tiny_config(Arch::Bert, 0.0);
    cfg["vocab_size"] = 1000.into();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    let md = ModelDir::open(&base).unwrap();
    let data = real_tokens(16, 0, 64);
    let e = train::validate_against_model(&data, &md)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json: the tokenizer has 30522 tokens")
            && e.contains("vocab_size 1000"),
        "{e}"
    );

    std::fs::write(base.join("config.json"), "{not json").unwrap();
    let e = ModelDir::open(&base).err().unwrap().to_string();
    assert!(e.contains("config.json: not valid JSON"), "{e}");

    std::fs::write(
        base.join("config.json"),
        tiny_config(Arch::Bert, 0.0).to_string(),
    )
    .unwrap();
    std::fs::write(base.join("model.safetensors"), b"garbage").unwrap();
    let md = ModelDir::open(&base).unwrap();
    let p = Params::init(&md.cfg, 28, 0, &Device::Cpu).unwrap();
    let e = p.load_backbone(&md.weights).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors: not a valid safetensors file"),
        "{e}"
    );
}

#[test]
fn minilm_real_weights_smoke_test() {
    // The real backbone from ./setup.sh, a few hundred real rows, a few dozen steps.
    let data = real_tokens(384, 0, 64);
    let md = ModelDir::open(&goemo_testing::minilm_dir()).unwrap();
    assert_eq!(md.cfg.hidden, 384);
    let work = tempfile::tempdir().unwrap();
    let p = TrainParams {
        epochs: 1,
        batch_size: 16,
        lr: 5e-4,
        warmup_fraction: 0.1,
        log_every: 1000,
        ..Default::default()
    };
    let out = train::train(
        &p,
        &data,
        &md,
        &TrainEnv {
            device: &Device::Cpu,
            work_dir: work.path(),
            check: &no_check,
            interactive: false,
        },
    )
    .unwrap();
    let steps = &out.log.steps;
    assert_eq!(steps.len(), 24);
    let first: f64 = steps[..4].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    let last: f64 = steps[20..].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    assert!(last < 0.85 * first, "MiniLM loss {first:.4} → {last:.4}");
}

/// The packed trainer against candle's autograd at full size: the real MiniLM weights (12
/// heads, hidden 384, 6 layers) on real rows of mixed lengths, dropout off. The unit tests in
/// backprop.rs cover tiny shapes; this one covers the shapes and the matrix sizes where gemm
/// takes its large-matrix paths.
#[test]
fn packed_gradients_match_autograd_on_minilm() {
    let data = real_tokens(24, 0, 128);
    let md = ModelDir::open(&goemo_testing::minilm_dir()).unwrap();
    let params = Params::init(&md.cfg, 28, 0, &Device::Cpu).unwrap();
    params
        .load_backbone(&md.dir.join("model.safetensors"))
        .unwrap();
    let rows: Vec<usize> = (0..24).collect();
    // Plain BCE (candle's graph) and ASL with smoothing (the host loss entering the graph as
    // Σ logits ⊙ ∂loss/∂logits).
    let asl = Loss {
        kind: LossKind::Asymmetric {
            gamma_neg: 4.0,
            gamma_pos: 1.0,
            clip: 0.05,
        },
        label_smoothing: 0.1,
        pos_weight: Some((0..28).map(|k| 1.0 + k as f32 * 0.2).collect()),
    };
    for objective in [Loss::bce(None), asl] {
        let (want_loss, want) = train::loss_and_grads_autograd(
            &params,
            &data,
            &rows,
            Objective::hard(&objective),
            None,
            &Device::Cpu,
        )
        .unwrap();
        let (loss, got) = train::loss_and_grads(
            &params,
            &data,
            &rows,
            Objective::hard(&objective),
            None,
            &Device::Cpu,
            Products::F32,
            None,
        )
        .unwrap();
        let what = format!("{:?}", objective.kind);
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "{what}: loss {loss} vs autograd {want_loss}"
        );
        for (name, (g, w)) in params
            .names
            .iter()
            .zip(got.leaves().into_iter().zip(want.leaves()))
        {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(g, w);
            assert!(
                diff <= 2e-3 * scale + 1e-8,
                "{what} {name}: packed and autograd gradients differ by {diff} (largest {scale})"
            );
        }
    }
}
