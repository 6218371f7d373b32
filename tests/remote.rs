//! `goemo push` / `goemo pull` against a `file://` remote, driving the real binary: a fresh
//! clone pulls what another pushed and runs nothing; a damaged remote object is named and
//! nothing of it committed; two pushers at once leave one good entry; credentials never reach
//! output or files; a bad remote is a clear error that leaves the cache alone.

mod common;

use std::path::Path;
use std::process::Command;

use common::{snapshot, Project, Run};

/// prep (an external input, a 3 MB file, a volatile log) → fit (publishes out/ and volatile/).
/// fit's out/copy has the same bytes as prep's out/data: one object on the remote.
const PIPELINE: &str = r#"stages:
  prep:
    kind: command
    inputs: {src: data.txt}
    params:
      cmd: 'echo prep >> ran.log; cp "$GOEMO_IN_SRC" $GOEMO_OUT/data; head -c 3000000 /dev/zero | tr "\0" a > $GOEMO_OUT/big.bin; echo "log of prep" > $GOEMO_VOLATILE/log.txt'
  fit:
    kind: command
    deps: {prep: prep}
    params:
      cmd: 'echo fit >> ran.log; cat $GOEMO_IN_PREP/data $GOEMO_IN_PREP/data > $GOEMO_OUT/model; cp $GOEMO_IN_PREP/data $GOEMO_OUT/copy; echo "<p>report</p>" > $GOEMO_VOLATILE/report.html'
    publish:
      out/model: model
      volatile/report.html: report.html
"#;

fn project() -> Project {
    let p = Project::new(PIPELINE);
    p.write("data.txt", "some data\n");
    p
}

/// A fresh clone of `a`: pipeline.yaml, data and pipeline.lock, no cache.
fn clone_of(a: &Project) -> Project {
    let b = project();
    std::fs::copy(a.file("pipeline.lock"), b.file("pipeline.lock")).unwrap();
    b
}

fn url(remote: &Path) -> String {
    format!("file://{}", remote.display())
}

/// goemo with a clean remote environment plus `env`.
fn goemo(p: &Project, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = p.command(args);
    for var in [
        "GOEMO_REMOTE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT",
        "AWS_ALLOW_HTTP",
    ] {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    c.output().expect("spawn goemo").into()
}

fn ok(p: &Project, args: &[&str], env: &[(&str, &str)]) -> Run {
    let r = goemo(p, args, env);
    assert_eq!(r.code, 0, "goemo {args:?} failed:\n{}", r.all());
    r
}

fn entry_keys(p: &Project) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p.file("cache/entries"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The key pipeline.lock records for `stage` (its `- name:` line, then its `key:` line).
fn locked_key(p: &Project, stage: &str) -> String {
    let text = p.read("pipeline.lock");
    let mut lines = text.lines().map(str::trim);
    lines
        .find(|l| *l == format!("- name: {stage}"))
        .expect("stage in the lock");
    lines
        .find_map(|l| l.strip_prefix("key: "))
        .expect("its key")
        .to_owned()
}

/// N in the closing `pushed N of M entries` / `pulled N of M entries` line.
fn moved_count(r: &Run, verb: &str) -> usize {
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{verb} ")) && l.contains(" entries "))
        .unwrap_or_else(|| panic!("no summary in {}", r.stdout));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

#[test]
fn a_fresh_clone_pulls_what_another_pushed_and_runs_nothing() {
    let r = tempfile::tempdir().unwrap();
    let a = project();
    assert_eq!(a.run_ok(&["run"]), ["fit", "prep"]);
    let push = ok(&a, &["push"], &[("GOEMO_REMOTE", &url(r.path()))]);
    assert!(
        push.stdout
            .contains(&format!("pushed 2 of 2 entries to {}: ", url(r.path()))),
        "{}",
        push.all()
    );
    assert!(
        push.stdout.contains(" MB/s); 0 up to date"),
        "{}",
        push.stdout
    );
    // data, big.bin, log.txt, model, report.html: fit's copy is prep's data, stored once.
    assert_eq!(count_files(&r.path().join("objects")), 5);
    assert_eq!(count_files(&r.path().join("entries")), 2);
    assert!(r
        .path()
        .join("objects")
        .join(blake3_hex(b"some data\n"))
        .is_file());

    let b = clone_of(&a);
    // The remote from goemo.yaml this time; the flag and the variable are tested elsewhere.
    b.write("goemo.yaml", &format!("remote: {}\n", url(r.path())));
    let pull = ok(&b, &["pull"], &[]);
    assert!(
        pull.stdout.contains("pulled 2 of 2 entries from "),
        "{}",
        pull.all()
    );
    assert!(
        pull.stdout.contains("3000000") || pull.stdout.contains("2.9 MiB"),
        "{}",
        pull.stdout
    );
    assert_eq!(entry_keys(&b), entry_keys(&a));
    assert_eq!(b.run_ok(&["run", "--locked"]), Vec::<String>::new());
    assert_eq!(b.read("outputs/model"), "some data\nsome data\n");
    assert_eq!(b.read("outputs/report.html"), "<p>report</p>\n");
    let again = ok(&b, &["pull"], &[]);
    assert!(
        again.stdout.contains("pulled 0 of 2 entries"),
        "{}",
        again.stdout
    );
    assert!(again.stdout.contains("2 up to date"), "{}", again.stdout);

    // Named stages: only fit's entry; a run then builds prep alone (fit's key comes back).
    let c = clone_of(&a);
    let one = ok(&c, &["pull", "fit", "--remote", &url(r.path())], &[]);
    assert!(
        one.stdout.contains("pulled 1 of 1 entries"),
        "{}",
        one.stdout
    );
    assert_eq!(entry_keys(&c), [locked_key(&a, "fit")]);
    assert_eq!(c.run_ok(&["run", "--locked"]), ["prep"]);
    let bad = goemo(&c, &["pull", "nosuch", "--remote", &url(r.path())], &[]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert!(
        bad.stderr
            .contains("stage `nosuch` is not in pipeline.lock"),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr.contains("it records: prep, fit"),
        "{}",
        bad.stderr
    );
}

#[test]
fn a_flipped_byte_on_the_remote_is_named_on_pull_and_nothing_of_it_is_committed() {
    let r = tempfile::tempdir().unwrap();
    let a = project();
    a.run_ok(&["run"]);
    ok(&a, &["push", "--remote", &url(r.path())], &[]);
    let model = r
        .path()
        .join("objects")
        .join(blake3_hex(b"some data\nsome data\n"));
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&model, bytes).unwrap();

    let b = clone_of(&a);
    let pull = goemo(&b, &["pull", "--remote", &url(r.path())], &[]);
    assert_eq!(pull.code, 1, "{}", pull.all());
    let fit = locked_key(&a, "fit");
    let object = format!("objects/{}", blake3_hex(b"some data\nsome data\n"));
    assert!(
        pull.stderr.contains(&format!("stage fit, entry {fit}: object {object} (out/model) is damaged: its content hashes to ")),
        "{}",
        pull.stderr
    );
    assert!(
        pull.stderr
            .contains("nothing of this entry was committed locally"),
        "{}",
        pull.stderr
    );
    // prep's entry came; fit's did not, and nothing of it is left in tmp/.
    assert_eq!(entry_keys(&b), [locked_key(&a, "prep")]);
    assert_eq!(count_files(&b.file("cache/tmp")), 0);
    // The run rebuilds fit, and the result is the locked one.
    assert_eq!(b.run_ok(&["run", "--locked"]), ["fit"]);
}

#[test]
fn two_pushers_of_the_same_entries_at_once_leave_one_good_entry_each() {
    let r = tempfile::tempdir().unwrap();
    let (a1, a2) = (project(), project());
    a1.run_ok(&["run"]);
    a2.run_ok(&["run"]);
    assert_eq!(a1.read("pipeline.lock"), a2.read("pipeline.lock"));
    let spawn = |p: &Project| {
        let mut c: Command = p.command(&["push", "--remote", &url(r.path())]);
        c.env_remove("GOEMO_REMOTE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let (c1, c2) = (spawn(&a1), spawn(&a2));
    let runs: Vec<Run> = [c1, c2]
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().into())
        .collect();
    let mut pushed = 0;
    for run in &runs {
        assert_eq!(run.code, 0, "{}", run.all());
        pushed += moved_count(run, "pushed");
    }
    assert_eq!(
        pushed, 2,
        "each entry pushed by exactly one: {}\n{}",
        runs[0].stdout, runs[1].stdout
    );
    assert_eq!(count_files(&r.path().join("entries")), 2);
    let b = clone_of(&a1);
    ok(&b, &["pull", "--remote", &url(r.path())], &[]);
    assert_eq!(b.run_ok(&["run", "--locked"]), Vec::<String>::new());
}

const SENTINEL: &str = "SENTINEL-5ecr3t-9f8e7d6c";

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    snapshot(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .map(|(name, _)| name)
        .collect()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn a_sentinel_secret_never_reaches_output_or_any_written_file() {
    let r = tempfile::tempdir().unwrap();
    let remote = url(r.path());
    let creds = [
        ("AWS_SECRET_ACCESS_KEY", SENTINEL),
        ("AWS_ACCESS_KEY_ID", "AKIASENTINELKEYID"),
        ("AWS_REGION", "us-east-1"),
    ];
    let with = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        creds
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let run = |p: &Project, args: &[&str], env: Vec<(String, String)>| -> Run {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        goemo(p, args, &env)
    };
    let a = project();
    let mut outputs = Vec::new();
    outputs.push(run(&a, &["run"], with(&[])));
    outputs.push(run(&a, &["push"], with(&[("GOEMO_REMOTE", &remote)])));
    let b = clone_of(&a);
    outputs.push(run(&b, &["pull"], with(&[("GOEMO_REMOTE", &remote)])));
    outputs.push(run(&b, &["run", "--locked"], with(&[])));
    assert!(
        outputs.iter().all(|o| o.code == 0),
        "{}",
        outputs.iter().map(Run::all).collect::<String>()
    );
    // An S3 remote that cannot be reached, and URLs that carry the secret themselves.
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let s3 = with(&[
        ("GOEMO_REMOTE", "s3://goemo-cache/team"),
        ("AWS_ENDPOINT_URL", &endpoint),
    ]);
    let unreachable = run(&a, &["push", "-v"], s3);
    assert_ne!(unreachable.code, 0, "{}", unreachable.all());
    assert!(
        unreachable
            .stderr
            .contains("remote s3://goemo-cache/team: reaching entries/goemo-probe.json: "),
        "{}",
        unreachable.stderr
    );
    outputs.push(unreachable);
    let in_url = format!("s3://AKIASENTINELKEYID:{SENTINEL}@goemo-cache/x");
    outputs.push(run(&a, &["pull", "--remote", &in_url], with(&[])));
    outputs.push(run(
        &a,
        &[
            "pull",
            "--remote",
            &format!("s3://goemo-cache/x?secret={SENTINEL}"),
        ],
        with(&[]),
    ));
    assert_eq!(outputs[5].code, 2, "{}", outputs[5].all());
    assert!(
        outputs[5]
            .stderr
            .contains("s3://***@goemo-cache/x` holds credentials"),
        "{}",
        outputs[5].stderr
    );

    for o in &outputs {
        assert!(
            !o.all().contains(SENTINEL),
            "the secret was printed:\n{}",
            o.all()
        );
    }
    for dir in [a.path(), b.path(), r.path()] {
        assert_eq!(
            files_holding(dir, SENTINEL),
            Vec::<String>::new(),
            "in {}",
            dir.display()
        );
    }
    // The check itself works: the secret, had it been written, would be found.
    a.write("probe.txt", SENTINEL);
    assert_eq!(files_holding(a.path(), SENTINEL), ["probe.txt"]);
}

/// Arguments after the verb, environment, exit code, and what stderr must say.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, i32, String);

#[test]
fn a_bad_remote_is_a_clear_error_and_leaves_the_local_cache_alone() {
    let a = project();
    a.run_ok(&["run"]);
    let before = snapshot(&a.file("cache"));
    let missing = tempfile::tempdir().unwrap().path().join("gone");
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let missing_url = url(&missing);
    let cases: Vec<Case> = vec![
        (vec!["--remote", "ftp://host/x"], vec![], 2, "--remote: the remote `ftp://host/x` has the scheme `ftp`, which goemo does not support yet\n  hint: use s3://BUCKET/PREFIX".into()),
        (vec![], vec![("GOEMO_REMOTE", &missing_url)], 2, format!("is not an existing folder\n  hint: create it (mkdir -p {})", missing.display())),
        (vec![], vec![], 2, "no remote is configured\n  hint: set GOEMO_REMOTE".into()),
        (vec!["--remote", "s3://goemo-cache/p"], vec![("AWS_ENDPOINT_URL", &endpoint), ("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")], 1, "error: remote s3://goemo-cache/p: reaching entries/goemo-probe.json: ".into()),
    ];
    for verb in ["push", "pull"] {
        for (args, env, code, says) in &cases {
            let r = goemo(&a, &[&[verb][..], args].concat(), env);
            assert_eq!(r.code, *code, "{verb} {args:?}: {}", r.all());
            assert!(
                r.stderr.contains(says.as_str()),
                "{verb} {args:?}: expected {says:?} in\n{}",
                r.stderr
            );
            assert_eq!(
                snapshot(&a.file("cache")),
                before,
                "{verb} {args:?} touched the cache"
            );
        }
    }
    a.write("goemo.yaml", "remote: file:///tmp\ntoken: x\n");
    let r = goemo(&a, &["pull"], &[]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("goemo.yaml: unknown field `token`"),
        "{}",
        r.stderr
    );
    assert_eq!(snapshot(&a.file("cache")), before);
    assert!(!missing.exists());
}

/// One stage with a 48 MB output: a push of it takes long enough to be killed midway.
const BIG: &str = r#"stages:
  big:
    kind: command
    params:
      cmd: 'head -c 48000000 /dev/urandom > $GOEMO_OUT/weights.bin; echo small > $GOEMO_OUT/config.json'
"#;

#[test]
fn a_push_killed_at_any_moment_leaves_no_entry_a_reader_uses() {
    let r = tempfile::tempdir().unwrap();
    let a = Project::new(BIG);
    a.run_ok(&["run"]);
    let key = locked_key(&a, "big");
    let manifest = r.path().join(format!("entries/{key}.json"));
    for delay_ms in [0u64, 10, 40, 120] {
        let mut child = a
            .command(&["push", "--remote", &url(r.path())])
            .env_remove("GOEMO_REMOTE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Whatever was cut short, a reader either finds no entry or a complete, good one.
        let b = Project::new(BIG);
        std::fs::copy(a.file("pipeline.lock"), b.file("pipeline.lock")).unwrap();
        let pull = goemo(&b, &["pull", "--remote", &url(r.path())], &[]);
        if manifest.exists() {
            assert_eq!(pull.code, 0, "killed after {delay_ms} ms:\n{}", pull.all());
            assert_eq!(b.run_ok(&["run", "--locked"]), Vec::<String>::new());
        } else {
            assert_eq!(pull.code, 1, "killed after {delay_ms} ms:\n{}", pull.all());
            assert!(pull.stdout.contains("not on the remote"), "{}", pull.stdout);
            assert_eq!(entry_keys(&b), Vec::<String>::new());
        }
    }
    // A push run to its end completes what the killed ones began.
    ok(&a, &["push", "--remote", &url(r.path())], &[]);
    assert!(manifest.exists());
    let b = Project::new(BIG);
    std::fs::copy(a.file("pipeline.lock"), b.file("pipeline.lock")).unwrap();
    ok(&b, &["pull", "--remote", &url(r.path())], &[]);
    assert_eq!(b.run_ok(&["run", "--locked"]), Vec::<String>::new());
    assert_eq!(
        std::fs::read(b.file("cache/entries").join(&key).join("out/weights.bin")).unwrap(),
        std::fs::read(a.file("cache/entries").join(&key).join("out/weights.bin")).unwrap()
    );
}

/// `goemo run --remote read-write` pushes what it built; a fresh clone's plain `goemo run
/// --locked` (a remote configured: read by default) pulls what it lacks, layer by layer, and
/// runs nothing; `--remote off` ignores the remote.
#[test]
fn run_reads_and_writes_the_shared_cache() {
    let remote = tempfile::tempdir().unwrap();
    let env = [("GOEMO_REMOTE", url(remote.path()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = project();
    ok(&a, &["run", "--remote", "read-write"], &env);
    assert_eq!(a.ran(), ["fit", "prep"]);
    assert!(remote
        .path()
        .join("entries")
        .join(format!("{}.json", locked_key(&a, "fit")))
        .is_file());

    let b = clone_of(&a);
    let r = ok(&b, &["run", "--locked"], &env);
    assert!(
        b.ran().is_empty(),
        "nothing runs: {:?}\n{}",
        b.ran(),
        r.all()
    );
    assert!(
        r.stderr.contains("fit: pulled from the shared cache"),
        "{}",
        r.stderr
    );
    assert_eq!(b.read("outputs/model"), a.read("outputs/model"));

    let c = clone_of(&a);
    ok(&c, &["run", "--remote", "off"], &env);
    assert_eq!(c.ran(), ["fit", "prep"], "--remote off builds everything");
    let r = goemo(&c, &["run", "--remote", "read"], &[]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("--remote"), "{}", r.stderr);
}

/// A sweep run with `--remote read-write` pushes its members' entries and records; a third
/// folder's `goemo exp pull` then lists every member in `exp show`, and `run --remote read`
/// with a member's params (applied) pulls instead of building.
#[test]
fn experiment_records_travel_through_the_remote() {
    let remote = tempfile::tempdir().unwrap();
    let env = [("GOEMO_REMOTE", url(remote.path()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = project();
    ok(&a, &["run"], &[]);
    let sweep = [
        "exp",
        "run",
        "--name",
        "w",
        "--set",
        "fit.vars.x=1,2",
        "--remote",
        "read-write",
    ];
    let r = ok(&a, &sweep, &env);
    assert!(
        r.stderr.contains("pushed 2 experiment record(s)"),
        "{}",
        r.stderr
    );

    let c = clone_of(&a);
    let r = ok(&c, &["exp", "pull"], &env);
    assert!(
        r.stdout.contains("pulled 2 experiment record(s)"),
        "{}",
        r.stdout
    );
    let r = ok(&c, &["exp", "show", "--json", "--no-baseline"], &[]);
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["w-1", "w-2"]);
    assert_eq!(rows[1]["params"]["fit.vars.x"], "2");
    assert_eq!(
        c.read("experiments/w-2/pipeline.lock"),
        a.read("experiments/w-2/pipeline.lock")
    );
    // The member's entries are on the remote: running its params pulls them, builds nothing.
    let _ = std::fs::remove_file(c.file("ran.log"));
    ok(&c, &["run", "--set", "fit.vars.x=2"], &env);
    assert!(c.ran().is_empty(), "{:?}", c.ran());
}

/// prep (slow, logs to a file outside every project) → fit (a member's metrics), for workers
/// that share nothing but the remote.
fn worker_pipeline(log: &Path) -> String {
    format!(
        r#"stages:
  prep:
    kind: command
    params:
      cmd: 'echo prep >> {log}; sleep 2; echo data > $GOEMO_OUT/data'
  fit:
    kind: command
    deps: {{prep: prep}}
    params:
      cmd: 'echo fit-$GOEMO_VAR_LR >> {log}; echo "{{\"dev_score\": $GOEMO_VAR_LR}}" > $GOEMO_OUT/metrics.json'
      vars: {{lr: 0}}
"#,
        log = log.display()
    )
}

fn worker(pipeline: &str) -> Project {
    let p = Project::new(pipeline);
    p.write(
        "sweeps/s.yaml",
        "sweep:\n  name: s\n  set:\n    prep.vars.v: 1\n    fit.vars.lr: [1, 2, 3, 4]\n",
    );
    p
}

fn lines_of(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// Four workers, each in its own folder with its own empty cache, sharing only the remote,
/// run a 4-member sweep as shards 0/4..3/4 at once: the upstream stage is built by one of them
/// (its lease makes the others wait, then pull it), every member's stage runs once, and a
/// fifth folder's `exp pull` + `exp show` lists all four members with metrics.
fn fleet_sweep(env: &[(&str, &str)]) {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("ran.log");
    let pipeline = worker_pipeline(&log);
    let workers: Vec<Project> = (0..4).map(|_| worker(&pipeline)).collect();
    let children: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let shard = format!("{i}/4");
            let mut c = w.command(&[
                "exp",
                "run",
                "--sweep",
                "sweeps/s.yaml",
                "--shard",
                &shard,
                "--remote",
                "read-write",
            ]);
            c.envs(env.iter().copied())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn a worker")
        })
        .collect();
    let runs: Vec<Run> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().into())
        .collect();
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r.code, 0, "worker {i}:\n{}", r.all());
    }
    assert_eq!(
        lines_of(&log),
        ["fit-1", "fit-2", "fit-3", "fit-4", "prep"],
        "prep once across the fleet, each member's fit once"
    );
    let pulled = runs
        .iter()
        .filter(|r| r.stderr.contains("prep: built by another worker; pulled"))
        .count();
    assert_eq!(pulled, 3, "three workers waited for prep and pulled it");
    assert!(
        runs.iter().any(|r| r
            .stderr
            .contains("is building it (its lease is on the shared cache)")),
        "a waiter says whom it waits for"
    );

    let viewer = worker(&pipeline);
    ok(&viewer, &["exp", "pull"], env);
    let r = ok(&viewer, &["exp", "show", "--json", "--no-baseline"], &[]);
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let seen: Vec<(String, String, f64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
                r["metrics"]["fit.dev_score"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("s-1".into(), "done".into(), 1.0),
            ("s-2".into(), "done".into(), 2.0),
            ("s-3".into(), "done".into(), 3.0),
            ("s-4".into(), "done".into(), 4.0),
        ],
        "{}",
        r.stdout
    );
}

#[test]
fn four_workers_sharing_only_a_folder_remote_build_the_upstream_once() {
    let remote = tempfile::tempdir().unwrap();
    let env = [("GOEMO_REMOTE", url(remote.path()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fleet_sweep(&env);
    assert_eq!(
        count_files(&remote.path().join("leases")),
        0,
        "no lease left"
    );
}

/// Against a real store's protocol: `scripts/test_remote_stores.sh` starts moto (S3) and
/// Azurite (Azure Blob Storage) on loopback and runs this once per store with
/// `GOEMO_TEST_REMOTE` set to a bucket URL and the store's variables in the environment
/// (`.ci/run` runs that script). A fresh clone pulls what another pushed and runs nothing; then
/// the four-worker fleet, under a prefix of its own.
#[test]
fn a_real_store_shares_entries_and_a_fleet() {
    let Ok(base) = std::env::var("GOEMO_TEST_REMOTE") else {
        eprintln!("skipped: GOEMO_TEST_REMOTE is not set (scripts/test_remote_stores.sh sets it)");
        return;
    };
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // The store's own variables (AWS_*, AZURE_*, AZURITE_*) come from the environment, as for
    // a user.
    let pass = |url: &str| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                ["AWS_", "AZURE_", "AZURITE_"]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .collect();
        v.push(("GOEMO_REMOTE".into(), url.to_owned()));
        v
    };
    let env = pass(&format!("{base}/clone-{unique}"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = project();
    ok(&a, &["run", "--remote", "read-write"], &env);
    let b = clone_of(&a);
    let r = ok(&b, &["run", "--locked"], &env);
    assert!(b.ran().is_empty(), "{:?}\n{}", b.ran(), r.all());
    assert_eq!(b.read("outputs/model"), a.read("outputs/model"));
    assert_eq!(b.read("outputs/report.html"), a.read("outputs/report.html"));

    let env = pass(&format!("{base}/fleet-{unique}"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    fleet_sweep(&env);
}

/// A worker SIGKILLed while it holds a lease stops renewing it; another worker waits one
/// time-to-live, says whose lease it takes over, builds the entry and shares it.
#[test]
fn a_dead_workers_lease_is_taken_over() {
    let remote = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("first-started");
    // The first build blocks (until killed); any later one is quick. Same command, same key.
    let pipeline = format!(
        "stages:\n  prep:\n    kind: command\n    params:\n      cmd: 'if [ -e {m} ]; then echo prep >> ran.log; else touch {m}; sleep 60; fi; echo x > $GOEMO_OUT/x'\n",
        m = mark.display()
    );
    let env = [
        ("GOEMO_REMOTE", url(remote.path())),
        ("GOEMO_LEASE_TTL_SECS", "1".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Project::new(&pipeline);
    let mut first = a.command(&["run", "--remote", "read-write"]);
    first
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = first.spawn().unwrap();
    let leases = remote.path().join("leases");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(mark.exists() && count_files(&leases) == 1) {
        assert!(std::time::Instant::now() < deadline, "no lease appeared");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // Its command lives on in its own process group; stop it too.
    let _ = Command::new("pkill")
        .args(["-f", &mark.display().to_string()])
        .status();

    let b = Project::new(&pipeline);
    let started = std::time::Instant::now();
    let r = ok(&b, &["run", "--remote", "read-write"], &env);
    assert!(r.stderr.contains("was not renewed in time"), "{}", r.stderr);
    assert_eq!(b.ran(), ["prep"]);
    assert!(
        started.elapsed().as_secs_f64() < 15.0,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(count_files(&leases), 0, "the lease is let go");
    assert_eq!(count_files(&remote.path().join("entries")), 1);
}

/// Under --locked, an entry pulled from the remote whose outputs differ from pipeline.lock's
/// is drift, and the message says which machine made it and which this one is.
#[test]
fn a_locked_run_names_the_machine_a_pulled_entry_came_from() {
    let remote = tempfile::tempdir().unwrap();
    let env = [("GOEMO_REMOTE", url(remote.path()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = project();
    ok(&a, &["run", "--remote", "read-write"], &env);
    // The remote copy of fit was made on "another machine": same key, other outputs.
    let key = locked_key(&a, "fit");
    let manifest = remote.path().join(format!("entries/{key}.json"));
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["provenance"] = serde_json::json!({
        "goemo_version": "0.0.9", "arch": "aarch64", "os": "macos",
        "cpu_features": [], "threads": 10
    });
    let other = serde_json::json!({"blake3": blake3_hex(b"other\n"), "size": 6});
    std::fs::write(
        remote
            .path()
            .join(format!("objects/{}", blake3_hex(b"other\n"))),
        "other\n",
    )
    .unwrap();
    m["outputs"]["copy"] = other;
    let outputs: std::collections::BTreeMap<String, goemo_engine::hashing::FileDigest> =
        serde_json::from_value(m["outputs"].clone()).unwrap();
    m["outputs_hash"] = goemo_engine::hashing::tree_hash(&outputs).into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let b = clone_of(&a);
    let r = goemo(&b, &["run", "--locked"], &env);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(b.ran().is_empty(), "{:?}", b.ran());
    assert!(
        r.stderr
            .contains("fit: cached outputs differ from pipeline.lock")
            && r.stderr
                .contains("made on: aarch64 macos, 10 threads, goemo 0.0.9")
            && r.stderr.contains("this machine: x86_64 linux"),
        "{}",
        r.stderr
    );
}

/// `run --only fit` in a fresh clone: fit's upstream is not selected and missing here; it is
/// pulled (not refused as "no cached result"), and so is fit itself.
#[test]
fn an_unselected_upstream_missing_here_is_pulled() {
    let remote = tempfile::tempdir().unwrap();
    let env = [("GOEMO_REMOTE", url(remote.path()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = project();
    ok(&a, &["run", "--remote", "read-write"], &env);
    let b = clone_of(&a);
    let r = goemo(&b, &["run", "--only", "fit"], &[]);
    assert_eq!(r.code, 2, "without a remote it is refused:\n{}", r.all());
    let r = ok(&b, &["run", "--only", "fit"], &env);
    assert!(b.ran().is_empty(), "{:?}\n{}", b.ran(), r.all());
    assert!(
        r.stdout.contains("prep") && r.stdout.contains("pulled from the shared cache"),
        "{}",
        r.stdout
    );
    assert_eq!(b.read("outputs/model"), a.read("outputs/model"));
}

/// An HTTP server holding a copy of a remote (here python's http.server over a folder remote)
/// is a read-only remote: a fresh clone pulls everything from it, verified; pushing to it, or
/// `run --remote read-write`, is refused with the reason.
#[test]
fn an_http_mirror_is_a_read_only_remote() {
    let remote = tempfile::tempdir().unwrap();
    let a = project();
    let _ = a.run_ok(&["run"]);
    ok(&a, &["push"], &[("GOEMO_REMOTE", &url(remote.path()))]);
    let port = closed_port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(remote.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let mirror = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "http.server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let env = [("GOEMO_REMOTE", mirror.as_str())];
    let b = clone_of(&a);
    let r = goemo(&b, &["run", "--locked"], &env);
    let push = goemo(&b, &["push"], &env);
    let rw = goemo(&b, &["run", "--remote", "read-write"], &env);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(b.ran().is_empty(), "{:?}\n{}", b.ran(), r.all());
    assert_eq!(b.read("outputs/model"), a.read("outputs/model"));
    assert_ne!(push.code, 0, "{}", push.all());
    assert!(
        push.stderr
            .contains(&format!("remote {mirror} is read-only")),
        "{}",
        push.stderr
    );
    assert_eq!(rw.code, 2, "{}", rw.all());
    assert!(rw.stderr.contains("is read-only"), "{}", rw.stderr);
}
