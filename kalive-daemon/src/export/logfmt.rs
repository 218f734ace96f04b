//! One structured (logfmt) log line per probe and per outcome.

use std::fmt::Write as _;

use crate::{
    kernel::errno::errno_name,
    tracking::{connection::Connection, table::Notice},
};

fn describe(conn: &Connection) -> String {
    let mut line = format!(
        "conn={} netns={} local={} remote={} idle={}s interval={}s count={}",
        conn.id,
        conn.netns,
        conn.local,
        conn.remote,
        conn.settings.idle.as_secs_f64(),
        conn.settings.interval.as_secs_f64(),
        conn.settings.probe_limit,
    );
    if let Some(user_timeout) = conn.settings.user_timeout {
        let _ = write!(line, " user_timeout={}s", user_timeout.as_secs_f64());
    }
    let _ = write!(
        line,
        " probes_sent={} probes_answered={} probes_outstanding={}",
        conn.probes_sent, conn.probes_answered, conn.probes_outstanding
    );
    line
}

/// The log line for a notice, or None when it is a probe and probes are not logged.
pub fn format_notice(notice: &Notice, log_probes: bool) -> Option<String> {
    Some(match notice {
        Notice::Tracked(conn) => format!("event=tracked {}", describe(conn)),
        Notice::Probe(connection) if log_probes => format!(
            "event=probe state={:?} {}",
            connection.peer_state.to_string(),
            describe(connection)
        ),
        Notice::Probe(_) => return None,
        Notice::ProbeSendFailed(conn) => {
            format!(
                "event=probe_send_failed send_failures={} {}",
                conn.send_failures,
                describe(conn)
            )
        }
        Notice::Ended(ended) => format!(
            "event=outcome outcome={} error={} signal={}{} {}",
            ended.outcome,
            errno_name(ended.error),
            ended.signal,
            if ended.idle_killed {
                " idle_killed=true"
            } else {
                ""
            },
            describe(&ended.connection)
        ),
    })
}

pub fn log_notice(notice: &Notice, log_probes: bool) {
    if let Some(line) = format_notice(notice, log_probes) {
        log::info!("{line}");
    }
}
