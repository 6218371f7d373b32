//! Shell commands in their own process group, and nothing in that group outliving its stage.
//!
//! When the shell exits, is cancelled (Ctrl-C, SIGTERM) or fails, the whole group is killed, so no
//! background child keeps writing into a result after it is committed. The group id is recorded
//! in the stage's work folder (`.goemo-command.pgid`); if goemo itself is killed, the next run
//! finds the record and stops the group before any stage runs, after checking (by its start time
//! in `/proc`) that the process is still the one goemo started. The engine calls
//! [`stop_leftover_group`] and the binary [`kill_running_groups`]; the `command` stage starts
//! groups with [`Group::start`].

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
pub struct Group {
    pgid: u32,
    start_ticks: Option<u64>,
    record: PathBuf,
    stage: String,
    stopped: Cell<bool>,
}

impl Group {
    pub fn start(pgid: u32, work_dir: &Path, stage: &str) -> Group {
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
            if let Err(e) = goemo_fsio::write_atomic(&record, &text) {
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
    pub fn stop(&self) -> anyhow::Result<()> {
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
