//! Getting GoEmotions: copy the official splits from a local mirror, or download them from the
//! official URLs (with `curl`), verifying each file's sha256 either way. Idempotent: files that
//! are already in place with the right checksum are left alone.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const BASE_URL: &str =
    "https://raw.githubusercontent.com/google-research/google-research/master/goemotions/data";

/// (file name here, file name upstream, sha256)
pub const FILES: &[(&str, &str, &str)] = &[
    (
        "train.tsv",
        "train.tsv",
        "1c254a142be5c00e80d819b9ae1bbd36d94b2eeb8f4b1271846508d57e57d9c5",
    ),
    (
        "dev.tsv",
        "dev.tsv",
        "575489c079c9de1097062a01738f998590d6b7ead66dd1c9fd1d2ba01fd8bc62",
    ),
    (
        "test.tsv",
        "test.tsv",
        "0587b2dd8b27b97352adbfc3fb083d46005c8946657fdc2b1ca8b1cc7f1f8be4",
    ),
    (
        "labels.txt",
        "emotions.txt",
        "45c3ef86782d2a4d7fedcd6d8c111aa0d0e94720689bd164fac94fefb4495a89",
    ),
];

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Put the four files into `dest`. `mirror`: a folder holding them (either name of the label
/// file); otherwise each is downloaded from [`BASE_URL`].
pub fn fetch(
    dest: &Path,
    mirror: Option<&Path>,
    log: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dest.display()))?;
    for (name, upstream, sha) in FILES {
        let target = dest.join(name);
        if target.exists() && sha256_file(&target)? == *sha {
            log(format!("{}: present, checksum ok", target.display()));
            continue;
        }
        let tmp = dest.join(format!(".{name}.part"));
        match mirror {
            Some(m) => {
                let src = [m.join(name), m.join(upstream)].into_iter().find(|p| p.exists()).ok_or_else(|| {
                    anyhow::anyhow!("{}: no {name} (or {upstream}) in the mirror\n  hint: GOEMO_DATA_MIRROR must name a folder holding train.tsv, dev.tsv, test.tsv and labels.txt", m.display())
                })?;
                std::fs::copy(&src, &tmp)
                    .map_err(|e| anyhow::anyhow!("copying {}: {e}", src.display()))?;
                log(format!(
                    "{}: copied from {}",
                    target.display(),
                    src.display()
                ));
            }
            None => {
                let url = format!("{BASE_URL}/{upstream}");
                let status = std::process::Command::new("curl")
                    .args(["-fsSL", "--retry", "3", "-o"])
                    .arg(&tmp)
                    .arg(&url)
                    .status()
                    .map_err(|e| anyhow::anyhow!("running curl to download {url}: {e}\n  hint: install curl, or set GOEMO_DATA_MIRROR to a local copy"))?;
                if !status.success() {
                    let _ = std::fs::remove_file(&tmp);
                    anyhow::bail!("downloading {url} failed ({status})\n  hint: without internet, set GOEMO_DATA_MIRROR to a folder holding the GoEmotions files");
                }
                log(format!("{}: downloaded from {url}", target.display()));
            }
        }
        let got = sha256_file(&tmp)?;
        if got != *sha {
            let _ = std::fs::remove_file(&tmp);
            anyhow::bail!(
                "{name}: sha256 is {got}, expected {sha}\n  hint: the source holds a different or damaged file; re-download it, or point GOEMO_DATA_MIRROR at an unmodified copy of the official release"
            );
        }
        std::fs::rename(&tmp, &target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_from_a_mirror_and_refuses_a_damaged_file() {
        let real = crate::test_support::goemotions_dir();
        let dest = tempfile::tempdir().unwrap();
        let mut log = Vec::new();
        fetch(dest.path(), Some(&real), &mut |l| log.push(l)).unwrap();
        assert_eq!(
            std::fs::read(dest.path().join("dev.tsv")).unwrap(),
            std::fs::read(real.join("dev.tsv")).unwrap()
        );
        fetch(dest.path(), Some(&real), &mut |l| log.push(l)).unwrap();
        assert!(
            log.iter()
                .filter(|l| l.contains("present, checksum ok"))
                .count()
                == 4,
            "second fetch copies nothing: {log:?}"
        );

        let bad = tempfile::tempdir().unwrap();
        for (name, _, _) in FILES {
            std::fs::copy(real.join(name), bad.path().join(name)).unwrap();
        }
        let mut text = std::fs::read(bad.path().join("test.tsv")).unwrap();
        text[10] ^= 1;
        std::fs::write(bad.path().join("test.tsv"), text).unwrap();
        let dest2 = tempfile::tempdir().unwrap();
        let err = fetch(dest2.path(), Some(bad.path()), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.tsv: sha256 is") && err.contains("expected 0587b2dd"),
            "{err}"
        );
        assert!(
            !dest2.path().join("test.tsv").exists(),
            "a file with the wrong checksum is not kept"
        );
        assert!(!dest2.path().join(".test.tsv.part").exists());
    }
}
