//! The coordinator's durable store: one SQLite database (`<state dir>/sweep.db`) in WAL mode
//! with `synchronous=FULL`.
//!
//! **Invariant:** every method that changes state runs in one transaction and returns only after
//! it has committed, so a reply sent to a client or worker is never ahead of what is on disk.
//! Killing the process at any moment loses nothing that was acknowledged.
//!
//! Each method's transaction is a savepoint, so calls can also run inside a batch
//! ([`Store::begin_batch`] … [`Store::commit_batch`]): a failing call rolls back its own
//! changes only, and the batch commits (one sync) before any of its callers is answered. The
//! server batches the calls that arrive together this way (group commit).
//!
//! Tables: `sweeps`, `trials` (one row per grid cell), `attempts` (one row per try of a trial on
//! a worker), `metrics` (one row per trial and epoch: a later attempt's report supersedes an
//! earlier one, never duplicates it), `workers`, and `events` (the ordered change log behind
//! `WatchSweep`). Read models are returned as `sweep.v1` messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use prost::Message;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sweep_core::grid;
use sweep_core::leaderboard::{self, EpochMetrics, Phase};
use sweep_core::lr::LrDecay;
use sweep_core::schedule;
use sweep_core::spec::SweepSpec;
use sweep_core::state::{AttemptState, SweepState, TrialState};
use sweep_proto::v1;

/// Errors of the store; `crate::error` maps them to gRPC status codes.
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
    #[error("state database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database holds data this version cannot read: {0}")]
    Corrupt(String),
    /// The state directory is damaged, not a sweep state directory, or in use: nothing was
    /// opened or changed.
    #[error("{0}")]
    Damaged(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
/// The system clock's time (for what is not the store's: lock files, backup names).
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

const SCHEMA_VERSION: i64 = 7;

/// Statements that bring a database of version `n - 1` to version `n` (index `n - 2`).
const MIGRATIONS: &[&str] = &[
    // 2: checkpoints and skipped images per trial.
    "ALTER TABLE trials ADD COLUMN best_checkpoint BLOB;
     ALTER TABLE trials ADD COLUMN last_checkpoint BLOB;
     ALTER TABLE trials ADD COLUMN skipped_images INTEGER NOT NULL DEFAULT 0;",
    // 3: the devices each attempt holds.
    "ALTER TABLE attempts ADD COLUMN devices TEXT NOT NULL DEFAULT '';",
    // 4: attempts looked up by trial (where an ended trial last ran).
    "CREATE INDEX IF NOT EXISTS attempts_by_trial ON attempts(sweep_id, idx);",
    // 5: resume points, and how each attempt started.
    "ALTER TABLE trials ADD COLUMN resume_checkpoint BLOB;
     ALTER TABLE attempts ADD COLUMN resumed_from_epoch INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE attempts ADD COLUMN note TEXT NOT NULL DEFAULT '';",
    // 6: `sweep retry` (attempts before the retry do not count against the budget) and
    // quarantine of workers that keep failing.
    "ALTER TABLE trials ADD COLUMN retry_base INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE workers ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE workers ADD COLUMN note TEXT NOT NULL DEFAULT '';",
    // 7: worker identity (the hash of each registration's session secret, and who registered
    // it), and a checksum per event (filled in for older events by `fill_event_checksums`).
    "ALTER TABLE workers ADD COLUMN session_hash TEXT NOT NULL DEFAULT '';
     ALTER TABLE workers ADD COLUMN owner TEXT NOT NULL DEFAULT '';
     ALTER TABLE events ADD COLUMN checksum INTEGER;",
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sweeps (
    id             TEXT PRIMARY KEY,
    seq            INTEGER NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    source         TEXT NOT NULL,
    spec_yaml      TEXT NOT NULL,
    trial_count    INTEGER NOT NULL,
    max_attempts   INTEGER NOT NULL,
    gpus_per_trial INTEGER NOT NULL,
    cancelled      INTEGER NOT NULL DEFAULT 0,
    created_at_ms  INTEGER NOT NULL,
    finished_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS trials (
    sweep_id        TEXT NOT NULL REFERENCES sweeps(id),
    idx             INTEGER NOT NULL,
    trial_id        TEXT NOT NULL,
    backbone        TEXT NOT NULL,
    lr_decay        BLOB NOT NULL,
    fe_epochs       INTEGER NOT NULL,
    ft_epochs       INTEGER NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    current_attempt INTEGER,
    parameters      INTEGER NOT NULL DEFAULT 0,
    wall_seconds    REAL NOT NULL DEFAULT 0,
    error           TEXT NOT NULL DEFAULT '',
    started_at_ms   INTEGER,
    finished_at_ms  INTEGER,
    best_checkpoint BLOB,
    last_checkpoint BLOB,
    resume_checkpoint BLOB,
    retry_base     INTEGER NOT NULL DEFAULT 0,
    skipped_images  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sweep_id, idx)
);
CREATE INDEX IF NOT EXISTS trials_by_state ON trials(state);
CREATE TABLE IF NOT EXISTS attempts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep_id      TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    number        INTEGER NOT NULL,
    worker_id     TEXT NOT NULL,
    incarnation   INTEGER NOT NULL,
    state         TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    ended_at_ms   INTEGER,
    error         TEXT NOT NULL DEFAULT '',
    devices       TEXT NOT NULL DEFAULT '',
    resumed_from_epoch INTEGER NOT NULL DEFAULT 0,
    note          TEXT NOT NULL DEFAULT '',
    FOREIGN KEY (sweep_id, idx) REFERENCES trials(sweep_id, idx)
);
CREATE INDEX IF NOT EXISTS attempts_by_worker ON attempts(worker_id, state);
CREATE INDEX IF NOT EXISTS attempts_by_trial ON attempts(sweep_id, idx);
CREATE TABLE IF NOT EXISTS metrics (
    sweep_id       TEXT NOT NULL,
    idx            INTEGER NOT NULL,
    epoch          INTEGER NOT NULL,
    phase          TEXT NOT NULL,
    train_loss     REAL NOT NULL,
    train_accuracy REAL NOT NULL,
    val_loss       REAL NOT NULL,
    val_accuracy   REAL NOT NULL,
    seconds        REAL NOT NULL,
    attempt_id     INTEGER NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, idx, epoch),
    FOREIGN KEY (sweep_id, idx) REFERENCES trials(sweep_id, idx)
);
CREATE TABLE IF NOT EXISTS workers (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    incarnation      INTEGER NOT NULL,
    devices          BLOB NOT NULL,
    version          TEXT NOT NULL,
    state            TEXT NOT NULL,
    registered_at_ms INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    note             TEXT NOT NULL DEFAULT '',
    session_hash     TEXT NOT NULL DEFAULT '',
    owner            TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep_id TEXT NOT NULL,
    payload  BLOB NOT NULL,
    at_ms    INTEGER NOT NULL,
    checksum INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_sweep ON events(sweep_id, seq);
";

/// Indexes for the scheduler's hot queries: the oldest pending trial of a sweep, and whether a
/// sweep still has waiting or running trials, without scanning the sweep.
const QUERY_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS trials_by_state_sweep ON trials(state, sweep_id, idx);
";

/// Worker states as stored and shown.
pub const WORKER_ACTIVE: &str = "active";
pub const WORKER_GONE: &str = "gone";
/// A worker whose attempts kept failing: it keeps its lease (heartbeats) but gets no trials
/// until it registers again (a restarted daemon is a new worker).
pub const WORKER_QUARANTINED: &str = "quarantined";

/// Failed attempts in a row after which a worker is quarantined, by default.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 3;

/// The store. Not `Sync`: the server keeps it behind a mutex and calls it off the async runtime.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The state directory's lock, held while the store is open.
    _lock: StateLock,
    /// Where every timestamp and lease time comes from.
    clock: Arc<dyn Clock>,
}

/// What `acquire` hands to a worker.
pub type Assignment = v1::Assignment;

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
    pub last_checkpoint: Option<v1::CheckpointRef>,
    pub best_checkpoint: Option<v1::CheckpointRef>,
    pub skipped_images: u32,
    pub resume_checkpoint: Option<v1::CheckpointRef>,
    /// First report of an attempt: how it started.
    pub resumed_from_epoch: u32,
    pub note: String,
}

impl Store {
    /// Opens `<dir>/sweep.db`, creating the directory and a new database when the directory
    /// holds neither a database nor a write-ahead log. Holds `<dir>/sweep.lock` for the life of
    /// the store: a second coordinator on the same directory is refused.
    ///
    /// A state directory that is damaged is refused before anything in it is written: a
    /// `sweep.db` of 0 bytes, one that is not an SQLite database or not a sweep state database,
    /// a `sweep.db-wal` (or `-journal`) without its `sweep.db`. The error names the file.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with_clock(dir, Arc::new(SystemClock))
    }

    /// [`Store::open`] with the time read from `clock` (tests move it by hand).
    pub fn open_with_clock(dir: &Path, clock: Arc<dyn Clock>) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Damaged(format!("cannot create {}: {e}", dir.display())))?;
        let lock = StateLock::acquire(dir)?;
        let path = dir.join(DB_FILE);
        let open_err = |source| StoreError::Open { path: path.clone(), source };
        if inspect(&path)? == Found::Nothing {
            create(&path)?;
        }
        // Never created here: the file exists and was checked (a missing one is an error, not an
        // empty database).
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(open_err)?;
        let has_meta: bool = conn
            .query_row("SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')", [], |r| {
                r.get(0)
            })
            .map_err(|e| {
                StoreError::Damaged(format!("{}: cannot be read as an SQLite database: {e}", path.display()))
            })?;
        if !has_meta {
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
                .unwrap_or_default();
            return Err(StoreError::Damaged(format!(
                "{} is an SQLite database, but not a sweep state database (no `meta` table; {}); refusing to \
                 add tables to it: give --state-dir a directory of its own",
                path.display(),
                if tables.is_empty() {
                    "no tables at all".to_string()
                } else {
                    format!("tables: {}", tables.join(", "))
                }
            )));
        }
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .optional()
            .map_err(open_err)?;
        let Some(version) = version else {
            return Err(StoreError::Damaged(format!("{} has a `meta` table without a schema version", path.display())));
        };
        if !(1..=SCHEMA_VERSION).contains(&version) {
            return Err(StoreError::Corrupt(format!(
                "{} has schema version {version}; this build reads versions 1 to {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!("{}: could not switch to WAL mode (got {mode})", path.display())));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;").map_err(open_err)?;
        if version < SCHEMA_VERSION {
            // Upgrade in one transaction: all steps or none.
            let tx = conn.unchecked_transaction().map_err(open_err)?;
            for step in &MIGRATIONS[(version - 1) as usize..] {
                tx.execute_batch(step).map_err(open_err)?;
            }
            if version < 7 {
                fill_event_checksums(&tx)?;
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'schema_version'", [SCHEMA_VERSION])
                .map_err(open_err)?;
            tx.commit().map_err(open_err)?;
        }
        // Indexes that only speed queries up are created at every open: they need no schema
        // version (an older build keeps them up to date and ignores them).
        conn.execute_batch(QUERY_INDEXES).map_err(open_err)?;
        // The hot paths run the same statements thousands of times a second; parsing them
        // again each time was most of their cost. Cached statements keep their plan when new
        // values are bound (the query planner stability guarantee): without it SQLite
        // re-prepares a statement whenever a rebound parameter might change its plan.
        conn.set_prepared_statement_cache_capacity(64);
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(open_err)?;
        Ok(Store { conn, path, _lock: lock, clock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves everything in the write-ahead log into `sweep.db` and empties the log, so that the
    /// database file alone holds the whole state (a clean shutdown does this last).
    pub fn checkpoint(&mut self) -> Result<()> {
        let (busy, _, _): (i64, i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        if busy != 0 {
            return Err(StoreError::Corrupt(format!(
                "{}: the write-ahead log could not be checkpointed (a reader held it)",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Starts a batch: the calls until [`Store::commit_batch`] nest their transactions in one
    /// transaction, and nothing is committed before it.
    pub fn begin_batch(&mut self) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Commits a batch (one sync for all its calls); on failure rolls all of it back.
    pub fn commit_batch(&mut self) -> Result<()> {
        self.conn.execute_batch("COMMIT").map_err(|e| {
            let _ = self.conn.execute_batch("ROLLBACK");
            StoreError::from(e)
        })
    }

    // -----------------------------------------------------------------------------------------
    // Sweeps
    // -----------------------------------------------------------------------------------------

    /// Stores a validated sweep and queues its trials.
    pub fn submit(&mut self, spec_yaml: &str, source: &str, spec: &SweepSpec) -> Result<(String, u32)> {
        let trials = grid::expand(&spec.grid);
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM sweeps", [], |r| r.get(0))?;
        let id = new_sweep_id(&tx, &spec.name, seq)?;
        tx.execute(
            "INSERT INTO sweeps(id, seq, name, source, spec_yaml, trial_count, max_attempts, gpus_per_trial, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                seq,
                spec.name,
                source,
                spec_yaml,
                trials.len() as i64,
                spec.retries.max_attempts,
                spec.resources.gpus_per_trial,
                now
            ],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO trials(sweep_id, idx, trial_id, backbone, lr_decay, fe_epochs, ft_epochs, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for t in &trials {
                insert.execute(params![
                    id,
                    t.index as i64,
                    t.id,
                    t.backbone.name(),
                    v1::LrDecay::from(&t.lr_decay).encode_to_vec(),
                    t.fe_epochs,
                    t.ft_epochs,
                    TrialState::Pending.as_str()
                ])?;
            }
        }
        reconcile_schedulability(&tx, now)?;
        tx.commit()?;
        Ok((id, trials.len() as u32))
    }

    /// One page of sweeps, newest first: at most `page_size` (1 to [`MAX_PAGE`]) of those
    /// older than the page `token` names (empty: from the newest); returns them and the token
    /// of the next page (empty after the last).
    pub fn list_sweeps_page(&self, page_size: usize, token: &str) -> Result<(Vec<v1::SweepSummary>, String)> {
        let before = parse_page_token(token, 's')?.unwrap_or(i64::MAX);
        let size = page_size.clamp(1, MAX_PAGE);
        let rows: Vec<(String, i64)> = {
            let mut q = self.conn.prepare("SELECT id, seq FROM sweeps WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2")?;
            q.query_map(params![before, size as i64 + 1], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        let more = rows.len() > size;
        let rows = &rows[..rows.len().min(size)];
        let next = if more { rows.last().map(|(_, seq)| format!("s{seq}")).unwrap_or_default() } else { String::new() };
        let sweeps = rows.iter().map(|(id, _)| sweep_summary(&self.conn, id)).collect::<Result<_>>()?;
        Ok((sweeps, next))
    }

    pub fn list_sweeps(&self) -> Result<Vec<v1::SweepSummary>> {
        let ids: Vec<String> = {
            let mut q = self.conn.prepare("SELECT id FROM sweeps ORDER BY seq DESC")?;
            q.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
        };
        ids.iter().map(|id| sweep_summary(&self.conn, id)).collect()
    }

    pub fn get_sweep(&self, sweep_id: &str) -> Result<v1::SweepStatus> {
        let sweep_id = &resolve_sweep(&self.conn, sweep_id)?;
        let sweep = sweep_summary(&self.conn, sweep_id)?;
        let spec_yaml: String =
            self.conn.query_row("SELECT spec_yaml FROM sweeps WHERE id = ?1", [sweep_id], |r| r.get(0))?;
        let trials = trial_summaries(&self.conn, sweep_id, None)?;
        Ok(v1::SweepStatus { sweep: Some(sweep), trials, spec_yaml })
    }

    /// Cancels pending trials now; running attempts are told to stop through their next
    /// heartbeat or report, and their trials end as cancelled when they do.
    pub fn cancel_sweep(&mut self, sweep_id: &str) -> Result<v1::CancelSweepResponse> {
        let tx = self.conn.savepoint()?;
        let sweep_id = &resolve_sweep(&tx, sweep_id)?;
        tx.execute("UPDATE sweeps SET cancelled = 1 WHERE id = ?1", [sweep_id])?;
        let pending: Vec<i64> = {
            let mut q = tx.prepare(
                "SELECT idx FROM trials WHERE sweep_id = ?1 AND state IN ('pending', 'unschedulable') ORDER BY idx",
            )?;
            q.query_map([sweep_id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
        };
        let now = self.clock.now_ms();
        for idx in &pending {
            tx.execute(
                "UPDATE trials SET state = 'cancelled', error = 'sweep cancelled', finished_at_ms = ?3
                 WHERE sweep_id = ?1 AND idx = ?2",
                params![sweep_id, idx, now],
            )?;
            trial_event(&tx, sweep_id, *idx, None, now)?;
        }
        let running: i64 =
            tx.query_row("SELECT COUNT(*) FROM trials WHERE sweep_id = ?1 AND state = 'running'", [sweep_id], |r| {
                r.get(0)
            })?;
        finish_sweep_if_done(&tx, sweep_id, now)?;
        tx.commit()?;
        Ok(v1::CancelSweepResponse { cancelled_pending: pending.len() as u32, stopping_running: running as u32 })
    }

    /// Failed attempts in a row after which a worker is quarantined (0: never).
    pub fn set_quarantine_after(&mut self, n: u32) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('quarantine_after', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [i64::from(n)],
        )?;
        Ok(())
    }

    /// Re-queues the failed trials of a sweep (all, or those of `trial_ids`) with a fresh
    /// attempt budget; their metrics and resume points stay, so they continue where they
    /// stopped. Returns the trial ids re-queued.
    pub fn retry_sweep(&mut self, sweep_id: &str, trial_ids: &[String]) -> Result<Vec<String>> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let sweep_id = &resolve_sweep(&tx, sweep_id)?;
        let cancelled: bool =
            tx.query_row("SELECT cancelled != 0 FROM sweeps WHERE id = ?1", [sweep_id], |r| r.get(0))?;
        if cancelled {
            return Err(StoreError::WrongState(format!(
                "sweep {sweep_id} was cancelled; submit its spec again to run it"
            )));
        }
        let failed: Vec<(i64, String)> = {
            let mut q =
                tx.prepare("SELECT idx, trial_id FROM trials WHERE sweep_id = ?1 AND state = 'failed' ORDER BY idx")?;
            q.query_map([sweep_id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
        };
        for id in trial_ids {
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM trials WHERE sweep_id = ?1 AND trial_id = ?2",
                    params![sweep_id, id],
                    |r| r.get(0),
                )
                .optional()?;
            match state {
                None => return Err(StoreError::NotFound(format!("sweep {sweep_id} has no trial `{id}`"))),
                Some(s) if TrialState::parse(&s) != Some(TrialState::Failed) => {
                    return Err(StoreError::WrongState(format!(
                        "trial {id} of {sweep_id} is {s}; only failed trials are retried"
                    )));
                }
                Some(_) => {}
            }
        }
        let chosen: Vec<(i64, String)> =
            failed.into_iter().filter(|(_, id)| trial_ids.is_empty() || trial_ids.contains(id)).collect();
        for (idx, _) in &chosen {
            tx.execute(
                "UPDATE trials SET state = 'pending', error = '', finished_at_ms = NULL, retry_base = attempts
                 WHERE sweep_id = ?1 AND idx = ?2",
                params![sweep_id, idx],
            )?;
            trial_event_noted(&tx, sweep_id, *idx, None, "re-queued by `sweep retry`", now)?;
        }
        if !chosen.is_empty() {
            // The sweep is open again; it ends (with a new `ended` event) when these do.
            tx.execute("UPDATE sweeps SET finished_at_ms = NULL WHERE id = ?1", [sweep_id])?;
            reconcile_schedulability(&tx, now)?;
        }
        tx.commit()?;
        Ok(chosen.into_iter().map(|(_, id)| id).collect())
    }

    pub fn leaderboard(&self, sweep_id: &str) -> Result<v1::Leaderboard> {
        let sweep_id = &resolve_sweep(&self.conn, sweep_id)?;
        let sweep = sweep_summary(&self.conn, sweep_id)?;
        let trials = trial_summaries(&self.conn, sweep_id, None)?;
        let metrics = all_metrics(&self.conn, sweep_id)?;
        let mut extra: HashMap<u32, TrialExtras> = {
            let mut q = self.conn.prepare(&format!("SELECT idx, {TRIAL_EXTRAS} FROM trials WHERE sweep_id = ?1"))?;
            q.query_map([sweep_id], |r| Ok((r.get::<_, i64>(0)? as u32, trial_extras(r, 1)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut rows: Vec<(leaderboard::Score, v1::TrialSummary)> = trials
            .into_iter()
            .map(|t| {
                let m = metrics.get(&t.index).map(Vec::as_slice).unwrap_or(&[]);
                (leaderboard::score(t.fe_epochs, m), t)
            })
            .collect();
        rows.sort_by(|a, b| leaderboard::compare(&a.0, a.1.index as usize, &b.0, b.1.index as usize));
        let entries = rows
            .into_iter()
            .enumerate()
            .map(|(i, (score, t))| {
                let x = extra.remove(&t.index).unwrap_or_default();
                let mut wall_seconds = x.wall_seconds;
                if t.state == TrialState::Running.as_str() {
                    // Still running: wall-clock so far.
                    wall_seconds = (self.clock.now_ms() - t.started_at_ms).max(0) as f64 / 1000.0;
                }
                v1::LeaderboardEntry {
                    rank: i as u32 + 1,
                    trial_id: t.trial_id,
                    backbone: t.backbone,
                    lr_decay: t.lr_decay,
                    fe_epochs: t.fe_epochs,
                    ft_epochs: t.ft_epochs,
                    state: t.state,
                    fe_val_accuracy: score.fe_val_accuracy,
                    best_val_accuracy: score.best_val_accuracy,
                    best_epoch: score.best_epoch,
                    parameters: x.parameters,
                    wall_seconds,
                    best_checkpoint: x.best_checkpoint,
                    last_checkpoint: x.last_checkpoint,
                    skipped_images: x.skipped_images,
                }
            })
            .collect();
        Ok(v1::Leaderboard { sweep_id: sweep.id, sweep_state: sweep.state, entries })
    }

    pub fn trial(&self, sweep_id: &str, trial_id: &str) -> Result<v1::TrialDetail> {
        let sweep_id = &resolve_sweep(&self.conn, sweep_id)?;
        let idx = grid::trial_index(trial_id)
            .ok_or_else(|| StoreError::Invalid(format!("`{trial_id}` is not a trial id (they look like t003)")))?;
        let trial = trial_summaries(&self.conn, sweep_id, Some(idx as i64))?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("sweep {sweep_id} has no trial {trial_id}")))?;
        let by_epoch: HashMap<u32, u64> = {
            let mut q = self.conn.prepare("SELECT epoch, attempt_id FROM metrics WHERE sweep_id = ?1 AND idx = ?2")?;
            q.query_map(params![sweep_id, idx as i64], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<rusqlite::Result<_>>()?
        };
        let metrics = metrics_of(&self.conn, sweep_id, Some(idx as i64))?
            .remove(&trial.index)
            .unwrap_or_default()
            .iter()
            .map(|m| v1::EpochMetrics {
                attempt_id: by_epoch.get(&m.epoch).copied().unwrap_or(0),
                ..v1::EpochMetrics::from(m)
            })
            .collect();
        let mut q = self.conn.prepare(
            "SELECT id, worker_id, state, started_at_ms, COALESCE(ended_at_ms, 0), error, note, resumed_from_epoch
             FROM attempts WHERE sweep_id = ?1 AND idx = ?2 ORDER BY id",
        )?;
        let attempts = q
            .query_map(params![sweep_id, idx as i64], |r| {
                Ok(v1::AttemptInfo {
                    attempt_id: r.get::<_, i64>(0)? as u64,
                    worker_id: r.get(1)?,
                    state: r.get(2)?,
                    started_at_ms: r.get(3)?,
                    ended_at_ms: r.get(4)?,
                    error: r.get(5)?,
                    note: r.get(6)?,
                    resumed_from_epoch: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let x = self.conn.query_row(
            &format!("SELECT {TRIAL_EXTRAS} FROM trials WHERE sweep_id = ?1 AND idx = ?2"),
            params![sweep_id, idx as i64],
            |r| trial_extras(r, 0),
        )?;
        Ok(v1::TrialDetail {
            trial: Some(trial),
            metrics,
            attempts,
            parameters: x.parameters,
            best_checkpoint: x.best_checkpoint,
            last_checkpoint: x.last_checkpoint,
            skipped_images: x.skipped_images,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Workers
    // -----------------------------------------------------------------------------------------

    /// Registers a worker: a new id, a new incarnation (larger than any given before) and a new
    /// session secret, which every later call in the worker's name must carry (only its SHA-256
    /// is stored). `owner` is who registered it (see [`Caller::owner`]).
    pub fn register(&mut self, name: &str, devices: &[v1::Device], version: &str, owner: &str) -> Result<Registration> {
        if devices.is_empty() {
            return Err(StoreError::Invalid("a worker must register at least one device".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for d in devices {
            if d.id.is_empty() || d.id.contains(',') || d.id.len() > 64 {
                return Err(StoreError::Invalid(format!(
                    "device id `{}` must be 1-64 characters without commas",
                    d.id
                )));
            }
            if !seen.insert(d.id.as_str()) {
                return Err(StoreError::Invalid(format!("device `{}` is listed twice", d.id)));
            }
        }
        let tx = self.conn.savepoint()?;
        let incarnation: i64 = tx.query_row(
            "INSERT INTO meta(key, value) VALUES ('incarnation', 1)
             ON CONFLICT(key) DO UPDATE SET value = value + 1 RETURNING value",
            [],
            |r| r.get(0),
        )?;
        let id = format!("w{incarnation}");
        let now = self.clock.now_ms();
        let session = new_session_secret()?;
        let devices = v1::DeviceList { devices: devices.to_vec() }.encode_to_vec();
        tx.execute(
            "INSERT INTO workers(id, name, incarnation, devices, version, state, registered_at_ms, last_seen_ms,
                                 session_hash, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9)",
            params![id, name, incarnation, devices, version, WORKER_ACTIVE, now, session_hash(&session), owner],
        )?;
        reconcile_schedulability(&tx, now)?;
        tx.commit()?;
        Ok(Registration { worker_id: id, incarnation: incarnation as u64, session })
    }

    /// Records a heartbeat; returns the attempts (among `running`) the worker must stop.
    pub fn heartbeat(&mut self, caller: &Caller, incarnation: u64, running: &[u64]) -> Result<Vec<u64>> {
        let worker_id = caller.worker_id.as_str();
        let tx = self.conn.savepoint()?;
        check_worker(&tx, caller, incarnation)?;
        tx.prepare_cached("UPDATE workers SET last_seen_ms = ?2 WHERE id = ?1")?
            .execute(params![worker_id, self.clock.now_ms()])?;
        let mut stop = Vec::new();
        for &attempt in running {
            if attempt_should_stop(&tx, attempt, worker_id)? {
                stop.push(attempt);
            }
        }
        tx.commit()?;
        Ok(stop)
    }

    /// Every worker, in the order they registered (every page).
    pub fn workers(&self) -> Result<Vec<v1::WorkerInfo>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = self.workers_page(usize::MAX, &token)?;
            all.extend(page);
            if next.is_empty() {
                return Ok(all);
            }
            token = next;
        }
    }

    /// One page of workers in the order they registered: at most `page_size` after the page
    /// `token` names (empty: from the first); returns them and the next page's token.
    pub fn workers_page(&self, page_size: usize, token: &str) -> Result<(Vec<v1::WorkerInfo>, String)> {
        let after = parse_page_token(token, 'w')?.unwrap_or(0);
        let size = page_size.max(1);
        let mut q = self.conn.prepare(
            "SELECT id, name, incarnation, devices, state, registered_at_ms, last_seen_ms, note, rowid FROM workers
             WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
        )?;
        let mut last_row = 0i64;
        // Devices stay encoded until the rows are read, so a decode error can be a StoreError.
        let rows: Vec<(v1::WorkerInfo, Vec<u8>, i64)> = q
            .query_map(params![after, size.saturating_add(1).min(i64::MAX as usize) as i64], |r| {
                let info = v1::WorkerInfo {
                    worker_id: r.get(0)?,
                    name: r.get(1)?,
                    incarnation: r.get::<_, i64>(2)? as u64,
                    state: r.get(4)?,
                    registered_at_ms: r.get(5)?,
                    last_seen_ms: r.get(6)?,
                    note: r.get(7)?,
                    ..Default::default()
                };
                Ok((info, r.get(3)?, r.get(8)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let more = rows.len() > size;
        let mut running = self.conn.prepare(
            "SELECT a.sweep_id, t.trial_id, a.id, a.devices FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx
             WHERE a.worker_id = ?1 AND a.state = 'running' ORDER BY a.id",
        )?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut more = more;
        for (i, (mut info, devices, row)) in rows.into_iter().take(size).enumerate() {
            // A page also ends before it grows past MAX_PAGE_BYTES (a worker may announce a
            // thousand devices); it always holds at least one worker.
            if i > 0 && bytes + devices.len() + 1024 > MAX_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += devices.len() + 1024;
            last_row = row;
            info.devices = v1::DeviceList::decode(devices.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("devices of worker {}: {e}", info.worker_id)))?
                .devices;
            let attempts: Vec<(String, String, i64, String)> = running
                .query_map([&info.worker_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (sweep_id, trial_id, attempt, devices) in attempts {
                info.running.push(format!("{sweep_id}/{trial_id}"));
                for device in devices.split(',').filter(|d| !d.is_empty()) {
                    info.busy.push(v1::DeviceUse {
                        device: device.to_string(),
                        sweep_id: sweep_id.clone(),
                        trial_id: trial_id.clone(),
                        attempt_id: attempt as u64,
                    });
                }
            }
            out.push(info);
        }
        Ok((out, if more { format!("w{last_row}") } else { String::new() }))
    }

    /// Forgets workers that have been gone since before `deadline_ms` and hold no running
    /// attempt: their rows go (attempts keep the worker's id). Returns how many.
    pub fn forget_workers(&mut self, deadline_ms: i64) -> Result<usize> {
        let tx = self.conn.savepoint()?;
        let n = tx.execute(
            "DELETE FROM workers WHERE state = ?1 AND last_seen_ms < ?2
             AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.worker_id = workers.id AND a.state = 'running')",
            params![WORKER_GONE, deadline_ms],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Ends the lease of every active worker not seen since `deadline_ms`: the worker is marked
    /// gone and its running attempts lost; their trials go back to the queue (or fail when out
    /// of attempts). Returns the ids of the workers expired.
    pub fn expire_workers(&mut self, deadline_ms: i64) -> Result<Vec<String>> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let gone: Vec<String> = {
            let mut q = tx.prepare("SELECT id FROM workers WHERE state IN (?1, ?3) AND last_seen_ms < ?2")?;
            q.query_map(params![WORKER_ACTIVE, deadline_ms, WORKER_QUARANTINED], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for id in &gone {
            tx.execute("UPDATE workers SET state = ?2 WHERE id = ?1", params![id, WORKER_GONE])?;
            let attempts: Vec<i64> = {
                let mut q = tx.prepare("SELECT id FROM attempts WHERE worker_id = ?1 AND state = 'running'")?;
                q.query_map([id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
            };
            for a in attempts {
                end_attempt(
                    &tx,
                    a as u64,
                    AttemptState::Lost,
                    &format!("worker {id} stopped sending heartbeats"),
                    false,
                    0.0,
                    now,
                )?;
            }
        }
        if !gone.is_empty() {
            reconcile_schedulability(&tx, now)?;
        }
        tx.commit()?;
        Ok(gone)
    }

    // -----------------------------------------------------------------------------------------
    // Attempts
    // -----------------------------------------------------------------------------------------

    /// Hands the next pending trial that fits the worker to it, or `None`.
    pub fn acquire(&mut self, caller: &Caller, incarnation: u64) -> Result<Option<Assignment>> {
        let worker_id = caller.worker_id.as_str();
        let tx = self.conn.savepoint()?;
        let devices = check_worker(&tx, caller, incarnation)?;
        let quarantined: bool = tx
            .prepare_cached("SELECT state = ?2 FROM workers WHERE id = ?1")?
            .query_row(params![worker_id, WORKER_QUARANTINED], |r| r.get(0))?;
        if quarantined {
            tx.commit()?;
            return Ok(None);
        }
        let free = free_devices(&tx, worker_id, &devices)?;
        if free.is_empty() {
            tx.commit()?;
            return Ok(None);
        }
        // Every open sweep with a waiting trial (its first, by index: one index lookup per open
        // sweep, no sort of the pending trials; an ended sweep has none, since a sweep ends when
        // none waits and `retry_sweep` reopens it); the policy picks (`core::schedule`).
        let candidates: Vec<schedule::Candidate<String>> = tx
            .prepare_cached(
                "SELECT s.id, s.seq, (SELECT t.idx FROM trials t WHERE t.state = 'pending' AND t.sweep_id = s.id
                               ORDER BY t.idx LIMIT 1) AS first, s.gpus_per_trial
                 FROM sweeps s WHERE s.cancelled = 0 AND s.finished_at_ms IS NULL AND first IS NOT NULL",
            )?
            .query_map([], |r| {
                Ok(schedule::Candidate {
                    sweep: r.get(0)?,
                    order: r.get(1)?,
                    trial: r.get::<_, i64>(2)? as u32,
                    devices: r.get::<_, i64>(3)?.clamp(0, i64::from(u32::MAX)) as u32,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        // Nothing to hand out: a read-only transaction (no disk write, no sync). Heartbeats keep
        // the worker's last-seen time.
        let Some(decision) = schedule::next(&candidates, free.len()) else {
            tx.commit()?;
            return Ok(None);
        };
        let (sweep_id, idx, need) = (decision.sweep, i64::from(decision.trial), i64::from(decision.devices));
        let held: Vec<String> = free.into_iter().take(need as usize).collect();
        let now = self.clock.now_ms();
        tx.prepare_cached("UPDATE workers SET last_seen_ms = ?2 WHERE id = ?1")?.execute(params![worker_id, now])?;
        let number: i64 = tx
            .prepare_cached(
                "UPDATE trials SET attempts = attempts + 1 WHERE sweep_id = ?1 AND idx = ?2 RETURNING attempts",
            )?
            .query_row(params![sweep_id, idx], |r| r.get(0))?;
        tx.prepare_cached(
            "INSERT INTO attempts(sweep_id, idx, number, worker_id, incarnation, state, started_at_ms, devices)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?7)",
        )?
        .execute(params![sweep_id, idx, number, worker_id, incarnation as i64, now, held.join(",")])?;
        let attempt_id = tx.last_insert_rowid();
        tx.prepare_cached("UPDATE trials SET state = 'running', current_attempt = ?3, started_at_ms = COALESCE(started_at_ms, ?4), error = ''
             WHERE sweep_id = ?1 AND idx = ?2")?.execute(params![sweep_id, idx, attempt_id, now],
        )?;
        trial_event(&tx, &sweep_id, idx, None, now)?;
        let spec_yaml: String =
            tx.prepare_cached("SELECT spec_yaml FROM sweeps WHERE id = ?1")?.query_row([&sweep_id], |r| r.get(0))?;
        let resume: Option<Vec<u8>> = tx.query_row(
            "SELECT resume_checkpoint FROM trials WHERE sweep_id = ?1 AND idx = ?2",
            params![sweep_id, idx],
            |r| r.get(0),
        )?;
        let resume = resume
            .map(|b| v1::CheckpointRef::decode(b.as_slice()))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("resume point of trial {idx} of {sweep_id}: {e}")))?;
        let t = trial_summaries(&tx, &sweep_id, Some(idx))?
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("trial {idx} of {sweep_id} vanished")))?;
        tx.commit()?;
        Ok(Some(v1::Assignment {
            attempt_id: attempt_id as u64,
            sweep_id,
            trial_id: t.trial_id,
            trial_index: t.index,
            spec_yaml,
            backbone: t.backbone,
            lr_decay: t.lr_decay,
            fe_epochs: t.fe_epochs,
            ft_epochs: t.ft_epochs,
            attempt_number: number as u32,
            devices: held,
            resume,
        }))
    }

    /// Stores one epoch's metrics for a current attempt. Returns whether the attempt should
    /// stop (its sweep was cancelled).
    pub fn report_epoch(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        metrics: &EpochMetrics,
        extras: &ReportExtras,
    ) -> Result<bool> {
        let tx = self.conn.savepoint()?;
        check_attempt_owner(&tx, caller, attempt_id)?;
        let a = current_attempt(&tx, attempt_id)?;
        let total = a.fe_epochs + a.ft_epochs;
        if metrics.epoch > total {
            return Err(StoreError::Invalid(format!(
                "epoch {} is past the end of trial {} ({} epochs)",
                metrics.epoch, a.trial_id, total
            )));
        }
        let phase = Phase::of_epoch(metrics.epoch, a.fe_epochs);
        if metrics.phase != phase {
            return Err(StoreError::Invalid(format!(
                "epoch {} of trial {} is {}, not {}",
                metrics.epoch,
                a.trial_id,
                phase.as_str(),
                metrics.phase.as_str()
            )));
        }
        let stored: i64 = tx
            .prepare_cached("SELECT COALESCE(MAX(epoch), 0) FROM metrics WHERE sweep_id = ?1 AND idx = ?2")?
            .query_row(params![a.sweep_id, a.idx], |r| r.get(0))?;
        if i64::from(metrics.epoch) > stored + 1 {
            return Err(StoreError::Invalid(format!(
                "epoch {} of trial {} reported before epoch {}; epochs are reported in order",
                metrics.epoch,
                a.trial_id,
                stored + 1
            )));
        }
        let now = self.clock.now_ms();
        tx.prepare_cached("INSERT INTO metrics(sweep_id, idx, epoch, phase, train_loss, train_accuracy, val_loss, val_accuracy, seconds, attempt_id, recorded_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT(sweep_id, idx, epoch) DO UPDATE SET
               phase = excluded.phase, train_loss = excluded.train_loss, train_accuracy = excluded.train_accuracy,
               val_loss = excluded.val_loss, val_accuracy = excluded.val_accuracy, seconds = excluded.seconds,
               attempt_id = excluded.attempt_id, recorded_at_ms = excluded.recorded_at_ms")?.execute(params![
                a.sweep_id,
                a.idx,
                metrics.epoch,
                metrics.phase.as_str(),
                metrics.train_loss,
                metrics.train_accuracy,
                metrics.val_loss,
                metrics.val_accuracy,
                metrics.seconds,
                attempt_id as i64,
                now
            ],
        )?;
        if extras.parameters > 0 {
            tx.prepare_cached("UPDATE trials SET parameters = ?3 WHERE sweep_id = ?1 AND idx = ?2")?
                .execute(params![a.sweep_id, a.idx, extras.parameters as i64])?;
        }
        for (column, checkpoint) in [
            ("last_checkpoint", &extras.last_checkpoint),
            ("best_checkpoint", &extras.best_checkpoint),
            ("resume_checkpoint", &extras.resume_checkpoint),
        ] {
            if let Some(c) = checkpoint {
                if c.uri.is_empty() || c.epoch != metrics.epoch {
                    return Err(StoreError::Invalid(format!(
                        "{column} of epoch {} must name a file and hold that epoch (got uri `{}`, epoch {})",
                        metrics.epoch,
                        sweep_core::text::escape(&c.uri),
                        c.epoch
                    )));
                }
                let file = match column {
                    "last_checkpoint" => "last.safetensors".to_string(),
                    "best_checkpoint" => "best.safetensors".to_string(),
                    _ => format!("state-e{:04}.safetensors", c.epoch),
                };
                check_checkpoint_ref(c, &a.sweep_id, &a.trial_id, &file)
                    .map_err(|why| StoreError::Invalid(format!("{column} of epoch {}: {why}", metrics.epoch)))?;
                tx.prepare_cached(&format!("UPDATE trials SET {column} = ?3 WHERE sweep_id = ?1 AND idx = ?2"))?
                    .execute(params![a.sweep_id, a.idx, c.encode_to_vec()])?;
            }
        }
        tx.prepare_cached("UPDATE trials SET skipped_images = ?3 WHERE sweep_id = ?1 AND idx = ?2")?
            .execute(params![a.sweep_id, a.idx, extras.skipped_images])?;
        if extras.resumed_from_epoch > 0 || !extras.note.is_empty() {
            tx.execute(
                "UPDATE attempts SET resumed_from_epoch = ?2, note = ?3 WHERE id = ?1",
                params![attempt_id as i64, extras.resumed_from_epoch, extras.note],
            )?;
        }
        trial_event_noted(&tx, &a.sweep_id, a.idx, Some(v1::EpochMetrics::from(metrics)), &extras.note, now)?;
        tx.commit()?;
        Ok(a.cancelled)
    }

    /// Ends a current attempt with the worker's outcome.
    pub fn finish_attempt(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        outcome: v1::Outcome,
        class: v1::ErrorClass,
        message: &str,
        wall_seconds: f64,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        check_attempt_owner(&tx, caller, attempt_id)?;
        let a = current_attempt(&tx, attempt_id)?;
        match outcome {
            v1::Outcome::Succeeded => {
                let total = a.fe_epochs + a.ft_epochs;
                let have: i64 = tx
                    .prepare_cached(
                        "SELECT COUNT(*) FROM metrics WHERE sweep_id = ?1 AND idx = ?2 AND epoch BETWEEN 1 AND ?3",
                    )?
                    .query_row(params![a.sweep_id, a.idx, total], |r| r.get(0))?;
                if have != total as i64 {
                    return Err(StoreError::WrongState(format!(
                        "attempt {attempt_id} reports success, but trial {} has metrics for {have} of its {total} epochs",
                        a.trial_id
                    )));
                }
                end_attempt(&tx, attempt_id, AttemptState::Succeeded, "", false, wall_seconds, now)?;
            }
            v1::Outcome::Failed => {
                let message = if message.trim().is_empty() { "the worker gave no reason" } else { message };
                let permanent = class == v1::ErrorClass::Permanent;
                end_attempt(&tx, attempt_id, AttemptState::Failed, message, permanent, wall_seconds, now)?;
            }
            v1::Outcome::Cancelled => {
                end_attempt(&tx, attempt_id, AttemptState::Cancelled, message, false, wall_seconds, now)?;
            }
            v1::Outcome::Unspecified => {
                return Err(StoreError::Invalid("outcome must be succeeded, failed or cancelled".into()));
            }
        }
        tx.commit()?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Events
    // -----------------------------------------------------------------------------------------

    /// Events of a sweep with a sequence number above `after`, oldest first.
    pub fn events_after(&self, sweep_id: &str, after: u64, limit: usize) -> Result<Vec<v1::SweepEvent>> {
        let sweep_id = &resolve_sweep(&self.conn, sweep_id)?;
        let mut q = self.conn.prepare(
            "SELECT seq, payload, checksum FROM events WHERE sweep_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows: Vec<(i64, Vec<u8>, Option<i64>)> = q
            .query_map(params![sweep_id, after as i64, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter()
            .map(|(seq, payload, checksum)| {
                if checksum != Some(event_checksum(sweep_id, &payload)) {
                    return Err(StoreError::Corrupt(format!(
                        "event {seq} of sweep {sweep_id} does not match its checksum (damaged state database; \
                         `sweep check-state` lists what else is)"
                    )));
                }
                let mut e = v1::SweepEvent::decode(payload.as_slice())
                    .map_err(|e| StoreError::Corrupt(format!("event {seq}: {e}")))?;
                e.sequence = seq as u64;
                Ok(e)
            })
            .collect()
    }

    /// The largest event sequence number so far (0 when there is none).
    pub fn last_sequence(&self) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    /// How many of the worker's devices no running attempt holds (0 for an unknown worker).
    pub fn free_device_count(&self, worker_id: &str) -> Result<usize> {
        let devices: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT devices FROM workers WHERE id = ?1")?
            .query_row([worker_id], |r| r.get(0))
            .optional()?;
        let Some(devices) = devices else { return Ok(0) };
        let devices = v1::DeviceList::decode(devices.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("devices of worker {worker_id}: {e}")))?
            .devices;
        Ok(free_devices(&self.conn, worker_id, &devices)?.len())
    }

    /// Whether any trial is waiting for a worker.
    pub fn has_pending(&self) -> Result<bool> {
        Ok(self.conn.prepare_cached("SELECT EXISTS(SELECT 1 FROM trials t JOIN sweeps s ON s.id = t.sweep_id WHERE t.state = 'pending' AND s.cancelled = 0)")?.query_row([],
            |r| r.get(0),
        )?)
    }
}

/// Most rows one page of a list holds.
pub const MAX_PAGE: usize = 1000;
/// About the most bytes one page of workers holds (a client decodes 4 MiB by default).
pub const MAX_PAGE_BYTES: usize = 2 << 20;

/// The number in a page token `<kind><number>` (`None` for an empty token).
fn parse_page_token(token: &str, kind: char) -> Result<Option<i64>> {
    if token.is_empty() {
        return Ok(None);
    }
    token.strip_prefix(kind).and_then(|n| n.parse::<i64>().ok()).filter(|n| *n >= 0).map(Some).ok_or_else(|| {
        StoreError::Invalid(format!(
            "page_token `{}` is not one this coordinator gave",
            sweep_core::text::escape(&token.chars().take(40).collect::<String>())
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// The state directory: its lock, and what is found in it before opening
// ---------------------------------------------------------------------------------------------

/// The name of the state database inside a state directory.
pub const DB_FILE: &str = "sweep.db";
/// The lock file of a state directory.
pub const LOCK_FILE: &str = "sweep.lock";

/// An exclusive `flock` on `<dir>/sweep.lock`, released by the kernel when the holder closes it
/// or dies; the file says who holds it.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<StateLock> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::Damaged(format!("cannot open the lock file {}: {e}", path.display())))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder: String = holder.trim().chars().take(200).collect();
                return Err(StoreError::Damaged(format!(
                    "state directory {} is in use by another coordinator ({}); one coordinator serves a state \
                     directory at a time: stop it, or use another --state-dir",
                    dir.display(),
                    if holder.is_empty() { "its lock file is empty".to_string() } else { holder }
                )));
            }
            return Err(StoreError::Damaged(format!("cannot lock {}: {err}", path.display())));
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let who = format!("pid {} on {}, since {} ms after the epoch\n", std::process::id(), host.trim(), now_ms());
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(who.as_bytes());
        let _ = file.sync_all();
        Ok(StateLock { _file: file })
    }
}

/// What a state directory holds where its database should be.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// No database and no log: a new state directory.
    Nothing,
    /// A file that starts like an SQLite database.
    Database,
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Looks at `sweep.db` and the files beside it without opening them as a database (SQLite would
/// create a missing database and throw away a log that does not belong to it).
fn inspect(path: &Path) -> Result<Found> {
    use std::io::Read;
    let beside = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let refuse = |what: String| {
        StoreError::Damaged(format!(
            "{what}; refusing to start, nothing was changed (docs/operations.md: damaged state directory)"
        ))
    };
    let Some(bytes) = size(path) else {
        for suffix in ["-wal", "-journal"] {
            let log = beside(suffix);
            if let Some(n) = size(&log) {
                return Err(refuse(format!(
                    "{} is missing but {} ({n} bytes) is there: that log belongs to a database that is gone; \
                     restore {} from a backup",
                    path.display(),
                    log.display(),
                    DB_FILE
                )));
            }
        }
        return Ok(Found::Nothing);
    };
    if !std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(false) {
        return Err(refuse(format!("{} is not a regular file", path.display())));
    }
    let wal = size(&beside("-wal")).map(|n| format!(" (beside a {n}-byte {DB_FILE}-wal)")).unwrap_or_default();
    if bytes == 0 {
        return Err(refuse(format!("{} is empty (0 bytes){wal}: truncated or damaged", path.display())));
    }
    let mut head = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    if let Err(e) = read {
        return Err(refuse(format!("{} ({bytes} bytes) cannot be read as a database: {e}", path.display())));
    }
    if &head != SQLITE_MAGIC {
        return Err(refuse(format!("{} ({bytes} bytes) is not an SQLite database{wal}", path.display())));
    }
    Ok(Found::Database)
}

/// Creates a new state database at `path`: built under a temporary name with its whole schema,
/// synced, then renamed into place, so that `sweep.db` never exists half made (an empty
/// `sweep.db` is always damage, never a start interrupted).
fn create(path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Damaged(format!("cannot create the state database {}: {what}: {e}", path.display()))
    };
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut p = tmp.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    {
        let conn = Connection::open(&tmp).map_err(|e| fail("open", &e))?;
        conn.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;").map_err(|e| fail("settings", &e))?;
        let tx = conn.unchecked_transaction().map_err(|e| fail("begin", &e))?;
        tx.execute_batch(SCHEMA).map_err(|e| fail("schema", &e))?;
        tx.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?1)", [SCHEMA_VERSION])
            .map_err(|e| fail("schema", &e))?;
        tx.commit().map_err(|e| fail("commit", &e))?;
        conn.close().map_err(|(_, e)| fail("close", &e))?;
    }
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| fail("sync", &e))?;
    std::fs::rename(&tmp, path).map_err(|e| fail("rename", &e))?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers (run inside a transaction or on the connection)
// ---------------------------------------------------------------------------------------------

/// A readable, unique sweep id: the sweep's name made URL-safe, a dash, and a short suffix.
fn new_sweep_id(tx: &Connection, name: &str, seq: i64) -> Result<String> {
    let mut base: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    base.truncate(40);
    if base.is_empty() {
        base = "sweep".into();
    }
    // The suffix mixes time, sequence and process id, so ids differ across state dirs too.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in
        now_ms().to_le_bytes().iter().chain(seq.to_le_bytes().iter()).chain(std::process::id().to_le_bytes().iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    for i in 0..64u64 {
        let id = format!("{base}-{:04x}", (h.wrapping_add(i.wrapping_mul(0x9e37_79b9)) >> 16) & 0xffff);
        let taken: bool = tx.query_row("SELECT EXISTS(SELECT 1 FROM sweeps WHERE id = ?1)", [&id], |r| r.get(0))?;
        if !taken {
            return Ok(id);
        }
    }
    Ok(format!("{base}-{seq}"))
}

/// The full id of the sweep named by `id`: the id itself, or a prefix of exactly one id.
fn resolve_sweep(conn: &Connection, id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(StoreError::Invalid("no sweep id given".into()));
    }
    let exact: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM sweeps WHERE id = ?1)", [id], |r| r.get(0))?;
    if exact {
        return Ok(id.to_string());
    }
    let escaped: String =
        id.chars().flat_map(|c| if matches!(c, '%' | '_' | '\\') { vec!['\\', c] } else { vec![c] }).collect();
    let mut q = conn.prepare("SELECT id FROM sweeps WHERE id LIKE ?1 ESCAPE '\\' ORDER BY seq LIMIT 6")?;
    let matches: Vec<String> = q.query_map([format!("{escaped}%")], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    match matches.len() {
        0 => Err(StoreError::NotFound(format!("no sweep with id `{id}`"))),
        1 => Ok(matches.into_iter().next().unwrap_or_default()),
        _ => Err(StoreError::Invalid(format!(
            "`{id}` matches several sweeps ({}); give more of the id",
            matches.join(", ")
        ))),
    }
}

fn sweep_summary(conn: &Connection, sweep_id: &str) -> Result<v1::SweepSummary> {
    let row: Option<(String, String, i64, i64, Option<i64>, String)> = conn
        .query_row(
            "SELECT id, name, trial_count, created_at_ms, finished_at_ms, source FROM sweeps WHERE id = ?1",
            [sweep_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?;
    let Some((id, name, trial_count, created_at_ms, finished_at_ms, source)) = row else {
        return Err(StoreError::NotFound(format!("no sweep with id `{sweep_id}`")));
    };
    let mut counts = v1::TrialCounts::default();
    let mut states = Vec::new();
    let mut q = conn.prepare("SELECT state, COUNT(*) FROM trials WHERE sweep_id = ?1 GROUP BY state")?;
    for row in q.query_map([sweep_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (state, n) = row?;
        let s = TrialState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("trial state `{state}`")))?;
        counts.add(s, u32::try_from(n).unwrap_or(u32::MAX));
        states.extend(std::iter::repeat_n(s, n as usize));
    }
    Ok(v1::SweepSummary {
        id,
        name,
        state: SweepState::of(states).as_str().into(),
        trial_count: trial_count as u32,
        counts: Some(counts),
        created_at_ms,
        finished_at_ms: finished_at_ms.unwrap_or(0),
        source,
    })
}

fn trial_summaries(conn: &Connection, sweep_id: &str, only: Option<i64>) -> Result<Vec<v1::TrialSummary>> {
    // One trial is looked up by its key (`?2 IS NULL OR t.idx = ?2` would scan the sweep).
    let only_sql = if only.is_some() { "AND t.idx = ?2" } else { "AND ?2 IS NULL" };
    let mut q = conn.prepare_cached(&format!(
        "SELECT t.idx, t.trial_id, t.backbone, t.fe_epochs, t.ft_epochs, t.state, t.attempts,
                COALESCE(a.worker_id, ''), t.error, COALESCE(t.started_at_ms, 0), COALESCE(t.finished_at_ms, 0),
                COALESCE(a.devices, ''),
                (SELECT COUNT(*) FROM metrics m WHERE m.sweep_id = t.sweep_id AND m.idx = t.idx),
                (SELECT m.val_accuracy FROM metrics m WHERE m.sweep_id = t.sweep_id AND m.idx = t.idx ORDER BY m.epoch DESC LIMIT 1),
                t.lr_decay
         FROM trials t LEFT JOIN attempts a ON a.id = CASE
                WHEN t.state = 'running' THEN t.current_attempt
                WHEN t.state IN ('completed', 'failed', 'cancelled') THEN
                    (SELECT MAX(x.id) FROM attempts x WHERE x.sweep_id = t.sweep_id AND x.idx = t.idx)
             END
         WHERE t.sweep_id = ?1 {only_sql} ORDER BY t.idx"
    ))?;
    // The strategy stays encoded until the rows are read, so a decode error can be a StoreError.
    let rows: Vec<(v1::TrialSummary, Vec<u8>)> = q
        .query_map(params![sweep_id, only], |r| {
            let devices: String = r.get(11)?;
            let summary = v1::TrialSummary {
                index: r.get::<_, i64>(0)? as u32,
                trial_id: r.get(1)?,
                backbone: r.get(2)?,
                fe_epochs: r.get(3)?,
                ft_epochs: r.get(4)?,
                state: r.get(5)?,
                attempts: r.get(6)?,
                worker_id: r.get(7)?,
                error: r.get(8)?,
                started_at_ms: r.get(9)?,
                finished_at_ms: r.get(10)?,
                devices: devices.split(',').filter(|d| !d.is_empty()).map(str::to_string).collect(),
                epochs_done: r.get(12)?,
                latest_val_accuracy: r.get(13)?,
                lr_decay: None,
            };
            Ok((summary, r.get(14)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(mut t, lr)| {
            let decay = v1::LrDecay::decode(lr.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("lr_decay of trial {}: {e}", t.trial_id)))?;
            t.lr_decay = Some(decay);
            Ok(t)
        })
        .collect()
}

/// Per-trial results kept beside the metrics.
#[derive(Debug, Default)]
struct TrialExtras {
    parameters: u64,
    wall_seconds: f64,
    best_checkpoint: Option<v1::CheckpointRef>,
    last_checkpoint: Option<v1::CheckpointRef>,
    skipped_images: u32,
}

/// The columns [`trial_extras`] reads, in order.
const TRIAL_EXTRAS: &str = "parameters, wall_seconds, best_checkpoint, last_checkpoint, skipped_images";

fn trial_extras(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<TrialExtras> {
    let checkpoint = |i: usize| -> rusqlite::Result<Option<v1::CheckpointRef>> {
        let blob: Option<Vec<u8>> = r.get(first + i)?;
        blob.map(|b| {
            v1::CheckpointRef::decode(b.as_slice()).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(first + i, rusqlite::types::Type::Blob, Box::new(e))
            })
        })
        .transpose()
    };
    Ok(TrialExtras {
        parameters: r.get::<_, i64>(first)? as u64,
        wall_seconds: r.get(first + 1)?,
        best_checkpoint: checkpoint(2)?,
        last_checkpoint: checkpoint(3)?,
        skipped_images: r.get::<_, i64>(first + 4)? as u32,
    })
}

/// Metrics of every trial of a sweep, by trial index, in epoch order.
fn all_metrics(conn: &Connection, sweep_id: &str) -> Result<HashMap<u32, Vec<EpochMetrics>>> {
    metrics_of(conn, sweep_id, None)
}

/// Metrics of every trial of a sweep, or of trial `only`, by trial index, in epoch order.
fn metrics_of(conn: &Connection, sweep_id: &str, only: Option<i64>) -> Result<HashMap<u32, Vec<EpochMetrics>>> {
    // One trial is read by its key, not by scanning the sweep's metrics.
    let only_sql = if only.is_some() { "AND idx = ?2" } else { "AND ?2 IS NULL" };
    let mut q = conn.prepare_cached(&format!(
        "SELECT idx, epoch, phase, train_loss, train_accuracy, val_loss, val_accuracy, seconds
         FROM metrics WHERE sweep_id = ?1 {only_sql} ORDER BY idx, epoch"
    ))?;
    let rows = q.query_map(params![sweep_id, only], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            [r.get::<_, f64>(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?],
        ))
    })?;
    let mut out: HashMap<u32, Vec<EpochMetrics>> = HashMap::new();
    for row in rows {
        let (idx, epoch, phase, [train_loss, train_accuracy, val_loss, val_accuracy, seconds]) = row?;
        let phase = Phase::parse(&phase).ok_or_else(|| StoreError::Corrupt(format!("phase `{phase}`")))?;
        out.entry(idx as u32).or_default().push(EpochMetrics {
            epoch: epoch as u32,
            phase,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            seconds,
        });
    }
    Ok(out)
}

/// The worker's devices that none of its running attempts holds, in its own order.
fn free_devices(conn: &Connection, worker_id: &str, devices: &[v1::Device]) -> Result<Vec<String>> {
    let busy: std::collections::HashSet<String> = {
        let mut q = conn.prepare_cached("SELECT devices FROM attempts WHERE worker_id = ?1 AND state = 'running'")?;
        let rows: Vec<String> = q.query_map([worker_id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        rows.iter().flat_map(|d| d.split(',').filter(|x| !x.is_empty()).map(str::to_string)).collect()
    };
    Ok(devices.iter().map(|d| d.id.clone()).filter(|d| !busy.contains(d)).collect())
}

/// Checks that the caller is the worker it names (its session, and who registered it) and that
/// the worker exists in this incarnation with its lease; returns its devices.
fn check_worker(conn: &Connection, caller: &Caller, incarnation: u64) -> Result<Vec<v1::Device>> {
    let worker_id = caller.worker_id.as_str();
    let (inc, state, devices) = check_identity(conn, caller)?;
    if inc as u64 != incarnation {
        return Err(StoreError::WrongState(format!(
            "worker {worker_id} is incarnation {inc}, not {incarnation}; register again"
        )));
    }
    if state != WORKER_ACTIVE && state != WORKER_QUARANTINED {
        return Err(StoreError::WrongState(format!(
            "worker {worker_id} lost its lease (missed heartbeats); register again"
        )));
    }
    let devices = v1::DeviceList::decode(devices.as_slice())
        .map_err(|e| StoreError::Corrupt(format!("devices of worker {worker_id}: {e}")))?;
    Ok(devices.devices)
}

/// The worker row of the caller, once its session and owner match: `(incarnation, state,
/// devices)`. An unknown worker is `NotFound` (register first); a session or an identity that
/// is not the registration's is `NotYours`.
fn check_identity(conn: &Connection, caller: &Caller) -> Result<(i64, String, Vec<u8>)> {
    let worker_id = caller.worker_id.as_str();
    let row: Option<(i64, String, Vec<u8>, String, String)> = conn
        .prepare_cached("SELECT incarnation, state, devices, session_hash, owner FROM workers WHERE id = ?1")?
        .query_row([worker_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .optional()?;
    let Some((inc, state, devices, hash, owner)) = row else {
        return Err(StoreError::NotFound(format!("no worker `{worker_id}`; register first")));
    };
    if hash.is_empty() {
        // Registered by a version without sessions: it must register again.
        return Err(StoreError::WrongState(format!(
            "worker {worker_id} registered before sessions existed; register again"
        )));
    }
    if !constant_time_eq(session_hash(&caller.session).as_bytes(), hash.as_bytes()) {
        return Err(StoreError::NotYours(format!(
            "the session does not match worker {worker_id}'s registration; a worker may only call in its own name"
        )));
    }
    if !constant_time_eq(owner.as_bytes(), caller.owner.as_bytes()) {
        // Which token or certificate registered it is not told: a fingerprint helps guessing.
        return Err(StoreError::NotYours(format!(
            "worker {worker_id} was registered by another identity (another token or client certificate); a worker may only call in its own name"
        )));
    }
    Ok((inc, state, devices))
}

/// Why a checkpoint reference is not the trial's own `file`, if it is not: its path must end in
/// `/<sweep>/<trial>/<file>` with no `.` or `..` segment and no control character, and it must
/// carry the SHA-256 (64 lower-case hex digits) and size of what it names. (Where the store is
/// — a directory, a bucket — is the workers' business; whose trial it belongs to is checked
/// here and again by the worker that resumes from it.)
pub fn check_checkpoint_ref(
    c: &v1::CheckpointRef,
    sweep_id: &str,
    trial_id: &str,
    file: &str,
) -> std::result::Result<(), String> {
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
    if tail != [sweep_id, trial_id, file] {
        return Err(format!(
            "uri `{}` is not this trial's own: it must end in `{sweep_id}/{trial_id}/{file}`",
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

/// Checks that the caller is the worker the attempt was handed to.
fn check_attempt_owner(conn: &Connection, caller: &Caller, attempt_id: u64) -> Result<()> {
    check_identity(conn, caller)?;
    let holder: Option<String> = conn
        .prepare_cached("SELECT worker_id FROM attempts WHERE id = ?1")?
        .query_row([attempt_id as i64], |r| r.get(0))
        .optional()?;
    match holder {
        None => Err(StoreError::NotFound(format!("no attempt {attempt_id}"))),
        Some(w) if w != caller.worker_id => Err(StoreError::NotYours(format!(
            "attempt {attempt_id} was handed to another worker, not {}; a worker may only write for its own attempts",
            caller.worker_id
        ))),
        Some(_) => Ok(()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

/// A new session secret: 32 bytes from the kernel's random source, as 64 hex digits.
fn new_session_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom(2) writes at most the given length into the buffer we own.
        let n = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(StoreError::Corrupt(format!("no random bytes for a session secret: {e}")));
        }
        filled += n as usize;
    }
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a session secret is stored: its SHA-256, hex.
fn session_hash(session: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(session.as_bytes()))
}

/// The checksum stored with an event: the first 8 bytes of SHA-256 over its sweep id and
/// payload, so a flipped byte, or an event moved to another sweep, is seen.
pub fn event_checksum(sweep_id: &str, payload: &[u8]) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(sweep_id.as_bytes());
    h.update([0u8]);
    h.update(payload);
    let d = h.finalize();
    i64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Computes the checksums of events stored before events had one (schema 7).
fn fill_event_checksums(tx: &Connection) -> Result<()> {
    // In batches by sequence number: a long-lived state has millions of events.
    let mut after = 0i64;
    let mut select = tx.prepare(
        "SELECT seq, sweep_id, payload FROM events WHERE checksum IS NULL AND seq > ?1 ORDER BY seq LIMIT 10000",
    )?;
    let mut update = tx.prepare("UPDATE events SET checksum = ?2 WHERE seq = ?1")?;
    loop {
        let rows: Vec<(i64, String, Vec<u8>)> =
            select.query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last().map(|r| r.0) else { return Ok(()) };
        for (seq, sweep_id, payload) in rows {
            update.execute(params![seq, event_checksum(&sweep_id, &payload)])?;
        }
        after = last;
    }
}

struct CurrentAttempt {
    sweep_id: String,
    idx: i64,
    trial_id: String,
    fe_epochs: u32,
    ft_epochs: u32,
    cancelled: bool,
}

/// The attempt, if it is the current, running attempt of its trial; otherwise the fencing
/// error `WrongState` (or `NotFound` for an id never issued).
fn current_attempt(conn: &Connection, attempt_id: u64) -> Result<CurrentAttempt> {
    let row = conn
        .prepare_cached("SELECT a.sweep_id, a.idx, a.state, t.current_attempt, t.trial_id, t.fe_epochs, t.ft_epochs, s.cancelled
             FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx JOIN sweeps s ON s.id = a.sweep_id
             WHERE a.id = ?1")?.query_row([attempt_id as i64],
            |r| {
                let attempt = CurrentAttempt {
                    sweep_id: r.get(0)?,
                    idx: r.get(1)?,
                    trial_id: r.get(4)?,
                    fe_epochs: r.get(5)?,
                    ft_epochs: r.get(6)?,
                    cancelled: r.get::<_, i64>(7)? != 0,
                };
                Ok((attempt, r.get::<_, String>(2)?, r.get::<_, Option<i64>>(3)?))
            },
        )
        .optional()?;
    let Some((attempt, state, current)) = row else {
        return Err(StoreError::NotFound(format!("no attempt {attempt_id}")));
    };
    if state != AttemptState::Running.as_str() || current != Some(attempt_id as i64) {
        return Err(StoreError::WrongState(format!(
            "attempt {attempt_id} of {}/{} is no longer current (it is {state}); the write was refused",
            attempt.sweep_id, attempt.trial_id
        )));
    }
    Ok(attempt)
}

fn attempt_should_stop(conn: &Connection, attempt_id: u64, worker_id: &str) -> Result<bool> {
    let row: Option<(String, String, Option<i64>, i64)> = conn
        .prepare_cached("SELECT a.worker_id, a.state, t.current_attempt, s.cancelled
             FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx JOIN sweeps s ON s.id = a.sweep_id
             WHERE a.id = ?1")?.query_row([attempt_id as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(match row {
        None => true,
        Some((w, state, current, cancelled)) => {
            w != worker_id || state != "running" || current != Some(attempt_id as i64) || cancelled != 0
        }
    })
}

/// Ends a running attempt and moves its trial on: completed, back to pending (a retryable end
/// with attempts left), failed, or cancelled (its sweep was cancelled).
fn end_attempt(
    tx: &Connection,
    attempt_id: u64,
    end: AttemptState,
    message: &str,
    permanent: bool,
    wall_seconds: f64,
    now: i64,
) -> Result<()> {
    let (sweep_id, idx, all_attempts, max_attempts, cancelled, started, retry_base, worker_id): (
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        String,
    ) = tx
        .prepare_cached(
            "SELECT a.sweep_id, a.idx, t.attempts, s.max_attempts, s.cancelled, a.started_at_ms, t.retry_base, a.worker_id
         FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx JOIN sweeps s ON s.id = a.sweep_id
         WHERE a.id = ?1",
        )?
        .query_row([attempt_id as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
        })?;
    // Attempts made before a `sweep retry` do not count against the budget.
    let attempts = all_attempts - retry_base;
    // Every epoch is stored (the worker was stopped, failed or lost after its last report,
    // before it could say it succeeded): the trial's result is whole, and it stays.
    let (end, message) = if end != AttemptState::Succeeded && has_every_epoch(tx, &sweep_id, idx)? {
        (
            AttemptState::Succeeded,
            format!("{} after every epoch was reported; the result is kept: {message}", end.as_str()),
        )
    } else {
        (end, message.to_string())
    };
    let message = message.as_str();
    tx.prepare_cached("UPDATE attempts SET state = ?2, ended_at_ms = ?3, error = ?4 WHERE id = ?1")?
        .execute(params![attempt_id as i64, end.as_str(), now, message])?;
    let wall = if wall_seconds > 0.0 { wall_seconds } else { (now - started).max(0) as f64 / 1000.0 };
    let (state, error) = match end {
        AttemptState::Succeeded => (TrialState::Completed, String::new()),
        _ if cancelled != 0 => (TrialState::Cancelled, "sweep cancelled".to_string()),
        AttemptState::Cancelled => (TrialState::Pending, String::new()),
        _ if permanent => (TrialState::Failed, message.to_string()),
        _ if attempts >= max_attempts => {
            (TrialState::Failed, format!("{message} (attempt {attempts} of {max_attempts}; no attempts left)"))
        }
        _ => (TrialState::Pending, message.to_string()),
    };
    let finished = state.is_terminal().then_some(now);
    tx.prepare_cached(
        "UPDATE trials SET state = ?3, current_attempt = NULL, error = ?4, finished_at_ms = ?5,
                wall_seconds = CASE WHEN ?3 = 'completed' THEN ?6 ELSE wall_seconds END
         WHERE sweep_id = ?1 AND idx = ?2",
    )?
    .execute(params![sweep_id, idx, state.as_str(), error, finished, wall])?;
    trial_event(tx, &sweep_id, idx, None, now)?;
    match end {
        AttemptState::Succeeded => {
            tx.prepare_cached("UPDATE workers SET consecutive_failures = 0 WHERE id = ?1")?.execute([&worker_id])?;
        }
        // A permanent failure says the trial cannot run anywhere (a missing dataset, a spec the
        // backbone cannot take): it says nothing about the worker, and a bad spec must not
        // quarantine the fleet — unless other workers did run that sweep (reported epochs of
        // it): then the worker is the odd one out (a dataset mount missing on its node, too
        // little memory) and it counts. Retryable failures always count.
        AttemptState::Failed if !permanent || others_ran(tx, &sweep_id, &worker_id)? => {
            let failures: i64 = tx
                .prepare_cached(
                    "UPDATE workers SET consecutive_failures = consecutive_failures + 1 WHERE id = ?1
                     RETURNING consecutive_failures",
                )?
                .query_row([&worker_id], |r| r.get(0))?;
            let limit = quarantine_after(tx)?;
            if limit > 0 && failures >= limit {
                let note = format!("quarantined: {failures} attempts failed in a row; the last: {message}");
                let changed = tx
                    .prepare_cached("UPDATE workers SET state = ?2, note = ?3 WHERE id = ?1 AND state = ?4")?
                    .execute(params![worker_id, WORKER_QUARANTINED, note, WORKER_ACTIVE])?;
                if changed > 0 {
                    // Trials only this worker could hold are unschedulable now.
                    reconcile_schedulability(tx, now)?;
                }
            }
        }
        _ => {}
    }
    finish_sweep_if_done(tx, &sweep_id, now)
}

/// Whether a worker other than `worker_id` stored an epoch of the sweep.
fn others_ran(conn: &Connection, sweep_id: &str, worker_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM metrics m JOIN attempts a ON a.id = m.attempt_id
                           WHERE m.sweep_id = ?1 AND a.worker_id != ?2)",
        )?
        .query_row(params![sweep_id, worker_id], |r| r.get(0))?)
}

/// Whether a trial has metrics for every one of its epochs.
fn has_every_epoch(conn: &Connection, sweep_id: &str, idx: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM metrics m WHERE m.sweep_id = t.sweep_id AND m.idx = t.idx
                       AND m.epoch BETWEEN 1 AND t.fe_epochs + t.ft_epochs) = t.fe_epochs + t.ft_epochs
             FROM trials t WHERE t.sweep_id = ?1 AND t.idx = ?2",
        )?
        .query_row(params![sweep_id, idx], |r| r.get(0))?)
}

/// The `quarantine_after` setting (0: never), stored in `meta` by [`Store::set_quarantine_after`].
fn quarantine_after(conn: &Connection) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'quarantine_after'")?
        .query_row([], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(i64::from(DEFAULT_QUARANTINE_AFTER)))
}

/// Marks waiting trials that no registered worker can ever hold `unschedulable` (with the
/// reason), and makes them `pending` again once a worker large enough is registered. With no
/// active worker at all, trials simply wait: that is a missing worker, not an impossible trial.
fn reconcile_schedulability(tx: &Connection, now: i64) -> Result<()> {
    let workers: Vec<(String, Vec<u8>)> = {
        let mut q = tx.prepare("SELECT id, devices FROM workers WHERE state = ?1 ORDER BY id")?;
        q.query_map([WORKER_ACTIVE], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
    };
    let mut largest: Option<(String, usize)> = None;
    for (id, devices) in workers {
        let n = v1::DeviceList::decode(devices.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("devices of worker {id}: {e}")))?
            .devices
            .len();
        if largest.as_ref().is_none_or(|(_, m)| n > *m) {
            largest = Some((id, n));
        }
    }
    let Some((worker, capacity)) = largest else { return Ok(()) };
    // Per sweep, only the trials that change are read (an index lookup each): pending ones when
    // the sweep's trials no longer fit, unschedulable ones when they fit again.
    let sweeps: Vec<(String, i64)> = {
        let mut q = tx.prepare("SELECT id, gpus_per_trial FROM sweeps WHERE cancelled = 0 ORDER BY seq")?;
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
    };
    for (sweep_id, need) in sweeps {
        let (from, to, reason) = if need as usize <= capacity {
            (TrialState::Unschedulable, TrialState::Pending, String::new())
        } else {
            (
                TrialState::Pending,
                TrialState::Unschedulable,
                format!(
                    "needs {need} devices (resources.gpus_per_trial); the largest registered worker, {worker}, has {capacity}"
                ),
            )
        };
        let changing: Vec<i64> = {
            let mut q = tx.prepare("SELECT idx FROM trials WHERE state = ?2 AND sweep_id = ?1 ORDER BY idx")?;
            q.query_map(params![sweep_id, from.as_str()], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
        };
        for idx in changing {
            tx.execute(
                "UPDATE trials SET state = ?3, error = ?4 WHERE sweep_id = ?1 AND idx = ?2",
                params![sweep_id, idx, to.as_str(), reason],
            )?;
            trial_event(tx, &sweep_id, idx, None, now)?;
        }
    }
    Ok(())
}

/// Appends a trial event (the trial's current summary, and the epoch's metrics if any).
fn trial_event(conn: &Connection, sweep_id: &str, idx: i64, metrics: Option<v1::EpochMetrics>, now: i64) -> Result<()> {
    trial_event_noted(conn, sweep_id, idx, metrics, "", now)
}

/// [`trial_event`] with a note for the event log.
fn trial_event_noted(
    conn: &Connection,
    sweep_id: &str,
    idx: i64,
    metrics: Option<v1::EpochMetrics>,
    note: &str,
    now: i64,
) -> Result<()> {
    let trial = trial_summaries(conn, sweep_id, Some(idx))?.pop();
    let event = v1::SweepEvent {
        sequence: 0,
        event: Some(v1::sweep_event::Event::Trial(v1::TrialEvent { trial, metrics, note: note.to_string() })),
    };
    let payload = event.encode_to_vec();
    conn.prepare_cached("INSERT INTO events(sweep_id, payload, at_ms, checksum) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![sweep_id, payload, now, event_checksum(sweep_id, &payload)])?;
    Ok(())
}

/// When every trial of the sweep has ended, records the end time and an `ended` event.
fn finish_sweep_if_done(conn: &Connection, sweep_id: &str, now: i64) -> Result<()> {
    // Cheap test first (an index lookup): a sweep with a waiting or running trial goes on.
    let open: bool = conn.prepare_cached("SELECT EXISTS(SELECT 1 FROM trials WHERE state IN ('pending', 'unschedulable', 'running') AND sweep_id = ?1)")?.query_row([sweep_id],
        |r| r.get(0),
    )?;
    if open {
        return Ok(());
    }
    let summary = sweep_summary(conn, sweep_id)?;
    let state = SweepState::parse(&summary.state).unwrap_or(SweepState::Running);
    if !state.is_terminal() || summary.finished_at_ms != 0 {
        return Ok(());
    }
    conn.prepare_cached("UPDATE sweeps SET finished_at_ms = ?2 WHERE id = ?1")?.execute(params![sweep_id, now])?;
    let ended = v1::SweepSummary { finished_at_ms: now, ..summary };
    let event = v1::SweepEvent { sequence: 0, event: Some(v1::sweep_event::Event::Ended(ended)) };
    let payload = event.encode_to_vec();
    conn.prepare_cached("INSERT INTO events(sweep_id, payload, at_ms, checksum) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![sweep_id, payload, now, event_checksum(sweep_id, &payload)])?;
    Ok(())
}

/// The domain form of a stored learning-rate strategy.
pub fn lr_decay_of(t: &v1::TrialSummary) -> Option<LrDecay> {
    t.lr_decay.as_ref().and_then(|d| LrDecay::try_from(d).ok())
}
