//! What a run survives: SIGTERM mid-stage, a symlink loop in an input folder, and a pipeline of
//! a thousand stages (planning must stay linear in the number of stages).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Project;

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    assert!(pid > 1, "refusing to signal pid {pid}");
    // SAFETY: kill(2) with a positive pid touches only that process.
    unsafe { libc::kill(pid, sig) };
}

/// Wait for `child`, killing it (and failing) after `limit`.
fn wait_bounded(mut child: std::process::Child, limit: Duration, what: &str) -> common::Run {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap().into()
}

fn entry_count(p: &Project) -> usize {
    std::fs::read_dir(p.file("cache/entries"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn sigterm_mid_stage_stops_like_ctrl_c_and_leaves_nothing_half_written() {
    // `half` writes part of its output, then waits to be stopped; `after` uses it.
    let p = Project::new(
        "stages:\n  first:\n    kind: command\n    params: {cmd: echo 1 > $GOEMO_OUT/one}\n  half:\n    kind: command\n    deps: {first: first}\n    params: {cmd: 'echo part > $GOEMO_OUT/part; if [ ! -e release ]; then touch started; sleep 30; fi; echo rest >> $GOEMO_OUT/part'}\n  after:\n    kind: command\n    deps: {half: half}\n    params: {cmd: cp $GOEMO_IN_HALF/part $GOEMO_OUT/copy}\n    publish: {out/copy: copy.txt}\n",
    );
    let child = p
        .command(&["run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !p.file("started").exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(p.file("started").exists(), "stage `half` never started");
    signal(child.id(), libc::SIGTERM);
    let r = wait_bounded(child, Duration::from_secs(20), "goemo run after SIGTERM");
    assert!(
        r.code == 130 || r.code == 143,
        "SIGTERM ends the run as an interrupt (130), got {}:\n{}",
        r.code,
        r.all()
    );
    assert!(r.stderr.contains("interrupted"), "{}", r.stderr);
    // Only `first` finished: `half`'s partial output is not an entry, `after` never ran.
    assert_eq!(entry_count(&p), 1, "{}", r.all());
    let lock = p.read("pipeline.lock");
    assert!(lock.contains("name: first"), "{lock}");
    assert!(!lock.contains("name: half"), "{lock}");
    assert!(!p.file("outputs/copy.txt").exists());
    let tmp_left = std::fs::read_dir(p.file("cache/tmp"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(tmp_left, 0, "the interrupted attempt's temp folder is gone");
    let st = p.goemo(&["status"]);
    assert!(st.stdout.contains("first  fresh"), "{}", st.stdout);
    assert!(
        st.stdout.contains("half   stale: never run"),
        "{}",
        st.stdout
    );

    // A later run finishes what was stopped, from where it was.
    p.write("release", "");
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(p.read("outputs/copy.txt"), "part\nrest\n");
    assert!(r.stdout.contains("first  cached"), "{}", r.stdout);
    assert_eq!(entry_count(&p), 3);
}

#[test]
fn a_symlink_loop_inside_an_input_folder_is_an_error_naming_it() {
    let p = Project::new(
        "stages:\n  a:\n    kind: command\n    inputs: {data: data}\n    params: {cmd: echo a >> ran.log}\n",
    );
    p.write("data/sub/rows.txt", "1\n");
    // data/sub/up → data: following it leads back to where it started, forever.
    std::os::unix::fs::symlink("..", p.file("data/sub/up")).unwrap();
    for args in [&["run"][..], &["status"][..]] {
        let child = p
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let r = wait_bounded(child, Duration::from_secs(30), "goemo on a symlink loop");
        let took = t.elapsed();
        assert_eq!(r.code, 1, "goemo {args:?}:\n{}", r.all());
        assert!(
            r.stderr.contains("stage `a`, input `data`")
                && r.stderr
                    .contains("./data/sub/up is a symbolic link loop: it leads back to ./data"),
            "{}",
            r.stderr
        );
        // Generous for a loaded CI machine; it takes milliseconds.
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
    assert!(p.ran().is_empty(), "nothing ran: {:?}", p.ran());
}

/// `n` command stages, each depending on the one before.
fn chain(n: usize) -> String {
    let mut yaml = String::from("stages:\n");
    for i in 0..n {
        yaml.push_str(&format!("  s{i}:\n    kind: command\n"));
        if i > 0 {
            yaml.push_str(&format!("    deps: [s{}]\n", i - 1));
        }
        yaml.push_str(&format!("    params: {{cmd: echo {i} > $GOEMO_OUT/n}}\n"));
    }
    yaml
}

#[test]
fn status_of_a_thousand_chained_stages_plans_in_well_under_a_second() {
    let p = Project::new(&chain(1000));
    let t = Instant::now();
    let r = p.goemo(&["status"]);
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.stdout.lines().count(), 1000);
    assert!(r.stdout.contains("s0    stale: never run"), "{}", r.stdout);
    assert!(
        r.stdout.contains("s999  stale: input command will change"),
        "{}",
        &r.stdout[r.stdout.len().saturating_sub(300)..]
    );
    eprintln!("goemo status, 1,000 chained stages: {took:?}");
    // Measured at ~0.03 s; the bound is generous for a loaded CI machine.
    assert!(took < Duration::from_secs(2), "took {took:?}");

    let t = Instant::now();
    let r = p.goemo(&["run", "--dry-run"]);
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.stdout.lines().count(), 1000);
    eprintln!("goemo run --dry-run, 1,000 chained stages: {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
