//! How goemo talks to a person: the logger, the engine's events as log lines and dry-run plan
//! lines, and the closing table. The engine reports; this module decides how it looks.

use goemo_engine::engine::{EngineEvent, Outcome, Reporter, StageResult};

pub fn init_logging(verbose: u8, quiet: bool) {
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

/// Engine events as log lines on stderr; a dry run's plan on stdout. A sweep's members name
/// themselves through a tracing span (`exp{name=lr-2}: running train: …`).
pub struct Shell;

impl Reporter for Shell {
    fn event(&self, event: EngineEvent<'_>) {
        match event {
            EngineEvent::LeftoverRemoved { path } => {
                tracing::info!("removed {}, left by an interrupted publish", path.display())
            }
            EngineEvent::Planned {
                stage,
                outcome,
                why: Some(why),
            } => println!("{:<12} {stage}: {why}", outcome.label()),
            EngineEvent::Planned {
                stage,
                outcome,
                why: None,
            } => println!("{:<12} {stage}", outcome.label()),
            EngineEvent::WaitingForGc => {
                tracing::info!("waiting for `goemo gc` to finish with the cache…")
            }
            EngineEvent::EntryDamaged { stage, key, why } => {
                tracing::warn!("stage {stage}: cache entry {key} is damaged ({why}); rebuilding")
            }
            EngineEvent::Started { stage, why } => tracing::info!("running {stage}: {why}"),
            EngineEvent::BuiltElsewhere { stage, waited_s } => tracing::info!(
                "{stage}: built meanwhile by another run; taken from the cache (waited {waited_s:.1}s)"
            ),
            EngineEvent::Pulled { stage, waited_s } if waited_s > 0.0 => tracing::info!(
                "{stage}: built by another worker; pulled from the shared cache, verified (waited {waited_s:.1}s)"
            ),
            EngineEvent::Pulled { stage, .. } => {
                tracing::info!("{stage}: pulled from the shared cache, verified")
            }
            EngineEvent::Finished { stage, wall_s } => {
                tracing::info!("{stage} done in {wall_s:.2}s")
            }
            EngineEvent::Failed { stage, detail } => {
                tracing::error!("stage {stage} failed: {detail}")
            }
        }
    }
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

pub fn human_bytes(b: u64) -> String {
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
