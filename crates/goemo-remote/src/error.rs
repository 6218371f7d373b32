//! What can go wrong talking to a remote, each with its context (the remote's URL without
//! credentials, the stage, the key, the object or path) and what to do about it.
//!
//! Messages never hold a credential: the URL is shown as [`crate::RemoteUrl::shown`] (no user
//! info, no query), and every message that comes from the object store passes through
//! [`scrub`] first, which blanks the values of the credential variables of the environment.

use std::path::PathBuf;

/// The environment variables whose values never appear in a message goemo prints.
pub const SECRET_VARS: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_CLIENT_SECRET",
];

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No remote configured anywhere.
    #[error(
        "no remote is configured\n  hint: set GOEMO_REMOTE (s3://bucket/prefix or file:///abs/folder), pass --remote, or write `remote: URL` into {}",
        config_file.display()
    )]
    NotConfigured { config_file: PathBuf },

    /// A remote URL goemo cannot use; `origin` says where it came from.
    #[error("{origin}: the remote `{shown}` {why}\n  hint: {hint}")]
    BadUrl {
        origin: String,
        shown: String,
        why: String,
        hint: String,
    },

    /// goemo.yaml is unreadable or holds something goemo does not know.
    #[error("{}: {message}\n  hint: {hint}", file.display())]
    Config {
        file: PathBuf,
        message: String,
        hint: String,
    },

    /// The store refused or failed an operation.
    #[error("remote {url}: {op} {object}: {detail}\n  hint: {hint}")]
    Store {
        url: String,
        op: &'static str,
        object: String,
        detail: String,
        hint: String,
    },

    /// A downloaded file is not what the entry's manifest says: nothing of the entry was
    /// committed.
    #[error(
        "remote {url}: stage {stage}, entry {key}: object {object} ({file}) is damaged: {what}; nothing of this entry was committed locally\n  hint: the remote copy is bad: push the entry again from a machine that has it (`goemo push {stage}`), or delete entries/{key}.json on the remote and rebuild it with `goemo run`"
    )]
    Corrupt {
        url: String,
        stage: String,
        key: String,
        object: String,
        file: String,
        what: String,
    },

    /// A remote manifest that does not describe the entry it is stored under.
    #[error(
        "remote {url}: stage {stage}, entry {key}: entries/{key}.json is not a valid manifest for this key: {why}\n  hint: delete entries/{key}.json on the remote and push the entry again"
    )]
    BadManifest {
        url: String,
        stage: String,
        key: String,
        why: String,
    },

    /// A push, or `--remote read-write`, to a remote that cannot take one.
    #[error(
        "remote {url} is read-only: HTTP has no conditional create for an entry's commit point\n  hint: pull from it (`goemo pull`, `goemo run --remote read`), and push to the store it mirrors (s3://, gs://, az:// or file://)"
    )]
    ReadOnly { url: String },

    /// A local file goemo could not read or write.
    #[error("stage {stage}, entry {key}: {}: {detail}\n  hint: {hint}", path.display())]
    Local {
        stage: String,
        key: String,
        path: PathBuf,
        detail: String,
        hint: String,
    },
}

/// `text` with the value of every credential variable in the environment replaced by `***`.
pub fn scrub(text: &str) -> String {
    let mut out = text.to_owned();
    for var in SECRET_VARS {
        if let Ok(value) = std::env::var(var) {
            // Very short values would blank ordinary words; no real credential is that short.
            if value.len() >= 4 {
                out = out.replace(&value, "***");
            }
        }
    }
    out
}

/// An object store error as text, credentials scrubbed, and the fix that usually applies.
pub(crate) fn store_error(
    url: &str,
    op: &'static str,
    object: &str,
    e: &object_store::Error,
) -> RemoteError {
    let hint = match e {
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            match url.split("://").next() {
                Some("gs") => "check the credentials in the environment (GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT) and that they may read and write the bucket",
                Some("az") => "check the credentials in the environment (AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, a SAS token, or a service principal) and that they may read and write the container",
                _ => "check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and that they may read and write the bucket",
            }
        }
        object_store::Error::NotFound { .. } => {
            "the object is missing on the remote: push the entry again from a machine that has it"
        }
        _ => match url.split("://").next() {
            Some("gs") => "check the bucket name, that storage.googleapis.com (or GOOGLE_BASE_URL) is reachable, and the credentials",
            Some("az") => "check AZURE_STORAGE_ACCOUNT_NAME and the container name, that the account's endpoint (or AZURE_STORAGE_ENDPOINT) is reachable, and the credentials",
            Some("http" | "https") => "check the URL and that the server is reachable",
            _ => "check the remote URL and endpoint (AWS_ENDPOINT_URL for an S3-compatible server), that the server is reachable, and the credentials",
        },
    };
    RemoteError::Store {
        url: url.to_owned(),
        op,
        object: object.to_owned(),
        detail: scrub(&error_chain(e)),
        hint: hint.to_owned(),
    }
}

/// An error and its sources, `: `-joined (object_store puts the useful part in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_blanks_credentials_of_the_environment() {
        // Only this test sets this variable's value in this process.
        std::env::set_var("AWS_SESSION_TOKEN", "tok-SENTINEL-123");
        assert_eq!(
            scrub("denied for tok-SENTINEL-123 at x"),
            "denied for *** at x"
        );
        std::env::remove_var("AWS_SESSION_TOKEN");
        assert_eq!(scrub("tok-SENTINEL-123"), "tok-SENTINEL-123");
    }
}
