//! `command`: run a shell command as a cached stage (what a DVC stage is).
//!
//! The command sees its folders in the environment: `GOEMO_OUT` (write results here),
//! `GOEMO_VOLATILE` (logs, timings), `GOEMO_WORK` (survives a killed attempt),
//! `GOEMO_IN_<ROLE>` for each input (role upper-cased, `-` → `_`), and `GOEMO_VAR_<NAME>` for
//! each entry of `vars`. It runs in the project root with `sh -c`.
//!
//! The shell runs in its own process group, and nothing in that group outlives the stage: when
//! the shell exits, is cancelled (Ctrl-C, SIGTERM) or fails, the whole group is killed, so no
//! background child keeps writing into a result after it is committed. The group id is recorded
//! in the work folder (`.goemo-command.pgid`); if goemo itself is killed, the next run finds the
//! record and stops the group before any stage runs, after checking (by its start time in
//! `/proc`) that the process is still the one goemo started.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::stage::{resolve_typed, Inputs, ParamError, Stage, StageContext};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandParams {
    /// The shell command.
    pub cmd: String,
    /// Values exported as `GOEMO_VAR_<NAME>`; part of the key, so changing one re-runs.
    pub vars: BTreeMap<String, serde_json::Value>,
}

pub struct CommandStage;

impl Stage for CommandStage {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "run a shell command; inputs as $GOEMO_IN_<ROLE>, results into $GOEMO_OUT"
    }
    fn inputs(&self) -> Inputs {
        Inputs::Any
    }
    fn resolve_params(&self, raw: &serde_yaml::Value) -> Result<serde_json::Value, ParamError> {
        let value = resolve_typed::<CommandParams>(raw)?;
        if value["cmd"].as_str().is_none_or(|c| c.trim().is_empty()) {
            return Err(ParamError::new(
                "cmd",
                "missing field `cmd`: give the shell command to run",
            ));
        }
        Ok(value)
    }

    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let params: CommandParams = ctx.params()?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&params.cmd)
            .current_dir(ctx.project_dir)
            .env("GOEMO_STAGE", ctx.name)
            .env("GOEMO_OUT", ctx.out_dir)
            .env("GOEMO_VOLATILE", ctx.volatile_dir)
            .env("GOEMO_WORK", ctx.work_dir);
        for (role, path) in ctx.inputs {
            command.env(format!("GOEMO_IN_{}", env_name(role)), path);
        }
        for (name, value) in &params.vars {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            command.env(format!("GOEMO_VAR_{}", env_name(name)), text);
        }
        // Whatever an earlier, killed goemo left running in this work folder stops first.
        stop_leftover_group(ctx.work_dir)?;
        command.process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("stage {}: could not start `sh -c`: {e}", ctx.name))?;
        let group = Group::start(child.id(), ctx.work_dir, ctx.name);
        // Poll rather than wait, so Ctrl-C can stop a long command.
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if ctx.check_cancelled().is_err() {
                group.stop()?;
                let _ = child.wait();
                ctx.check_cancelled()?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The shell is done: background children it left are stopped before the result is kept.
        group.stop()?;
        if !status.success() {
            anyhow::bail!(
                "stage {}: command failed ({status}): {}",
                ctx.name,
                params.cmd.trim()
            );
        }
        Ok(())
    }
}

/// Where a running command's process group is recorded, in the stage's work folder.
const GROUP_RECORD: &str = ".goemo-command.pgid";

/// How long a killed group may take to disappear before the stage fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Process groups of commands running in this process, for [`kill_running_groups`].
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

#[derive(Debug, Serialize, Deserialize)]
struct GroupRecord {
    pgid: u32,
    /// The group leader's start time (clock ticks after boot, `/proc/PID/stat` field 22): a
    /// later process that reuses the pid has another.
    start_ticks: u64,
    stage: String,
}

/// A command's process group: registered while it runs, recorded in the work folder, killed
/// (all of it) when stopped or dropped.
struct Group {
    pgid: u32,
    start_ticks: Option<u64>,
    record: PathBuf,
    stage: String,
    stopped: Cell<bool>,
}

impl Group {
    fn start(pgid: u32, work_dir: &Path, stage: &str) -> Group {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
        let start_ticks = start_ticks(pgid);
        let record = work_dir.join(GROUP_RECORD);
        if let Some(start_ticks) = start_ticks {
            let text = serde_json::to_vec(&GroupRecord {
                pgid,
                start_ticks,
                stage: stage.to_owned(),
            })
            .unwrap_or_default();
            if let Err(e) = crate::write_atomic(&record, &text) {
                tracing::warn!(
                    "stage {stage}: could not record its process group in {}: {e}",
                    record.display()
                );
            }
        }
        Group {
            pgid,
            start_ticks,
            record,
            stage: stage.to_owned(),
            stopped: Cell::new(false),
        }
    }

    /// Kill every process left in the group and wait until none runs (once: after that the
    /// group id may name someone else's group).
    fn stop(&self) -> anyhow::Result<()> {
        if self.stopped.replace(true) {
            return Ok(());
        }
        let leader_is_ours = match (self.start_ticks, start_ticks(self.pgid)) {
            (Some(recorded), Some(now)) => recorded == now,
            // The leader (our shell) has exited: its pid cannot be reused while processes of
            // its group remain, so whatever is left in the group is ours.
            (_, None) => true,
            (None, Some(_)) => false,
        };
        // Without /proc (not Linux) nothing can be counted: signal regardless.
        if leader_is_ours && (!cfg!(target_os = "linux") || live_members(self.pgid) > 0) {
            signal_group(self.pgid, libc::SIGKILL);
            wait_until_gone(self.pgid, &self.stage)?;
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Also on an error or panic between start and stop.
        if let Err(e) = self.stop() {
            tracing::warn!("{e:#}");
        }
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&g| g != self.pgid);
        let _ = std::fs::remove_file(&self.record);
    }
}

/// SIGKILL the process groups of every command running in this process; for a goemo that exits
/// at once (a second Ctrl-C) without unwinding its stages.
pub fn kill_running_groups() {
    for &pgid in RUNNING.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        signal_group(pgid, libc::SIGKILL);
    }
}

/// Stop the process group a killed goemo left running in `work_dir`, if its record is there and
/// the group is still the one that goemo started; then remove the record. Call only while
/// holding the project's run lock (so the recording goemo is gone).
pub fn stop_leftover_group(work_dir: &Path) -> anyhow::Result<()> {
    let path = work_dir.join(GROUP_RECORD);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    if let Ok(record) = serde_json::from_slice::<GroupRecord>(&bytes) {
        let alive = live_members(record.pgid) > 0;
        let same_leader = match start_ticks(record.pgid) {
            Some(now) => now == record.start_ticks,
            // The leader is gone: its pid is not reused while the group has members.
            None => true,
        };
        if alive && same_leader && record.pgid > 1 {
            tracing::warn!(
                "stage {}: stopping process group {} that a killed goemo run left running",
                record.stage,
                record.pgid
            );
            signal_group(record.pgid, libc::SIGKILL);
            wait_until_gone(record.pgid, &record.stage)?;
        }
    }
    std::fs::remove_file(&path).map_err(|e| anyhow::anyhow!("removing {}: {e}", path.display()))
}

fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid below -1 signals exactly that process group.
        unsafe { libc::kill(-pgid, signal) };
    }
}

fn wait_until_gone(pgid: u32, stage: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while live_members(pgid) > 0 {
        if started.elapsed() > STOP_TIMEOUT {
            anyhow::bail!(
                "stage {stage}: process group {pgid} does not stop after SIGKILL\n  hint: look at it with `ps -o pid,stat,cmd -g {pgid}`; run again once it is gone"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `/proc/PID/stat` fields after the command name (which may hold spaces and parentheses).
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split(' ').map(str::to_owned).collect())
}

/// When a process started (field 22 of /proc/PID/stat); `None` if there is no such process.
fn start_ticks(pid: u32) -> Option<u64> {
    stat_fields(&pid.to_string())?.get(19)?.parse().ok()
}

/// Processes in group `pgid` that still run (zombies excluded: they write nothing, and an init
/// that does not reap would keep them forever).
fn live_members(pgid: u32) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pgid = pgid.to_string();
    rd.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| stat_fields(&pid))
        .filter(|f| {
            f.get(2) == Some(&pgid) && !matches!(f.first().map(String::as_str), Some("Z" | "X"))
        })
        .count()
}

fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}
