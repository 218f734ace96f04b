//! The real binary's command line: help, and clear errors for bad input.

use assert_cmd::Command;

fn daemon() -> Command {
    Command::cargo_bin("kalive-daemon").expect("kalive-daemon binary")
}

#[test]
fn help_lists_run_and_its_options() {
    let output = daemon()
        .args(["run", "--help"])
        .output()
        .expect("run --help");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--hook-mode",
        "fentry",
        "kprobe",
        "tracepoint",
        "--history",
        "--quiet-probes",
    ] {
        assert!(
            text.contains(expected),
            "`run --help` lacks {expected}:\n{text}"
        );
    }
}

#[test]
fn unknown_hook_mode_is_rejected_with_the_choices() {
    let output = daemon()
        .args(["run", "--hook-mode", "uprobe"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("invalid value 'uprobe'") && text.contains("tracepoint"),
        "{text}"
    );
}

#[test]
fn history_out_of_range_is_rejected() {
    let output = daemon()
        .args(["run", "--history", "20000000"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--history"));
}
