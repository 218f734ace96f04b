//! The probe storm of `cargo xtask bench --storm`: many concurrent loopback keepalive connections
//! probing once a second, with live and dead peers mixed, spread over several processes (one
//! process may hold at most 20,000 descriptors here), in a network namespace of their own (root).
//!
//! ```text
//! storm --connections 20000 --dead 5000 --seconds 30 [--per-process 6000]
//! {"ready":true,"netns":4026532999,"connections":20000,"dead":5000,"processes":4}
//! {"connections":20000,"dead":5000,"seconds":30.0,"keepalive_probes":...,"aborts_on_timeout":5000,"alive":15000,"timed_out":5000}
//! ```
//!
//! Each worker process opens its share of the connections to a listener of its own, evenly over a
//! second (so the timers are spread over the second), with TCP_KEEPIDLE 1, TCP_KEEPINTVL 1 and
//! TCP_KEEPCNT 5 on the client side. Its first `dead` clients get a socket filter that drops
//! everything they receive: their probes go unanswered and the kernel gives up on them after five
//! (about six seconds in). Once every worker is ready the storm prints the `ready` line with its
//! namespace, runs for `--seconds`, then has every worker switch keepalive off on its live
//! clients (the probes stop), waits for runs in progress, reads the namespace's TcpExt
//! TCPKeepAlive and TCPAbortOnTimeout, and prints the result line with what the applications saw
//! (`alive`: no socket error; `timed_out`: ETIMEDOUT). It then waits for a line or EOF on stdin
//! before the connections close, so its caller can read its own counters first.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use kalive_testkit::{netns, proc_net, sockets};

/// The clients' keepalive: a probe a second once idle for a second; five unanswered end it.
const KEEPALIVE: sockets::Keepalive = sockets::Keepalive {
    idle_s: 1,
    interval_s: 1,
    count: 5,
};

/// A worker opens its connections evenly over this much time (TCP_KEEPINTVL).
const SPREAD: Duration = Duration::from_secs(1);

/// Connections per worker by default: two descriptors each, well under the 20,000 limit.
const DEFAULT_PER_PROCESS: usize = 6_000;

/// The most connections one worker takes (2 descriptors each, under 20,000 with room to spare).
const MAX_PER_PROCESS: usize = 9_500;

/// After the probes stop: longer than any keepalive run in progress.
const SETTLE: Duration = Duration::from_millis(300);

const USAGE: &str =
    "usage: storm --connections N --dead N --seconds S [--per-process N] (run as root)";

struct Options {
    connections: usize,
    dead: usize,
    seconds: f64,
    per_process: usize,
}

/// The flags of the storm, or of a worker (`--worker --count N --dead N`).
enum Role {
    Storm(Options),
    Worker { count: usize, dead: usize },
}

fn parse_args() -> Role {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let worker = args.first().is_some_and(|first| first == "--worker");
    if worker {
        args.remove(0);
    }
    let mut options = Options {
        connections: 0,
        dead: 0,
        seconds: 30.0,
        per_process: DEFAULT_PER_PROCESS,
    };
    let mut pairs = args.chunks(2);
    for pair in &mut pairs {
        let [flag, value] = pair else {
            panic!("{} needs a value; {USAGE}", pair[0]);
        };
        let bad = || -> ! { panic!("{flag} {value:?} is not valid; {USAGE}") };
        match flag.as_str() {
            "--connections" | "--count" => {
                options.connections = value.parse().unwrap_or_else(|_| bad());
            }
            "--dead" => options.dead = value.parse().unwrap_or_else(|_| bad()),
            "--seconds" => {
                options.seconds = value.parse().unwrap_or_else(|_| bad());
                if !(options.seconds > 0.0 && options.seconds <= 3600.0) {
                    bad();
                }
            }
            "--per-process" => {
                options.per_process = value.parse().unwrap_or_else(|_| bad());
                if !(1..=MAX_PER_PROCESS).contains(&options.per_process) {
                    bad();
                }
            }
            _ => panic!("unknown argument {flag:?}; {USAGE}"),
        }
    }
    assert!(
        options.connections > 0 && options.dead <= options.connections,
        "--connections must be above 0 and --dead at most --connections; {USAGE}"
    );
    if worker {
        assert!(
            options.connections <= MAX_PER_PROCESS,
            "a worker takes at most {MAX_PER_PROCESS} connections"
        );
        Role::Worker {
            count: options.connections,
            dead: options.dead,
        }
    } else {
        Role::Storm(options)
    }
}

fn main() {
    match parse_args() {
        Role::Storm(options) => storm(&options),
        Role::Worker { count, dead } => worker(count, dead),
    }
}

/// A worker process and the pipes to it.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn start(count: usize, dead: usize) -> Worker {
        let program = std::env::current_exe()
            .unwrap_or_else(|err| panic!("the storm's own executable: {err}"));
        let mut child = Command::new(program)
            .args(["--worker", "--count", &count.to_string()])
            .args(["--dead", &dead.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("start a storm worker: {err}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("the worker's stdout"));
        Worker {
            child,
            stdin,
            stdout,
        }
    }

    /// The worker's next line (it prints one when ready and one with its result).
    fn line(&mut self) -> String {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .unwrap_or_else(|err| panic!("read a storm worker's line: {err}"));
        assert!(
            read > 0,
            "a storm worker exited early (see its error above)"
        );
        line
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the worker's stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|err| panic!("write to a storm worker: {err}"));
    }
}

fn storm(options: &Options) {
    netns::unshare_process("storm");
    let inum = std::fs::metadata("/proc/self/ns/net")
        .unwrap_or_else(|err| panic!("/proc/self/ns/net: {err}"))
        .ino();
    let processes = options.connections.div_ceil(options.per_process);
    let mut workers: Vec<Worker> = (0..processes)
        .map(|index| {
            let share = |total: usize| total / processes + usize::from(index < total % processes);
            Worker::start(share(options.connections), share(options.dead))
        })
        .collect();
    for worker in &mut workers {
        let ready = worker.line();
        assert!(ready.contains("\"ready\":true"), "a worker said {ready:?}");
    }
    println!(
        "{{\"ready\":true,\"netns\":{inum},\"connections\":{},\"dead\":{},\"processes\":{processes}}}",
        options.connections, options.dead
    );
    io::stdout()
        .flush()
        .unwrap_or_else(|err| panic!("write the ready line: {err}"));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(options.seconds));
    let (mut alive, mut timed_out) = (0u64, 0u64);
    for worker in &mut workers {
        worker.say("stop");
    }
    for worker in &mut workers {
        let result = worker.line();
        alive += field(&result, "alive");
        timed_out += field(&result, "timed_out");
    }
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(SETTLE);
    let counters = proc_net::tcp_ext();
    let counter = |name: &str| {
        counters
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("this kernel's /proc/net/netstat has no {name}"))
    };
    println!(
        "{{\"connections\":{},\"dead\":{},\"seconds\":{seconds:.1},\"keepalive_probes\":{},\
         \"aborts_on_timeout\":{},\"alive\":{alive},\"timed_out\":{timed_out}}}",
        options.connections,
        options.dead,
        counter("TCPKeepAlive"),
        counter("TCPAbortOnTimeout"),
    );
    let _ = io::stdout().flush();
    let _ = io::stdin().lock().read_line(&mut String::new());
    for mut worker in workers {
        drop(worker.stdin.take());
        let _ = worker.child.wait();
    }
}

/// The number after `"name":` in a worker's result line.
fn field(line: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    line.split(&key)
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|digits| digits.parse().ok())
        })
        .unwrap_or_else(|| panic!("a worker's result line has no {name}: {line:?}"))
}

/// Opens `count` connections (the first `dead` with a peer that never answers), says ready, and
/// on `stop` switches keepalive off on the live ones and reports what the applications see.
fn worker(count: usize, dead: usize) {
    sockets::raise_fd_limit(2 * count as u64 + 64);
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("bind a storm worker's listener: {err}"));
    let (clients, servers): (Vec<TcpStream>, Vec<TcpStream>) =
        sockets::spread_pairs(&listener, count, SPREAD, |at, client| {
            if at < dead {
                sockets::drop_all_inbound(client);
            }
            sockets::enable_keepalive(client, Some(KEEPALIVE));
        })
        .into_iter()
        .unzip();
    let mut stdout = io::stdout().lock();
    let mut stdin = io::stdin().lock();
    writeln!(stdout, "{{\"ready\":true}}")
        .and_then(|()| stdout.flush())
        .unwrap_or_else(|err| panic!("write the ready line: {err}"));
    let mut command = String::new();
    let _ = stdin.read_line(&mut command);
    let (mut alive, mut timed_out) = (0u64, 0u64);
    for client in &clients {
        match sockets::socket_error(client) {
            0 => {
                sockets::set_int(client, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0);
                alive += 1;
            }
            libc::ETIMEDOUT => timed_out += 1,
            _ => {}
        }
    }
    writeln!(stdout, "{{\"alive\":{alive},\"timed_out\":{timed_out}}}")
        .and_then(|()| stdout.flush())
        .unwrap_or_else(|err| panic!("write the result line: {err}"));
    // Until the storm closes the pipe: then the connections close with the process.
    let _ = stdin.read_line(&mut command);
    drop(servers);
}
