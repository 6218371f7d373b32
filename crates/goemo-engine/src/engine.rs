//! Planning and execution: which stages are fresh, which run, in what order, and on how many
//! threads; `status` and `run --dry-run` share the same assessment so they never disagree with
//! what `run` does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use goemo_stage::{RunRecord, StageContext, StageRecord};

use crate::cache::{Cache, EntryManifest, Lookup};
use crate::error::{ConfigError, Interrupted, LockDrift};
use crate::fingerprint::{self, Fingerprint, InputHash, StaleReason};
use crate::hashing::{ContentHasher, FileDigest, TreeDigest};
use crate::lockfile::{LockFile, LockedStage, LOCK_VERSION};
use crate::pipeline::Pipeline;

/// Set by the Ctrl-C handler; stages poll it through their context.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub struct Engine<'p> {
    pub pipeline: &'p Pipeline,
    pub cache: Cache,
    pub hasher: ContentHasher,
    pub lock: LockFile,
    pub lock_path: PathBuf,
    pub outputs_dir: PathBuf,
    externals: Mutex<HashMap<PathBuf, Arc<TreeDigest>>>,
}

/// A stage's key and what the cache holds for it.
pub struct Assessment {
    pub fingerprint: Fingerprint,
    pub key: String,
    pub input_files: BTreeMap<String, BTreeMap<String, FileDigest>>,
    pub lookup: Lookup,
    /// Why the key differs from pipeline.lock's (empty when it is the same).
    pub reasons: Vec<StaleReason>,
}

pub enum Assessed {
    Known(Box<Assessment>),
    /// An upstream has no known outputs yet (it is stale and would run first).
    Blocked(StaleReason),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub from: Option<String>,
    pub until: Option<String>,
    pub only: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    pub jobs: usize,
    pub verify: bool,
    pub locked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same key as pipeline.lock, taken from the cache.
    Cached,
    /// A different key than pipeline.lock, found in the cache (the run-cache).
    Restored,
    Ran,
    Failed,
    Skipped,
    WouldRun,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Restored => "restored",
            Outcome::Ran => "ran",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
            Outcome::WouldRun => "would run",
        }
    }
}

pub struct StageResult {
    pub name: String,
    pub outcome: Outcome,
    pub wall_s: f64,
    pub note: String,
}

enum State {
    Waiting,
    Running,
    Done(Arc<EntryManifest>, Outcome),
    Failed(String),
    Skipped(String),
    /// Dry run: it would run, so its outputs are unknown.
    Unknown,
}

impl<'p> Engine<'p> {
    pub fn new(pipeline: &'p Pipeline, use_stat_cache: bool) -> anyhow::Result<Self> {
        let root = &pipeline.root;
        let cache = Cache::new(root.join("cache"));
        let lock_path = root.join("pipeline.lock");
        Ok(Engine {
            pipeline,
            hasher: ContentHasher::new(use_stat_cache.then(|| cache.root.join("stat-cache.json"))),
            cache,
            lock: LockFile::read(&lock_path)?,
            lock_path,
            outputs_dir: root.join("outputs"),
            externals: Mutex::default(),
        })
    }

    fn external(&self, stage: &str, role: &str, path: &Path) -> anyhow::Result<Arc<TreeDigest>> {
        if let Some(t) = self.externals.lock().expect("poisoned").get(path) {
            return Ok(t.clone());
        }
        let t = Arc::new(self.hasher.tree(path).with_context(|| {
            format!(
                "stage `{stage}`, input `{role}`: hashing {}",
                path.display()
            )
        })?);
        self.externals
            .lock()
            .expect("poisoned")
            .insert(path.to_path_buf(), t.clone());
        Ok(t)
    }

    /// Hash stage `i`'s external inputs (once per run; `assess` reuses them).
    fn hash_inputs(&self, i: usize) -> anyhow::Result<()> {
        let def = &self.pipeline.stages[i];
        for (role, rel) in &def.inputs {
            self.external(&def.name, role, &self.pipeline.root.join(rel))?;
        }
        Ok(())
    }

    /// Compute stage `i`'s key from its upstreams' outputs (`None` = not known yet).
    pub fn assess(
        &self,
        i: usize,
        upstream: &dyn Fn(usize) -> Option<Arc<EntryManifest>>,
    ) -> anyhow::Result<Assessed> {
        let def = &self.pipeline.stages[i];
        let mut inputs = BTreeMap::new();
        let mut input_files = BTreeMap::new();
        for (role, up) in &def.deps {
            let u = self.pipeline.position(up).expect("validated");
            match upstream(u) {
                Some(m) => {
                    inputs.insert(
                        role.clone(),
                        InputHash {
                            source: "stage".into(),
                            hash: m.outputs_hash.clone(),
                        },
                    );
                }
                None => {
                    return Ok(Assessed::Blocked(StaleReason::UpstreamStale {
                        role: role.clone(),
                        upstream: up.clone(),
                    }))
                }
            }
        }
        for (role, rel) in &def.inputs {
            let tree = self.external(&def.name, role, &self.pipeline.root.join(rel))?;
            inputs.insert(
                role.clone(),
                InputHash {
                    source: "path".into(),
                    hash: tree.hash.clone(),
                },
            );
            input_files.insert(role.clone(), tree.files.clone());
        }
        let fingerprint = Fingerprint {
            format: fingerprint::FORMAT,
            kind: def.kind.clone(),
            version: def.stage.version(),
            params: def.params.clone(),
            inputs,
        };
        let key = fingerprint.key();
        let lookup = self.cache.lookup(&key);
        let reasons = match self.lock.get(&def.name) {
            None => vec![StaleReason::NeverRun],
            Some(locked) if locked.key == key => match &lookup {
                Lookup::Hit(_) => vec![],
                Lookup::Missing => vec![StaleReason::EntryMissing],
                Lookup::Corrupt(why) => vec![StaleReason::EntryCorrupt(why.clone())],
            },
            Some(locked) => {
                // The files an external input held last time live in the old entry's manifest.
                let old_files = match self.cache.lookup(&locked.key) {
                    Lookup::Hit(m) => m.input_files,
                    _ => BTreeMap::new(),
                };
                let detail = |role: &str| {
                    let (old, new) = (old_files.get(role)?, input_files.get(role)?);
                    Some(fingerprint::describe_file_changes(old, new))
                };
                let r = fingerprint::diff(&locked.fingerprint(), &fingerprint, &detail);
                if r.is_empty() {
                    vec![StaleReason::Forced("key differs from pipeline.lock")]
                } else {
                    r
                }
            }
        };
        Ok(Assessed::Known(Box::new(Assessment {
            fingerprint,
            key,
            input_files,
            lookup,
            reasons,
        })))
    }

    /// `goemo status`: each stage fresh or stale and why, without running anything.
    pub fn status(&self) -> anyhow::Result<Vec<(String, bool, String)>> {
        let n = self.pipeline.stages.len();
        let mut known: Vec<Option<Arc<EntryManifest>>> = vec![None; n];
        let mut rows = Vec::new();
        for i in 0..n {
            let name = self.pipeline.stages[i].name.clone();
            match self.assess(i, &|u| known[u].clone())? {
                Assessed::Blocked(reason) => rows.push((name, false, reason.to_string())),
                Assessed::Known(a) => {
                    let reasons = join_reasons(&a.reasons);
                    match a.lookup {
                        Lookup::Hit(m) => {
                            known[i] = Some(Arc::new(*m));
                            if a.reasons.is_empty() {
                                rows.push((name, true, "fresh".into()));
                            } else {
                                rows.push((name, false, format!("{reasons} (in the cache: `goemo run` restores it without running)")));
                            }
                        }
                        _ => rows.push((name, false, reasons)),
                    }
                }
            }
        }
        Ok(rows)
    }

    /// `goemo run`.
    pub fn run(&self, opts: &RunOptions) -> anyhow::Result<Vec<StageResult>> {
        let p = self.pipeline;
        let n = p.stages.len();
        let (selected, forced) = self.select(opts)?;
        // Unselected ancestors of selected stages are needed too, but only from the cache.
        let needed: Vec<bool> = (0..n)
            .map(|i| (0..n).any(|s| selected[s] && p.reaches(i, s)))
            .collect();

        // Every external input hashed (and refused if it is not data) before anything runs.
        for i in (0..n).filter(|&i| needed[i]) {
            self.hash_inputs(i)?;
        }
        if !opts.dry_run {
            // Commands a killed run left running would write into what this run builds.
            self.cache.stop_leftover_commands()?;
            self.cache.clean_tmp();
            for path in crate::publish::clean_leftovers(&self.outputs_dir) {
                tracing::info!("removed {}, left by an interrupted publish", path.display());
            }
        }
        let mut state: Vec<State> = (0..n).map(|_| State::Waiting).collect();
        let mut notes: Vec<String> = vec![String::new(); n];
        let mut walls: Vec<f64> = vec![0.0; n];
        let mut drift: Vec<String> = Vec::new();
        let mut missing_upstream: Vec<String> = Vec::new();
        let jobs = opts.jobs.max(1);
        let (tx, rx) = mpsc::channel::<(usize, anyhow::Result<EntryManifest>, f64)>();
        let mut running = 0usize;

        std::thread::scope(|scope| -> anyhow::Result<()> {
            loop {
                let interrupted = INTERRUPTED.load(Ordering::Relaxed);
                // Assess every stage whose upstreams are settled; start what must run.
                for i in 0..n {
                    if !needed[i] || !matches!(state[i], State::Waiting) || interrupted {
                        continue;
                    }
                    let ups = p.upstream(i);
                    if let Some(bad) = ups
                        .iter()
                        .find(|&&u| matches!(state[u], State::Failed(_) | State::Skipped(_)))
                    {
                        state[i] = State::Skipped(format!(
                            "upstream {} did not finish",
                            p.stages[*bad].name
                        ));
                        continue;
                    }
                    if ups
                        .iter()
                        .any(|&u| matches!(state[u], State::Waiting | State::Running))
                    {
                        continue;
                    }
                    let upstream = |u: usize| match &state[u] {
                        State::Done(m, _) => Some(m.clone()),
                        _ => None,
                    };
                    let name = p.stages[i].name.clone();
                    let a = match self.assess(i, &upstream)? {
                        Assessed::Blocked(reason) => {
                            // Only in a dry run: an upstream would run first.
                            println!("{:<12} {name}: {reason}", "would run");
                            notes[i] = reason.to_string();
                            state[i] = State::Unknown;
                            continue;
                        }
                        Assessed::Known(a) => a,
                    };
                    let mut a = a;
                    let lookup = std::mem::replace(&mut a.lookup, Lookup::Missing);
                    let lock_key = self.lock.get(&name).map(|l| l.key.clone());
                    if opts.locked && lock_key.as_deref() != Some(a.key.as_str()) {
                        drift.push(format!(
                            "{name}: would have to run: {}",
                            join_reasons(&a.reasons)
                        ));
                        state[i] = State::Failed("differs from pipeline.lock".into());
                        continue;
                    }
                    let hit = match lookup {
                        Lookup::Hit(m) if opts.verify && !opts.dry_run => {
                            let bad = self.cache.verify(&m);
                            if bad.is_empty() {
                                Some(m)
                            } else {
                                tracing::warn!(
                                    "stage {name}: cache entry {} is damaged ({}); rebuilding",
                                    short(&a.key),
                                    bad.join("; ")
                                );
                                self.cache.remove(&a.key)?;
                                notes[i] = format!("rebuilt: {}", bad.join("; "));
                                None
                            }
                        }
                        Lookup::Hit(m) => Some(m),
                        Lookup::Corrupt(ref why) => {
                            if !opts.dry_run {
                                tracing::warn!(
                                    "stage {name}: cache entry {} is damaged ({why}); rebuilding",
                                    short(&a.key)
                                );
                                self.cache.remove(&a.key)?;
                            }
                            notes[i] = format!("rebuilt: {why}");
                            None
                        }
                        Lookup::Missing => None,
                    };
                    // Taken from the cache under --locked: its outputs must still be the locked ones.
                    if let (true, Some(m), None) = (opts.locked, &hit, forced[i]) {
                        drift.extend(self.cached_drift(&name, m));
                    }
                    if !selected[i] {
                        match hit {
                            Some(m) => state[i] = State::Done(Arc::new(*m), Outcome::Cached),
                            None => {
                                missing_upstream.push(name.clone());
                                state[i] = State::Failed("no cached result".into());
                            }
                        }
                        continue;
                    }
                    match (hit, forced[i]) {
                        (Some(m), None) => {
                            let outcome = if lock_key.as_deref() == Some(a.key.as_str()) {
                                Outcome::Cached
                            } else {
                                notes[i] = if a.reasons == [StaleReason::NeverRun] {
                                    // Run before, but pipeline.lock (new clone, other branch)
                                    // has no record of it: "never run" would be wrong here.
                                    "from the run-cache (pipeline.lock has no record of it)".into()
                                } else {
                                    format!("from the run-cache: {}", join_reasons(&a.reasons))
                                };
                                Outcome::Restored
                            };
                            walls[i] = 0.0;
                            if opts.dry_run {
                                println!("{:<12} {}", outcome.label(), name);
                            }
                            state[i] = State::Done(Arc::new(*m), outcome);
                        }
                        (_, force) => {
                            let why = match force {
                                Some(f) => StaleReason::Forced(f).to_string(),
                                None => join_reasons(&a.reasons),
                            };
                            if opts.dry_run {
                                println!("{:<12} {name}: {why}", "would run");
                                notes[i] = why;
                                state[i] = State::Unknown;
                                continue;
                            }
                            if running >= jobs {
                                continue;
                            }
                            tracing::info!("running {name}: {why}");
                            notes[i] = why;
                            state[i] = State::Running;
                            running += 1;
                            let tx = tx.clone();
                            let record = self.run_record(i, &state);
                            scope.spawn(move || {
                                let started = Instant::now();
                                let result = self.execute(i, *a, record);
                                let _ = tx.send((i, result, started.elapsed().as_secs_f64()));
                            });
                        }
                    }
                }
                if running == 0 {
                    break;
                }
                let (i, result, wall) = rx.recv().expect("a running stage reports back");
                running -= 1;
                walls[i] = wall;
                let name = &p.stages[i].name;
                state[i] = match result {
                    Ok(m) => {
                        if opts.locked {
                            if let Some(l) = self.lock.get(name) {
                                if l.outputs_hash != m.outputs_hash {
                                    drift.push(format!(
                                        "{name}: outputs differ from pipeline.lock ({}); this machine: {}",
                                        describe_output_drift(&l.outputs, &m.outputs),
                                        m.provenance.describe()
                                    ));
                                }
                            }
                        }
                        tracing::info!("{name} done in {wall:.2}s");
                        State::Done(Arc::new(m), Outcome::Ran)
                    }
                    Err(e) => {
                        let msg = crate::error::chain_text(&e);
                        if e.downcast_ref::<goemo_stage::Cancelled>().is_none() {
                            // Stages often name themselves already (`stage b: command failed`).
                            let own = format!("stage {name}: ");
                            let detail = msg.strip_prefix(&own).unwrap_or(&msg);
                            tracing::error!("stage {name} failed: {detail}");
                        }
                        State::Failed(msg)
                    }
                };
            }
            Ok(())
        })?;

        if !missing_upstream.is_empty() {
            let only = opts.only.clone().unwrap_or_default();
            return Err(ConfigError::new(
                &p.file,
                format!("--only {only}: upstream {} has no cached result for the current inputs", missing_upstream.join(", ")),
            )
            .hint(format!("build what it needs with `goemo run --until {only}` (which runs {only} too), or drop --only"))
            .into());
        }

        let mut results = Vec::new();
        for i in 0..n {
            let name = p.stages[i].name.clone();
            let (outcome, note) = match &state[i] {
                State::Done(m, o) => (
                    *o,
                    format!("{} {}", short(&m.key), notes[i]).trim().to_owned(),
                ),
                State::Failed(msg) => (Outcome::Failed, msg.clone()),
                State::Skipped(msg) => (Outcome::Skipped, msg.clone()),
                State::Unknown => (Outcome::WouldRun, notes[i].clone()),
                State::Waiting | State::Running => {
                    if !needed[i] || !selected[i] {
                        continue;
                    }
                    (Outcome::Skipped, "interrupted".into())
                }
            };
            if !selected[i] && outcome == Outcome::Cached {
                continue;
            }
            results.push(StageResult {
                name,
                outcome,
                wall_s: walls[i],
                note,
            });
        }

        if !opts.dry_run {
            let done: Vec<(usize, Arc<EntryManifest>)> = state
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    State::Done(m, _) => Some((i, m.clone())),
                    _ => None,
                })
                .collect();
            for (i, m) in &done {
                crate::publish::publish(&self.outputs_dir, &self.cache, &p.stages[*i], m)?;
            }
            if !opts.locked {
                self.write_lock(&done)?;
            }
            self.hasher.save();
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            print_summary(&results);
            return Err(Interrupted.into());
        }
        if !drift.is_empty() {
            print_summary(&results);
            return Err(LockDrift(drift).into());
        }
        Ok(results)
    }

    /// A drift line when a cache entry taken for `name` holds other outputs than pipeline.lock
    /// records for the same key (made elsewhere, or by a nondeterministic stage).
    fn cached_drift(&self, name: &str, m: &EntryManifest) -> Option<String> {
        let locked = self.lock.get(name)?;
        if locked.outputs_hash == m.outputs_hash {
            return None;
        }
        let made_on = if m.provenance == Default::default() {
            "unknown (an older goemo)".to_owned()
        } else {
            m.provenance.describe()
        };
        Some(format!(
            "{name}: cached outputs differ from pipeline.lock ({}); the entry was made on: {made_on}; this machine: {}",
            describe_output_drift(&locked.outputs, &m.outputs),
            crate::cache::Provenance::this_machine().describe()
        ))
    }

    /// Selected stages and, for each, why it is forced to run (if it is).
    fn select(
        &self,
        opts: &RunOptions,
    ) -> Result<(Vec<bool>, Vec<Option<&'static str>>), ConfigError> {
        let p = self.pipeline;
        let n = p.stages.len();
        let mut selected = vec![true; n];
        let mut forced: Vec<Option<&'static str>> = vec![None; n];
        if let Some(only) = &opts.only {
            if opts.from.is_some() || opts.until.is_some() {
                return Err(ConfigError::new(
                    &p.file,
                    "--only cannot be combined with --from or --until",
                ));
            }
            let s = p.require(only, "--only")?;
            selected = (0..n).map(|i| i == s).collect();
            forced[s] = opts.force.then_some("--force");
            return Ok((selected, forced));
        }
        if let Some(until) = &opts.until {
            let s = p.require(until, "--until")?;
            selected = (0..n).map(|i| p.reaches(i, s)).collect();
        }
        if let Some(from) = &opts.from {
            let s = p.require(from, "--from")?;
            for (i, forced) in forced.iter_mut().enumerate() {
                if p.reaches(s, i) {
                    *forced = Some("--from");
                }
            }
            if !selected[s] {
                return Err(ConfigError::new(
                    &p.file,
                    format!(
                        "--from {from} is not upstream of --until {}",
                        opts.until.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
        if opts.force {
            forced.iter_mut().for_each(|f| *f = Some("--force"));
        }
        Ok((selected, forced))
    }

    /// Keys, params and wall times of stage `i`'s ancestors, for reports.
    fn run_record(&self, i: usize, state: &[State]) -> RunRecord {
        let p = self.pipeline;
        let stages = (0..p.stages.len())
            .filter(|&u| u != i && p.reaches(u, i))
            .filter_map(|u| match &state[u] {
                State::Done(m, _) => Some(StageRecord {
                    name: p.stages[u].name.clone(),
                    kind: p.stages[u].kind.clone(),
                    key: m.key.clone(),
                    params: p.stages[u].params.clone(),
                    wall_s: m.wall_s,
                }),
                _ => None,
            })
            .collect();
        RunRecord { stages }
    }

    /// Run one stage into a pending entry and commit it.
    fn execute(&self, i: usize, a: Assessment, record: RunRecord) -> anyhow::Result<EntryManifest> {
        let p = self.pipeline;
        let def = &p.stages[i];
        let pending = self.cache.begin(&a.key)?;
        let mut inputs = BTreeMap::new();
        let mut upstream_volatile = BTreeMap::new();
        for (role, up) in &def.deps {
            let up_key = &record_key(&record, up).unwrap_or_default();
            let dir = self.cache.entry_dir(up_key);
            inputs.insert(role.clone(), dir.join("out"));
            upstream_volatile.insert(role.clone(), dir.join("volatile"));
        }
        for (role, rel) in &def.inputs {
            inputs.insert(role.clone(), p.root.join(rel));
        }
        let (out_dir, volatile_dir, work_dir) = (
            pending.out_dir(),
            pending.volatile_dir(),
            self.cache.work_dir(&a.key),
        );
        let ctx = StageContext {
            name: &def.name,
            params: &def.params,
            inputs: &inputs,
            upstream_volatile: &upstream_volatile,
            out_dir: &out_dir,
            volatile_dir: &volatile_dir,
            work_dir: &work_dir,
            project_dir: &p.root,
            run_record: &record,
            cancel: &INTERRUPTED,
            interactive: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let started = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| def.stage.run(&ctx)));
        let wall_s = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                anyhow::bail!("stage {} panicked: {msg}", def.name);
            }
        }
        for publish in &def.publish {
            if !pending.dir.join(&publish.from).exists() {
                anyhow::bail!(
                    "stage {}: it did not write `{}`, which pipeline.yaml publishes; fix `publish:` or the stage",
                    def.name,
                    publish.from
                );
            }
        }
        self.cache
            .commit(pending, &def.name, a.fingerprint, a.input_files, wall_s)
    }

    fn write_lock(&self, done: &[(usize, Arc<EntryManifest>)]) -> anyhow::Result<()> {
        let p = self.pipeline;
        let mut stages = Vec::new();
        for (i, def) in p.stages.iter().enumerate() {
            if let Some((_, m)) = done.iter().find(|(j, _)| *j == i) {
                stages.push(LockedStage {
                    name: def.name.clone(),
                    kind: def.kind.clone(),
                    impl_version: m.fingerprint.version,
                    key: m.key.clone(),
                    params: m.fingerprint.params.clone(),
                    inputs: m.fingerprint.inputs.clone(),
                    outputs_hash: m.outputs_hash.clone(),
                    outputs: m.outputs.clone(),
                });
            } else if let Some(old) = self.lock.get(&def.name) {
                stages.push(old.clone());
            }
        }
        LockFile {
            version: LOCK_VERSION,
            stages,
        }
        .write(&self.lock_path)
    }
}

fn record_key(record: &RunRecord, stage: &str) -> Option<String> {
    record
        .stages
        .iter()
        .find(|s| s.name == stage)
        .map(|s| s.key.clone())
}

fn describe_output_drift(
    old: &BTreeMap<String, FileDigest>,
    new: &BTreeMap<String, FileDigest>,
) -> String {
    let changes = fingerprint::describe_file_changes(old, new);
    if changes.is_empty() {
        // Only the recorded outputs_hash differs: the lock was edited, or written by hand.
        "its outputs_hash differs, though every file matches".into()
    } else {
        changes
    }
}

pub fn join_reasons(reasons: &[StaleReason]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// The closing table: stage, what happened, wall time.
pub fn print_summary(results: &[StageResult]) {
    if results.is_empty() {
        return;
    }
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<width$}  {:<9}  {:>8}  note", "stage", "result", "wall");
    for r in results {
        let wall = if r.outcome == Outcome::Ran {
            format!("{:.2}s", r.wall_s)
        } else {
            "-".into()
        };
        let note: String = r
            .note
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(110)
            .collect();
        println!(
            "{:<width$}  {:<9}  {:>8}  {}",
            r.name,
            r.outcome.label(),
            wall,
            note
        );
    }
}
