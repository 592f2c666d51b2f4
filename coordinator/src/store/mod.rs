//! The coordinator's durable store, as a trait in domain terms: [`Store`] takes and answers
//! `sweep-core` records, states and [`StoreError`]s — no wire messages, no gRPC codes (the
//! server maps errors to `tonic::Status` in one place, `server.rs`).
//!
//! **Invariant:** every method that changes state runs in one transaction and returns only after
//! it has committed, so a reply sent to a client or worker is never ahead of what is on disk.
//! Killing the process at any moment loses nothing that was acknowledged. Inside a batch
//! ([`Store::begin_batch`] … [`Store::commit_batch`]) a method's changes are its own (a failing
//! call rolls back only itself) and the batch commits once, before any of its callers is
//! answered: the server batches the calls that arrive together this way (group commit).
//!
//! [`sqlite`] is the implementation (one SQLite database per state directory). A second backend
//! implements [`Store`] and runs the same test-suite (`coordinator/tests/store.rs`, one macro
//! call per backend).

pub mod sqlite;

use std::collections::HashMap;

use sweep_core::leaderboard::EpochMetrics;
use sweep_core::records::{
    Assignment, Cancelled, CheckpointRef, Device, Event, Leaderboard, Outcome, References, ReportReply, Submitted,
    SweepStatus, SweepSummary, TrialDetail, WorkerInfo,
};
use sweep_core::spec::SweepSpec;

pub use sqlite::{DB_FILE, SqliteStore};

/// Errors of the store, in domain terms; `server.rs` maps them to gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such sweep, trial, attempt or worker.
    #[error("{0}")]
    NotFound(String),
    /// It exists, but its state does not allow this: a stale (fenced) attempt, an unknown
    /// worker incarnation, a retry of a trial that did not fail.
    #[error("{0}")]
    WrongState(String),
    /// A value that can never be right: a bad device list, a report past the trial's end, a
    /// checkpoint reference that is not the trial's own.
    #[error("{0}")]
    Invalid(String),
    /// The caller is not who may do this (another worker's session, attempt or identity).
    #[error("{0}")]
    NotYours(String),
    /// The backend failed (the database engine, the file system): `what` says where.
    #[error("{what}: {source}")]
    Backend { what: String, source: Box<dyn std::error::Error + Send + Sync> },
    /// Stored data that does not read back as written.
    #[error("state database holds data this version cannot read: {0}")]
    Corrupt(String),
    /// The state directory is damaged, not a sweep state directory, or in use: nothing was
    /// opened or changed.
    #[error("{0}")]
    Damaged(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Failed attempts in a row after which a worker is quarantined, by default.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 3;
/// Most rows one page of a list holds.
pub const MAX_PAGE: usize = 1000;
/// About the most bytes one page of workers holds (a client decodes 4 MiB by default).
pub const MAX_PAGE_BYTES: usize = 2 << 20;

/// Who makes a worker call: the worker it names, the session secret its registration was
/// given, and who it authenticated as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub worker_id: String,
    pub session: String,
    /// The identity the transport proved: `token:<SHA-256 of the token>` for a bearer token,
    /// `cert:<SHA-256 of the certificate>` for a client certificate, both joined by `+`; empty when the
    /// coordinator checks neither.
    pub owner: String,
}

/// What [`Store::register`] gives a new worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub worker_id: String,
    pub incarnation: u64,
    /// The secret of this registration (64 hex digits); only its hash is stored.
    pub session: String,
}

/// What a report carries besides the metrics.
#[derive(Debug, Clone, Default)]
pub struct ReportExtras {
    pub parameters: u64,
    pub last_checkpoint: Option<CheckpointRef>,
    pub best_checkpoint: Option<CheckpointRef>,
    pub skipped_images: u32,
    pub resume_checkpoint: Option<CheckpointRef>,
    /// First report of an attempt: how it started.
    pub resumed_from_epoch: u32,
    pub note: String,
}

/// One page of a list, and the token of the next page (empty after the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: String,
}

/// `(sweep, trial id, epoch)` → train loss, train accuracy, validation loss, validation accuracy,
/// seconds.
pub type StoredMetrics = HashMap<(String, String, u32), [f64; 5]>;

/// What can be read from a state without changing it: what the history checker and the
/// simulator's lost-report check need. A running store is one; so is a read-only view of a
/// state another process serves ([`sqlite::ReadOnly`]).
pub trait StateReader {
    /// Everything stored, as one consistent snapshot, for [`crate::history::check`]. Damaged
    /// records are kept (with what is wrong with them), not refused.
    fn history(&self) -> Result<crate::history::Snapshot>;

    /// Every stored metric (the simulator's check that no acknowledged report was lost).
    fn stored_metrics(&self) -> Result<StoredMetrics>;
}

/// The store. Not `Sync`: the server keeps it on one thread and sends it calls.
pub trait Store: StateReader + Send {
    // ---- batches and settings ----

    /// Starts a batch: the calls until [`Store::commit_batch`] commit together, and nothing is
    /// committed before it.
    fn begin_batch(&mut self) -> Result<()>;
    /// Commits a batch (one sync for all its calls); on failure rolls all of it back.
    fn commit_batch(&mut self) -> Result<()>;
    /// Makes the whole state durable in its final place (a clean shutdown does this last).
    fn checkpoint(&mut self) -> Result<()>;
    /// Failed attempts in a row after which a worker is quarantined (0: never).
    fn set_quarantine_after(&mut self, n: u32) -> Result<()>;

    // ---- sweeps ----

    /// Stores a validated sweep and queues its trials. Each trial starts from the longest run of
    /// its first epochs that an earlier sweep stored with a resume point (the same content
    /// key, `stages::epoch_keys`): those epochs' rows are stored for it as they were computed,
    /// and it runs on from that point (or is complete).
    fn submit(&mut self, spec_yaml: &str, source: &str, spec: &SweepSpec) -> Result<Submitted>;
    /// One page of sweeps, newest first: at most `page_size` (1 to [`MAX_PAGE`]) of those
    /// older than the page `token` names (empty: from the newest), only those tagged `tag`
    /// unless it is empty.
    fn list_sweeps_page(&self, page_size: usize, token: &str, tag: &str) -> Result<Page<SweepSummary>>;
    /// Adds and removes tags and replaces the note when `note` is given (`sweep tag`, `sweep
    /// note`, and a submission's own). A tag or note the rules of `records::check_tag` and
    /// `check_note` refuse, or more than `MAX_TAGS` tags, is `Invalid` and changes nothing.
    fn update_sweep(
        &mut self,
        sweep_id: &str,
        add: &[String],
        remove: &[String],
        note: Option<&str>,
    ) -> Result<SweepSummary>;
    /// A sweep, named by its id or a unique prefix of it, with its trials.
    fn get_sweep(&self, sweep_id: &str) -> Result<SweepStatus>;
    /// Cancels waiting trials now; running attempts are told to stop through their next
    /// heartbeat or report, and their trials end as cancelled when they do.
    fn cancel_sweep(&mut self, sweep_id: &str) -> Result<Cancelled>;
    /// Re-queues the failed trials of a sweep (all, or those of `trial_ids`) with a fresh
    /// attempt budget; their metrics and resume points stay. Returns the trial ids re-queued.
    fn retry_sweep(&mut self, sweep_id: &str, trial_ids: &[String]) -> Result<Vec<String>>;
    /// Marks an ended sweep as no longer kept (`sweep drop`): later sweeps stop starting from
    /// its stage points, which are forgotten, and its own references stop keeping files. Its
    /// records stay. Returns its id and how many stage points it had. A sweep with a trial
    /// waiting or running is `WrongState`.
    fn drop_sweep(&mut self, sweep_id: &str) -> Result<(String, u32)>;
    /// The keys in sweep `sweep_id`'s folders of the artifact store that kept sweeps reference
    /// (trials' checkpoints, stage points), and whether its folders may be collected.
    fn references(&self, sweep_id: &str) -> Result<References>;
    fn leaderboard(&self, sweep_id: &str) -> Result<Leaderboard>;
    fn trial(&self, sweep_id: &str, trial_id: &str) -> Result<TrialDetail>;

    /// Every sweep, newest first (every page).
    fn list_sweeps(&self) -> Result<Vec<SweepSummary>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.list_sweeps_page(MAX_PAGE, &token, "")?;
            all.extend(page.items);
            if page.next.is_empty() {
                return Ok(all);
            }
            token = page.next;
        }
    }

    // ---- workers ----

    /// Registers a worker: a new id, a new incarnation (larger than any given before) and a new
    /// session secret, which every later call in the worker's name must carry. `owner` is who
    /// registered it (see [`Caller::owner`]).
    fn register(&mut self, name: &str, devices: &[Device], version: &str, owner: &str) -> Result<Registration>;
    /// Records a heartbeat; returns the attempts (among `running`) the worker must stop.
    fn heartbeat(&mut self, caller: &Caller, incarnation: u64, running: &[u64]) -> Result<Vec<u64>>;
    /// One page of workers in the order they registered: at most `page_size` after the page
    /// `token` names (empty: from the first).
    fn workers_page(&self, page_size: usize, token: &str) -> Result<Page<WorkerInfo>>;
    /// Forgets workers gone since before `deadline_ms` that hold no running attempt (attempts
    /// keep the worker's id). Returns how many.
    fn forget_workers(&mut self, deadline_ms: i64) -> Result<usize>;
    /// Ends the lease of every worker not seen since `deadline_ms`: it is gone and its running
    /// attempts lost; their trials go back to the queue (or fail when out of attempts).
    /// Returns the ids of the workers expired.
    fn expire_workers(&mut self, deadline_ms: i64) -> Result<Vec<String>>;
    /// How many of the worker's devices no running attempt holds (0 for an unknown worker).
    fn free_device_count(&self, worker_id: &str) -> Result<usize>;

    /// Every worker, in the order they registered (every page).
    fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.workers_page(usize::MAX, &token)?;
            all.extend(page.items);
            if page.next.is_empty() {
                return Ok(all);
            }
            token = page.next;
        }
    }

    // ---- attempts ----

    /// Hands the trial `sweep_core::schedule` picks for the worker's free devices to it, as a
    /// new attempt, or `None`.
    fn acquire(&mut self, caller: &Caller, incarnation: u64) -> Result<Option<Assignment>>;
    /// Stores one epoch's metrics for a current attempt; says whether the attempt should stop.
    fn report_epoch(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        metrics: &EpochMetrics,
        extras: &ReportExtras,
    ) -> Result<ReportReply>;
    /// Logs what a current attempt does before its first epoch (pretraining its backbone, the
    /// trial's) as a note of its trial; says whether the attempt should stop. An attempt that
    /// has reported an epoch is past pretraining: `WrongState`.
    fn report_progress(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        progress: &sweep_core::records::PretrainProgress,
    ) -> Result<bool>;
    /// Ends a current attempt with the worker's outcome (`message`: why it failed or stopped).
    fn finish_attempt(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        outcome: Outcome,
        message: &str,
        wall_seconds: f64,
    ) -> Result<()>;
    /// Whether any trial is waiting for a worker.
    fn has_pending(&self) -> Result<bool>;

    // ---- events ----

    /// Events of a sweep with a sequence number above `after`, oldest first, at most `limit`.
    fn events_after(&self, sweep_id: &str, after: u64, limit: usize) -> Result<Vec<Event>>;
    /// The largest event sequence number so far (0 when there is none).
    fn last_sequence(&self) -> Result<u64>;
}

/// The file a checkpoint reference of a trial must name: `best.safetensors`,
/// `last.safetensors`, or the resume point `state-e<epoch>.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    Best,
    Last,
    Resume,
}

impl CheckpointKind {
    /// The name it has in reports and in the store.
    pub fn field(self) -> &'static str {
        match self {
            CheckpointKind::Best => "best_checkpoint",
            CheckpointKind::Last => "last_checkpoint",
            CheckpointKind::Resume => "resume_checkpoint",
        }
    }

    /// The file it names, for a checkpoint of `epoch`.
    pub fn file(self, epoch: u32) -> String {
        match self {
            CheckpointKind::Best => "best.safetensors".into(),
            CheckpointKind::Last => "last.safetensors".into(),
            CheckpointKind::Resume => format!("state-e{epoch:04}.safetensors"),
        }
    }

    /// Whether `name` is the file it may also name for an epoch shared with other trials: that
    /// epoch's own weights as one attempt computed them, `last-e<epoch>-a<attempt>.safetensors`
    /// (both `last` and `best` then name it), kept, so the trials it is credited to hold a
    /// file nothing overwrites — not a later epoch, not a recomputation.
    pub fn is_shared_file(self, epoch: u32, name: &str) -> bool {
        let attempt = match self {
            CheckpointKind::Best | CheckpointKind::Last => {
                name.strip_prefix(&format!("last-e{epoch:04}-a")).and_then(|rest| rest.strip_suffix(".safetensors"))
            }
            CheckpointKind::Resume => None,
        };
        attempt.is_some_and(|a| !a.is_empty() && a.len() <= 20 && a.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Why a checkpoint reference is not the trial's own file of `kind`, if it is not: its path must
/// end in `/<sweep>/<trial>/<file>` with no `.` or `..` segment and no control character, and it
/// must carry the SHA-256 (64 lower-case hex digits) and size of what it names. (Where the
/// artifact store is — a directory, a bucket — is the workers' business; whose trial it belongs
/// to is checked here and again by the worker that resumes from it.)
pub fn check_checkpoint_ref(
    c: &CheckpointRef,
    sweep_id: &str,
    trial_id: &str,
    kind: CheckpointKind,
) -> std::result::Result<(), String> {
    let file = kind.file(c.epoch);
    let shown = || sweep_core::text::escape(&c.uri);
    if c.uri.chars().any(char::is_control) {
        return Err(format!("uri `{}` has control characters", shown()));
    }
    let path = c.uri.split_once("://").map_or(c.uri.as_str(), |(_, rest)| rest);
    let segments: Vec<&str> = path.split('/').collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(format!("uri `{}` has a `.` or `..` segment", shown()));
    }
    let tail = &segments[segments.len().saturating_sub(3)..];
    let own = tail.len() == 3 && tail[0] == sweep_id && tail[1] == trial_id;
    if !own || (tail[2] != file && !kind.is_shared_file(c.epoch, tail[2])) {
        let or = match kind {
            CheckpointKind::Resume => String::new(),
            _ => format!(" or `{sweep_id}/{trial_id}/last-e{:04}-a<attempt>.safetensors`", c.epoch),
        };
        return Err(format!(
            "uri `{}` is not this trial's own: it must end in `{sweep_id}/{trial_id}/{file}`{or}",
            shown()
        ));
    }
    if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("sha256 must be 64 lower-case hex digits (got {} characters)", c.sha256.len()));
    }
    if c.bytes == 0 {
        return Err("bytes must be the size of the file (got 0)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_epochs_weights_are_the_trials_own_file_of_that_epoch_and_attempt() {
        let r = |file: &str, epoch| CheckpointRef {
            uri: format!("s3://b/p/s-0001/t002/{file}"),
            sha256: "ab".repeat(32),
            bytes: 9,
            epoch,
        };
        for kind in [CheckpointKind::Last, CheckpointKind::Best] {
            assert!(check_checkpoint_ref(&r("last-e0003-a17.safetensors", 3), "s-0001", "t002", kind).is_ok());
            for bad in ["last-e0003-a.safetensors", "last-e0003-a1x.safetensors", "last-e0003.safetensors"] {
                let e = check_checkpoint_ref(&r(bad, 3), "s-0001", "t002", kind).unwrap_err();
                assert!(e.contains("last-e0003-a<attempt>"), "{e}");
            }
            // Another epoch's file, another trial's folder.
            assert!(check_checkpoint_ref(&r("last-e0002-a17.safetensors", 3), "s-0001", "t002", kind).is_err());
            assert!(check_checkpoint_ref(&r("last-e0003-a17.safetensors", 3), "s-0001", "t001", kind).is_err());
        }
        assert!(
            check_checkpoint_ref(&r("last-e0003-a17.safetensors", 3), "s-0001", "t002", CheckpointKind::Resume)
                .is_err()
        );
    }
}
