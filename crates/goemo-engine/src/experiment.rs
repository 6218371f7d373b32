//! Experiments: runs with `--set` overrides that never touch the baseline (pipeline.lock and
//! outputs/), recorded so they can be listed, compared, applied and removed.
//!
//! ```text
//! experiments/<name>/experiment.json   the record: overrides, pipeline hash, git commit, every
//!                                      stage's key and wall time, metrics, status
//! experiments/<name>/pipeline.lock     the experiment's own lock (what `exp apply` makes the
//!                                      baseline's)
//! experiments/<name>/outputs/…         its published files: hard links into the cache
//! ```
//!
//! Members of a sweep run in one process, up to `jobs` at once, each a normal engine run against
//! the shared cache; a stage key two members share is built once (the first takes its build
//! lock, the other waits and takes the entry). Stages use the process's one rayon pool, so
//! members at once never run more compute threads than there are cores. A rerun of the same
//! sweep takes every finished stage from the cache, and a member killed mid-train resumes from
//! its checkpoint (kept in the cache's work folder under the stage key).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use goemo_stage::Registry;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Outcome, Reporter, RunOptions, RunReport, StageResult};
use crate::error::ConfigError;
use crate::pipeline::{self, Pipeline};
use crate::sweep::Member;

pub const DIR: &str = "experiments";
pub const RECORD_FILE: &str = "experiment.json";
pub use crate::reserved::EXPERIMENT_LOCK as LOCK_FILE;
/// The name that means pipeline.lock and outputs/ in `exp diff` and `plots diff`.
pub const BASELINE: &str = "baseline";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    Failed,
    Interrupted,
}

/// One stage of an experiment: its key and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRun {
    pub name: String,
    pub kind: String,
    pub key: String,
    /// `ran`, `cached`, `restored` (taken from the cache, or built by another member).
    pub outcome: String,
    /// Wall time of the run that built the entry (also when this experiment took it cached).
    pub wall_s: f64,
}

/// `experiments/<name>/experiment.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub name: String,
    /// The sweep it belongs to (members share it), if any.
    pub sweep: Option<String>,
    /// Its overrides as given: `train.lr=3e-5`.
    pub set: Vec<String>,
    /// The overridden params after defaults, by `stage.param`.
    pub params: BTreeMap<String, serde_json::Value>,
    /// The pipeline file, relative to the project root, and the blake3 of its bytes.
    pub pipeline_file: String,
    pub pipeline_hash: String,
    /// `git rev-parse HEAD` of the project, with `+dirty` when it had uncommitted changes.
    pub git_commit: Option<String>,
    pub created_unix: u64,
    pub status: Status,
    pub error: Option<String>,
    pub stages: Vec<StageRun>,
    /// `stage.metric` → value, from the stages' [`goemo_stage::Stage::metrics`].
    pub metrics: BTreeMap<String, f64>,
    /// This experiment run's own wall time (seconds; a cached rerun is short).
    pub wall_s: f64,
}

impl ExperimentRecord {
    /// Every cache key it references (what `goemo gc` keeps).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(|s| s.key.as_str())
    }
}

/// The folder of experiment `name`.
pub fn dir(root: &Path, name: &str) -> PathBuf {
    root.join(DIR).join(name)
}

/// Names are folder names, typed on command lines: letters, digits, `.`, `_`, `-`.
pub fn check_name(name: &str, file: &Path) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name != BASELINE;
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            file,
            format!("experiment name `{name}`: use letters, digits, `.`, `_` and `-`, starting with a letter or digit (and not `{BASELINE}`)"),
        ))
    }
}

pub fn read(root: &Path, name: &str) -> anyhow::Result<ExperimentRecord> {
    let path = dir(root, name).join(RECORD_FILE);
    if !path.exists() {
        let known = list(root)?.into_iter().map(|r| r.name).collect::<Vec<_>>();
        anyhow::bail!(
            "no experiment named `{name}` (no {}); experiments here: {}",
            path.display(),
            if known.is_empty() {
                "none yet (goemo exp run --set STAGE.PARAM=VALUE)".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    goemo_fsio::read_json(&path).with_context(|| format!("reading experiment `{name}`"))
}

/// Every record under `experiments/`, by name. A damaged record is an error naming its file.
pub fn list(root: &Path) -> anyhow::Result<Vec<ExperimentRecord>> {
    let base = root.join(DIR);
    let Ok(rd) = std::fs::read_dir(&base) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().join(RECORD_FILE).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let path = base.join(n).join(RECORD_FILE);
            goemo_fsio::read_json(&path).map_err(anyhow::Error::from)
        })
        .collect()
}

/// Remove an experiment's folder (renamed aside first, so no half-removed record is listed).
pub fn remove(root: &Path, name: &str) -> anyhow::Result<()> {
    let from = dir(root, name);
    if !from.join(RECORD_FILE).exists() && !from.exists() {
        anyhow::bail!("no experiment named `{name}`");
    }
    let doomed = root
        .join(DIR)
        .join(format!(".{name}.removing.{}", std::process::id()));
    std::fs::rename(&from, &doomed).with_context(|| format!("removing {}", from.display()))?;
    crate::cache::sync_dir(&root.join(DIR));
    std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
}

/// Remove folders a killed `exp remove` left (`.NAME.removing.PID`).
pub fn clean_leftovers(root: &Path) {
    if let Ok(rd) = std::fs::read_dir(root.join(DIR)) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().contains(".removing.") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// What is the same for every member of one `goemo exp run`.
pub struct ExpContext<'a> {
    pub pipeline_file: &'a Path,
    pub registry: &'a Registry,
    pub sweep: Option<String>,
    /// Members at once.
    pub jobs: usize,
    pub git_commit: Option<String>,
    /// The shared cache members fetch from and share with (see [`crate::shared`]).
    pub shared: Option<&'a dyn crate::shared::SharedCache>,
}

/// One member to run: its name and overrides, and its pipeline (already loaded, so every
/// member's params were checked before any ran).
pub struct Planned {
    pub name: String,
    pub member: Member,
    pub pipeline: Pipeline,
}

/// Load every member's pipeline (so a bad value in any member fails before anything runs).
pub fn plan(
    file: &Path,
    registry: &Registry,
    named: Vec<(String, Member)>,
) -> Result<Vec<Planned>, ConfigError> {
    named
        .into_iter()
        .map(|(name, member)| {
            check_name(&name, file)?;
            let overrides = member.overrides(file)?;
            let pipeline = pipeline::load(file, &overrides, registry).map_err(|mut e| {
                // Which member: the same param is fine in one and wrong in another.
                if !member.set.is_empty() {
                    e.message = format!(
                        "experiment {name} ({}): {}",
                        member.set.join(" "),
                        e.message
                    );
                }
                e
            })?;
            Ok(Planned {
                name,
                member,
                pipeline,
            })
        })
        .collect()
}

/// The result of one member.
pub struct MemberResult {
    pub name: String,
    pub record: Option<ExperimentRecord>,
    pub report: anyhow::Result<RunReport>,
}

/// Run the planned members, up to `ctx.jobs` at once; `reporter(name)` makes each member's
/// reporter. Stops starting members after an interrupt.
pub fn run_all(
    ctx: &ExpContext<'_>,
    planned: &[Planned],
    reporter: &(dyn Fn(&str) -> Box<dyn Reporter> + Sync),
) -> Vec<MemberResult> {
    let next = AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..ctx.jobs.clamp(1, planned.len().max(1)) {
            s.spawn(|| loop {
                if crate::engine::INTERRUPTED.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(p) = planned.get(i) else { return };
                let rep = reporter(&p.name);
                // Log lines of the member's stages say which member they come from.
                let _in_span = tracing::info_span!("exp", name = %p.name).entered();
                let result = run_member(ctx, p, rep.as_ref());
                results.lock().expect("poisoned").push((i, result));
            });
        }
    });
    let mut results = results.into_inner().expect("poisoned");
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn run_member(ctx: &ExpContext<'_>, p: &Planned, reporter: &dyn Reporter) -> MemberResult {
    let started = Instant::now();
    let root = &p.pipeline.root;
    let exp_dir = dir(root, &p.name);
    let report = std::fs::create_dir_all(&exp_dir)
        .with_context(|| format!("creating {}", exp_dir.display()))
        .and_then(|()| Engine::for_experiment(&p.pipeline, &exp_dir))
        .and_then(|mut engine| {
            engine.shared = ctx.shared;
            let opts = RunOptions {
                jobs: 1,
                ..RunOptions::default()
            };
            engine.run(&opts, reporter).map(|r| (r, engine))
        });
    let (report, record) = match report {
        Ok((report, engine)) => {
            let record = build_record(ctx, p, &engine, &report, started.elapsed().as_secs_f64());
            let written = record.and_then(|r| {
                goemo_fsio::write_json(&exp_dir.join(RECORD_FILE), &r)?;
                Ok(r)
            });
            match written {
                Ok(r) => (Ok(report), Some(r)),
                Err(e) => (Err(e), None),
            }
        }
        Err(e) => (Err(e), None),
    };
    MemberResult {
        name: p.name.clone(),
        record,
        report,
    }
}

fn build_record(
    ctx: &ExpContext<'_>,
    p: &Planned,
    engine: &Engine<'_>,
    report: &RunReport,
    wall_s: f64,
) -> anyhow::Result<ExperimentRecord> {
    let pipeline = &p.pipeline;
    let failed: Vec<&StageResult> = report
        .results
        .iter()
        .filter(|r| r.outcome == Outcome::Failed)
        .collect();
    let status = if report.interrupted {
        Status::Interrupted
    } else if failed.is_empty() {
        Status::Done
    } else {
        Status::Failed
    };
    let mut stages = Vec::new();
    let mut metrics = BTreeMap::new();
    for (i, m) in &report.done {
        let def = &pipeline.stages[*i];
        let outcome = report
            .results
            .iter()
            .find(|r| r.name == def.name)
            .map_or("cached", |r| r.outcome.label());
        stages.push(StageRun {
            name: def.name.clone(),
            kind: def.kind.clone(),
            key: m.key.clone(),
            outcome: outcome.to_owned(),
            wall_s: m.wall_s,
        });
        let out = engine.cache.entry_dir(&m.key).join("out");
        let found = def
            .stage
            .metrics(&out)
            .with_context(|| format!("reading the metrics of stage {}", def.name))?;
        metrics.extend(
            found
                .into_iter()
                .map(|(k, v)| (format!("{}.{k}", def.name), v)),
        );
    }
    let bytes = std::fs::read(&pipeline.file)
        .with_context(|| format!("reading {}", pipeline.file.display()))?;
    Ok(ExperimentRecord {
        name: p.name.clone(),
        sweep: ctx.sweep.clone(),
        set: p.member.set.clone(),
        params: overridden_params(pipeline, &p.member),
        pipeline_file: ctx
            .pipeline_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        pipeline_hash: blake3::hash(&bytes).to_hex().to_string(),
        git_commit: ctx.git_commit.clone(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        status,
        error: failed
            .first()
            .map(|r| format!("stage {}: {}", r.name, r.note)),
        stages,
        metrics,
        wall_s: (wall_s * 1000.0).round() / 1000.0,
    })
}

/// The resolved value of each overridden param (`train.lr` → 3e-5, defaults applied).
fn overridden_params(pipeline: &Pipeline, member: &Member) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for set in &member.set {
        let Some((name, _)) = set.split_once('=') else {
            continue;
        };
        if let Some(v) = pipeline.param(name) {
            out.insert(name.to_owned(), v.clone());
        }
    }
    out
}

/// Metrics of the baseline (pipeline.lock's entries), as an experiment record would hold them;
/// stages whose entry is gone are left out.
pub fn baseline_metrics(engine: &Engine<'_>) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    for locked in &engine.lock.stages {
        let Some(def) = engine.pipeline.get(&locked.name) else {
            continue;
        };
        let out = engine.cache.entry_dir(&locked.key).join("out");
        if let Ok(found) = def.stage.metrics(&out) {
            metrics.extend(
                found
                    .into_iter()
                    .map(|(k, v)| (format!("{}.{k}", locked.name), v)),
            );
        }
    }
    metrics
}

/// The git commit of the folder `root` is in (`+dirty` with uncommitted changes), if any.
pub fn git_commit(root: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}+dirty") } else { head })
}
