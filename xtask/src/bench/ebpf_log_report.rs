//! The `--ebpf-log` part of the section: off against debug, per program, and its verdict.

use std::{collections::BTreeSet, fmt::Write as _};

use super::{
    bpftool::LOG_FUNCTIONS,
    ebpf_log::{LogResult, ProgramCost},
    report::{median, Rendered, SOCKET_EVENT_PROGRAMS, TIMER_PROGRAMS},
    workload::HOLD_CONNECTIONS,
};

/// The `--ebpf-log` table: off against debug, per program.
pub(super) fn render_log_cost(out: &mut String, r: &Rendered<'_>) {
    let [off, debug] = r.log_results else {
        return;
    };
    let _ = writeln!(out, "\n### Kernel log (`--ebpf-log`) cost\n");
    let _ = writeln!(
        out,
        "The daemon as above with `--ebpf-log off` (the default) and with `--ebpf-log debug` \
         (each keepalive run's decision logged), {} alternating round(s) of {} s each, \
         bpf_stats on during each; the workload is `churn --hold {HOLD_CONNECTIONS} --close rst \
         --keepalive off`: {HOLD_CONNECTIONS} held loopback keepalive connections (TCP_KEEPIDLE 1, \
         TCP_KEEPINTVL 1, TCP_KEEPCNT 9 on the client, every probe answered) in a namespace of \
         their own, so the keepalive timer runs about {HOLD_CONNECTIONS} times a second, plus the \
         RST churn above for the reset and close programs. With `off`, aya-log's level is a \
         constant the verifier sees, and it removes the log calls at load as dead code: the \
         translated programs are smaller (`bytes_xlated` and `bytes_jited` of `bpftool prog \
         show`), and of kalive's log functions ({}) only a stub is left (its instructions in \
         `bpftool prog dump xlated` are counted: a call, the level's load, a return). Mean ns per \
         run are over all rounds, with the lowest and highest round's mean in parentheses: a \
         difference inside them is noise. This compares `off` with `debug`, not with a build \
         without aya-log.\n",
        off.windows.len(),
        r.seconds,
        LOG_FUNCTIONS.join(", ")
    );
    let _ = writeln!(
        out,
        "| program | off: ns per run, runs/s | debug: ns per run, runs/s | debug − off | \
         translated bytes, off / debug | JITed bytes, off / debug | log-function instructions \
         left, off / debug | |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let cost_text = |cost: Option<ProgramCost>| match cost {
        Some(cost) => format!(
            "{:.0} ns ({:.0}–{:.0}), {:.0}/s",
            cost.ns, cost.lowest, cost.highest, cost.per_second
        ),
        None => "no runs".to_owned(),
    };
    let mut names: Vec<&str> = TIMER_PROGRAMS
        .iter()
        .chain(SOCKET_EVENT_PROGRAMS.iter())
        .copied()
        .collect();
    let mut others: BTreeSet<&str> = off.sizes.keys().map(String::as_str).collect();
    others.extend(debug.sizes.keys().map(String::as_str));
    others.retain(|name| !names.contains(name));
    names.extend(others);
    let (mut smaller, mut sized, mut not_slower, mut within, mut beyond) = (0, 0, 0, 0, 0);
    for name in names {
        if !off.sizes.contains_key(name) && !debug.sizes.contains_key(name) {
            continue;
        }
        let (off_cost, debug_cost) = (off.program(name), debug.program(name));
        let size = |result: &LogResult| result.size(name).unwrap_or_default();
        let ((off_xlated, off_jited), (debug_xlated, debug_jited)) = (size(off), size(debug));
        let left = |result: &LogResult| {
            result
                .log_instructions
                .get(name)
                .map_or_else(|| "?".to_owned(), u64::to_string)
        };
        let mut marks = Vec::new();
        if let (Some(off_bytes), Some(debug_bytes)) = (off.xlated(name), debug.xlated(name)) {
            sized += 1;
            if off_bytes < debug_bytes {
                smaller += 1;
                marks.push(format!(
                    "log code removed at load ({} bytes fewer)",
                    debug_bytes - off_bytes
                ));
            } else {
                marks.push("not smaller under off: the log code was not removed".to_owned());
            }
        }
        let difference = match (off_cost, debug_cost) {
            (Some(off_cost), Some(debug_cost)) => {
                let (mark, count) = log_verdict(off_cost, debug_cost);
                match count {
                    LogVerdict::NotSlower => not_slower += 1,
                    LogVerdict::WithinNoise => within += 1,
                    LogVerdict::Slower => beyond += 1,
                }
                marks.push(mark);
                format!("{:+.0} ns", debug_cost.ns - off_cost.ns)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {difference} | {off_xlated} / {debug_xlated} | {off_jited} / \
             {debug_jited} | {} / {} | {} |",
            cost_text(off_cost),
            cost_text(debug_cost),
            left(off),
            left(debug),
            marks.join("; ")
        );
    }
    // Every timer_list run passes through both timer programs.
    let per_timer = |result: &LogResult| {
        let entry = result.program(TIMER_PROGRAMS[0])?;
        let exit = result.program(TIMER_PROGRAMS[1])?;
        Some(entry.ns + exit.ns)
    };
    if let (Some(off_ns), Some(debug_ns)) = (per_timer(off), per_timer(debug)) {
        let _ = writeln!(
            out,
            "| **timer_expire_entry + exit, per timer** | {off_ns:.0} ns | {debug_ns:.0} ns | \
             {:+.0} ns | | | | |",
            debug_ns - off_ns
        );
    }

    let _ = writeln!(out, "\n| figure | off | debug |");
    let _ = writeln!(out, "|---|---|---|");
    let per_second = |value: u64, result: &LogResult| value as f64 / result.window_s();
    let _ = writeln!(
        out,
        "| keepalive probes sent (TcpExt TCPKeepAlive of the workload's namespace) | {:.0}/s | \
         {:.0}/s |",
        per_second(off.keepalive_probes, off),
        per_second(debug.keepalive_probes, debug)
    );
    let _ = writeln!(
        out,
        "| kernel log records in the daemon's output | {:.0}/s | {:.0}/s |",
        per_second(off.kernel_records, off),
        per_second(debug.kernel_records, debug)
    );
    let cpu =
        |result: &LogResult| result.cpu_ticks as f64 / r.clock_ticks / result.window_s() * 100.0;
    let _ = writeln!(
        out,
        "| daemon CPU | {:.2} % of a core ({} ticks in {:.1} s) | {:.2} % of a core ({} ticks in \
         {:.1} s) |",
        cpu(off),
        off.cpu_ticks,
        off.window_s(),
        cpu(debug),
        debug.cpu_ticks,
        debug.window_s()
    );
    let _ = writeln!(
        out,
        "| RST churn alongside (median conn/s) | {:.0} | {:.0} |",
        median(&off.connections_per_second),
        median(&debug.connections_per_second)
    );
    let ran = not_slower + within + beyond;
    let _ = writeln!(
        out,
        "\nVerdict: under `off` the translated program is smaller than under `debug` in \
         {smaller} of {sized} programs (the log calls are removed at load); of the {ran} programs \
         that ran under both, `off`'s mean ns per run is at most `debug`'s in {not_slower}, above \
         it but within the rounds' spread in {within}, and above it beyond that spread in \
         {beyond}. {}",
        if smaller == sized && beyond == 0 {
            "Under `off` only the stub counted above is left of the log in the translated \
             code, and no program ran slower under `off` than under `debug` beyond the noise."
        } else {
            "So `off` is not shown to be free here: see the rows marked above."
        }
    );
    if r.foreign.log_rounds > 0 {
        let _ = writeln!(
            out,
            "\nAnother process (a test) had kalive programs loaded in {} of {} of these rounds; \
             its keepalive connections ran through these timer programs too.",
            r.foreign.log_rounds,
            off.windows.len() + debug.windows.len()
        );
    }
}

/// How `off` compares with `debug` for one program.
enum LogVerdict {
    NotSlower,
    WithinNoise,
    Slower,
}

/// `off` against `debug`: not slower, slower by less than the rounds' spread, or slower beyond it.
fn log_verdict(off: ProgramCost, debug: ProgramCost) -> (String, LogVerdict) {
    let over = off.ns - debug.ns;
    if over <= 0.0 {
        ("off not slower".to_owned(), LogVerdict::NotSlower)
    } else if off.lowest <= debug.highest {
        (
            format!("off {over:.0} ns slower, within the rounds' spread (noise)"),
            LogVerdict::WithinNoise,
        )
    } else {
        (
            format!("off {over:.0} ns slower, beyond the rounds' spread"),
            LogVerdict::Slower,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_off_with_debug_against_the_spread() {
        let cost = |ns: f64, lowest: f64, highest: f64| ProgramCost {
            ns,
            per_second: 100.0,
            lowest,
            highest,
        };
        let debug = cost(300.0, 290.0, 320.0);
        assert!(matches!(
            log_verdict(cost(280.0, 270.0, 290.0), debug).1,
            LogVerdict::NotSlower
        ));
        assert!(matches!(
            log_verdict(cost(305.0, 300.0, 310.0), debug).1,
            LogVerdict::WithinNoise
        ));
        assert!(matches!(
            log_verdict(cost(350.0, 340.0, 360.0), debug).1,
            LogVerdict::Slower
        ));
    }
}
