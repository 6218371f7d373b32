//! Edit one param of pipeline.yaml in place, keeping every comment, blank line and the layout
//! of everything else (`goemo exp apply` writes an experiment's params this way). A line-based
//! edit of block-style YAML; params written inline (`params: {lr: 1}`) are refused rather than
//! reformatted, and every edit is checked by parsing the result.

/// Set `stages.<stage>.params.<path…>` to `value` (YAML text) in the file's text.
pub fn set_param(text: &str, stage: &str, path: &[String], value: &str) -> Result<String, String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let stages = find_key(&lines, 0, lines.len(), 0, "stages")
        .ok_or("pipeline.yaml has no `stages:` block")?;
    let (s_start, s_end) = block(&lines, stages);
    let stage_indent = child_indent(&lines, s_start, s_end).ok_or("`stages:` is empty")?;
    let st = find_key(&lines, s_start, s_end, stage_indent, stage)
        .ok_or_else(|| format!("no stage `{stage}` under `stages:`"))?;
    let mut keys = vec!["params".to_owned()];
    keys.extend(path.iter().cloned());
    let mut at = st;
    for (depth, key) in keys.iter().enumerate() {
        if has_inline_value(&lines[at]) && depth > 0 {
            return Err(format!(
                "`{}` is written inline; write it as a block (one key a line) or edit it by hand",
                keys[..depth].join(".")
            ));
        }
        let (b_start, b_end) = block(&lines, at);
        let indent = child_indent(&lines, b_start, b_end).unwrap_or(indent_of(&lines[at]) + 2);
        let last = depth + 1 == keys.len();
        match find_key(&lines, b_start, b_end, indent, key) {
            Some(found) if last => {
                let (c_start, c_end) = block(&lines, found);
                lines[found] = replace_value(&lines[found], value);
                lines.drain(c_start..c_end);
            }
            Some(found) => at = found,
            None => {
                // Insert the rest of the path after the block's last line, and after the
                // comment lines that continue that line's own comment (indented past the keys).
                let mut insert_at = last_content_line(&lines, at, b_end) + 1;
                while insert_at < lines.len()
                    && lines[insert_at].trim_start().starts_with('#')
                    && indent_of(&lines[insert_at]) > indent
                {
                    insert_at += 1;
                }
                let mut new = Vec::new();
                for (k, rest) in keys[depth..].iter().enumerate() {
                    let pad = " ".repeat(indent + 2 * k);
                    if depth + k + 1 == keys.len() {
                        new.push(format!("{pad}{rest}: {value}"));
                    } else {
                        new.push(format!("{pad}{rest}:"));
                    }
                }
                lines.splice(insert_at..insert_at, new);
                break;
            }
        }
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    check(&out, stage, path, value)?;
    Ok(out)
}

/// The edit reads back as intended, and the file is still valid YAML.
fn check(text: &str, stage: &str, path: &[String], value: &str) -> Result<(), String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| format!("the edited file is not valid YAML: {e}"))?;
    let want: serde_yaml::Value =
        serde_yaml::from_str(value).map_err(|e| format!("`{value}` is not YAML: {e}"))?;
    let mut v = doc
        .get("stages")
        .and_then(|s| s.get(stage))
        .and_then(|s| s.get("params"));
    for p in path {
        v = v.and_then(|x| x.get(p.as_str()));
    }
    if v == Some(&want) {
        Ok(())
    } else {
        Err(format!(
            "could not write {stage}.{} = {value} into the file's layout; edit it by hand",
            path.join(".")
        ))
    }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// The line `key:` at exactly `indent` in `start..end`.
fn find_key(lines: &[String], start: usize, end: usize, indent: usize, key: &str) -> Option<usize> {
    (start..end).find(|&i| {
        let l = &lines[i];
        is_content(l)
            && indent_of(l) == indent
            && l[indent..].strip_prefix(key).is_some_and(|rest| {
                rest.starts_with(':') && (rest.len() == 1 || rest[1..].starts_with([' ', '\t']))
            })
    })
}

/// The lines nested under line `at`: `(at + 1, end)`.
fn block(lines: &[String], at: usize) -> (usize, usize) {
    let indent = indent_of(&lines[at]);
    let mut end = at + 1;
    while end < lines.len() && (!is_content(&lines[end]) || indent_of(&lines[end]) > indent) {
        end += 1;
    }
    // Trailing blank and comment lines belong to what follows.
    while end > at + 1 && !is_content(&lines[end - 1]) {
        end -= 1;
    }
    (at + 1, end)
}

fn child_indent(lines: &[String], start: usize, end: usize) -> Option<usize> {
    (start..end)
        .find(|&i| is_content(&lines[i]))
        .map(|i| indent_of(&lines[i]))
}

fn last_content_line(lines: &[String], at: usize, end: usize) -> usize {
    (at..end)
        .rev()
        .find(|&i| is_content(&lines[i]))
        .unwrap_or(at)
}

/// `key: value  # comment` → (`key:`, ` value`, `  # comment`).
fn split_line(line: &str) -> (&str, &str, &str) {
    let colon = line.find(':').unwrap_or(line.len());
    let (head, rest) = line.split_at((colon + 1).min(line.len()));
    let mut quote = None;
    let mut prev_space = true;
    for (i, c) in rest.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') if prev_space => {
                let value_end = rest[..i].trim_end().len();
                return (head, &rest[..value_end], &rest[value_end..]);
            }
            _ => {}
        }
        prev_space = c == ' ' || c == '\t';
    }
    (head, rest, "")
}

fn has_inline_value(line: &str) -> bool {
    !split_line(line).1.trim().is_empty()
}

/// The line with its value replaced; a trailing comment keeps its column where it fits.
fn replace_value(line: &str, value: &str) -> String {
    let (head, old, comment) = split_line(line);
    if comment.is_empty() {
        return format!("{head} {value}");
    }
    let column = head.len() + old.len() + (comment.len() - comment.trim_start().len());
    let text = format!("{head} {value}");
    let pad = column.saturating_sub(text.len()).max(1);
    format!("{text}{}{}", " ".repeat(pad), comment.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "# top comment\nstages:\n  load:\n    inputs:\n      data: data   # the data\n\n  train:\n    deps: [load]\n    params:\n      lr: 1.0e-4                     # MiniLM learns slowly\n      pos_weight: none               # none | auto\n      opt:\n        beta1: 0.9\n    publish:\n      out/model: model\n\n  evaluate:\n    deps: [train]\n";

    fn set(text: &str, stage: &str, path: &str, value: &str) -> Result<String, String> {
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        set_param(text, stage, &path, value)
    }

    #[test]
    fn a_value_is_replaced_and_comments_keep_their_column() {
        let out = set(YAML, "train", "lr", "3e-5").unwrap();
        assert!(
            out.contains("      lr: 3e-5                       # MiniLM learns slowly\n"),
            "{out}"
        );
        assert_eq!(out.lines().count(), YAML.lines().count());
        let out = set(&out, "train", "opt.beta1", "0.95").unwrap();
        assert!(out.contains("        beta1: 0.95\n"));
        assert!(out.starts_with("# top comment\nstages:\n"));
        assert!(out.ends_with("deps: [train]\n"));
    }

    #[test]
    fn missing_params_and_keys_are_inserted_in_their_block() {
        let out = set(YAML, "train", "epochs", "5").unwrap();
        assert!(
            out.contains("        beta1: 0.9\n      epochs: 5\n    publish:"),
            "{out}"
        );
        let out = set(YAML, "evaluate", "bootstrap_samples", "200").unwrap();
        assert!(
            out.ends_with("    deps: [train]\n    params:\n      bootstrap_samples: 200\n"),
            "{out}"
        );
        let out = set(YAML, "load", "fraction", "0.2").unwrap();
        assert!(
            out.contains(
                "      data: data   # the data\n    params:\n      fraction: 0.2\n\n  train:"
            ),
            "{out}"
        );
    }

    /// A key's trailing comment that runs onto the next lines (indented past the keys) stays
    /// with it: the new key goes after it, not between its lines.
    #[test]
    fn an_inserted_key_goes_after_a_comment_continued_below_the_last_key() {
        let yaml = "stages:\n  train:\n    params:\n      precision: auto    # bf16 where\n                         # the CPU has it\n\n  evaluate:\n    deps: [train]\n";
        let out = set(yaml, "train", "loss", "asl").unwrap();
        assert!(
            out.contains("# bf16 where\n                         # the CPU has it\n      loss: asl\n\n  evaluate:"),
            "{out}"
        );
    }

    #[test]
    fn a_list_value_replaces_a_block_and_inline_params_are_refused() {
        let out = set(YAML, "train", "opt", "{beta1: 0.8}").unwrap();
        assert!(
            out.contains("      opt: {beta1: 0.8}\n    publish:"),
            "{out}"
        );
        let inline = "stages:\n  train:\n    params: {lr: 1}\n";
        assert!(set(inline, "train", "lr", "2")
            .unwrap_err()
            .contains("written inline"));
        assert!(set(YAML, "nosuch", "lr", "2")
            .unwrap_err()
            .contains("no stage `nosuch`"));
    }
}
