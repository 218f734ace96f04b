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
        "--web.listen-address <ADDR>",
        "[alias: --listen]",
        "127.0.0.1:9977",
        "--web.config.file",
        "--labels",
        "remote_addr",
        "--max-series",
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
fn events_buffer_must_be_a_power_of_two_in_range() {
    for bad in ["100", "32", "2097152", "lots"] {
        let (code, text) = run_with(&["--events-buffer-kib", bad]);
        assert_eq!(code, Some(2), "{bad}: {text}");
        assert!(
            text.contains("--events-buffer-kib") && text.contains("power of two from 64"),
            "{bad}: {text}"
        );
    }
}

/// Runs `kalive-daemon run ARGS` and returns (exit code, stderr).
fn run_with(args: &[&str]) -> (Option<i32>, String) {
    let output = daemon().arg("run").args(args).output().expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn http_options_are_checked_before_anything_loads() {
    // Prometheus exporters' name for the option and kalive's older one are the same option.
    for option in ["--web.listen-address", "--listen"] {
        let (code, text) = run_with(&[option, "localhost"]);
        assert_eq!(code, Some(2), "{text}");
        assert!(
            text.contains("invalid value 'localhost' for '--web.listen-address <ADDR>'"),
            "{text}"
        );
    }

    let (code, text) = run_with(&["--labels", "pid"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("netns") && text.contains("connection"),
        "{text}"
    );

    let (code, text) = run_with(&["--max-series", "0"]);
    assert_eq!(code, Some(2), "{text}");

    let (code, text) = run_with(&["--web.config.file", "/nonexistent/web.yml"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("cannot read the web config file /nonexistent/web.yml")
            && text.contains("--web.config.file"),
        "{text}"
    );

    let dir = std::env::temp_dir().join(format!("kalive-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("web.yml");
    std::fs::write(&config, "basic_auth_users:\n  alice: hunter2\n").expect("write");
    let (code, text) = run_with(&["--web.config.file", config.to_str().expect("utf-8 path")]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("not a bcrypt hash") && text.contains("htpasswd"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A port someone else holds: the error says so and how to choose another.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("address").to_string();
    for option in ["--web.listen-address", "--listen"] {
        let (code, text) = run_with(&[option, &port]);
        assert_eq!(code, Some(1), "{text}");
        assert!(
            text.contains(&format!("cannot listen on {port}"))
                && text.contains("choose another with --web.listen-address"),
            "{text}"
        );
    }
}

#[test]
fn a_bad_middlebox_rules_file_names_its_line() {
    let dir = std::env::temp_dir().join(format!("kalive-cli-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let rules = dir.join("rules");
    std::fs::write(&rules, "10.0.0.0/8 350s\nport:http 4m\n").expect("write");
    for command in ["audit", "run"] {
        let output = daemon()
            .args([
                command,
                "--middlebox-rules",
                rules.to_str().expect("utf-8 path"),
            ])
            .output()
            .expect("kalive-daemon");
        assert_eq!(output.status.code(), Some(1), "{command}");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(
            text.contains("line 2: \"http\" is not a port") && text.contains("DESTINATION LIMIT"),
            "{command}: {text}"
        );
    }
    let output = daemon()
        .args(["audit", "--middlebox-rules", "/nonexistent/rules"])
        .output()
        .expect("kalive-daemon");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("cannot read the middlebox rules file /nonexistent/rules"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
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
