//! Stage keys and the reasons a stage is stale.
//!
//! A stage's key is blake3 over the canonical JSON of a [`Fingerprint`]:
//!
//! | part | why |
//! |---|---|
//! | `format` | bumping it invalidates every key when this encoding changes |
//! | `kind`, `version` | a new implementation of a stage must not reuse old results |
//! | `params` | after defaults, so writing a default out explicitly changes nothing |
//! | `inputs` | role → content hash: an upstream stage's output hash, or an external file/folder's |
//!
//! Deliberately left out: the stage's name (renaming keeps the cache), paths (moving the project
//! or the data keeps the cache), mtimes, the machine, the time. Canonical JSON means sorted map
//! keys (serde_json's default map is a BTreeMap) and serde_json's float format (5e-5 is written
//! `0.00005`; the golden key in the tests pins this).
//!
//! Because a downstream key holds the *output* hash of its upstream, a stage that re-runs and
//! writes the same bytes leaves everything downstream cached (early cutoff).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Bump when the encoding below changes.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub format: u32,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, InputHash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputHash {
    /// `stage` (an upstream's outputs) or `path` (an external file or folder).
    pub source: String,
    pub hash: String,
}

impl Fingerprint {
    pub fn key(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("a fingerprint always serializes");
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// Why a stage has to run (or was restored from an older cache entry).
#[derive(Debug, Clone, PartialEq)]
pub enum StaleReason {
    NeverRun,
    Forced(&'static str),
    KindChanged {
        old: String,
        new: String,
    },
    VersionChanged {
        old: u32,
        new: u32,
    },
    ParamChanged {
        param: String,
        old: Option<String>,
        new: Option<String>,
    },
    InputChanged {
        role: String,
        detail: Option<String>,
    },
    InputAdded {
        role: String,
    },
    InputRemoved {
        role: String,
    },
    UpstreamStale {
        role: String,
        upstream: String,
    },
    EntryMissing,
    EntryCorrupt(String),
}

impl fmt::Display for StaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StaleReason::NeverRun => write!(f, "never run"),
            StaleReason::Forced(why) => write!(f, "forced ({why})"),
            StaleReason::KindChanged { old, new } => write!(f, "kind changed {old} → {new}"),
            StaleReason::VersionChanged { old, new } => {
                write!(f, "implementation changed (version {old} → {new})")
            }
            StaleReason::ParamChanged { param, old, new } => match (old, new) {
                (Some(o), Some(n)) => write!(f, "param {param} changed {o} → {n}"),
                (None, Some(n)) => write!(f, "param {param} added ({n})"),
                (Some(o), None) => write!(f, "param {param} removed (was {o})"),
                (None, None) => write!(f, "param {param} changed"),
            },
            StaleReason::InputChanged { role, detail: None } => write!(f, "input {role} changed"),
            StaleReason::InputChanged {
                role,
                detail: Some(d),
            } => {
                write!(f, "input {role} changed ({d})")
            }
            StaleReason::InputAdded { role } => write!(f, "input {role} added"),
            StaleReason::InputRemoved { role } => write!(f, "input {role} removed"),
            StaleReason::UpstreamStale { role, upstream } if role == upstream => {
                write!(f, "input {role} will change ({upstream} is stale)")
            }
            StaleReason::UpstreamStale { role, upstream } => {
                write!(f, "input {role} will change (stage {upstream} is stale)")
            }
            StaleReason::EntryMissing => {
                write!(f, "its cache entry is gone (cleaned or new clone)")
            }
            StaleReason::EntryCorrupt(why) => write!(f, "its cache entry is damaged: {why}"),
        }
    }
}

/// What changed between the fingerprint a stage last ran with and the current one.
/// `file_detail` explains an external input's change from the files recorded before.
pub fn diff(
    old: &Fingerprint,
    new: &Fingerprint,
    file_detail: &dyn Fn(&str) -> Option<String>,
) -> Vec<StaleReason> {
    let mut reasons = Vec::new();
    if old.kind != new.kind {
        reasons.push(StaleReason::KindChanged {
            old: old.kind.clone(),
            new: new.kind.clone(),
        });
    }
    if old.version != new.version {
        reasons.push(StaleReason::VersionChanged {
            old: old.version,
            new: new.version,
        });
    }
    let (mut old_flat, mut new_flat) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old.params, &mut old_flat);
    flatten("", &new.params, &mut new_flat);
    let names: std::collections::BTreeSet<&String> =
        old_flat.keys().chain(new_flat.keys()).collect();
    for name in names {
        let (o, n) = (old_flat.get(name), new_flat.get(name));
        if o != n {
            reasons.push(StaleReason::ParamChanged {
                param: name.clone(),
                old: o.map(show_value),
                new: n.map(show_value),
            });
        }
    }
    for (role, n) in &new.inputs {
        match old.inputs.get(role) {
            None => reasons.push(StaleReason::InputAdded { role: role.clone() }),
            Some(o) if o.hash != n.hash => reasons.push(StaleReason::InputChanged {
                role: role.clone(),
                detail: if n.source == "path" {
                    file_detail(role)
                } else {
                    None
                },
            }),
            Some(_) => {}
        }
    }
    for role in old.inputs.keys().filter(|r| !new.inputs.contains_key(*r)) {
        reasons.push(StaleReason::InputRemoved { role: role.clone() });
    }
    if reasons.is_empty() && old.format != new.format {
        reasons.push(StaleReason::Forced("goemo's key format changed"));
    }
    reasons
}

/// `a.b` → leaf values; lists are leaves.
fn flatten<'a>(
    prefix: &str,
    v: &'a serde_json::Value,
    out: &mut BTreeMap<String, &'a serde_json::Value>,
) {
    match v {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned(), v);
        }
    }
}

/// A param value as a person writes it: `5e-5`, `0.2`, `true`, `fail`, `[1, 2]`.
pub fn show_value(v: &&serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() && x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e7) => {
                format!("{x:e}")
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Which files of an external input differ: `train.tsv modified, new.tsv added`.
pub fn describe_file_changes(
    old: &BTreeMap<String, crate::hashing::FileDigest>,
    new: &BTreeMap<String, crate::hashing::FileDigest>,
) -> String {
    let mut parts = Vec::new();
    for (p, d) in new {
        match old.get(p) {
            None => parts.push(format!("{p} added")),
            Some(o) if o != d => parts.push(format!("{p} modified")),
            _ => {}
        }
    }
    for p in old.keys().filter(|p| !new.contains_key(*p)) {
        parts.push(format!("{p} removed"));
    }
    const SHOWN: usize = 4;
    if parts.len() > SHOWN {
        let more = parts.len() - SHOWN;
        parts.truncate(SHOWN);
        parts.push(format!("{more} more"));
    }
    // A lone-file input records itself as `.`.
    parts
        .iter()
        .map(|p| {
            p.strip_prefix(". ")
                .map_or(p.clone(), |r| format!("the file {r}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp(params: serde_json::Value, input: &str) -> Fingerprint {
        Fingerprint {
            format: FORMAT,
            kind: "train".into(),
            version: 1,
            params,
            inputs: BTreeMap::from([(
                "tokenize".to_owned(),
                InputHash {
                    source: "stage".into(),
                    hash: input.into(),
                },
            )]),
        }
    }

    #[test]
    fn key_is_pinned_and_ignores_map_order() {
        let a = fp(json!({"lr": 5e-5, "epochs": 3}), "abc");
        let b: Fingerprint = serde_json::from_str(
            r#"{"inputs":{"tokenize":{"hash":"abc","source":"stage"}},"params":{"epochs":3,"lr":5e-5},"version":1,"kind":"train","format":1}"#,
        )
        .unwrap();
        assert_eq!(a.key(), b.key());
        // Golden: changing the encoding must be a deliberate FORMAT bump.
        assert_eq!(
            a.key(),
            "0f90956960cbd57df17a2ea76ec2efafd0549b2363b6850363e716106e441f37"
        );
        assert_ne!(a.key(), fp(json!({"lr": 3e-5, "epochs": 3}), "abc").key());
    }

    #[test]
    fn diff_says_what_changed_as_a_person_would() {
        let old = fp(
            json!({"lr": 5e-5, "epochs": 3, "opt": {"beta": 0.9}}),
            "abc",
        );
        let new = fp(
            json!({"lr": 3e-5, "epochs": 3, "opt": {"beta": 0.95}}),
            "def",
        );
        let reasons: Vec<String> = diff(&old, &new, &|_| None)
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            reasons,
            vec![
                "param lr changed 5e-5 → 3e-5",
                "param opt.beta changed 0.9 → 0.95",
                "input tokenize changed"
            ]
        );
    }
}
