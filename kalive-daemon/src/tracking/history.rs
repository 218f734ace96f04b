//! The bounded history of peer-state changes and ended connections, numbered so that clients
//! can follow it (`/api/v1/events?since=`).

use std::collections::VecDeque;

use crate::tracking::connection::{EndedConnection, PeerStateChange};

/// What one history entry records.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    PeerState(PeerStateChange),
    Ended(EndedConnection),
}

/// One entry of the history; `seq` grows by one per entry.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub seq: u64,
    pub change: Change,
}

/// Ended connections and peer-state changes, each queue bounded by `limit` so a burst of probes
/// never pushes outcomes out.
#[derive(Debug)]
pub struct History {
    ended: VecDeque<HistoryEntry>,
    changes: VecDeque<HistoryEntry>,
    limit: usize,
    next_seq: u64,
}

impl History {
    pub fn new(limit: usize) -> History {
        History {
            ended: VecDeque::new(),
            changes: VecDeque::new(),
            limit,
            next_seq: 1,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Entries held: (ended connections, peer-state changes), each at most `limit`.
    pub fn lens(&self) -> (usize, usize) {
        (self.ended.len(), self.changes.len())
    }

    /// Numbers `change` and keeps it, dropping the oldest entry of its kind when full.
    pub fn record(&mut self, change: Change) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let queue = match change {
            Change::Ended(_) => &mut self.ended,
            Change::PeerState(_) => &mut self.changes,
        };
        if self.limit == 0 {
            return;
        }
        if queue.len() >= self.limit {
            queue.pop_front();
        }
        queue.push_back(HistoryEntry { seq, change });
    }

    /// Entries with `seq` above `since`, newest first.
    pub fn since(&self, since: u64) -> Vec<&HistoryEntry> {
        let start = |queue: &VecDeque<HistoryEntry>| queue.partition_point(|e| e.seq <= since);
        let mut entries: Vec<&HistoryEntry> = self.ended.range(start(&self.ended)..).collect();
        entries.extend(self.changes.range(start(&self.changes)..));
        entries.sort_unstable_by_key(|entry| std::cmp::Reverse(entry.seq));
        entries
    }

    /// The lowest `seq` still held, or None when the history is empty.
    pub fn oldest_seq(&self) -> Option<u64> {
        let first = |queue: &VecDeque<HistoryEntry>| queue.front().map(|entry| entry.seq);
        match (first(&self.ended), first(&self.changes)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The `seq` the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Ended connections, newest first.
    pub fn ended(&self) -> impl Iterator<Item = &EndedConnection> {
        self.ended
            .iter()
            .rev()
            .filter_map(|entry| match &entry.change {
                Change::Ended(ended) => Some(ended),
                Change::PeerState(_) => None,
            })
    }
}
