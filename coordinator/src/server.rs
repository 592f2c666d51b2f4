//! The coordinator server: `SweepService` and `WorkerService` over one [`Store`].
//!
//! Store calls are synchronous SQLite transactions. Handlers queue them to one store thread,
//! which runs the calls queued together as one batch: each call in its own savepoint, then one
//! commit (one sync of the write-ahead log) for the batch, and only then the replies (group
//! commit: the disk syncs per second, not the calls, bound the throughput, and every reply
//! still goes out after its commit).
//! In-memory signals wake waiters: `work` (a trial became pending: long-polling `AcquireTrial`
//! calls of workers with a free device re-check), one `freed` signal per waiting worker (one of
//! its attempts ended: its own long poll re-checks; a worker whose devices are all busy waits
//! for nothing else, so an ending attempt wakes one call, not every call of the fleet), and
//! `events` (the last event sequence: `WatchSweep` streams read the new events from the store).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sweep_core::spec::{self, ParseOptions};
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_server::{SweepService, SweepServiceServer};
use sweep_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::clock::{Clock, SystemClock};
use crate::store::{Caller, ReportExtras, SqliteStore, Store, StoreError};

/// Largest spec accepted by `SubmitSweep`.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Largest gRPC message the server decodes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Longest free text kept from a worker (attempt messages, resume notes) or a client (a spec's
/// source); longer text is cut.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest checkpoint reference (`uri`) accepted in a report.
pub const MAX_URI_BYTES: usize = 4096;
/// Most devices a worker may register, and so most attempts it can run at once.
pub const MAX_DEVICES: usize = 1024;
/// Longest an `AcquireTrial` call is held open.
pub const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

/// Concurrent calls (HTTP/2 streams) one connection may have open. hyper's default is 200; a
/// client that multiplexes many workers over one connection (`sweep simulate-workers`, a
/// sidecar) needs more: each worker keeps up to three calls open.
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// How long `stop` waits for in-flight calls before dropping connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// A worker that sends no heartbeat for this long is suspect…
    pub heartbeat_ttl: Duration,
    /// …and after this much longer its lease ends: its attempts are lost and re-queued.
    pub lease_grace: Duration,
    /// Failed attempts in a row after which a worker is quarantined (0: never).
    pub quarantine_after: u32,
    /// A worker gone (its lease ended) for this long is forgotten: its row goes, so lists of
    /// workers do not grow without bound (its attempts keep its id).
    pub forget_workers_after: Duration,
    pub parse: ParseOptions,
    /// TLS on the gRPC port, and client certificates when a client CA is given.
    pub tls: Option<TlsFiles>,
    /// Bearer tokens and their roles; `None` lets every call through.
    pub tokens: Option<Arc<crate::auth::Tokens>>,
    /// A plaintext port serving only `grpc.health.v1` (for probes that cannot speak TLS).
    pub health_listen: Option<SocketAddr>,
    /// HTTP `/metrics` (Prometheus) and `/healthz`.
    pub metrics_listen: Option<SocketAddr>,
    /// The artifact store the workers write checkpoints to (a directory or `s3://bucket/prefix`,
    /// as their `--artifacts`): the dashboard serves checkpoints from it. `None`: no downloads.
    pub artifacts: Option<String>,
    /// Where the store's timestamps and the lease reaper's time come from (the system clock;
    /// tests move a [`crate::clock::ManualClock`] instead of sleeping through TTLs).
    pub clock: Arc<dyn Clock>,
    /// How often the lease reaper looks [default: TTL/2, at least every 100 ms].
    pub reaper_every: Option<Duration>,
}

/// Certificate files of the gRPC port (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files; an unreadable one is an error naming it.
    fn server_config(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        use anyhow::Context;
        let read =
            |what: &str, p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {what} {}", p.display()));
        let identity =
            tonic::transport::Identity::from_pem(read("TLS certificate", &self.cert)?, read("TLS key", &self.key)?);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read("client CA", ca)?));
        }
        Ok(config)
    }

    /// The same certificate and key for the HTTP port (no client certificates there: a
    /// browser has none; the dashboard asks for a token instead).
    fn http_config(&self) -> anyhow::Result<sweep_session::http::Tls> {
        use anyhow::Context;
        let read =
            |what: &str, p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {what} {}", p.display()));
        sweep_session::http::tls_from_pem(&read("TLS certificate", &self.cert)?, &read("TLS key", &self.key)?).map_err(
            |e| anyhow::anyhow!("TLS for the HTTP port ({}, {}): {e}", self.cert.display(), self.key.display()),
        )
    }
}

pub use crate::http::CoordinatorMetrics;

impl Config {
    pub fn new(listen: SocketAddr, state_dir: PathBuf) -> Config {
        Config {
            listen,
            state_dir,
            heartbeat_ttl: Duration::from_secs(10),
            lease_grace: Duration::from_secs(20),
            quarantine_after: crate::store::DEFAULT_QUARANTINE_AFTER,
            forget_workers_after: Duration::from_secs(24 * 3600),
            parse: ParseOptions::default(),
            tls: None,
            tokens: None,
            health_listen: None,
            metrics_listen: None,
            artifacts: None,
            clock: Arc::new(SystemClock),
            reaper_every: None,
        }
    }
}

/// Dashboard reads at once, each on its own read-only connection.
const DASHBOARD_READS: usize = 4;

/// State shared by every handler.
pub struct Shared {
    /// Calls for the store thread.
    store: std::sync::mpsc::Sender<StoreMessage>,
    work: Notify,
    /// Per worker with an `AcquireTrial` call open: one of its attempts ended.
    freed: Mutex<HashMap<String, Arc<Notify>>>,
    /// The last pretraining step logged per attempt (`ReportProgress` logs each once).
    progress_seen: Mutex<HashMap<u64, (u32, bool)>>,
    pub(crate) events: watch::Sender<u64>,
    pub(crate) config: Config,
    pub(crate) metrics: Arc<CoordinatorMetrics>,
    /// Where checkpoints are downloaded from (`Config::artifacts`).
    pub(crate) artifacts: Option<Arc<sweep_artifacts::ArtifactStore>>,
}

/// A store call: runs on the store thread inside a batch and returns what answers its caller
/// once the batch has committed (or failed to).
type StoreJob = Box<dyn FnOnce(&mut dyn Store) -> Box<dyn FnOnce(&Result<(), String>) + Send> + Send>;

/// What the store thread is sent: calls, and at the end the order to close.
enum StoreMessage {
    Call(StoreJob),
    /// Checkpoint the write-ahead log into `sweep.db`, close the database (releasing the state
    /// directory's lock) and end; the reply says whether the checkpoint worked.
    Close(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// Most calls in one batch.
const MAX_BATCH: usize = 1024;

/// The store thread: runs queued calls in batches until told to close or every sender is gone.
fn store_thread(
    mut store: Box<dyn Store>,
    jobs: std::sync::mpsc::Receiver<StoreMessage>,
    metrics: Arc<CoordinatorMetrics>,
) {
    let mut closing = None;
    while let Ok(first) = jobs.recv() {
        let started = std::time::Instant::now();
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                StoreMessage::Call(job) => batch.push(job),
                StoreMessage::Close(reply) => {
                    closing = Some(reply);
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            // Without a batch transaction each call commits on its own: slower, still correct.
            let batched = store.begin_batch().map_err(|e| tracing::error!(error = %e, "cannot start a batch")).is_ok();
            let replies: Vec<_> = batch.into_iter().map(|job| job(store.as_mut())).collect();
            let committed = if batched { store.commit_batch().map_err(|e| e.to_string()) } else { Ok(()) };
            if let Err(e) = &committed {
                tracing::error!(error = %e, calls = replies.len(), "batch commit failed; its calls were refused");
            }
            metrics.store_write.observe(started.elapsed().as_secs_f64());
            for reply in replies {
                reply(&committed);
            }
        }
        if closing.is_some() {
            break;
        }
    }
    // A clean end leaves the whole state in sweep.db (a copy of the .db alone is then whole).
    let checkpointed = store.checkpoint().map_err(|e| e.to_string());
    if let Err(e) = &checkpointed {
        tracing::warn!(error = %e, "could not checkpoint the write-ahead log at shutdown (nothing is lost: it is replayed at the next start)");
    }
    drop(store);
    if let Some(reply) = closing {
        let _ = reply.send(checkpointed);
    }
}

/// A worker's `freed` signal, held by its waiting `AcquireTrial` call; the last holder removes
/// it from the map.
struct FreedSignal<'a> {
    shared: &'a Shared,
    worker_id: String,
    notify: Arc<Notify>,
}

impl Drop for FreedSignal<'_> {
    fn drop(&mut self) {
        let mut map = self.shared.freed.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.worker_id).is_some_and(|n| Arc::ptr_eq(n, &self.notify))
            && Arc::strong_count(&self.notify) == 2
        {
            map.remove(&self.worker_id);
        }
    }
}

impl Shared {
    /// Runs `f` on the store thread; the result comes back once its batch has committed.
    /// A read on a connection of its own (read-only, one consistent snapshot), on a blocking
    /// thread: what the dashboard reads, however much, neither waits for the store's thread nor
    /// holds up the workers' calls there. At most [`DASHBOARD_READS`] at once; more wait.
    pub(crate) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&crate::store::sqlite::ReadOnly, i64) -> Result<T, StoreError> + Send + 'static,
    {
        static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DASHBOARD_READS);
        let _permit = READS.acquire().await.map_err(|_| Status::unavailable("shutting down"))?;
        let db = self.config.state_dir.join(crate::store::DB_FILE);
        let now = self.config.clock.now_ms();
        tokio::task::spawn_blocking(move || {
            let reader = crate::store::sqlite::ReadOnly::open(&db)?;
            f(&reader, now)
        })
        .await
        .map_err(|_| Status::internal("a dashboard read failed"))?
        .map_err(Status::from)
    }

    pub(crate) async fn call<T, F>(self: &Arc<Self>, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: StoreJob = Box::new(move |store: &mut dyn Store| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(store)));
            Box::new(move |committed: &Result<(), String>| {
                let reply = match (committed, result) {
                    (Err(e), _) => Err(Status::unavailable(format!("state database: commit failed: {e}"))),
                    (Ok(()), Ok(r)) => r.map_err(Status::from),
                    (Ok(()), Err(_)) => Err(Status::internal("store call panicked")),
                };
                let _ = tx.send(reply);
            })
        });
        self.store.send(StoreMessage::Call(job)).map_err(|_| Status::unavailable("the state database is closed"))?;
        rx.await.map_err(|_| Status::internal("store task failed"))?
    }

    /// Runs a write and then wakes watchers (and, if `work` and a trial is pending, the
    /// long-polling workers that have a free device).
    async fn write<T, F>(self: &Arc<Self>, work: bool, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        // One trip to the store: the write, then what the wake-ups need.
        let (result, seq, pending) = self
            .call(move |s| {
                let result = f(s);
                let seq = s.last_sequence().ok();
                let pending = work && s.has_pending().unwrap_or(true);
                Ok((result, seq, pending))
            })
            .await?;
        if let Some(seq) = seq {
            // Watchers wake only when there are new events (not on every acquire poll).
            self.events.send_if_modified(|last| std::mem::replace(last, seq) != seq);
        }
        if pending {
            self.work.notify_waiters();
        }
        result.map_err(Status::from)
    }

    /// The `freed` signal of a worker, registered while the returned guard lives.
    fn freed_signal(&self, worker_id: &str) -> FreedSignal<'_> {
        let mut map = self.freed.lock().unwrap_or_else(|p| p.into_inner());
        let notify = map.entry(worker_id.to_string()).or_default().clone();
        FreedSignal { shared: self, worker_id: worker_id.to_string(), notify }
    }

    /// Wakes the waiting `AcquireTrial` call of a worker, if it has one.
    fn wake_worker(&self, worker_id: &str) {
        let map = self.freed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get(worker_id) {
            n.notify_waiters();
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NotFound(m) => Status::not_found(m),
            StoreError::WrongState(m) => Status::failed_precondition(m),
            StoreError::Invalid(m) => Status::invalid_argument(m),
            StoreError::NotYours(m) => Status::permission_denied(m),
            // Stored data that does not read back as written: not a fault retrying can fix.
            e @ StoreError::Corrupt(_) => Status::data_loss(e.to_string()),
            other => Status::internal(other.to_string()),
        }
    }
}

/// Handle to a running coordinator.
pub struct Running {
    pub addr: SocketAddr,
    /// The plaintext health port, when one was asked for.
    pub health_addr: Option<SocketAddr>,
    /// The HTTP metrics port, when one was asked for.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    reaper: tokio::task::JoinHandle<()>,
    /// Health server and metrics endpoint.
    side: Vec<tokio::task::JoinHandle<()>>,
    health: tonic_health::server::HealthReporter,
    /// To close the store once serving has stopped.
    store: std::sync::mpsc::Sender<StoreMessage>,
}

impl Running {
    /// Stops serving: in-flight calls get up to [`SHUTDOWN_GRACE`] to finish, then every
    /// connection is dropped (a client that never reads its socket cannot hold the coordinator
    /// open). Nothing is lost either way: every acknowledged write is already committed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        self.health.set_not_serving::<SweepServiceServer<SweepApi>>().await;
        self.health.set_not_serving::<WorkerServiceServer<WorkerApi>>().await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.reaper.abort();
        for t in &self.side {
            t.abort();
        }
        let served = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(joined) => joined.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from)),
            Err(_) => {
                tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                self.task.abort();
                Ok(())
            }
        };
        // Calls still queued are answered first; then the log is checkpointed into sweep.db and
        // the database closed (and the state directory unlocked) before this returns.
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.store.send(StoreMessage::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        served
    }

    /// Waits until the server ends (on error; it runs until stopped otherwise).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// Raises this process's limit of open files to its hard limit: every worker keeps a connection
/// (a socket) to the coordinator, and the usual soft limit of 1024 would refuse connections
/// beyond about a thousand workers. Returns the limit in force.
fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(raised.rlim_cur);
        }
    }
    Some(limit.rlim_cur)
}

/// Opens the store and starts serving on `config.listen` (port 0 picks a free port).
pub async fn start(config: Config) -> anyhow::Result<Running> {
    use anyhow::Context;
    match raise_fd_limit() {
        Some(n) if n < 4096 => {
            tracing::warn!(limit = n, "open-file limit is low: at most about this many workers can connect")
        }
        Some(n) => tracing::debug!(limit = n, "open-file limit"),
        None => {}
    }
    // Certificates first: a bad file must stop start-up before anything is opened.
    let tls = config.tls.as_ref().map(TlsFiles::server_config).transpose()?;
    // The HTTP port (metrics, probes, the dashboard) speaks TLS with the same certificate when
    // there is one: the dashboard's login sends a token.
    let http_tls = match (&config.tls, config.metrics_listen) {
        (Some(files), Some(_)) => Some(files.http_config()?),
        _ => None,
    };
    let mut store: Box<dyn Store> =
        Box::new(SqliteStore::open_with_clock(&config.state_dir, Arc::clone(&config.clock))?);
    // Checkpoint downloads pass through `<state>/downloads` (emptied at each start).
    let artifacts = match &config.artifacts {
        Some(location) => {
            let scratch = config.state_dir.join("downloads");
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
            let store = sweep_artifacts::ArtifactStore::open(location, &scratch, tokio::runtime::Handle::current())
                .with_context(|| format!("the artifact store {location}"))?;
            Some(Arc::new(store))
        }
        None => None,
    };
    store.set_quarantine_after(config.quarantine_after)?;
    let last = store.last_sequence()?;
    let (events, _) = watch::channel(last);
    let (jobs, queue) = std::sync::mpsc::channel::<StoreMessage>();
    let metrics = Arc::new(CoordinatorMetrics::default());
    let store_metrics = Arc::clone(&metrics);
    std::thread::Builder::new()
        .name("sweep-store".into())
        .spawn(move || store_thread(store, queue, store_metrics))
        .context("cannot start the store thread")?;
    let shared = Arc::new(Shared {
        store: jobs.clone(),
        work: Notify::new(),
        freed: Mutex::default(),
        progress_seen: Mutex::default(),
        events,
        config: config.clone(),
        metrics,
        artifacts,
    });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // No Nagle delay: a reply is several small writes (headers, data, trailers), and waiting
    // for the peer's delayed ACK between them added ~40 ms to calls.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();

    // Health: "" is the process, `sweep.v1.SweepService` and `sweep.v1.WorkerService` are
    // ready once the store is open (it is, here).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SweepServiceServer<SweepApi>>().await;
    health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sweep_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1 and the older v1alpha, which many stock tools still ask for.
    let reflection_v1 = reflection().build_v1().context("cannot build the reflection service")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("cannot build the reflection service")?;

    let sweeps = SweepServiceServer::new(SweepApi(Arc::clone(&shared)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 << 20);
    let workers = WorkerServiceServer::new(WorkerApi(Arc::clone(&shared))).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let task = tokio::spawn(
        builder
            .layer(tower::util::MapResponseLayer::new(refused_request_status))
            .layer(crate::auth::AuthLayer(config.tokens.clone()))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .add_service(sweeps)
            .add_service(workers)
            .add_service(health_service.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    let mut side = Vec::new();
    let mut health_addr = None;
    if let Some(listen) = config.health_listen {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (health)"))?;
        health_addr = Some(l.local_addr()?);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        side.push(tokio::spawn(async move {
            let served =
                tonic::transport::Server::builder().add_service(health_service).serve_with_incoming(incoming).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "health server ended");
            }
        }));
    }
    let mut metrics_addr = None;
    if let Some(listen) = config.metrics_listen {
        let (bound, t) = sweep_session::http::serve_with(
            listen,
            crate::http::router(Arc::clone(&shared)),
            sweep_session::http::Limits::default(),
            http_tls,
        )
        .await
        .with_context(|| format!("cannot listen on {listen} (metrics)"))?;
        metrics_addr = Some(bound);
        side.push(t);
    }
    let started = shared.config.clock.now_ms();
    let reaper = tokio::spawn(reap_leases(Arc::clone(&shared), started));
    Ok(Running { addr, health_addr, metrics_addr, shutdown: Some(tx), task, reaper, side, health, store: jobs })
}

/// How tonic words the errors of a request body that is not a well-formed request message: bad
/// protobuf, bad gRPC framing, a body that ends early or holds no message.
const MALFORMED_REQUEST: [&str; 4] = [
    "failed to decode Protobuf message",
    "protocol error:",
    "Unexpected EOF decoding stream",
    "Missing request message",
];

/// The status of a request refused before any handler saw it, as gRPC names it: a message over
/// [`MAX_MESSAGE_BYTES`] is RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE), and a body that is not
/// a well-formed request message is INVALID_ARGUMENT (tonic says INTERNAL, which reads as a
/// fault of the server and invites retries). Every other response passes unchanged.
fn refused_request_status(
    mut response: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let Some(status) = Status::from_header_map(response.headers()) else { return response };
    let code = match status.code() {
        tonic::Code::OutOfRange if status.message().starts_with("Error, decoded message length too large") => {
            tonic::Code::ResourceExhausted
        }
        tonic::Code::Internal if MALFORMED_REQUEST.iter().any(|m| status.message().starts_with(m)) => {
            tonic::Code::InvalidArgument
        }
        _ => return response,
    };
    let _ = Status::new(code, format!("request refused: {}", status.message())).add_header(response.headers_mut());
    response
}

/// Ends the leases of workers that stopped sending heartbeats.
/// Ends the leases of silent workers. `started`: when the coordinator started, on its clock.
async fn reap_leases(shared: Arc<Shared>, started: i64) {
    let ttl = shared.config.heartbeat_ttl;
    let limit = ttl + shared.config.lease_grace;
    let limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
    let clock = Arc::clone(&shared.config.clock);
    let every = shared.config.reaper_every.unwrap_or((ttl / 2).max(Duration::from_millis(100)));
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    // Failover grace: a coordinator that just started (after a crash or an upgrade) has not
    // heard from anyone yet. Workers get a whole lease period from its start to heartbeat
    // again; their running attempts are then reattached, not re-run.
    loop {
        tick.tick().await;
        let now = clock.now_ms();
        if now.saturating_sub(started) < limit_ms {
            continue;
        }
        let deadline = now.saturating_sub(limit_ms);
        let forget =
            now.saturating_sub(i64::try_from(shared.config.forget_workers_after.as_millis()).unwrap_or(i64::MAX));
        // Wakes waiting workers only when leases ended (their trials may be pending again).
        let expire = move |s: &mut dyn Store| {
            let gone = s.expire_workers(deadline)?;
            let forgotten = s.forget_workers(forget)?;
            if forgotten > 0 {
                tracing::info!(workers = forgotten, "forgot workers gone for long");
            }
            let pending = !gone.is_empty() && s.has_pending()?;
            Ok((gone, pending))
        };
        match shared.write(false, expire).await {
            Ok((gone, pending)) if !gone.is_empty() => {
                tracing::warn!(workers = ?gone, "leases ended: no heartbeat");
                for w in &gone {
                    shared.wake_worker(w);
                }
                if pending {
                    shared.work.notify_waiters();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "lease check failed"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SweepService
// ---------------------------------------------------------------------------------------------

pub struct SweepApi(Arc<Shared>);

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::SweepEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SweepService for SweepApi {
    async fn submit_sweep(
        &self,
        request: Request<v1::SubmitSweepRequest>,
    ) -> Result<Response<v1::SubmitSweepResponse>, Status> {
        let req = request.into_inner();
        if req.spec_yaml.len() > MAX_SPEC_BYTES {
            return Err(Status::invalid_argument(format!(
                "spec_yaml is {} bytes; the limit is {MAX_SPEC_BYTES}",
                req.spec_yaml.len()
            )));
        }
        let source = if req.source.is_empty() { "spec".to_string() } else { cut(&req.source, 1024) };
        let parsed = spec::parse_with(&req.spec_yaml, self.0.config.parse).map_err(|e| {
            Status::invalid_argument(format!("{source}:{}:{}: {}", e.line, e.column, field_message(&e)))
        })?;
        // Checked whole here (count, each tag, the note), so the tagging below, in the same
        // store call as the submission, cannot refuse what the submission stored.
        sweep_core::records::retag(&[], &req.tags, &[]).map_err(Status::invalid_argument)?;
        sweep_core::records::check_note(&req.note).map_err(Status::invalid_argument)?;
        let submitted = self
            .0
            .write(true, move |s| {
                let submitted = s.submit(&req.spec_yaml, &source, &parsed)?;
                if !req.tags.is_empty() || !req.note.is_empty() {
                    s.update_sweep(&submitted.sweep_id, &req.tags, &[], Some(&req.note))?;
                }
                Ok(submitted)
            })
            .await?;
        tracing::info!(
            sweep_id = %submitted.sweep_id,
            trial_count = submitted.trial_count,
            reused_epochs = submitted.reused_epochs,
            "sweep submitted"
        );
        Ok(Response::new(v1::SubmitSweepResponse::from(&submitted)))
    }

    async fn update_sweep(
        &self,
        request: Request<v1::UpdateSweepRequest>,
    ) -> Result<Response<v1::SweepSummary>, Status> {
        let req = request.into_inner();
        // Bounded before the store's thread sees it.
        sweep_core::records::retag(&[], &req.add_tags, &req.remove_tags).map_err(Status::invalid_argument)?;
        let updated = self
            .0
            .write(false, move |s| s.update_sweep(&req.sweep_id, &req.add_tags, &req.remove_tags, req.note.as_deref()))
            .await?;
        Ok(Response::new(v1::SweepSummary::from(&updated)))
    }

    async fn get_sweep(&self, request: Request<v1::GetSweepRequest>) -> Result<Response<v1::SweepStatus>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(v1::SweepStatus::from(&self.0.call(move |s| s.get_sweep(&id)).await?)))
    }

    async fn list_sweeps(
        &self,
        request: Request<v1::ListSweepsRequest>,
    ) -> Result<Response<v1::ListSweepsResponse>, Status> {
        let req = request.into_inner();
        let size = page_size(req.page_size);
        let page = self.0.call(move |s| s.list_sweeps_page(size, &req.page_token, &req.tag)).await?;
        let sweeps = page.items.iter().map(v1::SweepSummary::from).collect();
        Ok(Response::new(v1::ListSweepsResponse { sweeps, next_page_token: page.next }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<v1::CancelSweepRequest>,
    ) -> Result<Response<v1::CancelSweepResponse>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(v1::CancelSweepResponse::from(&self.0.write(false, move |s| s.cancel_sweep(&id)).await?)))
    }

    async fn retry_sweep(
        &self,
        request: Request<v1::RetrySweepRequest>,
    ) -> Result<Response<v1::RetrySweepResponse>, Status> {
        let r = request.into_inner();
        let trial_ids = self.0.write(true, move |s| s.retry_sweep(&r.sweep_id, &r.trial_ids)).await?;
        Ok(Response::new(v1::RetrySweepResponse { trial_ids }))
    }

    async fn drop_sweep(
        &self,
        request: Request<v1::DropSweepRequest>,
    ) -> Result<Response<v1::DropSweepResponse>, Status> {
        let id = request.into_inner().sweep_id;
        let (sweep_id, stage_points) = self.0.write(false, move |s| s.drop_sweep(&id)).await?;
        tracing::info!(%sweep_id, stage_points, "sweep dropped");
        Ok(Response::new(v1::DropSweepResponse { sweep_id, stage_points }))
    }

    async fn list_references(
        &self,
        request: Request<v1::ListReferencesRequest>,
    ) -> Result<Response<v1::ListReferencesResponse>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(v1::ListReferencesResponse::from(&self.0.call(move |s| s.references(&id)).await?)))
    }

    async fn get_leaderboard(
        &self,
        request: Request<v1::GetLeaderboardRequest>,
    ) -> Result<Response<v1::Leaderboard>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(v1::Leaderboard::from(&self.0.call(move |s| s.leaderboard(&id)).await?)))
    }

    async fn get_trial(&self, request: Request<v1::GetTrialRequest>) -> Result<Response<v1::TrialDetail>, Status> {
        let req = request.into_inner();
        Ok(Response::new(v1::TrialDetail::from(&self.0.call(move |s| s.trial(&req.sweep_id, &req.trial_id)).await?)))
    }

    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let req = request.into_inner();
        let size = page_size(req.page_size);
        let page = self.0.call(move |s| s.workers_page(size, &req.page_token)).await?;
        let workers = page.items.iter().map(v1::WorkerInfo::from).collect();
        Ok(Response::new(v1::ListWorkersResponse { workers, next_page_token: page.next }))
    }

    type WatchSweepStream = EventStream;

    async fn watch_sweep(
        &self,
        request: Request<v1::WatchSweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        let req = request.into_inner();
        let shared = Arc::clone(&self.0);
        // Subscribe before reading, so no event between the snapshot and the loop is missed.
        let mut changes = shared.events.subscribe();
        let id = req.sweep_id.clone();
        let (snapshot, seq) = shared.call(move |s| Ok((s.get_sweep(&id)?, s.last_sequence()?))).await?;
        let sweep_id = snapshot.sweep.id.clone();
        let ended = snapshot.sweep.finished_at_ms.is_some();
        let snapshot = v1::SweepStatus::from(&snapshot);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let first = v1::SweepEvent { sequence: seq, event: Some(v1::sweep_event::Event::Snapshot(snapshot)) };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut last = if req.after_sequence > 0 { req.after_sequence.min(seq) } else { seq };
            if ended && req.after_sequence == 0 {
                return;
            }
            loop {
                let id = sweep_id.clone();
                let batch = match shared.call(move |s| s.events_after(&id, last, 256)).await {
                    Ok(b) => b,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let full = batch.len() == 256;
                for event in batch {
                    last = event.sequence;
                    let is_end = matches!(event.event, sweep_core::records::SweepEvent::Ended(_));
                    if tx.send(Ok(v1::SweepEvent::from(&event))).await.is_err() || is_end {
                        return;
                    }
                }
                if !full && changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Rows per page of a list: 100 unless asked, at most [`crate::store::MAX_PAGE`].
fn page_size(asked: u32) -> usize {
    if asked == 0 { 100 } else { (asked as usize).min(crate::store::MAX_PAGE) }
}

/// `field: message`, or the message alone for document-level errors.
fn field_message(e: &spec::SpecError) -> String {
    if e.field.is_empty() { e.message.clone() } else { format!("{}: {}", e.field, e.message) }
}

// ---------------------------------------------------------------------------------------------
// WorkerService
// ---------------------------------------------------------------------------------------------

pub struct WorkerApi(Arc<Shared>);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, request: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let owner = owner_of(&request);
        let req = request.into_inner();
        if req.devices.len() > MAX_DEVICES {
            return Err(Status::invalid_argument(format!("a worker may register at most {MAX_DEVICES} devices")));
        }
        for (i, d) in req.devices.iter().enumerate() {
            if !matches!(d.kind.as_str(), "cpu" | "cuda") {
                return Err(Status::invalid_argument(format!(
                    "devices[{i}].kind must be `cpu` or `cuda`, got `{}`",
                    cut(&d.kind, 64)
                )));
            }
        }
        let name = if req.name.is_empty() { "worker".to_string() } else { cut(&req.name, 200) };
        let devices = req
            .devices
            .iter()
            .map(|d| {
                let device = sweep_core::records::Device::try_from(d).map_err(Status::invalid_argument)?;
                Ok(sweep_core::records::Device { name: cut(&d.name, 200), ..device })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let version = cut(&req.version, 200);
        let log_name = name.clone();
        let registered = self.0.write(true, move |s| s.register(&name, &devices, &version, &owner)).await?;
        tracing::info!(worker_id = %registered.worker_id, name = %log_name, "worker registered");
        Ok(Response::new(v1::RegisterResponse {
            worker_id: registered.worker_id,
            incarnation: registered.incarnation,
            heartbeat_ttl_ms: self.0.config.heartbeat_ttl.as_millis() as u64,
            session: registered.session,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let owner = owner_of(&request);
        let req = request.into_inner();
        let caller = caller(&req.worker_id, &req.session, owner)?;
        if req.running_attempt_ids.len() > MAX_DEVICES {
            return Err(Status::invalid_argument(format!(
                "running_attempt_ids lists {} attempts; a worker runs at most {MAX_DEVICES}",
                req.running_attempt_ids.len()
            )));
        }
        let cancel = self.0.call(move |s| s.heartbeat(&caller, req.incarnation, &req.running_attempt_ids)).await?;
        Ok(Response::new(v1::HeartbeatResponse { cancel_attempt_ids: cancel }))
    }

    async fn acquire_trial(
        &self,
        request: Request<v1::AcquireTrialRequest>,
    ) -> Result<Response<v1::AcquireTrialResponse>, Status> {
        let owner = owner_of(&request);
        let req = request.into_inner();
        let caller = caller(&req.worker_id, &req.session, owner)?;
        let wait = Duration::from_millis(req.wait_ms).min(MAX_ACQUIRE_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let freed = self.0.freed_signal(&req.worker_id);
        loop {
            let asked = std::time::Instant::now();
            // Register interest before checking, so a submit or a finished attempt between the
            // check and the wait still wakes this call.
            let pending = self.0.work.notified();
            tokio::pin!(pending);
            pending.as_mut().enable();
            let own = freed.notify.notified();
            tokio::pin!(own);
            own.as_mut().enable();
            let (who, inc) = (caller.clone(), req.incarnation);
            let (assignment, free) = self
                .0
                .write(false, move |s| {
                    let a = s.acquire(&who, inc)?;
                    let free = if a.is_none() { s.free_device_count(&who.worker_id)? } else { 0 };
                    Ok((a, free))
                })
                .await?;
            if let Some(a) = assignment {
                self.0.metrics.scheduling.observe(asked.elapsed().as_secs_f64());
                tracing::info!(worker = %req.worker_id, sweep = %a.sweep_id, trial = %a.trial_id, attempt = a.attempt_id, "trial assigned");
                return Ok(Response::new(v1::AcquireTrialResponse { assignment: Some(v1::Assignment::from(&a)) }));
            }
            // Every device busy: only the end of one of this worker's attempts can change that.
            // A free device and nothing (fitting) pending: a newly pending trial can, too.
            let woken = tokio::time::timeout_at(deadline, async {
                if free == 0 {
                    own.as_mut().await;
                } else {
                    tokio::select! {
                        _ = pending.as_mut() => {}
                        _ = own.as_mut() => {}
                    }
                }
            })
            .await;
            if woken.is_err() {
                return Ok(Response::new(v1::AcquireTrialResponse { assignment: None }));
            }
        }
    }

    async fn report_epoch(
        &self,
        request: Request<v1::ReportEpochRequest>,
    ) -> Result<Response<v1::ReportEpochResponse>, Status> {
        let owner = owner_of(&request);
        let req = request.into_inner();
        need_attempt_id(req.attempt_id)?;
        let caller = caller(&req.worker_id, &req.session, owner)?;
        let wire = req.metrics.ok_or_else(|| Status::invalid_argument("ReportEpoch needs metrics"))?;
        let metrics = sweep_core::leaderboard::EpochMetrics::try_from(&wire)
            .map_err(|e| Status::invalid_argument(format!("metrics of epoch {}: {e}", wire.epoch)))?;
        let checkpoint = |field: &str, c: &Option<v1::CheckpointRef>| {
            c.as_ref()
                .map(sweep_core::records::CheckpointRef::try_from)
                .transpose()
                .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
        };
        let extras = ReportExtras {
            parameters: req.parameters,
            last_checkpoint: checkpoint("last_checkpoint", &req.last_checkpoint)?,
            best_checkpoint: checkpoint("best_checkpoint", &req.best_checkpoint)?,
            skipped_images: req.skipped_images,
            resume_checkpoint: checkpoint("resume_checkpoint", &req.resume_checkpoint)?,
            resumed_from_epoch: req.resumed_from_epoch,
            note: cut(&req.note, MAX_TEXT_CHARS),
        };
        for (field, c) in [
            ("last_checkpoint", &extras.last_checkpoint),
            ("best_checkpoint", &extras.best_checkpoint),
            ("resume_checkpoint", &extras.resume_checkpoint),
        ] {
            if let Some(c) = c
                && (c.uri.len() > MAX_URI_BYTES || c.sha256.len() > 128)
            {
                return Err(Status::invalid_argument(format!(
                    "{field}: uri ({} bytes) or sha256 ({} bytes) is too long; the limits are {MAX_URI_BYTES} and 128",
                    c.uri.len(),
                    c.sha256.len()
                )));
            }
        }
        let reply = self.0.write(false, move |s| s.report_epoch(&caller, req.attempt_id, &metrics, &extras)).await?;
        self.0.metrics.reports.inc();
        if reply.unblocked {
            self.0.work.notify_waiters();
        }
        Ok(Response::new(v1::ReportEpochResponse {
            cancel: reply.stop.is_some(),
            stop_reason: reply.stop.map(|r| r.to_string()).unwrap_or_default(),
        }))
    }

    async fn finish_attempt(
        &self,
        request: Request<v1::FinishAttemptRequest>,
    ) -> Result<Response<v1::FinishAttemptResponse>, Status> {
        let owner = owner_of(&request);
        let req = request.into_inner();
        need_attempt_id(req.attempt_id)?;
        let caller = caller(&req.worker_id, &req.session, owner)?;
        let wire_outcome = v1::Outcome::try_from(req.outcome)
            .map_err(|_| Status::invalid_argument(format!("unknown outcome {}", req.outcome)))?;
        let class = v1::ErrorClass::try_from(req.error_class)
            .map_err(|_| Status::invalid_argument(format!("unknown error class {}", req.error_class)))?;
        let outcome = sweep_proto::outcome_of(wire_outcome, class).map_err(Status::invalid_argument)?;
        if !req.wall_seconds.is_finite() || req.wall_seconds < 0.0 {
            return Err(Status::invalid_argument("wall_seconds must be a non-negative number"));
        }
        let message = cut(&req.message, MAX_TEXT_CHARS);
        let attempt = req.attempt_id;
        let worker = self
            .0
            .write(true, move |s| {
                s.finish_attempt(&caller, attempt, outcome, &message, req.wall_seconds)?;
                Ok(Some(caller.worker_id))
            })
            .await?;
        // Its devices are free: the worker's waiting AcquireTrial call re-checks.
        if let Some(w) = worker {
            self.0.wake_worker(&w);
        }
        tracing::info!(attempt, outcome = wire_outcome.as_str_name(), "attempt finished");
        Ok(Response::new(v1::FinishAttemptResponse {}))
    }

    async fn report_progress(
        &self,
        request: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        let owner = owner_of(&request);
        let req = request.into_inner();
        need_attempt_id(req.attempt_id)?;
        let caller = caller(&req.worker_id, &req.session, owner)?;
        let p = req.pretraining.ok_or_else(|| Status::invalid_argument("ReportProgress needs pretraining"))?;
        let backbone = sweep_core::Backbone::from_name(&p.backbone).ok_or_else(|| {
            Status::invalid_argument(format!("unknown backbone `{}`", sweep_core::text::escape(&cut(&p.backbone, 64))))
        })?;
        let progress = sweep_core::records::PretrainProgress {
            backbone,
            epoch: p.epoch,
            epochs: p.epochs,
            seconds: p.seconds,
            waiting: p.waiting,
        };
        progress.check().map_err(Status::invalid_argument)?;
        // Each step is logged once: an epoch further on, or the end of a wait. A worker that
        // sends the same again (a retry, or a loop) adds nothing to the event log.
        {
            let mut seen = self.0.progress_seen.lock().unwrap_or_else(|p| p.into_inner());
            let step = (progress.epoch, progress.waiting);
            match seen.get(&req.attempt_id) {
                Some(&(epoch, waiting)) if !(step.0 > epoch || (waiting && !step.1)) => {
                    return Ok(Response::new(v1::ReportProgressResponse { cancel: false }));
                }
                _ => {}
            }
            if seen.len() >= PROGRESS_SEEN {
                seen.clear();
            }
            seen.insert(req.attempt_id, step);
        }
        let attempt = req.attempt_id;
        let cancel = self.0.write(false, move |s| s.report_progress(&caller, attempt, &progress)).await?;
        Ok(Response::new(v1::ReportProgressResponse { cancel }))
    }
}

/// Attempts whose last progress step the coordinator remembers (then it starts over).
const PROGRESS_SEEN: usize = 10_000;

/// At most `max` characters of `text`.
fn cut(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// The worker a call names, with its session and the identity the transport proved.
fn caller(worker_id: &str, session: &str, owner: String) -> Result<Caller, Status> {
    if worker_id.is_empty() {
        return Err(Status::invalid_argument("worker_id must not be empty; register first"));
    }
    if worker_id.len() > 64 {
        return Err(Status::invalid_argument("worker_id is longer than 64 bytes; no worker has such an id"));
    }
    if session.is_empty() {
        // Registered with a coordinator older than sessions (a rolling upgrade): a new
        // registration gives it one.
        return Err(Status::failed_precondition(format!(
            "worker {} has no session (registered before this coordinator gave them); register again",
            sweep_core::text::escape(worker_id)
        )));
    }
    if session.len() != 64 || !session.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument("session must be the 64 hex digits Register answered"));
    }
    Ok(Caller { worker_id: worker_id.to_string(), session: session.to_string(), owner })
}

/// Who the transport says a call comes from: the bearer token the auth layer accepted, and the
/// client certificate of a mutual-TLS connection (its SHA-256); empty when neither is checked.
fn owner_of<T>(request: &Request<T>) -> String {
    use sha2::Digest;
    let mut parts = Vec::new();
    if let Some(who) = request.extensions().get::<crate::auth::Authenticated>() {
        parts.push(who.identity.clone());
    }
    if let Some(cert) = request.peer_certs().as_ref().and_then(|c| c.first().cloned()) {
        let digest = sha2::Sha256::digest(cert.as_ref());
        parts.push(format!("cert:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }
    parts.join("+")
}

/// Attempt ids start at 1; 0 is a field left unset.
fn need_attempt_id(id: u64) -> Result<(), Status> {
    if id == 0 {
        return Err(Status::invalid_argument("attempt_id must be set (attempt ids start at 1)"));
    }
    Ok(())
}
