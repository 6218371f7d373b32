//! `report`: what a person reads at the end.
//!
//! Results (content-hashed, in `out/`):
//! - `emotion_classification_report.csv` at the tuned thresholds (and `…_at_0.5.csv`,
//!   `…_at_0.3.csv`): label, precision, recall, f1, support, threshold, then the micro, macro,
//!   weighted and samples averages, like scikit-learn's classification report;
//! - `overall_metrics.json`: flat Trainer-style keys (`eval_macro_f1`, …, `_at_0.5`, `_at_0.3`
//!   variants) beside the nested per-policy, per-label blocks.
//!
//! The human report (in `volatile/`, because it shows wall times): `report.html`, one
//! self-contained page with the charts inlined as SVG, and `report.md` for terminals and CI logs.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::plot::{ChartData, CURVES_SIZE, PR_SIZE};
use goemo_data::tokens::TokensMeta;
use goemo_report::charts;
use goemo_stage::{resolve_typed, InputSpec, Inputs, ParamError, Stage, StageContext};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportParams {
    /// A title for the report page.
    pub title: Option<String>,
}

/// Published figures the report compares against.
pub const PAPER_MACRO_F1: f64 = 0.46;

pub struct ReportStage;

impl Stage for ReportStage {
    fn kind(&self) -> &'static str {
        "report"
    }
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "classification report CSV, overall_metrics.json, and an HTML + Markdown report"
    }
    fn inputs(&self) -> Inputs {
        const SPECS: &[InputSpec] = &[
            InputSpec::stage("evaluate", "metrics from evaluate", &["evaluate"]),
            InputSpec::stage("train", "the model and training log from train", &["train"]),
            InputSpec::stage("tokens", "token statistics from tokenize", &["tokenize"]),
            InputSpec::stage(
                "dataset",
                "the data summary from sample or load",
                &["sample", "load"],
            )
            .optional(),
        ];
        Inputs::Fixed(SPECS)
    }
    fn resolve_params(&self, raw: &goemo_stage::RawParams) -> Result<serde_json::Value, ParamError> {
        resolve_typed::<ReportParams>(raw)
    }

    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<()> {
        let p: ReportParams = ctx.params()?;
        let eval_dir = ctx.input("evaluate")?;
        let m: Value = goemo_fsio::read_json(&eval_dir.join("metrics.json"))?;
        for (policy, suffix) in [("tuned", ""), ("0.5", "_at_0.5"), ("0.3", "_at_0.3")] {
            std::fs::write(
                ctx.out_dir
                    .join(format!("emotion_classification_report{suffix}.csv")),
                classification_csv(&m, policy)?,
            )?;
        }
        goemo_fsio::write_json(
            &ctx.out_dir.join("overall_metrics.json"),
            &overall_metrics(&m),
        )?;

        let charts_data = ChartData::read(eval_dir, ctx.input("train")?)?;
        let tokens: TokensMeta =
            goemo_fsio::read_json(&ctx.input("tokens")?.join(goemo_data::tokens::META_FILE))?;
        let summary: Option<Value> = ctx
            .optional_input("dataset")
            .and_then(|d| goemo_fsio::read_json(&d.join("summary.json")).ok());
        let train_metrics: Option<Value> = ctx
            .upstream_volatile
            .get("train")
            .and_then(|d| goemo_fsio::read_json(&d.join("train_metrics.json")).ok());
        let model_config: Option<Value> =
            goemo_fsio::read_json(&ctx.input("train")?.join("model/config.json")).ok();
        let page = Page {
            title: p
                .title
                .unwrap_or_else(|| "goemo: GoEmotions emotion classification".into()),
            m: &m,
            charts: &charts_data,
            tokens: &tokens,
            summary: summary.as_ref(),
            train_metrics: train_metrics.as_ref(),
            model_config: model_config.as_ref(),
            ctx,
        };
        std::fs::write(ctx.volatile_dir.join("report.html"), page.html()?)?;
        std::fs::write(ctx.volatile_dir.join("report.md"), page.markdown())?;
        Ok(())
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// scikit-learn's classification report as CSV, one policy.
pub fn classification_csv(m: &Value, policy: &str) -> anyhow::Result<String> {
    let labels: Vec<String> = serde_json::from_value(m["labels"].clone())?;
    let p = &m["policies"][policy];
    if p.is_null() {
        anyhow::bail!("metrics.json has no `{policy}` policy; re-run evaluate");
    }
    let mut out = String::from("label,precision,recall,f1,support,threshold\n");
    let mut total = 0u64;
    for l in &labels {
        let r = &p["per_label"][l];
        total += r["support"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{l},{:.6},{:.6},{:.6},{},{:.6}",
            f(&r["precision"]),
            f(&r["recall"]),
            f(&r["f1"]),
            r["support"],
            f(&r["threshold"])
        );
    }
    for avg in ["micro", "macro", "weighted", "samples"] {
        let r = &p[avg];
        let _ = writeln!(
            out,
            "{avg} avg,{:.6},{:.6},{:.6},{total},",
            f(&r["precision"]),
            f(&r["recall"]),
            f(&r["f1"])
        );
    }
    Ok(out)
}

/// Flat Trainer-style keys (tuned thresholds unsuffixed) beside the nested blocks.
pub fn overall_metrics(m: &Value) -> Value {
    let mut flat = serde_json::Map::new();
    for (policy, suffix) in [("tuned", ""), ("0.5", "_at_0.5"), ("0.3", "_at_0.3")] {
        let p = &m["policies"][policy];
        for avg in ["macro", "micro", "weighted", "samples"] {
            for k in ["f1", "precision", "recall"] {
                flat.insert(format!("eval_{avg}_{k}{suffix}"), p[avg][k].clone());
            }
        }
        flat.insert(
            format!("eval_exact_match{suffix}"),
            p["exact_match"].clone(),
        );
        flat.insert(
            format!("eval_hamming_loss{suffix}"),
            p["hamming_loss"].clone(),
        );
        flat.insert(
            format!("eval_macro_f1_ci95{suffix}"),
            m["bootstrap"]["macro_f1_95ci"][policy].clone(),
        );
    }
    flat.insert("eval_macro_roc_auc".into(), m["macro_roc_auc"].clone());
    flat.insert(
        "eval_macro_average_precision".into(),
        m["macro_average_precision"].clone(),
    );
    flat.insert("eval_samples".into(), m["test_rows"].clone());
    let mut out = Value::Object(flat);
    out["policies"] = m["policies"].clone();
    out["per_label"] = m["policies"]["tuned"]["per_label"].clone();
    out["roc_auc"] = m["roc_auc"].clone();
    out["average_precision"] = m["average_precision"].clone();
    out["bootstrap"] = m["bootstrap"].clone();
    out
}

struct Page<'a> {
    title: String,
    m: &'a Value,
    charts: &'a ChartData,
    tokens: &'a TokensMeta,
    summary: Option<&'a Value>,
    train_metrics: Option<&'a Value>,
    model_config: Option<&'a Value>,
    ctx: &'a StageContext<'a>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Page<'_> {
    fn macro_line(&self, policy: &str) -> (f64, f64, f64) {
        let ci = &self.m["bootstrap"]["macro_f1_95ci"][policy];
        (
            f(&self.m["policies"][policy]["macro"]["f1"]),
            f(&ci[0]),
            f(&ci[1]),
        )
    }

    fn backbone(&self) -> String {
        let c = self.model_config.cloned().unwrap_or(Value::Null);
        format!(
            "{} ({} layers, hidden {})",
            c["architectures"][0].as_str().unwrap_or("?"),
            c["num_hidden_layers"]
                .as_u64()
                .or(c["n_layers"].as_u64())
                .unwrap_or(0),
            c["hidden_size"].as_u64().or(c["dim"].as_u64()).unwrap_or(0)
        )
    }

    /// Stage name, kind, key, wall seconds: this stage's ancestors in the run.
    fn stages(&self) -> Vec<(String, String, String, f64, String)> {
        self.ctx
            .run_record
            .stages
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.kind.clone(),
                    s.key[..12.min(s.key.len())].to_owned(),
                    s.wall_s,
                    serde_json::to_string(&s.params).unwrap_or_default(),
                )
            })
            .collect()
    }

    fn per_label_rows(&self) -> Vec<[String; 10]> {
        let p = &self.m["policies"];
        self.charts
            .labels
            .iter()
            .map(|l| {
                let a = &p["0.5"]["per_label"][l];
                let t = &p["tuned"]["per_label"][l];
                let opt = |v: &Value| {
                    v.as_f64()
                        .map(|x| format!("{x:.3}"))
                        .unwrap_or_else(|| "–".into())
                };
                [
                    l.clone(),
                    t["support"].to_string(),
                    format!("{:.3}", f(&a["precision"])),
                    format!("{:.3}", f(&a["recall"])),
                    format!("{:.3}", f(&a["f1"])),
                    format!("{:.3}", f(&t["threshold"])),
                    format!("{:.3}", f(&t["precision"])),
                    format!("{:.3}", f(&t["recall"])),
                    format!("{:.3}", f(&t["f1"])),
                    format!(
                        "{} / {}",
                        opt(&self.m["roc_auc"][l]),
                        opt(&self.m["average_precision"][l])
                    ),
                ]
            })
            .collect()
    }

    fn data_rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        if let Some(s) = self.summary {
            for split in ["train", "dev", "test"] {
                let n = s["sample"]["splits_after"][split]["rows"]
                    .as_u64()
                    .or(s["rows"][split].as_u64())
                    .unwrap_or(0);
                let share = s["splits"][split]["multi_label_share"]
                    .as_f64()
                    .unwrap_or(0.0);
                rows.push((
                    format!("{split} rows"),
                    format!("{n} ({:.1}% multi-label in the full split)", share * 100.0),
                ));
            }
            rows.push((
                "labels".into(),
                format!(
                    "{} ({})",
                    s["labels"].as_array().map(Vec::len).unwrap_or(0),
                    s["taxonomy"].as_str().unwrap_or("original")
                ),
            ));
            rows.push((
                "rows rejected by load".into(),
                s["rejected"]["total"].to_string(),
            ));
            if let Some(fr) = s["sample"]["fraction"].as_f64() {
                rows.push(("sample fraction".into(), format!("{fr}")));
            }
        }
        let l = &self.tokens.lengths;
        rows.push((
            "tokens per text".into(),
            format!(
                "mean {:.1}, p50 {}, p95 {}, p99 {}, max {} ({} truncated at {})",
                l.mean, l.p50, l.p95, l.p99, l.max, l.truncated, self.tokens.max_len
            ),
        ));
        rows
    }

    fn training_rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![("backbone".to_owned(), self.backbone())];
        if let Some(t) = self.train_metrics {
            rows.push((
                "train runtime".into(),
                format!("{:.0} s", f(&t["train_runtime"])),
            ));
            rows.push((
                "train samples/s".into(),
                format!("{:.1}", f(&t["train_samples_per_second"])),
            ));
            rows.push((
                "best epoch".into(),
                format!(
                    "{} of {} (dev macro-F1 {:.4} at 0.5)",
                    t["best_epoch"],
                    t["epoch"],
                    f(&t["eval_macro_f1"])
                ),
            ));
        }
        rows
    }

    fn html(&self) -> anyhow::Result<String> {
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
            t = esc(&self.title)
        );
        h.push_str("<h2>Results on the test split</h2><table class=\"big\"><tr><th>threshold policy</th><th>macro-F1</th><th>95% bootstrap CI</th><th>micro-F1</th></tr>");
        for (policy, name) in [
            ("0.5", "0.5 (the seed project's)"),
            ("0.3", "0.3 (the GoEmotions paper's)"),
            ("tuned", "per-label, tuned on dev"),
        ] {
            let (m, lo, hi) = self.macro_line(policy);
            let _ = write!(h, "<tr><td>{name}</td><td><b>{m:.4}</b></td><td>{lo:.4} – {hi:.4}</td><td>{:.4}</td></tr>", f(&self.m["policies"][policy]["micro"]["f1"]));
        }
        let _ = write!(h, "<tr><td>GoEmotions paper, BERT-base at 0.3</td><td>{PAPER_MACRO_F1:.2}</td><td></td><td></td></tr><tr><td>seed project (DistilBERT, 20% of one raw file, 0.5)</td><td colspan=3>per-label only: gratitude 0.81, love 0.62, amusement/admiration ≈ 0.56–0.58; grief, nervousness, pride ≈ 0.1–0.2</td></tr></table>");
        let _ = write!(h, "<figure><figcaption>F1 per emotion, tuned thresholds vs 0.5</figcaption>{bars}</figure>");
        h.push_str("<h2>Per label</h2><table><tr><th>label</th><th>support</th><th>P @0.5</th><th>R @0.5</th><th>F1 @0.5</th><th>threshold</th><th>P tuned</th><th>R tuned</th><th>F1 tuned</th><th>ROC-AUC / AP</th></tr>");
        for r in self.per_label_rows() {
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
        for (name, kind, key, wall, params) in self.stages() {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td><td><code>{key}</code></td><td>{wall:.1} s</td><td class=\"params\"><code>{}</code></td></tr>", esc(&name), esc(&kind), esc(&params));
        }
        h.push_str("</table></body></html>\n");
        Ok(h)
    }

    fn markdown(&self) -> String {
        let mut s = format!("# {}\n\n## Results on the test split\n\n| threshold policy | macro-F1 | 95% CI | micro-F1 |\n|---|---|---|---|\n", self.title);
        for (policy, name) in [
            ("0.5", "0.5 (seed project)"),
            ("0.3", "0.3 (GoEmotions paper)"),
            ("tuned", "tuned on dev"),
        ] {
            let (m, lo, hi) = self.macro_line(policy);
            let _ = writeln!(
                s,
                "| {name} | **{m:.4}** | {lo:.4}–{hi:.4} | {:.4} |",
                f(&self.m["policies"][policy]["micro"]["f1"])
            );
        }
        let _ = writeln!(s, "| paper, BERT-base at 0.3 | {PAPER_MACRO_F1:.2} | | |\n\n## Per label\n\n| label | support | F1 @0.5 | threshold | P tuned | R tuned | F1 tuned | ROC-AUC / AP |\n|---|---|---|---|---|---|---|---|");
        for r in self.per_label_rows() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r[0], r[1], r[4], r[5], r[6], r[7], r[8], r[9]
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
        for (name, kind, key, wall, _) in self.stages() {
            let _ = writeln!(s, "| {name} | {kind} | `{key}` | {wall:.1} s |");
        }
        s.push_str("\nCharts: f1_scores_barplot.png, training_curves.png, pr_curves.png (from the plot stage).\n");
        s
    }
}

/// Read a report's inputs back for tests.
pub fn read_overall(path: &Path) -> anyhow::Result<Value> {
    Ok(goemo_fsio::read_json(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metrics() -> Value {
        let per = |f1: f64| json!({"precision": 0.5, "recall": 0.25, "f1": f1, "support": 4, "threshold": 0.3});
        let policy = json!({
            "micro": {"precision": 0.5, "recall": 0.5, "f1": 0.5}, "macro": {"precision": 0.4, "recall": 0.3, "f1": 0.35},
            "weighted": {"precision": 0.45, "recall": 0.35, "f1": 0.4}, "samples": {"precision": 0.6, "recall": 0.5, "f1": 0.55},
            "exact_match": 0.2, "hamming_loss": 0.1, "per_label": {"joy": per(0.3), "anger": per(0.4)}
        });
        json!({"labels": ["joy", "anger"], "test_rows": 10, "policies": {"0.5": policy, "0.3": policy, "tuned": policy},
               "roc_auc": {"joy": 0.9, "anger": null}, "average_precision": {"joy": 0.8, "anger": null},
               "macro_roc_auc": 0.9, "macro_average_precision": 0.8, "bootstrap": {"macro_f1_95ci": {"0.5": [0.3, 0.4], "0.3": [0.3, 0.4], "tuned": [0.3, 0.4]}}})
    }

    #[test]
    fn csv_has_a_row_per_label_then_the_averages() {
        let csv = classification_csv(&metrics(), "tuned").unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "label,precision,recall,f1,support,threshold");
        assert_eq!(lines[1], "joy,0.500000,0.250000,0.300000,4,0.300000");
        assert_eq!(lines[3], "micro avg,0.500000,0.500000,0.500000,8,");
        assert_eq!(lines[4], "macro avg,0.400000,0.300000,0.350000,8,");
        assert_eq!(lines.len(), 7);
        assert!(classification_csv(&metrics(), "0.7").is_err());
    }

    #[test]
    fn overall_metrics_has_flat_trainer_keys_and_nested_blocks() {
        let o = overall_metrics(&metrics());
        assert_eq!(o["eval_macro_f1"], json!(0.35));
        assert_eq!(o["eval_samples_f1_at_0.5"], json!(0.55));
        assert_eq!(o["eval_hamming_loss_at_0.3"], json!(0.1));
        assert_eq!(o["eval_macro_f1_ci95"], json!([0.3, 0.4]));
        assert_eq!(o["per_label"]["anger"]["f1"], json!(0.4));
        assert!(o["policies"]["0.5"]["micro"].is_object());
    }
}
