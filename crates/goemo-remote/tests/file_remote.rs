//! push and pull against a `file://` remote, with entries committed through the engine's cache.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

use goemo_engine::cache::{Cache, Lookup, MANIFEST};
use goemo_engine::entrylock::EntryLock;
mod common;

use common::{entry, fingerprint};
use goemo_remote::{Options, Outcome, Progress, Remote, RemoteUrl, Wanted};

fn remote_at(dir: &Path) -> Remote {
    let url = RemoteUrl::parse(&format!("file://{}", dir.display()), "test").unwrap();
    Remote::open(&url).unwrap()
}

/// Small parts, so a 300 KiB file goes up in several.
fn opts() -> Options {
    Options {
        jobs: 4,
        part_size: 64 << 10,
    }
}

fn wanted(stage: &str, key: &str) -> Wanted {
    Wanted {
        stage: stage.into(),
        key: key.into(),
    }
}

fn big() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn no_progress(_: Progress<'_>) {}

fn objects(remote: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(remote.join("objects"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn push_then_pull_moves_entries_verified_and_stores_identical_files_once() {
    let (a, b, r) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cache_a = Cache::new(a.path());
    let big = big();
    let k1 = entry(
        &cache_a,
        "one",
        &[
            ("out/a.txt", b"hello"),
            ("out/sub/big.bin", &big),
            ("volatile/log.txt", b"took 1s"),
        ],
    );
    let k2 = entry(&cache_a, "two", &[("out/same.txt", b"hello")]);
    let want = [wanted("one", &k1), wanted("two", &k2)];
    let remote = remote_at(r.path());
    let files_seen = AtomicUsize::new(0);
    let count = |p: Progress<'_>| {
        if let Progress::File { .. } = p {
            files_seen.fetch_add(1, Ordering::SeqCst);
        }
    };

    let pushed = goemo_remote::push(&remote, &cache_a, &want, &opts(), &count).unwrap();
    let outcomes: Vec<_> = pushed
        .entries
        .iter()
        .map(|e| format!("{:?}", e.outcome))
        .collect();
    assert_eq!(outcomes, ["Pushed", "Pushed"]);
    assert_eq!(files_seen.load(Ordering::SeqCst), 4);
    assert_eq!(pushed.entries[0].files, 3);
    // "hello" is stored once though two entries hold it.
    let mut expected = vec![
        blake3_hex(b"hello"),
        blake3_hex(&big),
        blake3_hex(b"took 1s"),
    ];
    expected.sort();
    assert_eq!(objects(r.path()), expected);
    // And sent once: the second entry waited for the first's upload, then found it there.
    assert_eq!(pushed.bytes_moved(), 5 + big.len() as u64 + 7);
    assert_eq!(
        pushed.entries.iter().map(|e| e.bytes_skipped).sum::<u64>(),
        5
    );
    assert_eq!(
        std::fs::read(r.path().join("objects").join(blake3_hex(&big))).unwrap(),
        big
    );
    // The remote manifest is the entry's manifest.json, byte for byte.
    assert_eq!(
        std::fs::read(r.path().join(format!("entries/{k1}.json"))).unwrap(),
        std::fs::read(cache_a.entry_dir(&k1).join(MANIFEST)).unwrap()
    );
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(r.path().join(format!("volatile/{k1}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(record["files"]["log.txt"]["size"], 7);

    // Pushing again moves nothing.
    let again = goemo_remote::push(&remote, &cache_a, &want, &opts(), &no_progress).unwrap();
    assert_eq!(again.count(|o| matches!(o, Outcome::AlreadyThere)), 2);
    assert_eq!(again.bytes_moved(), 0);

    let cache_b = Cache::new(b.path());
    let pulled = goemo_remote::pull(&remote, &cache_b, &want, &opts(), &no_progress).unwrap();
    let outcomes: Vec<_> = pulled
        .entries
        .iter()
        .map(|e| format!("{:?}", e.outcome))
        .collect();
    assert_eq!(outcomes, ["Pulled", "Pulled"]);
    assert_eq!(pulled.bytes_moved(), 5 + big.len() as u64 + 7 + 5);
    for key in [&k1, &k2] {
        let Lookup::Hit(m) = cache_b.lookup(key) else {
            panic!("{key} was pulled")
        };
        assert!(cache_b.verify(&m).is_empty());
        // The manifest, provenance and time included, is the one the entry was made with.
        assert_eq!(
            std::fs::read(cache_b.entry_dir(key).join(MANIFEST)).unwrap(),
            std::fs::read(cache_a.entry_dir(key).join(MANIFEST)).unwrap()
        );
    }
    assert_eq!(
        std::fs::read(cache_b.entry_dir(&k1).join("out/sub/big.bin")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(cache_b.entry_dir(&k1).join("volatile/log.txt")).unwrap(),
        b"took 1s"
    );
    assert!(std::fs::read_dir(b.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    let again = goemo_remote::pull(&remote, &cache_b, &want, &opts(), &no_progress).unwrap();
    assert_eq!(again.count(|o| matches!(o, Outcome::AlreadyThere)), 2);
}

/// Push one entry with a large file, damage its object with `damage`, pull into a fresh cache:
/// the error text, and the fresh cache's root.
fn pull_damaged(damage: impl Fn(&Path)) -> (String, tempfile::TempDir, String) {
    let (a, b, r) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cache_a = Cache::new(a.path());
    let big = big();
    let key = entry(
        &cache_a,
        "train",
        &[("out/model.bin", &big), ("out/x", b"x")],
    );
    let remote = remote_at(r.path());
    goemo_remote::push(
        &remote,
        &cache_a,
        &[wanted("train", &key)],
        &opts(),
        &no_progress,
    )
    .unwrap();
    damage(&r.path().join("objects").join(blake3_hex(&big)));
    let cache_b = Cache::new(b.path());
    let report = goemo_remote::pull(
        &remote,
        &cache_b,
        &[wanted("train", &key)],
        &opts(),
        &no_progress,
    )
    .unwrap();
    let Outcome::Failed(e) = &report.entries[0].outcome else {
        panic!(
            "a damaged object must fail the pull: {:?}",
            report.entries[0].outcome
        )
    };
    assert!(matches!(cache_b.lookup(&key), Lookup::Missing));
    // Nothing committed, nothing left in tmp/ or work/.
    assert!(std::fs::read_dir(b.path().join("entries")).map_or(true, |mut rd| rd.next().is_none()));
    assert!(std::fs::read_dir(b.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    assert!(!cache_b.work_dir(&key).exists());
    (e.to_string(), b, key)
}

#[test]
fn a_flipped_byte_in_a_remote_object_is_caught_and_nothing_is_committed() {
    let big_hash = blake3_hex(&big());
    let (text, _b, key) = pull_damaged(|object| {
        let mut bytes = std::fs::read(object).unwrap();
        bytes[1234] ^= 0x01;
        std::fs::write(object, bytes).unwrap();
    });
    assert!(text.contains(&format!("stage train, entry {key}: object objects/{big_hash} (out/model.bin) is damaged: its content hashes to ")), "{text}");
    assert!(
        text.contains("nothing of this entry was committed locally"),
        "{text}"
    );

    let (text, _b, _) = pull_damaged(|object| {
        let bytes = std::fs::read(object).unwrap();
        std::fs::write(object, &bytes[..1000]).unwrap();
    });
    assert!(
        text.contains("is damaged: it is 1000 bytes, the manifest says 300000"),
        "{text}"
    );

    let (text, _b, _) = pull_damaged(|object| std::fs::remove_file(object).unwrap());
    assert!(
        text.contains("is damaged: it is missing from the remote"),
        "{text}"
    );
}

#[test]
fn two_pushers_of_one_key_leave_one_good_entry() {
    for round in 0..4 {
        let r = tempfile::tempdir().unwrap();
        let caches: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let big = big();
        let keys: Vec<String> = caches
            .iter()
            .map(|d| {
                entry(
                    &Cache::new(d.path()),
                    "tokenize",
                    &[("out/t.bin", &big), ("volatile/log", b"l")],
                )
            })
            .collect();
        assert_eq!(keys[0], keys[1]);
        let barrier = Barrier::new(2);
        let outcomes = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for d in &caches {
                let (barrier, outcomes, key, r) = (&barrier, &outcomes, &keys[0], &r);
                s.spawn(move || {
                    let remote = remote_at(r.path());
                    let cache = Cache::new(d.path());
                    barrier.wait();
                    let report = goemo_remote::push(
                        &remote,
                        &cache,
                        &[wanted("tokenize", key)],
                        &opts(),
                        &no_progress,
                    )
                    .unwrap();
                    outcomes
                        .lock()
                        .unwrap()
                        .push(format!("{:?}", report.entries[0].outcome));
                });
            }
        });
        let mut outcomes = outcomes.into_inner().unwrap();
        outcomes.sort();
        assert_eq!(outcomes, ["AlreadyThere", "Pushed"], "round {round}");
        let entries: Vec<_> = std::fs::read_dir(r.path().join("entries"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(entries.len(), 1);
        // And it is a good one: a third cache pulls it, verified.
        let c = tempfile::tempdir().unwrap();
        let cache_c = Cache::new(c.path());
        let pulled = goemo_remote::pull(
            &remote_at(r.path()),
            &cache_c,
            &[wanted("tokenize", &keys[0])],
            &opts(),
            &no_progress,
        )
        .unwrap();
        assert!(
            matches!(pulled.entries[0].outcome, Outcome::Pulled),
            "{:?}",
            pulled.entries[0].outcome
        );
        assert_eq!(
            std::fs::read(cache_c.entry_dir(&keys[0]).join("out/t.bin")).unwrap(),
            big
        );
    }
}

#[test]
fn the_same_key_with_other_outputs_keeps_the_remote_s_and_says_so() {
    let (a, a2, r) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let k = entry(&Cache::new(a.path()), "train", &[("out/w", b"1")]);
    let k2 = entry(&Cache::new(a2.path()), "train", &[("out/w", b"2")]);
    assert_eq!(k, k2);
    let remote = remote_at(r.path());
    goemo_remote::push(
        &remote,
        &Cache::new(a.path()),
        &[wanted("train", &k)],
        &opts(),
        &no_progress,
    )
    .unwrap();
    let report = goemo_remote::push(
        &remote,
        &Cache::new(a2.path()),
        &[wanted("train", &k)],
        &opts(),
        &no_progress,
    )
    .unwrap();
    let Outcome::Diverged {
        remote: theirs,
        local,
    } = &report.entries[0].outcome
    else {
        panic!("{:?}", report.entries[0].outcome)
    };
    assert!(
        theirs.starts_with("outputs ") && theirs.contains(" made on "),
        "{theirs}"
    );
    assert_ne!(theirs, local);
    assert_eq!(
        std::fs::read(r.path().join(format!("entries/{k}.json"))).unwrap(),
        std::fs::read(Cache::new(a.path()).entry_dir(&k).join(MANIFEST)).unwrap()
    );
}

/// A change made to a remote manifest.
type Tamper = fn(&mut serde_json::Value);

#[test]
fn a_manifest_that_does_not_match_its_key_is_refused() {
    let (a, b, r) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let k = entry(&Cache::new(a.path()), "load", &[("out/x", b"x")]);
    let remote = remote_at(r.path());
    goemo_remote::push(
        &remote,
        &Cache::new(a.path()),
        &[wanted("load", &k)],
        &opts(),
        &no_progress,
    )
    .unwrap();
    let path = r.path().join(format!("entries/{k}.json"));
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let cases: [(&str, Tamper); 3] = [
        ("its fingerprint gives the key", |m| {
            m["fingerprint"]["params"]["cmd"] = "other".into()
        }),
        ("its outputs do not hash to its outputs_hash", |m| {
            m["outputs"]["x"]["size"] = 2.into()
        }),
        ("leaves the entry's folder", |m| {
            let d = m["outputs"]["x"].clone();
            m["outputs"] = serde_json::json!({ "../../escape": d });
            let files: BTreeMap<String, goemo_engine::hashing::FileDigest> =
                serde_json::from_value(m["outputs"].clone()).unwrap();
            m["outputs_hash"] = goemo_engine::hashing::tree_hash(&files).into();
        }),
    ];
    for (why, tamper) in cases {
        let mut m = original.clone();
        tamper(&mut m);
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let cache_b = Cache::new(b.path());
        let report = goemo_remote::pull(
            &remote,
            &cache_b,
            &[wanted("load", &k)],
            &opts(),
            &no_progress,
        )
        .unwrap();
        let text = match &report.entries[0].outcome {
            Outcome::Failed(e) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(
            text.contains(&format!(
                "entries/{k}.json is not a valid manifest for this key: "
            )),
            "{text}"
        );
        assert!(text.contains(why), "{why}: {text}");
        assert!(matches!(cache_b.lookup(&k), Lookup::Missing));
        assert!(!b.path().join("escape").exists() && !a.path().join("escape").exists());
    }
}

#[test]
fn entries_missing_on_either_side_are_reported_not_invented() {
    let (a, r) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache = Cache::new(a.path());
    let key = fingerprint("never-built").key();
    let remote = remote_at(r.path());
    let pushed =
        goemo_remote::push(&remote, &cache, &[wanted("s", &key)], &opts(), &no_progress).unwrap();
    assert!(
        matches!(&pushed.entries[0].outcome, Outcome::Missing(w) if w.contains("not in the local cache"))
    );
    let pulled =
        goemo_remote::pull(&remote, &cache, &[wanted("s", &key)], &opts(), &no_progress).unwrap();
    assert!(matches!(&pulled.entries[0].outcome, Outcome::Missing(w) if w == "not on the remote"));
    let pulled = goemo_remote::pull(
        &remote,
        &cache,
        &[wanted("s", "../../x")],
        &opts(),
        &no_progress,
    )
    .unwrap();
    assert!(
        matches!(&pulled.entries[0].outcome, Outcome::Missing(w) if w.contains("is not a cache key"))
    );
    assert!(objects(r.path()).is_empty());
    assert!(!r.path().join("entries").exists());
}

#[test]
fn a_pull_waits_for_the_key_s_build_lock() {
    let (a, b, r) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let k = entry(&Cache::new(a.path()), "sample", &[("out/x", b"x")]);
    let remote = remote_at(r.path());
    goemo_remote::push(
        &remote,
        &Cache::new(a.path()),
        &[wanted("sample", &k)],
        &opts(),
        &no_progress,
    )
    .unwrap();
    let held = EntryLock::acquire(b.path(), &k, &|| {}).unwrap();
    let waited = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let on = |p: Progress<'_>| {
                if let Progress::Waiting { stage, .. } = p {
                    assert_eq!(stage, "sample");
                    waited.store(true, Ordering::SeqCst);
                }
            };
            goemo_remote::pull(
                &remote_at(r.path()),
                &Cache::new(b.path()),
                &[wanted("sample", &k)],
                &opts(),
                &on,
            )
            .unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(waited.load(Ordering::SeqCst));
        assert!(matches!(Cache::new(b.path()).lookup(&k), Lookup::Missing));
        drop(held);
        let report = h.join().unwrap();
        assert!(matches!(report.entries[0].outcome, Outcome::Pulled));
    });
}

#[test]
fn a_damaged_local_entry_is_replaced_by_a_verified_pull() {
    let (a, b, r) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let files: &[(&str, &[u8])] = &[("out/x", b"good"), ("volatile/v", b"v")];
    let k = entry(&Cache::new(a.path()), "eval", files);
    let remote = remote_at(r.path());
    let want = [wanted("eval", &k)];
    goemo_remote::push(&remote, &Cache::new(a.path()), &want, &opts(), &no_progress).unwrap();
    // B holds the same key, damaged: its COMPLETE marker is gone (an interrupted commit).
    let cache_b = Cache::new(b.path());
    entry(&cache_b, "eval", files);
    std::fs::remove_file(cache_b.entry_dir(&k).join("COMPLETE")).unwrap();
    assert!(matches!(cache_b.lookup(&k), Lookup::Corrupt(_)));
    let pulled = goemo_remote::pull(&remote, &cache_b, &want, &opts(), &no_progress).unwrap();
    assert!(
        matches!(pulled.entries[0].outcome, Outcome::Pulled),
        "{:?}",
        pulled.entries[0].outcome
    );
    let Lookup::Hit(m) = cache_b.lookup(&k) else {
        panic!("replaced")
    };
    assert!(cache_b.verify(&m).is_empty());
    assert_eq!(
        std::fs::read(cache_b.entry_dir(&k).join("out/x")).unwrap(),
        b"good"
    );
}
