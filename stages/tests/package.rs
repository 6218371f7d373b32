//! The package stage on the real stages' outputs: a slice of real GoEmotions through load,
//! sample, tokenize, a tiny random BERT through train, thresholds and evaluate, then the Hub
//! folder and its model card.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use goemo_nn::model::Arch;
use goemo_report::evaluation::MetricsFile;
use goemo_stage::Stage;
use goemo_stages::evaluate::EvaluateStage;
use goemo_stages::load::LoadStage;
use goemo_stages::package::PackageStage;
use goemo_stages::sample::SampleStage;
use goemo_stages::thresholds::ThresholdsStage;
use goemo_stages::tokenize::TokenizeStage;
use goemo_stages::trainer::TrainStage;
use goemo_testing::{goemotions_dir, run_stage, write_tiny_model};
use tempfile::TempDir;

const PARAMS: &str = "base_model: sentence-transformers/all-MiniLM-L6-v2";

/// Every upstream stage's folders, kept alive for the test.
struct Upstream {
    _base: TempDir,
    _load: TempDir,
    sample: TempDir,
    tokenize: TempDir,
    train: TempDir,
    thresholds: TempDir,
    evaluate: TempDir,
}

fn out(dir: &TempDir) -> PathBuf {
    dir.path().join("out")
}

impl Upstream {
    /// The first rows of each real split, then every stage of the default DAG before package.
    fn build() -> Upstream {
        let base = tempfile::tempdir().unwrap();
        let data = base.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let src = goemotions_dir();
        std::fs::copy(src.join("labels.txt"), data.join("labels.txt")).unwrap();
        for (file, n) in [("train.tsv", 400), ("dev.tsv", 150), ("test.tsv", 150)] {
            let text = std::fs::read_to_string(src.join(file)).unwrap();
            let head: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
            std::fs::write(data.join(file), head).unwrap();
        }
        let model = base.path().join("tiny");
        write_tiny_model(&model, Arch::Bert, 0.1, 3);

        let run = |stage: &dyn Stage, params: &str, inputs: &[(&str, &Path)]| {
            run_stage(stage, params, inputs).unwrap_or_else(|e| panic!("{}: {e:#}", stage.kind()))
        };
        let load = run(&LoadStage, "{}", &[("data", &data)]);
        let sample = run(
            &SampleStage,
            "{fraction: 0.5, seed: 1, splits: [train]}",
            &[("dataset", &out(&load))],
        );
        let tokenize = run(
            &TokenizeStage,
            "max_len: 64",
            &[("dataset", &out(&sample)), ("model", &model)],
        );
        let train = run(
            &TrainStage,
            "{epochs: 2, batch_size: 16, lr: 1.0e-3, pos_weight: auto, device: cpu, log_every: 1000}",
            &[("tokens", &out(&tokenize)), ("model", &model)],
        );
        let thresholds = run(
            &ThresholdsStage,
            "{}",
            &[("model", &out(&train)), ("tokens", &out(&tokenize))],
        );
        let evaluate = run(
            &EvaluateStage,
            "bootstrap_samples: 50",
            &[
                ("model", &out(&train)),
                ("tokens", &out(&tokenize)),
                ("thresholds", &out(&thresholds)),
            ],
        );
        Upstream {
            _base: base,
            _load: load,
            sample,
            tokenize,
            train,
            thresholds,
            evaluate,
        }
    }

    /// The package stage's inputs as the default pipeline connects them, with `train` and
    /// `thresholds` replaceable.
    fn package(&self, train: &Path, thresholds: &Path) -> anyhow::Result<TempDir> {
        run_stage(
            &PackageStage,
            PARAMS,
            &[
                ("train", train),
                ("thresholds", thresholds),
                ("evaluate", &out(&self.evaluate)),
                ("tokens", &out(&self.tokenize)),
                ("dataset", &out(&self.sample)),
            ],
        )
    }

    fn metrics(&self) -> MetricsFile {
        goemo_fsio::read_json(&out(&self.evaluate).join("metrics.json")).unwrap()
    }
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, into);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                into.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut map = BTreeMap::new();
    walk(dir, dir, &mut map);
    map
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (rel, bytes) in files(from) {
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(dst, bytes).unwrap();
    }
}

/// (front matter, Markdown body) of a card.
fn split_card(card: &str) -> (serde_yaml::Value, &str) {
    let rest = card
        .strip_prefix("---\n")
        .expect("the card starts with `---`");
    let end = rest
        .find("\n---\n")
        .expect("the front matter ends with `---`");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&rest[..end]).expect("front matter is YAML");
    (yaml, &rest[end + "\n---\n".len()..])
}

/// The rows of the Markdown table right under `heading`'s header row, as cells.
fn table_after<'a>(body: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let start = body
        .find(header)
        .unwrap_or_else(|| panic!("no table {header:?}"));
    body[start..]
        .lines()
        .skip(2) // the header and the `|---|` line
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn package_is_train_model_plus_thresholds_and_a_card_from_the_real_metrics() {
    let up = Upstream::build();
    let pkg = up
        .package(&out(&up.train), &out(&up.thresholds))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let folder = files(&out(&pkg).join("model"));

    // Exact copies of train's model files and of thresholds.json, and the card; nothing else.
    let model = files(&out(&up.train).join("model"));
    assert!(model.contains_key("model.safetensors") && model.contains_key("config.json"));
    assert!(model.contains_key("tokenizer.json"), "{:?}", model.keys());
    for (name, bytes) in &model {
        assert!(folder.get(name) == Some(bytes), "{name} is not train's");
    }
    assert_eq!(
        folder["thresholds.json"],
        std::fs::read(out(&up.thresholds).join("thresholds.json")).unwrap()
    );
    let mut expected: Vec<&str> = model.keys().map(String::as_str).collect();
    expected.extend(["README.md", "thresholds.json"]);
    expected.sort();
    assert_eq!(
        folder.keys().map(String::as_str).collect::<Vec<_>>(),
        expected
    );

    // The front matter, in the Hub's schema, with metrics.json's own figures.
    let card = String::from_utf8(folder["README.md"].clone()).unwrap();
    let (yaml, body) = split_card(&card);
    let m = up.metrics();
    assert_eq!(yaml["license"], "apache-2.0");
    assert_eq!(yaml["language"][0], "en");
    assert_eq!(yaml["datasets"][0], "go_emotions");
    assert_eq!(yaml["metrics"][0], "f1");
    assert_eq!(yaml["pipeline_tag"], "text-classification");
    let tags: Vec<&str> = yaml["tags"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tags,
        ["multi-label-classification", "emotion", "goemotions"]
    );
    assert_eq!(yaml["base_model"], "sentence-transformers/all-MiniLM-L6-v2");
    let index = &yaml["model-index"][0];
    assert_eq!(index["name"], "all-MiniLM-L6-v2-goemotions");
    let result = &index["results"][0];
    assert_eq!(result["task"]["type"], "text-classification");
    assert_eq!(result["dataset"]["name"], "GoEmotions");
    assert_eq!(result["dataset"]["type"], "go_emotions");
    assert_eq!(result["dataset"]["split"], "test");
    let figures: Vec<(String, f64)> = result["metrics"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|x| {
            assert_eq!(x["type"], "f1");
            (
                x["name"].as_str().unwrap().to_owned(),
                x["value"].as_f64().unwrap(),
            )
        })
        .collect();
    let p = &m.policies;
    let want = [
        ("tuned", p.tuned.macro_.f1, "macro"),
        ("0.5", p.at_05.macro_.f1, "macro"),
        ("0.3", p.at_03.macro_.f1, "macro"),
        ("tuned", p.tuned.micro.f1, "micro"),
    ];
    assert_eq!(figures.len(), want.len());
    for ((name, value), (policy, expect, avg)) in figures.iter().zip(want) {
        assert_eq!(*value, expect, "{name}");
        assert!(name.contains(avg) && name.contains(policy), "{name}");
    }

    // The Markdown: every section, then the tables hold metrics.json's figures.
    for section in [
        "\n# all-MiniLM-L6-v2-goemotions\n",
        "\n## Intended use\n",
        "\n## Data\n",
        "\n## Training\n",
        "\n## Results\n",
        "\n### Per label\n",
        "\n## Thresholds\n",
        "\n## Known limits\n",
        "\n## How to use\n",
    ] {
        assert!(body.contains(section), "no {section:?} in\n{body}");
    }
    let overall = table_after(body, "| thresholds | macro-F1 |");
    assert_eq!(overall.len(), 3);
    let [lo, hi] = m.bootstrap.macro_f1_95ci.tuned;
    assert_eq!(
        overall[0][1..],
        [
            format!("{:.4}", p.tuned.macro_.f1),
            format!("{lo:.4}–{hi:.4}"),
            format!("{:.4}", p.tuned.micro.f1)
        ]
    );
    assert_eq!(overall[1][1], format!("{:.4}", p.at_05.macro_.f1));
    assert_eq!(overall[2][1], format!("{:.4}", p.at_03.macro_.f1));
    let rows = table_after(
        body,
        "| label | threshold | precision | recall | F1 | support |",
    );
    assert_eq!(rows.len(), m.labels.len());
    assert_eq!(rows.len(), 28);
    for (row, label) in rows.iter().zip(&m.labels) {
        let r = &p.tuned.per_label[label];
        assert_eq!(
            row,
            &[
                label.clone(),
                format!("{:.4}", r.threshold),
                format!("{:.4}", r.precision),
                format!("{:.4}", r.recall),
                format!("{:.4}", r.f1),
                r.support.to_string(),
            ]
        );
    }
    // Training: one row per logged epoch; the data's row counts; the rare labels by name.
    let epochs = table_after(body, "| epoch | train loss |");
    assert_eq!(epochs.len(), 2);
    let summary = goemo_data::summary::read_summary(&out(&up.sample)).unwrap();
    for split in goemo_data::data::Split::ALL {
        let row = format!("| {} | {} |", split.name(), summary.rows_kept(split));
        assert!(body.contains(&row), "no {row:?} in\n{body}");
    }
    assert!(body.contains("a stratified 50% sample of the train split"));
    assert!(body.contains("- pos_weight (a positive's weight in the loss, per label): admiration "));
    let limits = &body[body.find("## Known limits").unwrap()..];
    let few = limits
        .lines()
        .find(|l| l.starts_with("- Few test examples"))
        .expect("150 test rows leave labels with fewer than 20 examples");
    for (label, r) in &p.tuned.per_label {
        let named = few.contains(&format!(" {label} ("));
        assert_eq!(named, r.support < 20, "{label}: support {}", r.support);
    }
    // The snippet: thresholds.json's own keys and tokenize's max_len.
    let snippet = &body[body.find("```python").unwrap()..];
    for needle in [
        "AutoModelForSequenceClassification.from_pretrained(model_id)",
        "t[\"labels\"]",
        "torch.tensor(t[\"thresholds\"])",
        "torch.sigmoid(",
        "p >= thresholds",
        "max_length=64",
    ] {
        assert!(snippet.contains(needle), "no {needle:?} in the snippet");
    }
    // Nothing of this machine in it.
    let tmp = std::env::temp_dir();
    assert!(!card.contains(tmp.to_str().unwrap()), "a path in the card");
    // train wrote train_params.json: every resolved param is listed, as keyed.
    assert!(card.contains("| param | value |"), "no params table");
    for param in ["`lr`", "`head_lr_scale`", "`warmup_fraction`", "`seed`"] {
        assert!(card.contains(&format!("| {param} |")), "{param} not listed");
    }

    // Deterministic: the same inputs give the same bytes.
    let again = up.package(&out(&up.train), &out(&up.thresholds)).unwrap();
    assert!(
        files(&out(&again)) == files(&out(&pkg)),
        "a second run differs"
    );

    // When train's results carry its resolved params, the card lists every one.
    let train_copy = tempfile::tempdir().unwrap();
    copy_dir(&out(&up.train), train_copy.path());
    let resolved = TrainStage
        .resolve_params(&serde_yaml::from_str("{epochs: 2, lr: 1.0e-3}").unwrap())
        .unwrap();
    goemo_fsio::write_json(&train_copy.path().join("train_params.json"), &resolved).unwrap();
    let with_params = up.package(train_copy.path(), &out(&up.thresholds)).unwrap();
    let card = std::fs::read_to_string(out(&with_params).join("model/README.md")).unwrap();
    let params = table_after(&card, "| param | value |");
    assert_eq!(params.len(), resolved.as_object().unwrap().len());
    assert!(params.contains(&vec!["`lr`", "`0.001`"]), "{params:?}");
    assert!(
        params.contains(&vec!["`head_lr_scale`", "`30.0`"]),
        "{params:?}"
    );
}

#[test]
fn missing_and_mismatched_inputs_are_named() {
    let up = Upstream::build();
    let err = |r: anyhow::Result<TempDir>| format!("{:#}", r.expect_err("an error"));

    // No metrics.json: the file and what to re-run.
    let metrics = out(&up.evaluate).join("metrics.json");
    let aside = out(&up.evaluate).join("metrics.json.aside");
    std::fs::rename(&metrics, &aside).unwrap();
    let e = err(up.package(&out(&up.train), &out(&up.thresholds)));
    std::fs::rename(&aside, &metrics).unwrap();
    assert!(e.contains("stage package"), "{e}");
    assert!(e.contains(&metrics.display().to_string()), "{e}");
    assert!(e.contains("re-run evaluate"), "{e}");

    // thresholds.json made for other labels.
    let other = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(out(&up.thresholds).join("thresholds.json")).unwrap();
    std::fs::write(
        other.path().join("thresholds.json"),
        text.replacen("\"admiration\"", "\"adoration\"", 1),
    )
    .unwrap();
    let e = err(up.package(&out(&up.train), other.path()));
    assert!(e.contains("thresholds.json's labels differ"), "{e}");
    assert!(e.contains("re-run thresholds"), "{e}");

    // A training run without its log.
    let train_copy = tempfile::tempdir().unwrap();
    copy_dir(&out(&up.train), train_copy.path());
    std::fs::remove_file(train_copy.path().join("train_log.json")).unwrap();
    let e = err(up.package(train_copy.path(), &out(&up.thresholds)));
    assert!(
        e.contains("train_log.json") && e.contains("re-run train"),
        "{e}"
    );

    // A model folder that already has a card is not half overwritten.
    let train_copy = tempfile::tempdir().unwrap();
    copy_dir(&out(&up.train), train_copy.path());
    std::fs::write(train_copy.path().join("model/README.md"), "# mine\n").unwrap();
    let e = err(up.package(train_copy.path(), &out(&up.thresholds)));
    assert!(e.contains("package writes its own README.md"), "{e}");
}
