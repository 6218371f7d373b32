//! Experiment records on the remote, so `goemo exp show` on any machine lists every member of a
//! sweep run elsewhere: `experiments/<name>/experiment.json` and `experiments/<name>/pipeline.lock`,
//! small objects overwritten by a rerun of the same experiment. Records name cache keys; the
//! entries themselves travel as usual (`goemo push`, `goemo run --remote`).

use futures::TryStreamExt;
use object_store::{PutOptions, PutPayload};

use crate::error::RemoteError;
use crate::store::Remote;

/// The files of one experiment's record, relative to its folder.
pub const FILES: [&str; 2] = ["experiment.json", "pipeline.lock"];

impl Remote {
    /// Upload experiment `name`'s record files (`(file name, bytes)`), the lock first and the
    /// record last, so a listed record always has its lock.
    pub fn put_record(&self, name: &str, files: &[(&str, Vec<u8>)]) -> Result<(), RemoteError> {
        if !self.writable() {
            return Err(self.read_only_error());
        }
        self.runtime.block_on(async {
            for (file, bytes) in files {
                let rel = format!("experiments/{name}/{file}");
                self.store
                    .put_opts(
                        &self.path(&rel),
                        PutPayload::from(bytes.clone()),
                        PutOptions::default(),
                    )
                    .await
                    .map_err(|e| self.error("writing", &rel, &e))?;
            }
            Ok(())
        })
    }

    /// The names of the experiments recorded on the remote.
    pub fn record_names(&self) -> Result<Vec<String>, RemoteError> {
        let prefix = self.path("experiments");
        self.runtime.block_on(async {
            let listed: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| self.error("listing", "experiments/", &e))?;
            let mut names: Vec<String> = listed
                .iter()
                .filter_map(|m| {
                    let parts: Vec<&str> = m.location.as_ref().rsplitn(3, '/').collect();
                    (parts.len() == 3 && parts[0] == FILES[0]).then(|| parts[1].to_owned())
                })
                .collect();
            names.sort();
            Ok(names)
        })
    }

    /// Experiment `name`'s record files, as `(file name, bytes)`; a missing one is an error.
    pub fn get_record(&self, name: &str) -> Result<Vec<(&'static str, Vec<u8>)>, RemoteError> {
        self.runtime.block_on(async {
            let mut out = Vec::new();
            for file in FILES {
                let rel = format!("experiments/{name}/{file}");
                let bytes = self.get_small(&rel).await?.ok_or_else(|| RemoteError::Store {
                    url: self.url().to_owned(),
                    op: "reading",
                    object: rel.clone(),
                    detail: "not found".into(),
                    hint: format!("push the experiment again from the machine that ran it (goemo exp push {name})"),
                })?;
                out.push((file, bytes.to_vec()));
            }
            Ok(out)
        })
    }
}
