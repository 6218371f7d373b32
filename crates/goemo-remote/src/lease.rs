//! Leases: how workers that share only a remote agree that one of them builds a key.
//!
//! `leases/<key>.json` is created with a conditional put (`If-None-Match: *` on S3, a hard
//! link on a folder): the worker whose create succeeds builds the entry; the others see the
//! lease and wait for `entries/<key>.json` to appear, then pull it. The holder rewrites its
//! lease every quarter of its time-to-live (written in the lease); a lease whose version a
//! waiter has seen unchanged for a whole time-to-live (measured on the waiter's own clock, so
//! clocks need not agree) belongs to a worker that died, and the waiter removes it and claims
//! the key itself.
//!
//! A lease only saves work; it is not what keeps the remote correct. Two workers that both
//! end up building a key (a takeover race, a holder that was only slow) each push the entry,
//! and the manifest's conditional create keeps exactly one.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::RemoteError;
use crate::store::{Created, Remote};

/// How long a lease lives without renewal, and how often a waiter looks again.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    pub ttl: Duration,
    pub poll: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        LeaseTimes {
            ttl: Duration::from_secs(60),
            poll: Duration::from_secs(1),
        }
    }
}

impl LeaseTimes {
    /// The defaults, or `GOEMO_LEASE_TTL_SECS` (a cluster whose workers stall longer, or a
    /// test that kills a holder and wants the takeover soon).
    pub fn from_env() -> LeaseTimes {
        let mut t = LeaseTimes::default();
        if let Some(secs) = std::env::var("GOEMO_LEASE_TTL_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
        {
            t.ttl = Duration::from_secs_f64(secs);
            t.poll = t.poll.min(t.ttl / 4);
        }
        t
    }
}

/// What a lease object holds: who builds which key (for the waiters' messages).
#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseBody {
    pub key: String,
    pub stage: String,
    /// `host:pid` of the worker building it.
    pub holder: String,
    /// The holder's time-to-live: waiters judge its lease by it, not by their own.
    pub ttl_ms: u64,
    /// Renewals so far: every renewal writes a new version.
    pub renewals: u64,
}

pub(crate) fn rel(key: &str) -> String {
    format!("leases/{key}.json")
}

/// This worker's name in a lease: host and process id.
pub(crate) fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// A lease this worker holds: renewed by a thread until dropped, then removed from the remote.
pub struct Lease {
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
    remote: Arc<Remote>,
    key: String,
}

impl Lease {
    /// Try to claim `key`: `Ok(None)` when another worker holds it.
    pub(crate) fn claim(
        remote: &Arc<Remote>,
        stage: &str,
        key: &str,
        times: LeaseTimes,
    ) -> Result<Option<Lease>, RemoteError> {
        let mut body = LeaseBody {
            key: key.to_owned(),
            stage: stage.to_owned(),
            holder: holder(),
            ttl_ms: times.ttl.as_millis() as u64,
            renewals: 0,
        };
        let bytes = serde_json::to_vec(&body).expect("a lease serializes");
        let created = remote.runtime.block_on(remote.create(&rel(key), bytes))?;
        if let Created::AlreadyThere = created {
            return Ok(None);
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let (r, k) = (remote.clone(), key.to_owned());
        let renewer = std::thread::spawn(move || {
            // Until the sender is dropped (or sends): renew every quarter of the TTL. A failed
            // renewal is retried at the next tick; if they all fail, a waiter takes over and
            // at worst the key is built twice.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(times.ttl / 4) {
                body.renewals += 1;
                let bytes = serde_json::to_vec(&body).expect("a lease serializes");
                let _ = r.runtime.block_on(r.overwrite(&rel(&k), bytes));
            }
        });
        Ok(Some(Lease {
            stop: Some(stop),
            renewer: Some(renewer),
            remote: remote.clone(),
            key: key.to_owned(),
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        // Waiters then find the entry (pushed before this) or, if the build failed, no lease,
        // and claim the key themselves.
        let _ = self
            .remote
            .runtime
            .block_on(self.remote.delete(&rel(&self.key)));
    }
}

/// The holder named in `key`'s lease, if one is there and readable.
pub(crate) fn read(remote: &Remote, key: &str) -> Option<LeaseBody> {
    let bytes = remote
        .runtime
        .block_on(remote.get_small(&rel(key)))
        .ok()??;
    serde_json::from_slice(&bytes).ok()
}
