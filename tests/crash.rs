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
        // goemo's whole process group, as a crash of the terminal's job would. The stage's shell
        // runs in a group of its own and lives on; the next run stops it before it starts.
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

/// `w` starts a background writer and waits for it: the writer records its pid in writer.pid and
/// appends `$MARK` to a file in the work folder every 50 ms, `$LOOPS` times; the result is that
/// file. MARK and LOOPS come from goemo's environment, so both runs have the same key.
const WRITER: &str = r#"
stages:
  w:
    kind: command
    params:
      cmd: ': > "$GOEMO_WORK/lines"; sh -c ''echo $$ > writer.pid; for i in $(seq $LOOPS); do echo $MARK >> "$GOEMO_WORK/lines"; sleep 0.05; done'' & wait; cp "$GOEMO_WORK/lines" "$GOEMO_OUT/lines"'
    publish: {out/lines: lines}
"#;

/// Pids of live (not zombie) processes whose environment holds `needle`.
fn processes_with_env(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        if !zombie && environ.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills, when dropped, every process started with `GOEMO_TEST_TAG=<tag>`: whatever the test's
/// assertions say, nothing it started outlives it.
struct KillTagged(String);

impl Drop for KillTagged {
    fn drop(&mut self) {
        for pid in processes_with_env(&format!("GOEMO_TEST_TAG={}", self.0)) {
            signal(pid, libc::SIGKILL);
        }
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_rerun_stops_the_commands_a_sigkilled_run_left_and_commits_only_its_own_output() {
    let p = Project::new(WRITER);
    let tag = p.path().display().to_string();
    let _cleanup = KillTagged(tag.clone());
    let lines = || {
        std::fs::read_dir(p.file("cache/work"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("lines")).ok())
            .map(|t| t.lines().count())
            .sum::<usize>()
    };
    let mut first = p
        .command(&["run", "-q"])
        .env("GOEMO_TEST_TAG", &tag)
        .env("MARK", "first")
        .env("LOOPS", "600")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first writer", Duration::from_secs(30), || lines() >= 2);
    // goemo alone dies, as in a crash or an OOM kill; its command's processes live on.
    signal(first.id(), libc::SIGKILL);
    assert_eq!(first.wait().unwrap().signal(), Some(libc::SIGKILL));
    let first_mark = "MARK=first";
    let orphans = processes_with_env(first_mark);
    assert!(
        !orphans.is_empty(),
        "the first run's writer outlives goemo (else this tests nothing)"
    );
    let r: common::Run = p
        .command(&["run"])
        .env("GOEMO_TEST_TAG", &tag)
        .env("MARK", "second")
        .env("LOOPS", "10")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr.contains("stopping process group"),
        "the rerun says what it stopped:\n{}",
        r.stderr
    );
    let left: Vec<u32> = processes_with_env(first_mark)
        .into_iter()
        .filter(|pid| orphans.contains(pid))
        .collect();
    assert_eq!(
        left,
        Vec::<u32>::new(),
        "the first run's processes are gone"
    );
    assert_eq!(
        p.read("outputs/lines"),
        "second\n".repeat(10),
        "the result holds the rerun's lines only"
    );
}

#[test]
fn a_process_group_record_that_names_another_process_is_left_alone() {
    let p = Project::new(WRITER);
    let tag = p.path().display().to_string();
    let _cleanup = KillTagged(tag.clone());
    // An unrelated process in its own group, and a stale record naming its group with another
    // start time (as when a pid is reused after a reboot).
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .env("GOEMO_TEST_TAG", &tag)
        .process_group(0)
        .spawn()
        .unwrap();
    let record = p.file("cache/work/0123abcd/.goemo-command.pgid");
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(
        &record,
        format!(
            "{{\"pgid\": {}, \"start_ticks\": 1, \"stage\": \"w\"}}",
            bystander.id()
        ),
    )
    .unwrap();
    let r: common::Run = p
        .command(&["run"])
        .env("GOEMO_TEST_TAG", &tag)
        .env("MARK", "m")
        .env("LOOPS", "2")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "a process goemo did not start is not killed"
    );
    assert!(!record.exists(), "the stale record is removed");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[test]
fn sigterm_stops_the_whole_process_group_of_a_command() {
    let p = Project::new(WRITER);
    let tag = p.path().display().to_string();
    let _cleanup = KillTagged(tag.clone());
    let mut child = p
        .command(&["run"])
        .env("GOEMO_TEST_TAG", &tag)
        .env("MARK", "term")
        .env("LOOPS", "600")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the writer", Duration::from_secs(30), || {
        p.file("writer.pid").exists() && !processes_with_env("MARK=term").is_empty()
    });
    signal(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "a SIGTERM stops the run like Ctrl-C"
    );
    let left: Vec<u32> = processes_with_env(&format!("GOEMO_TEST_TAG={tag}"));
    assert_eq!(
        left,
        Vec::<u32>::new(),
        "the command's background writer is gone"
    );
}
