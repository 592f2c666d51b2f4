//! `sweep-session`: the worker side of the worker protocol, without libtorch.
//!
//! One worker's life with a coordinator: [`run`] registers (and registers again when the
//! coordinator no longer knows the worker), heartbeats every third of the TTL (naming its
//! running attempts, each call bounded by half the TTL), keeps one bounded `AcquireTrial` long
//! poll open, and runs every assignment as an attempt through an [`Executor`]: the executor
//! trains (the tch worker) or sleeps (the simulator) and sends each epoch's report through its
//! [`Reporter`], which carries the worker's id and session secret, retries transport errors for
//! up to a TTL, and says when the coordinator wants the attempt stopped. When the executor
//! returns, the session finishes the attempt with its outcome — unless the attempt is no
//! longer this worker's (fenced) or the coordinator stayed unreachable, when it is left to the
//! coordinator to re-queue. Every retried call goes through [`retry::retry`] (backoff with
//! jitter, a permanent-error predicate).
//!
//! [`connect`] is how every client reaches a coordinator (TLS, client certificates, a bearer
//! token, and the flags that name them), shared with the `sweep` CLI; [`http`] serves the
//! HTTP endpoints of the coordinator and the worker (axum routes behind bounded connections).
//!
//! Attempts stop (their [`Cancel`] is raised) when the coordinator says so in a heartbeat or a
//! report reply, when the lease is lost, when the coordinator has been unreachable for a whole
//! TTL, and at shutdown (then they are handed back as failed, retryable).
//!
//! An [`Observer`] sees what happens (errors by call, registrations, assignments, ends of
//! attempts), for the simulator's figures; the worker daemon logs instead.

pub mod connect;
pub mod http;
pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connect::BearerToken;
use sweep_proto::v1;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::retry::{Backoff, retry};

/// A client of `WorkerService` whose every call carries the bearer token (if any).
pub type Wire = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// What a worker announces when it registers.
#[derive(Debug, Clone)]
pub struct Worker {
    pub name: String,
    pub devices: Vec<v1::Device>,
    pub version: String,
    /// How long one `AcquireTrial` long poll may wait (the coordinator caps it).
    pub poll_wait: Duration,
}

/// One registration: who this worker is to the coordinator, and the client to reach it.
#[derive(Clone)]
pub struct Session {
    client: Wire,
    pub worker_id: String,
    pub incarnation: u64,
    /// The registration's secret; every call in this worker's name carries it.
    secret: String,
    /// The heartbeat TTL the coordinator asked for (at least a second).
    pub ttl: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Session")
            .field("worker_id", &self.worker_id)
            .field("incarnation", &self.incarnation)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Why a worker's session ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator refused this worker for good (a bad token, bad devices).
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
}

/// Why a report or a finish did not go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The attempt is no longer current, or not this worker's: stop without finishing it.
    Fenced(String),
    /// The coordinator refused the data (a bug on one side): fail the attempt.
    Refused(String),
    /// The coordinator stayed unreachable for a whole heartbeat TTL.
    Unreachable(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Fenced(m) => write!(f, "no longer this worker's: {m}"),
            WriteError::Refused(m) => write!(f, "refused: {m}"),
            WriteError::Unreachable(m) => write!(f, "coordinator unreachable: {m}"),
        }
    }
}

/// Codes that mean "this call, in this worker's name, will never go through": the attempt or
/// the registration is not (or no longer) ours, or our token is no longer accepted.
fn is_fenced(code: Code) -> bool {
    matches!(code, Code::FailedPrecondition | Code::NotFound | Code::PermissionDenied | Code::Unauthenticated)
}

/// Codes that mean "the coordinator refuses this data": retrying sends the same.
fn is_refused(code: Code) -> bool {
    matches!(code, Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted)
}

/// An attempt's stop flag: raised once, readable from any thread (the trainer polls
/// [`Cancel::flag`]) and awaitable.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    flag: Arc<AtomicBool>,
    notify: Notify,
}

impl Cancel {
    pub fn raise(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn is_raised(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// The flag itself, for code that polls it off the runtime.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.flag.clone()
    }

    /// Resolves once the flag is raised.
    pub async fn raised(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// Sees what a worker does; every method does nothing unless overridden.
pub trait Observer: Send + Sync + 'static {
    /// A call failed (whether or not it is retried).
    fn error(&self, _rpc: &'static str, _status: &Status) {}
    /// The worker registered (again).
    fn registered(&self, _session: &Session) {}
    /// An assignment arrived for the `AcquireTrial` call sent at `asked`.
    fn assigned(&self, _asked: Instant, _assignment: &v1::Assignment) {}
    /// An attempt ended, just before it is finished (or left to the coordinator).
    fn ended(&self, _assignment: &v1::Assignment, _end: &End) {}
}

/// An [`Observer`] that sees nothing.
pub struct Unobserved;

impl Observer for Unobserved {}

/// Sends an attempt's reports in the worker's name.
#[derive(Clone)]
pub struct Reporter {
    session: Session,
    attempt_id: u64,
    /// The first report that did not go through; the attempt ends on it.
    failure: Arc<Mutex<Option<WriteError>>>,
    observer: Arc<dyn Observer>,
}

impl Reporter {
    /// Stores one epoch's report (committed when this returns `Ok`): retried on transport
    /// errors for up to a TTL. `Ok(true)` means the coordinator wants the attempt stopped. A
    /// failure is remembered: the attempt must stop, and the session decides its end.
    pub async fn report(&self, mut request: v1::ReportEpochRequest) -> Result<bool, WriteError> {
        request.attempt_id = self.attempt_id;
        request.worker_id = self.session.worker_id.clone();
        request.session = self.session.secret.clone();
        let reply = self
            .session
            .write("ReportEpoch", &self.observer, |mut c| {
                let r = request.clone();
                async move { c.report_epoch(r).await }
            })
            .await;
        match reply {
            Ok(r) => {
                let r = r.into_inner();
                if r.cancel && !r.stop_reason.is_empty() {
                    tracing::info!(
                        attempt = self.attempt_id,
                        reason = ?r.stop_reason,
                        "the coordinator stops this attempt"
                    );
                }
                Ok(r.cancel)
            }
            Err(e) => {
                self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| e.clone());
                Err(e)
            }
        }
    }

    /// [`Reporter::report`] from a thread outside the runtime (a training thread).
    pub fn report_blocking(
        &self,
        handle: &tokio::runtime::Handle,
        request: v1::ReportEpochRequest,
    ) -> Result<bool, WriteError> {
        handle.block_on(self.report(request))
    }

    /// Tells the coordinator what the attempt does before its first epoch (pretraining).
    /// Best effort: an answer that does not come (an older coordinator, a partition) changes
    /// nothing for the attempt, and is not retried. `true`: the coordinator wants it stopped.
    pub async fn progress(&self, pretraining: v1::Pretraining) -> bool {
        let request = v1::ReportProgressRequest {
            attempt_id: self.attempt_id,
            worker_id: self.session.worker_id.clone(),
            session: self.session.secret.clone(),
            pretraining: Some(pretraining),
        };
        let mut client = self.session.client.clone();
        match tokio::time::timeout(self.session.ttl, client.report_progress(request)).await {
            Ok(Ok(r)) => r.into_inner().cancel,
            Ok(Err(status)) => {
                tracing::debug!(attempt = self.attempt_id, %status, "progress not logged");
                false
            }
            Err(_) => false,
        }
    }

    /// [`Reporter::progress`] from a thread outside the runtime (a training thread).
    pub fn progress_blocking(&self, handle: &tokio::runtime::Handle, pretraining: v1::Pretraining) -> bool {
        handle.block_on(self.progress(pretraining))
    }

    /// The first report that did not go through, if any.
    pub fn failure(&self) -> Option<WriteError> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One attempt handed to an [`Executor`].
pub struct Attempt {
    pub assignment: v1::Assignment,
    pub reporter: Reporter,
    /// Raised when the attempt must stop (the coordinator said so, the lease was lost, shutdown).
    pub cancel: Cancel,
}

/// How an executor's attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every epoch was trained and reported.
    Succeeded,
    /// It failed: `permanent` when it would fail the same anywhere.
    Failed { permanent: bool, message: String },
    /// It stopped because its [`Cancel`] was raised (or a report said stop).
    Stopped,
}

/// How an attempt ended, as the coordinator hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// `FinishAttempt` is sent with this outcome, error class and message.
    Finished {
        outcome: v1::Outcome,
        class: v1::ErrorClass,
        message: String,
        /// The worker is shutting down (the attempt is handed back).
        shutting_down: bool,
    },
    /// Nothing is sent: the attempt is no longer this worker's, or the coordinator stayed
    /// unreachable; the coordinator re-queues it.
    Dropped(WriteError),
}

/// Runs attempts: trains them (the tch worker) or pretends to (the simulator).
pub trait Executor: Send + Sync + 'static {
    /// Runs one attempt to its end.
    fn run(&self, attempt: Attempt) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;
}

/// Attempts this worker runs, with their stop flags.
type Running = Arc<Mutex<HashMap<u64, Cancel>>>;

fn lock(running: &Running) -> std::sync::MutexGuard<'_, HashMap<u64, Cancel>> {
    running.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Registers `worker`, retrying (with backoff) while the coordinator cannot be reached;
    /// refusals are final.
    pub async fn register(
        client: &Wire,
        worker: &Worker,
        observer: &Arc<dyn Observer>,
    ) -> Result<Session, SessionError> {
        let started = Instant::now();
        let reply = retry(
            Backoff::REGISTER,
            None,
            |s: &Status| matches!(s.code(), Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied),
            |s| {
                observer.error("Register", s);
                if started.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(reason = %s.message(), "cannot register yet; retrying");
                }
            },
            || {
                let mut c = client.clone();
                let request = v1::RegisterRequest {
                    name: worker.name.clone(),
                    devices: worker.devices.clone(),
                    version: worker.version.clone(),
                };
                async move { c.register(request).await }
            },
        )
        .await
        .map_err(|f| SessionError::Refused(f.error.message().to_string()))?
        .into_inner();
        let session = Session {
            client: client.clone(),
            worker_id: reply.worker_id,
            incarnation: reply.incarnation,
            secret: reply.session,
            ttl: Duration::from_millis(reply.heartbeat_ttl_ms.max(1000)),
        };
        tracing::info!(worker_id = %session.worker_id, incarnation = session.incarnation, "registered");
        observer.registered(&session);
        Ok(session)
    }

    /// A write in this worker's name, each try bounded by the TTL and retried on transport
    /// errors for up to a TTL.
    async fn write<T, F, Fut>(&self, rpc: &'static str, observer: &Arc<dyn Observer>, call: F) -> Result<T, WriteError>
    where
        F: Fn(Wire) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let ttl = self.ttl;
        retry(
            Backoff::CALLS,
            Some(ttl),
            |s: &Status| is_fenced(s.code()) || is_refused(s.code()),
            |s| observer.error(rpc, s),
            || {
                let call = call(self.client.clone());
                async move {
                    tokio::time::timeout(ttl, call).await.unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded("no reply from the coordinator within the TTL"))
                    })
                }
            },
        )
        .await
        .map_err(|f| {
            let m = f.error.message().to_string();
            if !f.permanent {
                WriteError::Unreachable(m)
            } else if is_fenced(f.error.code()) {
                WriteError::Fenced(m)
            } else {
                WriteError::Refused(m)
            }
        })
    }

    /// Ends an attempt with `end` (nothing is sent for [`End::Dropped`]).
    async fn finish(&self, attempt_id: u64, end: &End, wall_seconds: f64, observer: &Arc<dyn Observer>) {
        let End::Finished { outcome, class, message, .. } = end else { return };
        let request = v1::FinishAttemptRequest {
            attempt_id,
            outcome: *outcome as i32,
            error_class: *class as i32,
            message: message.clone(),
            wall_seconds,
            worker_id: self.worker_id.clone(),
            session: self.secret.clone(),
        };
        let done = self
            .write("FinishAttempt", observer, |mut c| {
                let r = request.clone();
                async move { c.finish_attempt(r).await }
            })
            .await;
        if let Err(e) = done {
            tracing::warn!(attempt = attempt_id, reason = %e, "could not finish the attempt; the coordinator will re-queue it");
        }
    }
}

/// Runs a worker until `shutdown` resolves: registers, heartbeats, takes assignments and runs
/// each through `executor`, several at once on disjoint devices. At shutdown the running
/// attempts are stopped and handed back (failed, retryable) before this returns.
pub async fn run(
    client: Wire,
    worker: Worker,
    executor: Arc<dyn Executor>,
    observer: Arc<dyn Observer>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SessionError> {
    let running: Running = Arc::default();
    let stopping = Arc::new(AtomicBool::new(false));
    tokio::pin!(shutdown);
    let mut session = tokio::select! {
        s = Session::register(&client, &worker, &observer) => s?,
        _ = &mut shutdown => return Ok(()),
    };
    let mut heartbeat = tokio::spawn(heartbeat_loop(session.clone(), running.clone(), observer.clone()));
    let mut attempts = tokio::task::JoinSet::new();
    let mut jitter = retry::Jitter::new();
    let mut failures = 0u32;
    let result = loop {
        while attempts.try_join_next().is_some() {}
        let request = v1::AcquireTrialRequest {
            worker_id: session.worker_id.clone(),
            incarnation: session.incarnation,
            wait_ms: worker.poll_wait.as_millis() as u64,
            session: session.secret.clone(),
        };
        // The long poll, bounded: a call lost in a partition must not wait forever.
        let bound = worker.poll_wait + session.ttl;
        let mut c = session.client.clone();
        let asked = Instant::now();
        let acquire = async move {
            tokio::time::timeout(bound, c.acquire_trial(request))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no reply to AcquireTrial")))
        };
        let reply = tokio::select! {
            r = acquire => r,
            _ = &mut shutdown => break Ok(()),
        };
        let assignment = match reply {
            Ok(r) => {
                failures = 0;
                r.into_inner().assignment
            }
            // Lease lost, worker forgotten, or a session the coordinator does not know (its
            // state restored from a backup, or it is newer than the registration): register
            // again (a token no longer accepted ends there).
            Err(s) if is_fenced(s.code()) => {
                observer.error("AcquireTrial", &s);
                tracing::warn!(reason = %s.message(), "coordinator no longer knows this worker; registering again");
                heartbeat.abort();
                session = tokio::select! {
                    s = Session::register(&client, &worker, &observer) => match s {
                        Ok(s) => s,
                        Err(e) => break Err(e),
                    },
                    _ = &mut shutdown => break Ok(()),
                };
                heartbeat = tokio::spawn(heartbeat_loop(session.clone(), running.clone(), observer.clone()));
                continue;
            }
            Err(s) => {
                observer.error("AcquireTrial", &s);
                tracing::warn!(code = ?s.code(), reason = %s.message(), "acquire failed; retrying");
                let wait = Backoff::POLL.delay(failures, &mut jitter);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = &mut shutdown => break Ok(()),
                }
            }
        };
        let Some(assignment) = assignment else { continue };
        observer.assigned(asked, &assignment);
        attempts.spawn(attempt(
            session.clone(),
            assignment,
            executor.clone(),
            observer.clone(),
            running.clone(),
            stopping.clone(),
        ));
    };
    if !attempts.is_empty() {
        tracing::info!(attempts = attempts.len(), "shutting down: stopping running attempts");
    }
    stopping.store(true, Ordering::SeqCst);
    for c in lock(&running).values() {
        c.raise();
    }
    while attempts.join_next().await.is_some() {}
    heartbeat.abort();
    result
}

/// Beats every TTL/3 (each call bounded by TTL/2). Raises the stop flag of the attempts the
/// coordinator names, and of every attempt once the lease is lost or the coordinator has been
/// unreachable for a whole TTL (it will have given the trials to other workers by the time
/// the lease ends).
async fn heartbeat_loop(session: Session, running: Running, observer: Arc<dyn Observer>) {
    let mut client = session.client.clone();
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(session.ttl / 3);
    loop {
        tick.tick().await;
        let ids: Vec<u64> = lock(&running).keys().copied().collect();
        let request = v1::HeartbeatRequest {
            worker_id: session.worker_id.clone(),
            incarnation: session.incarnation,
            running_attempt_ids: ids.clone(),
            session: session.secret.clone(),
        };
        let reply = tokio::time::timeout(session.ttl / 2, client.heartbeat(request))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("no heartbeat reply within half the TTL")));
        let stop: Vec<u64> = match reply {
            Ok(r) => {
                last_ok = Instant::now();
                r.into_inner().cancel_attempt_ids
            }
            Err(s) => {
                observer.error("Heartbeat", &s);
                if is_fenced(s.code()) {
                    tracing::warn!(reason = %s.message(), "lease lost; stopping running attempts");
                    ids
                } else if last_ok.elapsed() >= session.ttl {
                    tracing::warn!(reason = %s.message(), "coordinator unreachable for a whole heartbeat TTL; stopping running attempts");
                    ids
                } else {
                    Vec::new()
                }
            }
        };
        let map = lock(&running);
        for id in stop {
            if let Some(c) = map.get(&id) {
                c.raise();
            }
        }
    }
}

/// Runs one attempt through the executor, then finishes it with what happened.
async fn attempt(
    session: Session,
    a: v1::Assignment,
    executor: Arc<dyn Executor>,
    observer: Arc<dyn Observer>,
    running: Running,
    stopping: Arc<AtomicBool>,
) {
    let started = Instant::now();
    let attempt_id = a.attempt_id;
    let cancel = Cancel::default();
    lock(&running).insert(attempt_id, cancel.clone());
    let reporter =
        Reporter { session: session.clone(), attempt_id, failure: Arc::default(), observer: observer.clone() };
    let outcome =
        executor.run(Attempt { assignment: a.clone(), reporter: reporter.clone(), cancel: cancel.clone() }).await;
    lock(&running).remove(&attempt_id);
    let shutting_down = stopping.load(Ordering::SeqCst);
    let finished = |outcome, class, message: String| End::Finished { outcome, class, message, shutting_down };
    let end = match (reporter.failure(), outcome) {
        (Some(e @ (WriteError::Fenced(_) | WriteError::Unreachable(_))), _) => End::Dropped(e),
        (Some(WriteError::Refused(m)), _) => {
            finished(v1::Outcome::Failed, v1::ErrorClass::Permanent, format!("coordinator refused a report: {m}"))
        }
        (None, Outcome::Succeeded) => finished(v1::Outcome::Succeeded, v1::ErrorClass::Unspecified, String::new()),
        (None, Outcome::Stopped) if shutting_down => {
            finished(v1::Outcome::Failed, v1::ErrorClass::Retryable, "the worker was shut down".into())
        }
        (None, Outcome::Stopped) => {
            finished(v1::Outcome::Cancelled, v1::ErrorClass::Unspecified, "stopped on request".into())
        }
        (None, Outcome::Failed { permanent, message }) => {
            let class = if permanent { v1::ErrorClass::Permanent } else { v1::ErrorClass::Retryable };
            finished(v1::Outcome::Failed, class, message)
        }
    };
    match &end {
        End::Dropped(e) => tracing::warn!(attempt = attempt_id, reason = %e, "attempt dropped"),
        End::Finished { outcome: v1::Outcome::Failed, class, message, .. } => {
            tracing::warn!(attempt = attempt_id, class = class.as_str_name(), %message, "attempt failed")
        }
        End::Finished { outcome, .. } => {
            tracing::info!(
                attempt = attempt_id,
                outcome = outcome.as_str_name(),
                seconds = started.elapsed().as_secs_f64(),
                "attempt finished"
            )
        }
    }
    observer.ended(&a, &end);
    session.finish(attempt_id, &end, started.elapsed().as_secs_f64(), &observer).await;
}

/// Makes a printing command end quietly, with status 141 as if killed by SIGPIPE, when its
/// standard output is closed (`sweep list | head`): Rust ignores SIGPIPE, so `println!` then
/// panics with "Broken pipe". SIGPIPE itself stays ignored in every program: a socket whose
/// peer vanished mid-write (vectored writes raise SIGPIPE) must give an error, never a silent
/// death. Call once at the start of `main`.
pub fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // `println!` ("failed printing to stdout: Broken pipe"), clap_complete ("failed to
        // write completion file: … BrokenPipe …"): a closed output, not a bug.
        if message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
