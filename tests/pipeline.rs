//! The default DAG end to end through the real binary: real GoEmotions (a stratified 2% sample),
//! a tiny random-initialised BERT, every stage, the outputs a user reads, `goemo predict`.

mod common;

use common::Project;
use goemo_nn::model::Arch;

fn pipeline(data: &str) -> String {
    format!(
        r#"
stages:
  load:
    inputs: {{data: "{data}"}}
    publish: {{out/summary.json: data_summary.json}}
  sample:
    deps: [load]
    params: {{fraction: 0.02, seed: 1}}
  tokenize:
    deps: [sample]
    inputs: {{model: models/tiny}}
    params: {{max_len: 64}}
  train:
    deps: [tokenize]
    inputs: {{model: models/tiny}}
    params: {{epochs: 2, batch_size: 16, lr: 1.0e-3, log_every: 20}}
    publish: {{out/model: model}}
  thresholds:
    deps: [train, tokenize]
    publish: {{out/thresholds.json: thresholds.json}}
  evaluate:
    deps: [train, tokenize, thresholds]
    params: {{bootstrap_samples: 200}}
  report:
    deps: [evaluate, train, tokenize, sample]
    publish:
      out/emotion_classification_report.csv: emotion_classification_report.csv
      out/overall_metrics.json: overall_metrics.json
      volatile/report.html: report.html
      volatile/report.md: report.md
  plot:
    deps: [evaluate, train]
    publish:
      out/f1_scores_barplot.png: f1_scores_barplot.png
      out/f1_scores_barplot.svg: f1_scores_barplot.svg
      out/training_curves.png: training_curves.png
      out/pr_curves.png: pr_curves.png
"#
    )
}

/// Stages the summary table says ran.
fn ran(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, result) = (it.next()?, it.next()?);
            (result == "ran").then(|| name.to_owned())
        })
        .collect()
}

/// Share of pixels that are not white.
fn ink(png_path: &std::path::Path) -> f64 {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let px = &buf[..info.buffer_size()];
    let inked = px
        .chunks(channels)
        .filter(|p| p.iter().take(3).any(|&c| c < 200))
        .count();
    inked as f64 / (px.len() / channels) as f64
}

#[test]
fn default_dag_end_to_end_with_a_tiny_model() {
    let data = goemo_testing::goemotions_dir().canonicalize().unwrap();
    let p = Project::new(&pipeline(&data.display().to_string()));
    goemo_testing::write_tiny_model(&p.file("models/tiny"), Arch::Bert, 0.1, 11);

    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        ran(&r.stdout),
        [
            "load",
            "sample",
            "tokenize",
            "train",
            "thresholds",
            "evaluate",
            "report",
            "plot"
        ]
    );

    // The model in HF layout.
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(
            p.file(&format!("outputs/model/{f}")).exists(),
            "outputs/model/{f}"
        );
    }
    // The classification report: header, 28 labels, four averages.
    let csv = p.read("outputs/emotion_classification_report.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "label,precision,recall,f1,support,threshold");
    assert_eq!(lines.len(), 1 + 28 + 4);
    assert!(lines[1].starts_with("admiration,") && lines[28].starts_with("neutral,"));
    assert!(lines[29].starts_with("micro avg,") && lines[32].starts_with("samples avg,"));
    for l in &lines[1..29] {
        let cells: Vec<&str> = l.split(',').collect();
        assert_eq!(cells.len(), 6, "{l}");
        for c in &cells[1..4] {
            let v: f64 = c.parse().unwrap();
            assert!((0.0..=1.0).contains(&v), "{l}");
        }
    }
    let m: serde_json::Value =
        serde_json::from_str(&p.read("outputs/overall_metrics.json")).unwrap();
    for key in [
        "eval_macro_f1",
        "eval_micro_f1",
        "eval_weighted_f1",
        "eval_samples_f1",
        "eval_macro_f1_at_0.5",
        "eval_macro_f1_at_0.3",
        "eval_exact_match",
        "eval_hamming_loss",
    ] {
        let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} missing"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    assert_eq!(m["per_label"].as_object().unwrap().len(), 28);
    let ci = m["eval_macro_f1_ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= m["eval_macro_f1"].as_f64().unwrap() + 1e-9);
    // Charts: real images with ink on them, SVG with text.
    for f in [
        "f1_scores_barplot.png",
        "training_curves.png",
        "pr_curves.png",
    ] {
        let size = std::fs::metadata(p.file(&format!("outputs/{f}")))
            .unwrap()
            .len();
        assert!(size > 10_000, "{f}: {size} bytes");
        let share = ink(&p.file(&format!("outputs/{f}")));
        assert!(
            share > 0.01 && share < 0.9,
            "{f}: {share:.3} of the pixels inked"
        );
    }
    let svg = p.read("outputs/f1_scores_barplot.svg");
    assert!(svg.contains("<svg") && svg.contains("gratitude") && svg.contains("F1 per emotion"));
    let html = p.read("outputs/report.html");
    assert!(
        html.contains("<svg")
            && html.contains("grief")
            && html.contains("0.46")
            && html.contains("tokenize")
    );
    assert!(p.read("outputs/report.md").contains("| tuned on dev |"));
    let summary: serde_json::Value =
        serde_json::from_str(&p.read("outputs/data_summary.json")).unwrap();
    assert_eq!(summary["rows"]["train"], 43410);

    // Only threshold params changed: thresholds and what follows re-run, nothing upstream.
    let r = p.goemo(&["run", "--set", "thresholds.policy=global"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(ran(&r.stdout), ["thresholds", "evaluate", "report", "plot"]);
    // Only a plot param: only plot.
    let r = p.goemo(&[
        "run",
        "--set",
        "thresholds.policy=global",
        "--set",
        "plot.width=900",
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(ran(&r.stdout), ["plot"]);
    let r = p.goemo(&["status"]);
    assert!(
        r.stdout
            .contains("thresholds  stale: param policy changed global → tuned"),
        "{}",
        r.stdout
    );

    predict_checks(&p);
    experiment_checks(&p);
}

/// An experiment on the real stages: its metrics reach `exp show`, and `plots diff` draws it
/// beside the baseline.
fn experiment_checks(p: &Project) {
    let lock = p.read("pipeline.lock");
    let r = p.goemo(&[
        "exp",
        "run",
        "--name",
        "pol",
        "--set",
        "thresholds.policy=global",
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    // The `run --set thresholds.policy=global` above built these keys: nothing runs again.
    assert!(r.stdout.contains("all from the cache"), "{}", r.stdout);
    assert_eq!(
        p.read("pipeline.lock"),
        lock,
        "an experiment never writes pipeline.lock"
    );
    let r = p.goemo(&["exp", "show", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1]["name"], "pol");
    assert_eq!(rows[1]["params"]["thresholds.policy"], "global");
    assert_eq!(rows[0]["params"]["thresholds.policy"], "tuned");
    for row in rows {
        for m in [
            "thresholds.dev_macro_f1",
            "train.dev_macro_f1",
            "evaluate.test_macro_f1_tuned",
            "evaluate.test_macro_f1_tuned_ci_lo",
            "evaluate.test_macro_f1_at05",
            "evaluate.test_macro_f1_at03",
            "evaluate.test_micro_f1_tuned",
        ] {
            let v = row["metrics"][m]
                .as_f64()
                .unwrap_or_else(|| panic!("{m}: {row}"));
            assert!((0.0..=1.0).contains(&v), "{m} = {v}");
        }
    }
    // Same model, so the same train figures; the global policy's dev F1 is its own.
    assert_eq!(
        rows[0]["metrics"]["train.dev_macro_f1"],
        rows[1]["metrics"]["train.dev_macro_f1"]
    );
    let overall: serde_json::Value =
        serde_json::from_str(&p.read("experiments/pol/outputs/overall_metrics.json")).unwrap();
    assert_eq!(
        rows[1]["metrics"]["evaluate.test_macro_f1_tuned"],
        overall["eval_macro_f1"]
    );
    let r = p.goemo(&["plots", "diff", "baseline", "pol", "--out", "cmp"]);
    assert_eq!(r.code, 0, "{}", r.all());
    for f in ["f1.png", "f1.svg", "curves.png", "curves.svg"] {
        let path = p.file(&format!("cmp/baseline-vs-pol_{f}"));
        assert!(
            std::fs::metadata(&path).unwrap().len() > 1000,
            "{}",
            path.display()
        );
    }
    assert!(p.read("cmp/baseline-vs-pol_f1.svg").contains("pol"));
    let r = p.goemo(&["exp", "show", "--best-by", "evaluate.test_macro_f1_tuned"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("chosen on dev, never on test"),
        "{}",
        r.stderr
    );
}

fn predict_checks(p: &Project) {
    // Text arguments: one JSON line each, labels above threshold, sorted by score.
    let r = p.goemo(&["predict", "thank you so much!", "this is awful"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "thank you so much!");
    assert!(lines[0]["labels"].is_array());
    // --top-k returns exactly K, best first.
    let r = p.goemo(&["predict", "--top-k", "3", "what a day"]);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let scores: Vec<f64> = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 3);
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));
    // --threshold 0 keeps all 28.
    let r = p.goemo(&["predict", "--threshold", "0", "hello"]);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["labels"].as_array().unwrap().len(), 28);
    // A file of lines, with an empty line and a very long text.
    let long = "word ".repeat(2000);
    p.write("texts.txt", &format!("first one\n\n{long}\n"));
    let r = p.goemo(&["predict", "--file", "texts.txt"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["warning"], "empty text");
    assert_eq!(lines[1]["labels"].as_array().unwrap().len(), 0);
    assert!(lines[2]["warning"]
        .as_str()
        .unwrap()
        .starts_with("truncated to 128 tokens"));
    assert!(
        r.stderr.contains("texts.txt:2: empty text")
            && r.stderr
                .contains("texts.txt:3: longer than the model's 128 tokens"),
        "{}",
        r.stderr
    );
    // JSONL, and stdin.
    p.write(
        "texts.jsonl",
        "{\"text\": \"so happy\"}\n{\"text\": \"so sad\", \"id\": 2}\n",
    );
    let r = p.goemo(&["predict", "--file", "texts.jsonl"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let texts: Vec<String> = r
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(texts, ["so happy", "so sad"]);
    let mut child = p
        .command(&["predict"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"from stdin\nsecond\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
    // Bad input: invalid UTF-8 names the line; a broken JSON line too; no model folder.
    std::fs::write(p.file("bad.txt"), b"fine\nbad \xff byte\n").unwrap();
    let r = p.goemo(&["predict", "--file", "bad.txt"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("bad.txt:2: not valid UTF-8 (byte 5)"),
        "{}",
        r.stderr
    );
    p.write("bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n");
    let r = p.goemo(&["predict", "--file", "bad.jsonl"]);
    assert!(
        r.code != 0 && r.stderr.contains("bad.jsonl:2: no string field `text`"),
        "{}",
        r.stderr
    );
    let r = p.goemo(&["predict", "--model", "nowhere", "hi"]);
    assert!(
        r.code != 0 && r.stderr.contains("nowhere: no config.json there"),
        "{}",
        r.stderr
    );
}
