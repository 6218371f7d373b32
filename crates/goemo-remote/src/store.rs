//! A [`Remote`]: an object store opened from a [`RemoteUrl`], the layout goemo keeps in it, and
//! the few operations push and pull need, each turning a store error into a [`RemoteError`]
//! that names the remote (without credentials) and the object.
//!
//! ```text
//! <prefix>/objects/<blake3 hex>    a file's bytes, stored once whatever entries hold it
//! <prefix>/volatile/<key>.json     an entry's volatile/ files (rel → blake3, size), optional
//! <prefix>/entries/<key>.json      the entry's manifest.json: written last, its commit point
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use crate::error::{store_error, RemoteError};
use crate::location::{Location, RemoteUrl};

/// An opened remote: a store, the prefix goemo writes under, and the runtime that drives the
/// store's futures.
pub struct Remote {
    pub(crate) store: Arc<dyn ObjectStore>,
    prefix: String,
    url: RemoteUrl,
    pub(crate) runtime: tokio::runtime::Runtime,
}

/// How a conditional create ended.
pub(crate) enum Created {
    Yes,
    AlreadyThere,
}

impl Remote {
    /// Open the remote `url` names. A folder must exist (a typo, or a network mount that is not
    /// mounted, must not quietly fill the local disk); an S3 store reads its credentials, region
    /// and endpoint from the standard AWS environment only.
    pub fn open(url: &RemoteUrl) -> Result<Remote, RemoteError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Store {
                url: url.shown().to_owned(),
                op: "starting the I/O runtime for",
                object: "the remote".into(),
                detail: e.to_string(),
                hint: "the system is out of threads or memory".into(),
            })?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match &url.location {
            Location::Folder(dir) => (Arc::new(open_folder(url, dir)?), String::new()),
            Location::S3 { bucket, prefix } => (Arc::new(open_s3(url, bucket)?), prefix.clone()),
            Location::Gcs { bucket, prefix } => (Arc::new(open_gcs(url, bucket)?), prefix.clone()),
            Location::Azure { container, prefix } => {
                (Arc::new(open_azure(url, container)?), prefix.clone())
            }
            Location::Http { base } => (Arc::new(open_http(url, base)?), String::new()),
        };
        Ok(Remote {
            store,
            prefix,
            url: url.clone(),
            runtime,
        })
    }

    /// The remote's URL as messages show it (no credentials).
    pub fn url(&self) -> &str {
        self.url.shown()
    }

    /// Whether entries can be pushed here (an HTTP mirror is read-only).
    pub fn writable(&self) -> bool {
        self.url.location.writable()
    }

    /// The error for a push (or `--remote read-write`) to a read-only remote.
    pub fn read_only_error(&self) -> RemoteError {
        RemoteError::ReadOnly {
            url: self.url().to_owned(),
        }
    }

    /// Where `rel` (`entries/<key>.json`, `objects/<hash>`) lives in the store.
    pub(crate) fn path(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Fail early, with one clear message, when the remote cannot be reached or refuses the
    /// credentials: a missing object is fine, anything else is an error.
    pub fn probe(&self) -> Result<(), RemoteError> {
        let rel = "entries/goemo-probe.json";
        self.runtime.block_on(async {
            match self.store.head(&self.path(rel)).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.unreachable(rel, &e)),
            }
        })
    }

    /// The probe's error, with the likely fix when S3 had no credentials to use.
    fn unreachable(&self, rel: &str, e: &object_store::Error) -> RemoteError {
        let mut err = self.error("reaching", rel, e);
        let missing = match self.url.location {
            Location::S3 { .. } if !aws_credentials_set() => Some("no AWS credentials are set in the environment, so the EC2/ECS instance metadata service was asked: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)"),
            Location::Gcs { .. } if !any_set(GCS_CREDENTIAL_VARS) => Some("no Google credentials are set in the environment, so the GCE metadata service was asked: set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT) to a service account file"),
            _ => None,
        };
        if let (Some(why), RemoteError::Store { hint, .. }) = (missing, &mut err) {
            *hint = why.into();
        }
        err
    }

    pub(crate) fn error(
        &self,
        op: &'static str,
        rel: &str,
        e: &object_store::Error,
    ) -> RemoteError {
        store_error(self.url(), op, rel, e)
    }

    /// The bytes of a small object (a manifest, a record); `None` when it does not exist.
    pub(crate) async fn get_small(&self, rel: &str) -> Result<Option<Bytes>, RemoteError> {
        let got = match self.store.get(&self.path(rel)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error("reading", rel, &e)),
        };
        got.bytes()
            .await
            .map(Some)
            .map_err(|e| self.error("reading", rel, &e))
    }

    /// The object's size, or `None` when it does not exist.
    pub(crate) async fn size_of(&self, rel: &str) -> Result<Option<u64>, RemoteError> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("checking", rel, &e)),
        }
    }

    /// Create `rel` only if nobody has (`If-None-Match: *` on S3, a hard link on a folder).
    pub(crate) async fn create(&self, rel: &str, bytes: Vec<u8>) -> Result<Created, RemoteError> {
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&self.path(rel), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(Created::Yes),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(Created::AlreadyThere),
            Err(e) => Err(self.error("creating", rel, &e)),
        }
    }
}

impl Remote {
    /// Write `rel` whatever is there (a lease's renewal).
    pub(crate) async fn overwrite(&self, rel: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        self.store
            .put(&self.path(rel), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error("writing", rel, &e))
    }

    /// Remove `rel`; one already gone is fine.
    pub(crate) async fn delete(&self, rel: &str) -> Result<(), RemoteError> {
        match self.store.delete(&self.path(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("deleting", rel, &e)),
        }
    }

    /// What identifies this version of `rel` (its e-tag, else its modification time and
    /// size), or `None` when it does not exist: a lease that keeps one version is not renewed.
    pub(crate) async fn version_of(&self, rel: &str) -> Result<Option<String>, RemoteError> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.e_tag.unwrap_or_else(|| {
                format!("{}/{}", meta.last_modified.timestamp_micros(), meta.size)
            }))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("checking", rel, &e)),
        }
    }
}

fn open_folder(url: &RemoteUrl, dir: &std::path::Path) -> Result<LocalFileSystem, RemoteError> {
    if !dir.is_dir() {
        return Err(RemoteError::BadUrl {
            origin: "remote".into(),
            shown: url.shown().to_owned(),
            why: "is not an existing folder".into(),
            hint: format!(
                "create it (mkdir -p {}) or, for a network folder, mount it first",
                dir.display()
            ),
        });
    }
    LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| store_error(url.shown(), "opening", "the folder", &e))
}

fn open_s3(url: &RemoteUrl, bucket: &str) -> Result<object_store::aws::AmazonS3, RemoteError> {
    // Credentials, region and endpoint from AWS_* variables (AWS_ENDPOINT_URL or AWS_ENDPOINT
    // for an S3-compatible server); web identity and instance metadata when those are unset.
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
    if endpoint.as_deref().is_some_and(is_loopback_http) {
        b = b.with_allow_http(true);
    }
    let connect_timeout = AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout);
    if b.get_config_value(&connect_timeout).is_none() {
        b = b.with_config(connect_timeout, "5s");
    }
    b.with_retry(retry())
        .build()
        .map_err(|e| store_error(url.shown(), "opening", "the bucket", &e))
}

/// Whether the environment names credentials (static keys, web identity or a container's).
fn aws_credentials_set() -> bool {
    any_set(&[
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ])
}

const GCS_CREDENTIAL_VARS: &[&str] = &[
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "SERVICE_ACCOUNT",
];

fn any_set(vars: &[&str]) -> bool {
    vars.iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// Retries that give up within seconds on a wrong endpoint, not after three minutes.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// A five-second connect timeout; plain HTTP only when `http_ok` (a loopback endpoint).
fn client(http_ok: bool) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_allow_http(http_ok)
}

fn open_gcs(
    url: &RemoteUrl,
    bucket: &str,
) -> Result<object_store::gcp::GoogleCloudStorage, RemoteError> {
    // Credentials from GOOGLE_APPLICATION_CREDENTIALS / GOOGLE_SERVICE_ACCOUNT(_KEY), else the
    // metadata service; GOOGLE_BASE_URL for an emulator.
    let b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
    let http_ok = b
        .get_config_value(&GoogleConfigKey::BaseUrl)
        .as_deref()
        .is_some_and(is_loopback_http);
    b.with_retry(retry())
        .with_client_options(client(http_ok))
        .build()
        .map_err(|e| store_error(url.shown(), "opening", "the bucket", &e))
}

fn open_azure(
    url: &RemoteUrl,
    container: &str,
) -> Result<object_store::azure::MicrosoftAzure, RemoteError> {
    // Account, key, SAS or service principal from AZURE_STORAGE_* / AZURE_* (workload identity
    // and managed identity too); AZURE_STORAGE_USE_EMULATOR=true for Azurite.
    let b = MicrosoftAzureBuilder::from_env().with_container_name(container);
    let http_ok = b
        .get_config_value(&AzureConfigKey::Endpoint)
        .as_deref()
        .is_some_and(is_loopback_http);
    b.with_retry(retry())
        .with_client_options(client(http_ok))
        .build()
        .map_err(|e| store_error(url.shown(), "opening", "the container", &e))
}

fn open_http(url: &RemoteUrl, base: &str) -> Result<object_store::http::HttpStore, RemoteError> {
    HttpBuilder::new()
        .with_url(base)
        .with_retry(retry())
        .with_client_options(client(is_loopback_http(base)))
        .build()
        .map_err(|e| store_error(url.shown(), "opening", "the server", &e))
}

/// `http://127.0.0.1:9000`, `http://localhost:…`, `http://[::1]:…`: plain HTTP is allowed
/// only to this machine (AWS_ALLOW_HTTP=true allows it elsewhere).
fn is_loopback_http(endpoint: &str) -> bool {
    let Ok(u) = url::Url::parse(endpoint) else {
        return false;
    };
    u.scheme() == "http"
        && match u.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_this_machine() {
        assert!(is_loopback_http("http://127.0.0.1:9000"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(is_loopback_http("http://[::1]:9000"));
        assert!(!is_loopback_http("http://minio.internal:9000"));
        assert!(!is_loopback_http("https://127.0.0.1:9000"));
    }

    #[test]
    fn a_missing_folder_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let gone = d.path().join("nope");
        let url = RemoteUrl::parse(&format!("file://{}", gone.display()), "x").unwrap();
        let e = Remote::open(&url).err().unwrap().to_string();
        assert!(e.contains("is not an existing folder"), "{e}");
        assert!(e.contains(&format!("mkdir -p {}", gone.display())), "{e}");
        assert!(!gone.exists());
    }
}
