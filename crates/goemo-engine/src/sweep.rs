//! Sweeps: `--set` values that expand into the members of an experiment grid or a random search.
//!
//! ```text
//! --set train.lr=3e-5,1e-4 --set train.epochs=2,3     grid: 4 members, the last flag varies fastest
//! --set train.pos_weight=[1,2,3],auto                 brackets keep a list one value: 2 members
//! --set train.lr=log(1e-5,1e-3) --random 8 --seed 1   8 members, lr log-uniform
//!     range(a,b): uniform · log(a,b): log-uniform · int(a,b): integers a..=b · a,b,c: a choice
//! ```
//!
//! A sweep file says the same in YAML (a list is a grid axis; a list value is a list in a list):
//!
//! ```yaml
//! sweep:
//!   name: lr-pw                  # members are lr-pw-1, lr-pw-2, …
//!   set:
//!     sample.fraction: 0.2
//!     train.lr: [5.0e-5, 1.0e-4]
//!     train.pos_weight: [none, auto]
//!   random: {n: 8, seed: 1}      # optional: sample n members instead of the grid
//! ```
//!
//! Sampled floats are rounded to three significant digits, so member params (and their stage
//! keys) read as `lr: 3.16e-5`, and a rerun of the same command draws the same members.

use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::pipeline::Override;

/// The values one `--set` ranges over.
#[derive(Debug, Clone, PartialEq)]
pub enum Axis {
    /// A grid axis, or a choice in a random search; each value as its YAML text.
    Values(Vec<String>),
    Uniform(f64, f64),
    LogUniform(f64, f64),
    Int(i64, i64),
}

/// One `STAGE.PARAM=…` of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepParam {
    /// `train.lr`
    pub name: String,
    pub axis: Axis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Random {
    pub n: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub params: Vec<SweepParam>,
    pub random: Option<Random>,
}

/// One member of a sweep: its overrides, as `STAGE.PARAM=VALUE` texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub set: Vec<String>,
}

impl Member {
    pub fn overrides(&self, file: &Path) -> Result<Vec<Override>, ConfigError> {
        self.set.iter().map(|s| Override::parse(s, file)).collect()
    }
}

impl SweepSpec {
    /// True when it expands to more than one member.
    pub fn is_sweep(&self) -> bool {
        self.random.is_some()
            || self
                .params
                .iter()
                .any(|p| !matches!(&p.axis, Axis::Values(v) if v.len() == 1))
    }

    /// The members: the grid's cartesian product, or `random.n` draws.
    pub fn expand(&self, file: &Path) -> Result<Vec<Member>, ConfigError> {
        match self.random {
            None => self.grid(file),
            Some(r) => Ok(self.sample(r)),
        }
    }

    fn grid(&self, file: &Path) -> Result<Vec<Member>, ConfigError> {
        let mut members = vec![Member { set: Vec::new() }];
        for p in &self.params {
            let Axis::Values(values) = &p.axis else {
                return Err(ConfigError::new(
                    file,
                    format!("--set {}: a range is sampled, not a grid axis", p.name),
                )
                .hint(
                    "add --random N (and --seed S) to sample N members, or list the values: a,b,c",
                ));
            };
            members = members
                .into_iter()
                .flat_map(|m| {
                    values.iter().map(move |v| {
                        let mut set = m.set.clone();
                        set.push(format!("{}={v}", p.name));
                        Member { set }
                    })
                })
                .collect();
        }
        Ok(members)
    }

    fn sample(&self, r: Random) -> Vec<Member> {
        let mut rng = SplitMix64(r.seed);
        (0..r.n)
            .map(|_| Member {
                set: self
                    .params
                    .iter()
                    .map(|p| format!("{}={}", p.name, draw(&p.axis, &mut rng)))
                    .collect(),
            })
            .collect()
    }
}

fn draw(axis: &Axis, rng: &mut SplitMix64) -> String {
    match axis {
        Axis::Values(v) => v[(rng.next() % v.len() as u64) as usize].clone(),
        Axis::Uniform(lo, hi) => three_digits(lo + (hi - lo) * rng.unit()),
        Axis::LogUniform(lo, hi) => {
            three_digits((lo.ln() + (hi.ln() - lo.ln()) * rng.unit()).exp())
        }
        Axis::Int(lo, hi) => {
            let span = (hi - lo) as u64 + 1;
            (lo + (rng.next() % span) as i64).to_string()
        }
    }
}

/// `x` to three significant digits, as YAML reads it back (`3.16e-5`, `0.25`).
fn three_digits(x: f64) -> String {
    let text = format!("{x:.2e}");
    let rounded: f64 = text.parse().unwrap_or(x);
    if (1e-3..1e4).contains(&rounded.abs()) {
        // Plain decimals read better where they are short.
        let plain = format!("{rounded}");
        if plain.len() <= 8 {
            return plain;
        }
    }
    let (mantissa, exp) = text.split_once('e').unwrap_or((&text, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exp}")
}

/// A small, fixed generator: the same seed draws the same members on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Parse `STAGE.PARAM=v1,v2,…` or `STAGE.PARAM=log(a,b)` (and `range`, `int`).
pub fn parse_set(text: &str, file: &Path) -> Result<SweepParam, ConfigError> {
    let err = |msg: String| ConfigError::new(file, format!("--set {text}: {msg}"));
    let Some((name, rhs)) = text.split_once('=') else {
        return Err(err("expected STAGE.PARAM=VALUE".into())
            .hint("e.g. --set train.lr=3e-5,1e-4 or --set train.lr=log(1e-5,1e-3) --random 8"));
    };
    let name = name.trim().to_owned();
    // The name's own checks (a stage, a param) are Override::parse's.
    Override::parse(&format!("{name}=0"), file)?;
    let rhs = rhs.trim();
    if let Some(axis) = parse_range(rhs).map_err(err)? {
        return Ok(SweepParam { name, axis });
    }
    let values = split_top_level(rhs).map_err(err)?;
    if values.iter().any(|v| v.trim().is_empty()) {
        return Err(err(if values.len() == 1 {
            "no value (an empty grid)".into()
        } else {
            "an empty value in the list".into()
        })
        .hint("give one value or several separated by commas: train.lr=3e-5,1e-4; quote a value that holds a comma"));
    }
    for v in &values {
        serde_yaml::from_str::<serde_yaml::Value>(v)
            .map_err(|e| err(format!("`{v}` is not a valid YAML value: {e}")))?;
    }
    Ok(SweepParam {
        name,
        axis: Axis::Values(values.into_iter().map(|v| v.trim().to_owned()).collect()),
    })
}

/// `range(a,b)`, `log(a,b)` or `int(a,b)`; `None` when `rhs` is not one.
fn parse_range(rhs: &str) -> Result<Option<Axis>, String> {
    let Some((func, rest)) = rhs.split_once('(') else {
        return Ok(None);
    };
    if !matches!(func, "range" | "log" | "int") {
        return Ok(None);
    }
    let args = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("`{rhs}`: missing the closing parenthesis"))?;
    let (a, b) = args
        .split_once(',')
        .ok_or_else(|| format!("`{rhs}`: expected {func}(MIN,MAX)"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|_| format!("`{rhs}`: `{}` is not a number", s.trim()))
    };
    let (lo, hi) = (num(a)?, num(b)?);
    if lo > hi {
        return Err(format!("`{rhs}`: min {lo} is greater than max {hi}"));
    }
    match func {
        "range" => Ok(Some(Axis::Uniform(lo, hi))),
        "log" if lo <= 0.0 => Err(format!("`{rhs}`: a log range needs min > 0")),
        "log" => Ok(Some(Axis::LogUniform(lo, hi))),
        _ if lo.fract() != 0.0 || hi.fract() != 0.0 => {
            Err(format!("`{rhs}`: int(MIN,MAX) takes whole numbers"))
        }
        _ => Ok(Some(Axis::Int(lo as i64, hi as i64))),
    }
}

/// Split on commas outside brackets, braces and quotes: `[1,2],auto` → `[1,2]`, `auto`.
fn split_top_level(s: &str) -> Result<Vec<String>, String> {
    let (mut parts, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("`{s}`: a closing bracket without its opening one"));
        }
        cur.push(c);
    }
    if depth != 0 || quote.is_some() {
        return Err(format!("`{s}`: an unclosed bracket or quote"));
    }
    parts.push(cur);
    Ok(parts)
}

/// The `--set` flags of `goemo exp run` (and `--random N --seed S`) as a sweep.
pub fn from_flags(
    sets: &[String],
    random: Option<usize>,
    seed: u64,
    file: &Path,
) -> Result<SweepSpec, ConfigError> {
    let params = sets
        .iter()
        .map(|s| parse_set(s, file))
        .collect::<Result<Vec<_>, _>>()?;
    check_unique(&params, file)?;
    let random = match random {
        Some(0) => {
            return Err(ConfigError::new(file, "--random 0: no members to run")
                .hint("give the number of members to sample, e.g. --random 8"))
        }
        Some(n) => Some(Random { n, seed }),
        None => None,
    };
    Ok(SweepSpec { params, random })
}

fn check_unique(params: &[SweepParam], file: &Path) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    match params.iter().find(|p| !seen.insert(p.name.as_str())) {
        Some(p) => Err(
            ConfigError::new(file, format!("--set {}: given twice", p.name))
                .hint("list every value in one flag: --set train.lr=3e-5,1e-4"),
        ),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    sweep: SweepBlock,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepBlock {
    name: Option<String>,
    #[serde(default)]
    set: serde_yaml::Mapping,
    random: Option<RandomBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RandomBlock {
    n: usize,
    #[serde(default)]
    seed: u64,
}

/// A sweep file's `sweep:` block: its name (if any) and the spec.
pub fn from_file(path: &Path) -> Result<(Option<String>, SweepSpec), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read the sweep file: {e}")))?;
    let file: SweepFile = serde_yaml::from_str(&text).map_err(|e| {
        ConfigError::new(path, format!("not a valid sweep file: {e}"))
            .hint("expected `sweep:` with `set:` (STAGE.PARAM: value or [values]), and optionally `name:` and `random: {n: 8, seed: 1}`")
    })?;
    let mut params = Vec::new();
    for (k, v) in &file.sweep.set {
        let name = k.as_str().ok_or_else(|| {
            ConfigError::new(path, format!("sweep.set: key {k:?} is not STAGE.PARAM"))
        })?;
        let rhs = match v {
            serde_yaml::Value::Sequence(items) => items
                .iter()
                .map(yaml_text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConfigError::new(path, format!("sweep.set.{name}: {e}")))?
                .join(","),
            serde_yaml::Value::String(s) if parse_range(s).ok().flatten().is_some() => s.clone(),
            other => yaml_text(other)
                .map_err(|e| ConfigError::new(path, format!("sweep.set.{name}: {e}")))?,
        };
        if matches!(v, serde_yaml::Value::Sequence(items) if items.is_empty()) {
            return Err(ConfigError::new(
                path,
                format!("sweep.set.{name}: an empty list (an empty grid)"),
            )
            .hint("list at least one value"));
        }
        params.push(parse_set(&format!("{name}={rhs}"), path)?);
    }
    check_unique(&params, path)?;
    let random = match file.sweep.random {
        Some(RandomBlock { n: 0, .. }) => {
            return Err(ConfigError::new(
                path,
                "sweep.random.n is 0: no members to run",
            ))
        }
        Some(r) => Some(Random {
            n: r.n,
            seed: r.seed,
        }),
        None => None,
    };
    Ok((file.sweep.name, SweepSpec { params, random }))
}

/// One value as flow-style YAML text (`[1, 2]`, `auto`, `0.0001`).
fn yaml_text(v: &serde_yaml::Value) -> Result<String, String> {
    let json = serde_json::to_string(v).map_err(|e| e.to_string())?;
    // JSON is flow YAML; a plain string reads back better unquoted when YAML agrees.
    if let serde_yaml::Value::String(s) = v {
        if serde_yaml::from_str::<serde_yaml::Value>(s).ok().as_ref() == Some(v) && !s.contains(',')
        {
            return Ok(s.clone());
        }
    }
    Ok(json)
}

/// Stable names: the same sweep (same flags) gets the same name, so a rerun resumes it.
pub fn default_name(prefix: &str, spec: &SweepSpec) -> String {
    let mut text = String::new();
    for p in &spec.params {
        text.push_str(&format!("{}={:?};", p.name, p.axis));
    }
    if let Some(r) = spec.random {
        text.push_str(&format!("random={},{}", r.n, r.seed));
    }
    let hash = blake3::hash(text.as_bytes()).to_hex();
    format!("{prefix}-{}", &hash[..8])
}

/// A member's overrides by name (`train.lr` → `3e-5`).
#[cfg(test)]
fn member_params(member: &Member) -> std::collections::BTreeMap<String, String> {
    member
        .set
        .iter()
        .filter_map(|s| s.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("pipeline.yaml")
    }

    #[test]
    fn a_grid_expands_with_the_last_flag_fastest_and_brackets_keep_lists_whole() {
        let spec = from_flags(
            &[
                "train.lr=3e-5,1e-4".into(),
                "train.pos_weight=[1, 2],auto".into(),
            ],
            None,
            0,
            p(),
        )
        .unwrap();
        let members = spec.expand(p()).unwrap();
        let sets: Vec<Vec<String>> = members.into_iter().map(|m| m.set).collect();
        assert_eq!(
            sets,
            vec![
                vec!["train.lr=3e-5", "train.pos_weight=[1, 2]"],
                vec!["train.lr=3e-5", "train.pos_weight=auto"],
                vec!["train.lr=1e-4", "train.pos_weight=[1, 2]"],
                vec!["train.lr=1e-4", "train.pos_weight=auto"],
            ]
        );
        assert!(spec.is_sweep());
        let one = from_flags(&["train.lr=3e-5".into()], None, 0, p()).unwrap();
        assert!(!one.is_sweep());
    }

    #[test]
    fn random_draws_are_seeded_rounded_and_inside_their_ranges() {
        let flags = [
            "train.lr=log(1e-5,1e-3)".to_owned(),
            "train.epochs=int(2,4)".to_owned(),
            "train.pos_weight=none,auto".to_owned(),
        ];
        let a = from_flags(&flags, Some(20), 7, p())
            .unwrap()
            .expand(p())
            .unwrap();
        let b = from_flags(&flags, Some(20), 7, p())
            .unwrap()
            .expand(p())
            .unwrap();
        assert_eq!(a, b, "the same seed draws the same members");
        let c = from_flags(&flags, Some(20), 8, p())
            .unwrap()
            .expand(p())
            .unwrap();
        assert_ne!(a, c);
        for m in &a {
            let params = member_params(m);
            let lr: f64 = params["train.lr"].parse().unwrap();
            assert!((1e-5..=1e-3).contains(&lr), "{lr}");
            let digits = format!("{lr:e}")
                .split('e')
                .next()
                .unwrap()
                .replace(['.', '-'], "");
            assert!(digits.len() <= 3, "three significant digits: {lr}");
            let epochs: i64 = params["train.epochs"].parse().unwrap();
            assert!((2..=4).contains(&epochs));
            assert!(["none", "auto"].contains(&params["train.pos_weight"].as_str()));
        }
        assert_eq!(three_digits(0.000031622), "3.16e-5");
        assert_eq!(three_digits(0.25), "0.25");
    }

    #[test]
    fn bad_sweeps_are_errors_that_say_what_to_do() {
        let msg = |flags: &[&str], random: Option<usize>| {
            let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            from_flags(&flags, random, 0, p())
                .and_then(|s| s.expand(p()))
                .unwrap_err()
                .to_string()
        };
        assert!(msg(&["train.lr="], None).contains("no value (an empty grid)"));
        assert!(msg(&["train.lr=1e-4,,3e-4"], None).contains("an empty value"));
        assert!(msg(&["train.lr=range(1e-3,1e-5)"], Some(4))
            .contains("min 0.001 is greater than max 0.00001"));
        assert!(msg(&["train.lr=log(0,1)"], Some(4)).contains("needs min > 0"));
        assert!(msg(&["train.lr=log(1e-5,1e-3)"], None).contains("add --random N"));
        assert!(msg(&["train.lr=1e-4"], Some(0)).contains("no members"));
        assert!(msg(&["train.lr=[1,2"], None).contains("unclosed bracket"));
        assert!(msg(&["train.lr=1", "train.lr=2"], None).contains("given twice"));
        assert!(msg(&["lr=1,2"], None).contains("STAGE.PARAM=VALUE"));
    }

    #[test]
    fn a_sweep_file_says_the_same_as_flags() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sweep.yaml");
        std::fs::write(
            &path,
            "sweep:\n  name: lr-pw\n  set:\n    sample.fraction: 0.2\n    train.lr: [5.0e-5, 1.0e-4]\n    train.pos_weight: [none, [1, 2]]\n",
        )
        .unwrap();
        let (name, spec) = from_file(&path).unwrap();
        assert_eq!(name.as_deref(), Some("lr-pw"));
        let sets: Vec<Vec<String>> = spec
            .expand(&path)
            .unwrap()
            .into_iter()
            .map(|m| m.set)
            .collect();
        assert_eq!(sets.len(), 4);
        assert_eq!(
            sets[1],
            vec![
                "sample.fraction=0.2",
                "train.lr=0.00005",
                "train.pos_weight=[1,2]"
            ]
        );
        std::fs::write(&path, "sweep:\n  set:\n    train.lr: []\n").unwrap();
        assert!(from_file(&path)
            .unwrap_err()
            .to_string()
            .contains("an empty list"));
        std::fs::write(&path, "sweep:\n  sett: {}\n").unwrap();
        assert!(from_file(&path)
            .unwrap_err()
            .to_string()
            .contains("not a valid sweep file"));
    }
}
