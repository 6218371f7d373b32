//! pipeline.yaml: parsing, `--set` overrides and validation into a [`Pipeline`] whose stages
//! are in a topological order.
//!
//! ```yaml
//! stages:
//!   load:                      # the stage's name; its kind defaults to the name
//!     inputs: {data: data/goemotions}   # external files or folders, relative to the project
//!     params: {on_bad_rows: fail}
//!   sample:
//!     deps: [load]             # upstream stages; the role is the upstream's kind…
//!   evaluate:
//!     deps: {model: train}     # …or named explicitly
//!     publish: [report.csv]    # copied to outputs/ after the run
//! ```
//!
//! Every error names the file, line and column (when the YAML has them), the stage and the key,
//! and says what would be valid.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use goemo_stage::{Inputs, Registry, Stage};
use serde::Deserialize;

use crate::error::ConfigError;

/// One stage as pipeline.yaml declares it, validated.
pub struct StageDef {
    pub name: String,
    pub kind: String,
    pub stage: Arc<dyn Stage>,
    /// Role → upstream stage name.
    pub deps: BTreeMap<String, String>,
    /// Role → path relative to the project root.
    pub inputs: BTreeMap<String, PathBuf>,
    /// Params after defaults (what is hashed).
    pub params: serde_json::Value,
    /// Source inside the stage's result (`out/…` or `volatile/…` relative) → path under outputs/.
    pub publish: Vec<Publish>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub from: String,
    pub to: String,
}

pub struct Pipeline {
    pub file: PathBuf,
    pub root: PathBuf,
    /// Topological order, ties broken by declaration order.
    pub stages: Vec<StageDef>,
    index: HashMap<String, usize>,
    /// Dep edges between positions in `stages`.
    graph: crate::dag::Graph,
}

impl Pipeline {
    pub fn get(&self, name: &str) -> Option<&StageDef> {
        self.index.get(name).map(|&i| &self.stages[i])
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Indices of the stages stage `i` depends on, directly (sorted, without repeats).
    pub fn upstream(&self, i: usize) -> &[usize] {
        self.graph.upstream(i)
    }

    /// The dep edges between stage positions, for graph walks.
    pub fn graph(&self) -> &crate::dag::Graph {
        &self.graph
    }

    /// A stage name from the CLI, or a config error listing the valid ones.
    pub fn require(&self, name: &str, flag: &str) -> Result<usize, ConfigError> {
        self.position(name).ok_or_else(|| {
            ConfigError::new(
                &self.file,
                format!("{flag} {name}: no stage named `{name}`"),
            )
            .hint(format!("stages are: {}", self.names().join(", ")))
        })
    }

    /// The resolved value of a dotted param (`train.lr`, `fit.vars.x`): `None` when no stage
    /// has that name, `Null` when its params hold no such key.
    pub fn param(&self, dotted: &str) -> Option<&serde_json::Value> {
        static NULL: serde_json::Value = serde_json::Value::Null;
        let mut parts = dotted.split('.');
        let def = self.get(parts.next()?)?;
        Some(parts.fold(&def.params, |v, part| v.get(part).unwrap_or(&NULL)))
    }

    pub fn names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_str()).collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    stages: serde_yaml::Mapping,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: Option<String>,
    #[serde(default)]
    deps: Option<RawDeps>,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    params: serde_yaml::Value,
    #[serde(default)]
    publish: Option<RawPublish>,
    /// Free text for people; not hashed.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDeps {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPublish {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

const STAGE_KEYS: &str = "kind, deps, inputs, params, publish, description";

/// A `--set stage.param=value` override; `value` is read as YAML (`3e-5`, `true`, `[1, 2]`).
#[derive(Debug, Clone)]
pub struct Override {
    pub stage: String,
    pub path: Vec<String>,
    pub value: serde_yaml::Value,
}

impl Override {
    pub fn parse(text: &str, file: &Path) -> Result<Override, ConfigError> {
        let bad = || {
            ConfigError::new(file, format!("--set {text}: expected STAGE.PARAM=VALUE"))
                .hint("e.g. --set train.lr=3e-5 or --set sample.fraction=0.2")
        };
        let (lhs, rhs) = text.split_once('=').ok_or_else(bad)?;
        let mut parts = lhs.split('.').map(str::trim);
        let stage = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(bad)?
            .to_owned();
        let path: Vec<String> = parts.map(str::to_owned).collect();
        if path.is_empty() || path.iter().any(String::is_empty) {
            return Err(bad());
        }
        let value = serde_yaml::from_str(rhs).map_err(|e| {
            ConfigError::new(file, format!("--set {text}: value is not valid YAML: {e}"))
        })?;
        Ok(Override { stage, path, value })
    }
}

/// Read, override, validate.
pub fn load(
    file: &Path,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, ConfigError> {
    let bytes = std::fs::read(file).map_err(|e| {
        let err = ConfigError::new(file, format!("cannot read the pipeline file: {e}"));
        if e.kind() == std::io::ErrorKind::NotFound {
            err.hint("run goemo in the project folder, or pass --pipeline FILE")
        } else {
            err
        }
    })?;
    let text =
        String::from_utf8(bytes).map_err(|e| not_utf8(file, e.as_bytes(), &e.utf8_error()))?;
    let root = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    parse(&text, file, &root, overrides, registry)
}

/// [`load`] for text that is not on disk yet (an edit about to be written to `file`).
pub fn load_text(text: &str, file: &Path, registry: &Registry) -> Result<Pipeline, ConfigError> {
    let root = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parse(text, file, &root, &[], registry)
}

/// Where the first byte that is not UTF-8 is, as a line and column a person can go to.
fn not_utf8(file: &Path, bytes: &[u8], e: &std::str::Utf8Error) -> ConfigError {
    let offset = e.valid_up_to();
    // Everything before `offset` is valid UTF-8.
    let before = std::str::from_utf8(&bytes[..offset]).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    ConfigError::new(
        file,
        format!(
            "not valid UTF-8: byte 0x{:02x} at offset {offset}",
            bytes.get(offset).copied().unwrap_or_default()
        ),
    )
    .at(Some((line, column)))
    .hint(format!(
        "save {name} as UTF-8 (an editor's \"encoding\" setting, or `iconv -f latin1 -t utf-8`)"
    ))
}

/// parse → resolve deps → validate → order: each step a function below, each error located.
pub fn parse(
    text: &str,
    file: &Path,
    root: &Path,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, ConfigError> {
    let locate = |path: &[&str]| locate(text, path);
    let src = Source {
        file,
        locate: &locate,
    };
    let mut parsed = parse_stages(text, &src, overrides, registry)?;
    check_overrides(&src, overrides, &parsed)?;
    if parsed.defs.is_empty() {
        return Err(src.err("no stages declared").at(src.at(&["stages"])));
    }
    resolve_deps(&src, &mut parsed)?;
    validate(&src, root, &parsed.defs)?;
    order(&src, root, parsed)
}

/// The file being read and how to find a key's place in it.
struct Source<'a> {
    file: &'a Path,
    locate: Locate<'a>,
}

impl Source<'_> {
    fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, message)
    }
    fn at(&self, path: &[&str]) -> Option<(usize, usize)> {
        (self.locate)(path)
    }
}

/// Stages in declaration order, before their deps are resolved.
struct Parsed {
    defs: Vec<StageDef>,
    names: HashMap<String, usize>,
    /// Per stage, role → upstream name; a listed dep's role is `\0` + its name until resolved.
    raw_deps: Vec<BTreeMap<String, String>>,
}

/// Step 1: the YAML into stage definitions with resolved params.
fn parse_stages(
    text: &str,
    src: &Source<'_>,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Parsed, ConfigError> {
    let raw: RawPipeline = serde_yaml::from_str(text).map_err(|e| yaml_error(src.file, &e))?;
    let mut parsed = Parsed {
        defs: Vec::new(),
        names: HashMap::new(),
        raw_deps: Vec::new(),
    };
    for (key, value) in raw.stages {
        let name = match key {
            serde_yaml::Value::String(s) => s,
            other => {
                return Err(src.err(format!(
                    "stage names must be strings, found {}",
                    yaml_inline(&other)
                )))
            }
        };
        if parsed.names.contains_key(&name) {
            return Err(src
                .err(format!("stage `{name}` is declared twice"))
                .at(src.at(&["stages", &name]))
                .hint("stage names must be unique; rename one of them"));
        }
        let (def, deps) = parse_stage(name, value, src, overrides, registry)?;
        parsed.names.insert(def.name.clone(), parsed.defs.len());
        parsed.raw_deps.push(deps);
        parsed.defs.push(def);
    }
    Ok(parsed)
}

/// One stage's YAML: its kind looked up, params resolved, deps still unresolved.
fn parse_stage(
    name: String,
    value: serde_yaml::Value,
    src: &Source<'_>,
    overrides: &[Override],
    registry: &Registry,
) -> Result<(StageDef, BTreeMap<String, String>), ConfigError> {
    let at = || src.at(&["stages", &name]);
    let raw_stage: RawStage = serde_yaml::from_value(value).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next());
        let field_at = field.and_then(|f| src.at(&["stages", &name, f]));
        src.err(msg.clone())
            .stage(&name)
            .at(field_at.or_else(at))
            .hint(format!("a stage takes: {STAGE_KEYS}"))
    })?;
    let kind = raw_stage.kind.clone().unwrap_or_else(|| name.clone());
    let stage: Arc<dyn Stage> = registry.find(&kind).ok_or_else(|| {
        src.err(format!("unknown stage kind `{kind}`"))
            .stage(&name)
            .at(src.at(&["stages", &name, "kind"]).or_else(at))
            .hint(format!(
                "kinds are: {}; set `kind:` when the name is not a kind",
                registry.kinds().join(", ")
            ))
    })?;
    let params = resolve_params(&name, stage.as_ref(), raw_stage.params, src, overrides)?;
    let deps = match raw_stage.deps {
        None => BTreeMap::new(),
        Some(RawDeps::Map(m)) => m,
        // The role of a listed upstream is its kind, resolved once every stage is known.
        Some(RawDeps::List(list)) => list.into_iter().map(|up| (format!("\0{up}"), up)).collect(),
    };
    let inputs = raw_stage
        .inputs
        .into_iter()
        .map(|(k, v)| (k, PathBuf::from(v)))
        .collect();
    let def = StageDef {
        name,
        kind,
        stage,
        deps: BTreeMap::new(),
        inputs,
        params,
        publish: publish_entries(raw_stage.publish),
    };
    Ok((def, deps))
}

/// `--set` overrides applied to a stage's raw params, then the stage's own resolution.
fn resolve_params(
    name: &str,
    stage: &dyn Stage,
    mut raw: serde_yaml::Value,
    src: &Source<'_>,
    overrides: &[Override],
) -> Result<serde_json::Value, ConfigError> {
    for o in overrides.iter().filter(|o| o.stage == name) {
        set_path(&mut raw, &o.path, o.value.clone());
    }
    stage.resolve_params(&raw).map_err(|e| {
        let what = e
            .param
            .as_ref()
            .map(|p| format!("param `{p}`"))
            .unwrap_or("params".into());
        let param_at = e.param.as_deref().and_then(|p| {
            let mut path = vec!["stages", name, "params"];
            path.extend(p.split('.'));
            src.at(&path)
        });
        let from_set = overrides
            .iter()
            .any(|o| o.stage == name && e.param.as_deref().is_none_or(|p| o.path.join(".") == p));
        let mut err = src
            .err(e.message.clone())
            .stage(name)
            .what(what)
            .at(param_at
                .or_else(|| src.at(&["stages", name, "params"]))
                .or_else(|| src.at(&["stages", name])));
        if from_set {
            err = err.hint("this value came from --set; check its spelling and type");
        }
        err
    })
}

fn publish_entries(raw: Option<RawPublish>) -> Vec<Publish> {
    match raw {
        None => Vec::new(),
        Some(RawPublish::List(l)) => l
            .into_iter()
            .map(|p| {
                // `out/x` publishes as outputs/x.
                let to = p
                    .strip_prefix("out/")
                    .or_else(|| p.strip_prefix("volatile/"))
                    .unwrap_or(&p)
                    .to_owned();
                Publish { from: p, to }
            })
            .collect(),
        Some(RawPublish::Map(m)) => m
            .into_iter()
            .map(|(from, to)| Publish { from, to })
            .collect(),
    }
}

/// Every `--set` names a declared stage.
fn check_overrides(
    src: &Source<'_>,
    overrides: &[Override],
    parsed: &Parsed,
) -> Result<(), ConfigError> {
    match overrides
        .iter()
        .find(|o| !parsed.names.contains_key(&o.stage))
    {
        None => Ok(()),
        Some(o) => Err(src
            .err(format!("--set {}: no stage named `{}`", o.stage, o.stage))
            .hint(format!("stages are: {}", stage_names(&parsed.defs)))),
    }
}

fn stage_names(defs: &[StageDef]) -> String {
    defs.iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Step 2: each dep names a declared stage (not itself) and fills one role.
fn resolve_deps(src: &Source<'_>, parsed: &mut Parsed) -> Result<(), ConfigError> {
    let raw_deps = std::mem::take(&mut parsed.raw_deps);
    for (i, deps) in raw_deps.into_iter().enumerate() {
        let name = parsed.defs[i].name.clone();
        let deps_at = || src.at(&["stages", &name, "deps"]);
        let mut resolved = BTreeMap::new();
        for (role, up) in deps {
            let Some(&u) = parsed.names.get(&up) else {
                return Err(src
                    .err(format!("upstream stage `{up}` does not exist"))
                    .stage(&name)
                    .what("deps")
                    .at(deps_at())
                    .hint(format!("stages are: {}", stage_names(&parsed.defs))));
            };
            if u == i {
                return Err(src
                    .err(format!("cycle: {name} → {name}"))
                    .stage(&name)
                    .what("deps")
                    .at(deps_at()));
            }
            let role = match role.strip_prefix('\0') {
                Some(_) => role_for_kind(&parsed.defs[i], &parsed.defs[u].kind),
                None => role,
            };
            if resolved.insert(role.clone(), up).is_some() {
                return Err(src
                    .err(format!("two upstream stages fill the role `{role}`"))
                    .stage(&name)
                    .what("deps")
                    .at(deps_at())
                    .hint("name the roles explicitly: deps: {role_a: stage1, role_b: stage2}"));
            }
        }
        parsed.defs[i].deps = resolved;
    }
    Ok(())
}

/// Step 3: roles against what each kind accepts, external inputs, publish entries.
fn validate(src: &Source<'_>, root: &Path, defs: &[StageDef]) -> Result<(), ConfigError> {
    let kinds: HashMap<&str, &str> = defs
        .iter()
        .map(|d| (d.name.as_str(), d.kind.as_str()))
        .collect();
    for def in defs {
        check_roles(def, &kinds, src.file, src.locate)?;
        check_inputs(def, root, src)?;
        check_publish(def, src.file, src.locate)?;
    }
    check_publish_overlaps(defs, src.file, src.locate)
}

/// External inputs exist, are data, and are not also deps.
fn check_inputs(def: &StageDef, root: &Path, src: &Source<'_>) -> Result<(), ConfigError> {
    for (role, path) in &def.inputs {
        let at = || src.at(&["stages", &def.name, "inputs", role]);
        if def.deps.contains_key(role) {
            return Err(src
                .err(format!(
                    "input `{role}` is given both in deps and in inputs"
                ))
                .stage(&def.name)
                .at(at()));
        }
        if !root.join(path).exists() {
            return Err(src
                .err(format!("input path `{}` does not exist", path.display()))
                .stage(&def.name)
                .what(format!("input `{role}`"))
                .at(at())
                .hint(missing_input_hint(role)));
        }
        if let Some(why) = not_data(&root.join(path)) {
            return Err(src
                .err(format!("input path `{}` {why}", path.display()))
                .stage(&def.name)
                .what(format!("input `{role}`"))
                .at(at())
                .hint(
                    "an input is a regular file or a folder of them, which goemo hashes by content",
                ));
        }
    }
    Ok(())
}

/// Step 4: a topological order (ties by declaration), or the cycle as an error.
fn order(src: &Source<'_>, root: &Path, parsed: Parsed) -> Result<Pipeline, ConfigError> {
    let Parsed { defs, names, .. } = parsed;
    let ups: Vec<Vec<usize>> = defs
        .iter()
        .map(|d| d.deps.values().map(|u| names[u.as_str()]).collect())
        .collect();
    let order = crate::dag::topo_order(&ups).map_err(|cycle| {
        let cycle: Vec<&str> = cycle.iter().map(|&i| defs[i].name.as_str()).collect();
        let first = cycle[0];
        src.err(format!("cycle: {}", cycle.join(" → ")))
            .stage(first)
            .what("deps")
            .at(src.at(&["stages", first, "deps"]))
            .hint("a stage cannot depend, directly or through others, on itself; remove one of these deps")
    })?;
    let mut position = vec![0usize; defs.len()];
    for (new, &old) in order.iter().enumerate() {
        position[old] = new;
    }
    let mut slots: Vec<Option<StageDef>> = defs.into_iter().map(Some).collect();
    let stages: Vec<StageDef> = order.iter().filter_map(|&i| slots[i].take()).collect();
    let graph = crate::dag::Graph::new(
        order
            .iter()
            .map(|&old| ups[old].iter().map(|&u| position[u]).collect())
            .collect(),
    );
    let index = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    Ok(Pipeline {
        file: src.file.to_path_buf(),
        root: root.to_path_buf(),
        stages,
        index,
        graph,
    })
}

/// Each publish entry: a source inside the stage's result and a plain relative target inside
/// outputs/. Checked here so that a bad entry never reaches the run, which would move or write
/// files outside `outputs/`.
fn check_publish(def: &StageDef, file: &Path, locate: Locate<'_>) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for p in &def.publish {
        let err = |message: String| {
            let at = locate(&["stages", &def.name, "publish", &p.from])
                .or_else(|| locate(&["stages", &def.name, "publish"]));
            ConfigError::new(file, message)
                .stage(&def.name)
                .what("publish")
                .at(at)
        };
        let in_result = p.from.starts_with("out/")
            || p.from.starts_with("volatile/")
            || p.from == "out"
            || p.from == "volatile";
        if !in_result {
            return Err(err(format!(
                "publish source `{}` must start with `out/` or `volatile/`",
                p.from
            ))
            .hint("e.g. publish: {out/model: model, volatile/report.html: report.html}"));
        }
        if let Some(why) = bad_relative_path(&p.from) {
            return Err(err(format!("publish source `{}` {why}", p.from)).hint(
                "a source is a path inside the stage's result, e.g. `out/model` or `volatile/report.html`",
            ));
        }
        if let Some(why) = bad_publish_target(&p.to) {
            return Err(err(format!("publish target `{}` {why}", p.to)).hint(
                "a target is a path relative to outputs/, e.g. `thresholds.json` or `reports/metrics.json`",
            ));
        }
        if !seen.insert(p.to.clone()) {
            return Err(err(format!("publish target `{}` is given twice", p.to))
                .hint("give each published file its own target under outputs/"));
        }
    }
    Ok(())
}

/// Why `path` is not a plain relative path (`a/b.json`), if it is not.
fn bad_relative_path(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("is empty");
    }
    if path.starts_with('/') {
        return Some("is an absolute path");
    }
    if path.ends_with('/') {
        return Some("ends with `/`; drop the trailing `/`");
    }
    if path.contains('\0') {
        return Some("contains a NUL byte");
    }
    for component in path.split('/') {
        match component {
            "" => return Some("has an empty component (`//`)"),
            "." => return Some("has a `.` component"),
            ".." => return Some("has a `..` component, which would leave its folder"),
            _ => {}
        }
    }
    None
}

/// Why `target` cannot be a path under outputs/, if it cannot.
fn bad_publish_target(target: &str) -> Option<&'static str> {
    if let Some(why) = bad_relative_path(target) {
        return Some(why);
    }
    if target == crate::reserved::STATE_FILE {
        return Some("is goemo's own record of what it published");
    }
    if target.split('/').any(crate::reserved::is_leftover_name) {
        return Some("has the form of goemo's temp names, which a run removes");
    }
    None
}

/// Two stages may not publish the same target, and no target may lie inside another: replacing
/// the outer folder would delete the inner one.
fn check_publish_overlaps(
    defs: &[StageDef],
    file: &Path,
    locate: Locate<'_>,
) -> Result<(), ConfigError> {
    let mut targets: Vec<(&str, &str)> = Vec::new();
    for def in defs {
        for p in &def.publish {
            for &(other_target, other_stage) in &targets {
                let (outer, inner) = if p.to.len() >= other_target.len() {
                    (other_target, p.to.as_str())
                } else {
                    (p.to.as_str(), other_target)
                };
                let by = if other_stage == def.name {
                    format!("both published by `{other_stage}`")
                } else {
                    format!("published by `{other_stage}` and `{}`", def.name)
                };
                let message = if p.to == other_target {
                    format!("outputs/{} is {by}", p.to)
                } else if inner
                    .strip_prefix(outer)
                    .is_some_and(|r| r.starts_with('/'))
                {
                    format!("outputs/{inner} lies inside outputs/{outer} ({by})")
                } else {
                    continue;
                };
                return Err(ConfigError::new(file, message)
                    .stage(&def.name)
                    .what("publish")
                    .at(locate(&["stages", &def.name, "publish", &p.from])
                        .or_else(|| locate(&["stages", &def.name, "publish"])))
                    .hint("give each published file or folder its own place under outputs/"));
            }
            targets.push((&p.to, &def.name));
        }
    }
    Ok(())
}

/// The role an unnamed dep fills: the role whose accepted kinds include the upstream's kind,
/// else the kind itself.
fn role_for_kind(def: &StageDef, kind: &str) -> String {
    if let Inputs::Fixed(specs) = def.stage.inputs() {
        if let Some(spec) = specs.iter().find(|s| s.from_kinds.contains(&kind)) {
            return spec.role.to_owned();
        }
    }
    kind.to_owned()
}

/// Why an existing input path is not data goemo can hash (a device, FIFO or socket would block
/// or never end; /proc and /sys are kernel state that changes under the reader), if it is not.
fn not_data(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot be read: {e}")),
    };
    if !meta.is_file() && !meta.is_dir() {
        return Some(format!(
            "is {}, not a regular file or folder",
            crate::hashing::file_type_name(&meta.file_type())
        ));
    }
    let real = std::fs::canonicalize(path).ok()?;
    ["/proc", "/sys"]
        .iter()
        .find(|k| real.starts_with(k))
        .map(|k| format!("lies under {k} (kernel state, not data)"))
}

/// Where an input lies when it is outside the project folder (`../data`, `/srv/data`): absolute,
/// with `.` and `..` resolved lexically. `None` for an input inside the project.
pub fn external_location(root: &Path, input: &Path) -> Option<PathBuf> {
    let root_abs = lexical_normal(&std::path::absolute(root).ok()?);
    let full = lexical_normal(&std::path::absolute(root.join(input)).ok()?);
    (!full.starts_with(&root_abs)).then_some(full)
}

fn lexical_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn missing_input_hint(role: &str) -> String {
    match role {
        "data" => "run ./setup.sh (it puts GoEmotions in data/goemotions), or point inputs.data at your copy".into(),
        "model" => "run ./setup.sh (it unpacks all-MiniLM-L6-v2 into models/), or point inputs.model at a local HF model folder".into(),
        _ => "create it, or fix the path (relative to the folder holding pipeline.yaml)".into(),
    }
}

/// Finds the (line, column) of a key path in pipeline.yaml, where the YAML has it.
type Locate<'a> = &'a dyn Fn(&[&str]) -> Option<(usize, usize)>;

/// `kinds`: each stage's kind, by name.
fn check_roles(
    def: &StageDef,
    kinds: &HashMap<&str, &str>,
    file: &Path,
    locate: Locate<'_>,
) -> Result<(), ConfigError> {
    let Inputs::Fixed(specs) = def.stage.inputs() else {
        return Ok(());
    };
    let accepted = || {
        specs
            .iter()
            .map(|s| {
                format!(
                    "{} ({}{})",
                    s.role,
                    s.what,
                    if s.required { "" } else { ", optional" }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    for role in def.deps.keys().chain(def.inputs.keys()) {
        if !specs.iter().any(|s| s.role == role) {
            let section = if def.deps.contains_key(role) {
                "deps"
            } else {
                "inputs"
            };
            return Err(ConfigError::new(
                file,
                format!("kind `{}` takes no input `{role}`", def.kind),
            )
            .stage(&def.name)
            .what(section)
            .at(locate(&["stages", &def.name, section]))
            .hint(format!("it takes: {}", accepted())));
        }
    }
    // An upstream must be of a kind the role takes; a `command` stage may write anything.
    for (role, up) in &def.deps {
        let Some(spec) = specs.iter().find(|s| s.role == role) else {
            continue;
        };
        let up_kind = kinds.get(up.as_str()).copied().unwrap_or_default();
        if up_kind == "command" || spec.from_kinds.contains(&up_kind) {
            continue;
        }
        let hint = if spec.from_kinds.is_empty() {
            format!("`{role}` is a file or folder: give it as `inputs: {{{role}: PATH}}`")
        } else {
            format!(
                "give `{role}` a stage of kind {}: `deps: {{{role}: STAGE}}`",
                spec.from_kinds.join(" or ")
            )
        };
        return Err(ConfigError::new(
            file,
            format!(
                "input `{role}` takes {}, but `{up}` is a `{up_kind}` stage",
                spec.what
            ),
        )
        .stage(&def.name)
        .what("deps")
        .at(locate(&["stages", &def.name, "deps", role])
            .or_else(|| locate(&["stages", &def.name, "deps"])))
        .hint(hint));
    }
    for spec in specs.iter().filter(|s| s.required) {
        if !def.deps.contains_key(spec.role) && !def.inputs.contains_key(spec.role) {
            return Err(ConfigError::new(
                file,
                format!("missing input `{}` ({})", spec.role, spec.what),
            )
            .stage(&def.name)
            .at(locate(&["stages", &def.name]))
            .hint(if spec.from_kinds.is_empty() {
                format!("add `inputs: {{{}: PATH}}`", spec.role)
            } else {
                format!(
                    "add a stage of kind {} to `deps`, or `deps: {{{}: STAGE}}`",
                    spec.from_kinds.join(" or "),
                    spec.role
                )
            }));
        }
    }
    Ok(())
}

fn set_path(target: &mut serde_yaml::Value, path: &[String], value: serde_yaml::Value) {
    if path.is_empty() {
        *target = value;
        return;
    }
    if !target.is_mapping() {
        *target = serde_yaml::Value::Mapping(Default::default());
    }
    let map = target.as_mapping_mut().expect("just made a mapping");
    let key = serde_yaml::Value::String(path[0].clone());
    let entry = map.entry(key).or_insert(serde_yaml::Value::Null);
    set_path(entry, &path[1..], value);
}

fn yaml_error(file: &Path, e: &serde_yaml::Error) -> ConfigError {
    let at = e.location().map(|l| (l.line(), l.column()));
    let mut msg = e.to_string();
    // serde_yaml appends " at line X column Y"; the location is already in front.
    if let Some(pos) = msg.find(" at line ") {
        msg.truncate(pos);
    }
    let hint = if msg.contains("unknown field") && !msg.contains("stages.") {
        "the file has one top-level key, `stages:`"
    } else if msg.contains("duplicate entry") {
        "stage names must be unique; rename one of them"
    } else {
        "check the indentation and the `key: value` syntax there"
    };
    ConfigError::new(file, msg).at(at).hint(hint)
}

fn yaml_inline(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Line and column (1-based) of the key at `path` in block-style YAML: each segment is searched
/// below the previous one at a deeper indentation. Good enough to point at a key; `None` when
/// the file uses flow style there.
pub fn locate(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for seg in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let content = line.trim_start();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let indent = line.len() - content.len();
            // Left the parent's block: the key is not there.
            if parent_indent.is_some_and(|p| indent <= p) {
                break;
            }
            let key = content.trim_start_matches("- ");
            let matches = key.strip_prefix(seg).is_some_and(|r| r.starts_with(':'))
                || key
                    .strip_prefix(&format!("\"{seg}\""))
                    .is_some_and(|r| r.starts_with(':'))
                || key
                    .strip_prefix(&format!("'{seg}'"))
                    .is_some_and(|r| r.starts_with(':'));
            if matches {
                hit = Some((i, indent));
                break;
            }
        }
        // Not there (flow style, or a key serde made up): point at the closest enclosing key.
        let Some((i, indent)) = hit else { return found };
        found = Some((i + 1, indent + 1));
        parent_indent = Some(indent);
        start = i + 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_nested_keys() {
        let text = "stages:\n  a:\n    params:\n      lr: 1\n  b:\n    params:\n      lr: 2\n";
        assert_eq!(locate(text, &["stages", "b", "params", "lr"]), Some((7, 7)));
        assert_eq!(locate(text, &["stages", "a", "params", "lr"]), Some((4, 7)));
        assert_eq!(locate(text, &["stages", "a", "kind"]), Some((2, 3)));
        assert_eq!(locate(text, &["nope"]), None);
    }

    #[test]
    fn override_parses_yaml_values() {
        let o = Override::parse("train.lr=3e-5", Path::new("p.yaml")).unwrap();
        assert_eq!(o.stage, "train");
        assert_eq!(o.path, vec!["lr"]);
        assert_eq!(o.value.as_f64(), Some(3e-5));
        assert!(Override::parse("train=3", Path::new("p.yaml")).is_err());
    }
}
