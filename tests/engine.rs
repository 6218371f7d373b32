//! The engine end to end: the real binary on pipelines of cheap `command` stages.

mod common;

use common::{snapshot, Project};

/// a → b, a → c → d, (b, d) → e. `c` ignores its `salt`, which makes early cutoff visible.
const PIPELINE: &str = r#"
stages:
  a:
    kind: command
    inputs: {src: input.txt}
    params:
      cmd: echo a >> ran.log; tr a-z A-Z < "$GOEMO_IN_SRC" > "$GOEMO_OUT/upper.txt"
  b:
    kind: command
    deps: {a: a}
    params:
      cmd: echo b >> ran.log; cat "$GOEMO_IN_A/upper.txt" > "$GOEMO_OUT/b.txt"; echo "n=$GOEMO_VAR_N" >> "$GOEMO_OUT/b.txt"
      vars: {n: 1}
  c:
    kind: command
    deps: {a: a}
    params:
      cmd: echo c >> ran.log; wc -c < "$GOEMO_IN_A/upper.txt" | tr -d ' ' > "$GOEMO_OUT/count.txt"
      vars: {salt: 1}
  d:
    kind: command
    deps: {c: c}
    params:
      cmd: echo d >> ran.log; cat "$GOEMO_IN_C/count.txt" > "$GOEMO_OUT/d.txt"
  e:
    kind: command
    deps: {b: b, d: d}
    params:
      cmd: echo e >> ran.log; cat "$GOEMO_IN_B/b.txt" "$GOEMO_IN_D/d.txt" > "$GOEMO_OUT/e.txt"
    publish: {out/e.txt: e.txt}
"#;

fn project() -> Project {
    let p = Project::new(PIPELINE);
    p.write("input.txt", "hello world\n");
    p
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn first_run_runs_all_and_second_run_none() {
    let p = project();
    assert_eq!(p.run_ok(&["run"]), s(&["a", "b", "c", "d", "e"]));
    assert_eq!(p.read("outputs/e.txt"), "HELLO WORLD\nn=1\n12\n");
    let lock1 = p.read("pipeline.lock");
    assert_eq!(p.run_ok(&["run"]), Vec::<String>::new());
    assert_eq!(
        p.read("pipeline.lock"),
        lock1,
        "a no-op run leaves pipeline.lock alone"
    );
    let st = p.goemo(&["status"]);
    assert_eq!(st.code, 0);
    for stage in ["a", "b", "c", "d", "e"] {
        assert!(
            st.stdout.contains(&format!("{stage}  fresh")),
            "{}",
            st.stdout
        );
    }
}

#[test]
fn param_change_reruns_that_stage_and_changed_downstream_only() {
    let p = project();
    p.run_ok(&["run"]);
    p.write(
        "pipeline.yaml",
        &PIPELINE.replace("vars: {n: 1}", "vars: {n: 2}"),
    );
    let st = p.goemo(&["status"]);
    assert!(
        st.stdout.contains("b  stale: param vars.n changed 1 → 2"),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout
            .contains("e  stale: input b will change (b is stale)"),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout.contains("a  fresh") && st.stdout.contains("d  fresh"),
        "{}",
        st.stdout
    );
    assert_eq!(p.run_ok(&["run"]), s(&["b", "e"]));
    assert_eq!(p.read("outputs/e.txt"), "HELLO WORLD\nn=2\n12\n");
}

#[test]
fn input_file_change_is_explained_and_propagates() {
    let p = project();
    p.run_ok(&["run"]);
    p.write("input.txt", "bye\n");
    let st = p.goemo(&["status"]);
    assert!(
        st.stdout
            .contains("a  stale: input src changed (the file modified)"),
        "{}",
        st.stdout
    );
    assert_eq!(p.run_ok(&["run"]), s(&["a", "b", "c", "d", "e"]));
    assert_eq!(p.read("outputs/e.txt"), "BYE\nn=1\n4\n");
}

#[test]
fn identical_outputs_leave_downstream_cached() {
    let p = project();
    p.run_ok(&["run"]);
    // c's salt changes its key but not its output: d and e stay cached.
    assert_eq!(p.run_ok(&["run", "--set", "c.vars.salt=2"]), s(&["c"]));
    let st = p.goemo(&["status", "--set", "c.vars.salt=2"]);
    assert!(st.stdout.contains("d  fresh"), "{}", st.stdout);
}

#[test]
fn set_overrides_change_the_key_and_returning_reuses_the_old_entry() {
    let p = project();
    p.run_ok(&["run"]);
    assert_eq!(p.run_ok(&["run", "--set", "b.vars.n=7"]), s(&["b", "e"]));
    assert_eq!(p.read("outputs/e.txt"), "HELLO WORLD\nn=7\n12\n");
    // Back to the value in pipeline.yaml: restored from the run-cache, nothing executes.
    let _ = std::fs::remove_file(p.file("ran.log"));
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(p.ran().is_empty(), "ran: {:?}", p.ran());
    assert!(r.stdout.contains("restored"), "{}", r.stdout);
    assert_eq!(p.read("outputs/e.txt"), "HELLO WORLD\nn=1\n12\n");
    let bad = p.goemo(&["run", "--set", "b.vars"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    let bad = p.goemo(&["run", "--set", "zz.n=1"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("no stage named `zz`")
            && bad.stderr.contains("stages are: a, b, c, d, e"),
        "{}",
        bad.stderr
    );
}

#[test]
fn from_until_only_force() {
    let p = project();
    assert_eq!(p.run_ok(&["run", "--until", "c"]), s(&["a", "c"]));
    assert!(!p.file("outputs/e.txt").exists());
    assert_eq!(p.run_ok(&["run"]), s(&["b", "d", "e"]));
    assert_eq!(p.run_ok(&["run", "--from", "c"]), s(&["c", "d", "e"]));
    assert_eq!(
        p.run_ok(&["run", "--only", "d"]),
        Vec::<String>::new(),
        "--only without --force uses the cache"
    );
    assert_eq!(p.run_ok(&["run", "--only", "d", "--force"]), s(&["d"]));
    assert_eq!(p.run_ok(&["run", "--force"]), s(&["a", "b", "c", "d", "e"]));
    let r = p.goemo(&["run", "--from", "nope"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("--from nope: no stage named `nope`"),
        "{}",
        r.stderr
    );
}

#[test]
fn only_needs_cached_upstream() {
    let p = project();
    let r = p.goemo(&["run", "--only", "e"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("upstream") && r.stderr.contains("no cached result"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("goemo run --until"), "{}", r.stderr);
    assert!(p.ran().is_empty());
}

#[test]
fn dry_run_changes_nothing() {
    let p = project();
    p.run_ok(&["run", "--until", "b"]);
    p.write("input.txt", "changed\n");
    let before = snapshot(p.path());
    let r = p.goemo(&["run", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let line = |stage: &str| {
        r.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(format!("{stage}:").as_str()))
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        line("a").starts_with("would run")
            && line("a").ends_with("a: input src changed (the file modified)"),
        "{}",
        r.stdout
    );
    assert!(
        line("d").starts_with("would run")
            && line("d").ends_with("d: input c will change (c is stale)"),
        "{}",
        r.stdout
    );
    assert_eq!(snapshot(p.path()), before, "--dry-run wrote to disk");
}

#[test]
fn locked_fails_on_drift_and_passes_when_clean() {
    let p = project();
    p.run_ok(&["run"]);
    let ok = p.goemo(&["run", "--locked"]);
    assert_eq!(ok.code, 0, "{}", ok.all());
    // A fresh clone: the lock is committed, the cache is not. --locked reproduces and checks.
    std::fs::remove_dir_all(p.file("cache")).unwrap();
    std::fs::remove_dir_all(p.file("outputs")).unwrap();
    let ok = p.goemo(&["run", "--locked"]);
    assert_eq!(ok.code, 0, "{}", ok.all());
    assert!(
        ok.stdout.contains("pipeline.lock reproduced"),
        "{}",
        ok.stdout
    );
    let lock = p.read("pipeline.lock");
    p.write(
        "pipeline.yaml",
        &PIPELINE.replace("vars: {n: 1}", "vars: {n: 3}"),
    );
    let drift = p.goemo(&["run", "--locked"]);
    assert_eq!(drift.code, 3, "{}", drift.all());
    assert!(
        drift
            .stderr
            .contains("b: would have to run: param vars.n changed 1 → 3"),
        "{}",
        drift.stderr
    );
    assert_eq!(
        p.read("pipeline.lock"),
        lock,
        "--locked never rewrites the lock"
    );
    // Outputs that differ for the same key (a nondeterministic stage) are drift too.
    p.write("pipeline.yaml", PIPELINE);
    std::fs::remove_dir_all(p.file("cache")).unwrap();
    p.write(
        "pipeline.lock",
        &lock.replacen("outputs_hash: ", "outputs_hash: 00", 1),
    );
    let drift = p.goemo(&["run", "--locked"]);
    assert_eq!(drift.code, 3, "{}", drift.all());
    assert!(
        drift
            .stderr
            .contains("a: outputs differ from pipeline.lock"),
        "{}",
        drift.stderr
    );
    assert!(
        drift.stderr.contains(&format!(
            "; this machine: {} {}",
            std::env::consts::ARCH,
            std::env::consts::OS
        )),
        "the drift line says where the outputs were made:\n{}",
        drift.stderr
    );
}

#[test]
fn locked_checks_the_outputs_of_stages_taken_from_the_cache() {
    let p = project();
    p.run_ok(&["run"]);
    let lock = p.read("pipeline.lock");
    // The same keys with other outputs for `a` (its upper.txt): as when pipeline.lock was
    // written on a machine that computes differently and this cache was made here.
    let tampered = lock
        .replacen("outputs_hash: ", "outputs_hash: 00", 1)
        .replacen("blake3: ", "blake3: 00", 1);
    p.write("pipeline.lock", &tampered);
    let _ = std::fs::remove_file(p.file("ran.log"));
    let r = p.goemo(&["run", "--locked"]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(
        r.stderr.contains(
            "a: cached outputs differ from pipeline.lock (upper.txt modified); the entry was made on: "
        ),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("; this machine: "), "{}", r.stderr);
    assert!(!r.stdout.contains("reproduced"), "{}", r.stdout);
    assert!(p.ran().is_empty(), "nothing ran: {:?}", p.ran());
    assert_eq!(
        p.read("pipeline.lock"),
        tampered,
        "--locked never rewrites the lock"
    );
    // The untouched lock passes with the same cache.
    p.write("pipeline.lock", &lock);
    let ok = p.goemo(&["run", "--locked"]);
    assert_eq!(ok.code, 0, "{}", ok.all());
}

#[test]
fn independent_stages_run_concurrently() {
    // b waits for a file that only c writes: run one at a time (b first), b would time out.
    let p = Project::new(
        r#"
stages:
  b:
    kind: command
    params:
      cmd: for i in $(seq 200); do [ -f c.done ] && break; sleep 0.05; done; test -f c.done && echo ok > "$GOEMO_OUT/b"
  c:
    kind: command
    params:
      cmd: sleep 0.2; touch c.done; echo ok > "$GOEMO_OUT/c"
"#,
    );
    let r = p.goemo(&["run", "--jobs", "2"]);
    assert_eq!(r.code, 0, "{}", r.all());
}

#[test]
fn a_failed_stage_stops_downstream_and_lets_others_finish() {
    let p = Project::new(
        r#"
stages:
  bad:
    kind: command
    params: {cmd: echo bad >> ran.log; exit 3}
  after_bad:
    kind: command
    deps: {x: bad}
    params: {cmd: echo after_bad >> ran.log}
  good:
    kind: command
    params: {cmd: sleep 0.2; echo good >> ran.log; echo ok > "$GOEMO_OUT/ok"}
"#,
    );
    let r = p.goemo(&["run", "-j", "1"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("stage(s) failed: bad"), "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("command failed (exit status: 3)").count(),
        1,
        "the error is printed once:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("stage bad failed: command failed"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("after_bad  skipped"), "{}", r.stdout);
    assert_eq!(p.ran(), s(&["bad", "good"]));
    // The good stage was committed: the next run only retries the failed one.
    p.write(
        "pipeline.yaml",
        &p.read("pipeline.yaml")
            .replace("exit 3", "echo fixed > \"$GOEMO_OUT/f\""),
    );
    assert_eq!(p.run_ok(&["run"]), s(&["after_bad", "bad"]));
}

/// Stage `name`'s key as pipeline.lock records it.
fn locked_key(p: &Project, name: &str) -> String {
    let lock = p.read("pipeline.lock");
    let after = lock
        .split(&format!("name: {name}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no stage {name} in pipeline.lock:\n{lock}"));
    after.split("key: ").nth(1).unwrap()[..64].to_owned()
}

#[test]
fn verify_catches_a_flipped_byte() {
    let p = project();
    p.run_ok(&["run"]);
    let key_c = locked_key(&p, "c");
    let f = p.file(&format!("cache/entries/{key_c}/out/count.txt"));
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[0] ^= 0x01; // same size, different content: only a re-hash sees it
    std::fs::write(&f, &bytes).unwrap();
    assert_eq!(
        p.run_ok(&["run"]),
        Vec::<String>::new(),
        "without --verify sizes match and the entry is trusted"
    );
    let _ = std::fs::remove_file(p.file("ran.log"));
    let r = p.goemo(&["run", "--verify"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        p.ran(),
        s(&["c"]),
        "c rebuilt; its output hash is back, so d and e stay cached"
    );
    assert!(r.stderr.contains("damaged"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "12\n");
}

#[test]
fn a_truncated_entry_is_reported_and_rebuilt() {
    let p = project();
    p.run_ok(&["run"]);
    let key_a = locked_key(&p, "a");
    std::fs::write(
        p.file(&format!("cache/entries/{key_a}/out/upper.txt")),
        "HE",
    )
    .unwrap();
    let st = p.goemo(&["status"]);
    assert!(
        st.stdout
            .contains("a  stale: its cache entry is damaged: out/upper.txt is 2 bytes"),
        "{}",
        st.stdout
    );
    assert_eq!(p.run_ok(&["run"]), s(&["a"]));
    std::fs::remove_file(p.file(&format!("cache/entries/{key_a}/COMPLETE"))).unwrap();
    assert_eq!(
        p.run_ok(&["run"]),
        s(&["a"]),
        "an entry without its completion marker is never reused"
    );
}

#[test]
fn gc_keeps_what_the_lock_references() {
    let p = project();
    p.run_ok(&["run", "--set", "b.vars.n=5"]);
    p.run_ok(&["run"]);
    let entries = || std::fs::read_dir(p.file("cache/entries")).unwrap().count();
    assert_eq!(entries(), 7);
    let r = p.goemo(&["gc"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("removed 2 cache entries"), "{}", r.stdout);
    assert_eq!(entries(), 5);
    assert_eq!(p.run_ok(&["run"]), Vec::<String>::new());
}

#[test]
fn dag_text_dot_and_mermaid() {
    let p = project();
    let r = p.goemo(&["dag"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let lines: Vec<&str> = r.stdout.lines().collect();
    let pos = |name: &str| {
        lines
            .iter()
            .position(|l| l.trim_start().starts_with(name))
            .unwrap()
    };
    assert!(
        pos("a ") < pos("b ") && pos("c ") < pos("d ") && pos("d ") < pos("e "),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("e (command)  ◀ b, d  ▶ outputs/e.txt"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("◀ [src] input.txt"), "{}", r.stdout);
    let m = p.goemo(&["dag", "--format", "mermaid"]).stdout;
    assert!(m.starts_with("flowchart TD\n"));
    assert!(
        m.contains("  s0 --> s1\n") && m.contains("  s3 --> s4\n"),
        "{m}"
    );
    let d = p.goemo(&["dag", "--format", "dot"]).stdout;
    assert!(d.contains("\"c\" -> \"d\";"), "{d}");
}

#[test]
fn leftovers_of_an_interrupted_publish_are_removed_by_the_next_run() {
    let p = Project::new(
        "stages:\n  m:\n    kind: command\n    params: {cmd: 'mkdir $GOEMO_OUT/model; echo w > $GOEMO_OUT/model/w.bin'}\n    publish: {out/model: nested/model}\n",
    );
    p.run_ok(&["run"]);
    // What a SIGKILL or ENOSPC mid-publish leaves: half-copied folders beside their targets.
    // (file written, what must be gone)
    let leftovers = [
        (
            "outputs/nested/.model.goemo-tmp.4194300/w.bin",
            "outputs/nested/.model.goemo-tmp.4194300",
        ),
        (
            "outputs/nested/.model.goemo-old.4194301/w.bin",
            "outputs/nested/.model.goemo-old.4194301",
        ),
        ("outputs/.e.txt.goemo-tmp.77", "outputs/.e.txt.goemo-tmp.77"),
    ];
    for (file, _) in leftovers {
        p.write(file, "partial");
    }
    // Look-alikes that are not goemo's: kept.
    p.write("outputs/notes.goemo-tmp.1", "mine");
    p.write("outputs/nested/.model.goemo-tmp.draft", "mine");
    let dry = p.goemo(&["run", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.all());
    assert!(p.file(leftovers[0].0).exists(), "--dry-run removes nothing");
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    for (_, gone) in leftovers {
        assert!(!p.file(gone).exists(), "{gone} is left");
    }
    assert_eq!(p.read("outputs/notes.goemo-tmp.1"), "mine");
    assert_eq!(p.read("outputs/nested/.model.goemo-tmp.draft"), "mine");
    assert_eq!(p.read("outputs/nested/model/w.bin"), "w\n");
}

#[test]
fn publish_never_writes_through_a_symlink() {
    let p = Project::new(
        "stages:\n  a:\n    kind: command\n    params: {cmd: echo x > $GOEMO_OUT/x.txt}\n    publish: {out/x.txt: sub/x.txt}\n",
    );
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(p.file("outputs")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), p.file("outputs/sub")).unwrap();
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&format!(
            "cannot publish outputs/sub/x.txt: outputs/sub is a symbolic link (to {})",
            elsewhere.path().display()
        )),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_dir(elsewhere.path()).unwrap().count(),
        0,
        "nothing was written outside outputs/"
    );
    // With the link gone, the same run publishes.
    std::fs::remove_file(p.file("outputs/sub")).unwrap();
    p.run_ok(&["run"]);
    assert_eq!(p.read("outputs/sub/x.txt"), "x\n");
}

#[test]
fn inputs_outside_the_project_are_shown_as_external() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "outside\n").unwrap();
    let name = data.path().file_name().unwrap().to_str().unwrap();
    let p = Project::new(&format!(
        "stages:\n  a:\n    kind: command\n    inputs: {{src: ../{name}/in.txt, local: input.txt}}\n    params: {{cmd: cat $GOEMO_IN_SRC > $GOEMO_OUT/a.txt}}\n"
    ));
    p.write("input.txt", "inside\n");
    let abs = data.path().join("in.txt");
    let st = p.goemo(&["status"]);
    assert_eq!(st.code, 0, "{}", st.all());
    assert!(
        st.stdout.contains(&format!(
            "a  stale: never run  (external src: {})",
            abs.display()
        )),
        "{}",
        st.stdout
    );
    assert!(!st.stdout.contains("external local"), "{}", st.stdout);
    p.run_ok(&["run"]);
    let st = p.goemo(&["status"]);
    assert!(
        st.stdout
            .contains(&format!("a  fresh  (external src: {})", abs.display())),
        "{}",
        st.stdout
    );
    let dag = p.goemo(&["dag"]);
    assert!(
        dag.stdout.contains(&format!(
            "[local] input.txt, [src] ../{name}/in.txt (external: {})",
            abs.display()
        )),
        "{}",
        dag.stdout
    );
    let dot = p.goemo(&["dag", "--format", "dot"]).stdout;
    assert!(dot.contains("(external: "), "{dot}");
}

#[test]
fn a_fifo_inside_an_input_folder_is_refused_before_anything_runs() {
    let p = Project::new(
        "stages:\n  first:\n    kind: command\n    params: {cmd: echo first >> ran.log; echo 1 > $GOEMO_OUT/one}\n  a:\n    kind: command\n    deps: {x: first}\n    inputs: {data: data}\n    params: {cmd: echo a >> ran.log}\n",
    );
    p.write("data/rows.txt", "1\n");
    let fifo = std::ffi::CString::new(p.file("data/pipe").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // Reading the FIFO would block forever: bound the wait.
    let mut child = p
        .command(&["run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("goemo run hung on a FIFO input");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r: common::Run = child.wait_with_output().unwrap().into();
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(
            "stage `a`, input `data`: hashing ./data: ./data/pipe is a FIFO (named pipe), not a regular file or folder"
        ),
        "{}",
        r.stderr
    );
    assert!(p.ran().is_empty(), "nothing ran: {:?}", p.ran());
}

#[test]
fn verify_reports_a_file_added_to_an_entry() {
    let p = project();
    p.run_ok(&["run"]);
    let key_c = locked_key(&p, "c");
    let extra = p.file(&format!("cache/entries/{key_c}/out/sneaked/in.txt"));
    std::fs::create_dir_all(extra.parent().unwrap()).unwrap();
    std::fs::write(&extra, "not hashed").unwrap();
    let _ = std::fs::remove_file(p.file("ran.log"));
    let r = p.goemo(&["run", "--verify"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr
            .contains("out/sneaked/in.txt is not in the manifest (an unexpected file)"),
        "{}",
        r.stderr
    );
    assert_eq!(p.ran(), s(&["c"]), "c rebuilt; d and e stay cached");
    assert!(!extra.exists(), "the rebuilt entry holds only what c wrote");
}

#[test]
fn a_lock_of_another_version_or_with_a_stage_twice_is_refused() {
    let p = project();
    p.run_ok(&["run"]);
    let lock = p.read("pipeline.lock");
    p.write(
        "pipeline.lock",
        &lock.replace("version: 1\n", "version: 99\n"),
    );
    let _ = std::fs::remove_file(p.file("ran.log"));
    for cmd in [&["run"][..], &["status"][..], &["gc"][..]] {
        let r = p.goemo(cmd);
        assert_eq!(r.code, 2, "goemo {cmd:?}:\n{}", r.all());
        assert!(
            r.stderr.contains(
                "pipeline.lock:3:1: pipeline.lock version 99 is not one this goemo reads (it reads version 1)"
            ) && r.stderr.contains("hint: a newer goemo wrote it"),
            "goemo {cmd:?}:\n{}",
            r.stderr
        );
    }
    // Stage `a` twice, as a careless merge leaves it.
    let (head, stages) = lock.split_once("stages:\n").unwrap();
    let first = &stages[..stages.find("\n- name: b").unwrap() + 1];
    p.write("pipeline.lock", &format!("{head}stages:\n{first}{stages}"));
    let r = p.goemo(&["status"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("stage `a` is recorded twice") && r.stderr.contains("pipeline.lock:"),
        "{}",
        r.stderr
    );
    assert!(p.ran().is_empty());
}

/// Logs read in CI or a file carry no terminal colour codes (stderr is a pipe here).
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let p = Project::new(
        r#"
stages:
  hello:
    kind: command
    params: {cmd: echo hi > "$GOEMO_OUT/hi.txt"}
"#,
    );
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("running hello"), "{}", r.stderr);
    assert!(!r.all().contains('\x1b'), "{:?}", r.stderr);
}
