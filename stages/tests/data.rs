//! Data stages on slices of the real files and on crafted bad files.

use std::path::Path;

use goemo_data::data::{read_dataset, Split};
use goemo_data::load::{parse_official, Reject};
use goemo_data::sample::{sample, SampleParams};
use goemo_data::tokens::{load_tokenizer, TokenizedData};
use goemo_stages::load::LoadStage;
use goemo_stages::sample::SampleStage;
use goemo_stages::tokenize::TokenizeStage;
use goemo_testing::{goemotions_dir, minilm_dir, run_stage};

fn labels() -> String {
    std::fs::read_to_string(goemotions_dir().join("labels.txt")).unwrap()
}

/// A data folder with the real labels and the given split files.
fn folder(train: &[u8], dev: &[u8], test: &[u8]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("labels.txt"), labels()).unwrap();
    for (n, b) in [("train.tsv", train), ("dev.tsv", dev), ("test.tsv", test)] {
        std::fs::write(d.path().join(n), b).unwrap();
    }
    d
}

fn rejects_of(bytes: &[u8]) -> Vec<Reject> {
    let mut rejects = Vec::new();
    parse_official(bytes, "train.tsv", Split::Train, 28, &mut rejects);
    rejects
}

#[test]
fn every_bad_row_is_named_with_its_line() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"good text\t1\tid1\nonly two\t3\n",
            "2: expected 3 tab-separated fields (text, label ids, comment id), found 2",
        ),
        (b"text\tx\tid1\n", "1: label id `x` is not a number"),
        (
            b"text\t3,28\tid1\n",
            "1: label id 28 is out of range: the label file has 28 labels (0–27)",
        ),
        (b"a\t1\tid0\n   \t4\tid1\n", "2: empty text"),
        (
            b"ok\t1\tid0\nbad \xff\xfe\t2\tid1\n",
            "2: not valid UTF-8 (byte 5 of the line)",
        ),
        (
            b"one\t1\tdup\ntwo\t2\tdup\n",
            "2: duplicate comment id `dup` in the train split (first on line 1)",
        ),
        (b"text\t\tid1\n", "1: no label ids"),
    ];
    for (bytes, want) in cases {
        let r = rejects_of(bytes);
        assert_eq!(r.len(), 1, "{want}: {r:?}");
        let got = format!("{}:{}: {}", r[0].line, r[0].line, r[0].reason);
        let (line, msg) = want.split_once(": ").unwrap();
        assert_eq!(r[0].line.to_string(), line, "{got}");
        assert_eq!(r[0].reason, msg);
    }
}

#[test]
fn on_bad_rows_fail_names_file_and_line_skip_writes_rejects() {
    let d = folder(
        b"fine\t1\tt1\nbroken line\nalso fine\t2,27\tt2\n",
        b"dev text\t3\td1\n",
        b"test text\t4\tx1\n",
    );
    let err = run_stage(&LoadStage, "{}", &[("data", d.path())])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 bad row(s)")
            && err.contains("train.tsv:2: expected 3 tab-separated fields"),
        "{err}"
    );
    assert!(err.contains("on_bad_rows: skip"), "{err}");

    let out = run_stage(&LoadStage, "on_bad_rows: skip", &[("data", d.path())]).unwrap();
    let rejects = std::fs::read_to_string(out.path().join("out/rejects.jsonl")).unwrap();
    let r: Reject = serde_json::from_str(rejects.lines().next().unwrap()).unwrap();
    assert_eq!(
        (r.line, r.kind.as_str(), r.raw.as_str()),
        (2, "wrong field count", "broken line")
    );
    // Named relative to the data folder, which lies outside the project here: out/ must not
    // depend on where the data is (it held the absolute path).
    assert_eq!(r.file, "train.tsv");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["rejected"]["total"], 1);
    assert_eq!(summary["rejected"]["by_reason"]["wrong field count"], 1);
    assert_eq!(summary["rows"]["train"], 2);
    assert_eq!(
        summary["lines_read"],
        serde_json::json!({"dev.tsv": 1, "test.tsv": 1, "train.tsv": 3})
    );
    let (_, rows) = read_dataset(&out.path().join("out")).unwrap();
    assert_eq!(rows[1].labels, vec![2, 27]);
}

#[test]
fn a_missing_file_is_named() {
    let d = folder(b"a\t1\tx\n", b"b\t1\ty\n", b"c\t1\tz\n");
    std::fs::remove_file(d.path().join("dev.tsv")).unwrap();
    let err = run_stage(&LoadStage, "{}", &[("data", d.path())])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dev.tsv: cannot read") && err.contains("./setup.sh"),
        "{err}"
    );
}

#[test]
fn an_empty_split_file_says_so() {
    for empty in [&b""[..], b"\n\n", b"  \r\n"] {
        let d = folder(empty, b"b\t1\ty\n", b"c\t1\tz\n");
        let err = run_stage(&LoadStage, "{}", &[("data", d.path())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "train.tsv: empty file ({} bytes, no rows)",
                empty.len()
            )) && err.contains("goemo fetch-data"),
            "{err}"
        );
        assert!(!err.contains("field"), "{err}");
    }
}

const HEADER: &str =
    "text,id,author,subreddit,link_id,parent_id,created_utc,rater_id,example_very_unclear";

fn raw_row(text: &str, id: &str, rater: u32, unclear: bool, labels: &[usize]) -> String {
    let cells: Vec<&str> = (0..28)
        .map(|l| if labels.contains(&l) { "1" } else { "0" })
        .collect();
    format!(
        "\"{text}\",{id},au,sub,t3_x,t1_y,1548381039.0,{rater},{},{}\n",
        if unclear { "True" } else { "False" },
        cells.join(",")
    )
}

fn raw_folder(files: &[(&str, String)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("labels.txt"), labels()).unwrap();
    let header = format!(
        "{HEADER},{}\n",
        labels().lines().collect::<Vec<_>>().join(",")
    );
    for (name, body) in files {
        std::fs::write(d.path().join(name), format!("{header}{body}")).unwrap();
    }
    d
}

#[test]
fn raw_rater_files_are_aggregated_like_the_paper() {
    // c1: joy (17) by two raters, anger (2) by one → keeps joy only.
    // c2: only single-rater labels → dropped. c3: marked very unclear → dropped.
    let f1 = raw_row("joy, with a comma", "c1", 1, false, &[17, 2])
        + &raw_row("meh", "c2", 1, false, &[5])
        + &raw_row("??", "c3", 1, true, &[27]);
    let f2 = raw_row("joy, with a comma", "c1", 2, false, &[17])
        + &raw_row("meh", "c2", 2, false, &[6])
        + &raw_row("??", "c3", 2, false, &[27]);
    let d = raw_folder(&[("goemotions_1.csv", f1), ("goemotions_2.csv", f2)]);
    let out = run_stage(
        &LoadStage,
        "{source: raw, raw_files: [goemotions_1.csv, goemotions_2.csv]}",
        &[("data", d.path())],
    )
    .unwrap();
    let (_, rows) = read_dataset(&out.path().join("out")).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].id.as_str(),
            rows[0].text.as_str(),
            rows[0].labels.clone()
        ),
        ("c1", "joy, with a comma", vec![17])
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["filtered"]["marked example_very_unclear"], 1);
    assert_eq!(s["filtered"]["no label chosen by at least 2 raters"], 1);
    // One file alone: nothing reaches two raters.
    let d1 = raw_folder(&[("goemotions_1.csv", raw_row("x", "c1", 1, false, &[17]))]);
    let out = run_stage(
        &LoadStage,
        "{source: raw, raw_files: [goemotions_1.csv]}",
        &[("data", d1.path())],
    )
    .unwrap();
    assert_eq!(read_dataset(&out.path().join("out")).unwrap().1.len(), 0);
}

#[test]
fn raw_splits_are_seeded_and_bad_raw_input_is_named() {
    let mut body = String::new();
    for i in 0..200 {
        for rater in 0..2 {
            body += &raw_row("t", &format!("c{i:03}"), rater, false, &[i % 28]);
        }
    }
    let d = raw_folder(&[("goemotions_1.csv", body)]);
    let run = |seed: u64| {
        let out = run_stage(
            &LoadStage,
            &format!("{{source: raw, raw_files: [goemotions_1.csv], split_seed: {seed}}}"),
            &[("data", d.path())],
        )
        .unwrap();
        read_dataset(&out.path().join("out")).unwrap().1
    };
    let a = run(1);
    assert_eq!(a.iter().filter(|r| r.split == Split::Train).count(), 160);
    assert_eq!(a.iter().filter(|r| r.split == Split::Dev).count(), 20);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));

    let bad = raw_folder(&[(
        "goemotions_1.csv",
        raw_row("t", "c1", 1, false, &[1]).replace(",1548381039.0,", ",1548381039.0,x,"),
    )]);
    let err = run_stage(
        &LoadStage,
        "{source: raw, raw_files: [goemotions_1.csv]}",
        &[("data", bad.path())],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("goemotions_1.csv:2: expected 37 comma-separated fields, found 38"),
        "{err}"
    );
    let cell = raw_folder(&[(
        "goemotions_1.csv",
        raw_row("t", "c1", 1, false, &[1]).replacen(",0,", ",2,", 1),
    )]);
    let err = run_stage(
        &LoadStage,
        "{source: raw, raw_files: [goemotions_1.csv]}",
        &[("data", cell.path())],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("goemotions_1.csv:2: label column `admiration` is `2`, expected 0 or 1"),
        "{err}"
    );
    let header = tempfile::tempdir().unwrap();
    std::fs::write(header.path().join("labels.txt"), labels()).unwrap();
    std::fs::write(header.path().join("goemotions_1.csv"), "text,id,wrong\n").unwrap();
    let err = run_stage(
        &LoadStage,
        "{source: raw, raw_files: [goemotions_1.csv]}",
        &[("data", header.path())],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("goemotions_1.csv:1: not a raw GoEmotions header: column 3 is `wrong`, expected `author`"), "{err}");
}

#[test]
fn ekman_and_sentiment_taxonomies_map_rows_to_the_union_of_groups() {
    // grief (16) + curiosity (7); joy (17) + love (18); neutral (27).
    let d = folder(
        b"a\t16,7\tt1\nb\t17,18\tt2\n",
        b"c\t27\td1\n",
        b"e\t2\tx1\n",
    );
    let out = run_stage(&LoadStage, "taxonomy: ekman", &[("data", d.path())]).unwrap();
    let (names, rows) = read_dataset(&out.path().join("out")).unwrap();
    assert_eq!(
        names,
        ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
    );
    assert_eq!(
        rows.iter().map(|r| r.labels.clone()).collect::<Vec<_>>(),
        vec![vec![4, 5], vec![3], vec![6], vec![0]]
    );
    let out = run_stage(&LoadStage, "taxonomy: sentiment", &[("data", d.path())]).unwrap();
    let (names, rows) = read_dataset(&out.path().join("out")).unwrap();
    assert_eq!(names, ["positive", "negative", "ambiguous", "neutral"]);
    assert_eq!(
        rows.iter().map(|r| r.labels.clone()).collect::<Vec<_>>(),
        vec![vec![1, 2], vec![0], vec![3], vec![1]]
    );
}

fn full_load() -> tempfile::TempDir {
    run_stage(&LoadStage, "{}", &[("data", &goemotions_dir())]).unwrap()
}

#[test]
fn stratified_sample_is_deterministic_and_keeps_every_label() {
    let load = full_load();
    let (labels, rows) = read_dataset(&load.path().join("out")).unwrap();
    let p = SampleParams {
        fraction: 0.2,
        seed: 7,
        stratify: true,
        splits: vec![Split::Train],
    };
    let a = sample(&rows, labels.len(), &p);
    assert_eq!(a, sample(&rows, labels.len(), &p), "same seed, same rows");
    let train: Vec<_> = a.iter().filter(|r| r.split == Split::Train).collect();
    assert!(
        (train.len() as f64 - 0.2 * 43_410.0).abs() <= 434.0,
        "{}",
        train.len()
    );
    assert_eq!(
        a.iter().filter(|r| r.split == Split::Dev).count(),
        5_426,
        "dev kept whole"
    );
    for (l, name) in labels.iter().enumerate() {
        let full = rows
            .iter()
            .filter(|r| r.split == Split::Train && r.labels.contains(&(l as u32)))
            .count();
        let got = train
            .iter()
            .filter(|r| r.labels.contains(&(l as u32)))
            .count();
        assert!(got > 0, "{name} missing from the 20% sample");
        let want = 0.2 * full as f64;
        assert!(
            (got as f64) >= want.round() && (got as f64) <= want * 1.5 + 3.0,
            "{name}: {got} of {full}"
        );
    }
    let other = sample(
        &rows,
        labels.len(),
        &SampleParams {
            seed: 8,
            ..p.clone()
        },
    );
    assert_ne!(a, other);
    // Through the stage: the summary records before and after.
    let out = run_stage(
        &SampleStage,
        "{fraction: 0.2, seed: 7}",
        &[("dataset", &load.path().join("out"))],
    )
    .unwrap();
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["sample"]["rows_before"]["train"], 43_410);
    assert!(
        s["sample"]["splits_after"]["train"]["examples_per_label"]["grief"]
            .as_u64()
            .unwrap()
            >= 15,
        "20% of 77 grief rows"
    );
}

#[test]
fn full_official_data_loads_samples_and_tokenizes() {
    let load = full_load();
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(load.path().join("out/summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            s["rows"]["train"].as_u64(),
            s["rows"]["dev"].as_u64(),
            s["rows"]["test"].as_u64()
        ),
        (Some(43_410), Some(5_426), Some(5_427))
    );
    assert_eq!(s["labels"].as_array().unwrap().len(), 28);
    assert_eq!(s["splits"]["train"]["multi_label_rows"], 7_102);
    assert_eq!(s["splits"]["train"]["max_labels_per_row"], 5);
    assert_eq!(s["splits"]["train"]["examples_per_label"]["grief"], 77);
    assert_eq!(s["rejected"]["total"], 0);
    let sampled = run_stage(&SampleStage, "{}", &[("dataset", &load.path().join("out"))]).unwrap();
    let tok = run_stage(
        &TokenizeStage,
        "{}",
        &[
            ("dataset", &sampled.path().join("out")),
            ("model", &minilm_dir()),
        ],
    )
    .unwrap();
    let t = TokenizedData::read(&tok.path().join("out")).unwrap();
    assert_eq!(t.len(), 54_263);
    assert_eq!(t.rows_in(Split::Test).len(), 5_427);
    assert_eq!(t.meta.lengths.max, 316);
    assert_eq!(t.meta.lengths.truncated, 0);
    assert!(
        (18..=20).contains(&t.meta.lengths.p50) && (33..=35).contains(&t.meta.lengths.p95),
        "{:?}",
        t.meta.lengths
    );
    assert_eq!(t.row(0)[0], 101, "[CLS] first");
    // Only max_len changed: tokenize output changes (truncation), the same rows in.
    let short = run_stage(
        &TokenizeStage,
        "max_len: 32",
        &[
            ("dataset", &sampled.path().join("out")),
            ("model", &minilm_dir()),
        ],
    )
    .unwrap();
    let t32 = TokenizedData::read(&short.path().join("out")).unwrap();
    assert_eq!(t32.meta.lengths.max, 32);
    assert!(t32.meta.lengths.truncated > 1000);
    assert_eq!(
        *t32.row((0..t32.len()).find(|&i| t32.row(i).len() == 32).unwrap())
            .last()
            .unwrap(),
        102,
        "[SEP] kept when truncating"
    );
}

#[test]
fn tokenizer_ids_equal_the_reference_tokenizer() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer_reference.json");
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = load_tokenizer(&minilm_dir(), f["max_len"].as_u64().unwrap() as usize).unwrap();
    for case in f["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode_fast(text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
    }
    // Padding is off even though the file ships with fixed padding to 128.
    assert_eq!(tok.encode_fast("hi", true).unwrap().get_ids().len(), 3);
}

#[test]
fn vocab_txt_alone_gives_the_same_ids() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(minilm_dir().join("vocab.txt"), d.path().join("vocab.txt")).unwrap();
    let from_vocab = load_tokenizer(d.path(), 64).unwrap();
    let from_json = load_tokenizer(&minilm_dir(), 64).unwrap();
    for t in ["Café naïve résumé", "[NAME] is 😍 here", "WHY THE FUCK"] {
        assert_eq!(
            from_vocab.encode_fast(t, true).unwrap().get_ids(),
            from_json.encode_fast(t, true).unwrap().get_ids(),
            "{t}"
        );
    }
}
