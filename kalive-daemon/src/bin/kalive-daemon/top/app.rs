//! The live view's state: rows, recent outcomes, sort, filter, selection and pause. Pure data, no
//! drawing and no I/O, so every behaviour is unit-tested. Keys are handled in `keys`.

use std::collections::{HashMap, VecDeque};

use kalive_daemon::wire::{
    ConnectionJson, ConnectionsJson, EventJson, EventKind, EventsJson, StatusJson,
};
use ratatui::widgets::TableState;
use serde::Serialize;

use super::{column::Sort, filter::Filter, row::Row, source::SourceError};

/// Seconds over which the probe rate is averaged (probes come every keepalive interval, so a
/// rate over one refresh would mostly read 0).
pub(crate) const PROBE_RATE_WINDOW: f64 = 10.0;

/// Recent outcomes kept for the events pane and the detail view.
pub(crate) const MAX_EVENTS: usize = 500;

/// One answer of the data source: everything a refresh needs.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Snapshot {
    /// When it was taken (Unix seconds, the viewer's clock).
    pub(crate) taken_unix_seconds: f64,
    /// None when the daemon has no /api/v1/status (an older daemon).
    pub(crate) status: Option<StatusJson>,
    pub(crate) connections: ConnectionsJson,
    /// The events since the previous snapshot (all newest first).
    pub(crate) events: EventsJson,
}

/// What arrives over the channel from the data source.
#[derive(Debug)]
pub(crate) enum Update {
    Data(Box<Snapshot>),
    /// The source failed this time (it keeps trying).
    Error(SourceError),
}

/// The live view's state.
pub(crate) struct App {
    /// Connections that ended recently, by id, kept for `linger_seconds`.
    ended: HashMap<u64, Row>,
    pub(crate) linger_seconds: f64,
    /// Indices into `rows` after filter and sort: what the table shows.
    view: Vec<usize>,
    rows: Vec<Row>,
    /// Recent events, newest first, at most MAX_EVENTS.
    pub(crate) events: VecDeque<EventJson>,
    /// Some event entries were dropped by the daemon's bounded history before we read them.
    pub(crate) events_missed: bool,
    pub(crate) status: Option<StatusJson>,
    /// Connections the daemon matched and how many it returned (they differ when truncated).
    pub(crate) total_connections: usize,
    pub(crate) returned_connections: usize,
    pub(crate) hook_mode: String,
    /// Probes sent per second over the last PROBE_RATE_WINDOW seconds (from the status totals).
    pub(crate) probes_per_second: Option<f64>,
    probe_samples: VecDeque<(f64, u64)>,
    pub(crate) sort: Sort,
    pub(crate) filter: Filter,
    /// The filter being typed after `/`, and a filter error to show.
    pub(crate) filter_input: Option<String>,
    pub(crate) filter_error: Option<String>,
    /// The selected row (an index into the view) and the first row on screen.
    pub(crate) table: TableState,
    /// The selected row's connection, so the selection follows it across refreshes.
    selected_id: Option<u64>,
    pub(crate) detail: bool,
    pub(crate) paused: bool,
    /// Snapshots that arrived while paused: the newest connections and every event.
    held: Option<Box<Snapshot>>,
    held_events: Vec<EventsJson>,
    /// The last error of the data source (cleared by the next good snapshot).
    pub(crate) error: Option<SourceError>,
    pub(crate) last_update_unix_seconds: Option<f64>,
}

impl App {
    pub(crate) fn new(linger_seconds: f64) -> App {
        App {
            ended: HashMap::new(),
            linger_seconds,
            view: Vec::new(),
            rows: Vec::new(),
            events: VecDeque::new(),
            events_missed: false,
            status: None,
            total_connections: 0,
            returned_connections: 0,
            hook_mode: String::new(),
            probes_per_second: None,
            probe_samples: VecDeque::new(),
            sort: Sort::default(),
            filter: Filter::default(),
            filter_input: None,
            filter_error: None,
            table: TableState::default().with_selected(Some(0)),
            selected_id: None,
            detail: false,
            paused: false,
            held: None,
            held_events: Vec::new(),
            error: None,
            last_update_unix_seconds: None,
        }
    }

    /// Every row (live and recently ended), unordered.
    pub(crate) fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The rows shown, in order.
    pub(crate) fn visible(&self) -> impl ExactSizeIterator<Item = &Row> + '_ {
        self.view.iter().map(|&i| &self.rows[i])
    }

    pub(crate) fn visible_len(&self) -> usize {
        self.view.len()
    }

    /// The `index`-th row shown.
    pub(crate) fn visible_row(&self, index: usize) -> Option<&Row> {
        self.view.get(index).map(|&i| &self.rows[i])
    }

    pub(crate) fn selected_index(&self) -> Option<usize> {
        let selected = self.table.selected()?;
        (!self.view.is_empty()).then(|| selected.min(self.view.len() - 1))
    }

    pub(crate) fn selected_row(&self) -> Option<&Row> {
        self.selected_index().and_then(|i| self.visible_row(i))
    }

    /// Events about one connection, newest first.
    pub(crate) fn events_of(&self, id: u64) -> impl Iterator<Item = &EventJson> {
        self.events.iter().filter(move |e| e.connection.id == id)
    }

    pub(crate) fn update(&mut self, update: Update) {
        match update {
            Update::Data(snapshot) => self.apply(snapshot),
            Update::Error(error) => self.error = Some(error),
        }
    }

    /// Folds a snapshot in (or holds it while paused).
    pub(crate) fn apply(&mut self, snapshot: Box<Snapshot>) {
        self.error = None;
        if self.paused {
            if let Some(held) = self.held.take() {
                self.held_events.push(held.events);
            }
            self.held = Some(snapshot);
            return;
        }
        for events in std::mem::take(&mut self.held_events) {
            self.merge_events(&events);
        }
        let snapshot = *snapshot;
        self.merge_events(&snapshot.events);
        let now = snapshot.taken_unix_seconds;
        if let Some(status) = &snapshot.status {
            self.sample_probes(now, status.probes_sent);
        }
        self.status = snapshot.status;
        self.hook_mode = snapshot.connections.hook_mode;
        self.total_connections = snapshot.connections.total;
        self.returned_connections = snapshot.connections.returned;
        let linger = self.linger_seconds;
        self.ended.retain(|_, row| {
            row.ended
                .as_ref()
                .is_some_and(|e| now - e.at_unix_seconds <= linger)
        });
        self.last_update_unix_seconds = Some(now);
        self.rebuild(snapshot.connections.connections);
    }

    /// Adds a sample of the daemon's probe total and recomputes the rate over the window.
    fn sample_probes(&mut self, now: f64, probes_sent: u64) {
        // A daemon that restarted counts afresh: forget the older samples.
        if self
            .probe_samples
            .back()
            .is_some_and(|&(_, probes)| probes > probes_sent)
        {
            self.probe_samples.clear();
        }
        self.probe_samples.push_back((now, probes_sent));
        while self.probe_samples.len() > 2
            && self
                .probe_samples
                .get(1)
                .is_some_and(|&(then, _)| now - then >= PROBE_RATE_WINDOW)
        {
            self.probe_samples.pop_front();
        }
        self.probes_per_second = match (self.probe_samples.front(), self.probe_samples.back()) {
            (Some(&(then, old)), Some(&(_, new))) if now > then => {
                Some((new - old) as f64 / (now - then))
            }
            _ => None,
        };
    }

    /// Adds a page of events: newest first, no duplicates, and ended connections become rows.
    pub(crate) fn merge_events(&mut self, page: &EventsJson) {
        let newest_held = self.events.front().map(|e| e.seq);
        if page.gap {
            self.events_missed = true;
            // A daemon that restarted numbers its history afresh: what we hold is another run's.
            if let (Some(held), Some(first)) = (newest_held, page.events.first()) {
                if first.seq < held {
                    self.events.clear();
                    self.ended.clear();
                }
            }
        }
        let newest_held = self.events.front().map(|e| e.seq);
        // The page is newest first: push its oldest first onto the front.
        for event in page.events.iter().rev() {
            if newest_held.is_some_and(|held| event.seq <= held) {
                continue;
            }
            if event.kind == EventKind::Ended {
                self.ended
                    .insert(event.connection.id, Row::from_event(event));
            }
            self.events.push_front(event.clone());
        }
        self.events.truncate(MAX_EVENTS);
    }

    /// Recomputes rows and the view after new data; keeps the selection on the same connection
    /// when it is still shown.
    fn rebuild(&mut self, live: Vec<ConnectionJson>) {
        let mut rows: Vec<Row> = live
            .into_iter()
            .filter(|conn| !self.ended.contains_key(&conn.id))
            .map(Row::live)
            .collect();
        rows.extend(self.ended.values().cloned());
        self.rows = rows;
        self.resort();
    }

    /// Recomputes the view after data, sort or filter changed.
    fn resort(&mut self) {
        let rows = &self.rows;
        let filter = &self.filter;
        let mut view: Vec<usize> = (0..rows.len())
            .filter(|&i| filter.matches(&rows[i]))
            .collect();
        let Sort { column, descending } = self.sort;
        view.sort_unstable_by(|&a, &b| {
            let order = rows[a].compare(&rows[b], column);
            if descending {
                order.reverse()
            } else {
                order
            }
        });
        self.view = view;
        let followed = self
            .selected_id
            .and_then(|id| self.visible().position(|row| row.conn.id == id));
        let index = followed.or(self.table.selected()).unwrap_or(0);
        self.select(index);
    }

    pub(crate) fn set_sort(&mut self, sort: Sort) {
        self.sort = sort;
        self.resort();
    }

    /// Applies a filter text; a bad one is kept out and its error shown.
    pub(crate) fn set_filter(&mut self, text: &str) -> bool {
        match Filter::parse(text) {
            Ok(filter) => {
                self.filter = filter;
                self.filter_error = None;
                self.resort();
                true
            }
            Err(error) => {
                self.filter_error = Some(error);
                false
            }
        }
    }

    /// Selects the `index`-th row shown (the last one when beyond).
    pub(crate) fn select(&mut self, index: usize) {
        self.table
            .select(Some(index.min(self.view.len().saturating_sub(1))));
        self.selected_id = self.selected_row().map(|row| row.conn.id);
    }

    pub(crate) fn move_selection(&mut self, by: isize) {
        let current = self.selected_index().unwrap_or(0);
        self.select(current.saturating_add_signed(by));
    }

    pub(crate) fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            if let Some(held) = self.held.take() {
                self.apply(held);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use kalive_daemon::wire::PeerStateKind;
    use kalive_testkit::fixtures::{connection_json as conn, event_json, events_page as events};

    use super::*;
    use crate::top::{
        column::Column,
        keys::Action,
        test_snapshots::{sample, snapshot},
    };

    fn event(
        seq: u64,
        kind: EventKind,
        conn: ConnectionJson,
        from: Option<&str>,
        to: &str,
    ) -> EventJson {
        event_json(seq, kind, conn, from, to)
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ids(app: &App) -> Vec<u64> {
        app.visible().map(|row| row.conn.id).collect()
    }

    #[test]
    fn default_sort_puts_trouble_first() {
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        assert_eq!(ids(&app), [4, 2, 3, 1]);
        assert_eq!(app.visible_row(0).map(Row::state_text), Some("rebooted"));
        assert_eq!(app.visible_row(1).map(Row::state_text), Some("probing 2/3"));
    }

    #[test]
    fn every_column_sorts_both_ways() {
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        // Column keys 1..9, again to reverse.
        app.on_key(key(KeyCode::Char('2')), 10);
        assert_eq!(
            app.sort,
            Sort {
                column: Column::Remote,
                descending: false
            }
        );
        // IPv4 before IPv6, then by address.
        assert_eq!(ids(&app), [2, 1, 3, 4]);
        app.on_key(key(KeyCode::Char('2')), 10);
        assert_eq!(ids(&app), [4, 3, 1, 2]);
        app.on_key(key(KeyCode::Char('5')), 10);
        assert_eq!(app.sort.column, Column::Probes);
        assert_eq!(ids(&app), [1, 4, 3, 2]);
        app.on_key(key(KeyCode::Char('r')), 10);
        assert_eq!(ids(&app), [2, 3, 4, 1]);
        for column in Column::ALL {
            for descending in [false, true] {
                app.set_sort(Sort { column, descending });
                let shown: Vec<&Row> = app.visible().collect();
                assert_eq!(shown.len(), 4, "{column:?}");
                for pair in shown.windows(2) {
                    let order = pair[0].compare(pair[1], column);
                    let expected = if descending {
                        Ordering::Greater
                    } else {
                        Ordering::Less
                    };
                    assert_eq!(order, expected, "{column:?} descending={descending}");
                }
            }
        }
        // < and > walk the columns, wrapping.
        app.set_sort(Sort::default());
        app.on_key(key(KeyCode::Char('>')), 10);
        assert_eq!(app.sort.column, Column::Owner);
        app.on_key(key(KeyCode::Char('>')), 10);
        assert_eq!(app.sort.column, Column::Local);
        app.on_key(key(KeyCode::Char('<')), 10);
        app.on_key(key(KeyCode::Char('<')), 10);
        assert_eq!(app.sort.column, Column::State);
    }

    #[test]
    fn filter_by_port_address_state_and_netns() {
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        let shown = |app: &mut App, text: &str| {
            assert!(app.set_filter(text), "{text}: {:?}", app.filter_error);
            ids(app)
        };
        assert_eq!(shown(&mut app, "port:6379"), [2]);
        assert_eq!(shown(&mut app, "40001"), [1]);
        assert_eq!(shown(&mut app, "5432,443"), [3, 1]);
        assert_eq!(shown(&mut app, "addr:192.168."), [3]);
        assert_eq!(shown(&mut app, "::1"), [4]);
        assert_eq!(shown(&mut app, "state:probing"), [2, 3]);
        assert_eq!(shown(&mut app, "prob"), [2, 3]);
        assert_eq!(shown(&mut app, "prob 10.0.0.7"), [2]);
        assert_eq!(
            shown(&mut app, "netns:4026531840 state:alive,rebooted"),
            [4, 1]
        );
        assert_eq!(shown(&mut app, "netns:1"), Vec::<u64>::new());
        assert_eq!(shown(&mut app, ""), [4, 2, 3, 1]);
        // A bad filter is refused with the accepted forms, and the old one stays.
        assert!(app.set_filter("port:6379"));
        assert!(!app.set_filter("port:http"));
        assert!(app
            .filter_error
            .as_deref()
            .is_some_and(|e| e.contains("port:N")));
        assert!(!app.set_filter("port:70000"));
        assert!(!app.set_filter("state:"));
        assert_eq!(ids(&app), [2]);
    }

    #[test]
    fn filter_by_owner_command_and_pid() {
        let mut conns = sample();
        conns[0].owner_command = Some("sshd".into());
        conns[0].owner_pid = Some(812);
        conns[0].owner_cgroup = Some("/system.slice/ssh.service".into());
        conns[1].owner_command = Some("redis-server".into());
        conns[1].owner_pid = Some(2001);
        conns[1].owner_cgroup = Some("/kubepods/burstable/pod42/c0ffee".into());
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, conns, events(vec![], false)));
        let shown = |app: &mut App, text: &str| {
            assert!(app.set_filter(text), "{text}: {:?}", app.filter_error);
            ids(app)
        };
        assert_eq!(shown(&mut app, "owner:ssh"), [1]);
        assert_eq!(shown(&mut app, "owner:REDIS,sshd"), [2, 1]);
        assert_eq!(shown(&mut app, "pid:2001"), [2]);
        assert_eq!(shown(&mut app, "pid:1"), Vec::<u64>::new());
        assert_eq!(shown(&mut app, "cgroup:ssh.service"), [1]);
        assert_eq!(shown(&mut app, "cgroup:KUBEPODS"), [2]);
        assert!(!app.set_filter("pid:me"));
        assert!(app.set_filter("owner:sshd"));
        let owners: Vec<String> = app
            .visible()
            .map(|row| crate::top::ui::cells(row)[Column::Owner.index()].clone())
            .collect();
        assert_eq!(owners, ["sshd[812]"]);
    }

    #[test]
    fn at_risk_connections_are_marked_and_filtered() {
        let mut conns = sample();
        conns[2].at_risk = true;
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, conns, events(vec![], false)));
        assert!(app.set_filter("at-risk"), "{:?}", app.filter_error);
        assert_eq!(ids(&app), [3]);
        assert!(app.set_filter("at-risk port:443"));
        assert_eq!(ids(&app), [3]);
        assert!(app.set_filter("at-risk port:6379"));
        assert!(ids(&app).is_empty());
        assert!(app.set_filter(""));
        let keepalive_cells: Vec<String> = app
            .visible()
            .map(|row| crate::top::ui::cells(row)[Column::Keepalive.index()].clone())
            .collect();
        assert_eq!(
            keepalive_cells
                .iter()
                .filter(|cell| cell.ends_with(" AT RISK"))
                .count(),
            1,
            "{keepalive_cells:?}"
        );
    }

    #[test]
    fn filter_is_typed_after_slash_and_cleared_with_escape() {
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        app.on_key(key(KeyCode::Char('/')), 10);
        for c in "deadx".chars() {
            app.on_key(key(KeyCode::Char(c)), 10);
        }
        app.on_key(key(KeyCode::Backspace), 10);
        assert_eq!(app.filter_input.as_deref(), Some("dead"));
        app.on_key(key(KeyCode::Backspace), 10);
        app.on_key(key(KeyCode::Backspace), 10);
        app.on_key(key(KeyCode::Backspace), 10);
        app.on_key(key(KeyCode::Backspace), 10);
        // 'q' while typing is text, not quit; it is refused as a state on Enter.
        for c in "port:443".chars() {
            assert_eq!(app.on_key(key(KeyCode::Char(c)), 10), Action::None);
        }
        app.on_key(key(KeyCode::Enter), 10);
        assert_eq!(app.filter_input, None);
        assert_eq!(ids(&app), [3]);
        app.on_key(key(KeyCode::Esc), 10);
        assert_eq!(ids(&app), [4, 2, 3, 1]);
        assert_eq!(app.on_key(key(KeyCode::Char('q')), 10), Action::Quit);
        assert_eq!(
            app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), 10),
            Action::Quit
        );
    }

    #[test]
    fn selection_follows_its_connection_across_refreshes() {
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        assert_eq!(app.selected_row().map(|r| r.conn.id), Some(4));
        app.on_key(key(KeyCode::Down), 10);
        app.on_key(key(KeyCode::Down), 10);
        assert_eq!(app.selected_row().map(|r| r.conn.id), Some(3));
        // Connection 2 recovers: 3 moves up a place, the selection stays on it.
        let mut next = sample();
        next[1] = conn(2, 40002, "10.0.0.7:6379", PeerStateKind::Alive, 0);
        app.apply(snapshot(1001.0, next, events(vec![], false)));
        assert_eq!(ids(&app), [4, 3, 1, 2]);
        assert_eq!(app.selected_index(), Some(1));
        assert_eq!(app.selected_row().map(|r| r.conn.id), Some(3));
        // Its connection gone, the selection stays at the same place, within bounds.
        app.apply(snapshot(
            1002.0,
            vec![conn(1, 40001, "10.0.0.9:5432", PeerStateKind::Alive, 0)],
            events(vec![], false),
        ));
        assert_eq!(app.selected_row().map(|r| r.conn.id), Some(1));
        app.apply(snapshot(1003.0, sample(), events(vec![], false)));
        app.on_key(key(KeyCode::End), 10);
        assert_eq!(app.selected_index(), Some(3));
        app.on_key(key(KeyCode::PageUp), 2);
        assert_eq!(app.selected_index(), Some(1));
        app.on_key(key(KeyCode::PageUp), 2);
        assert_eq!(app.selected_index(), Some(0));
        app.on_key(key(KeyCode::Up), 2);
        assert_eq!(app.selected_index(), Some(0));
        // Enter opens the detail of the selected row, Esc closes it.
        app.on_key(key(KeyCode::Enter), 2);
        assert!(app.detail);
        app.on_key(key(KeyCode::Esc), 2);
        assert!(!app.detail);
        // Nothing to select in an empty view.
        app.apply(snapshot(1004.0, vec![], events(vec![], false)));
        assert_eq!(app.selected_row().map(|r| r.conn.id), None);
        app.on_key(key(KeyCode::Enter), 2);
        assert!(!app.detail);
    }

    #[test]
    fn events_merge_newest_first_without_duplicates_and_ended_rows_linger() {
        let mut app = App::new(30.0);
        let c2 = conn(2, 40002, "10.0.0.7:6379", PeerStateKind::Probing, 3);
        let mut dead = c2.clone();
        dead.peer_state = PeerStateKind::Dead;
        dead.peer_state_detail = "dead".into();
        app.apply(snapshot(
            1000.0,
            sample(),
            events(
                vec![
                    event(
                        2,
                        EventKind::PeerState,
                        c2.clone(),
                        Some("probing 2/3"),
                        "probing 3/3",
                    ),
                    event(
                        1,
                        EventKind::PeerState,
                        c2.clone(),
                        Some("probing 1/3"),
                        "probing 2/3",
                    ),
                ],
                false,
            ),
        ));
        // The next page overlaps the first (seq 2 again) and ends connection 2.
        let mut live = sample();
        live.remove(1);
        app.apply(snapshot(
            1004.0,
            live.clone(),
            events(
                vec![
                    event(3, EventKind::Ended, dead.clone(), None, "dead"),
                    event(
                        2,
                        EventKind::PeerState,
                        c2.clone(),
                        Some("probing 2/3"),
                        "probing 3/3",
                    ),
                ],
                false,
            ),
        ));
        let seqs: Vec<u64> = app.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 2, 1]);
        assert_eq!(app.events_of(2).count(), 3);
        // The dead connection stays in the table, first, with its outcome.
        assert_eq!(ids(&app), [2, 4, 3, 1]);
        let row = app.visible_row(0).expect("row");
        assert_eq!(row.state_text(), "dead");
        assert_eq!(
            row.ended.as_ref().and_then(|e| e.error.as_deref()),
            Some("ETIMEDOUT")
        );
        // Even if the live list still had it (fetched before it ended), the ended row wins.
        app.apply(snapshot(1005.0, sample(), events(vec![], false)));
        assert_eq!(ids(&app), [2, 4, 3, 1]);
        assert_eq!(app.rows().len(), 4);
        // After the linger time it is gone.
        app.apply(snapshot(1034.0, live, events(vec![], false)));
        assert_eq!(ids(&app), [4, 3, 1]);
        assert!(!app.events_missed);
    }

    #[test]
    fn a_gap_is_flagged_and_a_restarted_daemon_starts_the_pane_afresh() {
        let mut app = App::new(30.0);
        let c1 = conn(1, 40001, "10.0.0.9:5432", PeerStateKind::Probing, 1);
        app.apply(snapshot(
            1000.0,
            sample(),
            events(
                vec![event(
                    50,
                    EventKind::PeerState,
                    c1.clone(),
                    Some("alive"),
                    "probing 1/3",
                )],
                false,
            ),
        ));
        app.apply(snapshot(
            1001.0,
            sample(),
            events(
                vec![event(
                    60,
                    EventKind::PeerState,
                    c1.clone(),
                    Some("probing 1/3"),
                    "probing 2/3",
                )],
                true,
            ),
        ));
        assert!(app.events_missed);
        assert_eq!(
            app.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [60, 50]
        );
        app.apply(snapshot(
            1002.0,
            sample(),
            events(
                vec![event(
                    1,
                    EventKind::PeerState,
                    c1,
                    Some("alive"),
                    "probing 1/3",
                )],
                true,
            ),
        ));
        assert_eq!(app.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn the_pane_is_bounded() {
        let mut app = App::new(30.0);
        let c1 = conn(1, 40001, "10.0.0.9:5432", PeerStateKind::Alive, 0);
        let page: Vec<EventJson> = (1..=(MAX_EVENTS as u64 + 10))
            .rev()
            .map(|seq| {
                event(
                    seq,
                    EventKind::PeerState,
                    c1.clone(),
                    Some("alive"),
                    "alive",
                )
            })
            .collect();
        app.apply(snapshot(1000.0, sample(), events(page, false)));
        assert_eq!(app.events.len(), MAX_EVENTS);
        assert_eq!(
            app.events.front().map(|e| e.seq),
            Some(MAX_EVENTS as u64 + 10)
        );
    }

    #[test]
    fn pause_holds_updates_and_loses_no_event() {
        let mut app = App::new(30.0);
        let c1 = conn(1, 40001, "10.0.0.9:5432", PeerStateKind::Alive, 0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        app.on_key(key(KeyCode::Char('p')), 10);
        assert!(app.paused);
        app.apply(snapshot(
            1001.0,
            vec![],
            events(
                vec![event(1, EventKind::PeerState, c1.clone(), None, "alive")],
                false,
            ),
        ));
        app.apply(snapshot(
            1002.0,
            vec![],
            events(
                vec![event(2, EventKind::PeerState, c1.clone(), None, "alive")],
                false,
            ),
        ));
        // Frozen while paused.
        assert_eq!(app.visible_len(), 4);
        assert!(app.events.is_empty());
        app.on_key(key(KeyCode::Char(' ')), 10);
        assert!(!app.paused);
        assert_eq!(app.visible_len(), 0);
        assert_eq!(app.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(app.last_update_unix_seconds, Some(1002.0));
    }

    #[test]
    fn probe_rate_comes_from_the_totals_and_errors_clear_on_data() {
        let mut app = App::new(30.0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        assert_eq!(app.probes_per_second, None);
        app.update(Update::Error(SourceError::Unhealthy("stopped".into())));
        assert!(app.error.is_some());
        // probes_sent is 2 x taken in the sample status: 2 probes a second.
        app.apply(snapshot(1004.0, sample(), events(vec![], false)));
        assert_eq!(app.probes_per_second, Some(2.0));
        assert_eq!(app.error, None);
        // Averaged over the window: a burst of 30 probes in the last second of 10 reads 3/s.
        let mut app = App::new(30.0);
        for (taken, probes) in [(1000.0, 100), (1005.0, 100), (1009.0, 100), (1010.0, 130)] {
            let mut snap = snapshot(taken, sample(), events(vec![], false));
            snap.status.as_mut().expect("status").probes_sent = probes;
            app.apply(snap);
        }
        assert_eq!(app.probes_per_second, Some(3.0));
        // Older samples leave the window; a restarted daemon (lower total) starts afresh.
        let mut snap = snapshot(1020.0, sample(), events(vec![], false));
        snap.status.as_mut().expect("status").probes_sent = 150;
        app.apply(snap);
        assert_eq!(app.probes_per_second, Some(2.0));
        let mut snap = snapshot(1021.0, sample(), events(vec![], false));
        snap.status.as_mut().expect("status").probes_sent = 5;
        app.apply(snap);
        assert_eq!(app.probes_per_second, None);
    }
}
