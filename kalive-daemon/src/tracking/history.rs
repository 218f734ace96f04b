//! The bounded history of peer-state changes and ended connections, numbered so that clients
//! can follow it (`/api/v1/events?since=`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::tracking::connection::{Connection, EndedConnection, PeerStateChange};

/// What one history entry records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    PeerState(PeerStateChange),
    Ended(EndedConnection),
}

/// One entry of the history; `seq` grows by one per entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub seq: u64,
    /// Boxed: a queue slot is then 16 bytes, and the slack a VecDeque keeps as it grows costs
    /// little (a change holds a whole connection, about 350 bytes).
    pub change: Box<Change>,
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
        queue.push_back(HistoryEntry {
            seq,
            change: Box::new(change),
        });
        keep_newest(queue, self.limit);
    }

    /// What the history holds, without its limit (a restarted daemon applies its own).
    pub fn snapshot(&self) -> HistorySnapshot {
        HistorySnapshot {
            ended: self.ended.clone(),
            changes: self.changes.clone(),
            next_seq: self.next_seq,
        }
    }

    /// The history `saved` held, bounded by `limit`: the oldest entries of each kind past it
    /// are dropped, as `record` drops them. Numbering carries on from where it stopped.
    pub fn restore(saved: HistorySnapshot, limit: usize) -> History {
        let mut history = History {
            ended: saved.ended,
            changes: saved.changes,
            limit,
            next_seq: saved.next_seq,
        };
        keep_newest(&mut history.ended, limit);
        keep_newest(&mut history.changes, limit);
        history
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
            .filter_map(|entry| match entry.change.as_ref() {
                Change::Ended(ended) => Some(ended),
                Change::PeerState(_) => None,
            })
    }
}

/// Drops the oldest entries of `queue` past `limit`.
fn keep_newest(queue: &mut VecDeque<HistoryEntry>, limit: usize) {
    let excess = queue.len().saturating_sub(limit);
    queue.drain(..excess);
}

/// The entries and numbering of a history, saved across a daemon restart
/// (`History::snapshot`, `History::restore`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistorySnapshot {
    /// Ended connections, oldest first.
    ended: VecDeque<HistoryEntry>,
    /// Peer-state changes, oldest first.
    changes: VecDeque<HistoryEntry>,
    /// The `seq` the next entry gets.
    next_seq: u64,
}

impl HistorySnapshot {
    /// Checks that these entries can be a history's, as `record` leaves them: each queue holds
    /// its own kind, numbered upwards and below `next_seq`. The error says what is wrong.
    pub fn check(&self) -> Result<(), &'static str> {
        let ended = self
            .ended
            .iter()
            .all(|entry| matches!(*entry.change, Change::Ended(_)));
        let changes = self
            .changes
            .iter()
            .all(|entry| matches!(*entry.change, Change::PeerState(_)));
        if !ended || !changes {
            return Err("a history entry is in the other kind's queue");
        }
        let numbered = |queue: &VecDeque<HistoryEntry>| {
            let seqs: Vec<u64> = queue.iter().map(|entry| entry.seq).collect();
            seqs.windows(2).all(|pair| pair[0] < pair[1])
                && seqs.last().is_none_or(|&last| last < self.next_seq)
        };
        if !numbered(&self.ended) || !numbered(&self.changes) {
            return Err("history entries are not numbered upwards below the next number");
        }
        Ok(())
    }

    /// Every connection the entries record.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.ended
            .iter()
            .chain(&self.changes)
            .map(|entry| match entry.change.as_ref() {
                Change::PeerState(change) => &change.connection,
                Change::Ended(ended) => &ended.connection,
            })
    }
}
