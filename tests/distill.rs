//! `distill` end to end through the binary: two teachers trained on a GoEmotions slice, a
//! student trained on their averaged probabilities, scored by thresholds and evaluate like any
//! train stage; the ensemble reported; bad wiring refused with the fix.

mod common;

use common::Project;
use goemo_nn::model::Arch;

fn pipeline(soft_weight: f64) -> String {
    format!(
        r#"
stages:
  load:
    inputs: {{data: data}}
  sample:
    deps: [load]
    params: {{fraction: 0.02, seed: 3}}
  tokenize:
    deps: [sample]
    inputs: {{model: models/tiny}}
    params: {{max_len: 64}}
  teacher_a:
    kind: train
    deps: [tokenize]
    inputs: {{model: models/tiny}}
    params: {{epochs: 2, batch_size: 16, lr: 2.0e-3, seed: 1, log_every: 1000}}
  teacher_b:
    kind: train
    deps: [tokenize]
    inputs: {{model: models/tiny}}
    params: {{epochs: 2, batch_size: 16, lr: 2.0e-3, seed: 2, log_every: 1000}}
  student:
    kind: distill
    deps: {{tokens: tokenize, teacher_a: teacher_a, teacher_b: teacher_b}}
    inputs: {{model: models/tiny}}
    params:
      soft_weight: {soft_weight}
      train: {{epochs: 2, batch_size: 16, lr: 2.0e-3, seed: 1, log_every: 1000}}
    publish: {{out/ensemble.json: ensemble.json, out/model/model.safetensors: student.safetensors}}
  plain:
    kind: train
    deps: [tokenize]
    inputs: {{model: models/tiny}}
    params: {{epochs: 2, batch_size: 16, lr: 2.0e-3, seed: 1, log_every: 1000}}
    publish: {{out/model/model.safetensors: plain.safetensors}}
  thresholds:
    deps: [student, tokenize]
  evaluate:
    deps: [student, tokenize, thresholds]
    params: {{bootstrap_samples: 100}}
    publish: {{out/metrics.json: metrics.json}}
"#
    )
}

fn project(soft_weight: f64) -> Project {
    let p = Project::new(&pipeline(soft_weight));
    std::os::unix::fs::symlink(
        goemo_testing::goemotions_dir().canonicalize().unwrap(),
        p.file("data"),
    )
    .unwrap();
    goemo_testing::write_tiny_model(&p.file("models/tiny"), Arch::Bert, 0.1, 5);
    p
}

#[test]
fn a_student_learns_from_the_teachers_average_and_is_scored_like_a_trained_model() {
    let p = project(0.7);
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let e: serde_json::Value = serde_json::from_str(&p.read("outputs/ensemble.json")).unwrap();
    assert_eq!(e["teachers"], serde_json::json!(["teacher_a", "teacher_b"]));
    for k in [
        "dev_macro_f1_tuned",
        "test_macro_f1_tuned",
        "test_macro_f1_at05",
        "test_micro_f1_tuned",
    ] {
        let v = e[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(
        e["teacher_test_macro_f1_tuned"].as_array().unwrap().len(),
        2
    );
    assert_eq!(e["thresholds"].as_array().unwrap().len(), 28);
    let m: serde_json::Value = serde_json::from_str(&p.read("outputs/metrics.json")).unwrap();
    assert!(
        m["policies"]["tuned"]["macro"]["f1"].as_f64().is_some(),
        "{m}"
    );
    // The student is not the plain model: the teachers' probabilities entered its targets.
    assert!(
        std::fs::read(p.file("outputs/student.safetensors")).unwrap()
            != std::fs::read(p.file("outputs/plain.safetensors")).unwrap()
    );
    // exp show lists the distill stage's figures (the ensemble's among them).
    let r = p.goemo(&["exp", "show", "--json", "--all-metrics"]);
    assert!(
        r.stdout.contains("student.ensemble_test_macro_f1_tuned"),
        "{}",
        r.stdout
    );
}

/// soft_weight 0: the targets are the labels alone, so the student is, bit for bit, the model
/// the train stage makes with the same params.
#[test]
fn without_soft_targets_the_student_is_the_plain_model() {
    let p = project(0.0);
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        std::fs::read(p.file("outputs/student.safetensors")).unwrap()
            == std::fs::read(p.file("outputs/plain.safetensors")).unwrap()
    );
}

#[test]
fn bad_wiring_and_params_are_refused_with_the_fix() {
    let p = project(0.5);
    let yaml = p.read("pipeline.yaml");
    p.write(
        "pipeline.yaml",
        &yaml.replace(
            "teacher_a: teacher_a, teacher_b: teacher_b",
            "mentor: teacher_a",
        ),
    );
    let r = p.goemo(&["run"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("no teacher* role was given") && r.stderr.contains("unknown roles"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("hint: e.g. deps:"), "{}", r.stderr);

    p.write(
        "pipeline.yaml",
        &yaml.replace("soft_weight: 0.5", "soft_weight: 1.5"),
    );
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("soft_weight must be in [0, 1]"),
        "{}",
        r.stderr
    );

    p.write(
        "pipeline.yaml",
        &yaml.replace(
            "lr: 2.0e-3, seed: 1, log_every: 1000}\n    publish: {out/ensemble",
            "lr: -1, seed: 1, log_every: 1000}\n    publish: {out/ensemble",
        ),
    );
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("lr must be > 0"), "{}", r.stderr);
}
