//! The dashboard's HTTP side against a real coordinator on loopback ports: its JSON API answers
//! what the gRPC reads answer, in the CLI's JSON shapes; its event stream resumes after the last
//! event seen without a gap or a repeat and carries new events live; with `--tokens` nothing is
//! readable without a viewer's token (header or login cookie). (The pages themselves are driven
//! in a real browser by `tests/tests/dashboard.rs`.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sweep_coordinator::auth::Tokens;
use sweep_coordinator::server::{self, Config, Running};
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;

const SPEC: &str = "\
name: dash
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 2]]
";

const VIEWER: &str = "viewer-token-0123456789";
const WORKER: &str = "worker-token-0123456789";

/// One HTTP/1.1 exchange: status, headers (lower-case names), body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    // Chunked bodies (JSON answers are short): drop the chunk sizes.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_string() };
    (status, headers, body)
}

fn unchunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn get_json(addr: SocketAddr, path: &str, auth: &[(&str, &str)]) -> Value {
    let (status, headers, body) = http(addr, "GET", path, auth, "");
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// An open event stream: `(id, event, data)` frames as they come.
struct Events {
    s: TcpStream,
    buf: String,
}

impl Events {
    fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Events {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Events { s, buf: String::new() }
    }

    /// The next frame with an id, within `wait`.
    fn next(&mut self, wait: Duration) -> Option<(u64, String, Value)> {
        let deadline = Instant::now() + wait;
        loop {
            // A frame ends with an empty line; chunk sizes of the transfer encoding sit on lines
            // of their own and are passed over.
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, String::new(), None);
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(v).ok();
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    return Some((id, kind, data));
                }
                continue;
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n]).replace("\r\n", "\n")),
                Err(_) => {}
            }
        }
    }
}

async fn start(tokens: Option<&str>) -> (tempfile::TempDir, Running, String, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tokens = tokens.map(|t| Arc::new(Tokens::parse(t).unwrap()));
    let running = server::start(config).await.unwrap();
    let url = format!("http://{}", running.addr);
    let http = running.metrics_addr.unwrap();
    (dir, running, url, http)
}

/// A channel whose calls carry `token`.
fn with_token(
    channel: Channel,
    token: Option<&str>,
) -> tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor + Clone> {
    let header: Option<tonic::metadata::MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse().unwrap());
    tonic::service::interceptor::InterceptedService::new(channel, move |mut r: tonic::Request<()>| {
        if let Some(h) = &header {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    })
}

/// Submits the spec and runs trial t000's epochs `epochs` (val accuracy 0.5 + 0.1 × epoch),
/// leaving it running; returns the sweep id and the attempt.
async fn submit_and_report(url: &str, token: Option<&str>, admin: Option<&str>) -> (String, v1::RegisterResponse, u64) {
    let channel = Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let mut sweeps = SweepServiceClient::new(with_token(channel.clone(), admin));
    let sweep = sweeps
        .submit_sweep(v1::SubmitSweepRequest {
            spec_yaml: SPEC.into(),
            source: "dash.yaml".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sweep_id;
    let mut workers = WorkerServiceClient::new(with_token(channel, token));
    let cpu = v1::Device { id: "cpu:0".into(), kind: "cpu".into(), name: "test".into(), memory_bytes: 0 };
    let w = workers
        .register(v1::RegisterRequest { name: "w".into(), devices: vec![cpu], version: "test".into() })
        .await
        .unwrap()
        .into_inner();
    let a = workers
        .acquire_trial(v1::AcquireTrialRequest {
            worker_id: w.worker_id.clone(),
            incarnation: w.incarnation,
            wait_ms: 0,
            session: w.session.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .assignment
        .unwrap();
    for epoch in 1..=2 {
        report(&mut workers, &w, a.attempt_id, epoch).await;
    }
    (sweep, w, a.attempt_id)
}

async fn report<T>(workers: &mut WorkerServiceClient<T>, w: &v1::RegisterResponse, attempt_id: u64, epoch: u32)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let m = v1::EpochMetrics {
        epoch,
        phase: if epoch == 1 { "feature_extraction" } else { "fine_tuning" }.into(),
        train_loss: 1.0,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.5 + 0.1 * f64::from(epoch),
        seconds: 2.0,
        ..Default::default()
    };
    workers
        .report_epoch(v1::ReportEpochRequest {
            attempt_id,
            metrics: Some(m),
            parameters: 11_000_000,
            worker_id: w.worker_id.clone(),
            session: w.session.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_what_the_grpc_reads_answer_in_the_clis_json_shapes() {
    let (_dir, running, url, addr) = start(None).await;
    let (sweep, _w, _attempt) = submit_and_report(&url, None, None).await;
    let mut c = SweepServiceClient::connect(url.clone()).await.unwrap();
    let board = c.get_leaderboard(v1::GetLeaderboardRequest { sweep_id: sweep.clone() }).await.unwrap().into_inner();
    let detail = c
        .get_trial(v1::GetTrialRequest { sweep_id: sweep.clone(), trial_id: "t000".into() })
        .await
        .unwrap()
        .into_inner();

    let (sweeps, whole, trial, workers) = tokio::task::spawn_blocking({
        let sweep = sweep.clone();
        move || {
            (
                get_json(addr, "/api/sweeps", &[]),
                get_json(addr, &format!("/api/sweeps/{sweep}"), &[]),
                get_json(addr, &format!("/api/sweeps/{sweep}/trials/t000"), &[]),
                get_json(addr, "/api/workers", &[]),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(sweeps[0]["id"], sweep.as_str());
    assert_eq!(sweeps[0]["best_val_accuracy"].as_f64(), Some(0.7));
    // The leaderboard as `sweep leaderboard -o json` prints it (the running trial's wall time
    // grows by itself between the two reads).
    let mut want = sweep_proto::json::leaderboard_json(&board);
    let mut got = whole["leaderboard"].clone();
    for v in [&mut want, &mut got] {
        for e in v.as_array_mut().unwrap() {
            e["wall_seconds"] = Value::Null;
        }
    }
    assert_eq!(got, want);
    assert_eq!(whole["trials"].as_array().unwrap().len(), 2);
    assert_eq!(whole["trials"][0]["metrics"].as_array().unwrap().len(), 2);
    assert_eq!(whole["trials"][0]["metrics"][1]["val_accuracy"].as_f64(), Some(0.7));
    assert!(whole["sequence"].as_u64().unwrap() > 0);
    let mut want = sweep_proto::json::trial_detail_json(&detail);
    let mut got = trial.clone();
    for v in [&mut want, &mut got] {
        v.as_object_mut().unwrap().remove("events");
    }
    assert_eq!(got, want);
    let notes: Vec<&str> = trial["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(notes.iter().filter(|t| **t == "epoch").count() == 2, "{notes:?}");
    assert_eq!(workers[0]["name"], "w");

    // The page and its files, every one embedded; the page allows nothing from elsewhere.
    let (status, headers, body) = tokio::task::spawn_blocking(move || http(addr, "GET", "/", &[], "")).await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("/assets/app.js") && body.contains("/assets/uPlot.iife.min.js"), "{body}");
    let csp = header(&headers, "content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    for (path, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/uPlot.iife.min.js", "text/javascript"),
        ("/assets/uPlot.min.css", "text/css"),
        ("/assets/uPlot.LICENSE", "text/plain"),
    ] {
        let (status, headers, body) =
            tokio::task::spawn_blocking(move || http(addr, "GET", path, &[], "")).await.unwrap();
        assert_eq!(status, 200, "{path}");
        assert!(header(&headers, "content-type").unwrap().starts_with(kind), "{path}");
        assert!(body.len() > 500, "{path}");
    }
    // Bad requests get a status and a JSON message naming what is wrong.
    for (path, code, says) in [
        ("/assets/nope.js", 404, "no such asset"),
        ("/api/sweeps/no-such-sweep", 404, "no-such-sweep"),
        ("/api/sweeps/%00%01", 404, "no sweep"),
        (&*format!("/api/sweeps/{sweep}/trials/t999"), 404, "t999"),
        (&*format!("/api/sweeps/{sweep}/events?after=x"), 400, "sequence number"),
    ] {
        let path = path.to_string();
        let (status, _, body) = tokio::task::spawn_blocking(move || http(addr, "GET", &path, &[], "")).await.unwrap();
        assert_eq!(status, code, "{body}");
        assert!(body.contains(says), "{body}");
    }
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_after_the_last_seen_without_gap_or_repeat_and_arrive_live() {
    let (_dir, running, url, addr) = start(None).await;
    let (sweep, w, attempt) = submit_and_report(&url, None, None).await;
    let path = format!("/api/sweeps/{sweep}/events");
    let (all, resumed) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            let mut stream = Events::open(addr, &path, &[]);
            let mut all = Vec::new();
            while let Some(frame) = stream.next(Duration::from_secs(2)) {
                all.push(frame);
            }
            // A browser reconnecting sends the last id it saw.
            let last_seen = all[1].0.to_string();
            let mut again = Events::open(addr, &path, &[("Last-Event-ID", &last_seen)]);
            let mut resumed = Vec::new();
            while let Some(frame) = again.next(Duration::from_secs(2)) {
                resumed.push(frame);
            }
            (all, resumed)
        }
    })
    .await
    .unwrap();
    let ids: Vec<u64> = all.iter().map(|f| f.0).collect();
    assert!(ids.len() >= 3 && ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(all.iter().any(|(_, kind, data)| kind == "epoch" && data["metrics"]["epoch"] == 2));
    assert_eq!(resumed.iter().map(|f| f.0).collect::<Vec<_>>(), ids[2..].to_vec(), "after the second: the rest, once");

    // Open, then an epoch is reported: it arrives on the open stream.
    let last = *ids.last().unwrap();
    let listening = tokio::task::spawn_blocking({
        let path = format!("{path}?after={last}");
        move || {
            let mut stream = Events::open(addr, &path, &[]);
            stream.next(Duration::from_secs(10))
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let channel = Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut workers = WorkerServiceClient::new(channel);
    report(&mut workers, &w, attempt, 3).await;
    let (id, kind, data) = listening.await.unwrap().expect("the new epoch arrives on the open stream");
    assert_eq!((id, kind.as_str()), (last + 1, "epoch"));
    assert_eq!(data["metrics"]["epoch"], 3);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_nothing_is_readable_without_a_viewers_token_by_header_or_login_cookie() {
    let tokens = format!("viewer {VIEWER} v\nworker {WORKER} w\nadmin admin-token-0123456789 a\n");
    let (_dir, running, url, addr) = start(Some(&tokens)).await;
    let (sweep, _w, _attempt) = submit_and_report(&url, Some(WORKER), Some("admin-token-0123456789")).await;
    let checks = tokio::task::spawn_blocking(move || {
        let api = format!("/api/sweeps/{sweep}");
        let events = format!("/api/sweeps/{sweep}/events");
        // Nothing without a token: the API says 401, a page sends to the login form.
        for path in ["/api/sweeps", api.as_str(), "/api/workers", events.as_str()] {
            let (status, _, body) = http(addr, "GET", path, &[], "");
            assert_eq!(status, 401, "{path}: {body}");
            assert!(!body.contains("dash.yaml") && !body.contains(&sweep), "{path} leaks: {body}");
        }
        let (status, headers, _) = http(addr, "GET", "/", &[], "");
        assert_eq!((status, header(&headers, "location")), (303, Some("/login")));
        // A wrong token, and a worker's, get nothing either.
        let (status, _, _) = http(addr, "GET", &api, &[("Authorization", "Bearer not-a-token-at-all-000")], "");
        assert_eq!(status, 401);
        let (status, _, body) = http(addr, "GET", &api, &[("Authorization", &format!("Bearer {WORKER}"))], "");
        assert_eq!(status, 403, "{body}");
        // A viewer's bearer token reads.
        assert_eq!(get_json(addr, &api, &[("Authorization", &format!("Bearer {VIEWER}"))])["id"], sweep.as_str());
        // The login form, its files and nothing else answer without a token.
        assert_eq!(http(addr, "GET", "/login", &[], "").0, 200);
        assert_eq!(http(addr, "GET", "/assets/app.css", &[], "").0, 200);
        let form = [("Content-Type", "application/x-www-form-urlencoded")];
        let (status, _, body) = http(addr, "POST", "/login", &form, "token=wrong-token-0000000000");
        assert_eq!(status, 401);
        assert!(body.contains("not valid"), "{body}");
        let (status, _, _) = http(addr, "POST", "/login", &form, &format!("token={WORKER}"));
        assert_eq!(status, 403);
        let (status, headers, _) = http(addr, "POST", "/login", &form, &format!("token={VIEWER}"));
        assert_eq!((status, header(&headers, "location")), (303, Some("/")));
        let cookie = header(&headers, "set-cookie").unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        assert_eq!(get_json(addr, &api, &[("Cookie", &pair)])["id"], sweep.as_str());
        // A proxy's own Authorization (Basic) does not hide the cookie.
        let basic = [("Cookie", pair.as_str()), ("Authorization", "Basic dXNlcjpwYXNz")];
        assert_eq!(get_json(addr, &api, &basic)["id"], sweep.as_str());
        // Another site's page cannot log a browser in (or out).
        let cross = [("Content-Type", "application/x-www-form-urlencoded"), ("Sec-Fetch-Site", "cross-site")];
        assert_eq!(http(addr, "POST", "/login", &cross, &format!("token={VIEWER}")).0, 403);
        assert_eq!(http(addr, "POST", "/logout", &cross, "").0, 403);
        assert_eq!(http(addr, "GET", "/", &[("Cookie", &pair)], "").0, 200);
        let mut stream = Events::open(addr, &events, &[("Cookie", &pair)]);
        assert!(stream.next(Duration::from_secs(5)).is_some(), "the cookie opens the event stream");
        // Logging out removes the cookie.
        let (status, headers, _) = http(addr, "POST", "/logout", &[("Cookie", &pair)], "");
        assert_eq!(status, 303);
        assert!(header(&headers, "set-cookie").unwrap().contains("Max-Age=0"));
    });
    checks.await.unwrap();
    running.stop().await.unwrap();
}

/// A GET over TLS trusting only `ca_pem`: status and the response head and body.
async fn tls_get(addr: SocketAddr, ca_pem: &str, request: String) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_the_http_port_speaks_tls_and_the_login_cookie_is_secure() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("state"));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls = Some(server::TlsFiles { cert: cert_path, key: key_path, client_ca: None });
    config.tokens = Some(Arc::new(Tokens::parse(&format!("viewer {VIEWER} v\n")).unwrap()));
    let running = server::start(config).await.unwrap();
    let addr = running.metrics_addr.unwrap();
    let pem = cert.cert.pem();
    let get =
        |path: &str, extra: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n");
    let answer = tls_get(addr, &pem, get("/api/sweeps", &format!("Authorization: Bearer {VIEWER}\r\n"))).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("[]"), "{answer}");
    let login = format!(
        "POST /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\ntoken={VIEWER}",
        VIEWER.len() + 6
    );
    let answer = tls_get(addr, &pem, login).await.unwrap();
    let cookie = answer.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap_or_default();
    assert!(
        cookie.contains("__Host-sweep_token=") && cookie.contains("HttpOnly") && cookie.contains("Secure"),
        "{answer}"
    );
    // Plain HTTP on that port gets no answer; a client that does not trust the certificate
    // gets no connection.
    let (status, _, _) = tokio::task::spawn_blocking(move || http(addr, "GET", "/healthz", &[], "")).await.unwrap();
    assert_eq!(status, 0, "no plain-text answer");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    assert!(tls_get(addr, &other.cert.pem(), get("/healthz", "")).await.is_err());
    running.stop().await.unwrap();

    // Client certificates but no tokens: a browser has no certificate, so the dashboard says
    // it needs tokens (and /metrics, /healthz answer as before).
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("state"));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.tls = Some(server::TlsFiles { cert: cert_path.clone(), key: key_path, client_ca: Some(cert_path) });
    let running = server::start(config).await.unwrap();
    let addr = running.metrics_addr.unwrap();
    let answer = tls_get(addr, &pem, get("/api/sweeps", "")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("needs --tokens"), "{answer}");
    let answer = tls_get(addr, &pem, get("/", "")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = tls_get(addr, &pem, get("/healthz", "")).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_download_from_the_artifact_store_only_as_their_reference_says() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let artifacts = dir.path().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let artifacts = artifacts.canonicalize().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("state"));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.artifacts = Some(artifacts.display().to_string());
    let running = server::start(config).await.unwrap();
    let (url, addr) = (format!("http://{}", running.addr), running.metrics_addr.unwrap());
    let (sweep, w, attempt) = submit_and_report(&url, None, None).await;
    // Epoch 3's weights, written where a worker puts them, and reported with their hash.
    let file = artifacts.join(&sweep).join("t000").join("best.safetensors");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let weights = b"not really safetensors, but bytes all the same".repeat(1000);
    std::fs::write(&file, &weights).unwrap();
    let sha = sha2::Sha256::digest(&weights).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let reference = v1::CheckpointRef {
        uri: file.display().to_string(),
        sha256: sha.clone(),
        bytes: weights.len() as u64,
        epoch: 3,
    };
    let channel = Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut workers = WorkerServiceClient::new(channel);
    let m = v1::EpochMetrics {
        epoch: 3,
        phase: "fine_tuning".into(),
        train_loss: 1.0,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.9,
        seconds: 2.0,
        ..Default::default()
    };
    workers
        .report_epoch(v1::ReportEpochRequest {
            attempt_id: attempt,
            metrics: Some(m),
            best_checkpoint: Some(reference),
            worker_id: w.worker_id.clone(),
            session: w.session.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let path = format!("/api/sweeps/{sweep}/trials/t000/checkpoints/best");
    let checks = tokio::task::spawn_blocking(move || {
        let (status, headers, body) = http(addr, "GET", &path, &[], "");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.as_bytes(), &weights[..], "the file, whole");
        assert_eq!(header(&headers, "x-checkpoint-sha256"), Some(sha.as_str()));
        let disposition = header(&headers, "content-disposition").unwrap();
        assert!(disposition.contains(&format!("{sweep}-t000-best-e3.safetensors")), "{disposition}");
        // What cannot be served says why.
        for (p, code, says) in [
            (format!("/api/sweeps/{sweep}/trials/t001/checkpoints/last"), 404, "no last checkpoint yet"),
            (format!("/api/sweeps/{sweep}/trials/t000/checkpoints/state"), 404, "`best` and a `last`"),
            (format!("/api/sweeps/{sweep}/trials/t009/checkpoints/best"), 404, "t009"),
        ] {
            let (status, _, body) = http(addr, "GET", &p, &[], "");
            assert_eq!(status, code, "{p}: {body}");
            assert!(body.contains(says), "{p}: {body}");
        }
        // A file changed in the store is not delivered: at another size, refused at once; at the
        // same size, cut short (the hash is known only at its end) — never sent whole.
        let mut same_size = weights.clone();
        same_size[weights.len() - 1] ^= 1;
        std::fs::write(&file, &same_size).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        // The connection ends early (closed or reset): what came before it is the answer.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains(&format!("content-length: {}", weights.len())), "{head}");
        assert!(body.len() < weights.len(), "a file that does not match its hash was sent whole");
        std::fs::write(&file, b"tampered").unwrap();
        let (status, _, body) = http(addr, "GET", &path, &[], "");
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("does not match its reference"), "{body}");
        std::fs::remove_file(&file).unwrap();
        let (status, _, body) = http(addr, "GET", &path, &[], "");
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("gone from the artifact store"), "{body}");
    });
    checks.await.unwrap();
    running.stop().await.unwrap();

    // A coordinator that does not know the store says where the file is.
    let (_dir, running, url, addr) = start(None).await;
    let (sweep, _w, _attempt) = submit_and_report(&url, None, None).await;
    let path = format!("/api/sweeps/{sweep}/trials/t000/checkpoints/last");
    let (status, _, body) = tokio::task::spawn_blocking(move || http(addr, "GET", &path, &[], "")).await.unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("no last checkpoint yet") || body.contains("without --artifacts"), "{body}");
    running.stop().await.unwrap();
}
