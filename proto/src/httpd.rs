//! A small HTTP/1.1 endpoint for what is not gRPC: Prometheus scrapes (`/metrics`) and
//! Kubernetes HTTP probes (`/healthz`). GET and HEAD only, one request per connection, bounded
//! request size and time; the answers come from a handler the coordinator or worker supplies.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An answer: status code, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
}

/// What answers a path (without its query string).
pub type Handler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// Connections waiting — for their whole request head, or for a turn to be answered — at most.
/// When one more arrives, the one that has waited longest is closed: idle or slow connections
/// (slowloris) cannot keep a probe out, because a probe sends its request at once and is
/// answered in a moment.
const MAX_WAITING: usize = 64;
/// Connections being answered at once, at most (answers are quick). With [`MAX_WAITING`], this
/// bounds the descriptors the endpoint holds.
const MAX_ANSWERING: usize = 64;
/// How long a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may take in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The waiting connections, oldest first, each with its abort handle.
#[derive(Default)]
struct Waiting {
    next: u64,
    queue: std::collections::VecDeque<(u64, tokio::task::AbortHandle)>,
}

/// Binds `addr` and serves `handler` until the returned task is aborted; returns the bound
/// address (port 0 picks a free one) and the task.
pub async fn serve(addr: SocketAddr, handler: Handler) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let answering = Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING));
    let waiting = Arc::new(std::sync::Mutex::new(Waiting::default()));
    let task = tokio::spawn(async move {
        loop {
            let conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(_) => {
                    // Out of descriptors, or a connection reset before it was accepted: no spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let id = {
                let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                // Room for this one: the longest-waiting connections go first (at most
                // MAX_WAITING wait at once, so descriptors stay bounded too).
                while w.queue.len() >= MAX_WAITING {
                    if let Some((_, oldest)) = w.queue.pop_front() {
                        oldest.abort();
                    }
                }
                w.next += 1;
                w.next
            };
            let (h, answering, w) = (handler.clone(), Arc::clone(&answering), Arc::clone(&waiting));
            // The connection is queued before it runs, so it can never leave the queue before
            // it entered it.
            let (start, started) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(async move {
                if started.await.is_ok() {
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(conn, h, id, &w, &answering)).await;
                }
                done_waiting(&w, id);
            });
            waiting.lock().unwrap_or_else(|p| p.into_inner()).queue.push_back((id, served.abort_handle()));
            let _ = start.send(());
        }
    });
    Ok((bound, task))
}

/// Takes connection `id` off the waiting queue (it is being answered, or it ended).
fn done_waiting(waiting: &std::sync::Mutex<Waiting>, id: u64) {
    let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
    w.queue.retain(|(i, _)| *i != id);
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

async fn answer(
    mut conn: TcpStream,
    handler: Handler,
    id: u64,
    waiting: &std::sync::Mutex<Waiting>,
    answering: &tokio::sync::Semaphore,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            // Still one of the waiting (evictable) connections while it drains.
            write(&mut conn, Reply::text(431, "request head too large\n"), false).await?;
            // Read what the client still sends, so that closing does not reset the connection
            // (and discard the reply) while its data is unread.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            })
            .await;
            return Ok(());
        }
        let n = match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(read) => read?,
            // Too slow to ask: closed without an answer.
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    // Its turn (it stays evictable while it waits for one), then it is no longer one of the
    // waiting connections a newcomer may push out.
    let Ok(_slot) = answering.acquire().await else { return Ok(()) };
    done_waiting(waiting, id);
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return write(&mut conn, Reply::text(400, "not an HTTP/1 request\n"), false).await;
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return write(&mut conn, Reply::text(405, "GET or HEAD only\n"), false).await;
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    let reply = handler(path).await;
    write(&mut conn, reply, head_only).await
}

async fn write(conn: &mut TcpStream, r: Reply, head_only: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    conn.write_all(&out).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn paths_methods_and_malformed_requests() {
        let handler: Handler = Arc::new(|path: String| {
            Box::pin(async move {
                match path.as_str() {
                    "/metrics" => {
                        Reply { status: 200, content_type: "text/plain; version=0.0.4", body: "up 1\n".into() }
                    }
                    _ => Reply::text(404, "no such page\n"),
                }
            })
        });
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), handler).await.unwrap();
        let ok = get(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nup 1\n"), "{ok}");
        assert!(ok.contains("Content-Length: 5\r\n"), "{ok}");
        let head = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        assert!(get(addr, "garbage\r\n\r\n").await.starts_with("HTTP/1.1 400"));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        assert!(get(addr, &huge).await.starts_with("HTTP/1.1 431"));
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_slow_connections_never_keep_a_probe_out() {
        let handler: Handler = Arc::new(|_path: String| Box::pin(async { Reply::text(200, "ok\n") }));
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), handler).await.unwrap();
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
            let reply = tokio::time::timeout(Duration::from_secs(2), get(addr, "GET /healthz HTTP/1.1\r\n\r\n"))
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
