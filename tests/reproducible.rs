//! What `pipeline.lock` promises: fresh projects anywhere, on any thread count, write the same
//! lock byte for byte, and a train stage killed mid-epoch and resumed writes the same bytes in
//! every output file as one that ran through. Real GoEmotions rows, a tiny random BERT with
//! dropout on, every stage of the default DAG.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::snapshot;
use goemo_nn::model::Arch;

fn pipeline(data: &Path) -> String {
    format!(
        r#"
stages:
  load:
    inputs: {{data: "{data}"}}
    publish: {{out/summary.json: data_summary.json}}
  sample:
    deps: [load]
    params: {{fraction: 0.02, seed: 3}}
  tokenize:
    deps: [sample]
    inputs: {{model: models/tiny}}
    params: {{max_len: 64}}
  train:
    deps: [tokenize]
    inputs: {{model: models/tiny}}
    params: {{epochs: 3, batch_size: 16, lr: 1.0e-3, log_every: 20}}
    publish: {{out/model: model}}
  thresholds:
    deps: [train, tokenize]
  evaluate:
    deps: [train, tokenize, thresholds]
    params: {{bootstrap_samples: 100}}
  report:
    deps: [evaluate, train, tokenize, sample]
  plot:
    deps: [evaluate, train]
    params: {{formats: [png]}}
"#,
        data = data.display()
    )
}

fn goemotions() -> PathBuf {
    goemo_testing::goemotions_dir()
        .canonicalize()
        .expect("GoEmotions: run ./setup.sh")
}

/// A project `depth` folders down a fresh temp folder, with the tiny model (dropout 0.1).
fn project_at(depth: usize) -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    let mut dir = base.path().to_path_buf();
    for d in 0..depth {
        dir = dir.join(format!("level-{d}"));
    }
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), pipeline(&goemotions())).unwrap();
    goemo_testing::write_tiny_model(&dir.join("models/tiny"), Arch::Bert, 0.1, 11);
    (base, dir)
}

fn goemo(dir: &Path, args: &[&str], threads: usize) -> std::process::Command {
    let mut c = std::process::Command::new(common::bin());
    c.args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("RAYON_NUM_THREADS", threads.to_string());
    c
}

/// Every file of every committed cache entry's `out/`, by entry key and path.
fn entry_outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(&dir.join("cache/entries"))
        .into_iter()
        .filter(|(path, _)| path.split('/').nth(1) == Some("out"))
        .collect()
}

#[test]
fn six_fresh_projects_write_byte_identical_locks() {
    let mut locks = Vec::new();
    let mut outputs = Vec::new();
    // Different folders (so different absolute paths), thread counts and processes (so
    // different hash-map seeds).
    for (depth, threads) in [(0, 2), (1, 1), (3, 3), (0, 1), (2, 2), (1, 4)] {
        let (_base, dir) = project_at(depth);
        let out = goemo(&dir, &["run"], threads).output().unwrap();
        assert!(
            out.status.success(),
            "goemo run in {} on {threads} threads:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        locks.push((
            format!("{} threads, {}", threads, dir.display()),
            std::fs::read_to_string(dir.join("pipeline.lock")).unwrap(),
        ));
        outputs.push(entry_outputs(&dir));
    }
    let (first_where, first) = &locks[0];
    assert!(first.contains("name: plot"), "{first}");
    for (place, lock) in &locks[1..] {
        if lock != first {
            let line = first
                .lines()
                .zip(lock.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("`{a}` vs `{b}`"))
                .unwrap_or_default();
            panic!("the lock of {place} differs from the lock of {first_where}: {line}");
        }
    }
    for o in &outputs[1..] {
        assert!(o == &outputs[0], "cache entries' out/ files differ");
    }
}

/// Wait until the train stage's checkpoint shows `batches` batches of epoch 2 done (or the
/// deadline passes), reading its state.json from the work folder.
fn wait_for_checkpoint(dir: &Path, epochs_done: u64, batches: u64, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        let found = std::fs::read_dir(dir.join("cache/work"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("checkpoint/state.json")).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .any(|s| {
                s["epochs_done"].as_u64() == Some(epochs_done)
                    && s["batches_done"].as_u64().unwrap_or(0) >= batches
            });
        if found {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn train_killed_mid_epoch_and_resumed_writes_the_same_bytes() {
    let (_a_base, whole) = project_at(0);
    let r = goemo(&whole, &["run", "--until", "train"], 2)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // The same project elsewhere, checkpointing after every step, SIGKILLed in epoch 2.
    let (_b_base, resumed) = project_at(1);
    let mut child = goemo(&resumed, &["run", "--until", "train"], 2)
        .env(goemo_stages::trainer::CHECKPOINT_ENV, "0")
        .process_group(0)
        .spawn()
        .unwrap();
    let reached = wait_for_checkpoint(&resumed, 1, 3, Instant::now() + Duration::from_secs(120));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    assert!(pid > 1);
    // SAFETY: a negative pid below -1 names exactly the process group made for this child.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(reached, "no mid-epoch checkpoint within 120 s");
    assert!(
        !status.success(),
        "goemo finished before the kill: {status}"
    );

    let r = goemo(&resumed, &["run", "--until", "train"], 2)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{log}");
    assert!(log.contains("train: resuming at epoch 2"), "{log}");

    let (a, b) = (entry_outputs(&whole), entry_outputs(&resumed));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    for ((path, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{path} differs after kill and resume");
    }
    assert!(names(&a).iter().any(|p| p.ends_with("out/train_log.json")));
    assert!(names(&a)
        .iter()
        .any(|p| p.ends_with("out/model/model.safetensors")));
    assert_eq!(
        std::fs::read(whole.join("pipeline.lock")).unwrap(),
        std::fs::read(resumed.join("pipeline.lock")).unwrap()
    );
}
