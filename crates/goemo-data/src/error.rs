//! The one error type of this crate.

use std::path::PathBuf;

/// What can go wrong reading, parsing or writing GoEmotions and its derived files. Messages
/// name the file (and line, field or row where there is one) and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A JSON file that could not be written, read or parsed.
    #[error(transparent)]
    File(#[from] goemo_fsio::FsError),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Input that is not what it should be; the message names where and why.
    #[error("{0}")]
    Invalid(String),
}
