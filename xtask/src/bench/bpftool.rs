//! What bpftool says of the loaded programs: their list with counters and sizes, and the
//! instructions of kalive's log functions left in a translated program.

use std::process::Command;

use anyhow::{Context, Result};

use super::{
    json::{json_number, json_objects, json_string},
    run_quiet,
};

/// kalive's log functions (`kalive-ebpf/src/log.rs`, not inlined): what of them the verifier
/// leaves under `off` is counted in the translated programs.
pub(super) const LOG_FUNCTIONS: [&str; 2] = ["lost_events", "run_decision"];

/// One program as `bpftool --json prog show` reports it.
pub(super) struct Program {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) run_time_ns: u64,
    pub(super) run_cnt: u64,
    /// The size of the program as the verifier left it, and of its JIT image, in bytes.
    pub(super) bytes_xlated: u64,
    pub(super) bytes_jited: u64,
}

/// Every BPF program loaded, from `bpftool --json prog show`.
pub(super) fn programs() -> Result<Vec<Program>> {
    let text = run_quiet(Command::new("bpftool").args(["--json", "prog", "show"])).context(
        "bpftool could not list the BPF programs: install it (`cargo xtask setup`) and run as root",
    )?;
    Ok(json_objects(&text)
        .into_iter()
        .filter_map(|object| {
            Some(Program {
                id: json_number(object, "id")? as u64,
                name: json_string(object, "name").unwrap_or_default().to_owned(),
                // bpftool leaves the counters out while they are 0.
                run_time_ns: json_number(object, "run_time_ns").unwrap_or(0.0) as u64,
                run_cnt: json_number(object, "run_cnt").unwrap_or(0.0) as u64,
                bytes_xlated: json_number(object, "bytes_xlated").unwrap_or(0.0) as u64,
                bytes_jited: json_number(object, "bytes_jited").unwrap_or(0.0) as u64,
            })
        })
        .collect())
}

/// The instructions of program `id`, as the verifier left it, that belong to kalive's log
/// functions (`bpftool prog dump xlated`: a function starts at a line such as
/// `void lost_events():`).
pub(super) fn log_instructions(id: u64) -> Result<u64> {
    let text =
        run_quiet(Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id.to_string()]))
            .with_context(|| {
                format!(
            "bpftool could not dump program {id}: install it (`cargo xtask setup`), run as root"
        )
            })?;
    Ok(count_log_instructions(&text))
}

fn count_log_instructions(dump: &str) -> u64 {
    let mut in_log = false;
    let mut count = 0;
    for line in dump.lines() {
        let trimmed = line.trim_start();
        if !line.starts_with([' ', ';']) && line.trim_end().ends_with(':') {
            // A function's header: "RET NAME(ARGS):".
            let name = line
                .split('(')
                .next()
                .and_then(|head| head.split_whitespace().last())
                .unwrap_or("");
            in_log = LOG_FUNCTIONS.contains(&name);
        } else if in_log
            && trimmed
                .split_once(": (")
                .is_some_and(|(at, _)| !at.is_empty() && at.bytes().all(|b| b.is_ascii_digit()))
        {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_is_left_of_the_log_functions() {
        let dump = "u32 tcp_destroy_sock(enum c_void * ctx):\n\
                    ; log::lost_events();\n   \
                    7: (85) call pc+2#bpf_prog_27677f71af478053_lost_events\n   \
                    8: (b7) r0 = 0\n   \
                    9: (95) exit\n\
                    void lost_events():\n\
                    ; intrinsics::volatile_load(src)\n  \
                    10: (18) r1 = map[id:1963][0]+734\n  \
                    12: (71) r1 = *(u8 *)(r1 +0)\n  \
                    13: (b7) r2 = 2\n\
                    ; }\n  \
                    14: (95) exit\n\
                    void memcpy(u8 * dest, u8 * src, usize n):\n  \
                    15: (95) exit\n";
        assert_eq!(count_log_instructions(dump), 4);
        assert_eq!(
            count_log_instructions("int other(void * ctx):\n 0: (95) exit\n"),
            0
        );
    }
}
