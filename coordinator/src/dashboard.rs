//! The dashboard on the coordinator's HTTP port: a single page (every asset embedded in the
//! binary: `coordinator/assets/`, uPlot vendored from npm with its licence) and the JSON API it
//! reads, live through server-sent events.
//!
//! | route | answers |
//! |---|---|
//! | `/` | the page (`index.html`; views by URL fragment: `#/`, `#/sweep/ID`, `#/sweep/ID/trial/T`, `#/workers`, `#/compare/A,B`) |
//! | `/assets/NAME` | its script, style sheet and the vendored chart library |
//! | `/api/sweeps` | every sweep (`sweep list -o json`), each with `best_val_accuracy` |
//! | `/api/sweeps/ID` | `sweep export ID -o json`: the sweep, every trial with its epochs and attempts, and the leaderboard (`sweep leaderboard -o json`) |
//! | `/api/sweeps/ID/trials/T` | `sweep trial ID T -o json`, with the trial's events |
//! | `/api/sweeps/ID/trials/T/checkpoints/best` (or `last`) | the checkpoint file, from the artifact store of `--artifacts`, checked against the SHA-256 its reference holds |
//! | `/api/workers` | `sweep workers -o json` |
//! | `/api/sweeps/ID/events` | server-sent events: every event of the sweep after `Last-Event-ID` (or `?after=N`), each with its sequence number as its id, then the new ones as they are stored |
//! | `/login`, `/logout` | with `--tokens`: a form that sets the token as an HttpOnly cookie, and its removal |
//!
//! The JSON is `sweep_proto::json`'s, the very shapes `--output json` prints. With `--tokens`,
//! nothing but `/login` and the assets is answered without a token of role viewer or above
//! (`Authorization: Bearer TOKEN`, or the cookie the login form sets): `401` without one (a
//! page request is sent to the login form), `403` for a worker's token. Names are shown as
//! text, never as markup, with control characters escaped; a strict content security policy
//! allows nothing but the coordinator's own scripts and styles.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sweep_proto::{json as shape, v1};
use tonic::Status;

use crate::auth::Role;
use crate::server::Shared;

/// The cookie the login form sets: over TLS with the `__Host-` prefix (Secure, this host's
/// site only, no Domain), which browsers refuse without TLS.
const COOKIE: &str = "sweep_token";
const SECURE_COOKIE: &str = "__Host-sweep_token";
/// How long a login lasts.
const LOGIN_SECONDS: u32 = 12 * 3600;
/// A server-sent event stream ends after this long (the browser reconnects at once, from the
/// last event it saw), so a tab left open, or a peer gone without closing, holds no connection
/// for long.
const STREAM_LIFETIME: Duration = Duration::from_secs(300);
/// Checkpoint downloads at once (each streams from the artifact store).
const DOWNLOADS: usize = 2;
/// Events sent per store read of a stream.
const EVENT_PAGE: usize = 500;
/// A comment line keeps an idle stream (and the proxies on its way) open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events of one trial a trial view shows, newest last.
const TRIAL_EVENTS: usize = 2_000;
/// Most of a sweep's events a trial's page looks through, newest first.
const TRIAL_EVENT_SCAN: usize = 200_000;

/// The embedded files: name, content type, bytes.
const ASSETS: [(&str, &str, &[u8]); 5] = [
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../assets/app.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../assets/app.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_bytes!("../assets/vendor/uplot/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../assets/vendor/uplot/uPlot.min.css")),
    ("uPlot.LICENSE", "text/plain; charset=utf-8", include_bytes!("../assets/vendor/uplot/LICENSE")),
];
const INDEX: &str = include_str!("../assets/index.html");
const LOGIN: &str = include_str!("../assets/login.html");

/// The dashboard's routes, behind the token check.
pub fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let guarded = Router::new()
        .route("/", get(index))
        .route("/api/sweeps", get(sweeps))
        .route("/api/sweeps/{id}", get(sweep))
        .route("/api/sweeps/{id}/trials/{trial}", get(trial))
        .route("/api/sweeps/{id}/trials/{trial}/checkpoints/{kind}", get(checkpoint))
        .route("/api/sweeps/{id}/events", get(events))
        .route("/api/workers", get(workers))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&shared), guard));
    Router::new()
        .merge(guarded)
        .route("/assets/{name}", get(asset))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
}

// -------------------------------------------------------------------------------------------
// Auth
// -------------------------------------------------------------------------------------------

/// The token a request carries: its bearer header, else the login cookie.
fn token_of(headers: &HeaderMap) -> Option<String> {
    // A bearer header wins; another scheme (a proxy's Basic auth) is not ours: the cookie then.
    if let Some(h) = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok())
        && h.len() > 7
        && h.is_char_boundary(7)
        && h[..7].eq_ignore_ascii_case("bearer ")
    {
        return Some(h[7..].trim().to_string());
    }
    for cookies in headers.get_all(header::COOKIE) {
        let Ok(cookies) = cookies.to_str() else { continue };
        for c in cookies.split(';') {
            if let Some((name, value)) = c.trim().split_once('=')
                && (name == COOKIE || name == SECURE_COOKIE)
            {
                return Some(percent_decode(value));
            }
        }
    }
    None
}

/// With tokens, lets through only a viewer's token or above.
async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let Some(tokens) = &shared.config.tokens else {
        // Clients prove who they are by certificate on the gRPC port; a browser brings none, so
        // without tokens the dashboard would be open to anyone who reaches this port.
        if shared.config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
            return error(
                StatusCode::FORBIDDEN,
                "this coordinator checks clients by certificate (--client-ca); its dashboard needs --tokens",
            );
        }
        return next.run(request).await;
    };
    let page = !request.uri().path().starts_with("/api/");
    match token_of(request.headers()).and_then(|t| tokens.authenticate(&t)) {
        Some(Role::Admin | Role::Client | Role::Viewer) => next.run(request).await,
        Some(Role::Worker) => {
            error(StatusCode::FORBIDDEN, "a worker's token cannot read the dashboard; use a viewer's")
        }
        None if page => {
            let mut r = StatusCode::SEE_OTHER.into_response();
            r.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/login"));
            r
        }
        None => {
            error(StatusCode::UNAUTHORIZED, "a token of role viewer or above is needed (Authorization: Bearer TOKEN)")
        }
    }
}

async fn login_form() -> Response {
    page(LOGIN)
}

/// `token=…` from the form: a valid token becomes the HttpOnly cookie; anything else is the form
/// again with a message.
/// Whether a form post comes from this site's own page (browsers say so in `Sec-Fetch-Site`;
/// a request that says nothing comes from a script, not from another site's page).
fn same_origin(headers: &HeaderMap) -> bool {
    headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_none_or(|v| v == "same-origin" || v == "none")
}

async fn login(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if !same_origin(&headers) {
        return error(StatusCode::FORBIDDEN, "a login must come from this dashboard's own page");
    }
    let token = form_field(&body, "token").unwrap_or_default();
    let role = match &shared.config.tokens {
        None => Some(Role::Admin),
        Some(tokens) => tokens.authenticate(&token),
    };
    match role {
        Some(Role::Admin | Role::Client | Role::Viewer) => {
            let cookie = if shared.config.tls.is_some() {
                format!(
                    "{SECURE_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={LOGIN_SECONDS}; Secure",
                    percent_encode(&token)
                )
            } else {
                let secure = if forwarded_https(&headers) { "; Secure" } else { "" };
                format!(
                    "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={LOGIN_SECONDS}{secure}",
                    percent_encode(&token)
                )
            };
            let mut r = StatusCode::SEE_OTHER.into_response();
            r.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/"));
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Some(Role::Worker) => {
            with_status(page(&LOGIN.replace("<!--message-->", "a worker's token cannot read the dashboard")), 403)
        }
        None => with_status(page(&LOGIN.replace("<!--message-->", "that token is not valid here")), 401),
    }
}

async fn logout(headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return error(StatusCode::FORBIDDEN, "a logout must come from this dashboard's own page");
    }
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/login"));
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("sweep_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("__Host-sweep_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0; Secure"),
    );
    r
}

fn forwarded_https(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn with_status(mut r: Response, code: u16) -> Response {
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    r
}

/// One field of an `application/x-www-form-urlencoded` body.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// `%XX` and `+` decoded; a malformed escape stays as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything but unreserved characters as `%XX` (a cookie value holds no `;`, `,` or space).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// -------------------------------------------------------------------------------------------
// Pages and assets
// -------------------------------------------------------------------------------------------

/// Headers every page and file carries: nothing but the coordinator's own scripts, styles and
/// connections; never framed; types as declared.
fn harden(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

fn page(html: &str) -> Response {
    let mut r =
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html.to_string()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    harden(&mut r);
    r
}

async fn index() -> Response {
    page(INDEX)
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, bytes)) => {
            let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, *kind)], *bytes).into_response();
            harden(&mut r);
            r
        }
        None => error(StatusCode::NOT_FOUND, "no such asset"),
    }
}

// -------------------------------------------------------------------------------------------
// The API
// -------------------------------------------------------------------------------------------

fn json_response(code: StatusCode, v: &Value) -> Response {
    let mut r = (code, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    harden(&mut r);
    r
}

fn error(code: StatusCode, message: &str) -> Response {
    json_response(code, &json!({ "error": message }))
}

/// A store error as the HTTP status a browser understands.
fn failed(s: Status) -> Response {
    use tonic::Code;
    let code = match s.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, s.message())
}

/// Every sweep, newest first as `sweep list` shows them, each with its best validation accuracy.
async fn sweeps(State(shared): State<Arc<Shared>>) -> Response {
    let listed = shared
        .read(|s, now| {
            let sweeps = s.list_sweeps()?;
            let mut best = HashMap::new();
            for sw in &sweeps {
                let board = s.leaderboard(&sw.id, now)?;
                best.insert(sw.id.clone(), board.entries.first().and_then(|e| e.score.best_val_accuracy));
            }
            Ok((sweeps, best))
        })
        .await;
    match listed {
        Ok((sweeps, best)) => {
            let rows: Vec<Value> = sweeps
                .iter()
                .map(|sw| {
                    let mut v = shape::sweep_json(&v1::SweepSummary::from(sw));
                    v["best_val_accuracy"] = json!(best.get(&sw.id).copied().flatten());
                    v
                })
                .collect();
            json_response(StatusCode::OK, &Value::Array(rows))
        }
        Err(s) => failed(s),
    }
}

/// One sweep whole: what `sweep export -o json` prints, and the leaderboard.
async fn sweep(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let read = shared
        .read(move |s, now| {
            let status = s.get_sweep(&id)?;
            let board = s.leaderboard(&status.sweep.id, now)?;
            let mut trials = Vec::with_capacity(status.trials.len());
            for t in &status.trials {
                trials.push(s.trial(&status.sweep.id, &t.trial_id)?);
            }
            let seq = s.last_sequence()?;
            Ok((status, board, trials, seq))
        })
        .await;
    match read {
        Ok((status, board, trials, seq)) => {
            let trials: Vec<v1::TrialDetail> = trials.iter().map(v1::TrialDetail::from).collect();
            let mut v = shape::export_json(&v1::SweepStatus::from(&status), &trials);
            v["leaderboard"] = shape::leaderboard_json(&v1::Leaderboard::from(&board));
            v["sequence"] = json!(seq);
            json_response(StatusCode::OK, &v)
        }
        Err(s) => failed(s),
    }
}

/// One trial, with its events (the newest [`TRIAL_EVENTS`]).
async fn trial(State(shared): State<Arc<Shared>>, Path((id, trial_id)): Path<(String, String)>) -> Response {
    let read = shared
        .read(move |s, _| {
            let detail = s.trial(&id, &trial_id)?;
            // The trial as stored (the URL may spell it otherwise).
            let trial_id = detail.trial.trial_id.clone();
            let sweep_id = s.get_sweep(&id)?.sweep.id;
            // Its newest events, found from the newest back, over at most TRIAL_EVENT_SCAN of
            // the sweep's events (a trial of a huge sweep shows its recent history).
            let mut events = Vec::new();
            let mut before = u64::MAX;
            let mut scanned = 0;
            while events.len() < TRIAL_EVENTS && scanned < TRIAL_EVENT_SCAN {
                let page = s.events_before(&sweep_id, before, EVENT_PAGE)?;
                let Some(oldest) = page.last().map(|e| e.sequence) else { break };
                before = oldest;
                scanned += page.len();
                events.extend(page.into_iter().filter(|e| match &e.event {
                    sweep_core::records::SweepEvent::Trial { trial, .. } => trial.trial_id == trial_id,
                    _ => false,
                }));
            }
            events.truncate(TRIAL_EVENTS);
            events.reverse();
            Ok((detail, events))
        })
        .await;
    match read {
        Ok((detail, events)) => {
            let mut v = shape::trial_detail_json(&v1::TrialDetail::from(&detail));
            v["events"] = Value::Array(events.iter().map(|e| shape::event_json(&v1::SweepEvent::from(e))).collect());
            json_response(StatusCode::OK, &v)
        }
        Err(s) => failed(s),
    }
}

/// A trial's best or last checkpoint, as a download streamed from the artifact store: refused
/// (`409`) when the stored size is not the reference's, cut short before its last chunk when the
/// SHA-256 is not — a file that does not match its reference is never delivered whole.
async fn checkpoint(
    State(shared): State<Arc<Shared>>,
    Path((id, trial_id, kind)): Path<(String, String, String)>,
) -> Response {
    if kind != "best" && kind != "last" {
        return error(StatusCode::NOT_FOUND, "a trial has a `best` and a `last` checkpoint");
    }
    let read = shared.read(move |s, _| Ok((s.get_sweep(&id)?.sweep.id, s.trial(&id, &trial_id)?))).await;
    let (sweep_id, detail) = match read {
        Ok(d) => d,
        Err(s) => return failed(s),
    };
    let trial_id = detail.trial.trial_id.clone();
    let reference = if kind == "best" { detail.best_checkpoint } else { detail.last_checkpoint };
    let Some(c) = reference else {
        return error(StatusCode::NOT_FOUND, &format!("trial {trial_id} of {sweep_id} has no {kind} checkpoint yet"));
    };
    let Some(store) = shared.artifacts.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "this coordinator was started without --artifacts, so it cannot read the file; it is at {}",
                sweep_core::text::escape(&c.uri)
            ),
        );
    };
    let key = match store.key_of(&c.uri) {
        Ok(k) if k.ends_with(".safetensors") => k,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "{} is not a checkpoint in this coordinator's artifact store {}",
                    sweep_core::text::escape(&c.uri),
                    store.location()
                ),
            );
        }
    };
    // A few at a time (each holds a connection to the artifact store).
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DOWNLOADS);
    let Ok(slot) = SLOTS.try_acquire() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "other checkpoint downloads are under way; try again shortly");
    };
    // Streamed from the store as it comes, nothing staged: the answer starts at once, however
    // large the file or slow the store. A file whose size is not the reference's is refused
    // before anything is sent; one whose SHA-256 is not is cut short before its last chunk (the
    // download fails, as a truncated transfer of a known length, and the log says why), so a
    // file that does not match its reference is never delivered whole.
    let (bytes, mut stream) = match store.get_stream(&key).await {
        Ok(got) => got,
        Err(sweep_artifacts::ArtifactError::NotFound { uri }) => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("{uri} is gone from the artifact store (collected by `sweep gc`?)"),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "a checkpoint download failed");
            return error(
                StatusCode::BAD_GATEWAY,
                "the artifact store did not deliver the file (the coordinator's log says why)",
            );
        }
    };
    if c.bytes > 0 && c.bytes != bytes {
        return error(
            StatusCode::CONFLICT,
            &format!(
                "the stored file {} does not match its reference ({bytes} bytes, the reference says {}): not sent",
                sweep_core::text::escape(&c.uri),
                c.bytes
            ),
        );
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let (want, uri) = (c.sha256.to_ascii_lowercase(), c.uri.clone());
    tokio::spawn(async move {
        use sha2::Digest;
        use tokio_stream::StreamExt;
        let _slot = slot;
        let mut hasher = sha2::Sha256::new();
        let mut held: Option<Bytes> = None;
        let mut sent = 0u64;
        let cut = |why: String| std::io::Error::other(why);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "a checkpoint download failed");
                    let _ = tx.send(Err(cut(e.to_string()))).await;
                    return;
                }
            };
            hasher.update(&chunk);
            sent += chunk.len() as u64;
            if sent > bytes {
                let _ = tx.send(Err(cut("the stored file grew while it was sent".into()))).await;
                return;
            }
            // The previous chunk goes; this one waits until the hash says the file is whole.
            if let Some(previous) = held.replace(chunk)
                && tx.send(Ok(previous)).await.is_err()
            {
                return;
            }
        }
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != want || sent != bytes {
            tracing::warn!(uri = %uri, "a checkpoint download was cut: the stored file does not match its reference's SHA-256");
            let _ = tx.send(Err(cut("the stored file does not match its reference's SHA-256".into()))).await;
            return;
        }
        if let Some(last) = held {
            let _ = tx.send(Ok(last)).await;
        }
    });
    let name = format!("{sweep_id}-{trial_id}-{kind}-e{}.safetensors", c.epoch);
    let mut r = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", name.replace(['"', '\\'], "_"))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&c.sha256.to_ascii_lowercase()) {
        h.insert("x-checkpoint-sha256", v);
    }
    harden(&mut r);
    r
}

async fn workers(State(shared): State<Arc<Shared>>) -> Response {
    match shared.read(|s, _| s.workers()).await {
        Ok(w) => {
            json_response(StatusCode::OK, &shape::workers_json(&w.iter().map(v1::WorkerInfo::from).collect::<Vec<_>>()))
        }
        Err(s) => failed(s),
    }
}

/// The sweep's events as server-sent events: those after `Last-Event-ID` (a reconnecting
/// browser sends the last it saw) or `?after=N`, then each new one as it is stored — no gap, no
/// repeat, whatever the reconnects.
async fn events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.get("after").map(String::as_str))
        .map(|v| v.trim().parse::<u64>());
    let mut after = match after {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return error(StatusCode::BAD_REQUEST, "Last-Event-ID (or after) must be an event's sequence number");
        }
    };
    // Subscribe first: an event stored between the first read and the wait still wakes it.
    let mut changes = shared.events.subscribe();
    let sweep_id = match shared.read(move |s, _| Ok(s.get_sweep(&id)?.sweep.id)).await {
        Ok(id) => id,
        Err(s) => return failed(s),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(16);
    let ends = tokio::time::Instant::now() + STREAM_LIFETIME;
    tokio::spawn(async move {
        loop {
            if tokio::time::Instant::now() >= ends {
                // The browser reconnects with the last id it saw.
                return;
            }
            let sweep = sweep_id.clone();
            let page = match shared.read(move |s, _| s.events_after(&sweep, after, EVENT_PAGE)).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Ok(Bytes::from(format!("event: failure\ndata: {}\n\n", json!(e.message()))))).await;
                    return;
                }
            };
            let full = page.len() == EVENT_PAGE;
            for e in page {
                after = e.sequence;
                let v = shape::event_json(&v1::SweepEvent::from(&e));
                let kind = v["type"].as_str().unwrap_or("event").to_string();
                let frame = format!("id: {}\nevent: {kind}\ndata: {v}\n\n", e.sequence);
                if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    if tx.send(Ok(Bytes::from_static(b": keep-alive\n\n"))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(ends) => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, "text/event-stream")], body).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    harden(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_and_cookies_decode() {
        assert_eq!(form_field(b"a=1&token=abc%2Bd+e%3D", "token").as_deref(), Some("abc+d e="));
        assert_eq!(form_field(b"token=", "token").as_deref(), Some(""));
        assert_eq!(form_field(b"other=1", "token"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode(&percent_encode("a b;c=d%")), "a b;c=d%");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("x=1; sweep_token=abc%3Bd"));
        assert_eq!(token_of(&h).as_deref(), Some("abc;d"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer  tok "));
        assert_eq!(token_of(&h).as_deref(), Some("tok"), "the header wins");
    }
}
