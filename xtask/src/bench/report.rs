//! The markdown section: the figures against their targets, and its place in
//! docs/benchmarks.md between the marker comments.

use std::{collections::BTreeSet, fmt::Write as _, fs};

use anyhow::{Context, Result};

use super::{
    cell_rounds::CellResult, daemon::Start, ebpf_log::LogResult, ebpf_log_report::render_log_cost,
    foreign::Foreign, storm::StormResult, Host, HOOK_MODE,
};
use crate::workspace_root;

pub(super) const DOC: &str = "docs/benchmarks.md";
const START_MARKER: &str = "<!-- xtask bench start -->";
const END_MARKER: &str = "<!-- xtask bench end -->";
/// A cell counts for a program's verdict when the program ran at least this often there (the
/// churn drove it); rarer runs are shown in parentheses (cold caches, a few samples).
const MIN_RUNS_PER_SECOND: f64 = 10.0;

/// The kalive programs that see every TCP socket's resets, errors, state changes and ends
/// (`kalive_common::names::PROG_TP_*`; xtask does not depend on the kernel crates). Their target:
/// at most 300 ns per run for a socket kalive does not track.
pub(super) const SOCKET_EVENT_PROGRAMS: [&str; 6] = [
    "tcp_send_reset_with_reason",
    "tcp_send_reset",
    "tcp_receive_reset",
    "inet_sk_error_report",
    "inet_sock_set_state",
    "tcp_destroy_sock",
];
/// The tracepoint-mode programs around every timer_list run of the host
/// (`names::PROG_TP_TIMER_ENTRY` / `PROG_TP_TIMER_EXIT`). Target: together at most 50 ns added
/// per timer that is not a keepalive timer.
pub(super) const TIMER_PROGRAMS: [&str; 2] = ["timer_expire_entry", "timer_expire_exit"];
const SOCKET_EVENT_TARGET_NS: f64 = 300.0;
const TIMER_TARGET_NS: f64 = 50.0;
const RATIO_TARGET: f64 = 0.97;
const CPU_TARGET_PERCENT: f64 = 2.0;
const RSS_TARGET_BYTES: f64 = 30e6;

pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The largest of `values`, if any.
fn worst(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::max)
}

/// "met (worst N ns)" or "not met (...)" against `target_ns`.
fn worst_verdict(worst: Option<f64>, target_ns: f64) -> String {
    match worst {
        Some(worst) => format!("{} (worst {worst:.0} ns)", verdict(worst <= target_ns)),
        None => format!("not measured (fewer than {MIN_RUNS_PER_SECOND} runs a second)"),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

/// Everything the section shows.
pub(super) struct Rendered<'a> {
    pub(super) host: &'a Host,
    pub(super) hook_mode: &'a str,
    pub(super) rounds: u32,
    pub(super) seconds: f64,
    pub(super) clock_ticks: f64,
    pub(super) results: &'a [CellResult],
    pub(super) log_results: &'a [LogResult],
    pub(super) starts: &'a [Start],
    pub(super) clocksource: &'a str,
    pub(super) foreign: Foreign,
    pub(super) storm: &'a StormResult,
}

/// The markdown section, between its markers.
pub(super) fn render(r: &Rendered<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{START_MARKER}");
    let _ = writeln!(out, "## Cost on this host (`cargo xtask bench`)\n");
    let _ = writeln!(
        out,
        "`cargo xtask bench` (as root; `--smoke` for a quick check that writes nothing) churns \
         short loopback connections (`kalive-testkit/src/bin/churn.rs`: 2 client threads \
         connect, 2 acceptor threads accept and close at once, each client waits for the close; \
         a network namespace of its own) without and with the release `kalive-daemon run \
         --hook-mode {HOOK_MODE} --quiet-probes --ebpf-log off`, in alternating order. The \
         daemon is started for each round with it and stopped (SIGTERM) after it; bpftool \
         confirms its programs \
         are gone before a round without it. kalive tracks none of these connections (with \
         keepalive on, TCP_KEEPIDLE is 600 s and the timer never runs), so every figure is the \
         cost of untracked sockets and of the host's other timers. Per-program figures are \
         bpftool's run_time_ns / run_cnt with kernel.bpf_stats_enabled=1, which is on only \
         during the rounds with the daemon (its clock reads are part of those rounds' cost)."
    );
    let _ = writeln!(
        out,
        "\n{}: Linux {}, {} CPUs ({}, clocksource {}), hook mode {}, {} round(s) of {} s per \
         cell and side; **shared machine** (another engineer's builds and tests ran at the same \
         time, so the churn rates are noisy).\n",
        r.host.date,
        r.host.kernel,
        r.host.cpus,
        r.host.cpu_model,
        r.clocksource,
        r.hook_mode,
        r.rounds,
        r.seconds
    );

    let _ = writeln!(out, "### Connection churn\n");
    let _ = writeln!(
        out,
        "| cell | without daemon (median conn/s) | with daemon (median conn/s) | ratio | target \
         | |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for result in r.results {
        let (without, with) = (median(&result.without), median(&result.with));
        let ratio = with / without;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {ratio:.3} | >= {RATIO_TARGET} | {} |",
            result.cell.label(),
            without,
            with,
            verdict(ratio >= RATIO_TARGET)
        );
    }
    let errors: u64 = r.results.iter().map(|result| result.connect_errors).sum();
    if errors > 0 {
        let _ = writeln!(
            out,
            "\nThe clients' connect(2) failed {errors} time(s) in all (counted, not as \
             connections)."
        );
    }
    if r.foreign.without_rounds + r.foreign.with_rounds > 0 {
        let rounds = r.rounds as usize * r.results.len();
        let _ = writeln!(
            out,
            "\nAnother process (a test) had kalive programs loaded in {} of {rounds} rounds \
             without and {} of {rounds} rounds with the daemon: rounds without are slowed by them \
             too, which flatters the ratio, and keepalive connections that process made ran \
             through this daemon's timer programs as well.",
            r.foreign.without_rounds, r.foreign.with_rounds
        );
    }

    let _ = writeln!(
        out,
        "\n### Per program (mean ns per run, runs per second)\n"
    );
    let _ = write!(out, "| program |");
    for result in r.results {
        let _ = write!(out, " {} |", result.cell.label());
    }
    let _ = writeln!(out, " target | |");
    let _ = writeln!(out, "|---|{}---|---|", "---|".repeat(r.results.len()));
    // Runs too rare to say much (cold caches, a few samples) are shown in parentheses and left
    // out of the verdict.
    let counted = |&(_, per_second): &(f64, f64)| per_second >= MIN_RUNS_PER_SECOND;
    let cell_text = |figure: Option<(f64, f64)>| match figure {
        Some(figure @ (ns, per_second)) if counted(&figure) => {
            format!("{ns:.0} ns, {per_second:.0}/s")
        }
        Some((ns, per_second)) => format!("({ns:.0} ns, {per_second:.1}/s)"),
        None => "no runs".to_owned(),
    };
    let mut names: Vec<&str> = SOCKET_EVENT_PROGRAMS
        .iter()
        .chain(TIMER_PROGRAMS.iter())
        .copied()
        .collect();
    // Any program the daemon held that these lists do not name (a newer kalive) is shown too.
    let mut others: BTreeSet<&str> = BTreeSet::new();
    for result in r.results {
        others.extend(result.programs.keys().map(String::as_str));
    }
    others.retain(|name| !names.contains(name));
    names.extend(others);
    for name in names {
        if !r
            .results
            .iter()
            .any(|result| result.programs.contains_key(name))
        {
            continue;
        }
        let figures: Vec<Option<(f64, f64)>> = r
            .results
            .iter()
            .map(|result| result.program(name))
            .collect();
        let worst = worst(
            figures
                .iter()
                .flatten()
                .filter(|figure| counted(figure))
                .map(|&(ns, _)| ns),
        );
        let (target, mark) = if SOCKET_EVENT_PROGRAMS.contains(&name) {
            (
                format!("<= {SOCKET_EVENT_TARGET_NS:.0} ns"),
                worst_verdict(worst, SOCKET_EVENT_TARGET_NS),
            )
        } else if TIMER_PROGRAMS.contains(&name) {
            ("summed below".to_owned(), String::new())
        } else {
            ("none set".to_owned(), String::new())
        };
        let _ = write!(out, "| {name} |");
        for figure in &figures {
            let _ = write!(out, " {} |", cell_text(*figure));
        }
        let _ = writeln!(out, " {target} | {mark} |");
    }
    // Every timer_list run passes through both programs: their sum is what a timer pays.
    let per_timer: Vec<Option<(f64, f64)>> = r
        .results
        .iter()
        .map(|result| {
            let (entry_ns, per_second) = result.program(TIMER_PROGRAMS[0])?;
            let (exit_ns, _) = result.program(TIMER_PROGRAMS[1])?;
            Some((entry_ns + exit_ns, per_second))
        })
        .collect();
    let _ = write!(out, "| **timer_expire_entry + exit, per timer** |");
    for figure in &per_timer {
        let _ = write!(out, " {} |", cell_text(*figure));
    }
    let worst_timer = worst(
        per_timer
            .iter()
            .flatten()
            .filter(|figure| counted(figure))
            .map(|&(ns, _)| ns),
    );
    let _ = writeln!(
        out,
        " <= {TIMER_TARGET_NS:.0} ns | {} |",
        worst_verdict(worst_timer, TIMER_TARGET_NS)
    );
    let _ = writeln!(
        out,
        "\nThe timer programs run for every timer_list timer of the host, nearly all of them not \
         keepalive timers, so their mean is the cost of a timer kalive does not care about. \
         bpf_stats count the programs' own run time, not the tracepoint's call into them. A cell \
         counts for a verdict when the program ran at least {MIN_RUNS_PER_SECOND} times a \
         second there; rarer runs are in parentheses."
    );

    let _ = writeln!(out, "\n### Daemon\n");
    let _ = writeln!(out, "| figure | measured | target | |");
    let _ = writeln!(out, "|---|---|---|---|");
    for result in r.results {
        let percent = result.cpu_ticks as f64 / r.clock_ticks / result.window_s * 100.0;
        let _ = writeln!(
            out,
            "| CPU while churning ({}) | {percent:.2} % of a core ({} ticks in {:.1} s) | < \
             {CPU_TARGET_PERCENT} % | {} |",
            result.cell.label(),
            result.cpu_ticks,
            result.window_s,
            verdict(percent < CPU_TARGET_PERCENT)
        );
    }
    let rss: Vec<f64> = r.starts.iter().map(|start| start.rss_kb as f64).collect();
    let anon: Vec<f64> = r.starts.iter().map(|start| start.anon_kb as f64).collect();
    let startup: Vec<f64> = r
        .starts
        .iter()
        .map(|start| start.startup.as_secs_f64() * 1e3)
        .collect();
    let range = |values: &[f64]| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    };
    let rss_mb = |kb: f64| kb * 1024.0 / 1e6;
    let (rss_min, rss_max) = range(&rss);
    let _ = writeln!(
        out,
        "| VmRSS at rest, right after start, nothing tracked (median of {} starts) | {:.1} MB \
         ({:.1}–{:.1}) | < {:.0} MB | {} |",
        r.starts.len(),
        rss_mb(median(&rss)),
        rss_mb(rss_min),
        rss_mb(rss_max),
        RSS_TARGET_BYTES / 1e6,
        verdict(rss_max * 1024.0 < RSS_TARGET_BYTES)
    );
    let _ = writeln!(
        out,
        "| RssAnon at rest (median) | {:.1} MB | | |",
        rss_mb(median(&anon))
    );
    let (startup_min, startup_max) = range(&startup);
    let _ = writeln!(
        out,
        "| start-up, spawn to attached (median) | {:.0} ms ({startup_min:.0}–{startup_max:.0}) \
         | | |",
        median(&startup)
    );
    render_log_cost(&mut out, r);
    r.storm.render(&mut out);
    let _ = writeln!(out, "\n{END_MARKER}");
    out
}

/// Puts `section` into docs/benchmarks.md in place of the previous one, or at the end.
pub(super) fn write_section(section: &str) -> Result<()> {
    let path = workspace_root().join(DOC);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: run from a kalive checkout", path.display()))?;
    fs::write(&path, replace_section(&text, section))
        .with_context(|| format!("cannot write {}: check its permissions", path.display()))
}

fn replace_section(text: &str, section: &str) -> String {
    if let (Some(start), Some(end)) = (text.find(START_MARKER), text.find(END_MARKER)) {
        if start < end {
            let after = &text[end + END_MARKER.len()..];
            return format!("{}{}{}", &text[..start], section.trim_end(), after);
        }
    }
    format!("{}\n\n{}", text.trim_end(), section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_its_own_section_only() {
        let section = format!("{START_MARKER}\nnew\n{END_MARKER}\n");
        let first = replace_section("# Benchmarks\n\n## HTTP\ntext\n", &section);
        assert_eq!(first, format!("# Benchmarks\n\n## HTTP\ntext\n\n{section}"));
        let again = replace_section(&first, &section.replace("new", "newer"));
        assert_eq!(again, first.replace("new", "newer"));
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
