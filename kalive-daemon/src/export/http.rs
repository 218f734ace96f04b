//! The HTTP server: /metrics, /api/v1/connections, /api/v1/events and /healthz, with optional
//! TLS and basic auth from `--web.config.file`.
//!
//! Hardening (`Limits`): one request at a time per connection and at most `max_connections`
//! connections. At the cap a new connection takes the slot of one that is not using it (no
//! request in progress, or a response its reader has left waiting longer than
//! `response_timeout`; see `http_slots`), so idle and half-sent connections cannot lock
//! Prometheus out; only when every slot is answering a request is it answered 503 and closed.
//! Request headers must arrive within
//! `header_timeout` and fit in `MAX_HEADER_BYTES` (else hyper answers 431 or closes the
//! connection); a connection lives at most `connection_lifetime` (then closes gracefully) and a
//! TLS handshake gets `handshake_timeout`. Only GET and HEAD are served; nothing a client sends
//! can panic the daemon.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    collector::Shared,
    export::{
        api::{self, Clock, ConnectionsQuery, EventsQuery},
        http_slots::{Admission, RequestInProgress, Slot, Slots},
        web_config::WebConfig,
    },
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9977";
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The server's limits. `Default` is what the daemon uses; tests shorten the timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once (one request at a time each). At the cap a newcomer takes the
    /// slot of a connection without a request in progress; with none, it is answered 503.
    pub max_connections: usize,
    /// A response whose reader has not taken it within this no longer protects its
    /// connection's slot.
    pub response_timeout: Duration,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// A connection is closed (gracefully) after this long.
    pub connection_lifetime: Duration,
    pub handshake_timeout: Duration,
    /// How long a closing connection may take to finish its response.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            response_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(120),
            handshake_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot listen on {addr}: {source}. Another process may hold the port (`ss -ltnp`); \
         choose another with --web.listen-address"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the server and its handlers need.
pub struct ServerContext {
    /// What the collector collected.
    pub shared: Shared,
    pub web: WebConfig,
    pub limits: Limits,
}

/// Binds `addr` (so a bad address fails the start, before the programs load).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves until `cancel`.
pub async fn serve(listener: TcpListener, context: Arc<ServerContext>, cancel: CancellationToken) {
    let tls = context.web.tls.clone().map(TlsAcceptor::from);
    let limits = context.limits;
    let slots = Slots::new(limits.max_connections, limits.response_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    log::warn!("accepting an HTTP connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match slots.admit(peer.ip(), Instant::now()) {
            Admission::Admitted(slot) => Arc::new(slot),
            Admission::Full => {
                tokio::spawn(refuse_busy(stream, tls.is_some(), slots.capacity()));
                continue;
            }
        };
        let context = context.clone();
        let tls = tls.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let evicted = slot.evicted().clone();
            let served = async {
                match tls {
                    None => serve_connection(TokioIo::new(stream), context, slot, cancel).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            limits.handshake_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => {
                                serve_connection(TokioIo::new(stream), context, slot, cancel).await;
                            }
                            Ok(Err(err)) => log::debug!("TLS handshake with {peer} failed: {err}"),
                            Err(_) => log::debug!("TLS handshake with {peer} timed out"),
                        }
                    }
                }
            };
            // Taken by a newcomer: drop the connection (closing it) at once.
            tokio::select! {
                () = served => {}
                () = evicted.cancelled() => {}
            }
        });
    }
}

/// Answers a connection over the cap with 503 (plain HTTP) or closes it (TLS).
async fn refuse_busy(mut stream: TcpStream, tls: bool, max_connections: usize) {
    if tls {
        return;
    }
    let body = format!(
        "kalive-daemon is answering {max_connections} requests already (the most it serves at \
         once); retry shortly\n"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
}

async fn serve_connection<I>(
    io: TokioIo<I>,
    context: Arc<ServerContext>,
    slot: Arc<Slot>,
    cancel: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = context.limits;
    let service = service_fn(move |request| {
        let context = context.clone();
        let in_progress = slot.request_started();
        async move {
            let response = handle(&context, request).await;
            Ok::<_, Infallible>(response.map(|remaining| AnswerBody {
                remaining,
                in_progress: Some(in_progress),
            }))
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = tokio::time::sleep(limits.connection_lifetime) => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.grace, connection.as_mut()).await.unwrap_or(Ok(()))
        }
        () = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.grace, connection.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    if let Err(err) = result {
        log::debug!("HTTP connection ended: {err}");
    }
}

type Answer = Response<Bytes>;

/// The most of a response handed to hyper at once. hyper asks for the next piece only when
/// its write buffer has room, so a response still being written keeps its slot.
const ANSWER_PIECE_BYTES: usize = 64 * 1024;

/// A response body that keeps its connection's slot (`RequestInProgress`) until all of it but
/// the last piece has gone to the socket.
struct AnswerBody {
    remaining: Bytes,
    in_progress: Option<RequestInProgress>,
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining.is_empty() {
            self.in_progress = None;
            return Poll::Ready(None);
        }
        let piece = self.remaining.len().min(ANSWER_PIECE_BYTES);
        let piece = self.remaining.split_to(piece);
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining.len() as u64)
    }
}

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    answer(status, "text/plain; charset=utf-8", body)
}

fn json(body: &impl serde::Serialize) -> Answer {
    match serde_json::to_vec(body) {
        Ok(bytes) => answer(StatusCode::OK, "application/json", bytes),
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer failed: {err}"),
        ),
    }
}

const PATHS: &str = "/metrics, /api/v1/connections, /api/v1/events, /api/v1/status, /healthz";

async fn handle(context: &ServerContext, request: Request<Incoming>) -> Answer {
    let mut response = if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not served; use GET", request.method()),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        response
    } else if !authorized(context, &request).await {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "authentication required: give a user and password from basic_auth_users",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"kalive\", charset=\"UTF-8\""),
        );
        response
    } else {
        route(context, request.uri().path(), request.uri().query())
    };
    for (name, value) in &context.web.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    if request.method() == Method::HEAD {
        *response.body_mut() = Bytes::new();
    }
    response
}

async fn authorized(context: &ServerContext, request: &Request<Incoming>) -> bool {
    let Some(auth) = context.web.basic_auth.clone() else {
        return true;
    };
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    // bcrypt takes milliseconds on purpose: keep it off the async threads.
    tokio::task::spawn_blocking(move || auth.check(header.as_deref()))
        .await
        .unwrap_or(false)
}

fn route(context: &ServerContext, path: &str, query: Option<&str>) -> Answer {
    match path {
        "/metrics" => metrics(context),
        "/api/v1/connections" => match ConnectionsQuery::parse(query) {
            Ok(query) => {
                let clock = Clock::now();
                // Built under the lock, encoded after it: the ring buffer reader waits less.
                let body = {
                    let collected = context.shared.lock();
                    api::connections(&collected.table, &query, &clock, collected.mode.name())
                };
                json(&body)
            }
            Err(err) => text(StatusCode::BAD_REQUEST, err.to_string()),
        },
        "/api/v1/events" => match EventsQuery::parse(query) {
            Ok(query) => {
                let clock = Clock::now();
                let body = {
                    let collected = context.shared.lock();
                    api::events(&collected.table, &query, &clock, collected.mode.name())
                };
                json(&body)
            }
            Err(err) => text(StatusCode::BAD_REQUEST, err.to_string()),
        },
        "/api/v1/status" => {
            let clock = Clock::now();
            let collected = context.shared.lock();
            json(&api::status(
                &collected.table,
                collected.metrics.events_lost(),
                &collected.info,
                &clock,
                collected.mode.name(),
            ))
        }
        "/healthz" => {
            let collected = context.shared.lock();
            match collected.health.check(Instant::now()) {
                Ok(()) => text(
                    StatusCode::OK,
                    format!(
                        "ok: hook mode {}, ring buffer drained",
                        collected.mode.name()
                    ),
                ),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason.to_string()),
            }
        }
        "/" => text(StatusCode::OK, format!("kalive-daemon: {PATHS}")),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no page {other:?}; kalive-daemon serves {PATHS}"),
        ),
    }
}

fn metrics(context: &ServerContext) -> Answer {
    let started = Instant::now();
    let families = {
        let collected = context.shared.lock();
        let up = collected.health.check(started).is_ok();
        collected.metrics.collect(&collected.table, up, started)
    };
    let rendered = prometheus::TextEncoder::new().encode_to_string(&families);
    match rendered {
        Ok(body) => answer(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            body,
        ),
        // A partial exposition would look like vanished series: answer 500 instead.
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {err}"),
        ),
    }
}
