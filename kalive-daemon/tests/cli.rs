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

#[test]
fn top_help_lists_its_options() {
    let output = daemon()
        .args(["top", "--help"])
        .output()
        .expect("top --help");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "--endpoint",
        "http://127.0.0.1:9977",
        "--interval",
        "--standalone",
        "--once",
        "--json",
        "--filter",
        "--sort",
        "--user",
        "KALIVE_PASSWORD",
    ] {
        assert!(
            text.contains(expected),
            "`top --help` lacks {expected}:\n{text}"
        );
    }
}

#[test]
fn top_refuses_bad_options_with_the_reason() {
    for (args, expected) in [
        (&["top", "--interval", "0"][..], "from 0.1 to 3600"),
        (&["top", "--once", "--json"][..], "cannot be used with"),
        (&["top", "--hook-mode", "tracepoint"][..], "--standalone"),
        (&["top", "--sort", "colour"][..], "invalid value 'colour'"),
    ] {
        let output = daemon().args(args).output().expect("top");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(expected), "{args:?}: {text}");
    }
}

#[test]
fn top_without_a_daemon_says_how_to_start_one() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    for args in [&["--once"][..], &["--json"][..], &[][..]] {
        let output = daemon()
            .args(["top", "--endpoint", &format!("127.0.0.1:{port}")])
            .args(args)
            .output()
            .expect("top");
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(
            text.contains(&format!(
                "no kalive daemon answers at http://127.0.0.1:{port}"
            )) && text.contains("sudo kalive-daemon run")
                && text.contains("top --standalone"),
            "{args:?}: {text}"
        );
    }
    let output = daemon()
        .args(["top", "--endpoint", "https://127.0.0.1:9977", "--once"])
        .output()
        .expect("top");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("plain http:// only"));
    let output = daemon()
        .args(["top", "--once", "--filter", "port:http"])
        .output()
        .expect("top");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("port \"http\" is not a number"));
}
