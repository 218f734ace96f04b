//! The `/` filter (also `--filter`): terms that must all match a row.

use super::row::Row;

/// One filter term: all terms must match; a term's comma-separated values are alternatives.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    /// Local or remote port.
    Port(Vec<u16>),
    /// Part of the local or remote address ("10.0.0.", "::1", "127.0.0.1:8080").
    Addr(Vec<String>),
    /// A state name or its start ("prob", "dead").
    State(Vec<String>),
    Netns(Vec<u32>),
    /// `at-risk`: connections the daemon's middlebox idle limit will kill.
    AtRisk,
    /// The owning process's command name or its start ("ssh", "postgr").
    Owner(Vec<String>),
    /// The owning process's pid.
    Pid(Vec<u32>),
    /// Part of the owner's cgroup: its systemd unit or container ("ssh.service", "kubepods").
    Cgroup(Vec<String>),
}

/// The parsed `/` filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Filter {
    pub(crate) text: String,
    terms: Vec<Term>,
}

const FILTER_HELP: &str = "use port:N, addr:TEXT, state:NAME, netns:N, owner:COMMAND, pid:N, \
                           cgroup:TEXT, at-risk, or a bare port, address or state; separate \
                           alternatives with commas";

impl Filter {
    /// Parses `text`; an error names the bad term and the accepted forms.
    pub(crate) fn parse(text: &str) -> Result<Filter, String> {
        let mut terms = Vec::new();
        for word in text.split_whitespace() {
            if word.eq_ignore_ascii_case("at-risk") {
                terms.push(Term::AtRisk);
                continue;
            }
            let (key, values) = match word.split_once(':') {
                Some((
                    key @ ("port" | "addr" | "state" | "netns" | "owner" | "pid" | "cgroup"),
                    values,
                )) => (key, values),
                _ => ("", word),
            };
            let values: Vec<&str> = values.split(',').filter(|v| !v.is_empty()).collect();
            if values.is_empty() {
                return Err(format!("filter {word:?} has no value: {FILTER_HELP}"));
            }
            let numbers = |what: &str| -> Result<Vec<u64>, String> {
                values
                    .iter()
                    .map(|v| {
                        v.parse::<u64>()
                            .map_err(|_| format!("{what} {v:?} is not a number: {FILTER_HELP}"))
                    })
                    .collect()
            };
            let lower = || values.iter().map(|v| v.to_ascii_lowercase()).collect();
            let term = match key {
                "port" => Term::Port(
                    numbers("port")?
                        .into_iter()
                        .map(|n| u16::try_from(n).map_err(|_| format!("port {n} is above 65535")))
                        .collect::<Result<_, _>>()?,
                ),
                "netns" => Term::Netns(
                    numbers("netns")?
                        .into_iter()
                        .map(|n| u32::try_from(n).map_err(|_| format!("netns {n} is too large")))
                        .collect::<Result<_, _>>()?,
                ),
                "pid" => Term::Pid(
                    numbers("pid")?
                        .into_iter()
                        .map(|n| u32::try_from(n).map_err(|_| format!("pid {n} is too large")))
                        .collect::<Result<_, _>>()?,
                ),
                "owner" => Term::Owner(lower()),
                "cgroup" => Term::Cgroup(lower()),
                "addr" => Term::Addr(lower()),
                "state" => Term::State(lower()),
                // A bare word: a port if it is a number, an address if it looks like one.
                _ if values.iter().all(|v| v.parse::<u16>().is_ok()) => {
                    Term::Port(values.iter().filter_map(|v| v.parse().ok()).collect())
                }
                _ if values.iter().all(|v| v.contains(['.', ':'])) => Term::Addr(lower()),
                _ => Term::State(lower()),
            };
            terms.push(term);
        }
        Ok(Filter {
            text: text.trim().to_owned(),
            terms,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub(crate) fn matches(&self, row: &Row) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Port(ports) => ports
                .iter()
                .any(|p| row.local.port() == *p || row.remote.port() == *p),
            Term::Netns(ids) => ids.contains(&row.conn.netns),
            Term::Addr(parts) => parts.iter().any(|part| {
                [row.local, row.remote].iter().any(|addr| {
                    addr.to_string()
                        .to_ascii_lowercase()
                        .contains(part.as_str())
                })
            }),
            Term::State(names) => names
                .iter()
                .any(|name| row.state().name().starts_with(name.as_str())),
            Term::AtRisk => row.conn.at_risk,
            Term::Owner(names) => row.conn.owner_command.as_ref().is_some_and(|command| {
                let command = command.to_ascii_lowercase();
                names.iter().any(|name| command.starts_with(name.as_str()))
            }),
            Term::Pid(pids) => row.conn.owner_pid.is_some_and(|pid| pids.contains(&pid)),
            Term::Cgroup(parts) => row.conn.owner_cgroup.as_ref().is_some_and(|cgroup| {
                let cgroup = cgroup.to_ascii_lowercase();
                parts.iter().any(|part| cgroup.contains(part.as_str()))
            }),
        })
    }
}
