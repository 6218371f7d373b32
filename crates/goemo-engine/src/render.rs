//! `goemo dag`: the pipeline drawn as text (layers with arrows), Graphviz dot or Mermaid.

use std::fmt::Write;
use std::path::Path;

use crate::pipeline::Pipeline;

/// Stages by layer, one block per layer with arrows from the layer above:
///
/// ```text
/// [data] data/goemotions
///     │
///     ▼
/// load ─────────── load GoEmotions …
///     │
///     ▼
/// sample  ◀ load
/// ```
pub fn text(p: &Pipeline) -> String {
    let layer = p.graph().layers();
    let depth = layer.iter().max().copied().unwrap_or(0);
    let width = p.stages.iter().map(|s| s.name.len()).max().unwrap_or(4);
    let mut out = String::new();
    for l in 0..=depth {
        if l > 0 {
            out.push_str("    │\n    ▼\n");
        }
        for (_, def) in p.stages.iter().enumerate().filter(|(i, _)| layer[*i] == l) {
            let mut from: Vec<String> = def
                .deps
                .iter()
                .map(|(role, up)| {
                    let kind = &p.stages[p.position(up).expect("validated")].kind;
                    if role == up || role == kind {
                        up.clone()
                    } else {
                        format!("{up} as {role}")
                    }
                })
                .collect();
            from.extend(
                def.inputs
                    .iter()
                    .map(|(role, path)| format!("[{role}] {}", input_label(p, path))),
            );
            let kind = if def.kind == def.name {
                String::new()
            } else {
                format!(" ({})", def.kind)
            };
            let _ = write!(out, "  {:<width$}{kind}", def.name);
            if !from.is_empty() {
                let _ = write!(out, "  ◀ {}", from.join(", "));
            }
            if !def.publish.is_empty() {
                let targets: Vec<String> = def
                    .publish
                    .iter()
                    .map(|p| format!("outputs/{}", p.to))
                    .collect();
                let _ = write!(out, "  ▶ {}", targets.join(", "));
            }
            out.push('\n');
        }
    }
    out
}

pub fn dot(p: &Pipeline) -> String {
    let mut out = String::from("digraph goemo {\n  rankdir=TB;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n");
    for def in &p.stages {
        let _ = writeln!(
            out,
            "  \"{}\" [label=\"{}\\n({})\"];",
            esc(&def.name),
            esc(&def.name),
            esc(&def.kind)
        );
        for (role, path) in &def.inputs {
            let node = format!("{}:{role}", def.name);
            let _ = writeln!(
                out,
                "  \"{}\" [shape=note, label=\"{}\"];",
                esc(&node),
                esc(&input_label(p, path))
            );
            let _ = writeln!(out, "  \"{}\" -> \"{}\";", esc(&node), esc(&def.name));
        }
    }
    for def in &p.stages {
        for up in def.deps.values() {
            let _ = writeln!(out, "  \"{}\" -> \"{}\";", esc(up), esc(&def.name));
        }
    }
    out.push_str("}\n");
    out
}

pub fn mermaid(p: &Pipeline) -> String {
    // Mermaid ids must be plain; labels carry the real names.
    let id = |i: usize| format!("s{i}");
    let mut out = String::from("flowchart TD\n");
    for (i, def) in p.stages.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {}[\"{}<br/><small>{}</small>\"]",
            id(i),
            mesc(&def.name),
            mesc(&def.kind)
        );
        for (j, (role, path)) in def.inputs.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}_in{j}[/\"{}: {}\"/] --> {}",
                id(i),
                mesc(role),
                mesc(&input_label(p, path)),
                id(i)
            );
        }
    }
    for (i, _) in p.stages.iter().enumerate() {
        for &u in p.upstream(i) {
            let _ = writeln!(out, "  {} --> {}", id(u), id(i));
        }
    }
    out
}

/// An input path as pipeline.yaml gives it, marked when it lies outside the project folder.
fn input_label(p: &Pipeline, path: &Path) -> String {
    match crate::pipeline::external_location(&p.root, path) {
        Some(abs) => format!("{} (external: {})", path.display(), abs.display()),
        None => path.display().to_string(),
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn mesc(s: &str) -> String {
    s.replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}
