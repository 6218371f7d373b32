//! `goemo exp`: sweeps that share cached upstream stages, never touch the baseline, run members
//! at once, resume after SIGKILL, and refuse bad input with exit 2. Cheap `command` stages
//! stand in for the ML ones (which tests/pipeline.rs runs as an experiment too).

mod common;

use std::time::{Duration, Instant};

use common::{snapshot, Project};

/// prep (upstream, shared by every member) → fit (swept: vars.lr, vars.depth) → metrics.
/// Each command appends its name to ran.log; fit also records how many fits run at once.
const PIPELINE: &str = r#"stages:
  prep:
    kind: command
    params:
      cmd: 'echo prep >> ran.log; sleep 0.3; echo data > $GOEMO_OUT/data'
  fit:
    kind: command
    deps: {prep: prep}
    params:
      cmd: 'mkdir -p running; touch running/$GOEMO_VAR_LR-$GOEMO_VAR_DEPTH; ls running | wc -l >> concurrency.log; echo fit-$GOEMO_VAR_LR-$GOEMO_VAR_DEPTH >> ran.log; sleep ${SLEEP:-0.6}; rm running/$GOEMO_VAR_LR-$GOEMO_VAR_DEPTH; echo "{\"dev_score\": $GOEMO_VAR_LR, \"test_score\": $GOEMO_VAR_DEPTH}" > $GOEMO_OUT/metrics.json'
      vars:
        lr: 1                        # learning rate
        depth: 2
    publish:
      out/metrics.json: metrics.json
"#;

/// A 4-member grid over fit, with prep changed for all of them.
const GRID: &[&str] = &[
    "exp",
    "run",
    "--name",
    "g",
    "--set",
    "prep.vars.v=1",
    "--set",
    "fit.vars.lr=2,3",
    "--set",
    "fit.vars.depth=4,5",
];

fn max_concurrency(p: &Project) -> usize {
    std::fs::read_to_string(p.file("concurrency.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn baseline(p: &Project) -> Vec<(String, Vec<u8>)> {
    let mut files = snapshot(&p.file("outputs"));
    files.push((
        "pipeline.lock".into(),
        std::fs::read(p.file("pipeline.lock")).unwrap(),
    ));
    files.push((
        "pipeline.yaml".into(),
        std::fs::read(p.file("pipeline.yaml")).unwrap(),
    ));
    files
}

#[test]
fn a_grid_shares_upstream_runs_members_at_once_and_keeps_the_baseline() {
    let p = Project::new(PIPELINE);
    assert_eq!(p.run_ok(&["run"]), ["fit-1-2", "prep"]);
    let before = baseline(&p);
    let _ = std::fs::remove_file(p.file("concurrency.log"));
    let ran = p.run_ok(&[GRID, &["--jobs", "2"]].concat());
    // prep (a new key, the same for every member) runs once, though two members start at once.
    assert_eq!(ran, ["fit-2-4", "fit-2-5", "fit-3-4", "fit-3-5", "prep"]);
    assert_eq!(max_concurrency(&p), 2, "two members at once with --jobs 2");
    assert_eq!(
        baseline(&p),
        before,
        "pipeline.lock, pipeline.yaml and outputs/ untouched"
    );

    show_and_diff(&p);
    gc_apply_remove(&p);
}

/// `exp show` (JSON, sorted, filtered, CSV, Markdown) and `exp diff` over the grid above.
fn show_and_diff(p: &Project) {
    let r = p.goemo(&["exp", "show", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "g-1", "g-2", "g-3", "g-4"]);
    assert_eq!(rows[3]["params"]["fit.vars.lr"], "3");
    assert_eq!(rows[3]["params"]["fit.vars.depth"], "4");
    assert_eq!(rows[3]["metrics"]["fit.dev_score"], 3.0);
    assert_eq!(rows[3]["metrics"]["fit.test_score"], 4.0);
    assert_eq!(rows[0]["metrics"]["fit.dev_score"], 1.0);
    // Chosen on the dev metric; the first of equals.
    let best: Vec<&str> = rows
        .iter()
        .filter(|r| r["best"] == true)
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(best, ["g-3"]);
    assert_eq!(
        p.read("experiments/g-3/outputs/metrics.json"),
        "{\"dev_score\": 3, \"test_score\": 4}\n"
    );
    let record: serde_json::Value =
        serde_json::from_str(&p.read("experiments/g-3/experiment.json")).unwrap();
    assert_eq!(record["sweep"], "g");
    assert_eq!(
        record["set"],
        serde_json::json!(["prep.vars.v=1", "fit.vars.lr=3", "fit.vars.depth=4"])
    );
    assert_eq!(record["stages"].as_array().unwrap().len(), 2);

    // Sorted on a metric, best first; filtered on a param; CSV and Markdown.
    let r = p.goemo(&[
        "exp",
        "show",
        "--sort",
        "fit.test_score",
        "--filter",
        "fit.vars.lr=2",
        "--csv",
    ]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "experiment,best,status,fit.vars.depth,fit.vars.lr,prep.vars.v,fit.dev_score,fit.test_score,train_s"
    );
    assert!(lines[1].starts_with("g-2,,done,5,2,1,"), "{}", r.stdout);
    assert!(lines[2].starts_with("g-1,,done,4,2,1,"), "{}", r.stdout);
    assert_eq!(lines.len(), 3);
    let r = p.goemo(&["exp", "show", "--md", "--no-baseline"]);
    assert!(
        r.stdout.starts_with("| experiment | best | status |"),
        "{}",
        r.stdout
    );
    assert_eq!(r.stdout.lines().count(), 2 + 4);

    // Seeds-style pooling: rows that differ only in depth become one, mean ± sample std.
    let r = p.goemo(&["exp", "show", "--json", "--mean-over", "fit.vars.depth"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "g-1, g-2", "g-3, g-4"]);
    let g = &rows[2];
    assert_eq!(g["n"], 2);
    assert_eq!(g["params"]["fit.vars.depth"], "4,5");
    assert_eq!(g["metrics"]["fit.dev_score"], 3.0);
    assert_eq!(g["metrics"]["fit.test_score"], 4.5);
    let sd = g["std"]["fit.test_score"].as_f64().unwrap();
    assert!((sd - 0.5f64.sqrt()).abs() < 1e-12, "sample std {sd}");
    assert_eq!(g["best"], true, "chosen on the group's mean dev score");
    assert_eq!(rows[0]["n"], 1);
    let r = p.goemo(&["exp", "show", "--mean-over", "fit.vars.depth"]);
    assert!(r.stdout.contains("4.5000 ± 0.7071"), "{}", r.stdout);
    let r = p.goemo(&["exp", "show", "--mean-over", "fit.vars.dept"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("--mean-over fit.vars.dept"),
        "{}",
        r.stderr
    );

    let r = p.goemo(&["exp", "diff", "g-4"]);
    assert!(
        r.stdout.contains("fit.vars.depth  2         5"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("fit.dev_score   1.0000    3.0000  +2.0000"),
        "{}",
        r.stdout
    );
}

/// `--mean-over` counts one run once (an experiment that sets a param to the value it already
/// has is the baseline again, not a second seed), and the best is chosen within each setting of
/// `--best-within` (dev scores on other data do not compare).
#[test]
fn pooling_counts_a_run_once_and_best_is_chosen_within_a_data_setting() {
    let p = Project::new(PIPELINE);
    p.run_ok(&["run"]);
    // Same params as the baseline: its cached entries, no stage runs.
    assert!(p
        .run_ok(&["exp", "run", "--name", "same", "--set", "fit.vars.lr=1"])
        .is_empty());
    p.run_ok(&["exp", "run", "--name", "deep", "--set", "fit.vars.depth=7"]);
    let r = p.goemo(&["exp", "show", "--json", "--mean-over", "fit.vars.depth"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rows[0]["name"], "baseline (= same), deep");
    assert_eq!(rows[0]["n"], 2);
    assert_eq!(rows[0]["params"]["fit.vars.depth"], "2,7");
    assert_eq!(rows[0]["metrics"]["fit.test_score"], 4.5);

    // Other data (prep's v) with a lower dev score: best only within its own setting.
    p.run_ok(&[
        "exp",
        "run",
        "--name",
        "other",
        "--set",
        "prep.vars.v=9",
        "--set",
        "fit.vars.lr=0",
    ]);
    let best = |extra: &[&str]| -> Vec<String> {
        let r = p.goemo(&[&["exp", "show", "--json"], extra].concat());
        assert_eq!(r.code, 0, "{}", r.all());
        let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["best"] == true)
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(best(&[]), ["baseline"], "first among equals, over all rows");
    // A filter on a param a row did not set matches pipeline.yaml's value.
    let r = p.goemo(&["exp", "show", "--csv", "--filter", "fit.vars.lr=1"]);
    let names: Vec<&str> = r
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(names, ["baseline", "deep", "same"], "{}", r.stdout);
    assert_eq!(
        best(&["--best-within", "prep.vars.v"]),
        ["baseline", "other"]
    );
    let r = p.goemo(&["exp", "show", "--best-within", "prep.vars.v"]);
    assert!(
        r.stdout.contains("one per value of prep.vars.v"),
        "{}",
        r.stdout
    );
}

/// gc keeps experiments' entries, apply makes one the baseline, remove and gc drop one.
fn gc_apply_remove(p: &Project) {
    // gc keeps every experiment's entries: rerunning the sweep runs nothing.
    let r = p.goemo(&["gc"]);
    assert!(r.stdout.contains("removed 0 cache entries"), "{}", r.stdout);
    assert!(r.stdout.contains("and 4 experiment(s)"), "{}", r.stdout);
    let ran = p.run_ok(GRID);
    assert!(ran.is_empty(), "{ran:?}");

    // Apply: its params into pipeline.yaml (the comment kept), its lock and outputs; all fresh.
    let _ = std::fs::remove_file(p.file("ran.log"));
    let r = p.goemo(&["exp", "apply", "g-4"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        p.ran().is_empty(),
        "apply takes everything from the cache: {:?}",
        p.ran()
    );
    assert!(p
        .read("pipeline.yaml")
        .contains("        lr: 3                        # learning rate\n        depth: 5\n"));
    assert_eq!(
        p.read("pipeline.lock"),
        p.read("experiments/g-4/pipeline.lock")
    );
    assert_eq!(
        p.read("outputs/metrics.json"),
        "{\"dev_score\": 3, \"test_score\": 5}\n"
    );
    assert!(p
        .read("pipeline.yaml")
        .contains("echo data > $GOEMO_OUT/data'\n      vars:\n        v: 1\n  fit:"));
    let r = p.goemo(&["status"]);
    assert_eq!(r.stdout, "prep  fresh\nfit   fresh\n");

    // Remove, then gc frees what only the removed experiment held.
    let r = p.goemo(&["exp", "remove", "g-1"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(!p.file("experiments/g-1").exists());
    let r = p.goemo(&["gc"]);
    // The old baseline's prep and fit, and g-1's fit.
    assert!(r.stdout.contains("removed 3 cache entries"), "{}", r.stdout);
}

#[test]
fn a_sweep_killed_with_sigkill_resumes_without_redoing_finished_members() {
    let p = Project::new(PIPELINE);
    let args = [
        "exp",
        "run",
        "--name",
        "k",
        "--set",
        "fit.vars.lr=1,2,3",
        "--jobs",
        "1",
    ];
    let mut child = p
        .command(&args)
        .env("SLEEP", "1.5")
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Kill once the first member is recorded and the second is training.
    while !(p.file("experiments/k-1/experiment.json").exists()
        && p.ran().contains(&"fit-2-2".to_owned()))
    {
        assert!(
            Instant::now() < deadline,
            "the sweep did not get going: {:?}",
            p.ran()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!p.file("experiments/k-2/experiment.json").exists());
    // The killed fit left its command group: the rerun stops it and cleans the temp entry.
    let ran = p.run_ok(&args);
    assert_eq!(
        ran,
        ["fit-2-2", "fit-3-2"],
        "prep and member 1 are not redone"
    );
    for n in 1..=3 {
        let rec: serde_json::Value =
            serde_json::from_str(&p.read(&format!("experiments/k-{n}/experiment.json"))).unwrap();
        assert_eq!(rec["status"], "done");
    }
    let tmp = std::fs::read_dir(p.file("cache/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp, 0, "no abandoned temp entries left");
}

#[test]
fn two_exp_runs_at_once_share_an_upstream_entry_built_once() {
    let p = Project::new(PIPELINE);
    let spawn = |name: &str, lr: &str| {
        p.command(&[
            "exp",
            "run",
            "--name",
            name,
            "--set",
            "prep.vars.v=9",
            "--set",
            &format!("fit.vars.lr={lr}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn("a", "7"), spawn("b", "8"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for (o, n) in [(&a, "a"), (&b, "b")] {
        assert!(
            o.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(
        p.ran(),
        ["fit-7-2", "fit-8-2", "prep"],
        "prep built once for both"
    );
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    assert!(
        logs.contains("prep: built meanwhile by another run"),
        "{logs}"
    );
}

#[test]
fn bad_sweeps_exit_2_with_the_fix() {
    let p = Project::new(PIPELINE);
    for (args, says) in [
        (vec!["--set", "fit.nosuch=1,2"], "nosuch"),
        (
            vec!["--set", "fit.cmd=echo,[1]"],
            "(fit.cmd=[1]): invalid type: sequence, expected a string",
        ),
        (vec!["--set", "fit.vars.lr="], "no value (an empty grid)"),
        (vec!["--set", "train.lr=1,2"], "no stage named `train`"),
        (
            vec!["--set", "fit.vars.lr=range(3,1)", "--random", "4"],
            "min 3 is greater than max 1",
        ),
        (vec!["--set", "fit.vars.lr=log(1,3)"], "add --random N"),
        (
            vec!["--name", "../up", "--set", "fit.vars.lr=1,2"],
            "experiment name `../up`",
        ),
    ] {
        let mut full = vec!["exp", "run"];
        full.extend(args.iter().copied());
        let r = p.goemo(&full);
        assert_eq!(r.code, 2, "{args:?}: {}", r.all());
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    assert!(
        !p.file("experiments").exists(),
        "nothing ran, nothing recorded"
    );
    let r = p.goemo(&["exp", "diff", "nosuch"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no experiment named `nosuch`"),
        "{}",
        r.stderr
    );
}

#[test]
fn random_search_and_sweep_files_name_members_stably() {
    let p = Project::new(PIPELINE);
    p.write(
        "sweep.yaml",
        "sweep:\n  name: file\n  set:\n    fit.vars.lr: [5, 6]\n    fit.vars.depth: 1\n",
    );
    let r = p.goemo(&["exp", "run", "--sweep", "sweep.yaml", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        r.stdout,
        "file-1  fit.vars.lr=5 fit.vars.depth=1\nfile-2  fit.vars.lr=6 fit.vars.depth=1\n"
    );
    let args = [
        "exp",
        "run",
        "--random",
        "3",
        "--seed",
        "4",
        "--set",
        "fit.vars.lr=log(1e-5,1e-3)",
        "--dry-run",
    ];
    let (a, b) = (p.goemo(&args), p.goemo(&args));
    assert_eq!(a.code, 0, "{}", a.all());
    assert_eq!(a.stdout, b.stdout, "same seed, same members and names");
    assert_eq!(a.stdout.lines().count(), 3);
    assert!(a.stdout.starts_with("sweep-"), "{}", a.stdout);
}

/// Two workers (`--shard 0/2`, `--shard 1/2`, as a Slurm array or an Indexed Job runs them)
/// started at once split a 4-member sweep: every member recorded once, the shared upstream
/// built once; a bad shard is exit 2.
#[test]
fn shards_split_a_sweep_between_workers() {
    let p = Project::new(PIPELINE);
    let spawn = |shard: &str| {
        p.command(&[GRID, &["--shard", shard]].concat())
            .env_remove("SLURM_ARRAY_TASK_ID")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("0/2"), spawn("1/2"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(
        String::from_utf8_lossy(&a.stdout).contains("g-1 ")
            && String::from_utf8_lossy(&a.stdout).contains("g-3 ")
    );
    assert!(
        String::from_utf8_lossy(&b.stdout).contains("g-2 ")
            && String::from_utf8_lossy(&b.stdout).contains("g-4 ")
    );
    assert_eq!(
        p.ran(),
        ["fit-2-4", "fit-2-5", "fit-3-4", "fit-3-5", "prep"]
    );
    let r = p.goemo(&["exp", "show", "--json", "--no-baseline"]);
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 4);
    // Slurm's variables pick the shard when no flag does (ids counted from the array's first).
    let r = p
        .command(&[GRID, &["--dry-run"]].concat())
        .env("SLURM_ARRAY_TASK_ID", "4")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "4")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "g-4  prep.vars.v=1 fit.vars.lr=3 fit.vars.depth=5\n"
    );
    assert!(String::from_utf8_lossy(&r.stderr).contains("shard 3/4: 1 member(s)"));
    let r = p.goemo(&[GRID, &["--shard", "2/2"]].concat());
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("--shard 2/2: I must be below N"),
        "{}",
        r.stderr
    );
}
