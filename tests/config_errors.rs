//! Every bad pipeline.yaml case exits 2 with a message naming the place and what is valid.

mod common;

use common::Project;

fn check(pipeline: &str, expected: &[&str]) {
    let p = Project::new(pipeline);
    p.write("input.txt", "x");
    for cmd in [&["run"][..], &["status"][..], &["dag"][..]] {
        let r = p.goemo(cmd);
        assert_eq!(r.code, 2, "goemo {cmd:?} should exit 2:\n{}", r.all());
        for e in expected {
            assert!(
                r.stderr.contains(e),
                "goemo {cmd:?}: expected {e:?} in:\n{}",
                r.stderr
            );
        }
    }
    assert!(
        !p.file("cache/entries").exists(),
        "nothing may be written for a bad pipeline"
    );
}

#[test]
fn unknown_stage_key() {
    check(
        "stages:\n  a:\n    kind: command\n    parms: {cmd: x}\n",
        &[
            "pipeline.yaml:4:5: stage `a`: unknown field `parms`",
            "a stage takes: kind, deps, inputs, params, publish",
        ],
    );
}

#[test]
fn unknown_top_level_key() {
    check(
        "stagez:\n  a: {}\n",
        &["pipeline.yaml:1:1: unknown field `stagez`", "`stages:`"],
    );
}

#[test]
fn unknown_kind() {
    check(
        "stages:\n  a:\n    kind: comand\n    params: {cmd: x}\n",
        &[
            "pipeline.yaml:3:5: stage `a`: unknown stage kind `comand`",
            "kinds are: load, sample, tokenize, train, distill, thresholds, evaluate, package, report, plot, command",
        ],
    );
}

#[test]
fn stage_name_that_is_not_a_kind() {
    check(
        "stages:\n  tokenise:\n    params: {}\n",
        &[
            "stage `tokenise`: unknown stage kind `tokenise`",
            "set `kind:`",
        ],
    );
}

#[test]
fn unknown_param() {
    check(
        "stages:\n  a:\n    kind: command\n    params:\n      cmd: echo\n      verz: {}\n",
        &["pipeline.yaml:6:7: stage `a`, param `verz`: unknown field `verz`, expected `cmd` or `vars`"],
    );
}

#[test]
fn ill_typed_param() {
    check(
        "stages:\n  a:\n    kind: command\n    params:\n      cmd: [1, 2]\n",
        &[
            "pipeline.yaml:5:7: stage `a`, param `cmd`: ",
            "invalid type: sequence, expected a string",
        ],
    );
}

#[test]
fn ill_typed_param_from_set() {
    let p = Project::new("stages:\n  a:\n    kind: command\n    params: {cmd: echo}\n");
    let r = p.goemo(&["run", "--set", "a.vars=3"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr
            .contains("stage `a`, param `vars`: invalid type: integer `3`, expected a map"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("this value came from --set"),
        "{}",
        r.stderr
    );
}

#[test]
fn missing_upstream() {
    check(
        "stages:\n  a:\n    kind: command\n    deps: {x: ghost}\n    params: {cmd: echo}\n",
        &[
            "pipeline.yaml:4:5: stage `a`, deps: upstream stage `ghost` does not exist",
            "stages are: a",
        ],
    );
}

#[test]
fn cycle_is_printed() {
    check(
        "stages:\n  a:\n    kind: command\n    deps: {x: c}\n    params: {cmd: echo}\n  b:\n    kind: command\n    deps: {x: a}\n    params: {cmd: echo}\n  c:\n    kind: command\n    deps: {x: b}\n    params: {cmd: echo}\n",
        &["cycle: ", "a → b → c → a", "remove one of these deps"],
    );
}

#[test]
fn self_cycle() {
    check(
        "stages:\n  a:\n    kind: command\n    deps: {x: a}\n    params: {cmd: echo}\n",
        &["cycle: a → a"],
    );
}

#[test]
fn duplicate_stage_names() {
    check(
        "stages:\n  a:\n    kind: command\n    params: {cmd: echo}\n  a:\n    kind: command\n    params: {cmd: echo}\n",
        &["pipeline.yaml:", "duplicate entry with key \"a\"", "stage names must be unique"],
    );
}

#[test]
fn missing_input_path() {
    check(
        "stages:\n  a:\n    kind: command\n    inputs: {data: nowhere/data}\n    params: {cmd: echo}\n",
        &["pipeline.yaml:4:5: stage `a`, input `data`: input path `nowhere/data` does not exist", "hint:"],
    );
}

#[test]
fn missing_required_param() {
    check(
        "stages:\n  a:\n    kind: command\n",
        &["stage `a`, param `cmd`: missing field `cmd`"],
    );
}

#[test]
fn invalid_yaml_syntax() {
    check(
        "stages:\n  a:\n    kind: command\n   params: {cmd: echo}\n",
        &["pipeline.yaml:4:"],
    );
}

#[test]
fn missing_pipeline_file() {
    let dir = tempfile::tempdir().unwrap();
    let r: common::Run = std::process::Command::new(common::bin())
        .arg("status")
        .current_dir(dir.path())
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("pipeline.yaml: cannot read the pipeline file"),
        "{}",
        r.stderr
    );
}

#[test]
fn publish_outside_outputs() {
    check(
        "stages:\n  a:\n    kind: command\n    params: {cmd: echo}\n    publish: {out/x: ../x}\n",
        &["pipeline.yaml:5:5: stage `a`, publish: publish target `../x` has a `..` component, which would leave its folder"],
    );
}

#[test]
fn publish_targets_that_are_not_plain_paths_inside_outputs() {
    for (target, why) in [
        ("''", "publish target `` is empty"),
        (".", "publish target `.` has a `.` component"),
        ("..", "publish target `..` has a `..` component"),
        ("/etc/x", "publish target `/etc/x` is an absolute path"),
        (
            "a/../../x",
            "publish target `a/../../x` has a `..` component",
        ),
        ("./x", "publish target `./x` has a `.` component"),
        ("a//x", "publish target `a//x` has an empty component"),
        ("model/", "publish target `model/` ends with `/`"),
        (
            ".goemo-published.json",
            "publish target `.goemo-published.json` is goemo's own record of what it published",
        ),
        (
            "sub/.x.goemo-tmp.12",
            "publish target `sub/.x.goemo-tmp.12` has the form of goemo's temp names",
        ),
    ] {
        check(
            &format!("stages:\n  a:\n    kind: command\n    params: {{cmd: echo}}\n    publish:\n      out/x: {target}\n"),
            &[
                &format!("pipeline.yaml:6:7: stage `a`, publish: {why}"),
                "hint: a target is a path relative to outputs/",
            ],
        );
    }
}

#[test]
fn publish_source_that_leaves_the_stage_folder() {
    check(
        "stages:\n  a:\n    kind: command\n    params: {cmd: echo}\n    publish:\n      out/../../../../etc/hostname: hostname\n",
        &[
            "pipeline.yaml:6:7: stage `a`, publish: publish source `out/../../../../etc/hostname` has a `..` component",
            "hint: a source is a path inside the stage's result",
        ],
    );
    check(
        "stages:\n  a:\n    kind: command\n    params: {cmd: echo}\n    publish: [/etc/hostname]\n",
        &["publish source `/etc/hostname` must start with `out/` or `volatile/`"],
    );
}

#[test]
fn publish_target_inside_another() {
    check(
        "stages:\n  a:\n    kind: command\n    params: {cmd: echo}\n    publish: {out/m: model}\n  b:\n    kind: command\n    params: {cmd: echo}\n    publish: {out/c: model/config.json}\n",
        &[
            "stage `b`, publish: outputs/model/config.json lies inside outputs/model (published by `a` and `b`)",
            "hint: give each published file or folder its own place",
        ],
    );
}

#[test]
fn inputs_that_are_not_files_or_folders() {
    for (path, why) in [
        (
            "/dev/null",
            "input path `/dev/null` is a character device, not a regular file or folder",
        ),
        (
            "/proc/self/status",
            "input path `/proc/self/status` lies under /proc",
        ),
    ] {
        check(
            &format!("stages:\n  a:\n    kind: command\n    inputs:\n      data: {path}\n    params: {{cmd: echo}}\n"),
            &[
                &format!("pipeline.yaml:5:7: stage `a`, input `data`: {why}"),
                "hint: an input is a regular file or a folder",
            ],
        );
    }
    // A FIFO would block the hasher forever.
    let p = Project::new(
        "stages:\n  a:\n    kind: command\n    inputs: {data: pipe}\n    params: {cmd: echo}\n",
    );
    let fifo = std::ffi::CString::new(p.file("pipe").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let r = p.goemo(&["status"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains(
            "stage `a`, input `data`: input path `pipe` is a FIFO (named pipe), not a regular file or folder"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn pipeline_that_is_not_utf8() {
    let p = Project::new("");
    // "é" saved as Latin-1 (0xe9) in a comment on line 3, column 10.
    let mut bytes = b"stages:\n  a:\n    # caf".to_vec();
    bytes.extend([0xe9, b'\n']);
    bytes.extend(b"    kind: command\n    params: {cmd: echo}\n");
    std::fs::write(p.file("pipeline.yaml"), &bytes).unwrap();
    let r = p.goemo(&["status"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains(
            "pipeline.yaml:3:10: not valid UTF-8: byte 0xe9 at offset 22\n  hint: save pipeline.yaml as UTF-8"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn long_keys_and_values_are_clipped_in_messages() {
    let huge = "k".repeat(1_000_000);
    let k80 = "k".repeat(80);
    for (pipeline, expected) in [
        // Longer than YAML's 1024-character limit for a key: read as a plain string.
        (
            format!("{huge}:\n  a: 1\n"),
            format!("pipeline.yaml:1:1: invalid type: string \"{k80}…\""),
        ),
        (
            format!("stages:\n  {}:\n    kind: comand\n", "n".repeat(1000)),
            format!("stage `{}…`: unknown stage kind `comand`", "n".repeat(80)),
        ),
        (
            format!("stages:\n  a:\n    kind: command\n    deps: {{x: {huge}}}\n    params: {{cmd: echo}}\n"),
            format!("stage `a`, deps: upstream stage `{k80}…` does not exist"),
        ),
    ] {
        let p = Project::new(&pipeline);
        let r = p.goemo(&["status"]);
        assert_eq!(r.code, 2, "{}", &r.stderr[..r.stderr.len().min(400)]);
        assert!(
            r.stderr.len() < 600,
            "{} bytes of error:\n{}",
            r.stderr.len(),
            &r.stderr[..600]
        );
        assert!(r.stderr.contains(&expected), "{}", r.stderr);
    }
}

#[test]
fn dep_of_a_kind_the_role_does_not_take() {
    let upstream = "stages:\n  load:\n    inputs: {data: input.txt}\n  tokenize:\n    deps: [load]\n    inputs: {model: input.txt}\n";
    check(
        &format!("{upstream}  thresholds:\n    deps:\n      model: load\n      tokens: tokenize\n"),
        &[
            "pipeline.yaml:9:7: stage `thresholds`, deps: input `model` takes the fine-tuned model from train (or distill), but `load` is a `load` stage",
            "hint: give `model` a stage of kind train or distill: `deps: {model: STAGE}`",
        ],
    );
    // A role for a file or folder, given a stage.
    check(
        &format!("{upstream}  train:\n    deps: {{tokens: tokenize, model: load}}\n"),
        &[
            "stage `train`, deps: input `model` takes",
            "but `load` is a `load` stage",
            "hint: `model` is a file or folder: give it as `inputs: {model: PATH}`",
        ],
    );
}

#[test]
fn a_command_stage_may_fill_any_role() {
    let p = Project::new(
        "stages:\n  fetch:\n    kind: command\n    params: {cmd: echo}\n  load:\n    deps: {data: fetch}\n",
    );
    let r = p.goemo(&["dag"]);
    assert_eq!(r.code, 0, "{}", r.all());
}
