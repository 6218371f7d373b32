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
use crate::entrylock::{EntryLock, GcLock};
use crate::error::ConfigError;
pub use crate::events::{EngineEvent, Outcome, Reporter, StageResult};
pub use crate::fingerprint::short;
use crate::fingerprint::{self, Fingerprint, InputHash, StaleReason};
use crate::hashing::{ContentHasher, FileDigest, TreeDigest};
use crate::lockfile::{LockFile, LockedStage, LOCK_VERSION};
use crate::pipeline::Pipeline;
pub use crate::publish::PublishMode;
use crate::scheduler::{Scheduler, Selection, State};
use crate::shared::{Fetched, SharedCache};

/// Set by the Ctrl-C handler; stages poll it through their context.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub struct Engine<'p> {
    pub pipeline: &'p Pipeline,
    pub cache: Cache,
    pub hasher: ContentHasher,
    pub lock: LockFile,
    /// Where `run` writes the lock (pipeline.lock, or an experiment's own copy).
    pub lock_path: PathBuf,
    pub outputs_dir: PathBuf,
    pub publish_mode: PublishMode,
    /// Asked for an entry before a stage is built, and handed each entry built (see
    /// [`crate::shared`]); none by default.
    pub shared: Option<&'p dyn SharedCache>,
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

/// What `goemo run` came to: the closing table, and whether it stopped short.
pub struct RunReport {
    pub results: Vec<StageResult>,
    /// Ctrl-C or SIGTERM stopped it; what ran was discarded.
    pub interrupted: bool,
    /// Under --locked: each way the results differ from pipeline.lock.
    pub drift: Vec<String>,
    /// The stages with outputs (pipeline position, entry), in pipeline order.
    pub done: Vec<(usize, Arc<EntryManifest>)>,
}

/// A ready stage that has to run: its assessment and why.
struct ToRun {
    assessment: Box<Assessment>,
    why: String,
    /// The entry was missing when assessed: if another run commits it meanwhile, take that one
    /// (false when forced, or when the entry on disk was found damaged).
    take_if_built_meanwhile: bool,
}

/// A stage's cache entry, as a run may use it.
enum Entry {
    Usable(Arc<EntryManifest>),
    Missing,
    Damaged,
}

/// What running a stage came to: built here, built by another run while this one waited, or
/// pulled from the shared cache (after waiting that long for another worker).
enum Built {
    Here(EntryManifest),
    Elsewhere(EntryManifest, f64),
    Pulled(EntryManifest, f64),
}

/// One `goemo run` in progress: the engine, its options, the slots, and what it found.
struct Run<'a, 'p> {
    engine: &'a Engine<'p>,
    opts: &'a RunOptions,
    reporter: &'a dyn Reporter,
    sched: Scheduler<'a>,
    drift: Vec<String>,
    missing_upstream: Vec<String>,
}

type Finished = (usize, anyhow::Result<Built>, f64);

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
            publish_mode: PublishMode::Copy,
            shared: None,
            externals: Mutex::default(),
        })
    }

    /// An engine for an experiment: stale reasons are still against pipeline.lock, but the run
    /// writes its lock and published files into `dir` (hard links into the cache), never
    /// pipeline.lock or outputs/.
    pub fn for_experiment(pipeline: &'p Pipeline, dir: &Path) -> anyhow::Result<Self> {
        let mut engine = Engine::new(pipeline, true)?;
        engine.lock_path = dir.join(crate::reserved::EXPERIMENT_LOCK);
        engine.outputs_dir = dir.join("outputs");
        engine.publish_mode = PublishMode::Link;
        Ok(engine)
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
            version: def.stage.version_for(&def.params),
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

    /// Every stage's assessment in pipeline order, each cached upstream's outputs giving its
    /// downstream keys: what `status` and `missing_entries` read.
    fn assess_all(&self) -> anyhow::Result<Vec<Assessed>> {
        let n = self.pipeline.stages.len();
        let mut known: Vec<Option<Arc<EntryManifest>>> = vec![None; n];
        let mut all = Vec::with_capacity(n);
        for i in 0..n {
            let a = self.assess(i, &|u| known[u].clone())?;
            if let Assessed::Known(a) = &a {
                if let Lookup::Hit(m) = &a.lookup {
                    known[i] = Some(Arc::new((**m).clone()));
                }
            }
            all.push(a);
        }
        Ok(all)
    }

    /// `goemo status`: each stage fresh or stale and why, without running anything.
    pub fn status(&self) -> anyhow::Result<Vec<(String, bool, String)>> {
        let mut rows = Vec::new();
        for (def, assessed) in self.pipeline.stages.iter().zip(self.assess_all()?) {
            let name = def.name.clone();
            match assessed {
                Assessed::Blocked(reason) => rows.push((name, false, reason.to_string())),
                Assessed::Known(a) => {
                    let reasons = join_reasons(&a.reasons);
                    match a.lookup {
                        Lookup::Hit(_) if a.reasons.is_empty() => {
                            rows.push((name, true, "fresh".into()))
                        }
                        Lookup::Hit(_) => rows.push((
                            name,
                            false,
                            format!(
                                "{reasons} (in the cache: `goemo run` restores it without running)"
                            ),
                        )),
                        _ => rows.push((name, false, reasons)),
                    }
                }
            }
        }
        Ok(rows)
    }

    /// Stages whose key is known (every upstream's outputs are) but whose entry is not usable
    /// here: what a remote cache could supply before the run. Stages below one of them are not
    /// listed, since their keys depend on its outputs; calling again after fetching some finds
    /// the next layer.
    pub fn missing_entries(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut missing = Vec::new();
        for (def, assessed) in self.pipeline.stages.iter().zip(self.assess_all()?) {
            if let Assessed::Known(a) = assessed {
                if !matches!(a.lookup, Lookup::Hit(_)) {
                    missing.push((def.name.clone(), a.key));
                }
            }
        }
        Ok(missing)
    }

    /// `goemo run`: plan, run what must run (up to `jobs` at once), publish, write the lock.
    pub fn run(&self, opts: &RunOptions, reporter: &dyn Reporter) -> anyhow::Result<RunReport> {
        let p = self.pipeline;
        let selection = self.select(opts)?;
        let mut run = Run {
            engine: self,
            opts,
            reporter,
            sched: Scheduler::new(p.graph(), selection),
            drift: Vec::new(),
            missing_upstream: Vec::new(),
        };
        // Every external input hashed (and refused if it is not data) before anything runs.
        for i in (0..p.stages.len()).filter(|&i| run.sched.slots[i].needed) {
            self.hash_inputs(i)?;
        }
        // Shared with other runs; `goemo gc` waits for it.
        let _gc_guard = if opts.dry_run {
            None
        } else {
            Some(GcLock::for_run(&self.cache.root, &|| {
                reporter.event(EngineEvent::WaitingForGc)
            })?)
        };
        if !opts.dry_run {
            // Commands a killed run left running would write into what this run builds.
            self.cache.stop_leftover_commands()?;
            self.cache.clean_tmp();
            for path in crate::publish::clean_leftovers(&self.outputs_dir) {
                reporter.event(EngineEvent::LeftoverRemoved { path: &path });
            }
        }
        std::thread::scope(|scope| run.drive(scope))?;
        if !run.missing_upstream.is_empty() {
            let only = opts.only.clone().unwrap_or_default();
            return Err(ConfigError::new(
                &p.file,
                format!("--only {only}: upstream {} has no cached result for the current inputs", run.missing_upstream.join(", ")),
            )
            .hint(format!("build what it needs with `goemo run --until {only}` (which runs {only} too), or drop --only"))
            .into());
        }
        let results = run.sched.results(&|i| p.stages[i].name.clone());
        let done = run.sched.done();
        if !opts.dry_run {
            for (i, m) in &done {
                crate::publish::publish(
                    &self.outputs_dir,
                    &self.cache,
                    &p.stages[*i],
                    m,
                    self.publish_mode,
                )?;
            }
            if !opts.locked {
                self.write_lock(&done)?;
            }
            self.hasher.save();
        }
        Ok(RunReport {
            results,
            interrupted: INTERRUPTED.load(Ordering::Relaxed),
            drift: run.drift,
            done,
        })
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
    fn select(&self, opts: &RunOptions) -> Result<Selection, ConfigError> {
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
            return Ok(Selection { selected, forced });
        }
        if let Some(until) = &opts.until {
            let s = p.require(until, "--until")?;
            selected = p.graph().ancestors([s]);
        }
        if let Some(from) = &opts.from {
            let s = p.require(from, "--from")?;
            let downstream = p.graph().descendants([s]);
            for (f, _) in forced.iter_mut().zip(downstream).filter(|(_, d)| *d) {
                *f = Some("--from");
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
        Ok(Selection { selected, forced })
    }

    /// Keys, params and wall times of stage `i`'s ancestors, for reports.
    fn run_record(&self, i: usize, sched: &Scheduler<'_>) -> RunRecord {
        let p = self.pipeline;
        let stages = p
            .graph()
            .ancestors([i])
            .into_iter()
            .enumerate()
            .filter(|&(u, ancestor)| ancestor && u != i)
            .filter_map(|(u, _)| {
                let m = sched.manifest(u)?;
                Some(StageRecord {
                    name: p.stages[u].name.clone(),
                    kind: p.stages[u].kind.clone(),
                    key: m.key.clone(),
                    params: p.stages[u].params.clone(),
                    wall_s: m.wall_s,
                })
            })
            .collect();
        RunRecord { stages }
    }

    /// Build stage `i`'s entry under its build lock: when another run committed the same key
    /// while this one waited for the lock, take that entry instead of building it again.
    fn build(
        &self,
        i: usize,
        a: Assessment,
        record: RunRecord,
        take_if_built_meanwhile: bool,
    ) -> anyhow::Result<Built> {
        let started = Instant::now();
        let _held = EntryLock::acquire(&self.cache.root, &a.key, &|| {})?;
        let name = self.pipeline.stages[i].name.as_str();
        if !take_if_built_meanwhile {
            // Forced, or the local entry is damaged: build it here, and share the result.
            let m = self.execute(i, a, record)?;
            if let Some(shared) = self.shared {
                shared.built(name, &m.key, &self.cache);
            }
            return Ok(Built::Here(m));
        }
        if let Lookup::Hit(m) = self.cache.lookup(&a.key) {
            return Ok(Built::Elsewhere(*m, started.elapsed().as_secs_f64()));
        }
        let Some(shared) = self.shared else {
            return self.execute(i, a, record).map(Built::Here);
        };
        let claim = match shared.fetch(name, &a.key, &self.cache, &INTERRUPTED) {
            Fetched::Pulled { waited_s } => match self.cache.lookup(&a.key) {
                Lookup::Hit(m) => return Ok(Built::Pulled(*m, waited_s)),
                _ => None,
            },
            Fetched::Build { claim } => claim,
        };
        let m = self.execute(i, a, record)?;
        shared.built(name, &m.key, &self.cache);
        drop(claim);
        Ok(Built::Here(m))
    }

    /// An upstream stage a run needs but does not select (`--from`, `--only`), missing here:
    /// pulled from the shared cache when it has it.
    fn fetch_unselected(&self, i: usize, key: &str) -> anyhow::Result<Option<EntryManifest>> {
        let Some(shared) = self.shared else {
            return Ok(None);
        };
        let _held = EntryLock::acquire(&self.cache.root, key, &|| {})?;
        if let Lookup::Hit(m) = self.cache.lookup(key) {
            return Ok(Some(*m));
        }
        let name = self.pipeline.stages[i].name.as_str();
        match shared.fetch(name, key, &self.cache, &INTERRUPTED) {
            // Not built here: the claim (if any) is dropped at once, so others do not wait.
            Fetched::Build { .. } => Ok(None),
            Fetched::Pulled { .. } => match self.cache.lookup(key) {
                Lookup::Hit(m) => Ok(Some(*m)),
                _ => Ok(None),
            },
        }
    }

    /// Run one stage into a pending entry and commit it (the caller holds its build lock).
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
        let mut by_stage: Vec<Option<&EntryManifest>> = vec![None; p.stages.len()];
        for (i, m) in done {
            by_stage[*i] = Some(m);
        }
        let mut stages = Vec::new();
        for (def, done) in p.stages.iter().zip(by_stage) {
            if let Some(m) = done {
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

impl<'a, 'p> Run<'a, 'p> {
    /// Passes over the ready stages, starting what must run, until nothing runs.
    fn drive<'s>(&mut self, scope: &'s std::thread::Scope<'s, '_>) -> anyhow::Result<()>
    where
        'a: 's,
    {
        let engine = self.engine;
        let jobs = self.opts.jobs.max(1);
        let (tx, rx) = mpsc::channel::<Finished>();
        loop {
            let mut cursor = None;
            while let Some(i) = self.sched.next_ready(cursor) {
                if INTERRUPTED.load(Ordering::Relaxed) {
                    break;
                }
                cursor = Some(i);
                let Some(next) = self.consider(i)? else {
                    continue;
                };
                if self.sched.running >= jobs {
                    continue;
                }
                let name = &engine.pipeline.stages[i].name;
                self.reporter.event(EngineEvent::Started {
                    stage: name,
                    why: &next.why,
                });
                let record = engine.run_record(i, &self.sched);
                self.sched.start(i, next.why);
                let tx = tx.clone();
                let take = next.take_if_built_meanwhile;
                // A stage's own log lines carry the caller's span (an experiment's name).
                let span = tracing::Span::current();
                scope.spawn(move || {
                    let _in_span = span.enter();
                    let started = Instant::now();
                    let result = engine.build(i, *next.assessment, record, take);
                    let _ = tx.send((i, result, started.elapsed().as_secs_f64()));
                });
            }
            if self.sched.running == 0 {
                return Ok(());
            }
            let finished = rx.recv().context("a running stage reports back")?;
            self.finished(finished);
        }
    }

    /// Settle ready stage `i` if it can be (skipped, cached, restored, planned), or say why it
    /// must run.
    fn consider(&mut self, i: usize) -> anyhow::Result<Option<ToRun>> {
        let (engine, opts) = (self.engine, self.opts);
        let p = engine.pipeline;
        let name = p.stages[i].name.as_str();
        if let Some(bad) = self.sched.failed_upstream(i) {
            let why = format!("upstream {} did not finish", p.stages[bad].name);
            self.sched.settle(i, State::Skipped(why));
            return Ok(None);
        }
        let mut a = match engine.assess(i, &|u| self.sched.manifest(u))? {
            Assessed::Blocked(reason) => {
                // Only in a dry run: an upstream would run first.
                let why = reason.to_string();
                self.plan(name, Outcome::WouldRun, Some(&why));
                self.sched.slots[i].note = why;
                self.sched.settle(i, State::Unknown);
                return Ok(None);
            }
            Assessed::Known(a) => a,
        };
        let lock_key = engine.lock.get(name).map(|l| l.key.as_str());
        if opts.locked && lock_key != Some(a.key.as_str()) {
            let mut line = format!("{name}: would have to run: {}", join_reasons(&a.reasons));
            for reason in &a.reasons {
                if let StaleReason::ParamChanged { param, .. } = reason {
                    if let Some(note) = p.stages[i].stage.param_note(param) {
                        line.push_str(&format!("\n    {note}"));
                    }
                }
            }
            self.drift.push(line);
            self.sched
                .settle(i, State::Failed("differs from pipeline.lock".into()));
            return Ok(None);
        }
        let (hit, damaged) = match self.usable_hit(i, &mut a) {
            Entry::Usable(m) => (Some(m), false),
            Entry::Missing => (None, false),
            Entry::Damaged => (None, true),
        };
        let slot = &self.sched.slots[i];
        // Taken from the cache under --locked: its outputs must still be the locked ones.
        if let (true, Some(m), None) = (opts.locked, &hit, slot.forced) {
            self.drift.extend(engine.cached_drift(name, m));
        }
        if !slot.selected {
            let pulled = match (&hit, opts.dry_run) {
                (None, false) => engine.fetch_unselected(i, &a.key)?.map(Arc::new),
                _ => None,
            };
            if let Some(m) = pulled {
                if opts.locked {
                    self.drift.extend(engine.cached_drift(name, &m));
                }
                self.sched.slots[i].note = "pulled from the shared cache".into();
                self.sched.settle(i, State::Done(m, Outcome::Pulled));
                return Ok(None);
            }
            match hit {
                Some(m) => self.sched.settle(i, State::Done(m, Outcome::Cached)),
                None => {
                    self.missing_upstream.push(name.to_owned());
                    self.sched
                        .settle(i, State::Failed("no cached result".into()));
                }
            }
            return Ok(None);
        }
        match (hit, slot.forced) {
            (Some(m), None) => {
                let same_key = lock_key == Some(a.key.as_str());
                self.take_cached(i, m, same_key, &a.reasons);
                Ok(None)
            }
            (_, force) => {
                let why = match force {
                    Some(f) => StaleReason::Forced(f).to_string(),
                    None => join_reasons(&a.reasons),
                };
                if !opts.dry_run {
                    let take_if_built_meanwhile = force.is_none() && !damaged;
                    return Ok(Some(ToRun {
                        assessment: a,
                        why,
                        take_if_built_meanwhile,
                    }));
                }
                self.plan(name, Outcome::WouldRun, Some(&why));
                self.sched.slots[i].note = why;
                self.sched.settle(i, State::Unknown);
                Ok(None)
            }
        }
    }

    /// The cache entry for `a`'s key when it can be used as it is. A damaged one (or, with
    /// --verify, one whose files differ from its manifest) is reported; the rebuilt entry
    /// replaces it.
    fn usable_hit(&mut self, i: usize, a: &mut Assessment) -> Entry {
        let (engine, opts) = (self.engine, self.opts);
        let name = engine.pipeline.stages[i].name.as_str();
        let damaged = match std::mem::replace(&mut a.lookup, Lookup::Missing) {
            Lookup::Missing => return Entry::Missing,
            Lookup::Hit(m) if opts.verify && !opts.dry_run => {
                let bad = engine.cache.verify(&m);
                if bad.is_empty() {
                    return Entry::Usable(Arc::new(*m));
                }
                bad.join("; ")
            }
            Lookup::Hit(m) => return Entry::Usable(Arc::new(*m)),
            Lookup::Corrupt(why) => why,
        };
        if !opts.dry_run {
            // Replaced when the rebuilt entry commits, under the key's build lock.
            self.reporter.event(EngineEvent::EntryDamaged {
                stage: name,
                key: short(&a.key),
                why: &damaged,
            });
        }
        self.sched.slots[i].note = format!("rebuilt: {damaged}");
        Entry::Damaged
    }

    /// A selected stage taken from the cache: the lock's own key, or a run-cache restore.
    fn take_cached(
        &mut self,
        i: usize,
        m: Arc<EntryManifest>,
        same_key: bool,
        reasons: &[StaleReason],
    ) {
        let outcome = if same_key {
            Outcome::Cached
        } else {
            self.sched.slots[i].note = if reasons == [StaleReason::NeverRun] {
                // Run before, but pipeline.lock (new clone, other branch) has no record of
                // it: "never run" would be wrong here.
                "from the run-cache (pipeline.lock has no record of it)".into()
            } else {
                format!("from the run-cache: {}", join_reasons(reasons))
            };
            Outcome::Restored
        };
        self.sched.slots[i].wall_s = 0.0;
        let name = self.engine.pipeline.stages[i].name.as_str();
        self.plan(name, outcome, None);
        self.sched.settle(i, State::Done(m, outcome));
    }

    fn plan(&self, stage: &str, outcome: Outcome, why: Option<&str>) {
        if self.opts.dry_run {
            self.reporter.event(EngineEvent::Planned {
                stage,
                outcome,
                why,
            });
        }
    }

    /// A stage reported back: committed (and, under --locked, checked) or failed.
    fn finished(&mut self, (i, result, wall_s): Finished) {
        let engine = self.engine;
        let name = engine.pipeline.stages[i].name.as_str();
        self.sched.slots[i].wall_s = wall_s;
        let state = match result {
            Ok(Built::Elsewhere(m, waited_s)) => {
                self.sched.slots[i].note =
                    format!("built meanwhile by another run (waited {waited_s:.1}s)");
                self.reporter.event(EngineEvent::BuiltElsewhere {
                    stage: name,
                    waited_s,
                });
                if self.opts.locked {
                    self.drift.extend(engine.cached_drift(name, &m));
                }
                State::Done(Arc::new(m), Outcome::Restored)
            }
            Ok(Built::Pulled(m, waited_s)) => {
                self.sched.slots[i].note = if waited_s > 0.0 {
                    format!("pulled from the shared cache, built by another worker (waited {waited_s:.1}s)")
                } else {
                    "pulled from the shared cache".into()
                };
                self.reporter.event(EngineEvent::Pulled {
                    stage: name,
                    waited_s,
                });
                // Made on another machine: under --locked its outputs must be the locked ones,
                // and a difference names where it was made.
                if self.opts.locked {
                    self.drift.extend(engine.cached_drift(name, &m));
                }
                State::Done(Arc::new(m), Outcome::Pulled)
            }
            Ok(Built::Here(m)) => {
                if let (true, Some(l)) = (self.opts.locked, engine.lock.get(name)) {
                    if l.outputs_hash != m.outputs_hash {
                        self.drift.push(format!(
                            "{name}: outputs differ from pipeline.lock ({}); this machine: {}",
                            describe_output_drift(&l.outputs, &m.outputs),
                            m.provenance.describe()
                        ));
                    }
                }
                self.reporter.event(EngineEvent::Finished {
                    stage: name,
                    wall_s,
                });
                State::Done(Arc::new(m), Outcome::Ran)
            }
            Err(e) => {
                let msg = crate::error::chain_text(&e);
                if e.downcast_ref::<goemo_stage::Cancelled>().is_none() {
                    // Stages often name themselves already (`stage b: command failed`).
                    let own = format!("stage {name}: ");
                    let detail = msg.strip_prefix(&own).unwrap_or(&msg);
                    self.reporter.event(EngineEvent::Failed {
                        stage: name,
                        detail,
                    });
                }
                State::Failed(msg)
            }
        };
        self.sched.settle(i, state);
    }
}
