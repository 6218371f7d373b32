//! Charts that compare runs (`goemo plots diff A B …`): per-label F1 as grouped bars, one
//! color per run, and the training curves of every run on shared axes. A run is a
//! [`RunSeries`], read from its `metrics.json` and `train_log.json`.
//!
//! Runs are compared label by label, so they must share one label set; a mismatch is an error
//! naming both runs rather than a chart with silently missing bars.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::charts::{err, png, register_font, svg, FAMILY};
use crate::evaluation::MetricsFile;
use crate::ReportError;

type R = Result<(), ReportError>;

/// What the comparison charts draw of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSeries {
    /// Shown in legends: the run's name on the command line.
    pub name: String,
    /// (label, test F1) in the run's label order.
    pub per_label_f1: Vec<(String, f64)>,
    /// (optimizer step, train loss)
    pub loss: Vec<(f64, f64)>,
    /// (epoch, dev macro-F1)
    pub dev_f1: Vec<(f64, f64)>,
}

/// The part of the trainer's `train_log.json` the curves need; other keys are ignored, so
/// the trainer may log more without breaking this reader, but a missing needed key is an error.
#[derive(Debug, Deserialize)]
struct TrainLogCurves {
    steps: Vec<StepPoint>,
    epochs: Vec<EpochPoint>,
}

#[derive(Debug, Deserialize)]
struct StepPoint {
    step: usize,
    loss: f64,
}

#[derive(Debug, Deserialize)]
struct EpochPoint {
    epoch: usize,
    dev_macro_f1: f64,
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ReportError> {
    let bytes = std::fs::read(path).map_err(|source| ReportError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ReportError::Parse {
        path: path.to_owned(),
        source,
    })
}

impl RunSeries {
    /// A run from evaluate's `metrics.json` (per-label F1 at threshold `policy`: `0.5`, `0.3`
    /// or `tuned`) and the trainer's `train_log.json`. Errors name the file and the key.
    pub fn from_files(
        name: impl Into<String>,
        metrics_json: &Path,
        train_log_json: &Path,
        policy: &str,
    ) -> Result<RunSeries, ReportError> {
        let m: MetricsFile = read_json(metrics_json)?;
        let invalid = |message: String| ReportError::Invalid {
            path: metrics_json.to_owned(),
            message,
        };
        let p = m.policies.get(policy).ok_or_else(|| {
            invalid(format!(
                "no threshold policy `{policy}` (there are `0.5`, `0.3` and `tuned`)"
            ))
        })?;
        let per_label_f1 = m
            .labels
            .iter()
            .map(|l| match p.per_label.get(l) {
                Some(f) => Ok((l.clone(), f.f1)),
                None => Err(invalid(format!(
                    "`policies.{policy}.per_label` has no label `{l}`; re-run evaluate"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let log: TrainLogCurves = read_json(train_log_json)?;
        Ok(RunSeries {
            name: name.into(),
            per_label_f1,
            loss: log.steps.iter().map(|s| (s.step as f64, s.loss)).collect(),
            dev_f1: log
                .epochs
                .iter()
                .map(|e| (e.epoch as f64, e.dev_macro_f1))
                .collect(),
        })
    }
}

/// Tableau's 10 colors: distinct, and readable for most color-blind readers. Runs past the
/// tenth reuse them in order.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The color of the `i`th run.
pub fn run_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The checks every comparison needs: some runs, each with a label set free of repeats and
/// F1 values in [0, 1], and every run with the first run's label set.
fn check_runs(runs: &[RunSeries]) -> R {
    let Some(first) = runs.first() else {
        return Err(ReportError::Mismatch(
            "no runs to compare: give at least one run".into(),
        ));
    };
    let set = |r: &RunSeries| -> Result<BTreeSet<String>, ReportError> {
        let mut set = BTreeSet::new();
        for (l, f1) in &r.per_label_f1 {
            if !set.insert(l.clone()) {
                return Err(ReportError::Mismatch(format!(
                    "run `{}` lists label `{l}` twice",
                    r.name
                )));
            }
            if !(0.0..=1.0).contains(f1) {
                return Err(ReportError::Mismatch(format!(
                    "run `{}`: F1 of `{l}` is {f1}, not in [0, 1]",
                    r.name
                )));
            }
        }
        if set.is_empty() {
            return Err(ReportError::Mismatch(format!(
                "run `{}` has no labels",
                r.name
            )));
        }
        Ok(set)
    };
    let base = set(first)?;
    for r in &runs[1..] {
        let other = set(r)?;
        if other != base {
            let list = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
                a.difference(b).cloned().collect::<Vec<_>>().join(", ")
            };
            return Err(ReportError::Mismatch(format!(
                "runs `{}` and `{}` have different labels (only in `{}`: [{}]; only in `{}`: [{}]); compare runs of one taxonomy",
                first.name, r.name, first.name, list(&base, &other), r.name, list(&other, &base)
            )));
        }
    }
    Ok(())
}

/// The F1 bars' rows: labels by the first run's F1, best first, and each run's F1 in that order.
struct F1Table {
    labels: Vec<String>,
    /// Run × label (in `labels`' order).
    f1: Vec<Vec<f64>>,
}

impl F1Table {
    fn new(runs: &[RunSeries]) -> Result<F1Table, ReportError> {
        check_runs(runs)?;
        let mut order = runs[0].per_label_f1.clone();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let labels: Vec<String> = order.into_iter().map(|(l, _)| l).collect();
        let f1 = runs
            .iter()
            .map(|r| {
                let by: HashMap<&str, f64> = r
                    .per_label_f1
                    .iter()
                    .map(|(l, f)| (l.as_str(), *f))
                    .collect();
                let f1_of = |l: &String| {
                    by.get(l.as_str()).copied().ok_or_else(|| {
                        ReportError::Mismatch(format!("run `{}` has no label `{l}`", r.name))
                    })
                };
                labels.iter().map(f1_of).collect::<Result<Vec<f64>, _>>()
            })
            .collect::<Result<_, _>>()?;
        Ok(F1Table { labels, f1 })
    }
}

/// How the legend's entries wrap into rows, from the names' rendered widths.
struct Legend {
    cols: usize,
    col_w: u32,
    rows: usize,
}

const LEGEND_FONT: u32 = 14;
const LEGEND_ROW: u32 = 22;
const TITLE_H: u32 = 40;

fn legend_layout(names: &[&str], width: u32) -> Result<Legend, ReportError> {
    register_font();
    let font = (FAMILY, LEGEND_FONT).into_font();
    let mut widest = 0;
    for n in names {
        widest = widest.max(font.box_size(n).map_err(err)?.0);
    }
    let col_w = widest + 44;
    let cols = ((width.saturating_sub(20) / col_w) as usize).clamp(1, names.len().max(1));
    Ok(Legend {
        cols,
        col_w,
        rows: names.len().div_ceil(cols),
    })
}

fn header_height(runs: &[RunSeries], width: u32) -> Result<u32, ReportError> {
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    Ok(TITLE_H + legend_layout(&names, width)?.rows as u32 * LEGEND_ROW + 8)
}

/// Draw the title and a legend (box or line swatches) at the top of `area`; return the rest.
fn header<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    runs: &[RunSeries],
    boxes: bool,
) -> Result<DrawingArea<DB, Shift>, ReportError> {
    let width = area.dim_in_pixel().0;
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let legend = legend_layout(&names, width)?;
    let (head, body) = area.split_vertically(header_height(runs, width)?);
    let title_style = (FAMILY, 22).into_text_style(&head);
    head.draw_text(title, &title_style, (12, 8)).map_err(err)?;
    let text = (FAMILY, LEGEND_FONT).into_text_style(&head);
    for (i, name) in names.iter().enumerate() {
        let x = 12 + (i % legend.cols) as i32 * legend.col_w as i32;
        let y = TITLE_H as i32 + (i / legend.cols) as i32 * LEGEND_ROW as i32;
        let c = run_color(i);
        if boxes {
            head.draw(&Rectangle::new([(x, y + 3), (x + 16, y + 15)], c.filled()))
                .map_err(err)?;
        } else {
            let line = PathElement::new(vec![(x, y + 9), (x + 24, y + 9)], c.stroke_width(3));
            head.draw(&line).map_err(err)?;
            head.draw(&Circle::new((x + 12, y + 9), 4, c.filled()))
                .map_err(err)?;
        }
        head.draw_text(name, &text, (x + 30, y)).map_err(err)?;
    }
    Ok(body)
}

/// Bar thickness in pixels; the y axis counts in tenths of a bar (plotters' custom ticks need
/// an integer axis), with a gap of 0.9 bar between label groups.
const BAR_PX: u32 = 10;
const BAR: i32 = 10;
const GAP: i32 = 9;

/// The F1 comparison's size: the height follows labels × runs, so bars stay 10 px thick.
pub fn f1_compare_size(runs: &[RunSeries]) -> Result<(u32, u32), ReportError> {
    let width = 1100;
    let (n, k) = (runs.first().map_or(0, |r| r.per_label_f1.len()), runs.len());
    let plot = n as u32 * (k as u32 * BAR as u32 + GAP as u32) * BAR_PX / BAR as u32;
    Ok((width, header_height(runs, width)? + plot + 70))
}

/// Per-label F1 of every run as grouped horizontal bars: a group per label (ordered by the
/// first run's F1, best at the top), within it one bar per run in the legend's order.
pub fn f1_bars_compare<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> R {
    let t = F1Table::new(runs)?;
    register_font();
    let (n, k) = (t.labels.len() as i32, runs.len() as i32);
    area.fill(&WHITE).map_err(err)?;
    let body = header(
        area,
        "F1 per emotion (test split): runs compared",
        runs,
        true,
    )?;
    // Group `rank` (0 = top) spans [bottom, bottom + k bars + gap); run 0's bar is its highest.
    let group = k * BAR + GAP;
    let bottom = |rank: i32| (n - 1 - rank) * group + GAP / 2;
    let centers: Vec<i32> = (0..n).map(|r| bottom(r) + k * BAR / 2).collect();
    let label_font = (FAMILY, 13).into_font();
    let mut label_w = 0;
    for l in &t.labels {
        label_w = label_w.max(label_font.box_size(l).map_err(err)?.0);
    }
    let mut chart = ChartBuilder::on(&body)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(label_w + 16)
        .build_cartesian_2d(0f64..1f64, (0..n * group).with_key_points(centers))
        .map_err(err)?;
    let name_of = |v: &i32| {
        let off = v - GAP / 2 - k * BAR / 2;
        let i = off.div_euclid(group);
        let rank = usize::try_from(n - 1 - i)
            .ok()
            .filter(|_| off.rem_euclid(group) == 0);
        rank.and_then(|r| t.labels.get(r))
            .cloned()
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&name_of)
        .x_desc("F1")
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(err)?;
    for (run, f1) in t.f1.iter().enumerate() {
        let c = run_color(run);
        let top = |rank: i32| bottom(rank) + (k - run as i32) * BAR;
        chart
            .draw_series(f1.iter().zip(0..).map(|(&v, rank)| {
                let mut r = Rectangle::new([(0.0, top(rank) - BAR), (v, top(rank))], c.filled());
                r.set_margin(1, 0, 0, 0);
                r
            }))
            .map_err(err)?;
    }
    area.present().map_err(err)
}

/// At most this many points per loss line: a long run's SVG stays small.
const MAX_LOSS_POINTS: usize = 1000;

/// The train loss as drawn: non-finite points dropped, then a centered moving average over
/// ~1% of the steps (per-step loss is noisy, and several noisy lines on one axis hide each
/// other), then thinned to at most [`MAX_LOSS_POINTS`] points.
fn smooth_loss(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let half = p.len() / 200;
    let stride = p.len().div_ceil(MAX_LOSS_POINTS).max(1);
    let mut out: Vec<(f64, f64)> = (0..p.len())
        .filter(|i| i % stride == 0 || *i + 1 == p.len())
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(p.len()));
            let sum: f64 = p[lo..hi].iter().map(|q| q.1).sum();
            (p[i].0, sum / (hi - lo) as f64)
        })
        .collect();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The curves comparison's size: two panels side by side under the title and legend.
pub fn curves_compare_size(runs: &[RunSeries]) -> Result<(u32, u32), ReportError> {
    let width = 1200;
    Ok((width, header_height(runs, width)? + 420))
}

/// Every run's training curves on shared axes: train loss per step (left; lightly smoothed,
/// a centered moving average over ~1% of the steps, so several noisy lines stay apart) and
/// dev macro-F1 per epoch (right; lines and markers).
pub fn curves_compare<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> R {
    if runs.is_empty() {
        return Err(ReportError::Mismatch(
            "no runs to compare: give at least one run".into(),
        ));
    }
    register_font();
    area.fill(&WHITE).map_err(err)?;
    let body = header(area, "training curves: runs compared", runs, false)?;
    let (left, right) = body.split_horizontally(body.dim_in_pixel().0 / 2);
    loss_panel(&left, runs)?;
    dev_f1_panel(&right, runs)?;
    area.present().map_err(err)
}

/// Steps and epochs are counts: `20`, not `20.0`.
fn whole(v: &f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn loss_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> R {
    let lines: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| smooth_loss(&r.loss)).collect();
    let all = || lines.iter().flatten();
    let max_step = all().map(|p| p.0).fold(1.0, f64::max);
    let max_loss = all().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let mut c = ChartBuilder::on(area)
        .caption("train loss (smoothed)", (FAMILY, 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..max_step, 0f64..max_loss)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&whole)
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    for (i, line) in lines.into_iter().enumerate() {
        c.draw_series(LineSeries::new(line, run_color(i).stroke_width(2)))
            .map_err(err)?;
    }
    Ok(())
}

fn dev_f1_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, runs: &[RunSeries]) -> R {
    let finite = |r: &RunSeries| -> Vec<(f64, f64)> {
        let ok = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
        r.dev_f1.iter().filter(ok).copied().collect()
    };
    let lines: Vec<Vec<(f64, f64)>> = runs.iter().map(finite).collect();
    let max_epoch = lines.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let max_f1 = lines.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
    let mut c = ChartBuilder::on(area)
        .caption("dev macro-F1 (threshold 0.5)", (FAMILY, 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(
            0.5f64..max_epoch + 0.5,
            0f64..(max_f1.max(0.05) * 1.15).min(1.0),
        )
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("epoch")
        // A tick per epoch up to 12 epochs; plotters then picks whole steps (2, 5, …).
        .x_labels((max_epoch as usize + 1).min(13))
        .x_label_formatter(&whole)
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    for (i, line) in lines.into_iter().enumerate() {
        let color = run_color(i);
        c.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(err)?;
        c.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    Ok(())
}

/// Write `path` through a temp file in its folder and a rename, as goemo-fsio does, so a
/// reader never sees half a chart. `fill` writes the temp file, given its path (which keeps
/// `path`'s extension: plotters picks the image format from it).
fn write_atomic(path: &Path, fill: impl FnOnce(&Path) -> R) -> R {
    let io = |source: std::io::Error| ReportError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut builder = tempfile::Builder::new();
    builder.prefix(".goemo-chart-").suffix(&suffix);
    // Charts are ordinary files others may read (0644 less the umask), not 0600 temp files.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let tmp = builder.tempfile_in(dir).map_err(io)?;
    fill(tmp.path())?;
    std::fs::File::open(tmp.path())
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// `<stem>_f1.png`, `<stem>_f1.svg`, `<stem>_curves.png` and `<stem>_curves.svg` into `dir`,
/// each written atomically; the paths in that order. Runs are checked before any file is
/// written.
pub fn write_compare(
    dir: &Path,
    stem: &str,
    runs: &[RunSeries],
) -> Result<Vec<PathBuf>, ReportError> {
    check_runs(runs)?;
    if stem.is_empty() || stem.contains(['/', '\\']) {
        return Err(ReportError::Mismatch(format!(
            "chart file stem {stem:?} must be a non-empty file name, without a folder"
        )));
    }
    let (f1_size, curves_size) = (f1_compare_size(runs)?, curves_compare_size(runs)?);
    let path = |suffix: &str| dir.join(format!("{stem}_{suffix}"));
    let paths = [
        path("f1.png"),
        path("f1.svg"),
        path("curves.png"),
        path("curves.svg"),
    ];
    let text = |p: &Path, s: String| {
        std::fs::write(p, s).map_err(|source| ReportError::Write {
            path: p.to_owned(),
            source,
        })
    };
    write_atomic(&paths[0], |p| png(p, f1_size, |a| f1_bars_compare(a, runs)))?;
    write_atomic(&paths[1], |p| {
        text(p, svg(f1_size, |a| f1_bars_compare(a, runs))?)
    })?;
    write_atomic(&paths[2], |p| {
        png(p, curves_size, |a| curves_compare(a, runs))
    })?;
    write_atomic(&paths[3], |p| {
        text(p, svg(curves_size, |a| curves_compare(a, runs))?)
    })?;
    Ok(paths.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::{evaluate, EvaluateParams};
    use serde_json::json;

    const GOEMOTIONS: [&str; 28] = [
        "admiration",
        "amusement",
        "anger",
        "annoyance",
        "approval",
        "caring",
        "confusion",
        "curiosity",
        "desire",
        "disappointment",
        "disapproval",
        "disgust",
        "embarrassment",
        "excitement",
        "fear",
        "gratitude",
        "grief",
        "joy",
        "love",
        "nervousness",
        "optimism",
        "pride",
        "realization",
        "relief",
        "remorse",
        "sadness",
        "surprise",
        "neutral",
    ];

    /// A run with made-up but distinct figures for `labels`.
    fn run(name: &str, labels: &[&str], seed: usize) -> RunSeries {
        let wobble = |i: usize| ((i * 7 + seed * 13) % 17) as f64 / 17.0;
        RunSeries {
            name: name.into(),
            per_label_f1: labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.to_string(), wobble(i)))
                .collect(),
            loss: (1..=300)
                .map(|s| (s as f64, 0.7 / (1.0 + s as f64 / 50.0) + 0.02 * wobble(s)))
                .collect(),
            dev_f1: (1..=4)
                .map(|e| (e as f64, 0.1 * e as f64 + 0.01 * seed as f64))
                .collect(),
        }
    }

    /// PNG width and height from the signature and the IHDR chunk.
    fn png_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(
            &b[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is not a PNG",
            path.display()
        );
        assert_eq!(&b[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    #[test]
    fn write_compare_writes_four_charts_naming_every_run_and_label() {
        let runs = [
            run("baseline", &GOEMOTIONS, 0),
            run("roberta-large", &GOEMOTIONS, 1),
            run("pos-weight", &GOEMOTIONS, 2),
        ];
        let dir = tempfile::tempdir().unwrap();
        let paths = write_compare(dir.path(), "cmp", &runs).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "cmp_f1.png",
                "cmp_f1.svg",
                "cmp_curves.png",
                "cmp_curves.svg"
            ]
        );
        // Nothing else is left behind (no temp files).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
        let f1_size = f1_compare_size(&runs).unwrap();
        assert!(f1_size.1 >= 28 * 3 * BAR_PX, "{f1_size:?}");
        assert_eq!(png_size(&paths[0]), f1_size);
        assert_eq!(png_size(&paths[2]), curves_compare_size(&runs).unwrap());
        let f1_svg = std::fs::read_to_string(&paths[1]).unwrap();
        let curves_svg = std::fs::read_to_string(&paths[3]).unwrap();
        for r in &runs {
            // plotters writes each text as `<text …>\nTEXT\n</text>`.
            let text = format!(">\n{}\n</text>", r.name);
            assert!(f1_svg.contains(&text), "{} not in the F1 SVG", r.name);
            assert!(
                curves_svg.contains(&text),
                "{} not in the curves SVG",
                r.name
            );
        }
        for l in GOEMOTIONS {
            let text = format!(">\n{l}\n</text>");
            assert!(f1_svg.contains(&text), "label {l} not in the F1 SVG");
        }
        // One colored bar per run and label, each run in its own color.
        for i in 0..runs.len() {
            let c = run_color(i);
            let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            assert!(f1_svg.matches(&fill).count() >= 28, "run {i}: {fill}");
        }
    }

    #[test]
    fn one_run_many_runs_and_small_taxonomies_draw() {
        let dir = tempfile::tempdir().unwrap();
        for (stem, labels, k) in [
            ("one", &GOEMOTIONS[..], 1),
            ("twelve", &GOEMOTIONS[..], 12),
            ("ekman", &GOEMOTIONS[..7], 3),
            ("sentiment", &GOEMOTIONS[..4], 2),
        ] {
            let runs: Vec<RunSeries> = (0..k).map(|i| run(&format!("run{i}"), labels, i)).collect();
            let paths = write_compare(dir.path(), stem, &runs).unwrap();
            assert_eq!(png_size(&paths[0]), f1_compare_size(&runs).unwrap());
            let svg = std::fs::read_to_string(&paths[1]).unwrap();
            assert!(runs.iter().all(|r| svg.contains(&r.name)), "{stem}");
        }
        // The palette cycles: run 10 reuses run 0's color.
        assert_eq!(run_color(10), run_color(0));
        assert_ne!(run_color(7), run_color(0));
    }

    #[test]
    fn bars_follow_the_first_runs_f1_best_first() {
        let mut a = run("a", &["x", "y", "z"], 0);
        a.per_label_f1 = vec![("x".into(), 0.2), ("y".into(), 0.9), ("z".into(), 0.5)];
        let mut b = run("b", &["z", "x", "y"], 1);
        b.per_label_f1 = vec![("z".into(), 0.1), ("x".into(), 0.3), ("y".into(), 0.4)];
        let t = F1Table::new(&[a, b]).unwrap();
        assert_eq!(t.labels, ["y", "z", "x"]);
        assert_eq!(t.f1, [[0.9, 0.5, 0.2], [0.4, 0.1, 0.3]]);
    }

    #[test]
    fn empty_and_mismatched_runs_are_errors_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_compare(dir.path(), "cmp", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no runs"), "{e}");
        let a = run("alpha", &GOEMOTIONS, 0);
        let mut renamed = GOEMOTIONS;
        renamed[17] = "glee";
        let b = run("beta", &renamed, 1);
        let e = write_compare(dir.path(), "cmp", &[a.clone(), b])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`alpha`") && e.contains("`beta`"), "{e}");
        assert!(e.contains("joy") && e.contains("glee"), "{e}");
        let c = run("gamma", &GOEMOTIONS[..7], 2);
        let e = write_compare(dir.path(), "cmp", &[a.clone(), c])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`alpha`") && e.contains("`gamma`"), "{e}");
        let mut bad = a.clone();
        bad.per_label_f1[0].1 = f64::NAN;
        assert!(write_compare(dir.path(), "cmp", &[bad]).is_err());
        assert!(write_compare(dir.path(), "../cmp", &[a]).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut out = String::new();
        let area = SVGBackend::with_string(&mut out, (800, 600)).into_drawing_area();
        assert!(curves_compare(&area, &[]).is_err());
    }

    /// A real metrics.json (through `evaluate`) and a train_log.json shaped like the trainer's.
    fn run_files(dir: &Path) -> (PathBuf, PathBuf) {
        let labels: Vec<String> = ["joy", "anger", "fear"].map(String::from).to_vec();
        let scores = [0.9, 0.1, 0.6, 0.2, 0.8, 0.4, 0.7, 0.3, 0.1, 0.4, 0.6, 0.9];
        let truth = [1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 1];
        let p = EvaluateParams {
            bootstrap_samples: 5,
            ..Default::default()
        };
        let m = evaluate(&scores, &truth, &labels, &[0.5, 0.5, 0.5], &p);
        let metrics = dir.join("metrics.json");
        std::fs::write(&metrics, serde_json::to_string_pretty(&m).unwrap()).unwrap();
        let step = |s: usize, loss: f64| json!({"step": s, "epoch": s as f64 / 4.0, "loss": loss, "learning_rate": 1e-5, "grad_norm": 0.2});
        let log = json!({
            "steps": [step(1, 0.69), step(2, 0.6), step(3, 0.5), step(4, 0.45)],
            "epochs": [{"epoch": 1, "train_loss": 0.56, "dev_loss": 0.5, "dev_macro_f1": 0.31}],
            "best_epoch": 1, "best_dev_macro_f1": 0.31, "stopped_early": false, "total_steps": 4, "pos_weight": null
        });
        let train_log = dir.join("train_log.json");
        std::fs::write(&train_log, log.to_string()).unwrap();
        (metrics, train_log)
    }

    #[test]
    fn from_files_reads_metrics_and_train_log() {
        let dir = tempfile::tempdir().unwrap();
        let (metrics, log) = run_files(dir.path());
        let r = RunSeries::from_files("base", &metrics, &log, "tuned").unwrap();
        let m: MetricsFile = read_json(&metrics).unwrap();
        let want: Vec<(String, f64)> = m
            .labels
            .iter()
            .map(|l| (l.clone(), m.policies.tuned.per_label[l].f1))
            .collect();
        assert_eq!(r.name, "base");
        assert_eq!(r.per_label_f1, want);
        assert_eq!(r.per_label_f1[0].0, "joy");
        assert_eq!(r.loss, [(1.0, 0.69), (2.0, 0.6), (3.0, 0.5), (4.0, 0.45)]);
        assert_eq!(r.dev_f1, [(1.0, 0.31)]);
        let e = RunSeries::from_files("base", &metrics, &log, "0.7").unwrap_err();
        assert!(e.to_string().contains("`0.7`"), "{e}");
    }

    #[test]
    fn a_missing_key_is_an_error_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (metrics, log) = run_files(dir.path());
        let text = std::fs::read_to_string(&metrics).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let per_label = &mut v["policies"]["tuned"]["per_label"];
        per_label["anger"].as_object_mut().unwrap().remove("f1");
        std::fs::write(&metrics, v.to_string()).unwrap();
        let e = RunSeries::from_files("r", &metrics, &log, "tuned")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.json") && e.contains("`f1`"), "{e}");

        // A label in `labels` without figures names the label and the file.
        v["policies"]["tuned"]["per_label"]
            .as_object_mut()
            .unwrap()
            .remove("anger");
        std::fs::write(&metrics, v.to_string()).unwrap();
        let e = RunSeries::from_files("r", &metrics, &log, "tuned")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.json") && e.contains("`anger`"), "{e}");

        let (metrics, log) = run_files(dir.path());
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, text.replace("\"dev_macro_f1\"", "\"dev_f1\"")).unwrap();
        let e = RunSeries::from_files("r", &metrics, &log, "tuned")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train_log.json") && e.contains("`dev_macro_f1`"),
            "{e}"
        );
        let e = RunSeries::from_files("r", &dir.path().join("nope.json"), &log, "tuned")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.json"), "{e}");
    }

    #[test]
    fn loss_smoothing_is_light_and_bounded() {
        // Under 200 steps, nothing is averaged.
        let short: Vec<(f64, f64)> = (0..50).map(|s| (s as f64, s as f64 % 3.0)).collect();
        assert_eq!(smooth_loss(&short), short);
        let long: Vec<(f64, f64)> = (0..20_000)
            .map(|s| (s as f64, if s % 2 == 0 { 1.0 } else { 0.0 }))
            .chain([(20_000.0, f64::NAN)])
            .collect();
        let s = smooth_loss(&long);
        assert!(s.len() <= MAX_LOSS_POINTS + 1, "{}", s.len());
        assert_eq!(s.last().unwrap().0, 19_999.0);
        assert!(s.iter().all(|p| (p.1 - 0.5).abs() < 0.01), "{:?}", &s[..3]);
    }
}
