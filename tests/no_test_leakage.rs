//! No test-set leakage: every choice the pipeline makes (the best epoch, early stopping, the
//! tuned thresholds, the best member of a sweep) reads dev only. The proof: the same project
//! with the test split's labels shuffled among its rows makes every one of those choices the
//! same, bit for bit, while the test metrics (which do read them) change.

mod common;

use common::Project;
use goemo_nn::model::Arch;

const PIPELINE: &str = r#"
stages:
  load:
    inputs: {data: data}
  sample:
    deps: [load]
    params: {fraction: 0.02, seed: 3}
  tokenize:
    deps: [sample]
    inputs: {model: models/tiny}
    params: {max_len: 64}
  train:
    deps: [tokenize]
    inputs: {model: models/tiny}
    params: {epochs: 4, patience: 1, batch_size: 16, lr: 2.0e-3, head_lr_scale: 1, log_every: 1000}
    publish: {out/model/model.safetensors: model.safetensors, out/train_log.json: train_log.json}
  thresholds:
    deps: [train, tokenize]
    publish: {out/thresholds.json: thresholds.json}
  evaluate:
    deps: [train, tokenize, thresholds]
    params: {bootstrap_samples: 100}
    publish: {out/metrics.json: metrics.json}
"#;

/// A project over a copy of GoEmotions whose test labels are rotated by `shift` rows (0: the
/// real labels). Texts, ids and the other splits are untouched.
fn project(shift: usize) -> Project {
    let p = Project::new(PIPELINE);
    let src = goemo_testing::goemotions_dir();
    std::fs::create_dir_all(p.file("data")).unwrap();
    for f in ["train.tsv", "dev.tsv", "labels.txt"] {
        std::fs::copy(src.join(f), p.file(&format!("data/{f}"))).unwrap();
    }
    let test = std::fs::read_to_string(src.join("test.tsv")).unwrap();
    let rows: Vec<Vec<&str>> = test.lines().map(|l| l.split('\t').collect()).collect();
    let n = rows.len();
    let shuffled: String = (0..n)
        .map(|i| {
            let (text, id) = (rows[i][0], rows[i][2]);
            format!("{text}\t{}\t{id}\n", rows[(i + shift) % n][1])
        })
        .collect();
    std::fs::write(p.file("data/test.tsv"), shuffled).unwrap();
    goemo_testing::write_tiny_model(&p.file("models/tiny"), Arch::Bert, 0.1, 5);
    p
}

fn json(p: &Project, rel: &str) -> serde_json::Value {
    serde_json::from_str(&p.read(rel)).unwrap()
}

#[test]
fn shuffled_test_labels_change_no_choice() {
    let (real, shuffled) = (project(0), project(7919));
    assert!(
        real.read("data/test.tsv") != shuffled.read("data/test.tsv"),
        "the test labels were not shuffled"
    );
    let mut trained = Vec::new();
    for p in [&real, &shuffled] {
        let r = p.goemo(&["run"]);
        assert_eq!(r.code, 0, "{}", r.all());
        let r = p.goemo(&[
            "exp",
            "run",
            "--name",
            "lr",
            "--set",
            "train.lr=5e-4,2e-3,8e-3",
        ]);
        assert_eq!(r.code, 0, "{}", r.all());
        let r = p.goemo(&["exp", "show", "--json"]);
        assert_eq!(r.code, 0, "{}", r.all());
        let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        trained.push(rows);
    }

    // The model: the same weights, the same best epoch, the same early stop.
    for f in ["model.safetensors", "train_log.json"] {
        let (x, y) = (
            std::fs::read(real.file(&format!("outputs/{f}"))).unwrap(),
            std::fs::read(shuffled.file(&format!("outputs/{f}"))).unwrap(),
        );
        assert!(x == y, "train's {f} read the test labels");
    }
    let log = json(&real, "outputs/train_log.json");
    let epochs = log["epochs"].as_array().unwrap().len();
    assert!(
        log["stopped_early"] == true || log["best_epoch"].as_u64() != Some(epochs as u64),
        "no choice was made on dev here (best is the last of all epochs): {log}"
    );
    assert!(
        real.read("outputs/thresholds.json") == shuffled.read("outputs/thresholds.json"),
        "the tuned thresholds read the test labels"
    );

    let (a, b) = (&trained[0], &trained[1]);
    let rows = a.as_array().unwrap();
    assert_eq!(rows.len(), 4, "baseline and three members: {a}");
    let best = |rows: &serde_json::Value| -> Vec<String> {
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["best"] == true)
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(best(a), best(b), "the sweep's best member changed");
    for (x, y) in rows.iter().zip(b.as_array().unwrap()) {
        let name = x["name"].as_str().unwrap();
        assert_eq!(name, y["name"]);
        for dev in [
            "train.dev_macro_f1",
            "train.best_epoch",
            "thresholds.dev_macro_f1",
        ] {
            assert_eq!(x["metrics"][dev], y["metrics"][dev], "{name}: {dev} moved");
        }
        assert_ne!(
            x["metrics"]["evaluate.test_macro_f1_tuned"],
            y["metrics"]["evaluate.test_macro_f1_tuned"],
            "{name}: the test metric did not see the shuffled labels"
        );
    }
    // The selections were real choices, not forced ones: the members' dev scores differ, and
    // early stopping or a best epoch before the last happened somewhere.
    let devs: Vec<f64> = rows
        .iter()
        .map(|r| r["metrics"]["thresholds.dev_macro_f1"].as_f64().unwrap())
        .collect();
    assert!(
        devs.windows(2).any(|w| w[0] != w[1]),
        "dev scores all equal: {devs:?}"
    );
}
