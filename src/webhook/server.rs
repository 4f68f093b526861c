//! The HTTPS server: one route per kind and endpoint, AdmissionReview v1 in and out.
//!
//! Malformed bodies get a 400 with the parse error, oversized ones a 413, slow ones a 408; an
//! admission decision is always a 200 carrying `allowed` and, when denied, the reasons.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower_http::timeout::TimeoutLayer;

use super::admission::{self, AdmissionPolicy, Endpoint, Kind};
use super::tls::CertStore;

/// Largest AdmissionReview accepted. The apiserver stores no object over etcd's request limit
/// (1.5 MiB, `--max-request-bytes`), and a review carries at most two (an UPDATE's `object` and
/// `oldObject`): ~3 MiB, plus the request envelope; 3.5 MiB leaves room for that and for JSON
/// re-encoding. Larger bodies get a 413 (before they are read, when their length is declared).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024 + 512 * 1024;
/// Per-request deadline, below the apiserver's webhook timeout (10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// The admission routes, with body limit and timeout, deciding under `policy`.
pub fn router(policy: AdmissionPolicy) -> Router {
    let mut router = Router::new();
    for kind in Kind::ALL {
        for endpoint in [Endpoint::Mutate, Endpoint::Validate] {
            router = router.route(
                &kind.path(endpoint),
                post(move |body: Bytes| async move { handle(kind, endpoint, &body, &policy) }),
            );
        }
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

/// Decodes one AdmissionReview and answers it under `policy`. Public for tests, benchmarks and
/// fuzzing.
pub fn handle(kind: Kind, endpoint: Endpoint, body: &[u8], policy: &AdmissionPolicy) -> Response {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("malformed AdmissionReview: {error}"),
            )
                .into_response();
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return (StatusCode::BAD_REQUEST, "AdmissionReview without a request").into_response();
        }
    };
    let response = admission::review(kind, endpoint, &request, policy);
    let operation = match request.operation {
        kube::core::admission::Operation::Create => "CREATE",
        kube::core::admission::Operation::Update => "UPDATE",
        kube::core::admission::Operation::Delete => "DELETE",
        kube::core::admission::Operation::Connect => "CONNECT",
    };
    crate::metrics::global().admission(kind.name(), operation, response.allowed);
    tracing::debug!(
        kind = kind.name(),
        endpoint = endpoint.prefix(),
        namespace = request.namespace.as_deref().unwrap_or_default(),
        name = %request.name,
        operation = ?request.operation,
        allowed = response.allowed,
        "admission"
    );
    axum::Json(response.into_review()).into_response()
}

// ---------------------------------------------------------------- the listener
//
// The accept loop is ours (not a framework's) so that every resource a client can hold is
// bounded: a connection slot (at most `MAX_CONNECTIONS`; beyond that, new connections wait in
// the kernel's listen backlog, costing us no file descriptor), the TLS handshake
// (`TLS_HANDSHAKE_TIMEOUT`), an HTTP/1 request head or an idle keep-alive connection
// (`HEADER_READ_TIMEOUT`), a connection on which nothing moves (`IDLE_TIMEOUT`), and the request
// bodies being decoded at once (`MAX_IN_FLIGHT_BYTES`). Nothing a client does is logged above
// debug level.

/// Most connections served at once. Further connections are not accepted until one closes: they
/// wait in the kernel's listen backlog (no descriptor or memory of ours) and are served in turn.
/// kube-apiservers open a handful each (HTTP/2 multiplexes their requests).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections the kernel holds for us beyond the ones served (capped by `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 1024;
/// Deadline of a TLS handshake, from the accepted TCP connection to the first request byte.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of an HTTP/1 request head (request line and headers), counted from when the
/// connection starts waiting for it: a client trickling its headers, or a keep-alive connection
/// left idle that long, is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which no byte moved either way for this long is shut down (gracefully: an
/// HTTP/2 client gets a GOAWAY), and dropped `CLOSE_GRACE` later if it does not finish.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection being shut down (idle, or on server shutdown) may take to finish.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Bytes of request bodies admitted at once, across all connections. A request reserves its
/// declared length (the maximum when undeclared) before its body is read and releases it when its
/// answer is ready; when the budget is spent it waits up to `BUDGET_WAIT`, then gets a 503.
/// Decoding multiplies a review's size in memory: the `admission` benchmark measured ~100 MiB
/// of peak resident memory for one 3.5 MiB review of small annotations, and ~235 MiB for 32 sent
/// at once with this budget (two decoded at a time, whatever the number of cores), against
/// ~325 MiB without it on 2 cores (there the runtime's 2 threads decode 2 at a time, and all 32
/// bodies are buffered; the peak grows with cores and burst size).
pub const MAX_IN_FLIGHT_BYTES: usize = 2 * MAX_BODY_BYTES;
/// Longest wait for a share of `MAX_IN_FLIGHT_BYTES`.
pub const BUDGET_WAIT: Duration = Duration::from_secs(5);
/// HTTP/2 streams (requests) open at once on one connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 32;
/// Largest request head: an HTTP/2 header block, or the HTTP/1 read buffer (which must hold the
/// request line and headers). The apiserver's are well under 1 KiB.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// HTTP/2 flow-control windows: what a client may send ahead of our reading it, per stream and per
/// connection (bounds the memory an HTTP/2 connection can fill before its budget is granted).
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// See [`H2_STREAM_WINDOW`].
pub const H2_CONNECTION_WINDOW: u32 = 512 * 1024;
/// TCP keepalive on accepted connections: first probe after this much silence...
pub const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(30);
/// ...then one probe per interval; the connection is dropped after `TCP_KEEPALIVE_RETRIES`
/// unanswered ones.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`TCP_KEEPALIVE_INTERVAL`].
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Serves the webhooks over TLS on `addr` until `shutdown` resolves, then drains in-flight
/// requests (up to [`CLOSE_GRACE`]).
pub async fn serve(
    addr: SocketAddr,
    certs: Arc<CertStore>,
    policy: AdmissionPolicy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    tracing::info!(address = %listener.local_addr()?, "webhook server listening");
    serve_listener(listener, certs.server_config()?, router(policy), shutdown).await;
    Ok(())
}

/// Serves `app` over TLS with `tls` on an already bound `listener` until `shutdown` resolves,
/// with every limit of this module; then stops accepting and gives open connections
/// [`CLOSE_GRACE`] to finish. [`serve`] binds the listener and passes the webhook routes.
pub async fn serve_listener(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let budget = Budget(Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES.div_ceil(1024))));
    let server = Arc::new(Server {
        acceptor: TlsAcceptor::from(tls),
        http1: http_builder().http1_only(),
        http2: http_builder().http2_only(),
        app: app.layer(axum::middleware::from_fn_with_state(budget, reserve_budget)),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut accepting = stop.clone();
    loop {
        while connections.try_join_next().is_some() {}
        // Take a slot before accepting, so that connections over the cap stay in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = stopped(&mut accepting) => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut accepting) => break,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(error) if is_per_connection(&error) => {
                tracing::debug!(%error, "accepting a connection failed");
                continue;
            }
            Err(error) => {
                // Out of descriptors or memory: back off (this also bounds the log rate).
                tracing::warn!(%error, "accepting connections failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        configure_socket(&tcp);
        let (server, stop) = (server.clone(), stop.clone());
        connections.spawn(async move {
            server.connection(tcp, stop).await;
            drop(slot);
        });
    }
    drop(listener);
    // Each connection finishes within CLOSE_GRACE of the stop; a little slack, then abort.
    let drained = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
}

/// Accept errors that concern one connection only (the client went away before we accepted).
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) || error.raw_os_error() == Some(EPROTO)
}

/// Linux's EPROTO: a protocol error on a connection waiting to be accepted.
const EPROTO: i32 = 71;

/// TCP_NODELAY (an answer is written in a few segments; Nagle's algorithm would hold the last one
/// back until the client's delayed ACK, ~40 ms) and TCP keepalive (finds peers that vanished).
/// Failures only cost performance: logged at debug level.
fn configure_socket(tcp: &TcpStream) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "setting TCP_NODELAY failed");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_TIME)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(error) = SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "setting TCP keepalive failed");
    }
}

/// The HTTP/1.1 and HTTP/2 settings; each connection uses one protocol, chosen by ALPN.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    builder
}

/// What every connection shares.
struct Server {
    acceptor: TlsAcceptor,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    app: Router,
}

impl Server {
    /// Serves one accepted connection until it ends, idles out or the server stops.
    async fn connection(&self, tcp: TcpStream, mut stop: watch::Receiver<bool>) {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: tcp,
            activity: activity.clone(),
        };
        let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, self.acceptor.accept(io));
        let tls = tokio::select! {
            result = handshake => match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            },
            () = stopped(&mut stop) => return,
        };
        let builder = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            &self.http2
        } else {
            &self.http1
        };
        let service = TowerToHyperService::new(self.app.clone());
        let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(tls), service));
        let mut closing: Option<tokio::time::Instant> = None;
        loop {
            let idle_deadline = activity.last() + IDLE_TIMEOUT;
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "webhook connection ended with an error");
                    }
                    return;
                }
                () = stopped(&mut stop), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                }
                () = tokio::time::sleep_until(idle_deadline), if closing.is_none() => {
                    if activity.last() + IDLE_TIMEOUT <= tokio::time::Instant::now() {
                        tracing::debug!("closing an idle webhook connection");
                        conn.as_mut().graceful_shutdown();
                        closing = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
                }
                () = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)),
                    if closing.is_some() => return,
            }
        }
    }
}

/// Resolves once the server stops (or its stop channel is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// When bytes last moved on a connection.
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A TCP stream that records in [`Activity`] when bytes move.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The in-flight body budget, in KiB units.
#[derive(Clone)]
struct Budget(Arc<Semaphore>);

/// Budget units (KiB, rounded up) for `bytes`.
fn budget_units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Reserves the request's share of [`MAX_IN_FLIGHT_BYTES`] until its answer is ready. A declared
/// length over [`MAX_BODY_BYTES`] gets its 413 before anything is read.
async fn reserve_budget(State(budget): State<Budget>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let bytes = match declared {
        Some(length) if length > MAX_BODY_BYTES as u64 => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY_BYTES} bytes"),
            )
                .into_response();
        }
        // At least 1 KiB each, so that the budget also caps the number of requests.
        Some(length) => usize::try_from(length).unwrap_or(MAX_BODY_BYTES).max(1024),
        None => MAX_BODY_BYTES,
    };
    let reserved = tokio::time::timeout(
        BUDGET_WAIT,
        budget.0.acquire_many_owned(budget_units(bytes)),
    )
    .await;
    let Ok(Ok(_permit)) = reserved else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the webhook is busy with other large requests; retry",
        )
            .into_response();
    };
    next.run(request).await
}
