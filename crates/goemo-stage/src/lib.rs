//! The one small trait every stage implements, and what the engine hands a stage when it runs.
//!
//! A stage is a pure function of its params and inputs: it reads the paths in
//! [`StageContext::inputs`], writes its outputs into [`StageContext::out_dir`] and nothing else
//! matters to the engine. It knows nothing about caching, hashing or where its folder lives:
//! the engine gives it a fresh, empty output folder and decides afterwards whether to keep it.
//!
//! Two output areas, because reproducibility and bookkeeping pull in opposite directions:
//! - `out_dir` holds the results. They are content-hashed, feed downstream keys and
//!   `pipeline.lock`, so they must be byte-identical for identical inputs (no timestamps, no
//!   wall times, no absolute paths).
//! - `volatile_dir` holds what a person reads but that may differ run to run: logs, timings,
//!   the human report. It is stored with the cache entry and can be published to `outputs/`,
//!   but it is never hashed, so it cannot break early cutoff or `--locked`.
//!
//! This crate is what the engine and every stage share, and nothing else: it may depend on
//! `goemo-fsio` and small general crates (serde, thiserror, libc), never on the engine, the
//! stages or an ML crate. Where to start reading: [`Stage`], then [`TypedStage`] (typed params
//! with a blanket `Stage` impl; most stages implement this), then [`StageContext`]; `process`
//! runs a command stage's process group so an interrupt stops all of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use goemo_fsio::{read_json, write_atomic, write_json, FsError};

pub mod process;

/// An input a stage reads, named by its role (`data`, `model`, `dataset`, …).
#[derive(Debug, Clone, Copy)]
pub struct InputSpec {
    pub role: &'static str,
    pub what: &'static str,
    pub required: bool,
    /// Upstream stage kinds that fill this role when pipeline.yaml lists deps without roles
    /// (`deps: [sample]`); empty for external files and folders.
    pub from_kinds: &'static [&'static str],
}

impl InputSpec {
    /// An external file or folder (`inputs:` in pipeline.yaml).
    pub const fn path(role: &'static str, what: &'static str) -> Self {
        InputSpec {
            role,
            what,
            required: true,
            from_kinds: &[],
        }
    }
    /// An upstream stage's results (`deps:` in pipeline.yaml).
    pub const fn stage(
        role: &'static str,
        what: &'static str,
        from_kinds: &'static [&'static str],
    ) -> Self {
        InputSpec {
            role,
            what,
            required: true,
            from_kinds,
        }
    }
    pub const fn optional(self) -> Self {
        InputSpec {
            required: false,
            ..self
        }
    }
}

/// Which inputs a stage accepts.
#[derive(Debug, Clone, Copy)]
pub enum Inputs {
    /// Exactly these roles (required ones must be given, others are refused).
    Fixed(&'static [InputSpec]),
    /// Any roles (the generic `command` stage).
    Any,
}

/// A param that did not fit the stage's typed params.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// The param's dotted path when serde could tell which one (`lr`, `vars.seed`).
    pub param: Option<String>,
    pub message: String,
}

impl ParamError {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        ParamError {
            param: Some(param.to_owned()),
            message: message.into(),
        }
    }
}

/// Facts about the run that a stage may show a person (report metadata) but must not let into
/// `out_dir`: stage keys, wall times, backbone.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub stages: Vec<StageRecord>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    pub key: String,
    pub params: serde_json::Value,
    pub wall_s: f64,
}

/// Everything a running stage gets from the engine.
pub struct StageContext<'a> {
    /// The stage's name in pipeline.yaml (for messages).
    pub name: &'a str,
    /// Params after defaults, as returned by [`Stage::resolve_params`].
    pub params: &'a serde_json::Value,
    /// Role → path: an upstream stage's `out` folder or an external file or folder.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// Role → the upstream stage's volatile folder (logs, timings), when the input is a stage.
    pub upstream_volatile: &'a BTreeMap<String, PathBuf>,
    /// Fresh, empty; becomes the cached result.
    pub out_dir: &'a Path,
    /// Fresh, empty; stored beside the result, never hashed.
    pub volatile_dir: &'a Path,
    /// Survives a killed attempt with the same key (checkpoints for resume); removed once the
    /// entry is committed.
    pub work_dir: &'a Path,
    /// The project root, for messages that show relative paths.
    pub project_dir: &'a Path,
    /// Ancestors of this stage in this run: keys, params, wall times.
    pub run_record: &'a RunRecord,
    pub cancel: &'a AtomicBool,
    /// True when stdout is a terminal: show progress bars rather than log lines.
    pub interactive: bool,
}

impl StageContext<'_> {
    /// The path given for `role`; the engine has checked required roles, so a missing one is a
    /// bug in the stage's `inputs()` declaration.
    pub fn input(&self, role: &str) -> anyhow::Result<&Path> {
        self.inputs.get(role).map(PathBuf::as_path).ok_or_else(|| {
            anyhow::anyhow!(
                "stage {}: input `{role}` is not connected; add it to the stage's `deps` or `inputs` in pipeline.yaml",
                self.name
            )
        })
    }

    pub fn optional_input(&self, role: &str) -> Option<&Path> {
        self.inputs.get(role).map(PathBuf::as_path)
    }

    /// Typed params (already validated by `resolve_params`).
    pub fn params<P: DeserializeOwned>(&self) -> anyhow::Result<P> {
        Ok(serde_json::from_value(self.params.clone())?)
    }

    /// Err(Cancelled) once the user pressed Ctrl-C: long loops call this between steps.
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Cancelled.into())
        } else {
            Ok(())
        }
    }
}

/// Returned by a stage that stopped because the run was interrupted.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Cancelled;

/// One kind of stage. Implementations live one per module in this crate.
pub trait Stage: Send + Sync {
    /// The `kind:` name in pipeline.yaml.
    fn kind(&self) -> &'static str;
    /// Bump whenever the implementation changes what it writes for the same params and inputs:
    /// it is part of the stage key, so old cache entries stop matching.
    fn version(&self) -> u32;
    /// The version that goes into the key of a run with these resolved params: [`version`]
    /// unless some params select arithmetic that changed on its own (int8 scoring), so
    /// entries made with the other params keep their keys.
    ///
    /// [`version`]: Stage::version
    fn version_for(&self, _params: &serde_json::Value) -> u32 {
        self.version()
    }
    /// One line for `goemo dag` and error messages.
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> Inputs;
    /// Check raw params against the typed struct and return them with defaults filled in: this
    /// is exactly what is hashed and recorded in pipeline.lock.
    fn resolve_params(&self, raw: &RawParams) -> Result<serde_json::Value, ParamError>;
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()>;
    /// The figures an experiment table shows for this stage's result (`dev_macro_f1` → 0.52),
    /// read from its `out` folder. The names are stable: they are `goemo exp show` columns and
    /// `--sort` keys, prefixed with the stage's name. Most stages have none.
    fn metrics(&self, _out_dir: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
    /// Why `param`'s resolved value can differ from machine to machine (a value such as `auto`
    /// that is resolved per CPU), and what to do about it: `--locked` prints it beside a key
    /// that moved because of that param. Most stages have none.
    fn param_note(&self, _param: &str) -> Option<String> {
        None
    }
}

/// A stage with typed params: what every goemo stage implements. The blanket [`Stage`] impl
/// resolves raw params into [`TypedStage::Params`] (unknown keys are errors, missing ones take
/// their defaults), checks them with [`TypedStage::validate`], and hands `run` the typed value,
/// so no stage parses its own params.
pub trait TypedStage: Send + Sync {
    /// `#[serde(deny_unknown_fields, default)]`: what is hashed into the stage key and recorded
    /// in pipeline.lock, defaults filled in.
    type Params: DeserializeOwned + Serialize;
    /// The `kind:` name in pipeline.yaml.
    fn kind(&self) -> &'static str;
    /// Bump whenever the implementation changes what it writes for the same params and inputs.
    fn version(&self) -> u32;
    /// The version for a run with `params`: bump this one instead of [`TypedStage::version`]
    /// when only runs with some params (say `precision: int8`) write something new.
    fn version_for(&self, _params: &Self::Params) -> u32 {
        self.version()
    }
    /// One line for `goemo dag` and error messages.
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> Inputs;
    /// Checks serde cannot express (ranges, combinations); the error names the param.
    fn validate(&self, _params: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }
    fn run(&self, ctx: &StageContext<'_>, params: Self::Params) -> anyhow::Result<()>;
    /// The figures an experiment table shows for this stage's result (`dev_macro_f1` → 0.52),
    /// read from its `out` folder. The names are stable: they are `goemo exp show` columns and
    /// `--sort` keys, prefixed with the stage's name. Most stages have none.
    fn metrics(&self, _out_dir: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
    /// Why `param`'s resolved value can differ from machine to machine (a value such as `auto`
    /// that is resolved per CPU), and what to do about it: `--locked` prints it beside a key
    /// that moved because of that param. Most stages have none.
    fn param_note(&self, _param: &str) -> Option<String> {
        None
    }
}

impl<T: TypedStage> Stage for T {
    fn kind(&self) -> &'static str {
        TypedStage::kind(self)
    }
    fn version(&self) -> u32 {
        TypedStage::version(self)
    }
    fn version_for(&self, params: &serde_json::Value) -> u32 {
        // Resolved params always parse (resolve_params made them); were they not to, the
        // plain version keeps the key well defined.
        match serde_json::from_value::<T::Params>(params.clone()) {
            Ok(typed) => TypedStage::version_for(self, &typed),
            Err(_) => TypedStage::version(self),
        }
    }
    fn summary(&self) -> &'static str {
        TypedStage::summary(self)
    }
    fn inputs(&self) -> Inputs {
        TypedStage::inputs(self)
    }
    fn resolve_params(&self, raw: &RawParams) -> Result<serde_json::Value, ParamError> {
        let value = resolve_typed::<T::Params>(raw)?;
        let typed: T::Params = serde_json::from_value(value.clone()).map_err(|e| ParamError {
            param: None,
            message: e.to_string(),
        })?;
        self.validate(&typed)?;
        Ok(value)
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let params: T::Params = ctx.params()?;
        TypedStage::run(self, ctx, params)
    }
    fn metrics(&self, out_dir: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
        TypedStage::metrics(self, out_dir)
    }
    fn param_note(&self, param: &str) -> Option<String> {
        TypedStage::param_note(self, param)
    }
}

/// Params as pipeline.yaml (and `--set`) give them, before a stage resolves them.
pub type RawParams = serde_yaml::Value;

/// The stage kinds a pipeline may use, looked up by their pipeline.yaml name. The binary builds
/// one (from `goemo_stages::registry()`) and hands it to the engine; tests build their own.
#[derive(Clone, Default)]
pub struct Registry {
    stages: Vec<std::sync::Arc<dyn Stage>>,
}

impl Registry {
    pub fn new(stages: Vec<std::sync::Arc<dyn Stage>>) -> Registry {
        Registry { stages }
    }
    /// The stage of `kind`, if registered.
    pub fn find(&self, kind: &str) -> Option<std::sync::Arc<dyn Stage>> {
        self.stages.iter().find(|s| s.kind() == kind).cloned()
    }
    /// Every kind, in registration order (pipeline order for goemo's own).
    pub fn kinds(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.kind()).collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|s| s.as_ref())
    }
}

/// `resolve_params` for a typed params struct (`#[serde(deny_unknown_fields, default)]`).
pub fn resolve_typed<P: DeserializeOwned + Serialize>(
    raw: &RawParams,
) -> Result<serde_json::Value, ParamError> {
    // JSON has no NaN or infinity: serde_json would turn `.nan` into null and the stage would
    // fail later with "invalid type: null" and no name.
    if let Some((param, value)) = non_finite_number(raw, "") {
        return Err(ParamError {
            param: Some(param),
            message: format!("{value} is not a finite number; params must be finite"),
        });
    }
    let raw = if raw.is_null() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        raw.clone()
    };
    // Through text rather than `from_value`: serde_yaml's text deserializer prefixes errors with
    // the failing key's path (`lr: invalid type …`), which names the param for the user.
    let text = serde_yaml::to_string(&raw).map_err(|e| ParamError {
        param: None,
        message: e.to_string(),
    })?;
    let typed: P = serde_yaml::from_str(&text).map_err(|e| {
        let mut message = e.to_string();
        if let Some(pos) = message.find(" at line ") {
            message.truncate(pos);
        }
        let param = param_named_in(&message);
        // The engine already says `param `lr``: drop serde_yaml's `lr: ` path prefix.
        if let Some(rest) = param
            .as_deref()
            .and_then(|p| message.strip_prefix(p))
            .and_then(|rest| rest.strip_prefix(": "))
        {
            message = rest.to_owned();
        }
        ParamError { param, message }
    })?;
    serde_json::to_value(&typed).map_err(|e| ParamError {
        param: None,
        message: e.to_string(),
    })
}

/// The dotted path and text of the first NaN or infinite number in `value`, if any.
fn non_finite_number(value: &serde_yaml::Value, path: &str) -> Option<(String, String)> {
    use serde_yaml::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| !f.is_finite())
            .map(|f| (path.to_owned(), format!("{f}"))),
        Value::Sequence(items) => items.iter().find_map(|v| non_finite_number(v, path)),
        Value::Mapping(map) => map.iter().find_map(|(k, v)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            };
            non_finite_number(v, &join(&key))
        }),
        Value::Tagged(t) => non_finite_number(&t.value, path),
        _ => None,
    }
}

/// serde names the offending field in its messages (`unknown field `lrr``, `lr: invalid type`);
/// pull it out so the engine can point at the line.
fn param_named_in(message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    let (path, _) = message.split_once(": ")?;
    (!path.contains(' ')).then(|| {
        path.trim_end_matches(|c: char| c.is_ascii_digit() || c == '[' || c == ']')
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Serialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct P {
        lr: f64,
        epochs: u32,
    }

    #[test]
    fn resolve_fills_defaults_and_names_bad_params() {
        let v = resolve_typed::<P>(&serde_yaml::from_str("lr: 0.5").unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"lr": 0.5, "epochs": 0}));
        let e = resolve_typed::<P>(&serde_yaml::from_str("lrr: 0.5").unwrap()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("lrr"));
        assert!(
            e.message
                .contains("unknown field `lrr`, expected `lr` or `epochs`"),
            "{}",
            e.message
        );
        let e = resolve_typed::<P>(&serde_yaml::from_str("epochs: many").unwrap()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("epochs"), "{}", e.message);
        assert!(
            e.message.starts_with("invalid type: string \"many\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn non_finite_params_are_named() {
        for (yaml, param, shown) in [
            ("lr: .nan", "lr", "NaN"),
            ("lr: .inf", "lr", "inf"),
            ("lr: -.inf", "lr", "-inf"),
        ] {
            let e = resolve_typed::<P>(&serde_yaml::from_str(yaml).unwrap()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{yaml}: {}", e.message);
            assert_eq!(
                e.message,
                format!("{shown} is not a finite number; params must be finite")
            );
        }
        let nested: serde_yaml::Value =
            serde_yaml::from_str("vars: {weights: [1.0, .nan]}").unwrap();
        assert_eq!(
            non_finite_number(&nested, "").map(|(p, _)| p).as_deref(),
            Some("vars.weights")
        );
    }
}
