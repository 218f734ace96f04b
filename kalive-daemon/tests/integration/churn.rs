//! Counting stays exact while the machine is busy with other TCP connections: each short-lived
//! connection fires the lifecycle tracepoints in process context, and a keepalive timer that
//! interrupts one of those programs used to lose its run (the kernel skips a classic tracepoint
//! program while any BPF program runs on the CPU). Checked against the namespace's TcpExt
//! counters, and kalive's count of skipped program runs against bpftool's `recursion_misses`.

use std::{
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use kalive_common::names;
use kalive_daemon::tracking::peer_state::PeerState;
use kalive_testkit::{
    bpftool,
    hidden_runs::assert_runs_seen,
    kalive::Kalive,
    privilege::tool,
    proc_net::{delta, tcp_ext},
    sockets::{
        close_with_rst, connected_pair, drop_all_inbound, enable_keepalive, listen, socket_error,
        Keepalive,
    },
};

const DEAD_CONNECTIONS: usize = 60;

const CHURN_THREADS: usize = 2;

#[test]
fn counts_stay_exact_under_connection_churn() {
    let test = "counts_stay_exact_under_connection_churn";
    let Some((kalive, netns)) = Kalive::start_in_netns(test) else {
        return;
    };
    if !tool(test, "bpftool") {
        return;
    }
    let settings = Keepalive {
        idle_s: 1,
        interval_s: 1,
        count: 3,
    };
    let (kernel, errors, churned) = netns.run(|| {
        let before = tcp_ext();
        let churn_listener = listen("127.0.0.1:0");
        let churn_address = churn_listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let churned = Arc::new(AtomicU64::new(0));
        let mut churners = Vec::new();
        {
            let stop = stop.clone();
            churners.push(std::thread::spawn(move || {
                churn_listener
                    .set_nonblocking(true)
                    .expect("non-blocking listener");
                while !stop.load(Ordering::Relaxed) {
                    match churn_listener.accept() {
                        Ok((accepted, _)) => drop(accepted),
                        Err(_) => std::thread::sleep(Duration::from_micros(200)),
                    }
                }
            }));
        }
        for _ in 0..CHURN_THREADS {
            let stop = stop.clone();
            let churned = churned.clone();
            churners.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(stream) = TcpStream::connect(churn_address) {
                        close_with_rst(stream);
                        churned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }

        let listener = listen("127.0.0.1:0");
        let pairs: Vec<_> = (0..DEAD_CONNECTIONS)
            .map(|_| {
                let (client, server) = connected_pair(&listener);
                enable_keepalive(&client, Some(settings));
                drop_all_inbound(&client);
                (client, server)
            })
            .collect();
        std::thread::sleep(Duration::from_secs(7));
        stop.store(true, Ordering::Relaxed);
        for churner in churners {
            churner.join().expect("churn thread");
        }
        let errors: Vec<i32> = pairs
            .iter()
            .map(|(client, _)| socket_error(client))
            .collect();
        (
            delta(&before, &tcp_ext()),
            errors,
            churned.load(Ordering::Relaxed),
        )
    });
    assert!(
        errors.iter().all(|error| *error == libc::ETIMEDOUT),
        "every client times out: {errors:?}"
    );
    assert_eq!(kernel.keepalive_probes, (DEAD_CONNECTIONS * 3) as u64);
    assert_eq!(kernel.aborts_on_timeout, DEAD_CONNECTIONS as u64);
    assert!(
        churned > 1_000,
        "only {churned} churn connections were made"
    );
    eprintln!("{churned} short connections ran alongside the keepalive timers");

    assert!(
        kalive.wait_for_outcomes(netns.inum, DEAD_CONNECTIONS, Duration::from_secs(10)),
        "kalive saw {} of {DEAD_CONNECTIONS} outcomes",
        kalive.ended(netns.inum).len()
    );
    kalive.assert_matches_kernel(netns.inum, kernel);
    let ended = kalive.ended(netns.inum);
    for e in &ended {
        assert_eq!(e.outcome, PeerState::Dead, "{e:?}");
        assert_eq!(e.error, libc::ETIMEDOUT, "{e:?}");
        assert!(e.connection.probes_sent <= 3, "{e:?}");
    }
    // Three probes each, but for runs the host hid from BPF (hidden_runs).
    assert_runs_seen(
        ended.iter().map(|e| e.connection.probes_sent).sum(),
        kernel.keepalive_probes,
        kalive.hidden_runs(),
        "probes of the dead connections vs TCPKeepAlive",
    );
    assert_eq!(kalive.kernel_drops(), 0, "no kernel-side drops");

    // kalive's count of skipped runs is the kernel's recursion_misses of its programs (the ones
    // this process holds, as bpftool lists them).
    let programs = bpftool::programs_of(std::process::id());
    assert!(!programs.is_empty(), "this process holds no BPF program");
    for program in &programs {
        // The kernel keeps 15 characters of a name; bpftool may restore the rest from BTF.
        assert!(
            !program.name.is_empty()
                && names::ALL_PROGRAMS
                    .iter()
                    .any(|name| name.starts_with(&program.name)),
            "program {} is {:?}, not one of kalive's",
            program.id,
            program.name
        );
    }
    let from_bpftool: u64 = programs
        .iter()
        .map(|program| program.recursion_misses)
        .sum();
    assert!(
        kalive.wait_for(Duration::from_secs(3), |collected| {
            collected.stats.programs_skipped.values().sum::<u64>() == from_bpftool
        }),
        "kalive's skipped runs differ from bpftool's recursion_misses {from_bpftool}"
    );
}
