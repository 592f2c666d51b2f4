//! The coordinator server: `SweepService` and `WorkerService` over one [`Store`].
//!
//! Store calls are synchronous SQLite transactions; handlers run them on tokio's blocking pool
//! behind one mutex, so writes are serialised and each reply goes out after its commit.
//! Two in-memory signals wake waiters: `work` (a trial may have become available: long-polling
//! `AcquireTrial` calls re-check) and `events` (the last event sequence: `WatchSweep` streams
//! read the new events from the store).

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

use crate::store::{ReportExtras, Store, StoreError, now_ms};

/// Largest spec accepted by `SubmitSweep`.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Largest gRPC message the server decodes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Longest an `AcquireTrial` call is held open.
pub const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

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
    pub parse: ParseOptions,
}

impl Config {
    pub fn new(listen: SocketAddr, state_dir: PathBuf) -> Config {
        Config {
            listen,
            state_dir,
            heartbeat_ttl: Duration::from_secs(10),
            lease_grace: Duration::from_secs(20),
            parse: ParseOptions::default(),
        }
    }
}

/// State shared by every handler.
pub struct Shared {
    store: Mutex<Store>,
    work: Notify,
    events: watch::Sender<u64>,
    config: Config,
}

impl Shared {
    /// Runs `f` on the store, off the async runtime.
    async fn call<T, F>(self: &Arc<Self>, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut store = shared.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut store)
        })
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(Status::from)
    }

    /// Runs a write and then wakes watchers (and, if `work`, long-polling workers).
    async fn write<T, F>(self: &Arc<Self>, work: bool, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        let result = self.call(f).await;
        if let Ok(seq) = self.call(|s| s.last_sequence()).await {
            self.events.send_replace(seq);
        }
        if work {
            self.work.notify_waiters();
        }
        result
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NotFound(m) => Status::not_found(m),
            StoreError::FailedPrecondition(m) => Status::failed_precondition(m),
            StoreError::InvalidArgument(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        }
    }
}

/// Handle to a running coordinator.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops serving: in-flight calls get up to [`SHUTDOWN_GRACE`] to finish, then every
    /// connection is dropped (a client that never reads its socket cannot hold the coordinator
    /// open). Nothing is lost either way: every acknowledged write is already committed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.reaper.abort();
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(joined) => joined??,
            Err(_) => {
                tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                self.task.abort();
            }
        }
        Ok(())
    }

    /// Waits until the server ends (on error; it runs until stopped otherwise).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// Opens the store and starts serving on `config.listen` (port 0 picks a free port).
pub async fn start(config: Config) -> anyhow::Result<Running> {
    use anyhow::Context;
    let store = Store::open(&config.state_dir)?;
    let last = store.last_sequence()?;
    let (events, _) = watch::channel(last);
    let shared = Arc::new(Shared { store: Mutex::new(store), work: Notify::new(), events, config: config.clone() });

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();

    let sweeps = SweepServiceServer::new(SweepApi(Arc::clone(&shared)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 << 20);
    let workers = WorkerServiceServer::new(WorkerApi(Arc::clone(&shared))).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(sweeps)
            .add_service(workers)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    let reaper = tokio::spawn(reap_leases(Arc::clone(&shared)));
    Ok(Running { addr, shutdown: Some(tx), task, reaper })
}

/// Ends the leases of workers that stopped sending heartbeats.
async fn reap_leases(shared: Arc<Shared>) {
    let ttl = shared.config.heartbeat_ttl;
    let limit = ttl + shared.config.lease_grace;
    let mut tick = tokio::time::interval((ttl / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let deadline = now_ms() - limit.as_millis() as i64;
        match shared.write(true, move |s| s.expire_workers(deadline)).await {
            Ok(gone) if !gone.is_empty() => tracing::warn!(workers = ?gone, "leases ended: no heartbeat"),
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
                "spec is {} bytes; the limit is {MAX_SPEC_BYTES}",
                req.spec_yaml.len()
            )));
        }
        let source = if req.source.is_empty() { "spec".to_string() } else { req.source };
        let parsed = spec::parse_with(&req.spec_yaml, self.0.config.parse).map_err(|e| {
            Status::invalid_argument(format!("{source}:{}:{}: {}", e.line, e.column, field_message(&e)))
        })?;
        let (sweep_id, trial_count) = self.0.write(true, move |s| s.submit(&req.spec_yaml, &source, &parsed)).await?;
        tracing::info!(%sweep_id, trial_count, "sweep submitted");
        Ok(Response::new(v1::SubmitSweepResponse { sweep_id, trial_count }))
    }

    async fn get_sweep(&self, request: Request<v1::GetSweepRequest>) -> Result<Response<v1::SweepStatus>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(self.0.call(move |s| s.get_sweep(&id)).await?))
    }

    async fn list_sweeps(
        &self,
        _request: Request<v1::ListSweepsRequest>,
    ) -> Result<Response<v1::ListSweepsResponse>, Status> {
        let sweeps = self.0.call(|s| s.list_sweeps()).await?;
        Ok(Response::new(v1::ListSweepsResponse { sweeps }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<v1::CancelSweepRequest>,
    ) -> Result<Response<v1::CancelSweepResponse>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(self.0.write(false, move |s| s.cancel_sweep(&id)).await?))
    }

    async fn get_leaderboard(
        &self,
        request: Request<v1::GetLeaderboardRequest>,
    ) -> Result<Response<v1::Leaderboard>, Status> {
        let id = request.into_inner().sweep_id;
        Ok(Response::new(self.0.call(move |s| s.leaderboard(&id)).await?))
    }

    async fn get_trial(&self, request: Request<v1::GetTrialRequest>) -> Result<Response<v1::TrialDetail>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.0.call(move |s| s.trial(&req.sweep_id, &req.trial_id)).await?))
    }

    async fn list_workers(
        &self,
        _request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let workers = self.0.call(|s| s.workers()).await?;
        Ok(Response::new(v1::ListWorkersResponse { workers }))
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
        let sweep_id = snapshot.sweep.as_ref().map(|s| s.id.clone()).unwrap_or_default();
        let ended = snapshot.sweep.as_ref().map(|s| s.finished_at_ms != 0).unwrap_or(false);
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
                    let is_end = matches!(event.event, Some(v1::sweep_event::Event::Ended(_)));
                    if tx.send(Ok(event)).await.is_err() || is_end {
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
        let req = request.into_inner();
        if req.devices.len() > 1024 {
            return Err(Status::invalid_argument("a worker may register at most 1024 devices"));
        }
        let name = if req.name.is_empty() { "worker".to_string() } else { req.name.chars().take(200).collect() };
        let log_name = name.clone();
        let (worker_id, incarnation) =
            self.0.write(true, move |s| s.register(&name, &req.devices, &req.version)).await?;
        tracing::info!(%worker_id, name = %log_name, "worker registered");
        Ok(Response::new(v1::RegisterResponse {
            worker_id,
            incarnation,
            heartbeat_ttl_ms: self.0.config.heartbeat_ttl.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let cancel =
            self.0.call(move |s| s.heartbeat(&req.worker_id, req.incarnation, &req.running_attempt_ids)).await?;
        Ok(Response::new(v1::HeartbeatResponse { cancel_attempt_ids: cancel }))
    }

    async fn acquire_trial(
        &self,
        request: Request<v1::AcquireTrialRequest>,
    ) -> Result<Response<v1::AcquireTrialResponse>, Status> {
        let req = request.into_inner();
        let wait = Duration::from_millis(req.wait_ms).min(MAX_ACQUIRE_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before checking, so a submit between the check and the wait
            // still wakes this call.
            let notified = self.0.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (id, inc) = (req.worker_id.clone(), req.incarnation);
            let assignment = self.0.write(false, move |s| s.acquire(&id, inc)).await?;
            if let Some(a) = assignment {
                tracing::info!(worker = %req.worker_id, sweep = %a.sweep_id, trial = %a.trial_id, attempt = a.attempt_id, "trial assigned");
                return Ok(Response::new(v1::AcquireTrialResponse { assignment: Some(a) }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(v1::AcquireTrialResponse { assignment: None }));
            }
        }
    }

    async fn report_epoch(
        &self,
        request: Request<v1::ReportEpochRequest>,
    ) -> Result<Response<v1::ReportEpochResponse>, Status> {
        let req = request.into_inner();
        let wire = req.metrics.ok_or_else(|| Status::invalid_argument("ReportEpoch needs metrics"))?;
        let metrics = sweep_core::leaderboard::EpochMetrics::try_from(&wire)
            .map_err(|e| Status::invalid_argument(format!("metrics of epoch {}: {e}", wire.epoch)))?;
        let extras = ReportExtras {
            parameters: req.parameters,
            last_checkpoint: req.last_checkpoint,
            best_checkpoint: req.best_checkpoint,
            skipped_images: req.skipped_images,
        };
        let cancel = self.0.write(false, move |s| s.report_epoch(req.attempt_id, &metrics, &extras)).await?;
        Ok(Response::new(v1::ReportEpochResponse { cancel }))
    }

    async fn finish_attempt(
        &self,
        request: Request<v1::FinishAttemptRequest>,
    ) -> Result<Response<v1::FinishAttemptResponse>, Status> {
        let req = request.into_inner();
        let outcome = v1::Outcome::try_from(req.outcome)
            .map_err(|_| Status::invalid_argument(format!("unknown outcome {}", req.outcome)))?;
        let class = v1::ErrorClass::try_from(req.error_class)
            .map_err(|_| Status::invalid_argument(format!("unknown error class {}", req.error_class)))?;
        if !req.wall_seconds.is_finite() || req.wall_seconds < 0.0 {
            return Err(Status::invalid_argument("wall_seconds must be a non-negative number"));
        }
        let message: String = req.message.chars().take(4000).collect();
        let attempt = req.attempt_id;
        self.0.write(true, move |s| s.finish_attempt(attempt, outcome, class, &message, req.wall_seconds)).await?;
        tracing::info!(attempt, outcome = outcome.as_str_name(), "attempt finished");
        Ok(Response::new(v1::FinishAttemptResponse {}))
    }
}
