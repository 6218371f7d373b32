//! One slot per stage of a run: what state it is in, the note the closing table shows, its wall
//! time, and whether the run needs it. The scheduler knows the graph, so it can say which stages
//! are ready (every upstream settled) without scanning the rest; the engine decides what a
//! ready stage does.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;

use crate::cache::EntryManifest;
use crate::dag::Graph;
use crate::events::{Outcome, StageResult};

pub(crate) enum State {
    Waiting,
    Running,
    Done(Arc<EntryManifest>, Outcome),
    Failed(String),
    Skipped(String),
    /// Dry run: it would run, so its outputs are unknown.
    Unknown,
}

impl State {
    fn settled(&self) -> bool {
        !matches!(self, State::Waiting | State::Running)
    }
}

pub(crate) struct Slot {
    pub state: State,
    pub note: String,
    pub wall_s: f64,
    /// Selected by --from/--until/--only (or by default, all).
    pub selected: bool,
    /// Selected, or an ancestor of a selected stage (needed, but only from the cache).
    pub needed: bool,
    /// Why it must run even when cached (`--force`, `--from`).
    pub forced: Option<&'static str>,
    /// Upstreams not settled yet.
    unsettled: usize,
}

/// Which stages a run selects, and which of them it forces.
pub(crate) struct Selection {
    pub selected: Vec<bool>,
    pub forced: Vec<Option<&'static str>>,
}

pub(crate) struct Scheduler<'g> {
    graph: &'g Graph,
    pub slots: Vec<Slot>,
    /// Needed, waiting stages whose upstreams are all settled.
    ready: BTreeSet<usize>,
    pub running: usize,
}

impl<'g> Scheduler<'g> {
    pub fn new(graph: &'g Graph, selection: Selection) -> Self {
        let roots = (0..graph.len()).filter(|&i| selection.selected[i]);
        let needed = graph.ancestors(roots);
        let slots: Vec<Slot> = (0..graph.len())
            .map(|i| Slot {
                state: State::Waiting,
                note: String::new(),
                wall_s: 0.0,
                selected: selection.selected[i],
                needed: needed[i],
                forced: selection.forced[i],
                unsettled: graph.upstream(i).len(),
            })
            .collect();
        let ready = (0..graph.len())
            .filter(|&i| needed[i] && slots[i].unsettled == 0)
            .collect();
        Scheduler {
            graph,
            slots,
            ready,
            running: 0,
        }
    }

    /// The first ready stage after `after` (in pipeline order).
    pub fn next_ready(&self, after: Option<usize>) -> Option<usize> {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.ready.range((from, Bound::Unbounded)).next().copied()
    }

    pub fn start(&mut self, i: usize, why: String) {
        self.ready.remove(&i);
        self.slots[i].state = State::Running;
        self.slots[i].note = why;
        self.running += 1;
    }

    /// Give stage `i` its final state; downstream stages whose last upstream this was become
    /// ready.
    pub fn settle(&mut self, i: usize, state: State) {
        debug_assert!(state.settled());
        if matches!(self.slots[i].state, State::Running) {
            self.running -= 1;
        }
        self.ready.remove(&i);
        self.slots[i].state = state;
        for &d in self.graph.downstream(i) {
            let slot = &mut self.slots[d];
            slot.unsettled -= 1;
            if slot.unsettled == 0 && slot.needed {
                self.ready.insert(d);
            }
        }
    }

    /// The first upstream of `i` that failed or was skipped.
    pub fn failed_upstream(&self, i: usize) -> Option<usize> {
        self.graph
            .upstream(i)
            .iter()
            .copied()
            .find(|&u| matches!(self.slots[u].state, State::Failed(_) | State::Skipped(_)))
    }

    /// Stage `u`'s outputs, when they are known.
    pub fn manifest(&self, u: usize) -> Option<Arc<EntryManifest>> {
        match &self.slots[u].state {
            State::Done(m, _) => Some(m.clone()),
            _ => None,
        }
    }

    /// The stages with outputs, in pipeline order.
    pub fn done(&self) -> Vec<(usize, Arc<EntryManifest>)> {
        (0..self.slots.len())
            .filter_map(|i| self.manifest(i).map(|m| (i, m)))
            .collect()
    }

    /// The closing table: selected stages, and needed ones that did not come from the cache.
    pub fn results(&self, name: &dyn Fn(usize) -> String) -> Vec<StageResult> {
        let mut results = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let (outcome, note) = match &slot.state {
                State::Done(m, o) => (
                    *o,
                    format!("{} {}", crate::fingerprint::short(&m.key), slot.note)
                        .trim()
                        .to_owned(),
                ),
                State::Failed(msg) => (Outcome::Failed, msg.clone()),
                State::Skipped(msg) => (Outcome::Skipped, msg.clone()),
                State::Unknown => (Outcome::WouldRun, slot.note.clone()),
                State::Waiting | State::Running => {
                    if !slot.needed || !slot.selected {
                        continue;
                    }
                    (Outcome::Skipped, "interrupted".into())
                }
            };
            if !slot.selected && outcome == Outcome::Cached {
                continue;
            }
            results.push(StageResult {
                name: name(i),
                outcome,
                wall_s: slot.wall_s,
                note,
            });
        }
        results
    }
}
