//! The connection table saved across a daemon restart: what `ConnectionTable::snapshot` takes and
//! `ConnectionTable::restore` puts back, written with postcard inside the state the daemon hands
//! to the next one (kernel::handover). The kernel units and the middlebox rules are not saved: the new
//! process reads its own from the host and its arguments, and applies its own history limit.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use serde::{Deserialize, Serialize};

use crate::tracking::{connection::Connection, history::HistorySnapshot, totals::Totals};

/// The layout of the saved bytes: a daemon reads only the layout it writes (postcard does not
/// describe its fields, so another layout would be misread). Raise it with any change to a type
/// the snapshot holds.
pub(super) const FORMAT: u32 = 1;

/// Why a saved connection table cannot be restored; the daemon starts with an empty one.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes are not a table of this layout (truncated, damaged, or not a snapshot).
    #[error("the saved connection table is unreadable ({0}): starting with an empty table")]
    Unreadable(#[from] postcard::Error),
    /// A whole table was read and bytes were left over.
    #[error(
        "the saved connection table has {0} bytes after its end (damaged): starting with an \
         empty table"
    )]
    TrailingBytes(usize),
    /// Saved by a daemon that writes another layout.
    #[error(
        "the saved connection table has layout {found}, this daemon reads layout {FORMAT} (saved \
         by another version): starting with an empty table"
    )]
    OtherFormat { found: u32 },
    /// The bytes read as a table, but not as one the table could have left (damaged).
    #[error("the saved connection table is inconsistent ({0}): starting with an empty table")]
    Inconsistent(&'static str),
}

/// Everything the connection table holds but its kernel units and middlebox rules: the live and
/// adopted connections, the history, the totals, the next id and the answer checks due. It is
/// read (serde, also inside a larger record) only through the checks of `try_from`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Contents")]
pub struct TableSnapshot(pub(super) Contents);

/// What a `TableSnapshot` holds, as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct Contents {
    /// The layout of the bytes (`FORMAT` when written by this daemon).
    pub(super) format: u32,
    /// Tracked connections by kernel socket address.
    pub(super) live: HashMap<u64, Box<Connection>>,
    /// The history's entries and numbering, without its limit.
    pub(super) history: HistorySnapshot,
    /// Running totals by network namespace.
    pub(super) totals: BTreeMap<u32, Totals>,
    /// The id the next connection gets.
    pub(super) next_id: u64,
    /// Answer checks by (when due, socket, the connection's first sighting).
    pub(super) checks: BTreeSet<(u64, u64, u64)>,
    /// Connections adopted from the inventory by (netns, local, remote).
    pub(super) adopted: HashMap<(u32, SocketAddr, SocketAddr), Connection>,
}

impl Contents {
    /// Checks what the table relies on: a history as it records it, and every connection's id
    /// below the next one (new connections never share an id with a saved one).
    fn check(&self) -> Result<(), &'static str> {
        self.history.check()?;
        let mut connections = self
            .live
            .values()
            .map(Box::as_ref)
            .chain(self.adopted.values())
            .chain(self.history.connections());
        if connections.any(|conn| conn.id >= self.next_id) {
            return Err("a connection's id is not below the next id");
        }
        Ok(())
    }
}

impl TryFrom<Contents> for TableSnapshot {
    type Error = SnapshotError;

    /// The snapshot of contents read, when they are of this layout and consistent.
    fn try_from(contents: Contents) -> Result<TableSnapshot, SnapshotError> {
        if contents.format != FORMAT {
            return Err(SnapshotError::OtherFormat {
                found: contents.format,
            });
        }
        contents.check().map_err(SnapshotError::Inconsistent)?;
        Ok(TableSnapshot(contents))
    }
}

/// A snapshot on its own, for the tests: the daemon writes and reads it inside the handover's
/// state (kernel::handover), where the same checks apply through `try_from`.
#[cfg(test)]
impl TableSnapshot {
    /// The snapshot as postcard bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Writing to a Vec fails only for what postcard cannot write (a sequence of unknown
        // length, a custom error), which no type here has; empty bytes would read as unreadable.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// The snapshot `to_bytes` wrote; any other bytes are an error, never a panic. (Read inside
    /// a larger record, the same checks apply, but postcard's error does not carry their
    /// message.)
    pub fn from_bytes(bytes: &[u8]) -> Result<TableSnapshot, SnapshotError> {
        // The layout first: another one would not read as this one's contents.
        let (format, _) = postcard::take_from_bytes::<u32>(bytes)?;
        if format != FORMAT {
            return Err(SnapshotError::OtherFormat { found: format });
        }
        match postcard::take_from_bytes::<Contents>(bytes)? {
            (contents, []) => TableSnapshot::try_from(contents),
            (_, rest) => Err(SnapshotError::TrailingBytes(rest.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kalive_common::{event_kind, key_direction, reset_kind, ResetKey};
    use kalive_testkit::fixtures::{FakeSocket, HZ, NETNS};

    use super::*;
    use crate::{
        advisor::{IdleLimit, MiddleboxRules},
        kernel::{
            decode::endpoints, procfs::DEFAULT_EPHEMERAL_PORTS, socket_owners::SocketOwner,
            units::KernelUnits,
        },
        tracking::{
            connection::{Found, KeepaliveSettings},
            history::{Change, HistoryEntry},
            peer_state::PeerState,
            table::{Applied, CheckResult, ConnectionTable, Notice},
        },
    };

    const HISTORY: usize = 10;

    /// The fixtures' kernel units: HZ 250, reason 9 is TCP_KEEPALIVE_TIMEOUT (the testkit's
    /// own `units` is a type of its build of this crate).
    fn units() -> KernelUnits {
        KernelUnits {
            hz: HZ,
            reset_reasons: BTreeMap::from([(9, "TCP_KEEPALIVE_TIMEOUT".to_owned())]),
            ephemeral_ports: DEFAULT_EPHEMERAL_PORTS,
        }
    }

    /// A connection the inventory found from `local` to `remote`, held by sshd.
    fn found(local: SocketAddr, remote: SocketAddr) -> Found {
        Found {
            netns: NETNS,
            local,
            remote,
            keepalive_on: true,
            settings: KeepaliveSettings {
                idle: Duration::from_secs(60),
                interval: Duration::from_secs(10),
                probe_limit: 5,
                user_timeout: Some(Duration::from_secs(90)),
            },
            probes_outstanding: 0,
            idle: Duration::from_secs(30),
            srtt: Duration::from_millis(1),
            owner: Some(SocketOwner {
                pid: 42,
                fd: 3,
                command: "sshd".to_owned(),
                cgroup: Some("/system.slice/ssh.service".to_owned()),
            }),
        }
    }

    /// A table with a bit of everything, and the sockets still live in it: a probe answered,
    /// a peer probing 2/3, a probe overdue by an answer check (a recheck due), a keepalive
    /// timeout (dead), an idle RST (reset), an untracked retransmission timeout, RSTs counted
    /// by the kernel, unseen probes, and two adopted connections (one the socket `adopted`'s).
    struct Busy {
        table: ConnectionTable,
        answered: FakeSocket,
        probing: FakeSocket,
        overdue: FakeSocket,
        adopted: FakeSocket,
    }

    fn busy_table() -> Busy {
        let mut table = ConnectionTable::new(units(), HISTORY);
        let mut answered = FakeSocket::new(0);
        table.apply(&answered.first_run());
        table.apply(&answered.probe());
        answered.answer();
        table.apply(&answered.quiet_run());

        let mut overdue = FakeSocket::new(2);
        table.apply(&overdue.first_run());
        let probe = overdue.probe();
        table.apply(&probe);
        let at = probe.time_ns + 200_000_000;
        for check in table.due_checks(at, 10) {
            let socket = CheckResult::Socket {
                probes_out: 1,
                since_last_ack: None,
                keepalive_timer: true,
                state: 1,
            };
            table.apply_check(&check, socket, at);
        }

        let mut probing = FakeSocket::new(1);
        probing.sample.keepalive_probes = 3;
        table.apply(&probing.first_run());
        table.apply(&probing.probe());
        table.apply(&probing.probe());

        let mut dead = FakeSocket::new(3);
        table.apply(&dead.first_run());
        for _ in 0..5 {
            table.apply(&dead.probe());
        }
        table.apply(&dead.keepalive_timeout(libc::ETIMEDOUT));

        let mut reset = FakeSocket::new(4);
        table.apply(&reset.first_run());
        table.apply(&reset.record(event_kind::RESET_RECEIVED, 0));
        table.apply(&reset.record(event_kind::CLOSED, libc::ECONNRESET));

        let mut stalled = FakeSocket::new(5);
        stalled.sample.packets_out = 3;
        table.apply(&FakeSocket::untracked(
            stalled.record(event_kind::CLOSED, libc::ETIMEDOUT),
        ));
        let sent = ResetKey {
            netns: 0,
            direction: key_direction::NO_SOCKET,
            kind: reset_kind::SENT,
            detail: 9,
            ..ResetKey::default()
        };
        table.count_untracked_resets(&sent, 2);
        let received = ResetKey {
            netns: NETNS,
            service_port: 5432,
            direction: key_direction::INBOUND,
            kind: reset_kind::RECEIVED,
            detail: 1,
        };
        table.count_untracked_resets(&received, 7);
        table.count_unseen_probes(NETNS, 3);

        let adopted = FakeSocket::new(6);
        let (local, remote) = endpoints(&adopted.id);
        let ssh = found(
            "192.168.0.1:22".parse().expect("address"),
            "10.9.9.9:51000".parse().expect("address"),
        );
        let adoptions = table.adopt(vec![found(local, remote), ssh], adopted.time_ns);
        assert_eq!(adoptions, 2);
        Busy {
            table,
            answered,
            probing,
            overdue,
            adopted,
        }
    }

    fn sorted_connections(table: &ConnectionTable) -> Vec<Connection> {
        let mut connections: Vec<Connection> = table.connections().cloned().collect();
        connections.sort_by_key(|conn| conn.id);
        connections
    }

    fn history_entries(table: &ConnectionTable) -> Vec<HistoryEntry> {
        table.history().since(0).into_iter().cloned().collect()
    }

    /// Asserts that the two tables are the same in everything they show and hold.
    fn assert_same(original: &ConnectionTable, restored: &ConnectionTable) {
        assert_eq!(sorted_connections(original), sorted_connections(restored));
        assert_eq!(history_entries(original), history_entries(restored));
        assert_eq!(original.history().next_seq(), restored.history().next_seq());
        assert_eq!(original.all_totals(), restored.all_totals());
        assert_eq!(original.snapshot(), restored.snapshot());
    }

    fn round_trip(table: &ConnectionTable, history_limit: usize) -> ConnectionTable {
        let bytes = table.snapshot().to_bytes();
        let snapshot = TableSnapshot::from_bytes(&bytes).expect("the bytes just written");
        ConnectionTable::restore(snapshot, units(), history_limit, MiddleboxRules::default())
    }

    #[test]
    fn the_busy_table_has_every_kind_of_state() {
        let busy = busy_table();
        let TableSnapshot(saved) = busy.table.snapshot();
        assert_eq!((saved.live.len(), saved.adopted.len()), (3, 2));
        assert!(!saved.checks.is_empty(), "a recheck is due");
        let (ended, changes) = busy.table.history().lens();
        assert_eq!(ended, 2);
        assert!(changes > 1, "{changes} peer-state changes");
        let totals = busy.table.totals(NETNS);
        assert_eq!(totals.timeouts["keepalive"], 1);
        assert_eq!(totals.timeouts["retransmit"], 1);
        assert_eq!((totals.outcomes["dead"], totals.outcomes["reset"]), (1, 1));
        assert_eq!(totals.resets_sent["tcp_keepalive_timeout"], 1);
        assert_eq!(totals.resets_received_during_probe, 7);
        assert_eq!(totals.probes_unseen, 3);
        assert_eq!(busy.table.totals(0).resets_sent["tcp_keepalive_timeout"], 2);
        let live = |socket: &FakeSocket| {
            busy.table
                .connections()
                .find(|conn| conn.first_seen_ns == socket.first_seen_ns && !conn.adopted)
                .map(|conn| conn.peer_state)
        };
        assert_eq!(live(&busy.answered), Some(PeerState::Alive));
        let probing = |outstanding, limit| Some(PeerState::Probing { outstanding, limit });
        assert_eq!(live(&busy.probing), probing(2, 3));
        assert_eq!(live(&busy.overdue), probing(1, 5));
    }

    #[test]
    fn a_restored_table_is_the_table_saved() {
        let busy = busy_table();
        let restored = round_trip(&busy.table, HISTORY);
        assert_same(&busy.table, &restored);
        assert_eq!(restored.connection_count(), 5);
        assert_eq!(
            restored
                .ended()
                .map(|ended| ended.outcome)
                .collect::<Vec<_>>(),
            vec![PeerState::Reset, PeerState::Dead]
        );
    }

    #[test]
    fn a_restored_table_carries_on_as_the_original_would() {
        let Busy {
            mut table,
            mut answered,
            mut probing,
            mut overdue,
            mut adopted,
        } = busy_table();
        let mut restored = round_trip(&table, HISTORY);
        let next_id = table.snapshot().0.next_id;
        let (_, adopted_remote) = endpoints(&adopted.id);
        let id_and_adopted = |table: &ConnectionTable| {
            table
                .connections()
                .find(|conn| conn.remote == adopted_remote)
                .map(|conn| (conn.id, conn.adopted))
        };
        let (adopted_id, _) = id_and_adopted(&restored).expect("adopted");
        let mut fresh = FakeSocket::new(7);
        let events = [
            adopted.first_run(),
            probing.probe(),
            probing.keepalive_timeout(libc::ETIMEDOUT),
            answered.probe(),
            overdue.record(event_kind::RESET_RECEIVED, 0),
            fresh.first_run(),
            fresh.probe(),
        ];
        for event in &events {
            let applied = table.apply(event);
            assert_eq!(applied, restored.apply(event), "{event:?}");
            assert_same(&table, &restored);
        }
        // The new connection got the id after the saved ones; the adopted one kept its id when
        // its first record came.
        let fresh_id = restored
            .connections()
            .find(|conn| conn.first_seen_ns == fresh.first_seen_ns)
            .map(|conn| conn.id);
        assert_eq!(fresh_id, Some(next_id));
        assert_eq!(id_and_adopted(&restored), Some((adopted_id, false)));
        // The answer checks due are the same, and so is what they decide.
        let later = fresh.time_ns + 60_000_000_000;
        let due = table.due_checks(later, 10);
        assert!(!due.is_empty());
        assert_eq!(due, restored.due_checks(later, 10));
        for check in &due {
            table.apply_check(check, CheckResult::Unavailable, later);
            restored.apply_check(check, CheckResult::Unavailable, later);
        }
        assert_same(&table, &restored);
        let keys = ResetKey {
            netns: NETNS,
            kind: reset_kind::SENT,
            ..ResetKey::default()
        };
        assert_eq!(
            table.count_untracked_resets(&keys, 4),
            restored.count_untracked_resets(&keys, 4)
        );
        assert_same(&table, &restored);
    }

    #[test]
    fn a_smaller_history_limit_keeps_the_newest_entries() {
        let busy = busy_table();
        let restored = round_trip(&busy.table, 1);
        assert_eq!(restored.history().limit(), 1);
        assert_eq!(restored.history().lens(), (1, 1));
        let newest = |kind_ended: bool| {
            history_entries(&busy.table)
                .into_iter()
                .find(|entry| matches!(*entry.change, Change::Ended(_)) == kind_ended)
        };
        let mut expected: Vec<HistoryEntry> = [newest(true), newest(false)]
            .into_iter()
            .flatten()
            .collect();
        expected.sort_by_key(|entry| std::cmp::Reverse(entry.seq));
        assert_eq!(history_entries(&restored), expected);
        assert_eq!(
            restored.history().next_seq(),
            busy.table.history().next_seq()
        );
        // A larger limit keeps everything.
        let larger = round_trip(&busy.table, 100);
        assert_eq!(history_entries(&larger), history_entries(&busy.table));
    }

    #[test]
    fn the_new_processes_middlebox_rules_apply() {
        let busy = busy_table();
        let snapshot = TableSnapshot::from_bytes(&busy.table.snapshot().to_bytes()).unwrap();
        let limit = IdleLimit {
            seconds: 45,
            from: "--middlebox-idle-timeout".to_owned(),
        };
        let restored = ConnectionTable::restore(
            snapshot,
            units(),
            HISTORY,
            MiddleboxRules::everywhere(limit),
        );
        let at_risk = |table: &ConnectionTable| table.connections().any(|c| table.at_risk(c));
        assert!(!at_risk(&busy.table));
        assert!(
            at_risk(&restored),
            "keepalive idle 60 s against a 45 s limit"
        );
    }

    #[test]
    fn truncated_bytes_are_an_error() {
        let bytes = busy_table().table.snapshot().to_bytes();
        for end in 0..bytes.len() {
            assert!(
                TableSnapshot::from_bytes(&bytes[..end]).is_err(),
                "{end} of {} bytes",
                bytes.len()
            );
        }
    }

    /// Bytes from a fixed xorshift sequence.
    fn garbage(state: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                *state as u8
            })
            .collect()
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2_000 {
            let bytes = garbage(&mut state, len % 400);
            assert!(TableSnapshot::from_bytes(&bytes).is_err(), "{bytes:?}");
            // Behind this daemon's layout number, too.
            let mut framed = vec![FORMAT as u8];
            framed.extend(&bytes);
            assert!(TableSnapshot::from_bytes(&framed).is_err(), "{framed:?}");
        }
        // A saved table with any one byte changed reads as a table or an error, never a panic.
        let bytes = busy_table().table.snapshot().to_bytes();
        for at in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] ^= flip;
                let _ = TableSnapshot::from_bytes(&damaged);
            }
        }
    }

    #[test]
    fn other_layouts_extra_bytes_and_inconsistent_tables_are_errors() {
        let TableSnapshot(saved) = busy_table().table.snapshot();
        let mut bytes = TableSnapshot(saved.clone()).to_bytes();
        bytes.push(0);
        assert!(matches!(
            TableSnapshot::from_bytes(&bytes),
            Err(SnapshotError::TrailingBytes(1))
        ));
        let other = TableSnapshot(Contents {
            format: FORMAT + 1,
            ..saved.clone()
        });
        let error = TableSnapshot::from_bytes(&other.to_bytes()).unwrap_err();
        assert!(matches!(error, SnapshotError::OtherFormat { found } if found == FORMAT + 1));
        assert!(error
            .to_string()
            .ends_with(": starting with an empty table"));
        let reused_ids = TableSnapshot(Contents {
            next_id: 1,
            ..saved
        });
        let error = TableSnapshot::from_bytes(&reused_ids.to_bytes()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the saved connection table is inconsistent (a connection's id is not below the next \
             id): starting with an empty table"
        );
    }

    #[test]
    fn the_checks_apply_inside_a_larger_record() {
        /// A record that holds a snapshot, as the daemon's handover does.
        #[derive(Serialize, Deserialize)]
        struct Record {
            before: u64,
            table: TableSnapshot,
            after: String,
        }
        let TableSnapshot(saved) = busy_table().table.snapshot();
        let record = |contents: &Contents| Record {
            before: 7,
            table: TableSnapshot(contents.clone()),
            after: "end".to_owned(),
        };
        let bytes = postcard::to_allocvec(&record(&saved)).expect("postcard");
        let read: Record = postcard::from_bytes(&bytes).expect("the record just written");
        assert_eq!(
            (read.before, read.table.0, read.after),
            (7, saved.clone(), "end".into())
        );
        let damaged = [
            Contents {
                format: FORMAT + 1,
                ..saved.clone()
            },
            Contents {
                next_id: 1,
                ..saved
            },
        ];
        for contents in &damaged {
            let bytes = postcard::to_allocvec(&record(contents)).expect("postcard");
            assert!(postcard::from_bytes::<Record>(&bytes).is_err());
        }
    }

    #[test]
    fn an_unknown_timer_or_outcome_name_is_an_error() {
        for name in ["keepalive", "sleepy"] {
            let mut snapshot = busy_table().table.snapshot();
            let totals = snapshot.0.totals.entry(NETNS).or_default();
            totals.timeouts.insert(name, 1);
            let read = TableSnapshot::from_bytes(&snapshot.to_bytes());
            assert_eq!(read.is_ok(), name == "keepalive", "{name}");
        }
        let mut snapshot = busy_table().table.snapshot();
        snapshot
            .0
            .totals
            .entry(NETNS)
            .or_default()
            .outcomes
            .insert("asleep", 1);
        let error = TableSnapshot::from_bytes(&snapshot.to_bytes()).unwrap_err();
        assert!(matches!(error, SnapshotError::Unreadable(_)), "{error}");
    }

    #[test]
    fn an_empty_table_round_trips() {
        let table = ConnectionTable::new(units(), HISTORY);
        let mut restored = round_trip(&table, HISTORY);
        assert_same(&table, &restored);
        let mut socket = FakeSocket::new(0);
        let applied: Applied = restored.apply(&socket.first_run());
        assert!(matches!(&applied.notices[..], [Notice::Tracked(conn)] if conn.id == 1));
    }
}
