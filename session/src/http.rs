//! HTTP beside gRPC, for the coordinator and the worker alike: Prometheus scrapes (`/metrics`),
//! Kubernetes probes (`/healthz`) and, on the coordinator, the pages to come. The routes are an
//! [`axum::Router`] the caller builds; [`serve`] puts it behind an accept loop that a crowd of
//! idle or slow connections cannot starve:
//!
//! - a connection that has not sent its whole request head is *waiting*; at most
//!   [`MAX_WAITING`] wait, and when one more arrives the one that has waited longest is closed
//!   (slowloris cannot keep a probe out: a probe sends its request at once);
//! - at most [`MAX_ANSWERING`] connections are answered at once (a stream — server-sent
//!   events, a large download — is answered for as long as it lasts, so it holds its place);
//!   a newcomer past that waits for a place, evictable as above;
//! - a request head must arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`] bytes (else
//!   `431`), and a handler must produce its response head within [`HANDLER_TIMEOUT`] (else
//!   `503`); one request per connection.
//!
//! Bodies are bytes (binary downloads) or streams (server-sent events); [`metrics_response`]
//! encodes a `prometheus-client` registry in the OpenMetrics text format.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// Connections waiting — for their whole request head, or for a place to be answered — at most.
pub const MAX_WAITING: usize = 64;
/// Connections answered at once, at most. With [`MAX_WAITING`], this bounds the descriptors
/// the endpoint holds.
pub const MAX_ANSWERING: usize = 64;
/// How long a connection may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head.
pub const MAX_HEAD: usize = 8 << 10;
/// How long a handler may take to produce its response head (a stream's body may go on).
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(10);

/// The bounds of an endpoint; [`Limits::default`] holds the constants above.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_waiting: usize,
    pub max_answering: usize,
    pub head_timeout: Duration,
    pub handler_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_waiting: MAX_WAITING,
            max_answering: MAX_ANSWERING,
            head_timeout: HEAD_TIMEOUT,
            handler_timeout: HANDLER_TIMEOUT,
        }
    }
}

/// The waiting connections, oldest first, each with its abort handle.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: VecDeque<(u64, tokio::task::AbortHandle)>,
}

impl Waiting {
    fn remove(this: &Mutex<Waiting>, id: u64) {
        this.lock().unwrap_or_else(|p| p.into_inner()).queue.retain(|(i, _)| *i != id);
    }
}

/// Binds `addr` and serves `app` until the returned task is aborted; returns the bound address
/// (port 0 picks a free one) and the task.
pub async fn serve(addr: SocketAddr, app: Router) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, app, Limits::default(), None).await
}

/// A TLS server configuration for [`serve_with`].
pub type Tls = Arc<tokio_rustls::rustls::ServerConfig>;

/// TLS from a PEM certificate chain and its PEM private key (PKCS#8, PKCS#1 or SEC1), with
/// rustls' safe defaults (TLS 1.2 and 1.3) on aws-lc; errors say which part is wrong.
pub fn tls_from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Tls, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the key is not a PEM private key: {e}"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`serve`] with other bounds, and TLS on every connection when `tls` is given (a connection
/// that does not complete its handshake within the head timeout is closed).
pub async fn serve_with(
    addr: SocketAddr,
    app: Router,
    limits: Limits,
    tls: Option<Tls>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let max_waiting = limits.max_waiting.max(1);
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let answering = Arc::new(Semaphore::new(limits.max_answering.max(1)));
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of descriptors, or a connection reset before it was accepted: no spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let id = {
                let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                while w.queue.len() >= max_waiting {
                    if let Some((_, oldest)) = w.queue.pop_front() {
                        oldest.abort();
                    }
                }
                w.next += 1;
                w.next
            };
            let (app, answering, w, acceptor) =
                (app.clone(), Arc::clone(&answering), Arc::clone(&waiting), acceptor.clone());
            // Queued before it runs, so it cannot leave the queue before it entered it.
            let (start, started) = tokio::sync::oneshot::channel::<()>();
            let conn = tokio::spawn(async move {
                if started.await.is_ok() {
                    match acceptor {
                        None => connection(TokioIo::new(stream), app, id, &w, answering, limits).await,
                        Some(acceptor) => {
                            if let Ok(Ok(tls)) =
                                tokio::time::timeout(limits.head_timeout, acceptor.accept(stream)).await
                            {
                                connection(TokioIo::new(tls), app, id, &w, answering, limits).await;
                            }
                        }
                    }
                }
                Waiting::remove(&w, id);
            });
            waiting.lock().unwrap_or_else(|p| p.into_inner()).queue.push_back((id, conn.abort_handle()));
            let _ = start.send(());
        }
    });
    Ok((bound, task))
}

/// One connection: its request head (while waiting), a place among the answering, the answer.
async fn connection<I>(
    io: I,
    app: Router,
    id: u64,
    waiting: &Arc<Mutex<Waiting>>,
    answering: Arc<Semaphore>,
    limits: Limits,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // The place this connection holds once its request has arrived, for as long as it lives.
    let place: Arc<Mutex<Option<OwnedSemaphorePermit>>> = Arc::default();
    let handle = {
        let (waiting, place) = (Arc::clone(waiting), Arc::clone(&place));
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let (app, answering, waiting, place) =
                (app.clone(), Arc::clone(&answering), Arc::clone(&waiting), Arc::clone(&place));
            async move {
                // Waits for a place while still evictable, then leaves the waiting queue.
                let Ok(permit) = answering.acquire_owned().await else {
                    return Ok::<_, Infallible>(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"));
                };
                *place.lock().unwrap_or_else(|p| p.into_inner()) = Some(permit);
                Waiting::remove(&waiting, id);
                let answer = app.oneshot(request.map(Body::new));
                Ok(match tokio::time::timeout(limits.handler_timeout, answer).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "no answer in time\n"),
                })
            }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false).timer(TokioTimer::new()).header_read_timeout(limits.head_timeout).max_buf_size(MAX_HEAD);
    let _ = http.serve_connection(io, handle).await;
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

/// Content type of the OpenMetrics text format (Prometheus reads it).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `value` made safe for a label value: `prometheus-client` writes label values as given, so a
/// quote, a backslash or a line break (a device name, a state read back from a damaged store)
/// would end the value early or start a forged sample line. Escaped as the text formats say.
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `registry` in the OpenMetrics text format.
pub fn metrics_response(registry: &prometheus_client::registry::Registry) -> Response<Body> {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], out).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the metrics: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::sse::{Event, Sse};
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get_raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut out)).await;
        out
    }

    async fn request(addr: SocketAddr, request: &str) -> String {
        String::from_utf8_lossy(&get_raw(addr, request.as_bytes()).await).into_owned()
    }

    fn app() -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/bytes",
                get(|| async { ([(header::CONTENT_TYPE, "application/octet-stream")], vec![0u8, 255, 10, 13, 0]) }),
            )
            .route(
                "/events",
                get(|| async {
                    let events = futures_stream(3);
                    Sse::new(events)
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "late"
                }),
            )
    }

    /// Three events, 300 ms apart.
    fn futures_stream(n: u64) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> {
        use tokio_stream::StreamExt;
        tokio_stream::iter(0..n).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Event::default().id(i.to_string()).data(format!("epoch {i}")))
        })
    }

    #[test]
    fn label_values_cannot_end_early_or_start_a_line() {
        assert_eq!(label("cuda:0"), "cuda:0");
        assert_eq!(label("a\"b\\c\nsweep_up 1"), "a\\\"b\\\\c\\nsweep_up 1");
        let family = prometheus_client::metrics::family::Family::<
            Vec<(&'static str, String)>,
            prometheus_client::metrics::gauge::Gauge,
        >::default();
        family.get_or_create(&vec![("device", label("x\"} 9\nforged 1"))]).set(1);
        let mut r = prometheus_client::registry::Registry::default();
        r.register("m", "M", family);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(out.contains("m{device=\"x\\\"} 9\\nforged 1\"} 1\n"), "{out}");
        assert!(!out.lines().any(|l| l.starts_with("forged")), "{out}");
    }

    #[tokio::test]
    async fn paths_methods_binary_bodies_and_malformed_requests() {
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), app()).await.unwrap();
        let ok = request(addr, "GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nok\n"), "{ok}");
        assert!(ok.to_ascii_lowercase().contains("content-length: 3\r\n"), "{ok}");
        let head = request(addr, "HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head}");
        let bytes = get_raw(addr, b"GET /bytes HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(bytes.ends_with(b"\r\n\r\n\x00\xff\n\r\x00"), "{bytes:?}");
        assert!(request(addr, "GET /nope HTTP/1.1\r\nHost: a\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(
            request(addr, "POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405")
        );
        assert!(request(addr, "garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        assert!(request(addr, &huge).await.starts_with("HTTP/1.1 431"));
        task.abort();
    }

    #[tokio::test]
    async fn server_sent_events_stream_and_a_slow_handler_is_cut_off() {
        let limits = Limits { handler_timeout: Duration::from_secs(1), ..Limits::default() };
        let (addr, task) = serve_with("127.0.0.1:0".parse().unwrap(), app(), limits, None).await.unwrap();
        let events = request(addr, "GET /events HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(events.contains("content-type: text/event-stream"), "{events}");
        for i in 0..3 {
            assert!(events.contains(&format!("id: {i}\ndata: epoch {i}\n\n")), "{events}");
        }
        let answer = request(addr, "GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_slow_connections_never_keep_a_probe_out() {
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), app()).await.unwrap();
        // Slowloris: many connections that never finish their request (some send half a line).
        let mut idle = Vec::new();
        for i in 0..3 * MAX_WAITING {
            let mut c = TcpStream::connect(addr).await.unwrap();
            if i % 2 == 0 {
                c.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await.unwrap();
            }
            idle.push(c);
        }
        // A probe still gets its answer at once, again and again.
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let reply =
                tokio::time::timeout(Duration::from_secs(2), request(addr, "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"))
                    .await
                    .expect("the probe was kept out");
            assert!(reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"), "{reply}");
            assert!(started.elapsed() < Duration::from_secs(2));
        }
        // The oldest idle connections were closed to make room: reading them ends.
        let mut closed = 0;
        for c in idle.iter_mut().take(MAX_WAITING) {
            let mut b = [0u8; 16];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(1), c.read(&mut b)).await {
                closed += 1;
            }
        }
        assert!(closed >= MAX_WAITING / 2, "only {closed} of the oldest idle connections were closed");
        task.abort();
    }
}
