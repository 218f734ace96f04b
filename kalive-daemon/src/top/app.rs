//! The live view's state: rows, recent outcomes, sort, filter, selection and pause. Pure data and
//! key handling, no drawing and no I/O, so every behaviour is unit-tested.

use std::{
    cmp::Ordering,
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use serde::Serialize;

use crate::api::{ConnectionJson, ConnectionsJson, EventJson, EventsJson, StatusJson};

/// Seconds over which the probe rate is averaged (probes come every keepalive interval, so a
/// rate over one refresh would mostly read 0).
pub const PROBE_RATE_WINDOW: f64 = 10.0;

/// Recent outcomes kept for the events pane and the detail view.
pub const MAX_EVENTS: usize = 500;

/// One answer of the data source: everything a refresh needs.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// When it was taken (Unix seconds, the viewer's clock).
    pub taken_unix_seconds: f64,
    /// None when the daemon has no /api/v1/status (an older daemon).
    pub status: Option<StatusJson>,
    pub connections: ConnectionsJson,
    /// The events since the previous snapshot (all newest first).
    pub events: EventsJson,
}

/// What arrives over the channel from the data source.
#[derive(Debug)]
pub enum Update {
    Data(Box<Snapshot>),
    /// The source failed this time (it keeps trying): the cause and the fix.
    Error(String),
}

/// What the main loop should do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
}

/// The table's columns, in display order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Column {
    Local,
    Remote,
    Keepalive,
    Idle,
    Probes,
    Sent,
    Answered,
    LastProbe,
    State,
}

impl Column {
    pub const ALL: [Column; 9] = [
        Column::Local,
        Column::Remote,
        Column::Keepalive,
        Column::Idle,
        Column::Probes,
        Column::Sent,
        Column::Answered,
        Column::LastProbe,
        Column::State,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Column::Local => "LOCAL",
            Column::Remote => "REMOTE",
            Column::Keepalive => "IDLE/INTVL/CNT",
            Column::Idle => "IDLE",
            Column::Probes => "PROBES",
            Column::Sent => "SENT",
            Column::Answered => "ANSW",
            Column::LastProbe => "LAST PROBE",
            Column::State => "STATE",
        }
    }

    fn index(self) -> usize {
        Column::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// How rows are ordered. The default puts the connections in trouble first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sort {
    pub column: Column,
    pub descending: bool,
}

impl Default for Sort {
    fn default() -> Self {
        Sort {
            column: Column::State,
            descending: false,
        }
    }
}

/// One row: a live connection, or one that ended less than `linger` seconds ago.
#[derive(Clone, Debug)]
pub struct Row {
    pub conn: ConnectionJson,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// For ended connections: when (Unix seconds), the outcome and the socket error.
    pub ended: Option<Ended>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub at_unix_seconds: f64,
    pub outcome: String,
    pub error: Option<String>,
}

fn endpoint(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(
        addr.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        port,
    )
}

impl Row {
    pub fn live(conn: ConnectionJson) -> Row {
        Row {
            local: endpoint(&conn.local_addr, conn.local_port),
            remote: endpoint(&conn.remote_addr, conn.remote_port),
            conn,
            ended: None,
        }
    }

    /// The row of an event's connection, in the event's state (`to`).
    pub fn from_event(event: &EventJson) -> Row {
        let mut row = Row::live(event.connection.clone());
        row.ended = Some(Ended {
            at_unix_seconds: event.time_unix_seconds,
            outcome: event.to.clone(),
            error: event.error.clone(),
        });
        row
    }

    /// The state as shown: "probing 2/3", "alive", or the outcome of an ended connection.
    pub fn state_text(&self) -> &str {
        match &self.ended {
            Some(ended) => &ended.outcome,
            None => &self.conn.peer_state_detail,
        }
    }

    /// The state's name without the counts: alive, probing, dead, ...
    pub fn state_name(&self) -> &str {
        match &self.ended {
            Some(ended) => &ended.outcome,
            None => &self.conn.peer_state,
        }
    }

    /// Most serious first: what an operator looks at when a pool misbehaves.
    fn severity(&self) -> (u8, std::cmp::Reverse<u32>) {
        let rank = match self.state_name() {
            "dead" => 0,
            "unreachable" => 1,
            "rebooted" => 2,
            "reset" => 3,
            "probing" => 4,
            "alive" => 5,
            _ => 6,
        };
        (rank, std::cmp::Reverse(self.conn.probes_outstanding))
    }

    fn compare(&self, other: &Row, column: Column) -> Ordering {
        let ka = |row: &Row| {
            (
                row.conn.keepalive.idle_seconds,
                row.conn.keepalive.interval_seconds,
                row.conn.keepalive.probes,
            )
        };
        let by = match column {
            Column::Local => self.local.cmp(&other.local),
            Column::Remote => self.remote.cmp(&other.remote),
            Column::Keepalive => ka(self).partial_cmp(&ka(other)).unwrap_or(Ordering::Equal),
            Column::Idle => self.conn.idle_seconds.total_cmp(&other.conn.idle_seconds),
            Column::Probes => (self.conn.probes_outstanding, self.conn.keepalive.probes)
                .cmp(&(other.conn.probes_outstanding, other.conn.keepalive.probes)),
            Column::Sent => self.conn.probes_sent.cmp(&other.conn.probes_sent),
            Column::Answered => self.conn.probes_answered.cmp(&other.conn.probes_answered),
            // Never probed sorts after any age.
            Column::LastProbe => match (
                self.conn.last_probe_age_seconds,
                other.conn.last_probe_age_seconds,
            ) {
                (Some(a), Some(b)) => a.total_cmp(&b),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            },
            Column::State => self.severity().cmp(&other.severity()),
        };
        by.then(self.conn.id.cmp(&other.conn.id))
    }
}

/// One filter term: all terms must match; a term's comma-separated values are alternatives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    /// Local or remote port.
    Port(Vec<u16>),
    /// Part of the local or remote address ("10.0.0.", "::1", "127.0.0.1:8080").
    Addr(Vec<String>),
    /// A state name or its start ("prob", "dead").
    State(Vec<String>),
    Netns(Vec<u32>),
}

/// The parsed `/` filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub text: String,
    terms: Vec<Term>,
}

const FILTER_HELP: &str = "use port:N, addr:TEXT, state:NAME, netns:N, or a bare port, address or \
                           state; separate alternatives with commas";

impl Filter {
    /// Parses `text`; an error names the bad term and the accepted forms.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let mut terms = Vec::new();
        for word in text.split_whitespace() {
            let (key, values) = match word.split_once(':') {
                Some((key @ ("port" | "addr" | "state" | "netns"), values)) => (key, values),
                _ => ("", word),
            };
            let values: Vec<&str> = values.split(',').filter(|v| !v.is_empty()).collect();
            if values.is_empty() {
                return Err(format!("filter {word:?} has no value: {FILTER_HELP}"));
            }
            let numbers = |what: &str| -> Result<Vec<u64>, String> {
                values
                    .iter()
                    .map(|v| {
                        v.parse::<u64>()
                            .map_err(|_| format!("{what} {v:?} is not a number: {FILTER_HELP}"))
                    })
                    .collect()
            };
            let lower = || values.iter().map(|v| v.to_ascii_lowercase()).collect();
            let term = match key {
                "port" => Term::Port(
                    numbers("port")?
                        .into_iter()
                        .map(|n| u16::try_from(n).map_err(|_| format!("port {n} is above 65535")))
                        .collect::<Result<_, _>>()?,
                ),
                "netns" => Term::Netns(
                    numbers("netns")?
                        .into_iter()
                        .map(|n| u32::try_from(n).map_err(|_| format!("netns {n} is too large")))
                        .collect::<Result<_, _>>()?,
                ),
                "addr" => Term::Addr(lower()),
                "state" => Term::State(lower()),
                // A bare word: a port if it is a number, an address if it looks like one.
                _ if values.iter().all(|v| v.parse::<u16>().is_ok()) => {
                    Term::Port(values.iter().filter_map(|v| v.parse().ok()).collect())
                }
                _ if values.iter().all(|v| v.contains(['.', ':'])) => Term::Addr(lower()),
                _ => Term::State(lower()),
            };
            terms.push(term);
        }
        Ok(Filter {
            text: text.trim().to_owned(),
            terms,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, row: &Row) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Port(ports) => ports
                .iter()
                .any(|p| row.local.port() == *p || row.remote.port() == *p),
            Term::Netns(ids) => ids.contains(&row.conn.netns),
            Term::Addr(parts) => parts.iter().any(|part| {
                [row.local, row.remote].iter().any(|addr| {
                    addr.to_string()
                        .to_ascii_lowercase()
                        .contains(part.as_str())
                })
            }),
            Term::State(names) => names
                .iter()
                .any(|name| row.state_name().starts_with(name.as_str())),
        })
    }
}

/// The live view's state.
pub struct App {
    /// Connections that ended recently, by id, kept for `linger_seconds`.
    ended: HashMap<u64, Row>,
    pub linger_seconds: f64,
    /// Indices into `rows()` after filter and sort: what the table shows.
    view: Vec<usize>,
    rows: Vec<Row>,
    /// Recent events, newest first, at most MAX_EVENTS.
    pub events: VecDeque<EventJson>,
    /// Some event entries were dropped by the daemon's bounded history before we read them.
    pub events_missed: bool,
    pub status: Option<StatusJson>,
    /// Connections the daemon matched and how many it returned (they differ when truncated).
    pub total_connections: usize,
    pub returned_connections: usize,
    pub hook_mode: String,
    /// Probes sent per second over the last PROBE_RATE_WINDOW seconds (from the status totals).
    pub probes_per_second: Option<f64>,
    probe_samples: VecDeque<(f64, u64)>,
    pub sort: Sort,
    pub filter: Filter,
    /// The filter being typed after `/`, and a filter error to show.
    pub filter_input: Option<String>,
    pub filter_error: Option<String>,
    /// The selected row's position in the view, and its connection id.
    selected: usize,
    selected_id: Option<u64>,
    pub detail: bool,
    pub paused: bool,
    /// Snapshots that arrived while paused: the newest connections and every event.
    held: Option<Box<Snapshot>>,
    held_events: Vec<EventsJson>,
    /// The last error of the data source (cleared by the next good snapshot).
    pub error: Option<String>,
    pub last_update_unix_seconds: Option<f64>,
    /// The first table row on screen: kept by drawing, so scrolling is smooth.
    pub scroll: std::cell::Cell<usize>,
}

impl App {
    pub fn new(linger_seconds: f64) -> App {
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
            selected: 0,
            selected_id: None,
            detail: false,
            paused: false,
            held: None,
            held_events: Vec::new(),
            error: None,
            last_update_unix_seconds: None,
            scroll: std::cell::Cell::new(0),
        }
    }

    /// Every row (live and recently ended), unordered.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The rows shown, in order.
    pub fn visible(&self) -> impl ExactSizeIterator<Item = &Row> + '_ {
        self.view.iter().map(|&i| &self.rows[i])
    }

    pub fn visible_len(&self) -> usize {
        self.view.len()
    }

    /// The `index`-th row shown.
    pub fn visible_row(&self, index: usize) -> Option<&Row> {
        self.view.get(index).map(|&i| &self.rows[i])
    }

    pub fn selected_index(&self) -> Option<usize> {
        (!self.view.is_empty()).then(|| self.selected.min(self.view.len() - 1))
    }

    pub fn selected_row(&self) -> Option<&Row> {
        self.selected_index().and_then(|i| self.visible_row(i))
    }

    /// Events about one connection, newest first.
    pub fn events_of(&self, id: u64) -> impl Iterator<Item = &EventJson> {
        self.events.iter().filter(move |e| e.connection.id == id)
    }

    pub fn update(&mut self, update: Update) {
        match update {
            Update::Data(snapshot) => self.apply(snapshot),
            Update::Error(error) => self.error = Some(error),
        }
    }

    /// Folds a snapshot in (or holds it while paused).
    pub fn apply(&mut self, snapshot: Box<Snapshot>) {
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
            // A daemon that restarted counts afresh: forget the older samples.
            if self
                .probe_samples
                .back()
                .is_some_and(|&(_, probes)| probes > status.probes_sent)
            {
                self.probe_samples.clear();
            }
            self.probe_samples.push_back((now, status.probes_sent));
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
        self.status = snapshot.status;
        self.hook_mode = snapshot.connections.hook_mode.into_owned();
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

    /// Adds a page of events: newest first, no duplicates, and ended connections become rows.
    pub fn merge_events(&mut self, page: &EventsJson) {
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
            if event.kind == "ended" {
                self.ended
                    .insert(event.connection.id, Row::from_event(event));
            }
            self.events.push_front(event.clone());
        }
        self.events.truncate(MAX_EVENTS);
    }

    /// Recomputes rows and the view after data, sort or filter changed; keeps the selection
    /// on the same connection when it is still shown.
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
        if let Some(id) = self.selected_id {
            let position = self.visible().position(|row| row.conn.id == id);
            if let Some(position) = position {
                self.selected = position;
            }
        }
        self.selected = self.selected.min(self.view.len().saturating_sub(1));
        self.selected_id = self.selected_row().map(|row| row.conn.id);
    }

    pub fn set_sort(&mut self, sort: Sort) {
        self.sort = sort;
        self.resort();
    }

    /// Applies a filter text; a bad one is kept out and its error shown.
    pub fn set_filter(&mut self, text: &str) -> bool {
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

    fn select(&mut self, index: usize) {
        self.selected = index.min(self.view.len().saturating_sub(1));
        self.selected_id = self.selected_row().map(|row| row.conn.id);
    }

    fn move_selection(&mut self, by: isize) {
        let current = self.selected_index().unwrap_or(0);
        self.select(current.saturating_add_signed(by));
    }

    fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            if let Some(held) = self.held.take() {
                self.apply(held);
            }
        }
    }

    /// Handles one key; `page` is the number of table rows on screen (for PageUp/PageDown).
    pub fn on_key(&mut self, key: KeyEvent, page: usize) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(input) = &mut self.filter_input {
            match key.code {
                KeyCode::Enter => {
                    let text = input.clone();
                    if self.set_filter(&text) {
                        self.filter_input = None;
                    }
                }
                KeyCode::Esc => {
                    self.filter_input = None;
                    self.filter_error = None;
                }
                KeyCode::Backspace => {
                    input.pop();
                }
                KeyCode::Char(c) => input.push(c),
                _ => {}
            }
            return Action::None;
        }
        let page = page.max(1) as isize;
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc if self.detail => self.detail = false,
            KeyCode::Esc if !self.filter.is_empty() => {
                self.set_filter("");
            }
            KeyCode::Char('/') => self.filter_input = Some(self.filter.text.clone()),
            KeyCode::Char('p') | KeyCode::Char(' ') => self.set_paused(!self.paused),
            KeyCode::Enter => self.detail = !self.detail && self.selected_row().is_some(),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-page),
            KeyCode::PageDown => self.move_selection(page),
            KeyCode::Home | KeyCode::Char('g') => self.select(0),
            KeyCode::End | KeyCode::Char('G') => self.select(usize::MAX),
            KeyCode::Char('<') | KeyCode::Left => {
                let index = (self.sort.column.index() + Column::ALL.len() - 1) % Column::ALL.len();
                self.set_sort(Sort {
                    column: Column::ALL[index],
                    descending: self.sort.descending,
                });
            }
            KeyCode::Char('>') | KeyCode::Right => {
                let index = (self.sort.column.index() + 1) % Column::ALL.len();
                self.set_sort(Sort {
                    column: Column::ALL[index],
                    descending: self.sort.descending,
                });
            }
            KeyCode::Char('r') => self.set_sort(Sort {
                column: self.sort.column,
                descending: !self.sort.descending,
            }),
            // 1..9 pick a column; the same one again reverses.
            KeyCode::Char(c @ '1'..='9') => {
                let column = Column::ALL[c as usize - '1' as usize];
                let descending = self.sort.column == column && !self.sort.descending;
                self.set_sort(Sort { column, descending });
            }
            _ => {}
        }
        Action::None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::api::KeepaliveJson;

    pub fn conn(
        id: u64,
        local_port: u16,
        remote: &str,
        state: &str,
        outstanding: u32,
    ) -> ConnectionJson {
        let (remote_addr, remote_port) = remote.rsplit_once(':').expect("addr:port");
        let remote_addr = remote_addr.trim_start_matches('[').trim_end_matches(']');
        ConnectionJson {
            id,
            netns: 4026531840,
            direction: Cow::Borrowed("outbound"),
            local_addr: "10.0.0.1".into(),
            local_port,
            remote_addr: remote_addr.into(),
            remote_port: remote_port.parse().expect("port"),
            keepalive: KeepaliveJson {
                enabled: true,
                idle_seconds: 60.0,
                interval_seconds: 10.0,
                probes: 3,
                user_timeout_seconds: None,
            },
            probes_sent: u64::from(outstanding) + id,
            probes_answered: id,
            probes_outstanding: outstanding,
            probe_send_failures: 0,
            last_probe_unix_seconds: Some(1000.0 - id as f64),
            last_probe_age_seconds: Some(id as f64),
            idle_seconds: 60.0 + id as f64,
            last_timer_run_age_seconds: Some(1.0),
            first_seen_unix_seconds: 900.0,
            peer_state: Cow::Owned(state.to_owned()),
            peer_state_detail: if state == "probing" {
                format!("probing {outstanding}/3")
            } else {
                state.to_owned()
            },
            reset_received: state == "rebooted" || state == "reset",
            last_error: None,
            hook_mode: Cow::Borrowed("tracepoint"),
        }
    }

    pub fn event(
        seq: u64,
        kind: &str,
        conn: ConnectionJson,
        from: Option<&str>,
        to: &str,
    ) -> EventJson {
        EventJson {
            seq,
            kind: Cow::Owned(kind.to_owned()),
            time_unix_seconds: 1000.0 + seq as f64,
            from: from.map(str::to_owned),
            to: to.to_owned(),
            outcome: (kind == "ended").then(|| Cow::Owned(to.to_owned())),
            error: (to == "dead").then(|| "ETIMEDOUT".to_owned()),
            connection: conn,
        }
    }

    pub fn events(events: Vec<EventJson>, gap: bool) -> EventsJson {
        EventsJson {
            next_since: events.first().map_or(0, |e| e.seq),
            oldest_seq: events.last().map(|e| e.seq),
            gap,
            truncated: false,
            events,
        }
    }

    pub fn snapshot(taken: f64, conns: Vec<ConnectionJson>, page: EventsJson) -> Box<Snapshot> {
        Box::new(Snapshot {
            taken_unix_seconds: taken,
            status: Some(StatusJson {
                version: "0.1.0".into(),
                hook_mode: "tracepoint".into(),
                kernel: "6.18.0".into(),
                started_unix_seconds: Some(taken - 3723.0),
                uptime_seconds: Some(3723.0),
                connections: conns.len(),
                probes_sent: (taken as u64) * 2,
                probes_answered: 10,
                probe_send_failures: 0,
                keepalive_timeouts: 1,
                resets_received: 2,
                events_lost: 0,
            }),
            connections: ConnectionsJson {
                hook_mode: "tracepoint".into(),
                total: conns.len(),
                returned: conns.len(),
                truncated: false,
                limit: 100_000,
                connections: conns,
            },
            events: page,
        })
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ids(app: &App) -> Vec<u64> {
        app.visible().map(|row| row.conn.id).collect()
    }

    pub fn sample() -> Vec<ConnectionJson> {
        vec![
            conn(1, 40001, "10.0.0.9:5432", "alive", 0),
            conn(2, 40002, "10.0.0.7:6379", "probing", 2),
            conn(3, 40003, "192.168.1.5:443", "probing", 1),
            conn(4, 40004, "[::1]:8080", "rebooted", 0),
        ]
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
        assert_eq!(app.sort.column, Column::Local);
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
        next[1] = conn(2, 40002, "10.0.0.7:6379", "alive", 0);
        app.apply(snapshot(1001.0, next, events(vec![], false)));
        assert_eq!(ids(&app), [4, 3, 1, 2]);
        assert_eq!(app.selected_index(), Some(1));
        assert_eq!(app.selected_row().map(|r| r.conn.id), Some(3));
        // Its connection gone, the selection stays at the same place, within bounds.
        app.apply(snapshot(
            1002.0,
            vec![conn(1, 40001, "10.0.0.9:5432", "alive", 0)],
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
        let c2 = conn(2, 40002, "10.0.0.7:6379", "probing", 3);
        let mut dead = c2.clone();
        dead.peer_state = "dead".into();
        dead.peer_state_detail = "dead".into();
        app.apply(snapshot(
            1000.0,
            sample(),
            events(
                vec![
                    event(
                        2,
                        "peer_state",
                        c2.clone(),
                        Some("probing 2/3"),
                        "probing 3/3",
                    ),
                    event(
                        1,
                        "peer_state",
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
                    event(3, "ended", dead.clone(), None, "dead"),
                    event(
                        2,
                        "peer_state",
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
        let c1 = conn(1, 40001, "10.0.0.9:5432", "probing", 1);
        app.apply(snapshot(
            1000.0,
            sample(),
            events(
                vec![event(
                    50,
                    "peer_state",
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
                    "peer_state",
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
                vec![event(1, "peer_state", c1, Some("alive"), "probing 1/3")],
                true,
            ),
        ));
        assert_eq!(app.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn the_pane_is_bounded() {
        let mut app = App::new(30.0);
        let c1 = conn(1, 40001, "10.0.0.9:5432", "alive", 0);
        let page: Vec<EventJson> = (1..=(MAX_EVENTS as u64 + 10))
            .rev()
            .map(|seq| event(seq, "peer_state", c1.clone(), Some("alive"), "alive"))
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
        let c1 = conn(1, 40001, "10.0.0.9:5432", "alive", 0);
        app.apply(snapshot(1000.0, sample(), events(vec![], false)));
        app.on_key(key(KeyCode::Char('p')), 10);
        assert!(app.paused);
        app.apply(snapshot(
            1001.0,
            vec![],
            events(
                vec![event(1, "peer_state", c1.clone(), None, "alive")],
                false,
            ),
        ));
        app.apply(snapshot(
            1002.0,
            vec![],
            events(
                vec![event(2, "peer_state", c1.clone(), None, "alive")],
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
        app.update(Update::Error("no kalive daemon answers".into()));
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
