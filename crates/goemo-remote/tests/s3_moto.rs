//! push and pull against a real S3 protocol server: moto's (`pip install 'moto[server]'`) on
//! loopback. `scripts/test_remote_stores.sh` installs moto, starts the server, creates the bucket,
//! runs this test with `GOEMO_TEST_S3_ENDPOINT` set and stops the server. Without that
//! variable the test starts `moto_server` itself; only when moto is not installed at all does
//! it skip, saying so loudly.
//!
//! One test function: the AWS settings live in the process environment (the store reads them
//! from there, as in production), so the steps run in order.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};

mod common;

use common::entry;
use goemo_engine::cache::{Cache, Lookup};
use goemo_remote::{Options, Outcome, Progress, Remote, RemoteUrl, Wanted};
use object_store::{ObjectStore, ObjectStoreExt};

const BUCKET: &str = "goemo-cache";

/// A moto server this test started; stopped when dropped.
struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One raw HTTP request to the server; the status code (moto takes unsigned requests).
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// The endpoint to use, and the server if this test started it; `None`: moto is missing.
fn server() -> Option<(String, Option<Moto>)> {
    if let Ok(endpoint) = std::env::var("GOEMO_TEST_S3_ENDPOINT") {
        return Some((endpoint, None));
    }
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let moto = Moto(child);
    for _ in 0..150 {
        if http(port, "PUT", &format!("/{BUCKET}")).is_ok_and(|c| c == 200) {
            return Some((format!("http://127.0.0.1:{port}"), Some(moto)));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("moto_server did not answer on port {port} within 15 s");
}

fn no_progress(_: Progress<'_>) {}

fn set_aws_env(endpoint: &str) {
    std::env::set_var("AWS_ENDPOINT_URL", endpoint);
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing-key-id");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing-secret-value");
    std::env::set_var("AWS_REGION", "us-east-1");
}

#[test]
fn s3_remote_against_moto() {
    let Some((endpoint, _moto)) = server() else {
        eprintln!(
            "\n\n######## SKIPPED s3_remote_against_moto: moto_server is not installed ########\n\
             ######## run scripts/test_remote_stores.sh (it installs moto[server])        ########\n"
        );
        return;
    };
    set_aws_env(&endpoint);
    let url =
        RemoteUrl::parse(&format!("s3://{BUCKET}/run-{}", std::process::id()), "test").unwrap();
    let remote = Remote::open(&url).unwrap();
    remote.probe().unwrap();

    // 11 MiB in 5 MiB parts (S3's smallest): a multipart upload of three parts.
    let big: Vec<u8> = (0..11u32 << 20).map(|i| (i % 253) as u8).collect();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache_a = Cache::new(a.path());
    let key = entry(
        &cache_a,
        "train",
        &[
            ("out/model.bin", &big),
            ("out/cfg", b"{}"),
            ("volatile/log", b"ok"),
        ],
    );
    let want = [Wanted {
        stage: "train".into(),
        key: key.clone(),
    }];
    let opts = Options {
        jobs: 4,
        part_size: 5 << 20,
    };
    let t = std::time::Instant::now();
    let pushed = goemo_remote::push(&remote, &cache_a, &want, &opts, &no_progress).unwrap();
    assert!(
        matches!(pushed.entries[0].outcome, Outcome::Pushed),
        "{:?}",
        pushed.entries[0].outcome
    );
    eprintln!(
        "push to moto: {:.1} MB/s",
        big.len() as f64 / 1e6 / t.elapsed().as_secs_f64()
    );
    let again = goemo_remote::push(&remote, &cache_a, &want, &opts, &no_progress).unwrap();
    assert!(matches!(again.entries[0].outcome, Outcome::AlreadyThere));

    let cache_b = Cache::new(b.path());
    let t = std::time::Instant::now();
    let pulled = goemo_remote::pull(&remote, &cache_b, &want, &opts, &no_progress).unwrap();
    assert!(
        matches!(pulled.entries[0].outcome, Outcome::Pulled),
        "{:?}",
        pulled.entries[0].outcome
    );
    eprintln!(
        "pull from moto: {:.1} MB/s",
        big.len() as f64 / 1e6 / t.elapsed().as_secs_f64()
    );
    let Lookup::Hit(m) = cache_b.lookup(&key) else {
        panic!("pulled")
    };
    assert!(cache_b.verify(&m).is_empty());
    assert_eq!(
        std::fs::read(cache_b.entry_dir(&key).join("out/model.bin")).unwrap(),
        big
    );

    // The commit point is a conditional create: a second create of the manifest is refused
    // by the server itself (412), which is what makes two pushers safe.
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(BUCKET)
        .with_allow_http(true)
        .build()
        .unwrap();
    let manifest_path =
        object_store::path::Path::from(format!("run-{}/entries/{key}.json", std::process::id()));
    let second = store.put_opts(
        &manifest_path,
        b"x".to_vec().into(),
        object_store::PutMode::Create.into(),
    );
    let refused = remote_runtime().block_on(second).unwrap_err();
    assert!(
        matches!(
            refused,
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }
        ),
        "{refused}"
    );

    // A flipped byte in the object is caught on pull, and nothing is committed.
    let object = object_store::path::Path::from(format!(
        "run-{}/objects/{}",
        std::process::id(),
        blake3::hash(&big).to_hex()
    ));
    let mut bad = big.clone();
    bad[7] ^= 1;
    remote_runtime()
        .block_on(store.put(&object, bad.into()))
        .unwrap();
    let c = tempfile::tempdir().unwrap();
    let cache_c = Cache::new(c.path());
    let failed = goemo_remote::pull(&remote, &cache_c, &want, &opts, &no_progress).unwrap();
    let Outcome::Failed(e) = &failed.entries[0].outcome else {
        panic!("{:?}", failed.entries[0].outcome)
    };
    assert!(
        e.to_string()
            .contains("(out/model.bin) is damaged: its content hashes to"),
        "{e}"
    );
    assert!(matches!(cache_c.lookup(&key), Lookup::Missing));

    // A wrong endpoint: a clear error naming the remote, within seconds.
    std::env::set_var(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", free_port()),
    );
    let t = std::time::Instant::now();
    let e = Remote::open(&url).unwrap().probe().unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "remote {}: reaching entries/goemo-probe.json: ",
            url.shown()
        )),
        "{e}"
    );
    assert!(!e.contains("testing-secret-value"), "{e}");
    assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
    std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
}

fn remote_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
