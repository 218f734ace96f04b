//! `kalive-daemon top`: a full-screen live view of a running daemon (or of an in-process
//! collector with `--standalone`).
//!
//! - `app`: the state (rows, events, sort, filter, selection, pause), unit-tested;
//! - `ui`: drawing with ratatui, and the plain text of `--once`;
//! - `source`: the daemon's HTTP API or the in-process collector, fetched on a thread of its own.
//!
//! Data arrives as `app::Update`s over a channel; the loop is a `tokio::select!` of a tick, the
//! data and the keys; the terminal is restored by a guard's Drop and by a panic hook.

pub mod app;
pub mod source;
pub mod ui;

use std::{
    io::{IsTerminal as _, Write as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Once,
    },
    time::Duration,
};

use crossterm::event::Event;
use ratatui::{backend::CrosstermBackend, Terminal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::{
    app::{Action, App, Sort, Update},
    source::{HttpSource, LocalSource, Source, PASSWORD_ENV},
};
use crate::{
    cli::TopArgs,
    collector::{Collector, CollectorError, CollectorOptions},
    metrics::SeriesOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The data source failed; the message names the cause and the fix.
    #[error("{0}")]
    Source(String),
    #[error(
        "--standalone loads eBPF programs and needs root: run `sudo kalive-daemon top \
         --standalone`, or start a daemon with `sudo kalive-daemon run` and run \
         `kalive-daemon top` as any user"
    )]
    StandaloneNeedsRoot,
    #[error("the in-process collector could not start: {0}")]
    Collector(#[source] CollectorError),
    #[error("--user {0} needs the password in the environment variable {PASSWORD_ENV}")]
    NoPassword(String),
    #[error(
        "standard output is not a terminal, so the live view cannot run: use --once for a \
         plain-text snapshot or --json for JSON"
    )]
    NotATerminal,
    #[error("--filter {text:?}: {reason}")]
    Filter { text: String, reason: String },
    #[error("driving the terminal failed: {0}; --once prints a plain-text snapshot instead")]
    Terminal(#[source] std::io::Error),
    #[error("writing the snapshot failed: {0}")]
    Output(#[source] std::io::Error),
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `kalive-daemon top`. Must run inside a multi-threaded tokio runtime.
pub async fn run(args: TopArgs) -> Result<(), TopError> {
    let mut app = App::new(args.linger);
    app.sort = Sort {
        column: args.sort,
        descending: false,
    };
    if !app.set_filter(&args.filter) {
        return Err(TopError::Filter {
            text: args.filter.clone(),
            reason: app.filter_error.take().unwrap_or_default(),
        });
    }
    let cancel = CancellationToken::new();
    let mut collector = None;
    let mut source: Box<dyn Source> = if args.standalone {
        if !is_root() {
            return Err(TopError::StandaloneNeedsRoot);
        }
        let started = Collector::start(
            CollectorOptions {
                hook_mode: args.hook_mode,
                history_limit: 10_000,
                log_probes: false,
                series: SeriesOptions::default(),
            },
            cancel.clone(),
        )
        .map_err(TopError::Collector)?;
        let local = LocalSource::new(started.state.clone());
        collector = Some(started);
        Box::new(local)
    } else {
        let user = match &args.user {
            Some(user) => Some((
                user.clone(),
                std::env::var(PASSWORD_ENV).map_err(|_| TopError::NoPassword(user.clone()))?,
            )),
            None => None,
        };
        Box::new(HttpSource::new(&args.endpoint, user).map_err(TopError::Source)?)
    };
    let described = source.describe();

    if args.standalone && (args.once || args.json) {
        // A collector just started has seen nothing yet: give the timers one interval.
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
    // The first snapshot decides: an absent daemon is an error before the screen changes.
    let (first, source) = tokio::task::spawn_blocking(move || (source.fetch(), source))
        .await
        .map_err(|err| TopError::Source(format!("fetching the first snapshot failed: {err}")))?;
    let first = first.map_err(TopError::Source)?;

    let result = if args.once || args.json {
        print_once(app, first, &described, args.json)
    } else if !std::io::stdout().is_terminal() {
        Err(TopError::NotATerminal)
    } else {
        app.apply(Box::new(first));
        live(
            app,
            source,
            &described,
            Duration::from_secs_f64(args.interval),
        )
        .await
    };
    if let Some(collector) = collector {
        cancel.cancel();
        if let Err(err) = collector.wait().await {
            log::warn!("the in-process collector stopped with an error: {err}");
        }
    }
    result
}

/// `--once` and `--json`: one snapshot, filtered like the view, to standard output.
fn print_once(
    mut app: App,
    mut snapshot: app::Snapshot,
    source: &str,
    json: bool,
) -> Result<(), TopError> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let filter = app.filter.clone();
        snapshot
            .connections
            .connections
            .retain(|conn| filter.matches(&app::Row::live(conn.clone())));
        snapshot
            .events
            .events
            .retain(|event| filter.matches(&app::Row::from_event(event)));
        serde_json::to_writer_pretty(&mut stdout, &snapshot)
            .map_err(|err| TopError::Output(err.into()))?;
        writeln!(stdout).map_err(TopError::Output)
    } else {
        app.apply(Box::new(snapshot));
        stdout
            .write_all(ui::plain_text(&app, source).as_bytes())
            .map_err(TopError::Output)
    }
}

/// Leaves raw mode and the alternate screen; safe to call more than once.
fn restore_terminal() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = crossterm::execute!(
        std::io::stdout(),
        crossterm::terminal::LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// Restores the terminal on every exit path: Drop, and a panic hook installed once.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> Result<(TerminalGuard, Terminal<CrosstermBackend<std::io::Stdout>>), TopError> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        crossterm::terminal::enable_raw_mode().map_err(TopError::Terminal)?;
        let guard = TerminalGuard;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )
        .map_err(TopError::Terminal)?;
        let terminal =
            Terminal::new(CrosstermBackend::new(std::io::stdout())).map_err(TopError::Terminal)?;
        Ok((guard, terminal))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Reads terminal events on a thread of its own until `stop` (polling, so it notices).
fn spawn_input(
    events: mpsc::UnboundedSender<std::io::Result<Event>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kalive-top-keys".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let event = match crossterm::event::poll(Duration::from_millis(100)) {
                    Ok(false) => continue,
                    Ok(true) => crossterm::event::read(),
                    Err(err) => Err(err),
                };
                let failed = event.is_err();
                if events.send(event).is_err() || failed {
                    return;
                }
            }
        })
}

/// The full-screen loop.
async fn live(
    mut app: App,
    source: Box<dyn Source>,
    described: &str,
    interval: Duration,
) -> Result<(), TopError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (data_tx, mut data) = mpsc::channel::<Update>(2);
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    let fetcher = source::spawn_fetcher(source, interval, data_tx, stop.clone())
        .map_err(TopError::Terminal)?;
    let (guard, mut terminal) = TerminalGuard::enter()?;
    let input = spawn_input(keys_tx, stop.clone()).map_err(TopError::Terminal)?;
    // Redraw at the refresh rate even without data, so a stalled source shows its age.
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut page = 10;
    let result = loop {
        if let Err(err) = terminal.draw(|frame| page = ui::draw(frame, &app, described)) {
            break Err(TopError::Terminal(err));
        }
        tokio::select! {
            _ = tick.tick() => {}
            update = data.recv() => match update {
                Some(update) => app.update(update),
                None => break Err(TopError::Source("the data source stopped".into())),
            },
            event = keys.recv() => match event {
                Some(Ok(Event::Key(key))) => {
                    if app.on_key(key, page) == Action::Quit {
                        break Ok(());
                    }
                }
                Some(Ok(Event::Resize(_, _))) => {
                    if let Err(err) = terminal.autoresize() {
                        break Err(TopError::Terminal(err));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => break Err(TopError::Terminal(err)),
                None => break Err(TopError::Terminal(std::io::Error::other("the key reader stopped"))),
            },
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(data);
    drop(guard);
    let _ = input.join();
    // The fetcher notices `stop` (or the closed channel) after its current fetch; not waited
    // for, so a slow daemon does not delay quitting.
    drop(fetcher);
    result
}
