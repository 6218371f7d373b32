//! The `goemo` command line.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use goemo_engine::engine::{print_summary, Engine, Outcome, RunOptions, INTERRUPTED};
use goemo_engine::error::{ConfigError, Interrupted, LockDrift};
use goemo_engine::pipeline::{self, Override};

#[derive(Parser)]
#[command(
    name = "goemo",
    version,
    about = "Declarative pipeline runner with content-hashed, cached stages, for multi-label emotion classification on GoEmotions",
    after_help = "Examples:\n  goemo run                       run what is stale, reuse the rest\n  goemo status                    what is stale, and why\n  goemo run --from evaluate       re-run evaluate and everything after it\n  goemo dag --format mermaid      the pipeline for a Mermaid viewer\n  goemo predict \"I love this\"     classify text with outputs/model\n\nExit codes: 0 ok, 1 a stage or the run failed, 2 bad pipeline.yaml, pipeline.lock or arguments,\n3 --locked found drift from pipeline.lock, 130 interrupted."
)]
struct Cli {
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct PipelineArg {
    /// The pipeline file; its folder is the project root (cache/, outputs/, pipeline.lock).
    #[arg(
        long,
        short = 'p',
        default_value = "pipeline.yaml",
        env = "GOEMO_PIPELINE"
    )]
    pipeline: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stages that are stale; take the rest from the cache.
    #[command(
        after_help = "Examples:\n  goemo run\n  goemo run --from evaluate         re-run evaluate and all downstream, even if cached\n  goemo run --until tokenize        stop after tokenize\n  goemo run --only plot             run plot alone (its upstream must be cached)\n  goemo run --set train.lr=3e-5 --set train.epochs=2\n  goemo run --dry-run               say what would run and why; change nothing\n  goemo run --locked                CI: fail if results differ from pipeline.lock"
    )]
    Run {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Re-run this stage and everything downstream of it, even when cached.
        #[arg(long, value_name = "STAGE")]
        from: Option<String>,
        /// Stop after this stage (run only it and its upstream).
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        /// Run this one stage; its upstream must already be cached.
        #[arg(long, value_name = "STAGE")]
        only: Option<String>,
        /// Run the selected stages even when cached.
        #[arg(long)]
        force: bool,
        /// Print what would run and why; write nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Override a param for this run: STAGE.PARAM=VALUE (VALUE is YAML). Repeatable.
        #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
        set: Vec<String>,
        /// Stages to run at once when their upstreams are done [default: CPU count].
        #[arg(long, short = 'j')]
        jobs: Option<usize>,
        /// Re-hash cached outputs (and inputs) and rebuild any entry that differs.
        #[arg(long)]
        verify: bool,
        /// CI mode: fail (exit 3) if any stage's key or outputs differ from pipeline.lock.
        #[arg(long)]
        locked: bool,
        /// Fail at once if another goemo run holds the project, instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Each stage fresh or stale, and why.
    #[command(
        after_help = "Example output:\n  load      fresh\n  train     stale: param lr changed 5e-5 → 3e-5\n  evaluate  stale: input train will change (train is stale)"
    )]
    Status {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Apply overrides, to see what a `run --set` would re-run.
        #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
        set: Vec<String>,
    },
    /// Draw the pipeline's stages and edges.
    #[command(
        after_help = "Examples:\n  goemo dag\n  goemo dag --format dot | dot -Tpng > dag.png\n  goemo dag --format mermaid"
    )]
    Dag {
        #[command(flatten)]
        pipeline: PipelineArg,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Remove cache entries that pipeline.lock does not reference.
    #[command(after_help = "Example:\n  goemo gc --dry-run\n  goemo gc")]
    Gc {
        #[command(flatten)]
        pipeline: PipelineArg,
        /// Only report what would be removed.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
    /// Classify texts with a fine-tuned model (default: outputs/model) and its thresholds.
    #[command(
        after_help = "Examples:\n  goemo predict \"I love this so much\" \"what a mess\"\n  goemo predict --file comments.txt          one text a line\n  goemo predict --file comments.jsonl        JSON lines with a `text` field\n  echo \"thanks!\" | goemo predict --top-k 3\n\nPrints one JSON line per text: {\"text\": …, \"labels\": [{\"label\": …, \"score\": …}]}"
    )]
    Predict {
        /// Texts to classify; none (and no --file) reads stdin.
        texts: Vec<String>,
        /// Read texts from a file: one a line, or JSON lines with a `text` field.
        #[arg(long, short = 'f', value_name = "PATH")]
        file: Option<PathBuf>,
        /// The model folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long, default_value = "outputs/model")]
        model: PathBuf,
        /// thresholds.json [default: in or beside the model folder].
        #[arg(long)]
        thresholds: Option<PathBuf>,
        /// One threshold for every label, instead of thresholds.json.
        #[arg(long, conflicts_with = "top_k")]
        threshold: Option<f32>,
        /// The K best labels whatever their score.
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Print throughput to stderr.
        #[arg(long)]
        stats: bool,
    },
    /// Put GoEmotions into data/goemotions: copied from a local mirror or downloaded, sha256-checked.
    #[command(
        after_help = "Examples:\n  goemo fetch-data --mirror ../shared/goemotions\n  goemo fetch-data            download from the official URLs (needs internet and curl)"
    )]
    FetchData {
        /// A folder holding train.tsv, dev.tsv, test.tsv and labels.txt.
        #[arg(long, env = "GOEMO_DATA_MIRROR")]
        mirror: Option<PathBuf>,
        #[arg(long, default_value = "data/goemotions")]
        dest: PathBuf,
    },
    /// List the stage kinds pipeline.yaml can use.
    Kinds,
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

fn main() -> ExitCode {
    goemo_stages::runtime::tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                eprintln!("error: {c}");
                ExitCode::from(2)
            } else if let Some(d) = e.downcast_ref::<LockDrift>() {
                eprintln!("error: {d}");
                ExitCode::from(3)
            } else if e.downcast_ref::<Interrupted>().is_some() {
                eprintln!("{e}");
                ExitCode::from(130)
            } else {
                eprintln!("error: {}", goemo_engine::error::chain_text(&e));
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in CI logs or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

fn load(pipeline: &PipelineArg, set: &[String]) -> anyhow::Result<pipeline::Pipeline> {
    let overrides = set
        .iter()
        .map(|s| Override::parse(s, &pipeline.pipeline))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pipeline::load(
        &pipeline.pipeline,
        &overrides,
        &goemo_stages::registry(),
    )?)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            from,
            until,
            only,
            force,
            dry_run,
            set,
            jobs,
            verify,
            locked,
            no_wait,
        } => {
            let p = load(&pipeline, &set)?;
            // Take the run lock before reading pipeline.lock, which the holder may be rewriting.
            let _lock = if dry_run {
                None
            } else {
                Some(goemo_engine::runlock::acquire(
                    &p.root.join("cache"),
                    !no_wait,
                )?)
            };
            let engine = Engine::new(&p, !verify)?;
            ctrlc::set_handler(|| {
                if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    // Second Ctrl-C: leave now, taking the commands' process groups along; temp
                    // folders are cleaned by the next run.
                    goemo_stage::process::kill_running_groups();
                    std::process::exit(130);
                }
                eprintln!("\ninterrupt: stopping running stages (Ctrl-C again to quit at once)…");
            })
            .context("installing the Ctrl-C handler")?;
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let opts = RunOptions {
                from,
                until,
                only,
                force,
                dry_run,
                jobs,
                verify,
                locked,
            };
            let results = engine.run(&opts)?;
            if !dry_run && !cli.quiet {
                print_summary(&results);
            }
            let failed: Vec<&str> = results
                .iter()
                .filter(|r| r.outcome == Outcome::Failed)
                .map(|r| r.name.as_str())
                .collect();
            if !failed.is_empty() {
                // Each stage's error was logged when it failed; printing it again here doubled it.
                eprintln!(
                    "error: stage(s) failed: {} (each error is shown above, where it happened)",
                    failed.join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
            if locked {
                println!("pipeline.lock reproduced: every key and output hash matches");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { pipeline, set } => {
            let p = load(&pipeline, &set)?;
            let engine = Engine::new(&p, true)?;
            let rows = engine.status()?;
            let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
            for (name, fresh, why) in &rows {
                // Inputs outside the project folder: a clone elsewhere must provide them too.
                let external: String = p
                    .get(name)
                    .map(|def| {
                        def.inputs
                            .iter()
                            .filter_map(|(role, path)| {
                                pipeline::external_location(&p.root, path)
                                    .map(|abs| format!("  (external {role}: {})", abs.display()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if *fresh {
                    println!("{name:<width$}  fresh{external}");
                } else {
                    println!("{name:<width$}  stale: {why}{external}");
                }
            }
            engine.hasher.save();
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { pipeline, format } => {
            let p = load(&pipeline, &[])?;
            let text = match format {
                DagFormat::Text => goemo_engine::dag::text(&p),
                DagFormat::Dot => goemo_engine::dag::dot(&p),
                DagFormat::Mermaid => goemo_engine::dag::mermaid(&p),
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { pipeline, dry_run } => {
            let p = load(&pipeline, &[])?;
            let engine = Engine::new(&p, true)?;
            let keep: HashSet<String> = engine.lock.stages.iter().map(|s| s.key.clone()).collect();
            if dry_run {
                let doomed: Vec<String> = engine
                    .cache
                    .keys()
                    .into_iter()
                    .filter(|k| !keep.contains(k))
                    .collect();
                let bytes: u64 = doomed
                    .iter()
                    .map(|k| goemo_engine::cache::dir_size(&engine.cache.entry_dir(k)))
                    .sum();
                println!(
                    "would remove {} cache entries ({})",
                    doomed.len(),
                    human_bytes(bytes)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let _lock = goemo_engine::runlock::acquire(&engine.cache.root, true)?;
            let (removed, bytes) = engine.cache.gc(&keep)?;
            println!(
                "removed {removed} cache entries, freed {}; kept {} referenced by pipeline.lock",
                human_bytes(bytes),
                keep.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict {
            texts,
            file,
            model,
            thresholds,
            threshold,
            top_k,
            batch_size,
            stats,
        } => {
            use goemo_stages::predict::{parse_texts, predict, InputText, PredictOptions};
            let inputs: Vec<InputText> = if let Some(path) = &file {
                let bytes = std::fs::read(path)
                    .map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
                let jsonl = path.extension().map(|e| e == "jsonl" || e == "ndjson");
                parse_texts(&bytes, &path.display().to_string(), jsonl.filter(|j| *j))?
            } else if !texts.is_empty() {
                texts
                    .into_iter()
                    .enumerate()
                    .map(|(i, text)| InputText {
                        origin: format!("argument {}", i + 1),
                        text,
                    })
                    .collect()
            } else {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .context("reading stdin")?;
                parse_texts(&bytes, "stdin", None)?
            };
            if top_k == Some(0) {
                return Err(ConfigError::new("--top-k", "--top-k must be at least 1").into());
            }
            let opts = PredictOptions {
                model,
                thresholds,
                threshold,
                top_k,
                batch_size,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let s = predict(&inputs, &opts, &mut out)?;
            std::io::Write::flush(&mut out)?;
            if stats {
                eprintln!(
                    "predicted {} texts in {:.3}s ({:.1} texts/s); {} truncated",
                    s.texts,
                    s.seconds,
                    s.texts as f64 / s.seconds.max(1e-9),
                    s.truncated
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::FetchData { mirror, dest } => {
            goemo_data::fetch::fetch(&dest, mirror.as_deref(), &mut |line| eprintln!("{line}"))?;
            println!("GoEmotions is in {} (sha256 verified)", dest.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Kinds => {
            for s in goemo_stages::registry().iter() {
                println!("{:<12} v{}  {}", s.kind(), s.version(), s.summary());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}
