//! Charts drawn with plotters, as PNG files or SVG strings, shared by the `plot` stage (files)
//! and the `report` stage (SVG inlined into one self-contained HTML page).
//!
//! The font is embedded (DejaVu Sans, assets/), so text renders on a bare machine with no
//! system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();
const FAMILY: &str = "sans-serif";

fn register_font() {
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

type R = anyhow::Result<()>;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e:?}")
}

pub fn f1_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, d: &F1Bars<'_>) -> R {
    register_font();
    area.fill(&WHITE).map_err(err)?;
    let n = d.labels.len();
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
    for (i, cell) in body.split_evenly((rows, cols)).iter().enumerate() {
        if i >= d.labels.len() {
            break;
        }
        let mut c = ChartBuilder::on(cell)
            .caption(&d.labels[i], (FAMILY, 13))
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
        c.draw_series(LineSeries::new(
            d.curves[i].iter().copied(),
            BLUE.stroke_width(1),
        ))
        .map_err(err)?;
        let (r, p, _) = d.operating[i];
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
) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let area = SVGBackend::with_string(&mut out, size).into_drawing_area();
        f(&area)?;
    }
    Ok(out)
}
