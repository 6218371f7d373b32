//! Remote URLs: `file:///abs/folder`, `s3://bucket/prefix`, `gs://bucket/prefix`,
//! `az://container/prefix` and `https://host/path` (read-only), parsed, checked and shown
//! without credentials.

use std::path::PathBuf;

use crate::error::RemoteError;

/// Where a remote is, as parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local or network folder (it must exist).
    Folder(PathBuf),
    /// An S3 bucket, or one on an S3-compatible server, and a prefix inside it (may be empty).
    S3 { bucket: String, prefix: String },
    /// A Google Cloud Storage bucket and a prefix inside it.
    Gcs { bucket: String, prefix: String },
    /// An Azure Blob Storage container (the account comes from AZURE_STORAGE_ACCOUNT_NAME) and
    /// a prefix inside it.
    Azure { container: String, prefix: String },
    /// An HTTP(S) server holding a copy of a remote (a static mirror, a CDN): read-only, since
    /// HTTP has no conditional create for the manifest's commit point.
    Http { base: String },
}

impl Location {
    /// Whether entries can be pushed here (and leases taken).
    pub fn writable(&self) -> bool {
        !matches!(self, Location::Http { .. })
    }
}

/// A parsed remote URL. It never holds credentials: URLs with user info or a query are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub location: Location,
    shown: String,
}

const SUPPORTED: &str =
    "use s3://BUCKET/PREFIX (S3, or an S3-compatible server with AWS_ENDPOINT_URL), gs://BUCKET/PREFIX (Google Cloud Storage), az://CONTAINER/PREFIX (Azure Blob Storage), file:///ABSOLUTE/FOLDER, or https://HOST/PATH (a read-only mirror)";

impl RemoteUrl {
    /// Parse `text`; `origin` names where it came from (`GOEMO_REMOTE`, `--remote`, a file) for
    /// the error.
    pub fn parse(text: &str, origin: &str) -> Result<RemoteUrl, RemoteError> {
        let bad = |why: String, hint: &str| RemoteError::BadUrl {
            origin: origin.to_owned(),
            shown: shown_without_credentials(text),
            why,
            hint: hint.to_owned(),
        };
        let url = url::Url::parse(text.trim())
            .map_err(|e| bad(format!("is not a URL ({e})"), SUPPORTED))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "holds credentials, which goemo never reads from a URL".into(),
                "remove them from the URL; goemo reads credentials only from the store's standard environment (AWS_* for S3, GOOGLE_* for GCS, AZURE_* for Azure; web identity, instance metadata)",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "has a query or fragment, which goemo does not read".into(),
                "configure the store through its environment variables (AWS_REGION, AWS_ENDPOINT_URL, AZURE_STORAGE_ACCOUNT_NAME, …)",
            ));
        }
        let location = match url.scheme() {
            "file" => Location::Folder(folder_of(&url).map_err(|why| bad(why, SUPPORTED))?),
            "s3" => {
                let (bucket, prefix) = bucket_of(&url, "S3").map_err(|why| bad(why, SUPPORTED))?;
                Location::S3 { bucket, prefix }
            }
            "gs" => {
                let (bucket, prefix) = bucket_of(&url, "GCS").map_err(|why| bad(why, SUPPORTED))?;
                Location::Gcs { bucket, prefix }
            }
            "az" | "azure" => {
                let (container, prefix) =
                    bucket_of(&url, "Azure").map_err(|why| bad(why, SUPPORTED))?;
                Location::Azure { container, prefix }
            }
            "http" | "https" => Location::Http {
                base: url.as_str().trim_end_matches('/').to_owned(),
            },
            other => {
                return Err(bad(
                    format!("has the scheme `{other}`, which goemo does not support yet"),
                    SUPPORTED,
                ))
            }
        };
        let shown = match &location {
            Location::Folder(p) => format!("file://{}", p.display()),
            Location::S3 { bucket, prefix } => join("s3", bucket, prefix),
            Location::Gcs { bucket, prefix } => join("gs", bucket, prefix),
            Location::Azure { container, prefix } => join("az", container, prefix),
            Location::Http { base } => base.clone(),
        };
        Ok(RemoteUrl { location, shown })
    }

    /// The URL as messages show it: no credentials, no query.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

fn folder_of(url: &url::Url) -> Result<PathBuf, String> {
    if url
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(format!(
            "names the host `{}`; a folder URL is file:///ABSOLUTE/PATH (three slashes)",
            url.host_str().unwrap_or_default()
        ));
    }
    url.to_file_path()
        .map_err(|()| "is not an absolute folder path".to_owned())
}

fn join(scheme: &str, bucket: &str, prefix: &str) -> String {
    match prefix.is_empty() {
        true => format!("{scheme}://{bucket}"),
        false => format!("{scheme}://{bucket}/{prefix}"),
    }
}

/// The bucket (or container) and prefix of `s3://`, `gs://` and `az://` URLs. The three stores
/// share the naming rule checked here (3-63 lowercase letters, digits, `-`, `.`; Azure allows
/// no `.`, which its server reports).
fn bucket_of(url: &url::Url, store: &str) -> Result<(String, String), String> {
    let bucket = url.host_str().unwrap_or_default().to_owned();
    if bucket.is_empty() {
        return Err("names no bucket".into());
    }
    let valid = bucket.len() >= 3
        && bucket.len() <= 63
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !valid {
        return Err(format!(
            "names the bucket `{bucket}`, which is not a valid {store} bucket name (3-63 characters: lowercase letters, digits, `-`, `.`)"
        ));
    }
    if url.port().is_some() {
        let where_ = match store {
            "S3" => "AWS_ENDPOINT_URL",
            "GCS" => "the service account file's gcs_base_url (GOOGLE_SERVICE_ACCOUNT)",
            _ => "AZURE_STORAGE_ENDPOINT (or AZURE_STORAGE_USE_EMULATOR=true for Azurite)",
        };
        return Err(format!(
            "has a port; a {store} server's address goes into {where_}, not the URL"
        ));
    }
    let prefix = url.path().trim_matches('/').to_owned();
    if prefix.split('/').any(|p| p == "." || p == "..") {
        return Err("has `.` or `..` in its prefix".into());
    }
    Ok((bucket, prefix))
}

/// What a message may show of a URL goemo could not parse: no user info, no query.
fn shown_without_credentials(text: &str) -> String {
    let text = text.trim();
    let (scheme, rest) = match text.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, text),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or_default();
    let hidden = if authority.contains('@') { "***@" } else { "" };
    match scheme {
        Some(s) => format!("{s}://{hidden}{host}{path}"),
        None => format!("{hidden}{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        RemoteUrl::parse(text, "GOEMO_REMOTE")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn s3_and_folder_urls_parse() {
        let u = RemoteUrl::parse("s3://goemo-cache/team/a/", "x").unwrap();
        assert_eq!(
            u.location,
            Location::S3 {
                bucket: "goemo-cache".into(),
                prefix: "team/a".into()
            }
        );
        assert_eq!(u.shown(), "s3://goemo-cache/team/a");
        let u = RemoteUrl::parse("s3://goemo-cache", "x").unwrap();
        assert_eq!(u.shown(), "s3://goemo-cache");
        let u = RemoteUrl::parse("file:///mnt/cache", "x").unwrap();
        assert_eq!(u.location, Location::Folder("/mnt/cache".into()));
        assert_eq!(u.shown(), "file:///mnt/cache");
    }

    #[test]
    fn bad_urls_say_why_and_never_echo_credentials() {
        let e = err("s3://AKIDEXAMPLE:s3cr3t-SENTINEL@goemo-cache/p");
        assert!(
            e.starts_with("GOEMO_REMOTE: the remote `s3://***@goemo-cache/p` holds credentials"),
            "{e}"
        );
        assert!(
            !e.contains("s3cr3t-SENTINEL") && !e.contains("AKIDEXAMPLE"),
            "{e}"
        );
        let e = err("s3://goemo-cache/p?secret_access_key=s3cr3t-SENTINEL");
        assert!(!e.contains("s3cr3t-SENTINEL"), "{e}");
        assert!(e.contains("has a query"), "{e}");
        let u = RemoteUrl::parse("gs://goemo-cache/team", "x").unwrap();
        assert_eq!(
            u.location,
            Location::Gcs {
                bucket: "goemo-cache".into(),
                prefix: "team".into()
            }
        );
        assert_eq!(u.shown(), "gs://goemo-cache/team");
        let u = RemoteUrl::parse("azure://cache/", "x").unwrap();
        assert_eq!(u.shown(), "az://cache");
        let u = RemoteUrl::parse("https://mirror.example.com/goemo/", "x").unwrap();
        assert_eq!(u.shown(), "https://mirror.example.com/goemo");
        assert!(!u.location.writable());
        assert!(err("https://user:s3cr3t-SENTINEL@mirror.example.com/x").contains("***@"));
        assert!(err("az://cache:10000/x").contains("AZURE_STORAGE_USE_EMULATOR"));
        let e = err("ftp://host/x");
        assert!(e.contains("`ftp://host/x` has the scheme `ftp`"), "{e}");
        assert!(e.contains("hint: use s3://BUCKET/PREFIX"), "{e}");
        assert!(err("file://cache/x").contains("names the host `cache`"));
        assert!(err("s3://B/x").contains("not a valid S3 bucket name"));
        assert!(err("s3://goemo-cache:9000/x").contains("AWS_ENDPOINT_URL"));
        assert!(err("cache").contains("is not a URL"));
    }
}
