//! The command line's shape: clap's derive types, their help and examples.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "goemo",
    version,
    about = "Declarative pipeline runner with content-hashed, cached stages, for multi-label emotion classification on GoEmotions",
    after_help = "Examples:\n  goemo run                       run what is stale, reuse the rest\n  goemo status                    what is stale, and why\n  goemo run --from evaluate       re-run evaluate and everything after it\n  goemo dag --format mermaid      the pipeline for a Mermaid viewer\n  goemo predict \"I love this\"     classify text with outputs/model\n\nExit codes: 0 ok, 1 a stage or the run failed, 2 bad pipeline.yaml, pipeline.lock or arguments,\n3 --locked found drift from pipeline.lock, 130 interrupted (Ctrl-C,
or SIGTERM/SIGHUP as Kubernetes, Slurm and systemd send them)."
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args)]
pub struct PipelineArg {
    /// The pipeline file; its folder is the project root (cache/, outputs/, pipeline.lock).
    #[arg(
        long,
        short = 'p',
        default_value = "pipeline.yaml",
        env = "GOEMO_PIPELINE"
    )]
    pub pipeline: PathBuf,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the stages that are stale; take the rest from the cache.
    #[command(
        after_help = "Examples:\n  goemo run\n  goemo run --from evaluate         re-run evaluate and all downstream, even if cached\n  goemo run --until tokenize        stop after tokenize\n  goemo run --only plot             run plot alone (its upstream must be cached)\n  goemo run --set train.lr=3e-5 --set train.epochs=2\n  goemo run --dry-run               say what would run and why; change nothing\n  goemo run --locked                CI: fail if results differ from pipeline.lock"
    )]
    Run(RunArgs),
    /// Each stage fresh or stale, and why.
    #[command(
        after_help = "Example output:\n  load      fresh\n  train     stale: param lr changed 5e-5 → 3e-5\n  evaluate  stale: input train will change (train is stale)"
    )]
    Status(StatusArgs),
    /// Draw the pipeline's stages and edges.
    #[command(
        after_help = "Examples:\n  goemo dag\n  goemo dag --format dot | dot -Tpng > dag.png\n  goemo dag --format mermaid"
    )]
    Dag(DagArgs),
    /// Experiments and sweeps that never touch the baseline; compare, apply, remove them.
    #[command(subcommand)]
    Exp(ExpCommand),
    /// Charts that compare runs (experiments, or `baseline`).
    #[command(subcommand)]
    Plots(PlotsCommand),
    /// Remove cache entries that neither pipeline.lock nor any experiment references.
    #[command(after_help = "Example:\n  goemo gc --dry-run\n  goemo gc")]
    Gc(GcArgs),
    /// Classify texts with a fine-tuned model (default: outputs/model) and its thresholds.
    #[command(
        after_help = "Examples:\n  goemo predict \"I love this so much\" \"what a mess\"\n  goemo predict --file comments.txt          one text a line\n  goemo predict --file comments.jsonl        JSON lines with a `text` field\n  echo \"thanks!\" | goemo predict --top-k 3\n\nPrints one JSON line per text: {\"text\": …, \"labels\": [{\"label\": …, \"score\": …}]}"
    )]
    Predict(PredictArgs),
    /// Put GoEmotions into data/goemotions: copied from a local mirror or downloaded, sha256-checked.
    #[command(
        after_help = "Examples:\n  goemo fetch-data --mirror ../shared/goemotions\n  goemo fetch-data            download from the official URLs (needs internet and curl)"
    )]
    FetchData(FetchDataArgs),
    /// List the stage kinds pipeline.yaml can use.
    Kinds,
    /// Upload the cache entries pipeline.lock references (or the named stages') to the remote.
    #[command(after_help = REMOTE_HELP)]
    Push(RemoteArgs),
    /// Download the cache entries pipeline.lock references (or the named stages'), verified.
    #[command(after_help = REMOTE_HELP)]
    Pull(RemoteArgs),
}

const REMOTE_HELP: &str = "Examples:\n  GOEMO_REMOTE=s3://my-bucket/goemo goemo push        every entry pipeline.lock references\n  goemo pull train tokenize                             those stages' locked entries\n  goemo pull --remote file:///mnt/shared/goemo-cache\n\nThe remote: --remote, else GOEMO_REMOTE, else `remote: URL` in goemo.yaml beside pipeline.yaml.\nS3 credentials, region and endpoint come from the AWS environment only (AWS_ACCESS_KEY_ID,\nAWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL for MinIO/Ceph/R2).\nExit codes: 0 ok, 1 an entry failed or was missing, 2 a bad remote URL or stage name.";

#[derive(clap::Args)]
pub struct RemoteArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Stages whose locked entries to move [default: every entry pipeline.lock references].
    pub stages: Vec<String>,
    /// The remote: s3://BUCKET/PREFIX or file:///ABSOLUTE/FOLDER [default: GOEMO_REMOTE, else
    /// `remote:` in goemo.yaml].
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Files to transfer at once.
    #[arg(long, short = 'j', default_value_t = 8)]
    pub jobs: usize,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Re-run this stage and everything downstream of it, even when cached.
    #[arg(long, value_name = "STAGE")]
    pub from: Option<String>,
    /// Stop after this stage (run only it and its upstream).
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Run this one stage; its upstream must already be cached.
    #[arg(long, value_name = "STAGE")]
    pub only: Option<String>,
    /// Run the selected stages even when cached.
    #[arg(long)]
    pub force: bool,
    /// Print what would run and why; write nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Override a param for this run: STAGE.PARAM=VALUE (VALUE is YAML). Repeatable.
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub set: Vec<String>,
    /// Stages to run at once when their upstreams are done [default: CPU count].
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Re-hash cached outputs (and inputs) and rebuild any entry that differs.
    #[arg(long)]
    pub verify: bool,
    /// CI mode: fail (exit 3) if any stage's key or outputs differ from pipeline.lock.
    #[arg(long)]
    pub locked: bool,
    /// Fail at once if another goemo run holds the project, instead of waiting.
    #[arg(long)]
    pub no_wait: bool,
    /// The shared cache (GOEMO_REMOTE, or `remote:` in goemo.yaml): `read` pulls a stage's
    /// entry, verified, instead of building it when the remote has it; `read-write` also claims
    /// each key it must build with a lease (other workers wait for it) and pushes what it built
    /// [default: read when a remote is configured, else off].
    #[arg(long, value_enum, value_name = "MODE")]
    pub remote: Option<RemoteMode>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RemoteMode {
    Off,
    Read,
    ReadWrite,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Apply overrides, to see what a `run --set` would re-run.
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub set: Vec<String>,
}

#[derive(clap::Args)]
pub struct DagArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    #[arg(long, value_enum, default_value_t = DagFormat::Text)]
    pub format: DagFormat,
}

#[derive(clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Only report what would be removed.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// Texts to classify; none (and no --file) reads stdin.
    pub texts: Vec<String>,
    /// Read texts from a file: one a line, or JSON lines with a `text` field.
    #[arg(long, short = 'f', value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "outputs/model")]
    pub model: PathBuf,
    /// thresholds.json [default: in or beside the model folder].
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// One threshold for every label, instead of thresholds.json.
    #[arg(long, conflicts_with = "top_k")]
    pub threshold: Option<f32>,
    /// The K best labels whatever their score.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// The encoder's arithmetic: f32, or int8 (faster; scores within quantization error)
    /// [default: the one thresholds.json was tuned with, else f32].
    #[arg(long, value_parser = ["f32", "int8"])]
    pub precision: Option<String>,
    /// Print throughput to stderr.
    #[arg(long)]
    pub stats: bool,
}

#[derive(clap::Args)]
pub struct FetchDataArgs {
    /// A folder holding train.tsv, dev.tsv, test.tsv and labels.txt.
    #[arg(long, env = "GOEMO_DATA_MIRROR")]
    pub mirror: Option<PathBuf>,
    #[arg(long, default_value = "data/goemotions")]
    pub dest: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

#[derive(Subcommand)]
pub enum ExpCommand {
    /// Run the pipeline with overrides (one experiment, or a sweep's members) into
    /// experiments/NAME/; pipeline.lock and outputs/ are not touched.
    #[command(
        after_help = "Examples:\n  goemo exp run --set train.lr=3e-5                      one experiment\n  goemo exp run --name lr --set train.lr=3e-5,1e-4,3e-4   a grid: lr-1, lr-2, lr-3\n  goemo exp run --set train.lr=1e-4,3e-4 --set train.pos_weight=none,auto --jobs 2\n  goemo exp run --set train.pos_weight=[1,2,3],auto        brackets keep a list one value\n  goemo exp run --random 8 --seed 1 --set train.lr=log(1e-5,1e-3) --set train.epochs=int(2,4)\n  goemo exp run --sweep sweeps/lr.yaml                    the same, declared in a file\n\nUpstream stages that members share run once. Rerunning the same command resumes a killed\nsweep: finished stages come from the cache, a killed train from its checkpoint."
    )]
    Run(ExpRunArgs),
    /// One row per experiment: the params that differ, and the metrics; the best on dev marked.
    #[command(
        after_help = "Examples:\n  goemo exp show\n  goemo exp show --sort evaluate.test_macro_f1_tuned --sweep lr\n  goemo exp show --filter train.pos_weight=auto --md\n  goemo exp show --json | jq '.[0]'"
    )]
    Show(ExpShowArgs),
    /// Params and metrics of two runs side by side, with deltas (B − A).
    #[command(
        after_help = "Examples:\n  goemo exp diff lr-2              lr-2 against the baseline\n  goemo exp diff lr-1 lr-2         lr-2 against lr-1"
    )]
    Diff(ExpDiffArgs),
    /// Make an experiment the baseline: its params into pipeline.yaml, its lock, its outputs.
    Apply(ExpApplyArgs),
    /// Remove experiments (their records and outputs; cache entries go at the next `goemo gc`).
    Remove(ExpRemoveArgs),
    /// Upload experiments' records and cache entries to the shared cache (default: all here).
    Push(ExpSyncArgs),
    /// Download the records of experiments run elsewhere (default: all on the remote), so
    /// `exp show` lists them; their entries come with `goemo pull` or `run --remote`.
    Pull(ExpSyncArgs),
}

#[derive(clap::Args)]
pub struct ExpSyncArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Experiment names.
    pub names: Vec<String>,
}

#[derive(clap::Args)]
pub struct ExpRunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// STAGE.PARAM=VALUE, or VALUE,VALUE,… for a grid, or range(A,B) / log(A,B) / int(A,B)
    /// with --random. Repeatable.
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUES")]
    pub set: Vec<String>,
    /// The experiment's name (a sweep's members are NAME-1, NAME-2, …) [default: from a hash of
    /// the overrides, so the same command finds the same experiments].
    #[arg(long)]
    pub name: Option<String>,
    /// A YAML file with a `sweep:` block (see `goemo exp run --help`); --set flags add to it.
    #[arg(long, value_name = "FILE")]
    pub sweep: Option<PathBuf>,
    /// Sample N members instead of the grid.
    #[arg(long, value_name = "N")]
    pub random: Option<usize>,
    /// The seed of --random's draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Members to run at once (their stages share one thread pool) [default: CPU count].
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Check every member's params and print the members; run nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Run only members I, I+N, I+2N, … (0-based) of the sweep: one worker of N (a Slurm array
    /// task, a Kubernetes Indexed Job pod) [default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT
    /// when Slurm sets them, else every member].
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// The shared cache, as for `goemo run`: `read` pulls an entry a member would build;
    /// `read-write` also claims each key with a lease (workers elsewhere wait for it instead of
    /// building it too), pushes entries as they are built, and pushes each member's record, so
    /// `goemo exp pull` + `exp show` on any machine lists them [default: read when a remote is
    /// configured, else off].
    #[arg(long, value_enum, value_name = "MODE")]
    pub remote: Option<RemoteMode>,
}

#[derive(clap::Args)]
pub struct ExpShowArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Sort by this column (a metric, a param, `name` or `wall`); metrics sort best first.
    #[arg(long)]
    pub sort: Option<String>,
    /// Ascending instead.
    #[arg(long)]
    pub asc: bool,
    /// Only the members of this sweep.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Only rows whose param or status has this value: `train.lr=3e-5`, `status=failed`.
    #[arg(long, value_name = "COLUMN=VALUE")]
    pub filter: Vec<String>,
    /// The metric that picks the best experiment: a dev metric, never a test one.
    #[arg(long, default_value = "thresholds.dev_macro_f1")]
    pub best_by: String,
    /// Every metric the stages report, not the default columns.
    #[arg(long)]
    pub all_metrics: bool,
    /// Leave out the baseline row (pipeline.lock).
    #[arg(long)]
    pub no_baseline: bool,
    /// One row per setting: rows that differ only in this param (e.g. `train.seed`) become one,
    /// each metric shown as mean ± sample std over them, with their count `n`. A param an
    /// experiment did not set counts as pipeline.yaml's value. Repeatable.
    #[arg(long, value_name = "STAGE.PARAM")]
    pub mean_over: Vec<String>,
    /// Choose a best row per value of this param, not one over all rows: dev scores measured on
    /// different data do not compare. Repeatable. [default: every param of the pipeline's
    /// `load` and `sample` stages, e.g. load.taxonomy]
    #[arg(long, value_name = "STAGE.PARAM")]
    pub best_within: Vec<String>,
    /// JSON: one object per row, every param and metric.
    #[arg(long, conflicts_with_all = ["csv", "md"])]
    pub json: bool,
    #[arg(long, conflicts_with = "md")]
    pub csv: bool,
    /// A Markdown table (for a README or a pull request).
    #[arg(long)]
    pub md: bool,
}

#[derive(clap::Args)]
pub struct ExpDiffArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// With B: the run compared against (`baseline` is pipeline.lock); alone: the experiment
    /// compared against the baseline.
    pub a: String,
    /// The other run; deltas are B − A.
    pub b: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ExpApplyArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    pub name: String,
}

#[derive(clap::Args)]
pub struct ExpRemoveArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Experiment names.
    pub names: Vec<String>,
    /// Every member of this sweep.
    #[arg(long)]
    pub sweep: Option<String>,
}

#[derive(Subcommand)]
pub enum PlotsCommand {
    /// Per-label F1 of several runs in one chart, and their training curves overlaid (PNG, SVG).
    #[command(after_help = "Example:\n  goemo plots diff baseline lr-1 lr-2 --out plots/")]
    Diff(PlotsDiffArgs),
}

#[derive(clap::Args)]
pub struct PlotsDiffArgs {
    #[command(flatten)]
    pub pipeline: PipelineArg,
    /// Experiment names, or `baseline`.
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<String>,
    /// The folder to write into [default: experiments/_compare].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The threshold policy of the F1 bars: tuned, 0.5 or 0.3.
    #[arg(long, default_value = "tuned")]
    pub policy: String,
}
