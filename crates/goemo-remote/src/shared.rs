//! [`RemoteCache`]: a remote as the engine's shared cache ([`goemo_engine::shared`]). Before a
//! stage is built, its entry is pulled if the remote has it; with write access, the worker
//! claims the key with a lease ([`crate::lease`]) or waits for the worker that holds it, and
//! every entry built here is pushed before its lease is let go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use goemo_engine::cache::Cache;
use goemo_engine::shared::{Fetched, SharedCache};

use crate::lease::{self, Lease, LeaseTimes};
use crate::store::Remote;
use crate::transfer::{Options, Outcome, Wanted};

/// What the shared cache tells the person running goemo (the CLI logs it).
pub enum Notice<'a> {
    /// Another worker holds the key's lease; this one waits for its entry.
    Waiting { stage: &'a str, holder: &'a str },
    /// A lease not renewed for its whole time-to-live was removed; this worker builds the key.
    TakenOver { stage: &'a str, holder: &'a str },
    /// The remote could not give or take an entry; the run goes on locally.
    Trouble { stage: &'a str, detail: &'a str },
    /// An entry built here was pushed.
    Pushed { stage: &'a str, files: usize },
}

pub struct RemoteCache {
    remote: Arc<Remote>,
    writable: bool,
    times: LeaseTimes,
    notice: Box<dyn Fn(Notice<'_>) + Send + Sync>,
    /// Entries built here that could not be shared: `stage: why`.
    unshared: Mutex<Vec<String>>,
}

impl RemoteCache {
    /// `writable`: claim keys with leases and push what is built (`--remote read-write`).
    pub fn new(
        remote: Remote,
        writable: bool,
        notice: Box<dyn Fn(Notice<'_>) + Send + Sync>,
    ) -> RemoteCache {
        RemoteCache {
            remote: Arc::new(remote),
            writable,
            times: LeaseTimes::from_env(),
            notice,
            unshared: Mutex::default(),
        }
    }

    pub fn with_times(mut self, times: LeaseTimes) -> RemoteCache {
        self.times = times;
        self
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// Entries built here that a writable remote did not get (`stage: why`).
    pub fn unshared(&self) -> Vec<String> {
        self.unshared.lock().expect("poisoned").clone()
    }

    fn trouble(&self, stage: &str, detail: &str) {
        (self.notice)(Notice::Trouble { stage, detail });
    }

    /// Pull `key` if the remote has it: `Some(true)` pulled, `Some(false)` not there, `None`
    /// the remote failed (reported).
    fn try_pull(&self, stage: &str, key: &str, cache: &Cache) -> Option<bool> {
        let wanted = Wanted {
            stage: stage.to_owned(),
            key: key.to_owned(),
        };
        match crate::pull::pull_held(&self.remote, cache, &wanted, &Options::default()) {
            Ok(r) => match r.outcome {
                Outcome::Pulled | Outcome::AlreadyThere => Some(true),
                Outcome::Missing(_) => Some(false),
                Outcome::Failed(e) => {
                    self.trouble(stage, &format!("{e}; building it here"));
                    None
                }
                other => {
                    self.trouble(stage, &format!("{other:?}; building it here"));
                    None
                }
            },
            Err(e) => {
                self.trouble(stage, &format!("{e}; building it here"));
                None
            }
        }
    }
}

impl SharedCache for RemoteCache {
    fn fetch(&self, stage: &str, key: &str, cache: &Cache, cancel: &AtomicBool) -> Fetched {
        let started = Instant::now();
        let build = |claim: Option<Lease>| Fetched::Build {
            claim: claim.map(|l| Box::new(l) as Box<dyn Send>),
        };
        // The lease version last seen, and since when (this machine's clock).
        let mut seen: Option<(String, Instant)> = None;
        let mut told_waiting = false;
        // Time spent waiting for another worker's build (none when the entry was there).
        let waited = |told_waiting: bool| match told_waiting {
            true => started.elapsed().as_secs_f64(),
            false => 0.0,
        };
        let mut poll = self.times.poll.min(Duration::from_millis(250));
        loop {
            match self.try_pull(stage, key, cache) {
                Some(true) => {
                    return Fetched::Pulled {
                        waited_s: waited(told_waiting),
                    }
                }
                Some(false) => {}
                None => return build(None),
            }
            if !self.writable || cancel.load(Ordering::Relaxed) {
                return build(None);
            }
            match Lease::claim(&self.remote, stage, key, self.times) {
                Ok(Some(lease)) => {
                    // The holder before may have pushed and let go between the pull and the
                    // claim: look once more before building.
                    return match self.try_pull(stage, key, cache) {
                        Some(true) => Fetched::Pulled {
                            waited_s: waited(told_waiting),
                        },
                        _ => build(Some(lease)),
                    };
                }
                Ok(None) => {}
                Err(e) => {
                    self.trouble(stage, &format!("{e}; building it here"));
                    return build(None);
                }
            }
            let version = match self
                .remote
                .runtime
                .block_on(self.remote.version_of(&lease::rel(key)))
            {
                Ok(v) => v,
                Err(e) => {
                    self.trouble(stage, &format!("{e}; building it here"));
                    return build(None);
                }
            };
            let Some(version) = version else {
                continue; // let go meanwhile: the entry is there, or the key is free
            };
            let body = lease::read(&self.remote, key);
            let ttl = body
                .as_ref()
                .map_or(self.times.ttl, |b| Duration::from_millis(b.ttl_ms));
            let holder = body.map_or_else(|| "another worker".into(), |b| b.holder);
            match &seen {
                Some((v, since)) if *v == version => {
                    if since.elapsed() >= ttl {
                        (self.notice)(Notice::TakenOver {
                            stage,
                            holder: &holder,
                        });
                        if let Err(e) = self
                            .remote
                            .runtime
                            .block_on(self.remote.delete(&lease::rel(key)))
                        {
                            self.trouble(stage, &format!("{e}; building it here"));
                            return build(None);
                        }
                        seen = None;
                        continue;
                    }
                }
                _ => seen = Some((version, Instant::now())),
            }
            if !told_waiting {
                (self.notice)(Notice::Waiting {
                    stage,
                    holder: &holder,
                });
                told_waiting = true;
            }
            std::thread::sleep(poll);
            poll = (poll * 2).min(self.times.poll);
        }
    }

    fn built(&self, stage: &str, key: &str, cache: &Cache) {
        if !self.writable {
            return;
        }
        let wanted = [Wanted {
            stage: stage.to_owned(),
            key: key.to_owned(),
        }];
        let why = match crate::push(&self.remote, cache, &wanted, &Options::default(), &|_| {}) {
            Ok(r) => match &r.entries[0].outcome {
                Outcome::Pushed | Outcome::AlreadyThere => {
                    (self.notice)(Notice::Pushed {
                        stage,
                        files: r.entries[0].files,
                    });
                    return;
                }
                Outcome::Diverged { remote, local } => format!(
                    "the remote holds other outputs for this key ({remote}; here: {local}); the remote's are kept"
                ),
                Outcome::Failed(e) => e.to_string(),
                other => format!("{other:?}"),
            },
            Err(e) => e.to_string(),
        };
        self.trouble(stage, &format!("not shared: {why}"));
        self.unshared
            .lock()
            .expect("poisoned")
            .push(format!("{stage}: {why}"));
    }
}
