//! Drawing the live view (ratatui), and the same data as plain text for `--once`.
//! Only the rows on screen are built, so a frame costs the same with 100 or 10,000 connections.

use kalive_daemon::wire::{EventJson, PeerStateKind};
use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row as TableRow, Table, TableState},
    Frame,
};

use super::{app::App, column::Column, row::Row};

/// The colour of a state.
pub(crate) fn state_color(state: PeerStateKind) -> Color {
    match state {
        PeerStateKind::Alive => Color::Green,
        PeerStateKind::Probing => Color::Yellow,
        PeerStateKind::Dead | PeerStateKind::Unreachable => Color::Red,
        PeerStateKind::Rebooted => Color::Magenta,
        PeerStateKind::Reset => Color::LightRed,
        PeerStateKind::Closed => Color::Gray,
    }
}

/// A duration for a narrow column: 0.4s, 12s, 3m05s, 2h10m, 3d04h.
pub(crate) fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_owned();
    }
    if seconds < 10.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds as u64;
    match whole {
        0..=59 => format!("{whole}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..=86_399 => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d{:02}h", whole / 86_400, whole % 86_400 / 3600),
    }
}

/// A keepalive setting in seconds: whole seconds without decimals.
fn setting(seconds: f64) -> String {
    if seconds.fract() == 0.0 && seconds < 1e9 {
        format!("{}s", seconds as u64)
    } else {
        format!("{seconds:.1}s")
    }
}

/// The text of each column of a row, in `Column::ALL` order.
pub(crate) fn cells(row: &Row) -> [String; 10] {
    let c = &row.conn;
    [
        row.local.to_string(),
        row.remote.to_string(),
        format!(
            "{}/{}/{}{}",
            setting(c.keepalive.idle_seconds),
            setting(c.keepalive.interval_seconds),
            c.keepalive.probes,
            // The daemon's --middlebox-idle-timeout: the first probe comes after it.
            if c.at_risk { " AT RISK" } else { "" }
        ),
        duration(c.idle_seconds),
        format!("{}/{}", c.probes_outstanding, c.keepalive.probes),
        c.probes_sent.to_string(),
        c.probes_answered.to_string(),
        c.last_probe_age_seconds
            .map_or_else(|| "-".to_owned(), duration),
        row.state_text().to_owned(),
        owner(c),
    ]
}

/// "sshd[812]", or "-" when the daemon has not found the socket's process.
fn owner(c: &kalive_daemon::wire::ConnectionJson) -> String {
    match (&c.owner_command, c.owner_pid) {
        (Some(command), Some(pid)) => format!("{command}[{pid}]"),
        _ => "-".to_owned(),
    }
}

/// Widths of the columns for the rows given (addresses as wide as the widest shown).
fn widths<'a>(rows: impl Iterator<Item = &'a Row>) -> [u16; 10] {
    let mut widths = Column::ALL.map(|column| column.title().len() as u16 + 1);
    widths[Column::Local as usize] = widths[Column::Local as usize].max(15);
    widths[Column::Remote as usize] = widths[Column::Remote as usize].max(15);
    widths[Column::State as usize] = widths[Column::State as usize].max(11);
    for row in rows {
        for (width, text) in widths.iter_mut().zip(cells(row)) {
            *width = (*width).max(text.len().min(47) as u16);
        }
    }
    widths
}

fn count_states(app: &App) -> (usize, usize, usize) {
    let (mut live, mut probing, mut ended) = (0, 0, 0);
    for row in app.rows() {
        if row.ended.is_some() {
            ended += 1;
        } else {
            live += 1;
            if row.state() == PeerStateKind::Probing {
                probing += 1;
            }
        }
    }
    (live, probing, ended)
}

fn header_lines(app: &App, source: &str) -> [Vec<Span<'static>>; 2] {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut first = vec![
        Span::styled("kalive top", bold),
        Span::raw(format!("  {source}")),
    ];
    match &app.status {
        Some(status) => first.push(Span::raw(format!(
            "  hook {}  kernel {}  up {}",
            status.hook_mode,
            status.kernel,
            status
                .uptime_seconds
                .map_or_else(|| "?".to_owned(), duration)
        ))),
        None if !app.hook_mode.is_empty() => {
            first.push(Span::raw(format!("  hook {}", app.hook_mode)));
        }
        None => {}
    }
    if app.paused {
        first.push(Span::styled(
            "  PAUSED",
            Style::default().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    let (live, probing, ended) = count_states(app);
    let mut second = vec![Span::raw(format!(
        "{live} connections ({probing} probing, {ended} ended recently)"
    ))];
    if app.total_connections > app.returned_connections {
        second.push(Span::styled(
            format!(" of {} (truncated)", app.total_connections),
            Style::default().fg(Color::Yellow),
        ));
    }
    second.push(Span::raw(format!(
        "  probes/s {}",
        app.probes_per_second
            .map_or_else(|| "-".to_owned(), |rate| format!("{rate:.1}"))
    )));
    if let Some(status) = &app.status {
        second.push(Span::raw(format!(
            "  timeouts {}  resets {}  ",
            status.keepalive_timeouts, status.resets_received
        )));
        let lost = format!("events lost {}", status.events_lost);
        second.push(if status.events_lost > 0 {
            Span::styled(lost, Style::default().fg(Color::Red))
        } else {
            Span::raw(lost)
        });
    }
    if app.events_missed {
        second.push(Span::styled(
            "  some outcomes were dropped before they were read",
            Style::default().fg(Color::Yellow),
        ));
    }
    [first, second]
}

/// One line of the events pane.
pub(crate) fn event_text(event: &EventJson, now_unix: f64) -> String {
    let c = &event.connection;
    let mut text = format!(
        "{:>6} ago  {:<12} {}:{} -> {}:{}",
        duration(now_unix - event.time_unix_seconds),
        event.to,
        bracket(&c.local_addr),
        c.local_port,
        bracket(&c.remote_addr),
        c.remote_port
    );
    if let Some(from) = &event.from {
        text.push_str(&format!("  was {from}"));
    }
    if let Some(error) = &event.error {
        text.push_str(&format!("  {error}"));
    }
    text
}

fn bracket(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    }
}

fn event_matches(app: &App, event: &EventJson) -> bool {
    app.filter.is_empty() || app.filter.matches(&Row::from_event(event))
}

/// Draws a frame; returns how many table rows fit (the page for PageUp/PageDown).
pub(crate) fn draw(frame: &mut Frame, app: &mut App, source: &str) -> usize {
    let area = frame.area();
    let events_height = if area.height >= 24 { 9 } else { 0 };
    let [header, table, events, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(3),
        Constraint::Length(events_height),
        Constraint::Length(1),
    ])
    .areas(area);

    let [first, second] = header_lines(app, source);
    frame.render_widget(
        Paragraph::new(vec![Line::from(first), Line::from(second)]),
        header,
    );
    let page = draw_table(frame, app, table);
    if events_height > 0 {
        draw_events(frame, app, events);
    }
    draw_footer(frame, app, footer);
    if app.detail {
        if let Some(row) = app.selected_row() {
            draw_detail(frame, app, row, area);
        }
    }
    page
}

/// The table. The selection and the first row on screen live in `app.table` (a `TableState`);
/// only the rows on screen are built, so a frame costs the same with 100 or 10,000 connections.
fn draw_table(frame: &mut Frame, app: &mut App, area: Rect) -> usize {
    let height = usize::from(area.height.saturating_sub(3)); // borders and the title row
    let len = app.visible_len();
    let selected = app.selected_index();
    // Scroll just enough to keep the selection on screen.
    let mut scroll = app.table.offset().min(len.saturating_sub(height));
    if let Some(selected) = selected {
        if selected < scroll {
            scroll = selected;
        } else if height > 0 && selected >= scroll + height {
            scroll = selected + 1 - height;
        }
    }
    *app.table.offset_mut() = scroll;
    let app = &*app;
    let shown: Vec<&Row> = (scroll..len.min(scroll + height))
        .filter_map(|i| app.visible_row(i))
        .collect();
    let widths = widths(shown.iter().copied());
    let titles = Column::ALL.map(|column| {
        let mut title = column.title().to_owned();
        if column == app.sort.column {
            title.push(if app.sort.descending { 'v' } else { '^' });
        }
        title
    });
    let rows = shown.iter().map(|row| {
        let dim = if row.ended.is_some() {
            Style::default().add_modifier(Modifier::DIM)
        } else {
            Style::default()
        };
        let mut cells = cells(row).map(|text| Cell::new(text).style(dim));
        cells[Column::State as usize] = Cell::new(row.state_text().to_owned()).style(
            Style::default()
                .fg(state_color(row.state()))
                .add_modifier(Modifier::BOLD),
        );
        TableRow::new(cells)
    });
    let title = format!(
        " connections {}{} ",
        if len == 0 { 0 } else { scroll + 1 },
        if len == 0 {
            String::new()
        } else {
            format!("-{} of {len}", scroll + shown.len())
        }
    );
    let table = Table::new(rows, widths.map(Constraint::Length))
        .header(TableRow::new(titles).style(Style::default().add_modifier(Modifier::BOLD)))
        .column_spacing(1)
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .block(Block::default().borders(Borders::ALL).title(title));
    // The rows built are the ones on screen: the selection, relative to them.
    let mut on_screen =
        TableState::default().with_selected(selected.map(|s| s.saturating_sub(scroll)));
    frame.render_stateful_widget(table, area, &mut on_screen);
    height
}

fn draw_events(frame: &mut Frame, app: &App, area: Rect) {
    let now = app.last_update_unix_seconds.unwrap_or(0.0);
    let height = usize::from(area.height.saturating_sub(2));
    let lines: Vec<Line> = app
        .events
        .iter()
        .filter(|event| event_matches(app, event))
        .take(height)
        .map(|event| {
            let state = event.outcome.unwrap_or(event.connection.peer_state);
            Line::from(Span::styled(
                event_text(event, now),
                Style::default().fg(state_color(state)),
            ))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" recent outcomes, newest first "),
        ),
        area,
    );
}

fn draw_footer(frame: &mut Frame, app: &App, area: Rect) {
    let line = if let Some(input) = &app.filter_input {
        let mut spans = vec![
            Span::styled("filter: ", Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{input}_")),
            Span::raw("  (Enter apply, Esc cancel)  "),
        ];
        if let Some(error) = &app.filter_error {
            spans.push(Span::styled(error.clone(), Style::default().fg(Color::Red)));
        }
        Line::from(spans)
    } else if let Some(error) = &app.error {
        Line::from(Span::styled(
            format!("error: {error}"),
            Style::default().fg(Color::Red),
        ))
    } else {
        let mut spans = vec![Span::raw(
            "q quit  up/down select  Enter detail  / filter  1-9 < > sort  r reverse  p pause",
        )];
        if !app.filter.is_empty() {
            spans.push(Span::styled(
                format!("  filter: {} (Esc clears)", app.filter.text),
                Style::default().fg(Color::Cyan),
            ));
        }
        Line::from(spans)
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// Every field of one connection, and its recent events.
pub(crate) fn detail_lines(app: &App, row: &Row) -> Vec<String> {
    let c = &row.conn;
    let ka = &c.keepalive;
    let opt = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), duration);
    let mut lines = vec![
        format!(
            "connection {}  ({}, netns {})",
            c.id,
            c.direction.name(),
            c.netns
        ),
        format!("local  {}", row.local),
        format!("remote {}", row.remote),
        format!("state  {}", row.state_text()),
        format!(
            "keepalive {}: idle {}, interval {}, {} probes, user timeout {}",
            if ka.enabled { "on" } else { "off" },
            setting(ka.idle_seconds),
            setting(ka.interval_seconds),
            ka.probes,
            ka.user_timeout_seconds
                .map_or_else(|| "none".to_owned(), setting)
        ),
        format!(
            "owner  {}{}; a dead peer goes unnoticed for {} while idle",
            owner(c),
            c.owner_cgroup
                .as_deref()
                .map_or_else(String::new, |cgroup| format!(" in {cgroup}")),
            c.dead_peer_detection_seconds.map_or_else(
                || "ever".to_owned(),
                |seconds| format!("up to {}", duration(seconds))
            )
        ),
        if c.at_risk {
            "middlebox: AT RISK, keepalive waits longer than the idle limit the daemon was given \
             (--middlebox-idle-timeout); `kalive-daemon audit` names the fix"
                .to_owned()
        } else {
            "middlebox: not at risk (or no idle limit given)".to_owned()
        },
        format!(
            "probes sent {}, answered {}, outstanding {}/{}, send failures {}",
            c.probes_sent,
            c.probes_answered,
            c.probes_outstanding,
            ka.probes,
            c.probe_send_failures
        ),
        format!(
            "idle at last timer run {}, last probe {} ago, last timer run {} ago",
            duration(c.idle_seconds),
            opt(c.last_probe_age_seconds),
            opt(c.last_timer_run_age_seconds)
        ),
        format!(
            "reset received {}, last error {}, hook {}",
            if c.reset_received { "yes" } else { "no" },
            c.last_error.as_deref().unwrap_or("none"),
            c.hook_mode
        ),
    ];
    if let Some(ended) = &row.ended {
        lines.push(format!(
            "ended {} ago: {}{}",
            duration(app.last_update_unix_seconds.unwrap_or(0.0) - ended.at_unix_seconds),
            ended.outcome.name(),
            ended
                .error
                .as_ref()
                .map_or_else(String::new, |e| format!(" ({e})"))
        ));
    }
    lines.push(String::new());
    lines.push("history (newest first):".to_owned());
    let now = app.last_update_unix_seconds.unwrap_or(0.0);
    lines.extend(
        app.events_of(c.id)
            .map(|event| format!("  {}", event_text(event, now))),
    );
    lines
}

fn draw_detail(frame: &mut Frame, app: &App, row: &Row, area: Rect) {
    let width = area.width.saturating_sub(4).min(110);
    let height = area.height.saturating_sub(4).min(22);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    let lines: Vec<Line> = detail_lines(app, row).into_iter().map(Line::from).collect();
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" connection detail (Esc closes) "),
        ),
        popup,
    );
}

/// The whole snapshot as plain text: header, every row shown (no screen limit), recent outcomes.
pub(crate) fn plain_text(app: &App, source: &str) -> String {
    let mut out = String::new();
    for line in header_lines(app, source) {
        let text: String = line.iter().map(|span| span.content.as_ref()).collect();
        out.push_str(text.trim_end());
        out.push('\n');
    }
    let rows: Vec<&Row> = app.visible().collect();
    let widths = widths(rows.iter().copied());
    let mut push_row = |texts: [String; 10]| {
        let line: Vec<String> = texts
            .iter()
            .zip(widths)
            .map(|(text, width)| format!("{text:<width$}", width = usize::from(width)))
            .collect();
        out.push_str(line.join(" ").trim_end());
        out.push('\n');
    };
    push_row(Column::ALL.map(|column| column.title().to_owned()));
    for row in &rows {
        push_row(cells(row));
    }
    out.push_str("\nrecent outcomes, newest first:\n");
    let now = app.last_update_unix_seconds.unwrap_or(0.0);
    for event in app.events.iter().filter(|event| event_matches(app, event)) {
        out.push_str(&event_text(event, now));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use kalive_daemon::wire::EventKind;
    use kalive_testkit::fixtures::{
        connection_json as conn, event_json as event, events_page as events,
    };
    use ratatui::{backend::TestBackend, buffer::Buffer, Terminal};

    use super::*;
    use crate::top::test_snapshots::{sample, snapshot};

    /// The screen's text, one line per row, trailing spaces kept (a fixed-size grid).
    fn text(buffer: &Buffer) -> String {
        let area = buffer.area;
        let mut out = String::new();
        for y in 0..area.height {
            for x in 0..area.width {
                out.push_str(buffer[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn render(app: &mut App, width: u16, height: u16) -> (Buffer, usize) {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        let mut page = 0;
        terminal
            .draw(|frame| page = draw(frame, app, "http://127.0.0.1:9977"))
            .expect("draw");
        (terminal.backend().buffer().clone(), page)
    }

    /// A fixed data set: four live connections, one that ended dead, three events.
    fn fixed() -> App {
        let mut app = App::new(60.0);
        let probing = conn(5, 40005, "10.0.0.8:5432", PeerStateKind::Probing, 3);
        let mut dead = probing.clone();
        dead.peer_state = PeerStateKind::Dead;
        dead.peer_state_detail = "dead".into();
        app.apply(snapshot(
            1010.0,
            sample(),
            events(
                vec![
                    event(7, EventKind::Ended, dead, None, "dead"),
                    event(
                        6,
                        EventKind::PeerState,
                        probing.clone(),
                        Some("probing 2/3"),
                        "probing 3/3",
                    ),
                    event(
                        5,
                        EventKind::PeerState,
                        probing,
                        Some("probing 1/3"),
                        "probing 2/3",
                    ),
                ],
                false,
            ),
        ));
        app
    }

    #[test]
    fn full_screen_snapshot() {
        let (buffer, page) = render(&mut fixed(), 110, 26);
        let expected = "\
kalive top  http://127.0.0.1:9977  hook tracepoint  kernel 6.18.0  up 1h02m                                   
4 connections (2 probing, 1 ended recently)  probes/s -  timeouts 1  resets 2  events lost 0                  
┌ connections 1-5 of 5 ──────────────────────────────────────────────────────────────────────────────────────┐
│LOCAL           REMOTE          IDLE/INTVL/CNT  IDLE  PROBES  SENT  ANSW  LAST PROBE  STATE^      OWNER     │
│10.0.0.1:40005  10.0.0.8:5432   60s/10s/3       1m05s 3/3     8     5     5.0s        dead        -         │
│10.0.0.1:40004  [::1]:8080      60s/10s/3       1m04s 0/3     4     4     4.0s        rebooted    -         │
│10.0.0.1:40002  10.0.0.7:6379   60s/10s/3       1m02s 2/3     4     2     2.0s        probing 2/3 -         │
│10.0.0.1:40003  192.168.1.5:443 60s/10s/3       1m03s 1/3     4     3     3.0s        probing 1/3 -         │
│10.0.0.1:40001  10.0.0.9:5432   60s/10s/3       1m01s 0/3     1     1     1.0s        alive       -         │
│                                                                                                            │
│                                                                                                            │
│                                                                                                            │
│                                                                                                            │
│                                                                                                            │
│                                                                                                            │
└────────────────────────────────────────────────────────────────────────────────────────────────────────────┘
┌ recent outcomes, newest first ─────────────────────────────────────────────────────────────────────────────┐
│  3.0s ago  dead         10.0.0.1:40005 -> 10.0.0.8:5432  ETIMEDOUT                                         │
│  4.0s ago  probing 3/3  10.0.0.1:40005 -> 10.0.0.8:5432  was probing 2/3                                   │
│  5.0s ago  probing 2/3  10.0.0.1:40005 -> 10.0.0.8:5432  was probing 1/3                                   │
│                                                                                                            │
│                                                                                                            │
│                                                                                                            │
│                                                                                                            │
└────────────────────────────────────────────────────────────────────────────────────────────────────────────┘
q quit  up/down select  Enter detail  / filter  1-9 < > sort  r reverse  p pause                              
";
        assert_eq!(text(&buffer), expected);
        assert_eq!(page, 11);
        // States are coloured by name; the selected (first) row is reversed.
        let state_cell = |y: u16| buffer[(91, y)].fg;
        assert_eq!(state_cell(4), Color::Red);
        assert_eq!(state_cell(5), Color::Magenta);
        assert_eq!(state_cell(6), Color::Yellow);
        assert_eq!(state_cell(8), Color::Green);
        assert!(buffer[(1, 4)].modifier.contains(Modifier::REVERSED));
        assert!(!buffer[(1, 5)].modifier.contains(Modifier::REVERSED));
    }

    #[test]
    fn detail_filter_input_and_pause_are_drawn() {
        let mut app = fixed();
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE), 10);
        app.on_key(KeyEvent::new(KeyCode::Char('p'), KeyModifiers::NONE), 10);
        let (buffer, _) = render(&mut app, 110, 30);
        let screen = text(&buffer);
        assert!(screen.contains("PAUSED"), "{screen}");
        assert!(
            screen.contains("connection detail (Esc closes)"),
            "{screen}"
        );
        assert!(
            screen.contains("connection 5  (outbound, netns 4026531840)"),
            "{screen}"
        );
        assert!(
            screen.contains("ended 3.0s ago: dead (ETIMEDOUT)"),
            "{screen}"
        );
        assert!(screen.contains("probing 3/3  10.0.0.1:40005 -> 10.0.0.8:5432  was probing 2/3"));
        app.on_key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE), 10);
        for key in "/prob".chars() {
            app.on_key(KeyEvent::new(KeyCode::Char(key), KeyModifiers::NONE), 10);
        }
        let (buffer, _) = render(&mut app, 110, 30);
        let screen = text(&buffer);
        assert!(!screen.contains("connection detail"), "{screen}");
        assert!(
            screen.contains("filter: prob_  (Enter apply, Esc cancel)"),
            "{screen}"
        );
        app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE), 10);
        let (buffer, _) = render(&mut app, 110, 30);
        let screen = text(&buffer);
        assert!(screen.contains("connections 1-2 of 2"), "{screen}");
        assert!(screen.contains("filter: prob (Esc clears)"), "{screen}");
        // The events pane follows the filter: only the probing events are left.
        assert!(!screen.contains("ETIMEDOUT"), "{screen}");
    }

    #[test]
    fn scrolling_keeps_the_selection_on_screen_and_small_terminals_work() {
        let mut app = App::new(60.0);
        let many: Vec<_> = (1..=200)
            .map(|id| {
                conn(
                    id,
                    30_000 + id as u16,
                    "10.0.0.9:5432",
                    PeerStateKind::Alive,
                    0,
                )
            })
            .collect();
        app.apply(snapshot(1010.0, many, events(vec![], false)));
        let (_, page) = render(&mut app, 110, 26);
        app.on_key(KeyEvent::new(KeyCode::PageDown, KeyModifiers::NONE), page);
        app.on_key(KeyEvent::new(KeyCode::PageDown, KeyModifiers::NONE), page);
        let (buffer, _) = render(&mut app, 110, 26);
        let screen = text(&buffer);
        // Two pages of 11 down: row 23 selected, at the bottom of rows 13-23.
        assert!(screen.contains("connections 13-23 of 200"), "{screen}");
        assert!(screen.contains("10.0.0.1:30023"), "{screen}");
        app.on_key(KeyEvent::new(KeyCode::End, KeyModifiers::NONE), page);
        let (buffer, _) = render(&mut app, 110, 26);
        assert!(text(&buffer).contains("connections 190-200 of 200"));
        // Tiny terminals draw what fits (no events pane) without panicking.
        for (width, height) in [(20, 5), (1, 1), (110, 8), (40, 23)] {
            let (buffer, _) = render(&mut app, width, height);
            assert_eq!(buffer.area.width, width);
        }
    }

    #[test]
    fn plain_text_has_every_row_and_event() {
        let app = fixed();
        let text = plain_text(&app, "http://127.0.0.1:9977");
        let expected = "\
kalive top  http://127.0.0.1:9977  hook tracepoint  kernel 6.18.0  up 1h02m
4 connections (2 probing, 1 ended recently)  probes/s -  timeouts 1  resets 2  events lost 0
LOCAL           REMOTE          IDLE/INTVL/CNT  IDLE  PROBES  SENT  ANSW  LAST PROBE  STATE       OWNER
10.0.0.1:40005  10.0.0.8:5432   60s/10s/3       1m05s 3/3     8     5     5.0s        dead        -
10.0.0.1:40004  [::1]:8080      60s/10s/3       1m04s 0/3     4     4     4.0s        rebooted    -
10.0.0.1:40002  10.0.0.7:6379   60s/10s/3       1m02s 2/3     4     2     2.0s        probing 2/3 -
10.0.0.1:40003  192.168.1.5:443 60s/10s/3       1m03s 1/3     4     3     3.0s        probing 1/3 -
10.0.0.1:40001  10.0.0.9:5432   60s/10s/3       1m01s 0/3     1     1     1.0s        alive       -

recent outcomes, newest first:
  3.0s ago  dead         10.0.0.1:40005 -> 10.0.0.8:5432  ETIMEDOUT
  4.0s ago  probing 3/3  10.0.0.1:40005 -> 10.0.0.8:5432  was probing 2/3
  5.0s ago  probing 2/3  10.0.0.1:40005 -> 10.0.0.8:5432  was probing 1/3
";
        assert_eq!(text, expected);
    }

    #[test]
    fn durations_fit_a_narrow_column() {
        assert_eq!(duration(0.42), "0.4s");
        assert_eq!(duration(12.7), "12s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(7800.0), "2h10m");
        assert_eq!(duration(273_600.0), "3d04h");
        assert_eq!(duration(-1.0), "-");
        assert_eq!(duration(f64::NAN), "-");
    }
}
