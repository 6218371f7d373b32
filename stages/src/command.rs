//! `command`: run a shell command as a cached stage (what a DVC stage is).
//!
//! The command sees its folders in the environment: `GOEMO_OUT` (write results here),
//! `GOEMO_VOLATILE` (logs, timings), `GOEMO_WORK` (survives a killed attempt),
//! `GOEMO_IN_<ROLE>` for each input (role upper-cased, `-` → `_`), and `GOEMO_VAR_<NAME>` for
//! each entry of `vars`. It runs in the project root with `sh -c`.
//!
//! The shell runs in its own process group, and nothing in that group outlives the stage
//! ([`goemo_stage::process`] says how).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use goemo_stage::process::{stop_leftover_group, Group};
use goemo_stage::{Inputs, ParamError, StageContext, TypedStage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandParams {
    /// The shell command.
    pub cmd: String,
    /// Values exported as `GOEMO_VAR_<NAME>`; part of the key, so changing one re-runs.
    pub vars: BTreeMap<String, serde_json::Value>,
}

pub struct CommandStage;

fn flatten_numbers(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(prefix.to_owned(), x);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_numbers(&name, v, out);
            }
        }
        _ => {}
    }
}

impl TypedStage for CommandStage {
    type Params = CommandParams;

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
    fn validate(&self, params: &CommandParams) -> Result<(), ParamError> {
        if params.cmd.trim().is_empty() {
            return Err(ParamError::new(
                "cmd",
                "missing field `cmd`: give the shell command to run",
            ));
        }
        Ok(())
    }

    /// A command's figures, as DVC reads them: the numbers in `$GOEMO_OUT/metrics.json`, if it
    /// wrote one (nested objects as dotted names).
    fn metrics(&self, out_dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, f64>> {
        let path = out_dir.join("metrics.json");
        if !path.exists() {
            return Ok(BTreeMap::new());
        }
        let v: serde_json::Value = goemo_fsio::read_json(&path)?;
        let mut out = BTreeMap::new();
        flatten_numbers("", &v, &mut out);
        Ok(out)
    }

    fn run(&self, ctx: &StageContext<'_>, params: CommandParams) -> anyhow::Result<()> {
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
