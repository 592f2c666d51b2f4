//! Simulated workers, for load tests of a coordinator (`sweep simulate-workers`, the `load`
//! benchmark): real `WorkerService` clients that do what `sweep-worker` does, with fake devices
//! and fake trials, so no libtorch work.
//!
//! Each simulated worker registers with fake devices (`cpu:0…` or `cuda:0…`), heartbeats every
//! third of the TTL the coordinator returns (naming its running attempts), keeps one
//! `AcquireTrial` long poll open, and runs every assignment as an attempt whose epochs are
//! sleeps: after each epoch it calls `ReportEpoch` with metrics computed from the sweep, trial
//! and epoch ([`fake_metrics`]) and a checkpoint reference that names no file, and waits for the
//! reply before the next epoch; then `FinishAttempt`. Cancellation (heartbeat or report reply),
//! fencing, re-registering after a lost lease, bounding every call (long poll: wait + TTL,
//! heartbeat: TTL/2, writes: TTL), retrying transport errors for up to a TTL and the outcome
//! of an attempt stopped by shut-down (failed, retryable) follow `worker/src/daemon.rs`. Unlike `sweep-worker` it trusts the assignment's epoch counts instead
//! of re-expanding the grid from the spec.
//!
//! **Connections.** Workers share HTTP/2 connections: `workers_per_connection` workers (50 by
//! default) use one tonic `Channel`. A worker has at most three calls open at once (heartbeat,
//! the acquire long poll, a report or finish), so 50 workers need at most 150 concurrent
//! streams on a connection: under hyper's default of 200, and far under the coordinator's
//! concurrent-stream limit (4096). 1,000 workers thus take 20 sockets; [`run`]
//! checks (and if needed raises) the file-descriptor limit before it connects.
//!
//! **What is recorded**, per worker, then merged into a [`SimReport`]:
//! * every acknowledged `ReportEpoch`: sweep, trial, epoch, attempt and the values sent
//!   ([`AckedReport`]); [`lost_in`] and [`lost_via_rpc`] look each one up in the
//!   coordinator's store afterwards;
//! * **scheduling latency**, one sample per assignment: from the moment the worker had a free
//!   device and was asking for work to the arrival of the assignment. That moment is the later
//!   of sending the `AcquireTrial` call that returned the assignment and the moment the device
//!   became free: sending the `FinishAttempt` that released it, or, for a worker's first
//!   assignments, its registration. (Free moments queue per worker, oldest first, one per
//!   device.) The sample thus includes the `FinishAttempt` round trip, the wake-up of the long
//!   poll and the acquire transaction; it includes waiting for work too, so it measures
//!   scheduling only while trials are pending (the benchmark keeps them pending). Assignments
//!   of devices free since registration are kept apart ([`SimReport::first_latencies`]): when
//!   a whole fleet starts at once they measure the start-up storm, not steady scheduling;
//! * the round trip of every acknowledged `ReportEpoch`;
//! * errors: every call that failed, by RPC and status code (retried or not).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use sweep_core::leaderboard::Phase;
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use sweep_session::connect::ClientSecurity;
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::Endpoint;

/// Kind of the fake devices a simulated worker announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// CPU slots `cpu:0`, `cpu:1`, …
    Cpu,
    /// GPUs `cuda:0`, `cuda:1`, … (named `Simulated GPU`, 80 GiB).
    Cuda,
}

/// How simulated workers run.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub coordinator: String,
    /// Number of simulated workers.
    pub count: usize,
    /// Fake devices each worker announces.
    pub devices_per_worker: usize,
    pub device_kind: DeviceKind,
    /// How long one simulated epoch takes.
    pub epoch: Duration,
    /// How long one `AcquireTrial` long poll may wait (the coordinator caps it at 30 s).
    pub poll_wait: Duration,
    /// Workers sharing one HTTP/2 connection.
    pub workers_per_connection: usize,
    /// Workers are named `<name>-<n>`.
    pub name: String,
    /// TLS and the bearer token (a `worker` token) for the coordinator, as `sweep-worker` has.
    pub security: sweep_session::connect::ClientSecurity,
    /// Seconds one epoch of an assignment takes (say, from its backbone and phase), reported
    /// as the epoch's time; the simulated epoch sleeps that × `time_scale`. `None`: every epoch
    /// takes `epoch`.
    pub epoch_cost: Option<EpochCost>,
    /// Real time per reported second when `epoch_cost` is set.
    pub time_scale: f64,
}

/// An epoch's cost in seconds: `(assignment, epoch) → seconds`.
#[derive(Clone)]
pub struct EpochCost(pub Arc<CostFn>);

/// What an [`EpochCost`] calls.
pub type CostFn = dyn Fn(&v1::Assignment, u32) -> f64 + Send + Sync;

impl std::fmt::Debug for EpochCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochCost(..)")
    }
}

/// Most simulated workers on one connection (each keeps up to three calls open).
pub const MAX_WORKERS_PER_CONNECTION: usize = 256;

impl SimOptions {
    pub fn new(coordinator: &str, count: usize) -> SimOptions {
        SimOptions {
            coordinator: coordinator.to_string(),
            count,
            devices_per_worker: 1,
            device_kind: DeviceKind::Cpu,
            epoch: Duration::from_secs(1),
            poll_wait: Duration::from_secs(30),
            workers_per_connection: 50,
            name: "sim".into(),
            security: sweep_session::connect::ClientSecurity::default(),
            epoch_cost: None,
            time_scale: 1.0,
        }
    }

    /// Connections the workers share.
    pub fn connections(&self) -> usize {
        self.count.div_ceil(self.workers_per_connection.max(1))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.count == 0 {
            bail!("the number of simulated workers must be at least 1");
        }
        if !(1..=1024).contains(&self.devices_per_worker) {
            bail!("devices per worker must be 1 to 1024, got {}", self.devices_per_worker);
        }
        if !(1..=MAX_WORKERS_PER_CONNECTION).contains(&self.workers_per_connection) {
            bail!(
                "workers per connection must be 1 to {MAX_WORKERS_PER_CONNECTION}, got {}",
                self.workers_per_connection
            );
        }
        if self.poll_wait.is_zero() {
            bail!("the acquire long poll must wait more than 0 s");
        }
        Ok(())
    }

    /// The fake devices a worker announces.
    pub fn devices(&self) -> Vec<v1::Device> {
        (0..self.devices_per_worker)
            .map(|i| match self.device_kind {
                DeviceKind::Cpu => v1::Device {
                    id: format!("cpu:{i}"),
                    kind: "cpu".into(),
                    name: "Simulated CPU slot".into(),
                    memory_bytes: 8 << 30,
                },
                DeviceKind::Cuda => v1::Device {
                    id: format!("cuda:{i}"),
                    kind: "cuda".into(),
                    name: "Simulated GPU".into(),
                    memory_bytes: 80 << 30,
                },
            })
            .collect()
    }
}

/// One `ReportEpoch` the coordinator acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct AckedReport {
    pub sweep_id: Arc<str>,
    pub trial_id: Arc<str>,
    pub epoch: u32,
    pub attempt_id: u64,
    /// train_loss, train_accuracy, val_loss, val_accuracy, seconds, as sent.
    pub values: [f64; 5],
}

/// What a run of simulated workers did.
#[derive(Debug, Default)]
pub struct SimReport {
    pub workers: usize,
    /// Workers that registered at least once.
    pub registered: usize,
    pub connections: usize,
    /// From the start of the run (before registration) to the stop signal.
    pub elapsed: Duration,
    pub reports: Vec<AckedReport>,
    /// Scheduling latency of every assignment of a device that an attempt had freed (see the
    /// module documentation).
    pub latencies: Vec<Duration>,
    /// Scheduling latency of the first assignments of each worker, counted from its
    /// registration (all workers start at once: this is the start-up storm).
    pub first_latencies: Vec<Duration>,
    /// Round trip of every acknowledged `ReportEpoch`.
    pub report_round_trips: Vec<Duration>,
    pub attempts_started: u64,
    /// Attempts finished as succeeded (every epoch reported).
    pub attempts_succeeded: u64,
    /// Attempts stopped at the end of the run (finished as failed, retryable).
    pub attempts_interrupted: u64,
    /// Attempts that ended otherwise: cancelled, fenced, refused, coordinator unreachable.
    pub attempts_other: u64,
    /// Failed calls, by `Rpc: code`.
    pub errors: BTreeMap<String, u64>,
    /// A few error messages, for the report.
    pub error_samples: Vec<String>,
}

impl SimReport {
    /// Acknowledged reports per second over [`SimReport::elapsed`].
    pub fn reports_per_second(&self) -> f64 {
        self.reports.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The `q` quantile (0 to 1) of the scheduling latency; `None` without assignments.
    pub fn latency(&self, q: f64) -> Option<Duration> {
        quantile(&self.latencies, q)
    }

    /// The `q` quantile of the scheduling latency of the workers' first assignments.
    pub fn first_latency(&self, q: f64) -> Option<Duration> {
        quantile(&self.first_latencies, q)
    }

    /// Assignments received.
    pub fn assignments(&self) -> usize {
        self.latencies.len() + self.first_latencies.len()
    }

    /// The `q` quantile of the `ReportEpoch` round trip.
    pub fn report_round_trip(&self, q: f64) -> Option<Duration> {
        quantile(&self.report_round_trips, q)
    }

    fn absorb(&mut self, t: Tally) {
        self.registered += usize::from(t.registered);
        self.reports.extend(t.reports);
        self.latencies.extend(t.latencies);
        self.first_latencies.extend(t.first_latencies);
        self.report_round_trips.extend(t.report_round_trips);
        self.attempts_started += t.attempts_started;
        self.attempts_succeeded += t.attempts_succeeded;
        self.attempts_interrupted += t.attempts_interrupted;
        self.attempts_other += t.attempts_other;
        for (k, v) in t.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for s in t.error_samples {
            if self.error_samples.len() < 10 {
                self.error_samples.push(s);
            }
        }
    }
}

/// The `q` quantile (nearest rank) of unsorted samples.
pub fn quantile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Metrics of a simulated epoch: plausible, and the same for the same sweep, trial and epoch
/// (only `seconds`, the simulated epoch duration, comes from the caller).
pub fn fake_metrics(sweep_id: &str, trial_id: &str, epoch: u32, fe_epochs: u32, seconds: f64) -> v1::EpochMetrics {
    let h = fnv1a(format!("{sweep_id}/{trial_id}").as_bytes());
    // Each trial approaches its own ceiling; fine-tuning climbs a little higher.
    let ceiling = 0.55 + 0.4 * ((h >> 11) as f64 / (1u64 << 53) as f64);
    let progress = 1.0 - (-f64::from(epoch) / 2.5).exp();
    let phase = Phase::of_epoch(epoch, fe_epochs);
    let boost = if phase == Phase::FineTuning { 1.04 } else { 1.0 };
    let val_accuracy = (ceiling * progress * boost).min(0.99);
    let train_accuracy = (val_accuracy * 1.03).min(1.0);
    let train_loss = 2.3 * (1.0 - progress) + 0.05 + 0.01 * (h % 7) as f64;
    v1::EpochMetrics {
        epoch,
        phase: phase.as_str().into(),
        train_loss,
        train_accuracy,
        val_loss: train_loss * 1.15,
        val_accuracy,
        seconds,
        attempt_id: 0,
        shared_with: Vec::new(),
        reused_from: String::new(),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A spec for load tests: every backbone × epoch splits `[1..3, 1..3]` (4 epochs per trial on
/// average) × `lr_decays` exponential strategies, that is `81 × lr_decays` trials (keep it at
/// most 123 for the default limit of 10,000 trials per sweep). Simulated workers ignore the
/// dataset; real ones would train 3 synthetic classes.
pub fn load_spec(name: &str, lr_decays: usize) -> String {
    let mut s = format!("name: {name}\ndataset: {{ kind: synthetic, classes: 3 }}\ngrid:\n  backbone: [");
    s.push_str(&sweep_core::backbone::names().join(", "));
    s.push_str("]\n  lr_decay:\n");
    for i in 0..lr_decays.max(1) {
        s.push_str(&format!(
            "    - {{ strategy: exponential, head_lr: 1.0e-3, factor: {} }}\n",
            1.0 + i as f64 / 100.0
        ));
    }
    s.push_str("  epoch_split: [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3], [3, 1], [3, 2], [3, 3]]\n");
    s.push_str("retries: { max_attempts: 3 }\n");
    s
}

/// Trials per `lr_decay` entry in [`load_spec`].
pub const LOAD_SPEC_TRIALS_PER_DECAY: usize = 81;

// ---------------------------------------------------------------------------------------------
// File descriptors
// ---------------------------------------------------------------------------------------------

/// Makes sure this process can open `more` file descriptors beside those it has open, raising
/// the soft limit (up to the hard one) if needed; returns the limit in force.
pub fn ensure_fd_headroom(more: u64) -> anyhow::Result<u64> {
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(16);
    let needed = open + more + 32;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(needed); // cannot tell: try anyway
    }
    if limit.rlim_cur >= needed {
        return Ok(limit.rlim_cur);
    }
    if limit.rlim_max >= needed {
        let raised = libc::rlimit { rlim_cur: needed.max(limit.rlim_cur), rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    bail!(
        "this needs about {needed} file descriptors ({open} open, {more} more); the limit is {} (hard limit {}): raise it \
         (`ulimit -n`) or put more simulated workers on each connection (--workers-per-connection)",
        limit.rlim_cur,
        limit.rlim_max
    )
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// The endpoint of a coordinator URL (`http://HOST:PORT`, or `https://…` with `security`'s TLS).
fn endpoint(url: &str, security: &ClientSecurity) -> anyhow::Result<Endpoint> {
    Ok(security.endpoint(url)?)
}

/// "cannot reach the coordinator at URL: transport error: the cause (its cause …)".
fn unreachable(url: &str, e: &tonic::transport::Error) -> anyhow::Error {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = source {
        let part = s.to_string();
        if part != last {
            text.push_str(": ");
            text.push_str(&part);
        }
        last = part;
        source = s.source();
    }
    anyhow!("cannot reach the coordinator at {url}: {text}")
}

/// Live totals of a run, for progress lines.
#[derive(Debug, Default)]
pub struct Counters {
    pub registered: AtomicU64,
    pub reports: AtomicU64,
    pub assignments: AtomicU64,
    pub errors: AtomicU64,
}

/// Prints a progress line every 10 s until aborted: `[  30s] 1000 registered, 40 assignments,
/// 1200 reports (40.0/s), 0 errors`, then whatever `extra` adds.
pub fn print_progress(
    counters: Arc<Counters>,
    started: Instant,
    extra: impl Fn() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = started.elapsed().as_secs_f64();
            let reports = counters.reports.load(Ordering::Relaxed);
            eprintln!(
                "[{s:>5.0}s] {} registered, {} assignments, {reports} reports ({:.1}/s), {} errors{}",
                counters.registered.load(Ordering::Relaxed),
                counters.assignments.load(Ordering::Relaxed),
                reports as f64 / s,
                counters.errors.load(Ordering::Relaxed),
                extra(),
            );
        }
    })
}

/// Runs `options.count` simulated workers until `stop` resolves, then stops them the way
/// `sweep-worker` stops on SIGTERM: running attempts end at once and are handed back as failed
/// (retryable). Returns what they did.
pub async fn run(options: SimOptions, stop: impl Future<Output = ()>) -> anyhow::Result<SimReport> {
    run_counting(options, Arc::default(), stop).await
}

/// [`run`], keeping `counters` up to date meanwhile.
pub async fn run_counting(
    options: SimOptions,
    counters: Arc<Counters>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<SimReport> {
    options.check()?;
    let connections = options.connections();
    ensure_fd_headroom(connections as u64)?;
    let url = options.coordinator.clone();
    let endpoint = sweep_session::connect::with_keepalive(endpoint(&url, &options.security)?);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = endpoint.connect().await.map_err(|e| unreachable(&url, &e))?;
        channels.push(channel);
    }

    let started = Instant::now();
    let options = Arc::new(options);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..options.count {
        let channel = channels[n / options.workers_per_connection].clone();
        let client = WorkerServiceClient::with_interceptor(channel, options.security.interceptor());
        let tally = Arc::new(Mutex::new(Tally { counters: counters.clone(), ..Tally::default() }));
        tasks.spawn(worker(n + 1, client, options.clone(), tally, stop_rx.clone()));
    }
    let mut report = SimReport { workers: options.count, connections, ..SimReport::default() };
    let absorb = |report: &mut SimReport, done: Result<Tally, tokio::task::JoinError>| match done {
        Ok(tally) => report.absorb(tally),
        Err(e) => {
            *report.errors.entry("task: panicked".into()).or_default() += 1;
            report.error_samples.push(format!("a simulated worker crashed: {e}"));
        }
    };
    // Until the stop signal, or until every worker has ended by itself (refused, say).
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            done = tasks.join_next() => match done {
                Some(done) => absorb(&mut report, done),
                None => break,
            },
        }
    }
    report.elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        absorb(&mut report, done);
    }
    Ok(report)
}

/// What one simulated worker saw.
#[derive(Default)]
struct Tally {
    registered: bool,
    reports: Vec<AckedReport>,
    latencies: Vec<Duration>,
    first_latencies: Vec<Duration>,
    report_round_trips: Vec<Duration>,
    attempts_started: u64,
    attempts_succeeded: u64,
    attempts_interrupted: u64,
    attempts_other: u64,
    errors: BTreeMap<String, u64>,
    error_samples: Vec<String>,
    /// When each free device became free, oldest first.
    free_since: VecDeque<Freed>,
    counters: Arc<Counters>,
}

/// When a device became free.
#[derive(Debug, Clone, Copy)]
struct Freed {
    at: Instant,
    /// Free since the worker registered (not since an attempt ended).
    at_registration: bool,
}

impl Tally {
    /// `devices` devices became free now (an attempt ended).
    fn freed(&mut self, devices: usize) {
        let now = Freed { at: Instant::now(), at_registration: false };
        self.free_since.extend(std::iter::repeat_n(now, devices.max(1)));
    }

    fn error(&mut self, rpc: &str, s: &Status) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        *self.errors.entry(format!("{rpc}: {:?}", s.code())).or_default() += 1;
        if self.error_samples.len() < 2 {
            self.error_samples.push(format!("{rpc}: {:?}: {}", s.code(), s.message()));
        }
    }
}

type Shared = Arc<Mutex<Tally>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One simulated worker: the worker protocol is [`sweep_session`]'s, as `sweep-worker`'s is;
/// attempts are sleeps; what happens goes into its tally.
async fn worker(
    n: usize,
    client: sweep_session::Wire,
    options: Arc<SimOptions>,
    tally: Shared,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let worker = sweep_session::Worker {
        name: format!("{}-{n}", options.name),
        devices: options.devices(),
        version: concat!(env!("CARGO_PKG_VERSION"), "-sim").into(),
        poll_wait: options.poll_wait,
    };
    let sim = Arc::new(SimWorker { options, tally: tally.clone() });
    let ended = sweep_session::run(client, worker, sim.clone(), sim, async move { stopped(&mut stop).await }).await;
    if let Err(e) = ended {
        let mut t = lock(&tally);
        *t.errors.entry("Register: refused".into()).or_default() += 1;
        if t.error_samples.len() < 2 {
            t.error_samples.push(e.to_string());
        }
    }
    std::mem::take(&mut *lock(&tally))
}

/// A simulated worker's executor (epochs are sleeps) and observer (its tally).
struct SimWorker {
    options: Arc<SimOptions>,
    tally: Shared,
}

impl sweep_session::Observer for SimWorker {
    fn error(&self, rpc: &'static str, status: &Status) {
        lock(&self.tally).error(rpc, status);
    }

    fn registered(&self, _session: &sweep_session::Session) {
        let mut t = lock(&self.tally);
        if !t.registered {
            t.counters.registered.fetch_add(1, Ordering::Relaxed);
        }
        t.registered = true;
        let now = Instant::now();
        t.free_since =
            std::iter::repeat_n(Freed { at: now, at_registration: true }, self.options.devices_per_worker).collect();
    }

    fn assigned(&self, asked: tokio::time::Instant, a: &v1::Assignment) {
        let sent = asked.into_std();
        let now = Instant::now();
        let mut t = lock(&self.tally);
        let mut became_free: Option<Instant> = None;
        let mut first = false;
        for _ in 0..a.devices.len().max(1) {
            if let Some(f) = t.free_since.pop_front() {
                became_free = Some(became_free.map_or(f.at, |b| b.min(f.at)));
                first |= f.at_registration;
            }
        }
        let ready = became_free.map_or(sent, |f| f.max(sent));
        let latency = now.saturating_duration_since(ready);
        if first {
            t.first_latencies.push(latency);
        } else {
            t.latencies.push(latency);
        }
        t.attempts_started += 1;
        t.counters.assignments.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self, a: &v1::Assignment, end: &sweep_session::End) {
        let mut t = lock(&self.tally);
        match end {
            sweep_session::End::Finished { outcome: v1::Outcome::Succeeded, .. } => t.attempts_succeeded += 1,
            sweep_session::End::Finished { shutting_down: true, .. } => t.attempts_interrupted += 1,
            _ => t.attempts_other += 1,
        }
        // The device is free from the moment the coordinator hears of it.
        t.freed(a.devices.len());
    }
}

impl sweep_session::Executor for SimWorker {
    fn run(
        &self,
        attempt: sweep_session::Attempt,
    ) -> std::pin::Pin<Box<dyn Future<Output = sweep_session::Outcome> + Send>> {
        let (options, tally) = (self.options.clone(), self.tally.clone());
        Box::pin(async move {
            let sweep_session::Attempt { assignment: a, reporter, cancel } = attempt;
            let sweep_id: Arc<str> = a.sweep_id.as_str().into();
            let trial_id: Arc<str> = a.trial_id.as_str().into();
            let mut best = f64::NEG_INFINITY;
            // Epochs stored before (by an earlier attempt, or computed for this trial by one it
            // shares them with) are not run again: go on after the resume point handed over.
            let start = a.resume.as_ref().map_or(0, |r| r.epoch);
            for epoch in start + 1..=a.fe_epochs + a.ft_epochs {
                let (seconds, sleep) = match &options.epoch_cost {
                    Some(cost) => {
                        let s = (cost.0)(&a, epoch).clamp(0.0, 1e6);
                        (s, Duration::from_secs_f64((s * options.time_scale).clamp(0.0, 3600.0)))
                    }
                    None => (options.epoch.as_secs_f64(), options.epoch),
                };
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = cancel.raised() => {}
                }
                if cancel.is_raised() {
                    return sweep_session::Outcome::Stopped;
                }
                let metrics = fake_metrics(&sweep_id, &trial_id, epoch, a.fe_epochs, seconds);
                // References shaped like a real store's (the coordinator checks whose they are).
                let checkpoint = |kind: &str| v1::CheckpointRef {
                    uri: format!("sim://sim/{sweep_id}/{trial_id}/{kind}.safetensors"),
                    sha256: (0..4u8)
                        .map(|i| {
                            format!("{:016x}", fnv1a(format!("{sweep_id}/{trial_id}/{epoch}/{kind}/{i}").as_bytes()))
                        })
                        .collect(),
                    bytes: 1,
                    epoch,
                };
                let improved = metrics.val_accuracy > best;
                best = best.max(metrics.val_accuracy);
                let values = [
                    metrics.train_loss,
                    metrics.train_accuracy,
                    metrics.val_loss,
                    metrics.val_accuracy,
                    metrics.seconds,
                ];
                let request = v1::ReportEpochRequest {
                    metrics: Some(metrics),
                    parameters: 11_000_000 + u64::from(a.trial_index),
                    last_checkpoint: Some(checkpoint("last")),
                    best_checkpoint: improved.then(|| checkpoint("best")),
                    resume_checkpoint: Some(checkpoint(&format!("state-e{epoch:04}"))),
                    ..Default::default()
                };
                let sent = Instant::now();
                match reporter.report(request).await {
                    Ok(stop) => {
                        let round_trip = sent.elapsed();
                        let mut t = lock(&tally);
                        t.reports.push(AckedReport {
                            sweep_id: sweep_id.clone(),
                            trial_id: trial_id.clone(),
                            epoch,
                            attempt_id: a.attempt_id,
                            values,
                        });
                        t.report_round_trips.push(round_trip);
                        t.counters.reports.fetch_add(1, Ordering::Relaxed);
                        if stop {
                            return sweep_session::Outcome::Stopped;
                        }
                    }
                    // The session ends the attempt on what went wrong.
                    Err(_) => return sweep_session::Outcome::Stopped,
                }
            }
            sweep_session::Outcome::Succeeded
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Checking what was acknowledged
// ---------------------------------------------------------------------------------------------

/// Stored values of one `(sweep, trial, epoch)`.
pub type StoredMetrics = HashMap<(String, String, u32), [f64; 5]>;

fn missing(acked: &[AckedReport], stored: &StoredMetrics) -> Vec<AckedReport> {
    acked
        .iter()
        .filter(|r| {
            let key = (r.sweep_id.to_string(), r.trial_id.to_string(), r.epoch);
            // A later attempt may have superseded the row; its values are the same (they depend
            // only on sweep, trial and epoch, and the epoch duration of this run).
            stored.get(&key) != Some(&r.values)
        })
        .cloned()
        .collect()
}

/// The acknowledged reports that `stored` (what a coordinator's store holds: `(sweep, trial,
/// epoch)` → values; `sweep_coordinator::history::stored_metrics` reads it from a `sweep.db`)
/// does not hold with the values sent.
pub fn lost_in(stored: &StoredMetrics, acked: &[AckedReport]) -> Vec<AckedReport> {
    missing(acked, stored)
}

/// The acknowledged reports that the coordinator at `url` does not hold with the values sent,
/// asked with `GetTrial` (once per trial, 32 calls at a time), over `security`'s TLS and token
/// (one that may read: `viewer` or more).
pub async fn lost_via_rpc(
    url: &str,
    security: &ClientSecurity,
    acked: &[AckedReport],
) -> anyhow::Result<Vec<AckedReport>> {
    let channel = endpoint(url, security)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| unreachable(url, &e))?;
    let client =
        SweepServiceClient::with_interceptor(channel, security.interceptor()).max_decoding_message_size(64 << 20);
    let trials: HashSet<(Arc<str>, Arc<str>)> =
        acked.iter().map(|r| (r.sweep_id.clone(), r.trial_id.clone())).collect();
    let mut pending = trials.into_iter();
    let mut calls = tokio::task::JoinSet::new();
    let mut stored = StoredMetrics::new();
    loop {
        while calls.len() < 32 {
            let Some((sweep, trial)) = pending.next() else { break };
            let mut c = client.clone();
            calls.spawn(async move {
                let request = v1::GetTrialRequest { sweep_id: sweep.to_string(), trial_id: trial.to_string() };
                (sweep, trial, c.get_trial(request).await)
            });
        }
        let Some(done) = calls.join_next().await else { break };
        let (sweep, trial, reply) = done?;
        let detail = reply.map_err(|s| anyhow!("GetTrial {sweep}/{trial}: {}", s.message()))?.into_inner();
        for m in detail.metrics {
            stored.insert(
                (sweep.to_string(), trial.to_string(), m.epoch),
                [m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, m.seconds],
            );
        }
    }
    Ok(missing(acked, &stored))
}

// ---------------------------------------------------------------------------------------------
// `sweep simulate-workers`
// ---------------------------------------------------------------------------------------------

/// `sweep simulate-workers`: runs the workers for `duration` (or until Ctrl-C / SIGTERM), prints
/// progress every 10 s on stderr and then the figures; with `verify`, looks every acknowledged
/// report up with `GetTrial`. Fails when a report was lost or no worker could register.
pub async fn command(
    options: SimOptions,
    duration: Option<Duration>,
    verify: bool,
    format: crate::output::Format,
) -> anyhow::Result<std::process::ExitCode> {
    let url = options.coordinator.clone();
    let security = options.security.clone();
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    eprintln!(
        "simulating {} workers ({} {} device{} each, {} per connection) against {url}{}",
        options.count,
        options.devices_per_worker,
        match options.device_kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        },
        if options.devices_per_worker == 1 { "" } else { "s" },
        options.workers_per_connection,
        duration.map(|d| format!(" for {} s", d.as_secs())).unwrap_or_else(|| "; Ctrl-C stops".into()),
    );
    let progress = print_progress(counters.clone(), started, String::new);
    let stop = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let limit = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = limit => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    };
    let report = run_counting(options, counters, stop).await;
    progress.abort();
    let report = report?;
    if report.registered == 0 {
        bail!("no simulated worker could register with {url}: {}", report.error_samples.join("; "));
    }
    let lost = if verify {
        eprintln!("checking {} acknowledged reports with GetTrial…", report.reports.len());
        Some(lost_via_rpc(&url, &security, &report.reports).await?)
    } else {
        None
    };
    print_report(&report, lost.as_deref(), format)?;
    Ok(if lost.is_some_and(|l| !l.is_empty()) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

fn ms_text(d: Option<Duration>) -> String {
    ms(d).map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into())
}

/// The figures of a run, as a table or JSON; `lost` when the reports were checked.
pub fn print_report(r: &SimReport, lost: Option<&[AckedReport]>, format: crate::output::Format) -> anyhow::Result<()> {
    match format {
        crate::output::Format::Json => {
            let v = serde_json::json!({
                "workers": r.workers,
                "registered": r.registered,
                "connections": r.connections,
                "seconds": r.elapsed.as_secs_f64(),
                "reports": r.reports.len(),
                "reports_per_second": r.reports_per_second(),
                "assignments": r.assignments(),
                "scheduling_latency_ms": {
                    "p50": ms(r.latency(0.5)), "p99": ms(r.latency(0.99)), "max": ms(r.latency(1.0)),
                    "samples": r.latencies.len(),
                },
                "first_assignment_latency_ms": {
                    "p50": ms(r.first_latency(0.5)), "p99": ms(r.first_latency(0.99)),
                    "max": ms(r.first_latency(1.0)), "samples": r.first_latencies.len(),
                },
                "report_round_trip_ms": {
                    "p50": ms(r.report_round_trip(0.5)), "p99": ms(r.report_round_trip(0.99)),
                    "max": ms(r.report_round_trip(1.0)),
                },
                "attempts": {
                    "started": r.attempts_started, "succeeded": r.attempts_succeeded,
                    "interrupted": r.attempts_interrupted, "other": r.attempts_other,
                },
                "errors": r.errors,
                "lost_reports": lost.map(<[AckedReport]>::len),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        crate::output::Format::Table => {
            for line in report_lines(r, lost) {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// The figures of a run as `label  value` lines.
pub fn report_lines(r: &SimReport, lost: Option<&[AckedReport]>) -> Vec<String> {
    let mut lines = vec![
        format!("workers                  {} ({} registered, {} connections)", r.workers, r.registered, r.connections),
        format!("duration                 {:.1} s", r.elapsed.as_secs_f64()),
        format!("reports acknowledged     {} ({:.1}/s)", r.reports.len(), r.reports_per_second()),
        format!(
            "scheduling latency       p50 {}, p99 {}, max {} ({} assignments after an attempt ended)",
            ms_text(r.latency(0.5)),
            ms_text(r.latency(0.99)),
            ms_text(r.latency(1.0)),
            r.latencies.len()
        ),
        format!(
            "  first assignments      p50 {}, p99 {}, max {} ({}, from registration: the start-up storm)",
            ms_text(r.first_latency(0.5)),
            ms_text(r.first_latency(0.99)),
            ms_text(r.first_latency(1.0)),
            r.first_latencies.len()
        ),
        format!(
            "ReportEpoch round trip   p50 {}, p99 {}, max {}",
            ms_text(r.report_round_trip(0.5)),
            ms_text(r.report_round_trip(0.99)),
            ms_text(r.report_round_trip(1.0))
        ),
        format!(
            "attempts                 {} started, {} succeeded, {} stopped at the end, {} other",
            r.attempts_started, r.attempts_succeeded, r.attempts_interrupted, r.attempts_other
        ),
    ];
    if r.errors.is_empty() {
        lines.push("errors                   0".into());
    } else {
        let by_kind: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        lines.push(format!("errors                   {} ({})", r.error_count(), by_kind.join(", ")));
        for s in &r.error_samples {
            lines.push(format!("  e.g. {s}"));
        }
    }
    match lost {
        Some(l) => {
            lines.push(format!("lost reports             {} (of {} acknowledged)", l.len(), r.reports.len()));
            for x in l.iter().take(5) {
                lines.push(format!("  {}/{} epoch {} (attempt {})", x.sweep_id, x.trial_id, x.epoch, x.attempt_id));
            }
        }
        None => lines.push("lost reports             not checked".into()),
    }
    lines
}
