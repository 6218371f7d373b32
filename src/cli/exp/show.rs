//! `goemo exp show` and `goemo exp diff`: tables built from the experiment records (and the
//! baseline's lock and cache entries); nothing is re-run or re-hashed, so hundreds of
//! experiments list in milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use goemo_engine::engine::Engine;
use goemo_engine::error::ConfigError;
use goemo_engine::experiment::{self, ExperimentRecord, Status, BASELINE};
use goemo_engine::lockfile::LockFile;
use serde_json::{json, Value};

use crate::cli::args::{ExpDiffArgs, ExpShowArgs};

/// The kinds of stage whose params change the data every metric is measured on: rows that
/// differ in one of them are not compared when the best is chosen.
const DATA_KINDS: &[&str] = &["load", "sample"];

/// The columns shown by default, when the stages report them (test figures are shown, never
/// used to choose).
const DEFAULT_METRICS: &[&str] = &[
    "thresholds.dev_macro_f1",
    "train.dev_macro_f1",
    "evaluate.test_macro_f1_tuned",
    "evaluate.test_macro_f1_at05",
    "evaluate.test_macro_f1_at03",
    "evaluate.test_micro_f1_tuned",
];

/// One row of the table.
struct Row {
    name: String,
    sweep: Option<String>,
    status: String,
    params: BTreeMap<String, String>,
    metrics: BTreeMap<String, f64>,
    /// With --mean-over: each metric's sample standard deviation over the group (absent for a
    /// group of one), and the group's size.
    std: BTreeMap<String, f64>,
    n: usize,
    train_s: Option<f64>,
    best: bool,
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn record_row(r: &ExperimentRecord) -> Row {
    let status = match r.status {
        Status::Done => "done",
        Status::Failed => "failed",
        Status::Interrupted => "interrupted",
    };
    Row {
        name: r.name.clone(),
        sweep: r.sweep.clone(),
        status: status.into(),
        params: r
            .params
            .iter()
            .map(|(k, v)| (k.clone(), value_text(v)))
            .collect(),
        metrics: r.metrics.clone(),
        train_s: r
            .stages
            .iter()
            .find(|s| s.kind == "train")
            .map(|s| s.wall_s),
        std: BTreeMap::new(),
        n: 1,
        best: false,
    }
}

/// The baseline as a row: pipeline.yaml's values of the swept params, pipeline.lock's metrics.
fn baseline_row(engine: &Engine<'_>, params: &BTreeSet<String>) -> Row {
    let p = engine.pipeline;
    let mut values = BTreeMap::new();
    for name in params {
        if let Some(v) = p.param(name).filter(|v| !v.is_null()) {
            values.insert(name.clone(), value_text(v));
        }
    }
    let train_s = engine
        .lock
        .stages
        .iter()
        .find(|s| s.kind == "train")
        .and_then(|s| match engine.cache.lookup(&s.key) {
            goemo_engine::cache::Lookup::Hit(m) => Some(m.wall_s),
            _ => None,
        });
    Row {
        name: BASELINE.into(),
        sweep: None,
        status: if engine.lock.stages.is_empty() {
            "no lock"
        } else {
            "baseline"
        }
        .into(),
        params: values,
        metrics: experiment::baseline_metrics(engine),
        std: BTreeMap::new(),
        n: 1,
        train_s,
        best: false,
    }
}

/// A param the row did not set matches on pipeline.yaml's value (`defaults`).
fn matches_filter(
    row: &Row,
    filter: &str,
    defaults: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let (col, want) = filter
        .split_once('=')
        .ok_or_else(|| format!("--filter {filter}: expected COLUMN=VALUE, e.g. train.lr=3e-5"))?;
    let have = match col {
        "status" => Some(row.status.clone()),
        "sweep" => row.sweep.clone(),
        "name" => Some(row.name.clone()),
        _ => row
            .params
            .get(col)
            .or(defaults.get(col))
            .cloned()
            .or_else(|| row.metrics.get(col).map(|m| m.to_string())),
    };
    let same_number = |a: &str, b: &str| match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    Ok(have.is_some_and(|h| h == want || same_number(&h, want)))
}

pub fn show(args: ExpShowArgs) -> anyhow::Result<ExitCode> {
    let file = &args.pipeline.pipeline;
    if args.best_by.contains("test") {
        return Err(ConfigError::new(
            file,
            format!(
                "--best-by {}: a test metric; the best experiment is chosen on dev, never on test",
                args.best_by
            ),
        )
        .hint("use a dev metric, e.g. --best-by thresholds.dev_macro_f1")
        .into());
    }
    let p = crate::cli::load(&args.pipeline, &[])?;
    let records = experiment::list(&p.root)?;
    let mut rows: Vec<Row> = records.iter().map(record_row).collect();
    let params: BTreeSet<String> = rows.iter().flat_map(|r| r.params.keys().cloned()).collect();
    if !args.no_baseline {
        let engine = Engine::new(&p, true)?;
        rows.insert(0, baseline_row(&engine, &params));
    }
    // A param an experiment did not set counts as pipeline.yaml's value.
    let defaults: BTreeMap<String, String> = params
        .iter()
        .filter_map(|k| {
            let v = p.param(k).filter(|v| !v.is_null())?;
            Some((k.clone(), value_text(v)))
        })
        .collect();
    if !args.mean_over.is_empty() {
        for m in &args.mean_over {
            let in_pipeline = p.param(m).is_some_and(|v| !v.is_null());
            if !in_pipeline && !params.contains(m) {
                return Err(ConfigError::new(
                    file,
                    format!(
                        "--mean-over {m}: neither pipeline.yaml nor any experiment sets this param"
                    ),
                )
                .hint("name it STAGE.PARAM, e.g. --mean-over train.seed")
                .into());
            }
        }
        rows = mean_over(rows, &args.mean_over, &defaults);
    }
    // The best of all experiments, before any filter narrows the view; one per data setting.
    let within: Vec<String> = if args.best_within.is_empty() {
        params
            .iter()
            .filter(|k| {
                let stage = k.split('.').next().unwrap_or_default();
                p.get(stage)
                    .is_some_and(|d| DATA_KINDS.contains(&d.kind.as_str()))
            })
            .cloned()
            .collect()
    } else {
        args.best_within.clone()
    };
    let (best_by, settings) = mark_best(&mut rows, &args.best_by, &within, &defaults);
    if let Some(s) = &args.sweep {
        rows.retain(|r| r.sweep.as_deref() == Some(s.as_str()));
    }
    for f in &args.filter {
        let mut kept = Vec::new();
        for r in rows {
            if matches_filter(&r, f, &defaults).map_err(|m| ConfigError::new(file, m))? {
                kept.push(r);
            }
        }
        rows = kept;
    }
    sort_rows(&mut rows, args.sort.as_deref(), args.asc, &params);
    let metric_cols = metric_columns(&rows, args.all_metrics);
    let params: Vec<String> = params.into_iter().collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json_rows(&rows))?);
    } else {
        let table = text_table(&rows, &params, &metric_cols, !args.csv);
        if args.csv {
            print_csv(&table);
        } else if args.md {
            print_md(&table);
        } else {
            print_aligned(&table);
            if let Some(by) = best_by {
                let per = if settings > 1 {
                    format!(
                        ", one per value of {} (dev scores on other data do not compare)",
                        within.join(", ")
                    )
                } else {
                    String::new()
                };
                println!("* best on {by} (dev){per}; test figures are never used to choose");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows that differ only in the `over` params, as one row each: metrics averaged (sample std
/// beside them), names listed, the `over` params' values listed. Params a row did not set count
/// as `defaults` (pipeline.yaml's). Only finished runs are pooled; others stay rows of their own.
fn mean_over(rows: Vec<Row>, over: &[String], defaults: &BTreeMap<String, String>) -> Vec<Row> {
    let setting = |r: &Row| -> BTreeMap<String, String> {
        let mut all = defaults.clone();
        all.extend(r.params.clone());
        all.retain(|k, _| !over.contains(k));
        all
    };
    let mut groups: Vec<(BTreeMap<String, String>, Vec<Row>)> = Vec::new();
    let mut alone = Vec::new();
    for r in rows {
        if r.status != "done" && r.status != "baseline" {
            alone.push(r);
            continue;
        }
        let key = setting(&r);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut out: Vec<Row> = groups
        .into_iter()
        .map(|(_, members)| pool(members, over, defaults))
        .collect();
    out.extend(alone);
    out
}

/// One group's row (see [`mean_over`]).
fn pool(members: Vec<Row>, over: &[String], defaults: &BTreeMap<String, String>) -> Row {
    // Rows with the same `over` values (the baseline and an experiment that set a param to what
    // it already was, say) are one run's figures twice, not two samples: the first one counts,
    // the others are named beside it.
    let over_values = |r: &Row| -> Vec<Option<String>> {
        over.iter()
            .map(|k| r.params.get(k).or(defaults.get(k)).cloned())
            .collect()
    };
    let mut kept: Vec<Row> = Vec::new();
    for r in members {
        let v = over_values(&r);
        match kept.iter_mut().find(|k| over_values(k) == v) {
            Some(k) => k.name = format!("{} (= {})", k.name, r.name),
            None => kept.push(r),
        }
    }
    let members = kept;
    let n = members.len();
    let names: BTreeSet<&String> = members.iter().flat_map(|r| r.metrics.keys()).collect();
    let (mut metrics, mut std) = (BTreeMap::new(), BTreeMap::new());
    for name in names {
        // A bootstrap interval is one run's; the spread over the group replaces it.
        if name.ends_with("_ci_lo") || name.ends_with("_ci_hi") {
            continue;
        }
        let values: Vec<f64> = members
            .iter()
            .filter_map(|r| r.metrics.get(name).copied())
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        metrics.insert(name.clone(), mean);
        if values.len() > 1 {
            let var =
                values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64;
            std.insert(name.clone(), var.sqrt());
        }
    }
    let mut params = members[0].params.clone();
    for k in over {
        let values: Vec<String> = members
            .iter()
            .map(|r| {
                r.params
                    .get(k)
                    .or(defaults.get(k))
                    .cloned()
                    .unwrap_or_else(|| "-".into())
            })
            .collect();
        params.insert(k.clone(), values.join(","));
    }
    let walls: Vec<f64> = members.iter().filter_map(|r| r.train_s).collect();
    let baseline = members.iter().any(|r| r.status == "baseline");
    Row {
        name: members
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        sweep: members[0]
            .sweep
            .clone()
            .filter(|s| members.iter().all(|r| r.sweep.as_ref() == Some(s))),
        status: if baseline { "baseline" } else { "done" }.into(),
        params,
        metrics,
        std,
        n,
        train_s: (!walls.is_empty()).then(|| walls.iter().sum::<f64>() / walls.len() as f64),
        best: false,
    }
}

/// Mark the best row on `by` in each setting of the `within` params (unset ones count as
/// `defaults`); the first among equals. Returns the metric used (`by`, or when no row has it, the
/// first metric whose name says dev, so a project whose stages name their own metrics still gets
/// a choice made on dev) and how many settings were compared apart.
fn mark_best(
    rows: &mut [Row],
    by: &str,
    within: &[String],
    defaults: &BTreeMap<String, String>,
) -> (Option<String>, usize) {
    let has = |m: &str| rows.iter().any(|r| r.metrics.contains_key(m));
    let by = if has(by) {
        by.to_owned()
    } else {
        let names: BTreeSet<&String> = rows.iter().flat_map(|r| r.metrics.keys()).collect();
        match names
            .into_iter()
            .find(|m| m.contains("dev") && !m.contains("test"))
        {
            Some(m) => m.clone(),
            None => return (None, 0),
        }
    };
    let setting = |r: &Row| -> Vec<Option<String>> {
        within
            .iter()
            .map(|k| r.params.get(k).or(defaults.get(k)).cloned())
            .collect()
    };
    let mut best: Vec<(Vec<Option<String>>, usize, f64)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.status != "done" && r.status != "baseline" {
            continue;
        }
        let Some(&m) = r.metrics.get(&by) else {
            continue;
        };
        let s = setting(r);
        match best.iter_mut().find(|(k, _, _)| *k == s) {
            Some(b) if m > b.2 => (b.1, b.2) = (i, m),
            Some(_) => {}
            None => best.push((s, i, m)),
        }
    }
    for (_, i, _) in &best {
        rows[*i].best = true;
    }
    (Some(by), best.len())
}

fn sort_rows(rows: &mut [Row], by: Option<&str>, asc: bool, params: &BTreeSet<String>) {
    let Some(by) = by else { return };
    let key = |r: &Row| -> (Option<f64>, String) {
        match by {
            "name" => (None, r.name.clone()),
            "wall" | "train_s" => (r.train_s, String::new()),
            _ if params.contains(by) => {
                let v = r.params.get(by).cloned().unwrap_or_default();
                (v.parse().ok(), v)
            }
            _ => (r.metrics.get(by).copied(), String::new()),
        }
    };
    // Metrics best (largest) first unless --asc; rows without the column last either way.
    let numeric_desc = !asc && by != "name" && !params.contains(by);
    rows.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        match (ka.0, kb.0) {
            (Some(x), Some(y)) if numeric_desc => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) if asc || by == "name" => ka.1.cmp(&kb.1),
            (None, None) => kb.1.cmp(&ka.1),
        }
    });
}

fn metric_columns(rows: &[Row], all: bool) -> Vec<String> {
    let present: BTreeSet<&String> = rows.iter().flat_map(|r| r.metrics.keys()).collect();
    let defaults: Vec<String> = DEFAULT_METRICS
        .iter()
        .filter(|m| present.iter().any(|p| p.as_str() == **m))
        .map(|m| m.to_string())
        .collect();
    if all || defaults.is_empty() {
        present.into_iter().cloned().collect()
    } else {
        defaults
    }
}

/// Header and cells; `pretty` folds the tuned test F1's bootstrap interval into its cell.
fn text_table(
    rows: &[Row],
    params: &[String],
    metrics: &[String],
    pretty: bool,
) -> Vec<Vec<String>> {
    let grouped = rows.iter().any(|r| r.n > 1);
    let mut header = vec!["experiment".to_owned(), "best".into(), "status".into()];
    if grouped {
        header.push("n".into());
    }
    header.extend(params.iter().cloned());
    header.extend(metrics.iter().cloned());
    header.push("train_s".into());
    let mut out = vec![header];
    for r in rows {
        let mut cells = vec![
            r.name.clone(),
            if r.best { "*" } else { "" }.into(),
            r.status.clone(),
        ];
        if grouped {
            cells.push(r.n.to_string());
        }
        cells.extend(
            params
                .iter()
                .map(|p| r.params.get(p).cloned().unwrap_or_default()),
        );
        for m in metrics {
            let Some(v) = r.metrics.get(m) else {
                cells.push(String::new());
                continue;
            };
            let ci = (
                r.metrics.get(&format!("{m}_ci_lo")),
                r.metrics.get(&format!("{m}_ci_hi")),
            );
            cells.push(match (ci, r.std.get(m)) {
                (_, Some(sd)) => format!("{v:.4} ± {sd:.4}"),
                ((Some(lo), Some(hi)), None) if pretty => format!("{v:.4} [{lo:.3}, {hi:.3}]"),
                _ => format!("{v:.4}"),
            });
        }
        cells.push(r.train_s.map(|s| format!("{s:.1}")).unwrap_or_default());
        out.push(cells);
    }
    out
}

fn json_rows(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "name": r.name, "sweep": r.sweep, "status": r.status, "best": r.best,
                    "params": r.params, "metrics": r.metrics, "train_s": r.train_s,
                    "n": r.n, "std": r.std,
                })
            })
            .collect(),
    )
}

fn print_aligned(table: &[Vec<String>]) {
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_md(table: &[Vec<String>]) {
    println!("| {} |", table[0].join(" | "));
    println!("|{}", "---|".repeat(table[0].len()));
    for row in &table[1..] {
        println!("| {} |", row.join(" | "));
    }
}

fn print_csv(table: &[Vec<String>]) {
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .map(|c| {
                if c.contains([',', '"', '\n']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c.clone()
                }
            })
            .collect();
        println!("{}", cells.join(","));
    }
}

/// One side of a diff: every param of every stage (from its lock) and its metrics.
struct Side {
    params: BTreeMap<String, String>,
    metrics: BTreeMap<String, f64>,
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), value_text(other));
        }
    }
}

fn side(p: &goemo_engine::pipeline::Pipeline, name: &str) -> anyhow::Result<Side> {
    let (lock, metrics) = if name == BASELINE {
        let engine = Engine::new(p, true)?;
        (engine.lock.clone(), experiment::baseline_metrics(&engine))
    } else {
        let record = experiment::read(&p.root, name)?;
        let lock = LockFile::read(&experiment::dir(&p.root, name).join(experiment::LOCK_FILE))?;
        (lock, record.metrics)
    };
    let mut params = BTreeMap::new();
    for s in &lock.stages {
        flatten(&s.name, &s.params, &mut params);
    }
    Ok(Side { params, metrics })
}

pub fn diff(args: ExpDiffArgs) -> anyhow::Result<ExitCode> {
    let p = crate::cli::load(&args.pipeline, &[])?;
    let (a_name, b_name) = match &args.b {
        Some(b) => (args.a.clone(), b.clone()),
        None => (BASELINE.to_owned(), args.a.clone()),
    };
    let (a, b) = (side(&p, &a_name)?, side(&p, &b_name)?);
    let keys: BTreeSet<&String> = a.params.keys().chain(b.params.keys()).collect();
    let params: Vec<(&String, String, String)> = keys
        .into_iter()
        .map(|k| {
            let get = |s: &Side| s.params.get(k).cloned().unwrap_or_else(|| "-".into());
            (k, get(&a), get(&b))
        })
        .filter(|(_, x, y)| x != y)
        .collect();
    let mkeys: BTreeSet<&String> = a.metrics.keys().chain(b.metrics.keys()).collect();
    if args.json {
        let metrics: BTreeMap<&String, Value> = mkeys
            .iter()
            .map(|k| {
                let (x, y) = (a.metrics.get(*k), b.metrics.get(*k));
                let delta = x.zip(y).map(|(x, y)| y - x);
                (*k, json!({ "a": x, "b": y, "delta": delta }))
            })
            .collect();
        let params: BTreeMap<&String, Value> = params
            .iter()
            .map(|(k, x, y)| (*k, json!({"a": x, "b": y})))
            .collect();
        let out = json!({"a": a_name, "b": b_name, "params": params, "metrics": metrics});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = vec![vec![
        "param".to_owned(),
        a_name.clone(),
        b_name.clone(),
        String::new(),
    ]];
    if params.is_empty() {
        table.push(vec![
            "(no param differs)".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    table.extend(
        params
            .into_iter()
            .map(|(k, x, y)| vec![k.clone(), x, y, String::new()]),
    );
    table.push(vec![String::new(); 4]);
    table.push(vec![
        "metric".to_owned(),
        a_name.clone(),
        b_name.clone(),
        "delta".into(),
    ]);
    for k in mkeys {
        let (x, y) = (a.metrics.get(k), b.metrics.get(k));
        let f = |v: Option<&f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let delta = x
            .zip(y)
            .map(|(x, y)| format!("{:+.4}", y - x))
            .unwrap_or_default();
        table.push(vec![k.clone(), f(x), f(y), delta]);
    }
    print_aligned(&table);
    Ok(ExitCode::SUCCESS)
}
