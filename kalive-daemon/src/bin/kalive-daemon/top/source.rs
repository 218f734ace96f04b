//! Where the live view's data comes from: a running daemon's HTTP API, or (`--standalone`) a
//! collector in this process. Both give the same `Snapshot`s; a dedicated thread fetches them at a
//! steady rate and sends them over a channel, so slow answers never block drawing or keys.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use base64::Engine as _;
use kalive_daemon::{
    collector::Shared,
    export::api::{self, Clock, EventsQuery},
    wire::{ConnectionsJson, EventsJson, StatusJson},
};
use tokio::sync::mpsc::Sender;

use super::app::{Snapshot, Update};

/// Connections asked for in one snapshot (the API's largest page).
pub(crate) const CONNECTIONS_LIMIT: usize = api::MAX_CONNECTIONS_LIMIT;
/// Events asked for at the start (the newest ones), then per page while following.
pub(crate) const FIRST_EVENTS: usize = 200;
pub(crate) const EVENTS_PAGE: usize = 1_000;
/// Pages read in one refresh before the rest waits for the next one.
const MAX_EVENT_PAGES: usize = 10;
/// The largest answer body read (100,000 connections take about 80 MB of JSON).
const MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// Environment variable holding the password for `--user`.
pub(crate) const PASSWORD_ENV: &str = "KALIVE_PASSWORD";

/// Why a snapshot could not be taken; each names the cause and the fix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SourceError {
    #[error(
        "--endpoint {0}: top speaks plain http:// only; for a daemon with TLS, run top on its \
         host against a plain listener (e.g. a second daemon on 127.0.0.1) or use --standalone \
         as root"
    )]
    Https(String),
    #[error("--endpoint {0:?} is not an http://HOST:PORT address (e.g. http://127.0.0.1:9977)")]
    BadEndpoint(String),
    #[error(
        "no kalive daemon answers at {base} ({cause}): start one with `sudo kalive-daemon run`, \
         or use `sudo kalive-daemon top --standalone`"
    )]
    NoDaemon { base: String, cause: String },
    #[error("GET {url} failed: {cause}")]
    Request { url: String, cause: String },
    #[error("reading the answer of {url} failed: {cause}")]
    Read { url: String, cause: String },
    #[error(
        "the daemon at {0} asks for a user and password: pass --user NAME and put the password \
         in {PASSWORD_ENV}"
    )]
    NeedsUser(String),
    #[error("the daemon at {base} refused user {user:?}: check --user and {PASSWORD_ENV}")]
    Refused { base: String, user: String },
    #[error("GET {url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} does not exist (404): is {base} a kalive daemon?")]
    NotFound { url: String, base: String },
    #[error(
        "the answer of {url} is not what top expects ({cause}): is {base} a kalive daemon of \
         the same version?"
    )]
    Decode {
        url: String,
        base: String,
        cause: String,
    },
    #[error("the in-process collector is unhealthy: {0}")]
    Unhealthy(String),
}

/// Something that can take a snapshot.
pub(crate) trait Source: Send {
    fn fetch(&mut self) -> Result<Snapshot, SourceError>;
    /// What the header names as the data's origin.
    fn describe(&self) -> String;
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Follows the events history from `since`: the newest entries the first time, then every entry
/// after the last one seen, a page at a time (at most MAX_EVENT_PAGES per call).
fn follow_events(
    since: &mut Option<u64>,
    mut page: impl FnMut(Option<u64>, usize) -> Result<EventsJson, SourceError>,
) -> Result<EventsJson, SourceError> {
    let Some(start) = *since else {
        let first = page(None, FIRST_EVENTS)?;
        *since = Some(first.next_since);
        return Ok(first);
    };
    let mut merged = page(Some(start), EVENTS_PAGE)?;
    for _ in 1..MAX_EVENT_PAGES {
        if !merged.truncated {
            break;
        }
        let mut newer = page(Some(merged.next_since), EVENTS_PAGE)?;
        // Pages are newest first: the newer page goes in front.
        newer.events.append(&mut merged.events);
        newer.gap |= merged.gap;
        merged = newer;
    }
    *since = Some(merged.next_since);
    Ok(merged)
}

/// A running daemon, over HTTP.
pub(crate) struct HttpSource {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    user: Option<String>,
    since: Option<u64>,
    /// False once the daemon answered 404 for /api/v1/status (an older daemon).
    has_status: bool,
}

/// Normalises `--endpoint`: `http://host:port` (a bare `host:port` gets `http://`).
pub(crate) fn endpoint_url(endpoint: &str) -> Result<String, SourceError> {
    let endpoint = endpoint.trim();
    if endpoint.starts_with("https://") {
        return Err(SourceError::Https(endpoint.to_owned()));
    }
    let address = if endpoint.contains("://") {
        endpoint.strip_prefix("http://")
    } else {
        Some(endpoint)
    };
    match address.map(|address| address.strip_suffix('/').unwrap_or(address)) {
        Some(rest) if !rest.is_empty() && !rest.contains(['/', '?', '#', ' ']) => {
            Ok(format!("http://{rest}"))
        }
        _ => Err(SourceError::BadEndpoint(endpoint.to_owned())),
    }
}

impl HttpSource {
    /// `user`: the name and password for basic auth.
    pub(crate) fn new(
        endpoint: &str,
        user: Option<(String, String)>,
    ) -> Result<HttpSource, SourceError> {
        let base = endpoint_url(endpoint)?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let authorization = user.as_ref().map(|(name, password)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"))
            )
        });
        Ok(HttpSource {
            agent,
            base,
            authorization,
            user: user.map(|(name, _)| name),
            since: None,
            has_status: true,
        })
    }

    fn no_daemon(&self, cause: impl std::fmt::Display) -> SourceError {
        SourceError::NoDaemon {
            base: self.base.clone(),
            cause: cause.to_string(),
        }
    }

    /// GET `path`; Ok(None) for 404, the body for 200, an error naming the fix otherwise.
    fn get(&self, path: &str) -> Result<Option<String>, SourceError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        let mut response = match request.call() {
            Ok(response) => response,
            Err(ureq::Error::Io(err)) => return Err(self.no_daemon(err)),
            Err(ureq::Error::HostNotFound) => return Err(self.no_daemon("host not found")),
            Err(ureq::Error::ConnectionFailed) => return Err(self.no_daemon("connection failed")),
            Err(ureq::Error::Timeout(_)) => {
                return Err(self.no_daemon("no answer within 10 s"));
            }
            Err(err) => {
                return Err(SourceError::Request {
                    url,
                    cause: err.to_string(),
                })
            }
        };
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(|err| SourceError::Read {
                url: url.clone(),
                cause: err.to_string(),
            })?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            401 => Err(match &self.user {
                None => SourceError::NeedsUser(self.base.clone()),
                Some(user) => SourceError::Refused {
                    base: self.base.clone(),
                    user: user.clone(),
                },
            }),
            _ => Err(SourceError::Status {
                url,
                status,
                message: body.lines().next().unwrap_or("").trim().to_owned(),
            }),
        }
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, SourceError> {
        let Some(body) = self.get(path)? else {
            return Ok(None);
        };
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|err| SourceError::Decode {
                url: format!("{}{path}", self.base),
                base: self.base.clone(),
                cause: err.to_string(),
            })
    }

    fn required<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, SourceError> {
        self.get_json(path)?.ok_or_else(|| SourceError::NotFound {
            url: format!("{}{path}", self.base),
            base: self.base.clone(),
        })
    }
}

impl Source for HttpSource {
    fn fetch(&mut self) -> Result<Snapshot, SourceError> {
        let status: Option<StatusJson> = if self.has_status {
            let status = self.get_json("/api/v1/status")?;
            self.has_status = status.is_some();
            status
        } else {
            None
        };
        let connections: ConnectionsJson =
            self.required(&format!("/api/v1/connections?limit={CONNECTIONS_LIMIT}"))?;
        let mut since = self.since;
        let events = follow_events(&mut since, |since, limit| {
            self.required(&match since {
                None => format!("/api/v1/events?limit={limit}"),
                Some(since) => format!("/api/v1/events?since={since}&limit={limit}"),
            })
        })?;
        self.since = since;
        Ok(Snapshot {
            taken_unix_seconds: now_unix(),
            status,
            connections,
            events,
        })
    }

    fn describe(&self) -> String {
        self.base.clone()
    }
}

/// A collector in this process (`--standalone`), read through the API's own functions.
pub(crate) struct LocalSource {
    shared: Shared,
    since: Option<u64>,
}

impl LocalSource {
    pub(crate) fn new(shared: Shared) -> LocalSource {
        LocalSource {
            shared,
            since: None,
        }
    }
}

impl Source for LocalSource {
    fn fetch(&mut self) -> Result<Snapshot, SourceError> {
        let clock = Clock::now();
        let collected = self.shared.lock();
        if let Err(reason) = collected.health.check(Instant::now()) {
            return Err(SourceError::Unhealthy(reason.to_string()));
        }
        let mode = collected.mode.name();
        let connections = api::connections(
            &collected.table,
            &api::ConnectionsQuery {
                state: None,
                port: None,
                remote: None,
                limit: CONNECTIONS_LIMIT,
            },
            &clock,
            mode,
        );
        let events = follow_events(&mut self.since, |since, limit| {
            Ok(api::events(
                &collected.table,
                &EventsQuery { since, limit },
                &clock,
                mode,
            ))
        })?;
        let status = api::status(
            &collected.table,
            collected.metrics.events_lost(),
            &collected.info,
            &clock,
            mode,
        );
        Ok(Snapshot {
            taken_unix_seconds: now_unix(),
            status: Some(status),
            connections,
            events,
        })
    }

    fn describe(&self) -> String {
        "in-process collector (--standalone)".to_owned()
    }
}

/// Fetches every `interval` on a thread of its own until `stop` is set or the receiver is gone.
/// The schedule is steady: a slow fetch shortens the wait, a fetch slower than the interval
/// starts the next one at once.
pub(crate) fn spawn_fetcher(
    mut source: Box<dyn Source>,
    interval: Duration,
    updates: Sender<Update>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kalive-top-fetch".into())
        .spawn(move || {
            let mut next = Instant::now() + interval;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if next > now {
                    // Sleep in slices so a stop is noticed within 100 ms.
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                next += interval;
                if next < now {
                    next = now + interval;
                }
                let update = match source.fetch() {
                    Ok(snapshot) => Update::Data(Box::new(snapshot)),
                    Err(error) => Update::Error(error),
                };
                if updates.blocking_send(update).is_err() {
                    return;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use kalive_daemon::wire::{EventKind, PeerStateKind};
    use kalive_testkit::fixtures::{connection_json, event_json};

    use super::*;

    fn page(seqs: &[u64], truncated: bool, gap: bool) -> EventsJson {
        let c = connection_json(1, 40001, "10.0.0.9:5432", PeerStateKind::Alive, 0);
        EventsJson {
            next_since: seqs.first().copied().unwrap_or(0),
            oldest_seq: Some(1),
            gap,
            truncated,
            events: seqs
                .iter()
                .map(|&seq| event_json(seq, EventKind::PeerState, c.clone(), None, "alive"))
                .collect(),
        }
    }

    #[test]
    fn events_are_followed_page_by_page() {
        let mut asked = Vec::new();
        let mut since = None;
        let first = follow_events(&mut since, |since, limit| {
            asked.push((since, limit));
            Ok(page(&[5, 4], false, false))
        })
        .expect("first");
        assert_eq!(first.events.len(), 2);
        assert_eq!(since, Some(5));
        // Two truncated pages and a last one, merged newest first.
        let answers = [
            page(&[7, 6], true, false),
            page(&[9, 8], true, true),
            page(&[10], false, false),
        ];
        let mut answers = answers.into_iter();
        let merged = follow_events(&mut since, |since, limit| {
            asked.push((since, limit));
            answers
                .next()
                .ok_or_else(|| SourceError::Unhealthy("asked too often".to_owned()))
        })
        .expect("follow");
        let seqs: Vec<u64> = merged.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [10, 9, 8, 7, 6]);
        assert!(merged.gap);
        assert_eq!(since, Some(10));
        assert_eq!(
            asked,
            [
                (None, FIRST_EVENTS),
                (Some(5), EVENTS_PAGE),
                (Some(7), EVENTS_PAGE),
                (Some(9), EVENTS_PAGE)
            ]
        );
        // An error leaves `since` where it was.
        let down = || SourceError::Unhealthy("down".into());
        assert!(follow_events(&mut since, |_, _| Err(down())).is_err());
        assert_eq!(since, Some(10));
    }

    #[test]
    fn endpoints_are_http_urls() {
        assert_eq!(
            endpoint_url("127.0.0.1:9977").as_deref(),
            Ok("http://127.0.0.1:9977")
        );
        assert_eq!(
            endpoint_url("http://[::1]:9977/").as_deref(),
            Ok("http://[::1]:9977")
        );
        assert!(endpoint_url("https://host:9977").is_err_and(|e| e.to_string().contains("http://")));
        assert!(endpoint_url("ftp://host").is_err());
        assert!(endpoint_url("http://").is_err());
        assert!(endpoint_url("http://host:1/metrics").is_err());
    }

    #[test]
    fn no_daemon_is_named_with_the_fix() {
        // A port nothing listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut source = HttpSource::new(&format!("127.0.0.1:{port}"), None).expect("source");
        let error = source.fetch().expect_err("nothing answers").to_string();
        assert!(
            error.starts_with(&format!(
                "no kalive daemon answers at http://127.0.0.1:{port}"
            )),
            "{error}"
        );
        assert!(error.contains("sudo kalive-daemon run"), "{error}");
        assert!(error.contains("top --standalone"), "{error}");
    }

    /// Serves `answers` HTTP answers, one per connection, on a free port.
    fn serve(answers: Vec<&'static str>) -> u16 {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        std::thread::spawn(move || {
            for answer in answers {
                let Ok((mut stream, _)) = listener.accept() else {
                    return;
                };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        port
    }

    #[test]
    fn refusals_and_bad_answers_are_named() {
        let unauthorized =
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let port = serve(vec![unauthorized, unauthorized]);
        let mut source = HttpSource::new(&format!("127.0.0.1:{port}"), None).expect("source");
        let error = source.fetch().expect_err("401").to_string();
        assert!(
            error.contains("--user NAME") && error.contains(PASSWORD_ENV),
            "{error}"
        );
        let mut source = HttpSource::new(
            &format!("127.0.0.1:{port}"),
            Some(("ops".into(), "wrong".into())),
        )
        .expect("source");
        let error = source.fetch().expect_err("401").to_string();
        assert!(error.contains("refused user \"ops\""), "{error}");

        let garbage = "HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!";
        let port = serve(vec![garbage]);
        let mut source = HttpSource::new(&format!("127.0.0.1:{port}"), None).expect("source");
        let error = source.fetch().expect_err("garbage").to_string();
        assert!(error.contains("is not what top expects"), "{error}");
        assert!(
            error.contains("a kalive daemon of the same version"),
            "{error}"
        );
    }
}
