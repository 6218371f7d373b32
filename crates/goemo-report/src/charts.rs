//! Charts drawn with plotters, as PNG files or SVG strings, shared by the `plot` stage (files)
//! and the `report` stage (SVG inlined into one self-contained HTML page): `f1_scores_barplot`
//! (labels sorted by F1, tuned thresholds beside 0.5), `training_curves` (loss per step, dev
//! macro-F1 per epoch) and `pr_curves` (precision–recall per label, tuned threshold marked).
//!
//! The font is embedded (DejaVu Sans, assets/), so text renders on a bare machine with no
//! system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::evaluation::MetricsFile;
use crate::metrics;
use crate::ReportError;

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();
pub(crate) const FAMILY: &str = "sans-serif";

pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        let registered = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
        assert!(
            registered.is_ok(),
            "the embedded DejaVu Sans is a valid font"
        );
    });
}

pub const BLUE: RGBColor = RGBColor(46, 110, 180);
pub const ORANGE: RGBColor = RGBColor(230, 140, 40);

/// Per-label F1 at two threshold policies.
pub struct F1Bars<'a> {
    pub labels: &'a [String],
    pub tuned: &'a [f64],
    pub fixed: &'a [f64],
    pub fixed_name: &'a str,
}

pub struct Curves<'a> {
    /// (step, loss)
    pub loss: &'a [(f64, f64)],
    /// (epoch, dev macro-F1)
    pub dev_f1: &'a [(f64, f64)],
}

pub struct PrCurves<'a> {
    pub labels: &'a [String],
    /// Per label: (recall, precision) points.
    pub curves: &'a [Vec<(f64, f64)>],
    /// Per label: (recall, precision) at its tuned threshold, and the threshold.
    pub operating: &'a [(f64, f64, f32)],
}

type R = Result<(), ReportError>;

pub(crate) fn err<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Chart(format!("{e:?}"))
}

/// The training curves' size in pixels.
pub const CURVES_SIZE: (u32, u32) = (1100, 420);
/// The precision–recall grid's size in pixels.
pub const PR_SIZE: (u32, u32) = (1400, 860);

/// What the charts are drawn from: evaluation's metrics and test scores, the training log.
pub struct ChartData {
    pub labels: Vec<String>,
    pub f1_tuned: Vec<f64>,
    pub f1_05: Vec<f64>,
    /// Per label: (recall, precision, threshold) at its tuned threshold.
    pub operating: Vec<(f64, f64, f32)>,
    /// Per label: (recall, precision) points.
    pub pr: Vec<Vec<(f64, f64)>>,
    /// (step, loss)
    pub loss: Vec<(f64, f64)>,
    /// (epoch, dev macro-F1)
    pub dev_f1: Vec<(f64, f64)>,
}

impl ChartData {
    /// From metrics.json, the test scores and truth (rows × labels) and the training log's
    /// (step, loss) and (epoch, dev macro-F1) points.
    pub fn new(
        m: &MetricsFile,
        (scores, truth): (&[f32], &[u8]),
        loss: Vec<(f64, f64)>,
        dev_f1: Vec<(f64, f64)>,
    ) -> Result<ChartData, ReportError> {
        let n = m.labels.len();
        if scores.len() != truth.len() || scores.len() != m.test_rows * n {
            return Err(ReportError::Mismatch(format!(
                "the test scores hold {} values for {} test rows × {n} labels in metrics.json; re-run evaluate",
                scores.len(),
                m.test_rows
            )));
        }
        let (mut f1_tuned, mut f1_05, mut operating) = (vec![], vec![], vec![]);
        for l in &m.labels {
            let t = m.policies.tuned.label("tuned", l)?;
            f1_tuned.push(t.f1);
            f1_05.push(m.policies.at_05.label("0.5", l)?.f1);
            operating.push((t.recall, t.precision, t.threshold as f32));
        }
        let pr = (0..n)
            .map(|l| {
                metrics::pr_curve(scores, truth, n, l)
                    .into_iter()
                    .map(|(_, p, r)| (r, p))
                    .collect()
            })
            .collect();
        Ok(ChartData {
            labels: m.labels.clone(),
            f1_tuned,
            f1_05,
            operating,
            pr,
            loss,
            dev_f1,
        })
    }

    pub fn bars(&self) -> F1Bars<'_> {
        F1Bars {
            labels: &self.labels,
            tuned: &self.f1_tuned,
            fixed: &self.f1_05,
            fixed_name: "0.5",
        }
    }
    pub fn curves(&self) -> Curves<'_> {
        Curves {
            loss: &self.loss,
            dev_f1: &self.dev_f1,
        }
    }
    pub fn pr_curves(&self) -> PrCurves<'_> {
        PrCurves {
            labels: &self.labels,
            curves: &self.pr,
            operating: &self.operating,
        }
    }
    /// The bar plot's size: `width`, and a height that follows the number of labels.
    pub fn bar_size(&self, width: u32) -> (u32, u32) {
        (width, 120 + 26 * self.labels.len() as u32)
    }

    /// `f1_scores_barplot.png`, `training_curves.png` and `pr_curves.png` into `dir`.
    pub fn write_png(&self, dir: &Path, bar_width: u32) -> R {
        png(
            &dir.join("f1_scores_barplot.png"),
            self.bar_size(bar_width),
            |a| f1_bars(a, &self.bars()),
        )?;
        png(&dir.join("training_curves.png"), CURVES_SIZE, |a| {
            training_curves(a, &self.curves())
        })?;
        png(&dir.join("pr_curves.png"), PR_SIZE, |a| {
            pr_curves(a, &self.pr_curves())
        })
    }

    /// The same three charts as `.svg` files.
    pub fn write_svg(&self, dir: &Path, bar_width: u32) -> R {
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| ReportError::Write { path, source })
        };
        write(
            "f1_scores_barplot.svg",
            svg(self.bar_size(bar_width), |a| f1_bars(a, &self.bars()))?,
        )?;
        write(
            "training_curves.svg",
            svg(CURVES_SIZE, |a| training_curves(a, &self.curves()))?,
        )?;
        write(
            "pr_curves.svg",
            svg(PR_SIZE, |a| pr_curves(a, &self.pr_curves()))?,
        )
    }
}

pub fn f1_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &F1Bars<'_>) -> R {
    register_font();
    let n = d.labels.len();
    if d.tuned.len() != n || d.fixed.len() != n {
        return Err(ReportError::Mismatch(format!(
            "F1 bars: {n} labels but {} tuned and {} fixed values",
            d.tuned.len(),
            d.fixed.len()
        )));
    }
    area.fill(&WHITE).map_err(err)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d.tuned[b].total_cmp(&d.tuned[a]).then(a.cmp(&b)));
    // Three segments per label (tuned bar, fixed bar, gap); the best label at the top.
    let base = |rank: usize| 3 * (n - 1 - rank);
    let mut name_at = vec![String::new(); 3 * n];
    for (rank, &l) in order.iter().enumerate() {
        name_at[base(rank) + 1] = d.labels[l].clone();
    }
    let mut chart = ChartBuilder::on(area)
        .caption("F1 per emotion (test split)", (FAMILY, 26))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(120)
        .build_cartesian_2d(0f64..1f64, (0..3 * n).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(3 * n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(k) => name_at.get(*k).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("F1")
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(err)?;
    let bar = |seg: usize, v: f64, color: RGBColor| {
        let mut r = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(seg)),
                (v, SegmentValue::Exact(seg + 1)),
            ],
            color.filled(),
        );
        r.set_margin(1, 1, 0, 0);
        r
    };
    chart
        .draw_series(
            order
                .iter()
                .enumerate()
                .map(|(rank, &l)| bar(base(rank) + 2, d.tuned[l], BLUE)),
        )
        .map_err(err)?
        .label("tuned thresholds")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
    chart
        .draw_series(
            order
                .iter()
                .enumerate()
                .map(|(rank, &l)| bar(base(rank) + 1, d.fixed[l], ORANGE)),
        )
        .map_err(err)?
        .label(format!("threshold {}", d.fixed_name))
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], ORANGE.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    area.present().map_err(err)
}

pub fn training_curves<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &Curves<'_>) -> R {
    register_font();
    area.fill(&WHITE).map_err(err)?;
    let (left, right) = area.split_horizontally(area.dim_in_pixel().0 / 2);
    let max_step = d.loss.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_loss = d.loss.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let mut c = ChartBuilder::on(&left)
        .caption("training loss", (FAMILY, 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max_step, 0f64..max_loss)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("optimizer step")
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    c.draw_series(LineSeries::new(
        d.loss.iter().copied(),
        BLUE.stroke_width(1),
    ))
    .map_err(err)?;
    let max_epoch = d.dev_f1.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_f1 = d.dev_f1.iter().map(|p| p.1).fold(0.0, f64::max).max(0.05) * 1.15;
    let mut c = ChartBuilder::on(&right)
        .caption("dev macro-F1 (threshold 0.5)", (FAMILY, 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..max_epoch + 0.5, 0f64..max_f1.min(1.0))
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("epoch")
        .x_labels(d.dev_f1.len().max(2))
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    c.draw_series(LineSeries::new(
        d.dev_f1.iter().copied(),
        ORANGE.stroke_width(2),
    ))
    .map_err(err)?;
    c.draw_series(d.dev_f1.iter().map(|&p| Circle::new(p, 4, ORANGE.filled())))
        .map_err(err)?;
    area.present().map_err(err)
}

pub fn pr_curves<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &PrCurves<'_>) -> R {
    register_font();
    area.fill(&WHITE).map_err(err)?;
    let cols = 7;
    let rows = d.labels.len().div_ceil(cols).max(1);
    let (title, body) = area.split_vertically(36);
    title
        .draw_text(
            "precision–recall per emotion (test); dot: tuned threshold",
            &(FAMILY, 20).into_text_style(&title),
            (10, 8),
        )
        .map_err(err)?;
    let labels = d.labels.iter().zip(d.curves).zip(d.operating);
    for (cell, ((label, curve), &(r, p, _))) in body.split_evenly((rows, cols)).iter().zip(labels) {
        let mut c = ChartBuilder::on(cell)
            .caption(label, (FAMILY, 13))
            .margin(4)
            .x_label_area_size(16)
            .y_label_area_size(24)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
            .map_err(err)?;
        c.configure_mesh()
            .x_labels(3)
            .y_labels(3)
            .label_style((FAMILY, 9))
            .draw()
            .map_err(err)?;
        c.draw_series(LineSeries::new(curve.iter().copied(), BLUE.stroke_width(1)))
            .map_err(err)?;
        c.draw_series(std::iter::once(Circle::new((r, p), 3, ORANGE.filled())))
            .map_err(err)?;
    }
    area.present().map_err(err)
}

/// Draw `f` into a PNG file.
pub fn png(
    path: &Path,
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> R,
) -> R {
    let area = BitMapBackend::new(path, size).into_drawing_area();
    f(&area)
}

/// Draw `f` into an SVG string.
pub fn svg(
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> R,
) -> Result<String, ReportError> {
    let mut out = String::new();
    {
        let area = SVGBackend::with_string(&mut out, size).into_drawing_area();
        f(&area)?;
    }
    Ok(out)
}
