//! Crash safety and concurrency: SIGKILL at random points, Ctrl-C, two runs at once.

mod common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::{Duration, Instant};

use common::Project;

const BIG: u64 = 40 * 262_144;

/// `big` writes a 10 MiB file in 40 appends; `after` records its size.
const PIPELINE: &str = r#"
stages:
  big:
    kind: command
    params:
      cmd: for i in $(seq 40); do head -c 262144 /dev/zero | tr '\0' 'x' >> "$GOEMO_OUT/big.bin"; done
  after:
    kind: command
    deps: {big: big}
    params:
      cmd: wc -c < "$GOEMO_IN_BIG/big.bin" | tr -d ' ' > "$GOEMO_OUT/size.txt"
    publish: {out/size.txt: size.txt}
"#;

// Signals go through kill(2), not the `kill` program: procps-ng 4.0's `kill -9 -PGID` can parse
// the negative pid as an option and signal pid -1 (every process the user owns), which as root
// took the whole CI run down.
fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    assert!(pid > 1, "refusing to signal pid {pid}");
    // SAFETY: kill(2) with a positive pid touches only that process.
    unsafe { libc::kill(pid, sig) };
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    let pgid = libc::pid_t::try_from(pgid).expect("pgid fits pid_t");
    assert!(pgid > 1, "refusing to signal process group {pgid}");
    // SAFETY: a negative pid below -1 names exactly one process group.
    unsafe { libc::kill(-pgid, sig) };
}

/// Every entry that has its completion marker must be whole.
fn assert_no_trusted_partial_entry(p: &Project) {
    let Ok(rd) = std::fs::read_dir(p.file("cache/entries")) else {
        return;
    };
    for e in rd.flatten() {
        if !e.path().join("COMPLETE").exists() {
            continue;
        }
        let big = e.path().join("out/big.bin");
        if big.exists() {
            assert_eq!(
                std::fs::metadata(&big).unwrap().len(),
                BIG,
                "a complete entry holds a partial file"
            );
        }
        let size = e.path().join("out/size.txt");
        if size.exists() {
            assert_eq!(
                std::fs::read_to_string(&size).unwrap().trim(),
                BIG.to_string()
            );
        }
    }
}

#[test]
fn sigkill_at_random_points_never_leaves_a_trusted_partial_entry() {
    // How long a whole run takes here, to spread the kills over it.
    let probe = Project::new(PIPELINE);
    let t = Instant::now();
    assert_eq!(probe.goemo(&["run"]).code, 0);
    let full = t.elapsed();

    let p = Project::new(PIPELINE);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut killed = 0;
    for _ in 0..25 {
        let delay = full.mul_f64((next() % 1000) as f64 / 1000.0 * 1.1);
        // Its own process group, so the kill takes the stage's shell too (as a crash would).
        // `--from big` re-runs both stages even once they are cached, so every kill can land
        // mid-write, also while a complete entry is being replaced.
        let child = p
            .command(&["run", "-q", "--from", "big"])
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        signal_group(child.id(), libc::SIGKILL);
        let out = child.wait_with_output().unwrap();
        if out.status.signal() == Some(libc::SIGKILL) {
            killed += 1;
        }
        assert_no_trusted_partial_entry(&p);
        let st = p.goemo(&["status"]);
        assert_eq!(st.code, 0, "status after a kill:\n{}", st.all());
    }
    // Delays spread over 0..1.1 of a run: most kills land mid-run, else this tests nothing.
    assert!(killed >= 10, "only {killed} of 25 runs were killed mid-way");
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(p.read("outputs/size.txt").trim(), BIG.to_string());
    assert_no_trusted_partial_entry(&p);
    let v = p.goemo(&["run", "--verify"]);
    assert_eq!(v.code, 0, "{}", v.all());
    assert!(!v.stderr.contains("damaged"), "{}", v.stderr);
    let tmp_left = std::fs::read_dir(p.file("cache/tmp"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(tmp_left, 0, "temp folders of killed runs are cleaned");
}

#[test]
fn ctrl_c_stops_cleanly() {
    let p = Project::new(
        "stages:\n  slow:\n    kind: command\n    params: {cmd: echo started > started; sleep 30; echo x > \"$GOEMO_OUT/x\"}\n",
    );
    let mut child = p
        .command(&["run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !p.file("started").exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child.id(), libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the stage's command was stopped"
    );
    assert_eq!(
        std::fs::read_dir(p.file("cache/entries"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );
    let st = p.goemo(&["status"]);
    assert!(
        st.stdout.contains("slow  stale: never run"),
        "{}",
        st.stdout
    );
}

#[test]
fn a_second_run_waits_and_both_leave_a_consistent_cache() {
    let p = Project::new(
        "stages:\n  first:\n    kind: command\n    params: {cmd: echo first >> ran.log; sleep 1; echo 1 > \"$GOEMO_OUT/one\"}\n  second:\n    kind: command\n    deps: {x: first}\n    params: {cmd: echo second >> ran.log; cat \"$GOEMO_IN_X/one\" > \"$GOEMO_OUT/two\"}\n",
    );
    let a = p
        .command(&["run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first stage appends to ran.log once the run holds the lock.
    let started = std::time::Instant::now();
    while !p.file("ran.log").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "first run never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let busy = p.goemo(&["run", "--no-wait"]);
    assert_eq!(busy.code, 1, "{}", busy.all());
    assert!(
        busy.stderr
            .contains("another goemo run is running in this project"),
        "{}",
        busy.stderr
    );
    let b: common::Run = p.command(&["run"]).output().unwrap().into();
    let a: common::Run = a.wait_with_output().unwrap().into();
    assert_eq!(a.code, 0, "{}", a.all());
    assert_eq!(b.code, 0, "{}", b.all());
    assert!(
        b.stderr.contains("waiting for another goemo run"),
        "{}",
        b.stderr
    );
    assert_eq!(
        p.ran(),
        vec!["first", "second"],
        "each stage ran once: the second run found them cached"
    );
    let locked = p.goemo(&["run", "--locked"]);
    assert_eq!(locked.code, 0, "{}", locked.all());
}

/// Names under `outputs/` (recursively) that a publish writes beside its targets.
fn publish_temps(p: &Project) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".goemo-tmp.") || name.contains(".goemo-old.") {
                out.push(e.path().display().to_string());
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&p.file("outputs"), &mut out);
    out
}

#[test]
fn sigkill_while_publishing_leaves_temps_that_the_next_run_removes() {
    // A 32-file, 16 MiB folder: copying it into outputs/ takes long enough to kill mid-way.
    let p = Project::new(
        "stages:\n  m:\n    kind: command\n    params: {cmd: 'mkdir $GOEMO_OUT/model; for i in $(seq 32); do head -c 524288 /dev/zero > $GOEMO_OUT/model/w$i.bin; done'}\n    publish: {out/model: model}\n",
    );
    p.run_ok(&["run"]);
    let mut caught = 0;
    for attempt in 0..20 {
        // The entry is cached; make the run publish again, into an empty place or over the old
        // copy (which is moved aside first).
        if attempt % 2 == 0 {
            let _ = std::fs::remove_dir_all(p.file("outputs/model"));
        } else if p.file("outputs/model/w1.bin").exists() {
            p.write("outputs/model/w1.bin", "edited");
        }
        let mut child = p
            .command(&["run", "-q"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let mut exited = false;
        while publish_temps(&p).is_empty() && t.elapsed() < Duration::from_secs(20) {
            if child.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Through the Child, which signals only a process it has not reaped (a reaped pid may
        // already name someone else's process).
        if !exited {
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        if status.signal() == Some(libc::SIGKILL) && !publish_temps(&p).is_empty() {
            caught += 1;
            if caught == 4 {
                break;
            }
        }
    }
    eprintln!("{caught} kills landed while a temp copy existed");
    assert!(caught >= 1, "no kill landed while a temp copy existed");
    let r = p.goemo(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(publish_temps(&p), Vec::<String>::new(), "leftovers removed");
    let files = std::fs::read_dir(p.file("outputs/model")).unwrap().count();
    assert_eq!(files, 32);
    for i in 1..=32 {
        let len = std::fs::metadata(p.file(&format!("outputs/model/w{i}.bin")))
            .unwrap()
            .len();
        assert_eq!(len, 1 << 19, "outputs/model/w{i}.bin is whole");
    }
}
