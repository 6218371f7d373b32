//! `goemo push` and `goemo pull`: move the cache entries pipeline.lock references (or those of
//! the named stages) to and from the shared cache (`goemo_remote`), and say what moved.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use goemo_engine::cache::Cache;
use goemo_engine::error::ConfigError;
use goemo_engine::fingerprint::short;
use goemo_engine::lockfile::LockFile;
use goemo_remote::{Options, Outcome, Progress, Remote, RemoteError, Report, Wanted};

use super::args::RemoteArgs;
use super::shell::human_bytes;

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Push,
    Pull,
}

pub fn push(args: RemoteArgs) -> anyhow::Result<ExitCode> {
    transfer(args, Direction::Push)
}

pub fn pull(args: RemoteArgs) -> anyhow::Result<ExitCode> {
    transfer(args, Direction::Pull)
}

fn transfer(args: RemoteArgs, dir: Direction) -> anyhow::Result<ExitCode> {
    let file = &args.pipeline.pipeline;
    if !file.is_file() {
        return Err(ConfigError::new(file, "no such pipeline file")
            .hint("run goemo in the project folder, or name the file with --pipeline")
            .into());
    }
    let root = project_root(file);
    let wanted = wanted(&root, &args.stages)?;
    // A remote that cannot be used is a configuration error (exit 2), before anything local
    // is touched.
    let remote = match goemo_remote::resolve(&root, args.remote.as_deref())
        .and_then(|url| Remote::open(&url))
    {
        Ok(remote) => remote,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if wanted.is_empty() {
        println!(
            "pipeline.lock references no cache entries: nothing to move (run `goemo run` first)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let cache = Cache::new(root.join("cache"));
    let opts = Options {
        jobs: args.jobs.max(1),
        ..Options::default()
    };
    let print = |p: Progress<'_>| progress(dir, p);
    let report = match dir {
        Direction::Push => goemo_remote::push(&remote, &cache, &wanted, &opts, &print),
        Direction::Pull => goemo_remote::pull(&remote, &cache, &wanted, &opts, &print),
    }?;
    Ok(summary(&report, dir, remote.url()))
}

/// The project folder: where pipeline.yaml is (as `pipeline::load` has it).
fn project_root(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The locked entries of `stages` (all of them when none are named), in pipeline order.
fn wanted(root: &Path, stages: &[String]) -> anyhow::Result<Vec<Wanted>> {
    let lock_path = root.join("pipeline.lock");
    let lock = LockFile::read(&lock_path)?;
    for name in stages {
        if lock.get(name).is_none() {
            let known: Vec<&str> = lock.stages.iter().map(|s| s.name.as_str()).collect();
            return Err(ConfigError::new(
                &lock_path,
                format!("stage `{name}` is not in pipeline.lock"),
            )
            .hint(if known.is_empty() {
                "pipeline.lock records no stage yet: run `goemo run` first".to_owned()
            } else {
                format!("it records: {}", known.join(", "))
            })
            .into());
        }
    }
    Ok(lock
        .stages
        .iter()
        .filter(|s| stages.is_empty() || stages.contains(&s.name))
        .map(|s| Wanted {
            stage: s.name.clone(),
            key: s.key.clone(),
        })
        .collect())
}

/// One line per entry as it finishes; waits on stderr.
fn progress(dir: Direction, p: Progress<'_>) {
    let (verb, there) = match dir {
        Direction::Push => ("pushed", "already on the remote"),
        Direction::Pull => ("pulled", "already in the cache"),
    };
    match p {
        Progress::WaitingForGc => eprintln!("waiting for `goemo gc` to finish with the cache…"),
        Progress::Waiting { stage, key } => eprintln!(
            "{stage}: waiting for another goemo process that is building or pulling {}…",
            short(key)
        ),
        Progress::File { .. } => {}
        Progress::Entry(e) => {
            let key = short(&e.key);
            match &e.outcome {
                Outcome::Pushed => println!(
                    "{verb:<10} {:<12} {key}  {} files, {} uploaded ({} files already on the remote)",
                    e.stage,
                    e.files,
                    human_bytes(e.bytes_moved),
                    e.files - e.files_moved,
                ),
                Outcome::Pulled => println!(
                    "{verb:<10} {:<12} {key}  {} files, {} downloaded and verified",
                    e.stage,
                    e.files,
                    human_bytes(e.bytes_moved),
                ),
                Outcome::AlreadyThere => println!("{:<10} {:<12} {key}  {there}", "up to date", e.stage),
                Outcome::Diverged { remote, local } => println!(
                    "{:<10} {:<12} {key}  the remote holds other outputs for this key ({remote}; here: {local}); the remote's are kept",
                    "diverged", e.stage
                ),
                Outcome::Missing(why) => println!("{:<10} {:<12} {key}  {why}", "missing", e.stage),
                Outcome::Failed(_) => println!("{:<10} {:<12} {key}  (error below)", "failed", e.stage),
            }
        }
    }
}

/// The closing line (what moved, bytes, MB/s) and the exit code: 1 when an entry failed or
/// was missing where it had to come from.
fn summary(report: &Report, dir: Direction, url: &str) -> ExitCode {
    let (verb, to) = match dir {
        Direction::Push => ("pushed", "to"),
        Direction::Pull => ("pulled", "from"),
    };
    let moved = report.count(|o| matches!(o, Outcome::Pushed | Outcome::Pulled));
    let bytes = report.bytes_moved();
    let secs = report.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    };
    println!(
        "{verb} {moved} of {} entries {to} {url}: {} in {secs:.2} s ({rate:.1} MB/s); {} up to date",
        report.entries.len(),
        human_bytes(bytes),
        report.count(|o| matches!(o, Outcome::AlreadyThere)),
    );
    let failed: Vec<&RemoteError> = report
        .entries
        .iter()
        .filter_map(|e| match &e.outcome {
            Outcome::Failed(err) => Some(err),
            _ => None,
        })
        .collect();
    for err in &failed {
        eprintln!("error: {err}");
    }
    let missing = report.count(|o| matches!(o, Outcome::Missing(_)));
    if missing > 0 {
        eprintln!("error: {missing} entries were not {verb} (listed above as missing)");
    }
    if failed.is_empty() && missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
