//! Names goemo reserves under `outputs/`: pipeline validation refuses them as publish targets,
//! publishing writes them.

/// Which entry each target came from; a target may not take this name.
pub const STATE_FILE: &str = ".goemo-published.json";

pub(crate) const TEMP_MARKERS: [&str; 2] = [".goemo-tmp.", ".goemo-old."];

/// `.NAME.goemo-tmp.PID` or `.NAME.goemo-old.PID`: what a publish writes beside its target.
pub fn is_leftover_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    TEMP_MARKERS.iter().any(|marker| {
        rest.rfind(marker).is_some_and(|pos| {
            let pid = &rest[pos + marker.len()..];
            pos > 0 && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// An experiment's own lock file, in `experiments/<name>/` (written by the engine, read by
/// `exp apply` and `exp diff`).
pub const EXPERIMENT_LOCK: &str = "pipeline.lock";
