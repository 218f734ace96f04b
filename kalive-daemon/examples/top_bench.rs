//! How `kalive-daemon top` scales with the number of connections: the work of one refresh
//! (decoding the API's JSON, folding it into the App state, drawing a frame on ratatui's
//! TestBackend) and of one key (sorting by another column, filtering), with 100 and 10,000
//! connections in the same run. Prints a Markdown table of medians.
//!
//! `cargo run --release -p kalive-daemon --example top_bench`

use std::{hint::black_box, time::Instant};

use kalive_daemon::{
    api::{ConnectionJson, ConnectionsJson, EventsJson, KeepaliveJson, StatusJson},
    top::{
        app::{App, Column, Snapshot, Sort},
        ui,
    },
};
use ratatui::{backend::TestBackend, Terminal};

const STATES: [(&str, u32); 6] = [
    ("alive", 0),
    ("alive", 0),
    ("alive", 0),
    ("probing", 1),
    ("probing", 2),
    ("rebooted", 0),
];

fn connection(id: u64) -> ConnectionJson {
    let (state, outstanding) = STATES[id as usize % STATES.len()];
    ConnectionJson {
        id,
        netns: 4026531840,
        direction: "outbound".into(),
        local_addr: format!("10.{}.{}.{}", id % 7, id / 256 % 256, id % 256),
        local_port: 30_000 + (id % 30_000) as u16,
        remote_addr: format!("192.168.{}.{}", id / 256 % 256, id % 251),
        remote_port: [443, 5432, 6379, 8080][id as usize % 4],
        keepalive: KeepaliveJson {
            enabled: true,
            idle_seconds: 60.0,
            interval_seconds: 10.0,
            probes: 3,
            user_timeout_seconds: None,
        },
        probes_sent: id % 97,
        probes_answered: id % 89,
        probes_outstanding: outstanding,
        probe_send_failures: 0,
        last_probe_unix_seconds: Some(1_000_000.0 - (id % 300) as f64),
        last_probe_age_seconds: Some((id % 300) as f64),
        idle_seconds: (id % 3600) as f64,
        last_timer_run_age_seconds: Some((id % 60) as f64),
        first_seen_unix_seconds: 999_000.0,
        peer_state: state.into(),
        peer_state_detail: if state == "probing" {
            format!("probing {outstanding}/3")
        } else {
            state.to_owned()
        },
        reset_received: state == "rebooted",
        last_error: None,
        hook_mode: "tracepoint".into(),
    }
}

/// The API's answer for `n` connections, as the daemon sends it.
fn body(n: u64) -> String {
    let connections: Vec<ConnectionJson> = (1..=n).map(connection).collect();
    serde_json::to_string(&ConnectionsJson {
        hook_mode: "tracepoint".into(),
        total: n as usize,
        returned: n as usize,
        truncated: false,
        limit: 100_000,
        connections,
    })
    .expect("encode")
}

fn snapshot(connections: ConnectionsJson, taken: f64) -> Box<Snapshot> {
    Box::new(Snapshot {
        taken_unix_seconds: taken,
        status: Some(StatusJson {
            version: "0.1.0".into(),
            hook_mode: "tracepoint".into(),
            kernel: "6.18.0".into(),
            started_unix_seconds: Some(0.0),
            uptime_seconds: Some(taken),
            connections: connections.total,
            probes_sent: taken as u64,
            probes_answered: 0,
            probe_send_failures: 0,
            keepalive_timeouts: 0,
            resets_received: 0,
            events_lost: 0,
        }),
        connections,
        events: EventsJson {
            next_since: 0,
            oldest_seq: None,
            gap: false,
            truncated: false,
            events: Vec::new(),
        },
    })
}

/// Median milliseconds of `runs` calls of `work`.
fn median_ms(runs: usize, mut work: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let runs = 21;
    println!("| connections | JSON body | decode | apply (sort, filter) | draw 200x50 | refresh total | sort key | filter key |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [100u64, 10_000] {
        let text = body(n);
        let decoded: ConnectionsJson = serde_json::from_str(&text).expect("decode");
        let decode = median_ms(runs, || {
            black_box(serde_json::from_str::<ConnectionsJson>(black_box(&text)).expect("decode"));
        });
        let mut app = App::new(60.0);
        let mut taken = 1.0;
        let apply = median_ms(runs, || {
            taken += 1.0;
            app.apply(snapshot(decoded.clone(), taken));
        });
        let mut terminal = Terminal::new(TestBackend::new(200, 50)).expect("terminal");
        let draw = median_ms(runs, || {
            terminal
                .draw(|frame| {
                    black_box(ui::draw(frame, &app, "http://127.0.0.1:9977"));
                })
                .expect("draw");
        });
        let mut column = 0;
        let sort = median_ms(runs, || {
            column = (column + 1) % Column::ALL.len();
            app.set_sort(Sort {
                column: Column::ALL[column],
                descending: false,
            });
        });
        let mut flip = false;
        let filter = median_ms(runs, || {
            flip = !flip;
            app.set_filter(if flip { "port:443 prob" } else { "" });
        });
        // The clone inside `apply` is the benchmark's, not the view's: subtract it.
        let clone = median_ms(runs, || {
            black_box(decoded.clone());
        });
        let apply = (apply - clone).max(0.0);
        println!(
            "| {n} | {:.1} MB | {decode:.2} ms | {apply:.2} ms | {draw:.2} ms | {:.2} ms | {sort:.2} ms | {filter:.2} ms |",
            text.len() as f64 / 1e6,
            decode + apply + draw
        );
    }
}
