//! What /proc says about the test process itself, to compare with what kalive reports of its
//! sockets' owner.

/// This process's command name (/proc/self/comm).
pub fn own_command() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("/proc/self/comm")
        .trim_end()
        .to_owned()
}

/// This process's cgroup, the unified hierarchy's line of /proc/self/cgroup (`0::PATH`).
pub fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("a unified cgroup line in /proc/self/cgroup")
        .trim()
        .to_owned()
}
