//! The human report: one self-contained HTML page (charts inlined as SVG) and the same content
//! as Markdown for terminals and CI logs. Built from typed inputs only: metrics.json, the chart
//! data, and plain facts about the data, the training run and the pipeline run that the caller
//! gathers (this crate knows nothing of stages or of the dataset's files).

use std::fmt::Write as _;

use serde::Deserialize;

use crate::charts::{self, ChartData, CURVES_SIZE, PR_SIZE};
use crate::evaluation::MetricsFile;
use crate::ReportError;

/// Published figures the report compares against.
pub const PAPER_MACRO_F1: f64 = 0.46;

/// The figures of `train_metrics.json` the report shows (the file holds more).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TrainMetrics {
    pub train_runtime: f64,
    pub train_samples_per_second: f64,
    pub best_epoch: usize,
    pub epoch: usize,
    /// Dev macro-F1 at 0.5 of the best epoch.
    pub eval_macro_f1: f64,
}

/// What the report shows of the backbone's `config.json` (BERT's names, or DistilBERT's).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct BackboneConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub num_hidden_layers: Option<u64>,
    pub n_layers: Option<u64>,
    pub hidden_size: Option<u64>,
    pub dim: Option<u64>,
}

impl BackboneConfig {
    /// `BertForSequenceClassification (6 layers, hidden 384)`; `?` for what the file lacks.
    pub fn describe(&self) -> String {
        let known = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |x| x.to_string());
        format!(
            "{} ({} layers, hidden {})",
            self.architectures.first().map_or("?", String::as_str),
            known(self.num_hidden_layers.or(self.n_layers)),
            known(self.hidden_size.or(self.dim))
        )
    }
}

/// One split's row count and its share of multi-label rows (in the full split).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitFacts {
    pub name: &'static str,
    pub rows: usize,
    pub multi_label_share: f64,
}

/// The dataset as the load (and sample) stages summarised it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetFacts {
    pub splits: Vec<SplitFacts>,
    pub labels: usize,
    pub taxonomy: &'static str,
    pub rejected: usize,
    pub sample_fraction: Option<f64>,
}

/// Token lengths of the tokenized rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenFacts {
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub p99: usize,
    pub max: usize,
    pub truncated: usize,
    pub max_len: usize,
}

/// One stage of the run that produced the report.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStage {
    pub name: String,
    pub kind: String,
    /// The stage key's first 12 characters.
    pub key: String,
    pub wall_s: f64,
    /// The resolved params as one line of JSON.
    pub params: String,
}

/// Everything one report page shows.
pub struct Page<'a> {
    pub title: &'a str,
    pub metrics: &'a MetricsFile,
    pub charts: &'a ChartData,
    pub dataset: Option<&'a DatasetFacts>,
    pub tokens: &'a TokenFacts,
    pub train: Option<&'a TrainMetrics>,
    pub backbone: &'a BackboneConfig,
    pub run: &'a [RunStage],
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Page<'_> {
    /// (macro-F1, CI low, CI high, micro-F1) at 0.5, 0.3 and tuned, in that order.
    fn headlines(&self) -> [(f64, f64, f64, f64); 3] {
        let (p, ci) = (
            &self.metrics.policies,
            &self.metrics.bootstrap.macro_f1_95ci,
        );
        [
            (&p.at_05, ci.at_05),
            (&p.at_03, ci.at_03),
            (&p.tuned, ci.tuned),
        ]
        .map(|(p, [lo, hi])| (p.macro_.f1, lo, hi, p.micro.f1))
    }

    fn per_label_rows(&self) -> Result<Vec<[String; 10]>, ReportError> {
        let p = &self.metrics.policies;
        let opt = |v: Option<&Option<f64>>| {
            v.copied()
                .flatten()
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "–".into())
        };
        self.charts
            .labels
            .iter()
            .map(|l| {
                let a = p.at_05.label("0.5", l)?;
                let t = p.tuned.label("tuned", l)?;
                Ok([
                    l.clone(),
                    t.support.to_string(),
                    format!("{:.3}", a.precision),
                    format!("{:.3}", a.recall),
                    format!("{:.3}", a.f1),
                    format!("{:.3}", t.threshold),
                    format!("{:.3}", t.precision),
                    format!("{:.3}", t.recall),
                    format!("{:.3}", t.f1),
                    format!(
                        "{} / {}",
                        opt(self.metrics.roc_auc.get(l)),
                        opt(self.metrics.average_precision.get(l))
                    ),
                ])
            })
            .collect()
    }

    fn data_rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        if let Some(d) = self.dataset {
            for s in &d.splits {
                rows.push((
                    format!("{} rows", s.name),
                    format!(
                        "{} ({:.1}% multi-label in the full split)",
                        s.rows,
                        s.multi_label_share * 100.0
                    ),
                ));
            }
            rows.push(("labels".into(), format!("{} ({})", d.labels, d.taxonomy)));
            rows.push(("rows rejected by load".into(), d.rejected.to_string()));
            if let Some(fr) = d.sample_fraction {
                rows.push(("sample fraction".into(), format!("{fr}")));
            }
        }
        let l = self.tokens;
        rows.push((
            "tokens per text".into(),
            format!(
                "mean {:.1}, p50 {}, p95 {}, p99 {}, max {} ({} truncated at {})",
                l.mean, l.p50, l.p95, l.p99, l.max, l.truncated, l.max_len
            ),
        ));
        rows
    }

    fn training_rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![("backbone".to_owned(), self.backbone.describe())];
        if let Some(t) = self.train {
            rows.push(("train runtime".into(), format!("{:.0} s", t.train_runtime)));
            rows.push((
                "train samples/s".into(),
                format!("{:.1}", t.train_samples_per_second),
            ));
            rows.push((
                "best epoch".into(),
                format!(
                    "{} of {} (dev macro-F1 {:.4} at 0.5)",
                    t.best_epoch, t.epoch, t.eval_macro_f1
                ),
            ));
        }
        rows
    }

    /// The self-contained HTML page.
    pub fn html(&self) -> Result<String, ReportError> {
        let bars = charts::svg(self.charts.bar_size(900), |a| {
            charts::f1_bars(a, &self.charts.bars())
        })?;
        let curves = charts::svg(CURVES_SIZE, |a| {
            charts::training_curves(a, &self.charts.curves())
        })?;
        let pr = charts::svg(PR_SIZE, |a| charts::pr_curves(a, &self.charts.pr_curves()))?;
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>\
body{{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}}\
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border-bottom:1px solid #ddd;padding:3px 10px;text-align:right}}\
td:first-child,th:first-child{{text-align:left}}th{{background:#f3f5f8}}.big{{font-size:1.25em}}figure{{margin:1em 0}}\
figure svg{{max-width:100%;height:auto;border:1px solid #eee}}code{{font-size:.9em}}\
td.params{{text-align:left;max-width:640px}}td.params code{{white-space:pre-wrap;overflow-wrap:anywhere}}</style></head><body><h1>{t}</h1>",
            t = esc(self.title)
        );
        h.push_str("<h2>Results on the test split</h2><table class=\"big\"><tr><th>threshold policy</th><th>macro-F1</th><th>95% bootstrap CI</th><th>micro-F1</th></tr>");
        let names = [
            "0.5 (the seed project's)",
            "0.3 (the GoEmotions paper's)",
            "per-label, tuned on dev",
        ];
        for (name, (m, lo, hi, micro)) in names.into_iter().zip(self.headlines()) {
            let _ = write!(h, "<tr><td>{name}</td><td><b>{m:.4}</b></td><td>{lo:.4} – {hi:.4}</td><td>{micro:.4}</td></tr>");
        }
        let _ = write!(h, "<tr><td>GoEmotions paper, BERT-base at 0.3</td><td>{PAPER_MACRO_F1:.2}</td><td></td><td></td></tr><tr><td>seed project (DistilBERT, 20% of one raw file, 0.5)</td><td colspan=3>per-label only: gratitude 0.81, love 0.62, amusement/admiration ≈ 0.56–0.58; grief, nervousness, pride ≈ 0.1–0.2</td></tr></table>");
        let _ = write!(h, "<figure><figcaption>F1 per emotion, tuned thresholds vs 0.5</figcaption>{bars}</figure>");
        h.push_str("<h2>Per label</h2><table><tr><th>label</th><th>support</th><th>P @0.5</th><th>R @0.5</th><th>F1 @0.5</th><th>threshold</th><th>P tuned</th><th>R tuned</th><th>F1 tuned</th><th>ROC-AUC / AP</th></tr>");
        for r in self.per_label_rows()? {
            h.push_str("<tr>");
            for c in r {
                let _ = write!(h, "<td>{}</td>", esc(&c));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table><h2>Training</h2><table>");
        for (k, v) in self.training_rows() {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(&k), esc(&v));
        }
        let _ = write!(h, "</table><figure><figcaption>training loss and dev macro-F1</figcaption>{curves}</figure><figure>{pr}</figure>");
        h.push_str("<h2>Data</h2><table>");
        for (k, v) in self.data_rows() {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(&k), esc(&v));
        }
        h.push_str("</table><h2>Run</h2><table><tr><th>stage</th><th>kind</th><th>key</th><th>wall time</th><th>params</th></tr>");
        for s in self.run {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{:.1} s</td><td class=\"params\"><code>{}</code></td></tr>", esc(&s.name), esc(&s.kind), s.key, s.wall_s, esc(&s.params));
        }
        h.push_str("</table></body></html>\n");
        Ok(h)
    }

    /// The same report as Markdown.
    pub fn markdown(&self) -> Result<String, ReportError> {
        let mut s = format!("# {}\n\n## Results on the test split\n\n| threshold policy | macro-F1 | 95% CI | micro-F1 |\n|---|---|---|---|\n", self.title);
        let names = [
            "0.5 (seed project)",
            "0.3 (GoEmotions paper)",
            "tuned on dev",
        ];
        for (name, (m, lo, hi, micro)) in names.into_iter().zip(self.headlines()) {
            let _ = writeln!(s, "| {name} | **{m:.4}** | {lo:.4}–{hi:.4} | {micro:.4} |");
        }
        let _ = writeln!(s, "| paper, BERT-base at 0.3 | {PAPER_MACRO_F1:.2} | | |\n\n## Per label\n\n| label | support | F1 @0.5 | threshold | P tuned | R tuned | F1 tuned | ROC-AUC / AP |\n|---|---|---|---|---|---|---|---|");
        for [label, support, _, _, f1_05, threshold, p, r, f1, auc_ap] in self.per_label_rows()? {
            let _ = writeln!(
                s,
                "| {label} | {support} | {f1_05} | {threshold} | {p} | {r} | {f1} | {auc_ap} |"
            );
        }
        s.push_str("\n## Training\n\n");
        for (k, v) in self.training_rows() {
            let _ = writeln!(s, "- {k}: {v}");
        }
        s.push_str("\n## Data\n\n");
        for (k, v) in self.data_rows() {
            let _ = writeln!(s, "- {k}: {v}");
        }
        s.push_str("\n## Run\n\n| stage | kind | key | wall time |\n|---|---|---|---|\n");
        for r in self.run {
            let _ = writeln!(
                s,
                "| {} | {} | `{}` | {:.1} s |",
                r.name, r.kind, r.key, r.wall_s
            );
        }
        s.push_str("\nCharts: f1_scores_barplot.png, training_curves.png, pr_curves.png (from the plot stage).\n");
        Ok(s)
    }
}
