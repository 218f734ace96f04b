//! `kalive-daemon top`, end to end: the real binary in tmux against a running daemon, while the
//! kernel takes one connection from alive through probing 1/3, 2/3, 3/3 to dead and another to
//! rebooted. The screen is read with `tmux capture-pane`; the probe counts it shows are compared
//! with the kernel's own TcpExt counters of each scenario's network namespace.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use kalive_testkit::{
    daemon::KillOnDrop,
    hidden_runs::{assert_runs_seen, HiddenRuns},
    netns::Netns,
    privilege::privileged,
    proc_net::{delta, tcp_ext, KernelDelta},
    sockets::{
        close_with_rst, connected_pair, detach_filter, drop_all_inbound, enable_keepalive, listen,
        wait_for_error, Keepalive,
    },
};

use crate::DAEMON as BIN;

/// Starts `kalive-daemon run` on a free port; returns it and its http://ADDR.
fn start_daemon() -> (KillOnDrop, String) {
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--web.listen-address",
            "127.0.0.1:0",
            "--quiet-probes",
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kalive-daemon");
    let stderr = child.stderr.take().expect("daemon stderr");
    let daemon = KillOnDrop(child);
    let (lines_tx, lines) = mpsc::channel::<String>();
    // Keep draining the log, so the daemon never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the daemon did not say where it serves within 30 s");
        assert!(!line.starts_with("error:"), "daemon failed: {line}");
        if let Some(rest) = line.split("serving http://").nth(1) {
            let address = rest.split("/metrics").next().expect("address");
            return (daemon, format!("http://{address}"));
        }
    }
}

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn command(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap_or_else(|err| {
                panic!("cannot run tmux (install it: `cargo xtask setup`): {err}")
            });
        assert!(
            output.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("kalive-top-test-{}", std::process::id()),
        };
        tmux.command(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "200",
            "-y",
            "50",
            command,
        ]);
        // Keep the pane after top exits, to read what it left on the terminal.
        tmux.command(&["set-option", "-t", "top", "remain-on-exit", "on"]);
        tmux
    }

    fn screen(&self) -> String {
        self.command(&["capture-pane", "-p", "-t", "top"])
    }

    fn type_text(&self, text: &str) {
        self.command(&["send-keys", "-t", "top", "-l", text]);
    }

    fn press(&self, key: &str) {
        self.command(&["send-keys", "-t", "top", key]);
    }

    /// Waits until the screen contains `text`; panics with the screen after `timeout`.
    fn wait_for(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} not on screen after {timeout:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The table row of the connection whose local port is `port`: (state, probes n/max, sent).
/// The state is every word between the last probe's age and the owner (the last column).
fn row(screen: &str, port: u16) -> Option<(String, String, u64)> {
    let local = format!("127.0.0.1:{port}");
    screen.lines().find_map(|line| {
        let tokens: Vec<&str> = line
            .trim_matches(|c: char| c == '│' || c.is_whitespace())
            .split_whitespace()
            .collect();
        (tokens.len() >= 10 && tokens[0] == local).then(|| {
            (
                tokens[8..tokens.len() - 1].join(" "),
                tokens[4].to_owned(),
                tokens[5].parse().unwrap_or(u64::MAX),
            )
        })
    })
}

/// `seen` holds `wanted` in order (other states may come between).
fn in_order(seen: &[String], wanted: &[&str]) -> bool {
    let mut wanted = wanted.iter().peekable();
    for state in seen {
        if wanted.peek().is_some_and(|w| *w == state) {
            wanted.next();
        }
    }
    wanted.peek().is_none()
}

/// What a scenario reports: the client's port, the kernel's counters and the socket error.
struct Outcome {
    kernel: KernelDelta,
    error: i32,
}

/// The peer sends a byte every 300 ms for `duration` and the client reads it: keepalive timer
/// runs find the connection busy (idle not reached, nothing probed), so kalive sees it alive.
fn chatter(client: &mut TcpStream, server: &mut TcpStream, duration: Duration) {
    let until = Instant::now() + duration;
    let mut byte = [0u8; 1];
    while Instant::now() < until {
        server.write_all(b"x").expect("peer write");
        client.read_exact(&mut byte).expect("client read");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn top_shows_probing_steps_then_dead_and_rebooted_as_the_kernel_does() {
    if !privileged("top_shows_probing_steps_then_dead_and_rebooted_as_the_kernel_does") {
        return;
    }
    let (daemon, endpoint) = start_daemon();
    let hidden = HiddenRuns::start();
    let dead_ns = Netns::new();
    let rebooted_ns = Netns::new();
    let tmux = Tmux::start(&format!("{BIN} top --endpoint {endpoint} --interval 0.25"));
    tmux.wait_for("kalive top", Duration::from_secs(10));
    // Only this test's namespaces: other tests may run keepalive connections of their own.
    let filter = format!("netns:{},{}", dead_ns.inum, rebooted_ns.inum);
    tmux.type_text(&format!("/{filter}"));
    tmux.press("Enter");
    tmux.wait_for(
        &format!("filter: {filter} (Esc clears)"),
        Duration::from_secs(5),
    );

    // Interval 2 s so each step stays on screen for 8 refreshes.
    let settings = |count| Keepalive {
        idle_s: 1,
        interval_s: 2,
        count,
    };
    let (ports_tx, ports) = mpsc::channel::<(&str, u16)>();
    let (dead, rebooted, history, last_screen) = std::thread::scope(|scope| {
        let dead_ports = ports_tx.clone();
        let dead = scope.spawn(|| {
            dead_ns.run(move || {
                let before = tcp_ext();
                let listener = listen("127.0.0.1:0");
                let (mut client, mut server) = connected_pair(&listener);
                enable_keepalive(&client, Some(settings(3)));
                let port = client.local_addr().expect("address").port();
                dead_ports.send(("dead", port)).expect("send port");
                // Busy, then the peer goes silent: every probe is lost.
                chatter(&mut client, &mut server, Duration::from_secs(3));
                drop_all_inbound(&client);
                let error =
                    wait_for_error(&client, Duration::from_secs(15), "the keepalive timeout");
                Outcome {
                    kernel: delta(&before, &tcp_ext()),
                    error,
                }
            })
        });
        let rebooted_ports = ports_tx.clone();
        let rebooted = scope.spawn(|| {
            rebooted_ns.run(move || {
                let before = tcp_ext();
                let listener = listen("127.0.0.1:0");
                let (mut client, mut server) = connected_pair(&listener);
                enable_keepalive(&client, Some(settings(5)));
                let port = client.local_addr().expect("address").port();
                rebooted_ports.send(("rebooted", port)).expect("send port");
                chatter(&mut client, &mut server, Duration::from_secs(3));
                // The peer crashes (its RST never arrives), one probe goes unanswered, then
                // it is back without the connection: the next probe is answered by RST.
                drop_all_inbound(&client);
                close_with_rst(server);
                std::thread::sleep(Duration::from_millis(2_000));
                detach_filter(&client);
                let error = wait_for_error(
                    &client,
                    Duration::from_secs(10),
                    "the RST answering a probe",
                );
                Outcome {
                    kernel: delta(&before, &tcp_ext()),
                    error,
                }
            })
        });
        let mut dead_port = 0;
        let mut rebooted_port = 0;
        for _ in 0..2 {
            match ports.recv_timeout(Duration::from_secs(10)).expect("port") {
                ("dead", port) => dead_port = port,
                (_, port) => rebooted_port = port,
            }
        }
        // Read the screen every 100 ms and note each state change of the two rows.
        let mut history: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        // The screen line of each change, printed at the end (what an operator saw).
        let mut seen_lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut screen;
        loop {
            screen = tmux.screen();
            for (seen, port) in history.iter_mut().zip([dead_port, rebooted_port]) {
                if let Some((state, _, _)) = row(&screen, port) {
                    if seen.last() != Some(&state) {
                        let local = format!("│127.0.0.1:{port} ");
                        seen_lines.extend(
                            screen
                                .lines()
                                .find(|line| line.starts_with(&local))
                                .map(|line| line.trim_end_matches([' ', '│']).to_owned()),
                        );
                        seen.push(state);
                    }
                }
            }
            let finished = history[0].last().is_some_and(|s| s == "dead")
                && history[1].last().is_some_and(|s| s == "rebooted")
                && dead.is_finished()
                && rebooted.is_finished();
            if finished || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // One more refresh, so the rows show the final counts.
        std::thread::sleep(Duration::from_millis(600));
        screen = tmux.screen();
        println!(
            "rows as each state first appeared:\n{}",
            seen_lines.join("\n")
        );
        let dead = dead.join().expect("dead scenario");
        let rebooted = rebooted.join().expect("rebooted scenario");
        (
            (dead, dead_port),
            (rebooted, rebooted_port),
            history,
            screen,
        )
    });
    let ((dead, dead_port), (rebooted, rebooted_port)) = (dead, rebooted);
    println!("screen at the end:\n{last_screen}");
    println!(
        "states seen: dead row {:?}, rebooted row {:?}",
        history[0], history[1]
    );

    // What the application saw, and what the kernel counted.
    assert_eq!(dead.error, libc::ETIMEDOUT);
    assert_eq!(rebooted.error, libc::ECONNRESET);
    assert_eq!(dead.kernel.aborts_on_timeout, 1);
    assert_eq!(rebooted.kernel.aborts_on_timeout, 0);

    // The done-when: alive, probing 1/3, 2/3, 3/3, dead; and alive, probing, rebooted.
    assert!(
        in_order(
            &history[0],
            &["alive", "probing 1/3", "probing 2/3", "probing 3/3", "dead"]
        ),
        "dead row went through {:?}\n{last_screen}",
        history[0]
    );
    assert!(
        in_order(&history[1], &["alive", "probing 1/5", "rebooted"]),
        "rebooted row went through {:?}\n{last_screen}",
        history[1]
    );
    // The rows' probe counts are the kernel's (TcpExt TCPKeepAlive of each namespace), but for
    // runs the host hid from BPF (hidden_runs).
    let hidden_runs = hidden.count();
    let (state, outstanding, dead_sent) = row(&last_screen, dead_port).expect("dead row");
    assert_eq!(state, "dead");
    assert_eq!(outstanding, "3/3");
    assert_runs_seen(
        dead_sent,
        dead.kernel.keepalive_probes,
        hidden_runs,
        "dead row SENT vs TcpExt",
    );
    let (state, _, rebooted_sent) = row(&last_screen, rebooted_port).expect("rebooted row");
    assert_eq!(state, "rebooted");
    assert_runs_seen(
        rebooted_sent,
        rebooted.kernel.keepalive_probes,
        hidden_runs,
        "rebooted row SENT vs TcpExt",
    );
    // The outcomes pane has both, with the socket errors.
    assert!(
        last_screen.lines().any(|line| line.contains(" dead ")
            && line.contains(&format!("127.0.0.1:{dead_port} ->"))
            && line.contains("ETIMEDOUT")),
        "{last_screen}"
    );
    assert!(
        last_screen.lines().any(|line| line.contains(" rebooted ")
            && line.contains(&format!("127.0.0.1:{rebooted_port} ->"))),
        "{last_screen}"
    );

    // A resize redraws at the new size at once.
    tmux.command(&["resize-window", "-t", "top", "-x", "120", "-y", "40"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let screen = tmux.screen();
        let border = screen
            .lines()
            .find(|line| line.starts_with("┌ connections"));
        if border.is_some_and(|line| line.chars().count() == 120) && screen.lines().count() >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not redrawn at 120x40:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // `q` quits and gives the terminal back (the pane stays, remain-on-exit, to be read).
    tmux.press("q");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux
        .command(&["display-message", "-p", "-t", "top", "#{pane_dead}"])
        .trim()
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "top did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let screen = tmux.screen();
    assert!(
        !screen.contains("recent outcomes") && !screen.contains("kalive top"),
        "the alternate screen was not left:\n{screen}"
    );

    // --once and --json give the same picture to scripts.
    let once = Command::new(BIN)
        .args(["top", "--once", "--endpoint", &endpoint, "--filter"])
        .arg(format!("netns:{}", dead_ns.inum))
        .output()
        .expect("top --once");
    let text = String::from_utf8_lossy(&once.stdout);
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let (state, _, sent) = row(&text, dead_port).expect("--once row");
    assert_eq!((state.as_str(), sent), ("dead", dead_sent), "{text}");
    let json = Command::new(BIN)
        .args(["top", "--json", "--endpoint", &endpoint, "--filter"])
        .arg(format!("netns:{}", rebooted_ns.inum))
        .output()
        .expect("top --json");
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let ended = value["events"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|event| event["kind"] == "ended")
        .expect("an ended event");
    assert_eq!(ended["outcome"], "rebooted");
    assert_eq!(ended["connection"]["local_port"], u64::from(rebooted_port));
    assert_eq!(ended["connection"]["probes_sent"], rebooted_sent);
    assert!(value["status"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    drop(daemon);
}
