//! The SQLite implementation of [`Store`]: one database (`<state dir>/sweep.db`) in WAL mode
//! with `synchronous=FULL`.
//!
//! Each method's transaction is a savepoint, so calls can also run inside a batch
//! ([`Store::begin_batch`] … [`Store::commit_batch`]): a failing call rolls back its own
//! changes only, and the batch commits (one sync) before any of its callers is answered.
//!
//! Tables: `sweeps`, `trials` (one row per grid cell), `attempts` (one row per try of a trial on
//! a worker), `metrics` (one row per trial and epoch: a later attempt's report supersedes an
//! earlier one, never duplicates it), `workers`, and `events` (the ordered change log behind
//! `WatchSweep`). Structured values (a worker's devices, a strategy, a checkpoint reference, an
//! event) are stored as blobs in the `sweep.v1` protobuf encoding of the records — this
//! backend's file format (schema versions 1 to 7), converted at this module's edge; the
//! records themselves are `sweep-core`'s.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{
    Caller, CheckpointKind, DEFAULT_QUARANTINE_AFTER, MAX_PAGE, MAX_PAGE_BYTES, Page, Registration, ReportExtras,
    Result, StateReader, Store, StoreError, StoredMetrics, check_checkpoint_ref,
};
use crate::clock::{Clock, SystemClock};
use crate::history;
use prost::Message;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sweep_core::Backbone;
use sweep_core::early_stop::{EarlyStopping, Metric};
use sweep_core::grid;
use sweep_core::leaderboard::{self, EpochMetrics, Phase};
use sweep_core::lr::LrDecay;
use sweep_core::records::{
    Assignment, AttemptInfo, Cancelled, CheckpointRef, Device, DeviceUse, EpochRecord, Event, Leaderboard,
    LeaderboardEntry, Outcome, References, ReportReply, StopReason, Submitted, SweepEvent, SweepStatus, SweepSummary,
    TrialCounts, TrialDetail, TrialSummary, WorkerInfo,
};
use sweep_core::schedule;
use sweep_core::spec::{ParseOptions, SweepSpec};
use sweep_core::stages::{self, StageTree};
use sweep_core::state::{AttemptState, TrialState, WorkerState};
use sweep_proto::v1;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Backend { what: "state database".into(), source: Box::new(e) }
    }
}

/// A database error while opening `path`.
fn open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Backend { what: format!("state database {}", path.display()), source: Box::new(e) }
}

/// Milliseconds since the Unix epoch on the system clock (for what is not the store's: lock
/// files, backup names).
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// The stored points later sweeps may start from: after epoch `epoch` of trial `idx` (the end
/// of a shared stage, or the trial's last epoch), whose epochs `1..=epoch` have the content key
/// `key` (`stages::epoch_keys`), with the references its trial held then and the attempt that
/// computed that epoch. A sweep's trial whose key at some epoch is here takes that epoch's
/// rows and this resume point instead of computing them — only while the source trial's row of
/// that epoch is still that attempt's (a recomputation leaves the entry stale, and passed
/// over). (A macro: the schema and migration 10 both hold it.)
macro_rules! stage_points {
    () => {
        "
CREATE TABLE IF NOT EXISTS stage_points (
    key               TEXT NOT NULL,
    sweep_id          TEXT NOT NULL REFERENCES sweeps(id),
    idx               INTEGER NOT NULL,
    epoch             INTEGER NOT NULL,
    last_checkpoint   BLOB NOT NULL,
    best_checkpoint   BLOB,
    resume_checkpoint BLOB NOT NULL,
    attempt_id        INTEGER NOT NULL,
    PRIMARY KEY (key, sweep_id)
);"
    };
}

const SCHEMA_VERSION: i64 = 12;

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
    // 8: early stopping: a sweep's setting (`EarlyStopping::canonical`), and why a trial was
    // stopped.
    "ALTER TABLE sweeps ADD COLUMN early_stopping TEXT;
     ALTER TABLE trials ADD COLUMN stop_reason TEXT;",
    // 9: whether a sweep runs its shared epochs once (`sharing:`; sweeps stored before ran
    // every trial alone), and each trial's newest stored epoch (what the scheduler reads).
    "ALTER TABLE sweeps ADD COLUMN sharing INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE trials ADD COLUMN stored INTEGER NOT NULL DEFAULT 0;
     UPDATE trials SET stored = (SELECT COALESCE(MAX(m.epoch), 0) FROM metrics m
                                 WHERE m.sweep_id = trials.sweep_id AND m.idx = trials.idx);",
    // 10: the index of stored stage ends, by content key (reuse across sweeps), and sweeps no
    // longer kept (`sweep drop`).
    concat!("ALTER TABLE sweeps ADD COLUMN dropped_at_ms INTEGER;", stage_points!()),
    // 11: ASHA's promotion form: the epoch a trial waits at (a rung) to be promoted or stopped.
    "ALTER TABLE trials ADD COLUMN paused_at INTEGER;
     CREATE INDEX IF NOT EXISTS trials_paused ON trials(sweep_id, paused_at);",
    // 12: tags (sorted, each between commas: `,a,b,`) and a note per sweep.
    "ALTER TABLE sweeps ADD COLUMN tags TEXT NOT NULL DEFAULT '';
     ALTER TABLE sweeps ADD COLUMN note TEXT NOT NULL DEFAULT '';",
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
    finished_at_ms INTEGER,
    early_stopping TEXT,
    sharing        INTEGER NOT NULL DEFAULT 0,
    dropped_at_ms  INTEGER,
    tags           TEXT NOT NULL DEFAULT '',
    note           TEXT NOT NULL DEFAULT ''
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
    stop_reason     TEXT,
    stored          INTEGER NOT NULL DEFAULT 0,
    paused_at       INTEGER,
    PRIMARY KEY (sweep_id, idx)
);
CREATE INDEX IF NOT EXISTS trials_by_state ON trials(state);
CREATE INDEX IF NOT EXISTS trials_paused ON trials(sweep_id, paused_at);
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

/// Indexes for the scheduler's hot queries: the oldest pending trial of a sweep, whether a
/// sweep still has waiting or running trials, and where the trials of a sweep stand, without
/// scanning the sweep; and the log of trials whose standing changed (created at every open,
/// like the indexes: nothing in it outlives a restart's first hand-out).
const QUERY_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS trials_by_state_sweep ON trials(state, sweep_id, idx);
CREATE INDEX IF NOT EXISTS trials_progress ON trials(sweep_id, state, idx, stored);
-- Trials of sweeps with shared stages whose state or stored epochs changed since the scheduler
-- last read them (it keeps where each trial stands in memory, and reads only these).
CREATE TABLE IF NOT EXISTS progress_log (
    sweep_id TEXT NOT NULL,
    idx      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS progress_log_by_sweep ON progress_log(sweep_id);
CREATE TRIGGER IF NOT EXISTS trials_progress_log AFTER UPDATE OF state, stored ON trials
    WHEN (OLD.state IS NOT NEW.state OR OLD.stored IS NOT NEW.stored)
         AND (SELECT sharing FROM sweeps WHERE id = NEW.sweep_id) != 0
    BEGIN INSERT INTO progress_log(sweep_id, idx) VALUES (NEW.sweep_id, NEW.idx); END;
";

/// The SQLite store. Not `Sync`: the server keeps it on one thread.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// The state directory's lock, held while the store is open.
    _lock: StateLock,
    /// Where every timestamp and lease time comes from.
    clock: Arc<dyn Clock>,
    /// The stage trees of sweeps read so far (`None`: the sweep shares no epoch), built from
    /// their stored specs, which never change; cleared when a batch rolls back.
    trees: Trees,
    /// Where each trial of a sweep with shared stages stands, as the scheduler last read it,
    /// brought up to date from `progress_log` at each hand-out; cleared when a batch or a
    /// hand-out fails (what it read may be rolled back).
    progress: RefCell<HashMap<String, Vec<schedule::Progress>>>,
    /// The parsed specs of sweeps read so far (they never change); cleared with `trees`.
    specs: Specs,
}

/// Stage trees by sweep id.
type Trees = RefCell<HashMap<String, Option<Arc<StageTree>>>>;

/// Parsed specs by sweep id.
type Specs = RefCell<HashMap<String, Arc<SweepSpec>>>;

impl SqliteStore {
    /// Opens `<dir>/sweep.db`, creating the directory and a new database when the directory
    /// holds neither a database nor a write-ahead log. Holds `<dir>/sweep.lock` for the life of
    /// the store: a second coordinator on the same directory is refused.
    ///
    /// A state directory that is damaged is refused before anything in it is written: a
    /// `sweep.db` of 0 bytes, one that is not an SQLite database or not a sweep state database,
    /// a `sweep.db-wal` (or `-journal`) without its `sweep.db`. The error names the file.
    pub fn open(dir: &Path) -> Result<SqliteStore> {
        SqliteStore::open_with_clock(dir, Arc::new(SystemClock))
    }

    /// [`Store::open`] with the time read from `clock` (tests move it by hand).
    pub fn open_with_clock(dir: &Path, clock: Arc<dyn Clock>) -> Result<SqliteStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Damaged(format!("cannot create {}: {e}", dir.display())))?;
        let lock = StateLock::acquire(dir)?;
        let path = dir.join(DB_FILE);
        let open_err = |e| open_error(&path, e);
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
        Ok(SqliteStore {
            conn,
            path,
            _lock: lock,
            clock,
            trees: RefCell::default(),
            progress: RefCell::default(),
            specs: RefCell::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for SqliteStore {
    /// Moves everything in the write-ahead log into `sweep.db` and empties the log, so that the
    /// database file alone holds the whole state (a clean shutdown does this last).
    fn checkpoint(&mut self) -> Result<()> {
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
    fn begin_batch(&mut self) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Commits a batch (one sync for all its calls); on failure rolls all of it back.
    fn commit_batch(&mut self) -> Result<()> {
        self.conn.execute_batch("COMMIT").map_err(|e| {
            let _ = self.conn.execute_batch("ROLLBACK");
            // A sweep stored in the batch is gone, and its id may come back with another spec;
            // what the scheduler read in it may be undone.
            self.trees.borrow_mut().clear();
            self.progress.borrow_mut().clear();
            self.specs.borrow_mut().clear();
            StoreError::from(e)
        })
    }

    // -----------------------------------------------------------------------------------------
    // Sweeps
    // -----------------------------------------------------------------------------------------

    /// Stores a validated sweep and queues its trials.
    fn submit(&mut self, spec_yaml: &str, source: &str, spec: &SweepSpec) -> Result<Submitted> {
        let trials = grid::expand(&spec.grid);
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM sweeps", [], |r| r.get(0))?;
        let id = new_sweep_id(&tx, &spec.name, seq)?;
        tx.execute(
            "INSERT INTO sweeps(id, seq, name, source, spec_yaml, trial_count, max_attempts, gpus_per_trial, created_at_ms,
                                early_stopping, sharing)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id,
                seq,
                spec.name,
                source,
                spec_yaml,
                trials.len() as i64,
                spec.retries.max_attempts,
                spec.resources.gpus_per_trial,
                now,
                spec.early_stopping.map(|e| e.canonical()),
                spec.sharing
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
        let mut submitted = reuse(&tx, &id, spec, &trials, now)?;
        reconcile_schedulability(&tx, now)?;
        finish_sweep_if_done(&tx, &id, now)?;
        tx.commit()?;
        submitted.sweep_id = id;
        submitted.trial_count = trials.len() as u32;
        Ok(submitted)
    }

    /// One page of sweeps, newest first: at most `page_size` (1 to [`MAX_PAGE`]) of those
    /// older than the page `token` names (empty: from the newest); returns them and the token
    /// of the next page (empty after the last).
    fn list_sweeps_page(&self, page_size: usize, token: &str, tag: &str) -> Result<Page<SweepSummary>> {
        read_list_sweeps_page(&self.conn, page_size, token, tag)
    }

    fn get_sweep(&self, sweep_id: &str) -> Result<SweepStatus> {
        read_get_sweep(&self.conn, sweep_id)
    }

    /// Cancels pending trials now; running attempts are told to stop through their next
    /// heartbeat or report, and their trials end as cancelled when they do.
    fn cancel_sweep(&mut self, sweep_id: &str) -> Result<Cancelled> {
        let tx = self.conn.savepoint()?;
        let sweep_id = &resolve_sweep(&tx, sweep_id)?;
        tx.execute("UPDATE sweeps SET cancelled = 1 WHERE id = ?1", [sweep_id])?;
        let pending: Vec<i64> = {
            let mut q =
                tx.prepare("SELECT idx FROM trials WHERE sweep_id = ?1 AND state IN (?2, ?3, ?4) ORDER BY idx")?;
            q.query_map(
                params![
                    sweep_id,
                    TrialState::Pending.as_str(),
                    TrialState::Unschedulable.as_str(),
                    TrialState::Paused.as_str()
                ],
                |r| r.get(0),
            )?
            .collect::<rusqlite::Result<_>>()?
        };
        let now = self.clock.now_ms();
        for idx in &pending {
            tx.execute(
                "UPDATE trials SET state = ?4, error = 'sweep cancelled', finished_at_ms = ?3, paused_at = NULL
                 WHERE sweep_id = ?1 AND idx = ?2",
                params![sweep_id, idx, now, TrialState::Cancelled.as_str()],
            )?;
            trial_event(&tx, sweep_id, *idx, None, now)?;
        }
        let running: i64 = tx.query_row(
            "SELECT COUNT(*) FROM trials WHERE sweep_id = ?1 AND state = ?2",
            params![sweep_id, TrialState::Running.as_str()],
            |r| r.get(0),
        )?;
        finish_sweep_if_done(&tx, sweep_id, now)?;
        tx.commit()?;
        Ok(Cancelled { pending: pending.len() as u32, stopping: running as u32 })
    }

    /// Failed attempts in a row after which a worker is quarantined (0: never).
    fn set_quarantine_after(&mut self, n: u32) -> Result<()> {
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
    fn retry_sweep(&mut self, sweep_id: &str, trial_ids: &[String]) -> Result<Vec<String>> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let sweep_id = &resolve_sweep(&tx, sweep_id)?;
        // A sweep that ended may open again: the scheduler reads it afresh.
        self.progress.borrow_mut().remove(sweep_id);
        let cancelled: bool =
            tx.query_row("SELECT cancelled != 0 FROM sweeps WHERE id = ?1", [sweep_id], |r| r.get(0))?;
        if cancelled {
            return Err(StoreError::WrongState(format!(
                "sweep {sweep_id} was cancelled; submit its spec again to run it"
            )));
        }
        let dropped: bool =
            tx.query_row("SELECT dropped_at_ms IS NOT NULL FROM sweeps WHERE id = ?1", [sweep_id], |r| r.get(0))?;
        if dropped {
            return Err(StoreError::WrongState(format!(
                "sweep {sweep_id} was dropped (its files may be collected); submit its spec again to run it"
            )));
        }
        let failed: Vec<(i64, String)> = {
            let mut q =
                tx.prepare("SELECT idx, trial_id FROM trials WHERE sweep_id = ?1 AND state = ?2 ORDER BY idx")?;
            q.query_map(params![sweep_id, TrialState::Failed.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?
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
            // One that failed while it waited at a rung (ASHA) waits there again: its rung
            // decides whether it goes on.
            tx.execute(
                "UPDATE trials SET state = CASE WHEN paused_at IS NULL THEN ?3 ELSE ?4 END, error = '',
                        finished_at_ms = NULL, retry_base = attempts
                 WHERE sweep_id = ?1 AND idx = ?2",
                params![sweep_id, idx, TrialState::Pending.as_str(), TrialState::Paused.as_str()],
            )?;
            trial_event_noted(&tx, sweep_id, *idx, None, "re-queued by `sweep retry`", now)?;
        }
        if !chosen.is_empty() {
            // The sweep is open again; it ends (with a new `ended` event) when these do.
            tx.execute("UPDATE sweeps SET finished_at_ms = NULL WHERE id = ?1", [sweep_id])?;
            reconcile_schedulability(&tx, now)?;
            let rule: Option<String> =
                tx.query_row("SELECT early_stopping FROM sweeps WHERE id = ?1", [sweep_id], |r| r.get(0))?;
            if let Some(rule) = rule.as_deref().map(|r| parse_rule(r, sweep_id)).transpose()?.filter(|r| r.pauses()) {
                settle(&tx, sweep_id, &rule, now, None, 1)?;
            }
        }
        tx.commit()?;
        Ok(chosen.into_iter().map(|(_, id)| id).collect())
    }

    fn drop_sweep(&mut self, sweep_id: &str) -> Result<(String, u32)> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let sweep_id = resolve_sweep(&tx, sweep_id)?;
        let open = open_trials(&tx, &sweep_id)?;
        if open > 0 {
            return Err(StoreError::WrongState(format!(
                "sweep {sweep_id} has {open} trial(s) waiting or running; cancel it first (`sweep cancel`) or let it end"
            )));
        }
        let points = tx.execute("DELETE FROM stage_points WHERE sweep_id = ?1", [&sweep_id])?;
        tx.execute(
            "UPDATE sweeps SET dropped_at_ms = COALESCE(dropped_at_ms, ?2) WHERE id = ?1",
            params![sweep_id, now],
        )?;
        tx.commit()?;
        Ok((sweep_id, points as u32))
    }

    fn update_sweep(
        &mut self,
        sweep_id: &str,
        add: &[String],
        remove: &[String],
        note: Option<&str>,
    ) -> Result<SweepSummary> {
        if let Some(n) = note {
            sweep_core::records::check_note(n).map_err(StoreError::Invalid)?;
        }
        let tx = self.conn.savepoint()?;
        let sweep_id = resolve_sweep(&tx, sweep_id)?;
        let before = sweep_summary(&tx, &sweep_id)?;
        let tags = sweep_core::records::retag(&before.tags, add, remove).map_err(StoreError::Invalid)?;
        tx.execute(
            "UPDATE sweeps SET tags = ?2, note = COALESCE(?3, note) WHERE id = ?1",
            params![sweep_id, stored_tags(&tags), note],
        )?;
        let after = sweep_summary(&tx, &sweep_id)?;
        tx.commit()?;
        Ok(after)
    }

    fn references(&self, sweep_id: &str) -> Result<References> {
        let sweep_id = resolve_sweep(&self.conn, sweep_id)?;
        let open = open_trials(&self.conn, &sweep_id)?;
        let mut reason = if open > 0 { format!("{open} trial(s) waiting or running") } else { String::new() };
        // Every reference a kept sweep holds: its trials' checkpoints and its stage points.
        let mut keys = BTreeSet::new();
        let mut q = self.conn.prepare(
            "SELECT t.last_checkpoint, t.best_checkpoint, t.resume_checkpoint FROM trials t
             JOIN sweeps s ON s.id = t.sweep_id WHERE s.dropped_at_ms IS NULL
             UNION ALL
             SELECT p.last_checkpoint, p.best_checkpoint, p.resume_checkpoint FROM stage_points p
             JOIN sweeps s ON s.id = p.sweep_id WHERE s.dropped_at_ms IS NULL",
        )?;
        let mut rows = q.query([])?;
        while let Some(r) = rows.next()? {
            for i in 0..3 {
                let Some(blob) = r.get::<_, Option<Vec<u8>>>(i)? else { continue };
                // An undecodable reference may name a file of this sweep: nothing is collected
                // while one is stored.
                let Ok(c) = decode_checkpoint(&blob) else {
                    reason = "a stored checkpoint reference cannot be decoded (damaged state: `sweep check-state`); \
                              nothing is collected while one is"
                        .into();
                    continue;
                };
                let mut parts = c.uri.rsplit('/');
                let (Some(file), Some(trial), Some(sweep)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                if sweep == sweep_id {
                    keys.insert(format!("{sweep}/{trial}/{file}"));
                }
            }
        }
        Ok(References { collectable: reason.is_empty(), reason, keys: keys.into_iter().collect(), sweep_id })
    }

    fn leaderboard(&self, sweep_id: &str) -> Result<Leaderboard> {
        read_leaderboard(&self.conn, sweep_id, self.clock.now_ms())
    }

    fn trial(&self, sweep_id: &str, trial_id: &str) -> Result<TrialDetail> {
        read_trial(&self.conn, sweep_id, trial_id)
    }

    // -----------------------------------------------------------------------------------------
    // Workers
    // -----------------------------------------------------------------------------------------

    /// Registers a worker: a new id, a new incarnation (larger than any given before) and a new
    /// session secret, which every later call in the worker's name must carry (only its SHA-256
    /// is stored). `owner` is who registered it (see [`Caller::owner`]).
    fn register(&mut self, name: &str, devices: &[Device], version: &str, owner: &str) -> Result<Registration> {
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
        let devices = encode_devices(devices);
        tx.execute(
            "INSERT INTO workers(id, name, incarnation, devices, version, state, registered_at_ms, last_seen_ms,
                                 session_hash, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9)",
            params![
                id,
                name,
                incarnation,
                devices,
                version,
                WorkerState::Active.as_str(),
                now,
                session_hash(&session),
                owner
            ],
        )?;
        reconcile_schedulability(&tx, now)?;
        tx.commit()?;
        Ok(Registration { worker_id: id, incarnation: incarnation as u64, session })
    }

    /// Records a heartbeat; returns the attempts (among `running`) the worker must stop.
    fn heartbeat(&mut self, caller: &Caller, incarnation: u64, running: &[u64]) -> Result<Vec<u64>> {
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

    fn workers_page(&self, page_size: usize, token: &str) -> Result<Page<WorkerInfo>> {
        read_workers_page(&self.conn, page_size, token)
    }

    /// Forgets workers that have been gone since before `deadline_ms` and hold no running
    /// attempt: their rows go (attempts keep the worker's id). Returns how many.
    fn forget_workers(&mut self, deadline_ms: i64) -> Result<usize> {
        let tx = self.conn.savepoint()?;
        let n = tx.execute(
            "DELETE FROM workers WHERE state = ?1 AND last_seen_ms < ?2
             AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.worker_id = workers.id AND a.state = ?3)",
            params![WorkerState::Gone.as_str(), deadline_ms, AttemptState::Running.as_str()],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Ends the lease of every active worker not seen since `deadline_ms`: the worker is marked
    /// gone and its running attempts lost; their trials go back to the queue (or fail when out
    /// of attempts). Returns the ids of the workers expired.
    fn expire_workers(&mut self, deadline_ms: i64) -> Result<Vec<String>> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        let gone: Vec<String> = {
            let mut q = tx.prepare("SELECT id FROM workers WHERE state IN (?1, ?3) AND last_seen_ms < ?2")?;
            q.query_map(params![WorkerState::Active.as_str(), deadline_ms, WorkerState::Quarantined.as_str()], |r| {
                r.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        for id in &gone {
            tx.execute("UPDATE workers SET state = ?2 WHERE id = ?1", params![id, WorkerState::Gone.as_str()])?;
            let attempts: Vec<i64> = {
                let mut q = tx.prepare("SELECT id FROM attempts WHERE worker_id = ?1 AND state = ?2")?;
                q.query_map(params![id, AttemptState::Running.as_str()], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
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
    fn acquire(&mut self, caller: &Caller, incarnation: u64) -> Result<Option<Assignment>> {
        let worker_id = caller.worker_id.as_str();
        let tx = self.conn.savepoint()?;
        let devices = check_worker(&tx, caller, incarnation)?;
        let quarantined: bool = tx
            .prepare_cached("SELECT state = ?2 FROM workers WHERE id = ?1")?
            .query_row(params![worker_id, WorkerState::Quarantined.as_str()], |r| r.get(0))?;
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
        let waiting: Vec<(schedule::Candidate<String>, bool)> = tx
            .prepare_cached(
                "SELECT s.id, s.seq, (SELECT t.idx FROM trials t WHERE t.state = ?1 AND t.sweep_id = s.id
                               ORDER BY t.idx LIMIT 1) AS first, s.gpus_per_trial, s.sharing
                 FROM sweeps s WHERE s.cancelled = 0 AND s.finished_at_ms IS NULL AND first IS NOT NULL",
            )?
            .query_map([TrialState::Pending.as_str()], |r| {
                let candidate = schedule::Candidate {
                    sweep: r.get(0)?,
                    order: r.get(1)?,
                    trial: r.get::<_, i64>(2)? as u32,
                    devices: r.get::<_, i64>(3)?.clamp(0, i64::from(u32::MAX)) as u32,
                    remaining: 0,
                };
                Ok((candidate, r.get::<_, i64>(4)? != 0))
            })?
            .collect::<rusqlite::Result<_>>()?;
        // A sweep with a stage tree offers the trials that may run now (`schedule::ready`);
        // one without offers its first waiting trial. The policy takes the oldest sweep with a
        // trial that fits first, so sweeps are asked oldest first until one has such a trial
        // (reading a large sweep's trials is the costly part).
        let mut waiting = waiting;
        waiting.sort_by_key(|(c, _)| c.order);
        // What is known of sweeps with nothing waiting (ended, or all running) is read again
        // when they have.
        self.progress.borrow_mut().retain(|sweep, _| waiting.iter().any(|(c, _)| c.sweep == *sweep));
        let mut candidates = Vec::with_capacity(waiting.len());
        for (c, sharing) in waiting {
            let fits = c.fits(free.len());
            match sharing.then(|| shared_tree(&self.trees, &self.specs, &tx, &c.sweep)).transpose()?.flatten() {
                Some(tree) if fits => {
                    let standing = match progress(&self.progress, &tx, &c.sweep, tree.trials.len()) {
                        Ok(p) => p,
                        Err(e) => {
                            self.progress.borrow_mut().clear();
                            return Err(e);
                        }
                    };
                    for (trial, remaining) in schedule::ready(&tree, &standing) {
                        candidates.push(schedule::Candidate { trial, remaining, ..c.clone() });
                    }
                }
                Some(_) => {}
                None => candidates.push(c),
            }
            if candidates.iter().any(|c| c.fits(free.len())) {
                break;
            }
        }
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
        // Only a pending trial is handed out (what the scheduler knew of it may be out of date:
        // then it reads the sweep again at the next hand-out).
        let number: Option<i64> = tx
            .prepare_cached(
                "UPDATE trials SET attempts = attempts + 1 WHERE sweep_id = ?1 AND idx = ?2 AND state = ?3
                 RETURNING attempts",
            )?
            .query_row(params![sweep_id, idx, TrialState::Pending.as_str()], |r| r.get(0))
            .optional()?;
        let Some(number) = number else {
            tracing::warn!(sweep = %sweep_id, trial = idx, "the scheduler's view of a sweep was out of date; read again");
            self.progress.borrow_mut().remove(&sweep_id);
            tx.commit()?;
            return Ok(None);
        };
        tx.prepare_cached(
            "INSERT INTO attempts(sweep_id, idx, number, worker_id, incarnation, state, started_at_ms, devices)
             VALUES (?1, ?2, ?3, ?4, ?5, ?8, ?6, ?7)",
        )?
        .execute(params![
            sweep_id,
            idx,
            number,
            worker_id,
            incarnation as i64,
            now,
            held.join(","),
            AttemptState::Running.as_str()
        ])?;
        let attempt_id = tx.last_insert_rowid();
        tx.prepare_cached(
            "UPDATE trials SET state = ?5, current_attempt = ?3, started_at_ms = COALESCE(started_at_ms, ?4), error = ''
             WHERE sweep_id = ?1 AND idx = ?2",
        )?
        .execute(params![sweep_id, idx, attempt_id, now, TrialState::Running.as_str()])?;
        trial_event(&tx, &sweep_id, idx, None, now)?;
        let spec_yaml: String =
            tx.prepare_cached("SELECT spec_yaml FROM sweeps WHERE id = ?1")?.query_row([&sweep_id], |r| r.get(0))?;
        let resume: Option<Vec<u8>> = tx.query_row(
            "SELECT resume_checkpoint FROM trials WHERE sweep_id = ?1 AND idx = ?2",
            params![sweep_id, idx],
            |r| r.get(0),
        )?;
        let resume = resume
            .map(|b| decode_checkpoint(&b))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("resume point of trial {idx} of {sweep_id}: {e}")))?;
        let t = trial_summaries(&tx, &sweep_id, Some(idx))?
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("trial {idx} of {sweep_id} vanished")))?;
        let sharing = shared_tree(&self.trees, &self.specs, &tx, &sweep_id)?.is_some();
        tx.commit()?;
        Ok(Some(Assignment {
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
            sharing,
        }))
    }

    /// Stores one epoch's metrics for a current attempt. Returns whether the attempt should
    /// stop (its sweep was cancelled).
    fn report_epoch(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        metrics: &EpochMetrics,
        extras: &ReportExtras,
    ) -> Result<ReportReply> {
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
        // A trial paused at a rung was told to stop after it: an epoch past it is not this
        // attempt's to store (it is handed out again if it is promoted).
        if let Some(at) = a.paused_at
            && metrics.epoch > at
        {
            return Err(StoreError::WrongState(format!(
                "trial {} is paused at epoch {at} (an ASHA rung) until it is promoted; epoch {} was refused",
                a.trial_id, metrics.epoch
            )));
        }
        // An epoch stored again (an attempt that resumed from an older point) was decided on
        // when it first arrived.
        let first = i64::from(metrics.epoch) == stored + 1;
        for (kind, checkpoint) in [
            (CheckpointKind::Last, &extras.last_checkpoint),
            (CheckpointKind::Best, &extras.best_checkpoint),
            (CheckpointKind::Resume, &extras.resume_checkpoint),
        ] {
            if let Some(c) = checkpoint {
                let column = kind.field();
                if c.uri.is_empty() || c.epoch != metrics.epoch {
                    return Err(StoreError::Invalid(format!(
                        "{column} of epoch {} must name a file and hold that epoch (got uri `{}`, epoch {})",
                        metrics.epoch,
                        sweep_core::text::escape(&c.uri),
                        c.epoch
                    )));
                }
                check_checkpoint_ref(c, &a.sweep_id, &a.trial_id, kind)
                    .map_err(|why| StoreError::Invalid(format!("{column} of epoch {}: {why}", metrics.epoch)))?;
            }
        }
        let now = self.clock.now_ms();
        let spec = sweep_spec(&self.specs, &tx, &a.sweep_id)?;
        let tree = shared_tree(&self.trees, &self.specs, &tx, &a.sweep_id)?;
        store_epoch(&tx, &a.sweep_id, a.idx, attempt_id, metrics, extras, now)?;
        index_point(&tx, &spec, tree.as_deref(), &a.sweep_id, a.idx, metrics.epoch, attempt_id, extras)?;
        if extras.resumed_from_epoch > 0 || !extras.note.is_empty() {
            tx.execute(
                "UPDATE attempts SET resumed_from_epoch = ?2, note = ?3 WHERE id = ?1",
                params![attempt_id as i64, extras.resumed_from_epoch, extras.note],
            )?;
        }
        let decided = if first { early_stop_decision(&tx, &a, metrics)? } else { None };
        if let Some(why) = &decided {
            tx.prepare_cached("UPDATE trials SET stop_reason = ?3 WHERE sweep_id = ?1 AND idx = ?2")?
                .execute(params![a.sweep_id, a.idx, why])?;
        }
        let paused = if first { pause_at_rung(&tx, &a, metrics.epoch)? } else { None };
        let mut unblocked = false;
        if let Some(tree) = &tree {
            unblocked = credit(&tx, &spec, tree, &a, attempt_id, metrics, extras, now)?;
        }
        // ASHA: the new value may promote trials waiting at this rung, or close it. What it
        // decides for this trial is said on this epoch's event (promoted at once, it never
        // waited).
        let mut verdict = None;
        if let Some(rule) = pausing_rule(&a)?
            && let Some(ft_epoch) = metrics.epoch.checked_sub(a.fe_epochs).filter(|e| *e >= 1)
            && first
            && rule.is_rung(ft_epoch)
        {
            let (promoted, own) = settle(&tx, &a.sweep_id, &rule, now, Some(a.idx), ft_epoch)?;
            unblocked |= promoted;
            verdict = own;
        }
        let note = [
            extras.note.as_str(),
            decided.as_deref().unwrap_or(""),
            verdict.or(paused.clone()).as_deref().unwrap_or(""),
        ]
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
        trial_event_noted(&tx, &a.sweep_id, a.idx, Some(*metrics), &note, now)?;
        let (stop_reason, paused_at): (Option<String>, Option<u32>) = tx
            .prepare_cached("SELECT stop_reason, paused_at FROM trials WHERE sweep_id = ?1 AND idx = ?2")?
            .query_row(params![a.sweep_id, a.idx], |r| Ok((r.get(0)?, r.get(1)?)))?;
        tx.commit()?;
        let stop = if a.cancelled {
            Some(StopReason::SweepCancelled)
        } else if let Some(why) = stop_reason {
            Some(StopReason::EarlyStopped(why))
        } else {
            paused_at.map(|at| {
                StopReason::Paused(paused.unwrap_or_else(|| format!("paused by ASHA at epoch {at} until promoted")))
            })
        };
        Ok(ReportReply { stop, unblocked })
    }

    /// Ends a current attempt with the worker's outcome.
    fn report_progress(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        progress: &sweep_core::records::PretrainProgress,
    ) -> Result<bool> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        check_attempt_owner(&tx, caller, attempt_id)?;
        let a = current_attempt(&tx, attempt_id)?;
        let backbone: String = tx
            .prepare_cached("SELECT backbone FROM trials WHERE sweep_id = ?1 AND idx = ?2")?
            .query_row(params![a.sweep_id, a.idx], |r| r.get(0))?;
        if backbone != progress.backbone.name() {
            return Err(StoreError::Invalid(format!(
                "attempt {attempt_id} trains {backbone}, not {}",
                progress.backbone.name()
            )));
        }
        let reported: bool = tx
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM metrics WHERE sweep_id = ?1 AND idx = ?2 AND attempt_id = ?3)",
            )?
            .query_row(params![a.sweep_id, a.idx, attempt_id as i64], |r| r.get(0))?;
        if reported {
            return Err(StoreError::WrongState(format!(
                "attempt {attempt_id} has reported an epoch: it is past pretraining"
            )));
        }
        trial_event_noted(&tx, &a.sweep_id, a.idx, None, &progress.note(), now)?;
        tx.commit()?;
        Ok(a.cancelled)
    }

    fn finish_attempt(
        &mut self,
        caller: &Caller,
        attempt_id: u64,
        outcome: Outcome,
        message: &str,
        wall_seconds: f64,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let tx = self.conn.savepoint()?;
        check_attempt_owner(&tx, caller, attempt_id)?;
        let a = current_attempt(&tx, attempt_id)?;
        match outcome {
            Outcome::Succeeded => {
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
            Outcome::Failed { permanent } => {
                let message = if message.trim().is_empty() { "the worker gave no reason" } else { message };
                end_attempt(&tx, attempt_id, AttemptState::Failed, message, permanent, wall_seconds, now)?;
            }
            Outcome::Cancelled => {
                end_attempt(&tx, attempt_id, AttemptState::Cancelled, message, false, wall_seconds, now)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Events
    // -----------------------------------------------------------------------------------------

    /// Events of a sweep with a sequence number above `after`, oldest first.
    fn events_after(&self, sweep_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
        read_events_after(&self.conn, sweep_id, after, limit)
    }

    /// The largest event sequence number so far (0 when there is none).
    fn last_sequence(&self) -> Result<u64> {
        read_last_sequence(&self.conn)
    }

    /// How many of the worker's devices no running attempt holds (0 for an unknown worker).
    fn free_device_count(&self, worker_id: &str) -> Result<usize> {
        let devices: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT devices FROM workers WHERE id = ?1")?
            .query_row([worker_id], |r| r.get(0))
            .optional()?;
        let Some(devices) = devices else { return Ok(0) };
        let devices = decode_devices(&devices, worker_id)?;
        Ok(free_devices(&self.conn, worker_id, &devices)?.len())
    }

    /// Whether any trial is waiting for a worker.
    fn has_pending(&self) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM trials t JOIN sweeps s ON s.id = t.sweep_id
                               WHERE t.state = ?1 AND s.cancelled = 0)",
            )?
            .query_row([TrialState::Pending.as_str()], |r| r.get(0))?)
    }
}

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
        tx.execute_batch(stage_points!()).map_err(|e| fail("schema", &e))?;
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

/// Tags as stored (`,a,b,`), or `''` for none.
fn stored_tags(tags: &[String]) -> String {
    if tags.is_empty() { String::new() } else { format!(",{},", tags.join(",")) }
}

fn sweep_summary(conn: &Connection, sweep_id: &str) -> Result<SweepSummary> {
    type Row = (String, String, i64, i64, Option<i64>, String, Option<i64>, String, String);
    let row: Option<Row> = conn
        .query_row(
            "SELECT id, name, trial_count, created_at_ms, finished_at_ms, source, dropped_at_ms, tags, note
             FROM sweeps WHERE id = ?1",
            [sweep_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)),
        )
        .optional()?;
    let Some((id, name, trial_count, created_at_ms, finished_at_ms, source, dropped_at_ms, tags, note)) = row else {
        return Err(StoreError::NotFound(format!("no sweep with id `{sweep_id}`")));
    };
    let tags: Vec<String> = tags.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect();
    if let Some(bad) = tags.iter().find_map(|t| sweep_core::records::check_tag(t).err()) {
        return Err(StoreError::Corrupt(format!("sweep {id}: {bad}")));
    }
    let mut counts = TrialCounts::default();
    let mut q = conn.prepare("SELECT state, COUNT(*) FROM trials WHERE sweep_id = ?1 GROUP BY state")?;
    for row in q.query_map([sweep_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (state, n) = row?;
        let s = TrialState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("trial state `{state}`")))?;
        counts.add(s, u32::try_from(n).unwrap_or(u32::MAX));
    }
    Ok(SweepSummary {
        id,
        name,
        state: counts.sweep_state(),
        trial_count: trial_count as u32,
        counts,
        created_at_ms,
        finished_at_ms,
        source,
        dropped_at_ms,
        tags,
        note,
    })
}

fn trial_summaries(conn: &Connection, sweep_id: &str, only: Option<i64>) -> Result<Vec<TrialSummary>> {
    // One trial is looked up by its key (`?2 IS NULL OR t.idx = ?2` would scan the sweep).
    let only_sql = if only.is_some() { "AND t.idx = ?2" } else { "AND ?2 IS NULL" };
    let mut q = conn.prepare_cached(&format!(
        "SELECT t.idx, t.trial_id, t.backbone, t.fe_epochs, t.ft_epochs, t.state, t.attempts,
                a.worker_id, t.error, t.started_at_ms, t.finished_at_ms,
                COALESCE(a.devices, ''),
                (SELECT COUNT(*) FROM metrics m WHERE m.sweep_id = t.sweep_id AND m.idx = t.idx),
                (SELECT m.val_accuracy FROM metrics m WHERE m.sweep_id = t.sweep_id AND m.idx = t.idx ORDER BY m.epoch DESC LIMIT 1),
                t.lr_decay,
                (SELECT MAX(m.val_accuracy) FROM metrics m WHERE m.sweep_id = t.sweep_id AND m.idx = t.idx AND m.epoch > t.fe_epochs)
         FROM trials t LEFT JOIN attempts a ON a.id = CASE
                WHEN t.state = ?3 THEN t.current_attempt
                WHEN t.state IN (?4, ?5, ?6, ?7) THEN
                    (SELECT MAX(x.id) FROM attempts x WHERE x.sweep_id = t.sweep_id AND x.idx = t.idx)
             END
         WHERE t.sweep_id = ?1 {only_sql} ORDER BY t.idx"
    ))?;
    // Strings and blobs stay raw until the rows are read, so a bad one can be a StoreError.
    struct Raw {
        index: u32,
        trial_id: String,
        backbone: String,
        fe_epochs: u32,
        ft_epochs: u32,
        state: String,
        attempts: u32,
        worker_id: Option<String>,
        error: String,
        started_at_ms: Option<i64>,
        finished_at_ms: Option<i64>,
        devices: String,
        epochs_done: u32,
        latest_val_accuracy: Option<f64>,
        lr_decay: Vec<u8>,
        best_val_accuracy: Option<f64>,
    }
    let rows: Vec<Raw> = q
        .query_map(
            params![
                sweep_id,
                only,
                TrialState::Running.as_str(),
                TrialState::Completed.as_str(),
                TrialState::Failed.as_str(),
                TrialState::Cancelled.as_str(),
                TrialState::Stopped.as_str()
            ],
            |r| {
                Ok(Raw {
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
                    devices: r.get(11)?,
                    epochs_done: r.get(12)?,
                    latest_val_accuracy: r.get(13)?,
                    lr_decay: r.get(14)?,
                    best_val_accuracy: r.get(15)?,
                })
            },
        )?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|t| {
            let bad = |what: String| StoreError::Corrupt(format!("trial {} of {sweep_id}: {what}", t.trial_id));
            Ok(TrialSummary {
                index: t.index,
                backbone: Backbone::from_name(&t.backbone).ok_or_else(|| bad(format!("backbone `{}`", t.backbone)))?,
                lr_decay: decode_lr_decay(&t.lr_decay).map_err(|e| bad(format!("lr_decay: {e}")))?,
                fe_epochs: t.fe_epochs,
                ft_epochs: t.ft_epochs,
                state: TrialState::parse(&t.state).ok_or_else(|| bad(format!("state `{}`", t.state)))?,
                attempts: t.attempts,
                worker_id: t.worker_id,
                error: t.error,
                started_at_ms: t.started_at_ms,
                finished_at_ms: t.finished_at_ms,
                devices: t.devices.split(',').filter(|d| !d.is_empty()).map(str::to_string).collect(),
                epochs_done: t.epochs_done,
                latest_val_accuracy: t.latest_val_accuracy,
                best_val_accuracy: t.best_val_accuracy,
                trial_id: t.trial_id,
            })
        })
        .collect()
}

/// Per-trial results kept beside the metrics.
#[derive(Debug, Default)]
struct TrialExtras {
    parameters: u64,
    wall_seconds: f64,
    best_checkpoint: Option<CheckpointRef>,
    last_checkpoint: Option<CheckpointRef>,
    skipped_images: u32,
}

/// The columns [`trial_extras`] reads, in order.
const TRIAL_EXTRAS: &str = "parameters, wall_seconds, best_checkpoint, last_checkpoint, skipped_images";

fn trial_extras(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<TrialExtras> {
    let checkpoint = |i: usize| -> rusqlite::Result<Option<CheckpointRef>> {
        let blob: Option<Vec<u8>> = r.get(first + i)?;
        blob.map(|b| {
            decode_checkpoint(&b).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(first + i, rusqlite::types::Type::Blob, e.into())
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
fn free_devices(conn: &Connection, worker_id: &str, devices: &[Device]) -> Result<Vec<String>> {
    let busy: HashSet<String> = {
        let mut q = conn.prepare_cached("SELECT devices FROM attempts WHERE worker_id = ?1 AND state = ?2")?;
        let rows: Vec<String> = q
            .query_map(params![worker_id, AttemptState::Running.as_str()], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        rows.iter().flat_map(|d| d.split(',').filter(|x| !x.is_empty()).map(str::to_string)).collect()
    };
    Ok(devices.iter().map(|d| d.id.clone()).filter(|d| !busy.contains(d)).collect())
}

/// Checks that the caller is the worker it names (its session, and who registered it) and that
/// the worker exists in this incarnation with its lease; returns its devices.
fn check_worker(conn: &Connection, caller: &Caller, incarnation: u64) -> Result<Vec<Device>> {
    let worker_id = caller.worker_id.as_str();
    let (inc, state, devices) = check_identity(conn, caller)?;
    if inc as u64 != incarnation {
        return Err(StoreError::WrongState(format!(
            "worker {worker_id} is incarnation {inc}, not {incarnation}; register again"
        )));
    }
    if state != WorkerState::Active.as_str() && state != WorkerState::Quarantined.as_str() {
        return Err(StoreError::WrongState(format!(
            "worker {worker_id} lost its lease (missed heartbeats); register again"
        )));
    }
    decode_devices(&devices, worker_id)
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
    /// The sweep's early stopping, as stored.
    early_stopping: Option<String>,
    /// Why the trial was stopped early, once it was.
    stop_reason: Option<String>,
    /// The epoch the trial waits at (an ASHA rung), while it does.
    paused_at: Option<u32>,
}

/// The attempt, if it is the current, running attempt of its trial; otherwise the fencing
/// error `WrongState` (or `NotFound` for an id never issued).
fn current_attempt(conn: &Connection, attempt_id: u64) -> Result<CurrentAttempt> {
    let row = conn
        .prepare_cached("SELECT a.sweep_id, a.idx, a.state, t.current_attempt, t.trial_id, t.fe_epochs, t.ft_epochs, s.cancelled,
                    s.early_stopping, t.stop_reason, t.paused_at
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
                    early_stopping: r.get(8)?,
                    stop_reason: r.get(9)?,
                    paused_at: r.get(10)?,
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
    let row: Option<(String, String, Option<i64>, i64, bool)> = conn
        .prepare_cached(
            "SELECT a.worker_id, a.state, t.current_attempt, s.cancelled,
                    t.stop_reason IS NOT NULL OR t.paused_at IS NOT NULL
             FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx JOIN sweeps s ON s.id = a.sweep_id
             WHERE a.id = ?1",
        )?
        .query_row([attempt_id as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .optional()?;
    Ok(match row {
        None => true,
        Some((w, state, current, cancelled, stopped_early)) => {
            w != worker_id
                || state != AttemptState::Running.as_str()
                || current != Some(attempt_id as i64)
                || cancelled != 0
                || stopped_early
        }
    })
}

/// The sweep's early-stopping decision on the epoch `metrics` just stored for attempt `a`'s
/// trial: `Some(why)` when the trial stops now (`sweep_core::early_stop`), compared with what
/// the sweep's other trials stored at the same fine-tuning epoch.
fn early_stop_decision(conn: &Connection, a: &CurrentAttempt, metrics: &EpochMetrics) -> Result<Option<String>> {
    // A cancelled sweep's trials end as cancelled: nothing more to decide.
    let (Some(stored), None, false) = (&a.early_stopping, &a.stop_reason, a.cancelled) else { return Ok(None) };
    let rule = EarlyStopping::parse(stored)
        .ok_or_else(|| StoreError::Corrupt(format!("early_stopping `{stored}` of sweep {}", a.sweep_id)))?;
    let Some(ft_epoch) = metrics.epoch.checked_sub(a.fe_epochs).filter(|e| *e >= 1) else { return Ok(None) };
    if !rule.decides_at(ft_epoch, a.ft_epochs) {
        return Ok(None);
    }
    let column = match rule.metric {
        Metric::ValAccuracy => "m.val_accuracy",
        Metric::ValLoss => "m.val_loss",
    };
    let peers: Vec<f64> = conn
        .prepare_cached(&format!(
            "SELECT {column} FROM metrics m JOIN trials t ON t.sweep_id = m.sweep_id AND t.idx = m.idx
             WHERE m.sweep_id = ?1 AND m.idx != ?2 AND m.epoch = t.fe_epochs + ?3"
        ))?
        .query_map(params![a.sweep_id, a.idx, ft_epoch], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let value = match rule.metric {
        Metric::ValAccuracy => metrics.val_accuracy,
        Metric::ValLoss => metrics.val_loss,
    };
    Ok(rule.decide(ft_epoch, a.ft_epochs, value, &peers).map(|why| format!("{why} (epoch {})", metrics.epoch)))
}

/// A sweep's stored early-stopping setting, read back.
fn parse_rule(stored: &str, sweep_id: &str) -> Result<EarlyStopping> {
    EarlyStopping::parse(stored)
        .ok_or_else(|| StoreError::Corrupt(format!("early_stopping `{stored}` of sweep {sweep_id}")))
}

/// The rule of `a`'s sweep when its trials pause at rungs (ASHA) and the sweep goes on.
fn pausing_rule(a: &CurrentAttempt) -> Result<Option<EarlyStopping>> {
    if a.cancelled {
        return Ok(None);
    }
    let rule = a.early_stopping.as_deref().map(|e| parse_rule(e, &a.sweep_id)).transpose()?;
    Ok(rule.filter(|r| r.pauses()))
}

/// ASHA: when `epoch` (just stored) is a rung of trial `a`, the trial waits there — `paused`
/// at once if no attempt runs it (a trial credited with a shared epoch), after its attempt
/// ends otherwise — until [`settle`] promotes or stops it. Returns why it waits.
fn pause_at_rung(tx: &Connection, a: &CurrentAttempt, epoch: u32) -> Result<Option<String>> {
    let Some(rule) = pausing_rule(a)? else { return Ok(None) };
    let Some(ft_epoch) = epoch.checked_sub(a.fe_epochs).filter(|e| *e >= 1) else { return Ok(None) };
    if a.stop_reason.is_some() || !rule.decides_at(ft_epoch, a.ft_epochs) {
        return Ok(None);
    }
    tx.prepare_cached(
        "UPDATE trials SET paused_at = ?3, state = CASE WHEN state IN (?4, ?5) THEN ?6 ELSE state END
         WHERE sweep_id = ?1 AND idx = ?2",
    )?
    .execute(params![
        a.sweep_id,
        a.idx,
        epoch,
        TrialState::Pending.as_str(),
        TrialState::Unschedulable.as_str(),
        TrialState::Paused.as_str()
    ])?;
    Ok(Some(rule.pause_note(ft_epoch)))
}

/// ASHA's promotions in sweep `sweep_id`, rung by rung from the lowest
/// ([`EarlyStopping::promote`]): at each rung where trials wait, against every value the
/// sweep's trials recorded at that fine-tuning epoch, and closed once no trial can still reach
/// it (every open trial with that many fine-tuning epochs has stored it). A promoted trial is
/// pending again (a running one just goes on); a stopped one ends `stopped` (a running one when
/// its attempt ends). One event each, with why — but for trial `own`, whose verdict is returned
/// for the caller to say. Rungs below fine-tuning epoch `from` are left as they are (a new value
/// at a rung changes nothing below it). Returns whether a trial was promoted.
fn settle(
    tx: &Connection,
    sweep_id: &str,
    rule: &EarlyStopping,
    now: i64,
    own: Option<i64>,
    from: u32,
) -> Result<(bool, Option<String>)> {
    let longest: u32 = tx
        .prepare_cached("SELECT COALESCE(MAX(ft_epochs), 0) FROM trials WHERE sweep_id = ?1")?
        .query_row([sweep_id], |r| r.get(0))?;
    let column = match rule.metric {
        Metric::ValAccuracy => "m.val_accuracy",
        Metric::ValLoss => "m.val_loss",
    };
    let (mut promoted, mut stopped, mut verdict) = (false, false, None);
    for ft_epoch in (from.max(1)..longest).filter(|&e| rule.decides_at(e, longest)) {
        // Waiting there: paused, or still running the attempt that reached it (a trial that
        // failed there keeps the rung for `sweep retry`, but is not judged while it is failed).
        let waiting: Vec<u32> = tx
            .prepare_cached(
                "SELECT idx FROM trials INDEXED BY trials_paused
                 WHERE sweep_id = ?1 AND paused_at = fe_epochs + ?2 AND state IN (?3, ?4) ORDER BY idx",
            )?
            .query_map(params![sweep_id, ft_epoch, TrialState::Paused.as_str(), TrialState::Running.as_str()], |r| {
                r.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?;
        if waiting.is_empty() {
            continue;
        }
        let arrived: Vec<(u32, f64)> = tx
            .prepare_cached(&format!(
                "SELECT m.idx, {column} FROM metrics m JOIN trials t ON t.sweep_id = m.sweep_id AND t.idx = m.idx
                 WHERE m.sweep_id = ?1 AND m.epoch = t.fe_epochs + ?2"
            ))?
            .query_map(params![sweep_id, ft_epoch], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let open: bool = tx
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM trials WHERE sweep_id = ?1 AND ft_epochs >= ?2 AND stored < fe_epochs + ?2
                               AND state IN (?3, ?4, ?5, ?6) AND stop_reason IS NULL)",
            )?
            .query_row(params![sweep_id, ft_epoch, OPEN[0], OPEN[1], OPEN[2], OPEN[3]], |r| r.get(0))?;
        let verdicts = rule.promote(ft_epoch, &arrived, &waiting, !open);
        for (idx, why) in &verdicts.promoted {
            tx.prepare_cached(
                "UPDATE trials SET paused_at = NULL, state = CASE WHEN state = ?3 THEN ?4 ELSE state END
                 WHERE sweep_id = ?1 AND idx = ?2",
            )?
            .execute(params![sweep_id, idx, TrialState::Paused.as_str(), TrialState::Pending.as_str()])?;
            if own == Some(i64::from(*idx)) {
                verdict = Some(why.clone());
            } else {
                trial_event_noted(tx, sweep_id, i64::from(*idx), None, why, now)?;
            }
            promoted = true;
        }
        for (idx, why) in &verdicts.stopped {
            tx.prepare_cached(
                "UPDATE trials SET paused_at = NULL, stop_reason = ?3,
                        error = CASE WHEN state = ?4 THEN ?3 ELSE error END,
                        finished_at_ms = CASE WHEN state = ?4 THEN ?6 ELSE finished_at_ms END,
                        state = CASE WHEN state = ?4 THEN ?5 ELSE state END
                 WHERE sweep_id = ?1 AND idx = ?2",
            )?
            .execute(params![
                sweep_id,
                idx,
                why,
                TrialState::Paused.as_str(),
                TrialState::Stopped.as_str(),
                now
            ])?;
            if own == Some(i64::from(*idx)) {
                verdict = Some(why.clone());
            } else {
                trial_event_noted(tx, sweep_id, i64::from(*idx), None, why, now)?;
            }
            stopped = true;
        }
    }
    if stopped {
        finish_sweep_if_done(tx, sweep_id, now)?;
    }
    Ok((promoted, verdict))
}

/// The stage tree of a sweep that runs shared epochs once (`sharing` on, and some stage with two
/// trials or more), from `cache` or built from its stored spec; `None` for any other sweep.
fn shared_tree(cache: &Trees, specs: &Specs, conn: &Connection, sweep_id: &str) -> Result<Option<Arc<StageTree>>> {
    if let Some(tree) = cache.borrow().get(sweep_id) {
        return Ok(tree.clone());
    }
    // The column, not the spec: sweeps stored before sharing have it off whatever their spec.
    let sharing: bool = conn
        .prepare_cached("SELECT sharing != 0 FROM sweeps WHERE id = ?1")?
        .query_row([sweep_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no sweep {sweep_id}")))?;
    let tree = if sharing {
        let tree = StageTree::build(&*sweep_spec(specs, conn, sweep_id)?, true);
        tree.stages.iter().any(|s| s.trials.len() > 1).then(|| Arc::new(tree))
    } else {
        None
    };
    cache.borrow_mut().insert(sweep_id.to_string(), tree.clone());
    Ok(tree)
}

/// Where each of a sweep's `n` trials stands, by grid index, for `schedule::ready`: from
/// `cache`, brought up to date with the trials `progress_log` names (then emptied for the
/// sweep), or read whole (the pending and running trials: an index-only scan) the first time.
fn progress(
    cache: &RefCell<HashMap<String, Vec<schedule::Progress>>>,
    conn: &Connection,
    sweep_id: &str,
    n: usize,
) -> Result<Vec<schedule::Progress>> {
    let mut cache = cache.borrow_mut();
    let standing = |running: bool, pending: bool| match (running, pending) {
        (true, _) => schedule::Standing::Running,
        (_, true) => schedule::Standing::Waiting,
        _ => schedule::Standing::Idle,
    };
    let outside = |idx: i64| StoreError::Corrupt(format!("trial {idx} of {sweep_id} is outside its grid of {n}"));
    if let Some(known) = cache.get_mut(sweep_id).filter(|p| p.len() == n) {
        let changed: Vec<i64> = conn
            .prepare_cached("SELECT DISTINCT idx FROM progress_log WHERE sweep_id = ?1")?
            .query_map([sweep_id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut q =
            conn.prepare_cached("SELECT state = ?3, state = ?4, stored FROM trials WHERE sweep_id = ?1 AND idx = ?2")?;
        for idx in changed {
            let (running, pending, stored): (bool, bool, i64) = q
                .query_row(params![sweep_id, idx, TrialState::Running.as_str(), TrialState::Pending.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            let p = usize::try_from(idx).ok().and_then(|i| known.get_mut(i)).ok_or_else(|| outside(idx))?;
            *p = schedule::Progress { state: standing(running, pending), stored: u32::try_from(stored).unwrap_or(0) };
        }
    } else {
        let mut out = vec![schedule::Progress { state: schedule::Standing::Idle, stored: 0 }; n];
        let mut q = conn.prepare_cached(
            "SELECT t.idx, t.state = ?3, t.stored FROM trials t INDEXED BY trials_progress
             WHERE t.sweep_id = ?1 AND t.state IN (?2, ?3)",
        )?;
        let mut rows = q.query(params![sweep_id, TrialState::Pending.as_str(), TrialState::Running.as_str()])?;
        while let Some(r) = rows.next()? {
            let (idx, running, stored): (i64, bool, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let p = usize::try_from(idx).ok().and_then(|i| out.get_mut(i)).ok_or_else(|| outside(idx))?;
            *p = schedule::Progress { state: standing(running, !running), stored: u32::try_from(stored).unwrap_or(0) };
        }
        cache.insert(sweep_id.to_string(), out);
    }
    conn.prepare_cached("DELETE FROM progress_log WHERE sweep_id = ?1")?.execute([sweep_id])?;
    Ok(cache.get(sweep_id).cloned().unwrap_or_default())
}

/// Stores epoch `metrics` of trial `idx`, as computed by attempt `attempt_id` (the trial's own,
/// or a trial's it shares the epoch with): the metric row (a later attempt's supersedes,
/// never duplicates), the newest stored epoch, and the report's parameters, checkpoint
/// references (checked by the caller) and skipped images.
fn store_epoch(
    tx: &Connection,
    sweep_id: &str,
    idx: i64,
    attempt_id: u64,
    metrics: &EpochMetrics,
    extras: &ReportExtras,
    now: i64,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO metrics(sweep_id, idx, epoch, phase, train_loss, train_accuracy, val_loss, val_accuracy, seconds,
                             attempt_id, recorded_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT(sweep_id, idx, epoch) DO UPDATE SET
           phase = excluded.phase, train_loss = excluded.train_loss, train_accuracy = excluded.train_accuracy,
           val_loss = excluded.val_loss, val_accuracy = excluded.val_accuracy, seconds = excluded.seconds,
           attempt_id = excluded.attempt_id, recorded_at_ms = excluded.recorded_at_ms",
    )?
    .execute(params![
        sweep_id,
        idx,
        metrics.epoch,
        metrics.phase.as_str(),
        metrics.train_loss,
        metrics.train_accuracy,
        metrics.val_loss,
        metrics.val_accuracy,
        metrics.seconds,
        attempt_id as i64,
        now
    ])?;
    tx.prepare_cached(
        "UPDATE trials SET stored = MAX(stored, ?3), skipped_images = ?4 WHERE sweep_id = ?1 AND idx = ?2",
    )?
    .execute(params![sweep_id, idx, metrics.epoch, extras.skipped_images])?;
    if extras.parameters > 0 {
        tx.prepare_cached("UPDATE trials SET parameters = ?3 WHERE sweep_id = ?1 AND idx = ?2")?.execute(params![
            sweep_id,
            idx,
            extras.parameters as i64
        ])?;
    }
    for (kind, checkpoint) in [
        (CheckpointKind::Last, &extras.last_checkpoint),
        (CheckpointKind::Best, &extras.best_checkpoint),
        (CheckpointKind::Resume, &extras.resume_checkpoint),
    ] {
        if let Some(c) = checkpoint {
            tx.prepare_cached(&format!("UPDATE trials SET {} = ?3 WHERE sweep_id = ?1 AND idx = ?2", kind.field()))?
                .execute(params![sweep_id, idx, encode_checkpoint(c)])?;
        }
    }
    Ok(())
}

/// Indexes the point after epoch `epoch` of trial `idx` in `stage_points` when later sweeps may
/// start from it — the report named that epoch's weights and resume point, and they stay: the
/// end of a shared stage (its weights are a file of the epoch's own, its resume point is never
/// pruned) or the trial's last epoch (nothing is written after it) — by the content key of
/// epochs `1..=epoch`. A recomputation (a later attempt) replaces the sweep's entry.
#[allow(clippy::too_many_arguments)]
fn index_point(
    tx: &Connection,
    spec: &SweepSpec,
    tree: Option<&StageTree>,
    sweep_id: &str,
    idx: i64,
    epoch: u32,
    attempt_id: u64,
    extras: &ReportExtras,
) -> Result<()> {
    let (Some(last), Some(resume)) = (&extras.last_checkpoint, &extras.resume_checkpoint) else { return Ok(()) };
    let Some(trial) = usize::try_from(idx).ok().and_then(|i| grid::cell(&spec.grid, i)) else { return Ok(()) };
    let kept = epoch == trial.epochs() || tree.is_some_and(|t| t.shared_stage_ends(trial.index).contains(&epoch));
    if !kept || last.epoch != epoch || resume.epoch != epoch {
        return Ok(());
    }
    let Some(key) = stages::epoch_keys(spec, &trial).into_iter().nth(epoch as usize - 1) else { return Ok(()) };
    tx.prepare_cached(
        "INSERT OR REPLACE INTO stage_points(key, sweep_id, idx, epoch, last_checkpoint, best_checkpoint, resume_checkpoint,
                                             attempt_id)
         SELECT ?1, sweep_id, idx, ?4, ?5, best_checkpoint, ?6, ?7 FROM trials WHERE sweep_id = ?2 AND idx = ?3",
    )?
    .execute(params![
        key.0,
        sweep_id,
        idx,
        epoch,
        encode_checkpoint(last),
        encode_checkpoint(resume),
        attempt_id as i64
    ])?;
    Ok(())
}

/// A stored point of an earlier sweep that a new trial starts from.
#[derive(Clone)]
struct Point {
    sweep_id: String,
    idx: i64,
    epoch: u32,
    last: Vec<u8>,
    best: Option<Vec<u8>>,
    resume: Vec<u8>,
    /// The attempt that computed its epoch.
    attempt: i64,
}

/// The oldest kept sweep's point (other than `sweep_id`'s) stored under content key `key`
/// whose references decode (a damaged entry is passed over, never handed to a worker).
fn stored_point(tx: &Connection, key: &str, sweep_id: &str) -> Result<Option<Point>> {
    let mut q = tx.prepare_cached(
        "SELECT p.sweep_id, p.idx, p.epoch, p.last_checkpoint, p.best_checkpoint, p.resume_checkpoint, p.attempt_id
         FROM stage_points p JOIN sweeps s ON s.id = p.sweep_id
         WHERE p.key = ?1 AND p.sweep_id != ?2 AND s.dropped_at_ms IS NULL ORDER BY s.seq",
    )?;
    let mut rows = q.query(params![key, sweep_id])?;
    while let Some(r) = rows.next()? {
        let p = Point {
            sweep_id: r.get(0)?,
            idx: r.get(1)?,
            epoch: r.get(2)?,
            last: r.get(3)?,
            best: r.get(4)?,
            resume: r.get(5)?,
            attempt: r.get(6)?,
        };
        let decodes = |blob: &[u8]| decode_checkpoint(blob).is_ok_and(|c| c.epoch <= p.epoch);
        if decodes(&p.last) && decodes(&p.resume) && p.best.as_deref().is_none_or(decodes) {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Gives each new trial of sweep `sweep_id` the longest run of its first epochs that an earlier
/// sweep stored with a point (`stage_points`, by content key; the oldest kept sweep's when
/// several have it, and only while the source's row of that epoch is still the attempt that
/// computed the point): the rows of those epochs as they were computed (same values, attempt
/// and time: the attempt that computed an epoch stays its writer), the point's references (and
/// an entry of this sweep's own in `stage_points`), and the early-stopping decisions those
/// epochs bring in this sweep. With ASHA a trial takes rows up to its next rung and waits there
/// like a trial that computed them; once the reused values promote it, it takes the next run,
/// and so on. A trial whose every epoch is reused is complete now; one stopped early or paused
/// during them keeps the references of the longest point up to its last taken epoch. The
/// others run on from the point. One event per run of epochs taken says where they came from.
/// Nothing is reused for a sweep with `sharing: off`.
fn reuse(tx: &Connection, sweep_id: &str, spec: &SweepSpec, trials: &[grid::Trial], now: i64) -> Result<Submitted> {
    let mut out = Submitted::default();
    if !spec.sharing {
        // `sharing: off`: every trial computes every epoch itself (its own points are still
        // indexed, for later sweeps that share).
        return Ok(out);
    }
    let rule = spec.early_stopping;
    let pausing = rule.filter(|r| r.pauses());
    // What the sweep's trials stored so far at each fine-tuning epoch (all of it is this loop's:
    // the sweep is new), for the median rule's decisions without a query per epoch.
    let mut peers: HashMap<u32, Vec<f64>> = HashMap::new();
    let mut found: HashMap<String, Option<Point>> = HashMap::new();
    let mut lookup = |key: &str| -> Result<Option<Point>> {
        if let Some(p) = found.get(key) {
            return Ok(p.clone());
        }
        let p = stored_point(tx, key, sweep_id)?;
        found.insert(key.to_string(), p.clone());
        Ok(p)
    };
    // What each trial can take.
    struct Taking<'a> {
        t: &'a grid::Trial,
        keys: Vec<stages::StageKey>,
        point: Point,
        rows: Vec<SourceRow>,
        origin: String,
        extras: ReportExtras,
        taken: u32,
        /// It paused at a rung here (what becomes of it, `settle` says).
        settled: bool,
    }
    let mut taking = Vec::new();
    for t in trials {
        let keys = stages::epoch_keys(spec, t);
        let mut chosen: Option<(Point, Vec<SourceRow>)> = None;
        for (i, key) in keys.iter().enumerate().rev() {
            let Some(point) = lookup(&key.0)?.filter(|p| p.epoch as usize == i + 1) else { continue };
            let rows = source_rows(tx, &point.sweep_id, point.idx, point.epoch)?;
            let whole = rows.len() == point.epoch as usize && rows.iter().zip(1..).all(|(r, e)| r.0.epoch == e);
            if whole && rows.last().is_some_and(|r| r.1 == point.attempt) {
                chosen = Some((point, rows));
                break;
            }
        }
        let Some((point, rows)) = chosen else { continue };
        let (source_trial, parameters, skipped): (String, i64, i64) = tx
            .prepare_cached("SELECT trial_id, parameters, skipped_images FROM trials WHERE sweep_id = ?1 AND idx = ?2")?
            .query_row(params![point.sweep_id, point.idx], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let extras = ReportExtras {
            parameters: parameters.max(0) as u64,
            skipped_images: u32::try_from(skipped).unwrap_or(0),
            ..ReportExtras::default()
        };
        let origin = format!("{}/{source_trial}", point.sweep_id);
        taking.push(Taking { t, keys, point, rows, origin, extras, taken: 0, settled: false });
    }
    // Take rows, in runs: each up to the trial's next rung (ASHA), or to the median rule's stop.
    loop {
        let mut moved = false;
        for k in taking.iter_mut() {
            let idx = k.t.index as i64;
            if k.taken as usize >= k.rows.len() {
                continue;
            }
            if k.taken > 0 {
                // Goes on only once promoted from the rung it waits at.
                let waits: bool = tx
                    .prepare_cached(
                        "SELECT state != ?3 OR paused_at IS NOT NULL FROM trials WHERE sweep_id = ?1 AND idx = ?2",
                    )?
                    .query_row(params![sweep_id, idx, TrialState::Pending.as_str()], |r| r.get(0))?;
                if waits {
                    continue;
                }
            }
            let from = k.taken + 1;
            let mut to = k.rows.len() as u32;
            let mut decided = None;
            for (m, _, _) in &k.rows[k.taken as usize..] {
                let Some(ft_epoch) = m.epoch.checked_sub(k.t.fe_epochs).filter(|e| *e >= 1) else { continue };
                let value = match rule.map(|r| r.metric) {
                    Some(Metric::ValLoss) => m.val_loss,
                    _ => m.val_accuracy,
                };
                let seen = peers.entry(ft_epoch).or_default();
                decided = rule
                    .and_then(|r| r.decide(ft_epoch, k.t.ft_epochs, value, seen))
                    .map(|why| format!("{why} (epoch {})", m.epoch));
                seen.push(value);
                if decided.is_some() || pausing.is_some_and(|r| r.decides_at(ft_epoch, k.t.ft_epochs)) {
                    to = m.epoch;
                    break;
                }
            }
            for (m, attempt_id, recorded_at) in &k.rows[k.taken as usize..to as usize] {
                store_epoch(tx, sweep_id, idx, *attempt_id as u64, m, &k.extras, *recorded_at)?;
            }
            k.taken = to;
            moved = true;
            tx.prepare_cached(
                "UPDATE trials SET started_at_ms = COALESCE(started_at_ms, ?3) WHERE sweep_id = ?1 AND idx = ?2",
            )?
            .execute(params![sweep_id, idx, now])?;
            let paused = match pausing {
                Some(r) if decided.is_none() => {
                    let a = CurrentAttempt {
                        sweep_id: sweep_id.to_string(),
                        idx,
                        trial_id: k.t.id.clone(),
                        fe_epochs: k.t.fe_epochs,
                        ft_epochs: k.t.ft_epochs,
                        cancelled: false,
                        early_stopping: Some(r.canonical()),
                        stop_reason: None,
                        paused_at: None,
                    };
                    pause_at_rung(tx, &a, to)?
                }
                _ => None,
            };
            k.settled |= paused.is_some();
            if let Some(why) = &decided {
                tx.prepare_cached(
                    "UPDATE trials SET state = ?3, stop_reason = ?4, error = ?4, finished_at_ms = ?5
                     WHERE sweep_id = ?1 AND idx = ?2",
                )?
                .execute(params![sweep_id, idx, TrialState::Stopped.as_str(), why, now])?;
            }
            let epochs = if from == to { format!("epoch {to}") } else { format!("epochs {from}–{to}") };
            let note = match decided.as_ref().or(paused.as_ref()) {
                Some(why) => format!("reused from {}: {epochs}; {why}", k.origin),
                None => format!("reused from {}: {epochs}", k.origin),
            };
            let last = k.rows.get(to as usize - 1).map(|r| r.0);
            trial_event_noted(tx, sweep_id, idx, last, &note, now)?;
        }
        match pausing {
            // The runs taken may promote (or, with every trial there, stop) trials at a rung.
            Some(r) if moved => {
                settle(tx, sweep_id, &r, now, None, 1)?;
            }
            _ => break,
        }
    }
    // References, ends, and what the sweep took from where.
    let mut from: BTreeMap<i64, String> = BTreeMap::new();
    for k in &taking {
        let (idx, taken) = (k.t.index as i64, k.taken);
        if taken == 0 {
            continue;
        }
        // The point's, or (stopped or paused before it) the longest point up to `taken`.
        let refs = if taken == k.point.epoch {
            Some(k.point.clone())
        } else {
            let mut shorter = None;
            for (i, key) in k.keys.iter().enumerate().take(taken as usize).rev() {
                if let Some(p) = lookup(&key.0)?.filter(|p| p.epoch as usize == i + 1) {
                    shorter = Some(p);
                    break;
                }
            }
            shorter
        };
        if let Some(p) = &refs {
            tx.prepare_cached(
                "UPDATE trials SET last_checkpoint = ?3, best_checkpoint = ?4, resume_checkpoint = ?5
                 WHERE sweep_id = ?1 AND idx = ?2",
            )?
            .execute(params![sweep_id, idx, p.last, p.best, p.resume])?;
            // The new sweep holds the point too: later sweeps may start from it after the sweep
            // that computed it is dropped.
            tx.prepare_cached(
                "INSERT OR REPLACE INTO stage_points(key, sweep_id, idx, epoch, last_checkpoint, best_checkpoint,
                                                    resume_checkpoint, attempt_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                k.keys[p.epoch as usize - 1].0,
                sweep_id,
                idx,
                p.epoch,
                p.last,
                p.best,
                p.resume,
                p.attempt
            ])?;
        }
        let state: String = tx
            .prepare_cached("SELECT state FROM trials WHERE sweep_id = ?1 AND idx = ?2")?
            .query_row(params![sweep_id, idx], |r| r.get(0))?;
        if state == TrialState::Pending.as_str() && taken == k.t.epochs() {
            tx.prepare_cached("UPDATE trials SET state = ?3, finished_at_ms = ?4 WHERE sweep_id = ?1 AND idx = ?2")?
                .execute(params![sweep_id, idx, TrialState::Completed.as_str(), now])?;
            trial_event(tx, sweep_id, idx, None, now)?;
            out.reused_trials += 1;
        } else if state == TrialState::Stopped.as_str() {
            // Stopped by the median rule here (ASHA's stops said so themselves, in `settle`).
            if !k.settled {
                trial_event(tx, sweep_id, idx, None, now)?;
            }
            out.reused_trials += 1;
        }
        out.reused_epochs += u64::from(taken);
        let seq: i64 =
            tx.prepare_cached("SELECT seq FROM sweeps WHERE id = ?1")?.query_row([&k.point.sweep_id], |r| r.get(0))?;
        from.insert(seq, k.point.sweep_id.clone());
    }
    out.reused_from = from.into_values().collect();
    Ok(out)
}

/// A stored epoch: its metrics, the attempt that computed it, and when it was recorded.
type SourceRow = (EpochMetrics, i64, i64);

/// Epochs `1..=epoch` of trial `idx` of sweep `sweep_id` as stored.
fn source_rows(tx: &Connection, sweep_id: &str, idx: i64, epoch: u32) -> Result<Vec<SourceRow>> {
    let mut q = tx.prepare_cached(
        "SELECT epoch, phase, train_loss, train_accuracy, val_loss, val_accuracy, seconds, attempt_id, recorded_at_ms
         FROM metrics WHERE sweep_id = ?1 AND idx = ?2 AND epoch BETWEEN 1 AND ?3 ORDER BY epoch",
    )?;
    let rows = q.query_map(params![sweep_id, idx, epoch], |r| {
        let phase: String = r.get(1)?;
        Ok((r.get::<_, u32>(0)?, phase, [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?], r.get(7)?, r.get(8)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (epoch, phase, v, attempt, at): (u32, String, [f64; 5], i64, i64) = row?;
        let phase = Phase::parse(&phase)
            .ok_or_else(|| StoreError::Corrupt(format!("epoch {epoch} of {sweep_id}/#{idx} has phase `{phase}`")))?;
        let m = EpochMetrics {
            epoch,
            phase,
            train_loss: v[0],
            train_accuracy: v[1],
            val_loss: v[2],
            val_accuracy: v[3],
            seconds: v[4],
        };
        out.push((m, attempt, at));
    }
    Ok(out)
}

/// A sweep's parsed spec (cached: stored specs never change).
fn sweep_spec(cache: &Specs, conn: &Connection, sweep_id: &str) -> Result<Arc<SweepSpec>> {
    if let Some(spec) = cache.borrow().get(sweep_id) {
        return Ok(spec.clone());
    }
    let yaml: String = conn
        .prepare_cached("SELECT spec_yaml FROM sweeps WHERE id = ?1")?
        .query_row([sweep_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no sweep {sweep_id}")))?;
    let spec = Arc::new(
        sweep_core::spec::parse_with(&yaml, ParseOptions::stored())
            .map_err(|e| StoreError::Corrupt(format!("the stored spec of sweep {sweep_id} does not parse: {e}")))?,
    );
    cache.borrow_mut().insert(sweep_id.to_string(), spec.clone());
    Ok(spec)
}

/// Stores the epoch attempt `a` just reported for every other trial that shares it and waits
/// at it (pending or unschedulable, with every epoch before it stored): its metric row, written
/// by `a`'s attempt; the attempt's checkpoint references (files of `a`'s trial, which no later
/// epoch overwrites: a shared epoch's weights are its own file); the early-stopping decision
/// for that trial; and its end when that was its last epoch (completed) or it is stopped.
/// Returns whether a trial was credited at the end of a stage (other branches may start now).
#[allow(clippy::too_many_arguments)]
fn credit(
    tx: &Connection,
    spec: &SweepSpec,
    tree: &StageTree,
    a: &CurrentAttempt,
    attempt_id: u64,
    metrics: &EpochMetrics,
    extras: &ReportExtras,
    now: i64,
) -> Result<bool> {
    let e = metrics.epoch;
    let Some(stage) = usize::try_from(a.idx).ok().and_then(|i| tree.stage_at(i, e)) else { return Ok(false) };
    let mut credited = false;
    for &u in &stage.trials {
        let u = u as i64;
        if u == a.idx {
            continue;
        }
        type Row = (String, String, u32, u32, i64, Option<String>);
        let (state, trial_id, fe_epochs, ft_epochs, stored, stop_reason): Row = tx
            .prepare_cached(
                "SELECT t.state, t.trial_id, t.fe_epochs, t.ft_epochs, t.stored, t.stop_reason
                 FROM trials t WHERE t.sweep_id = ?1 AND t.idx = ?2",
            )?
            .query_row(params![a.sweep_id, u], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
        let waits = state == TrialState::Pending.as_str() || state == TrialState::Unschedulable.as_str();
        if !waits || stored != i64::from(e) - 1 || stop_reason.is_some() {
            continue;
        }
        credited = true;
        store_epoch(tx, &a.sweep_id, u, attempt_id, metrics, extras, now)?;
        index_point(tx, spec, Some(tree), &a.sweep_id, u, e, attempt_id, extras)?;
        tx.prepare_cached(
            "UPDATE trials SET started_at_ms = COALESCE(started_at_ms, ?3) WHERE sweep_id = ?1 AND idx = ?2",
        )?
        .execute(params![a.sweep_id, u, now])?;
        let peer = CurrentAttempt {
            sweep_id: a.sweep_id.clone(),
            idx: u,
            trial_id,
            fe_epochs,
            ft_epochs,
            cancelled: a.cancelled,
            early_stopping: a.early_stopping.clone(),
            stop_reason: None,
            paused_at: None,
        };
        let decided = early_stop_decision(tx, &peer, metrics)?;
        let paused = if decided.is_none() { pause_at_rung(tx, &peer, e)? } else { None };
        let end = match &decided {
            Some(_) => Some(TrialState::Stopped),
            None if e == fe_epochs + ft_epochs => Some(TrialState::Completed),
            None => None,
        };
        if let Some(end) = end {
            tx.prepare_cached(
                "UPDATE trials SET state = ?3, stop_reason = ?4, error = COALESCE(?4, ''), finished_at_ms = ?5
                 WHERE sweep_id = ?1 AND idx = ?2",
            )?
            .execute(params![a.sweep_id, u, end.as_str(), decided, now])?;
        }
        let computed = format!("shared with {}", a.trial_id);
        let note = match decided.as_ref().or(paused.as_ref()) {
            Some(why) => format!("{computed}; {why}"),
            None => computed,
        };
        trial_event_noted(tx, &a.sweep_id, u, Some(*metrics), &note, now)?;
        if end.is_some() {
            // Its end, as an event of its own (as when an attempt ends).
            trial_event(tx, &a.sweep_id, u, None, now)?;
        }
    }
    Ok(credited && e == stage.last_epoch)
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
    type Row = (String, i64, i64, i64, i64, i64, i64, String, Option<String>, Option<u32>, Option<String>);
    let (
        sweep_id,
        idx,
        all_attempts,
        max_attempts,
        cancelled,
        started,
        retry_base,
        worker_id,
        stop_reason,
        paused_at,
        early_stopping,
    ): Row = tx
        .prepare_cached(
            "SELECT a.sweep_id, a.idx, t.attempts, s.max_attempts, s.cancelled, a.started_at_ms, t.retry_base, a.worker_id,
                    t.stop_reason, t.paused_at, s.early_stopping
         FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx JOIN sweeps s ON s.id = a.sweep_id
         WHERE a.id = ?1",
        )?
        .query_row([attempt_id as i64], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
            ))
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
    // An attempt stopped because its trial waits at a rung says so (not "stopped on request").
    let message = match paused_at {
        Some(at) if end == AttemptState::Cancelled && stop_reason.is_none() && cancelled == 0 => {
            format!("paused at epoch {at} (an ASHA rung)")
        }
        _ => message,
    };
    let message = message.as_str();
    tx.prepare_cached("UPDATE attempts SET state = ?2, ended_at_ms = ?3, error = ?4 WHERE id = ?1")?
        .execute(params![attempt_id as i64, end.as_str(), now, message])?;
    let wall = if wall_seconds > 0.0 { wall_seconds } else { (now - started).max(0) as f64 / 1000.0 };
    let (state, error) = match end {
        AttemptState::Succeeded => (TrialState::Completed, String::new()),
        // The sweep was cancelled: so is the trial, even one stopped early and still running.
        _ if cancelled != 0 => (TrialState::Cancelled, "sweep cancelled".to_string()),
        // Stopped early: however its attempt then ended (it stopped as told, failed, or its
        // worker was lost), its metrics so far are its result.
        _ if stop_reason.is_some() => (TrialState::Stopped, stop_reason.clone().unwrap_or_default()),
        // Paused at an ASHA rung: it waits there to be promoted or stopped, however its attempt
        // then ended — unless it failed for good.
        _ if paused_at.is_some() && !(end == AttemptState::Failed && permanent) => (TrialState::Paused, String::new()),
        AttemptState::Cancelled => (TrialState::Pending, String::new()),
        _ if permanent => (TrialState::Failed, message.to_string()),
        _ if attempts >= max_attempts => {
            (TrialState::Failed, format!("{message} (attempt {attempts} of {max_attempts}; no attempts left)"))
        }
        _ => (TrialState::Pending, message.to_string()),
    };
    let finished = state.is_terminal().then_some(now);
    // An attempt the coordinator stopped (to pause its trial at a rung, even if the trial was
    // promoted before the attempt ended) is no failure: it does not count against the budget.
    // The wall time of a trial is that of its attempts that ran to a pause or to its end. A
    // trial that fails for good keeps the rung it waited at (`sweep retry` puts it back there).
    let asked = end == AttemptState::Cancelled && matches!(state, TrialState::Pending | TrialState::Paused);
    tx.prepare_cached(
        "UPDATE trials SET state = ?3, current_attempt = NULL, error = ?4, finished_at_ms = ?5,
                wall_seconds = CASE WHEN ?7 THEN wall_seconds + ?6 ELSE wall_seconds END,
                retry_base = retry_base + ?8
         WHERE sweep_id = ?1 AND idx = ?2",
    )?
    .execute(params![
        sweep_id,
        idx,
        state.as_str(),
        error,
        finished,
        wall,
        matches!(state, TrialState::Completed | TrialState::Stopped | TrialState::Paused),
        i64::from(asked),
    ])?;
    trial_event(tx, &sweep_id, idx, None, now)?;
    // A trial that ended may close a rung that waited for it (ASHA).
    if state.is_terminal()
        && cancelled == 0
        && let Some(rule) = early_stopping.as_deref().map(|e| parse_rule(e, &sweep_id)).transpose()?
        && rule.pauses()
    {
        settle(tx, &sweep_id, &rule, now, None, 1)?;
    }
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
                    .execute(params![
                        worker_id,
                        WorkerState::Quarantined.as_str(),
                        note,
                        WorkerState::Active.as_str()
                    ])?;
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
                           WHERE m.sweep_id = ?1 AND a.sweep_id = m.sweep_id AND a.worker_id != ?2)",
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
        q.query_map([WorkerState::Active.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
    };
    let mut largest: Option<(String, usize)> = None;
    for (id, devices) in workers {
        let n = decode_devices(&devices, &id)?.len();
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
fn trial_event(conn: &Connection, sweep_id: &str, idx: i64, metrics: Option<EpochMetrics>, now: i64) -> Result<()> {
    trial_event_noted(conn, sweep_id, idx, metrics, "", now)
}

/// [`trial_event`] with a note for the event log.
fn trial_event_noted(
    conn: &Connection,
    sweep_id: &str,
    idx: i64,
    metrics: Option<EpochMetrics>,
    note: &str,
    now: i64,
) -> Result<()> {
    let Some(trial) = trial_summaries(conn, sweep_id, Some(idx))?.pop() else {
        return Err(StoreError::Corrupt(format!("trial {idx} of {sweep_id} vanished")));
    };
    append_event(conn, sweep_id, SweepEvent::Trial { trial, metrics, note: note.to_string() }, now)
}

/// Appends an event to the log, with its checksum.
fn append_event(conn: &Connection, sweep_id: &str, event: SweepEvent, now: i64) -> Result<()> {
    let payload = encode_event(&Event { sequence: 0, event });
    conn.prepare_cached("INSERT INTO events(sweep_id, payload, at_ms, checksum) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![sweep_id, payload, now, event_checksum(sweep_id, &payload)])?;
    Ok(())
}

/// The states of a trial that waits or runs: its sweep goes on.
const OPEN: [&str; 4] = [
    TrialState::Pending.as_str(),
    TrialState::Unschedulable.as_str(),
    TrialState::Running.as_str(),
    TrialState::Paused.as_str(),
];

/// How many trials of the sweep wait or run.
fn open_trials(conn: &Connection, sweep_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM trials WHERE state IN (?2, ?3, ?4, ?5) AND sweep_id = ?1")?
        .query_row(params![sweep_id, OPEN[0], OPEN[1], OPEN[2], OPEN[3]], |r| r.get(0))?)
}

/// When every trial of the sweep has ended, records the end time and an `ended` event.
fn finish_sweep_if_done(conn: &Connection, sweep_id: &str, now: i64) -> Result<()> {
    // Cheap test first (an index lookup): a sweep with a waiting or running trial goes on.
    let open: bool = conn
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM trials WHERE state IN (?2, ?3, ?4, ?5) AND sweep_id = ?1)")?
        .query_row(params![sweep_id, OPEN[0], OPEN[1], OPEN[2], OPEN[3]], |r| r.get(0))?;
    if open {
        return Ok(());
    }
    let summary = sweep_summary(conn, sweep_id)?;
    if !summary.state.is_terminal() || summary.finished_at_ms.is_some() {
        return Ok(());
    }
    conn.prepare_cached("UPDATE sweeps SET finished_at_ms = ?2 WHERE id = ?1")?.execute(params![sweep_id, now])?;
    let ended = SweepSummary { finished_at_ms: Some(now), ..summary };
    append_event(conn, sweep_id, SweepEvent::Ended(ended), now)
}

// ---------------------------------------------------------------------------------------------
// Stored blobs: the `sweep.v1` encoding of the records (this backend's file format)
// ---------------------------------------------------------------------------------------------

fn encode_devices(devices: &[Device]) -> Vec<u8> {
    v1::DeviceList { devices: devices.iter().map(v1::Device::from).collect() }.encode_to_vec()
}

fn decode_devices(blob: &[u8], worker_id: &str) -> Result<Vec<Device>> {
    let list =
        v1::DeviceList::decode(blob).map_err(|e| StoreError::Corrupt(format!("devices of worker {worker_id}: {e}")))?;
    list.devices
        .iter()
        .map(|d| Device::try_from(d).map_err(|e| StoreError::Corrupt(format!("devices of worker {worker_id}: {e}"))))
        .collect()
}

fn encode_checkpoint(c: &CheckpointRef) -> Vec<u8> {
    v1::CheckpointRef::from(c).encode_to_vec()
}

fn decode_checkpoint(blob: &[u8]) -> std::result::Result<CheckpointRef, String> {
    let c = v1::CheckpointRef::decode(blob).map_err(|e| e.to_string())?;
    CheckpointRef::try_from(&c).map_err(|e| e.to_string())
}

fn decode_lr_decay(blob: &[u8]) -> std::result::Result<LrDecay, String> {
    let d = v1::LrDecay::decode(blob).map_err(|e| e.to_string())?;
    LrDecay::try_from(&d)
}

fn encode_event(e: &Event) -> Vec<u8> {
    v1::SweepEvent::from(e).encode_to_vec()
}

fn decode_event(blob: &[u8]) -> std::result::Result<Event, String> {
    let e = v1::SweepEvent::decode(blob).map_err(|e| e.to_string())?;
    Event::try_from(&e)
}

// ---------------------------------------------------------------------------------------------
// The reads of `Store`, on any connection: the store's own, or a `ReadOnly` one (the dashboard).
// ---------------------------------------------------------------------------------------------

fn read_get_sweep(conn: &Connection, sweep_id: &str) -> Result<SweepStatus> {
    let sweep_id = &resolve_sweep(conn, sweep_id)?;
    let sweep = sweep_summary(conn, sweep_id)?;
    let spec_yaml: String = conn.query_row("SELECT spec_yaml FROM sweeps WHERE id = ?1", [sweep_id], |r| r.get(0))?;
    let trials = trial_summaries(conn, sweep_id, None)?;
    Ok(SweepStatus { sweep, trials, spec_yaml })
}

fn read_list_sweeps_page(conn: &Connection, page_size: usize, token: &str, tag: &str) -> Result<Page<SweepSummary>> {
    let before = parse_page_token(token, 's')?.unwrap_or(i64::MAX);
    let size = page_size.clamp(1, MAX_PAGE);
    if !tag.is_empty() {
        sweep_core::records::check_tag(tag).map_err(StoreError::Invalid)?;
    }
    let rows: Vec<(String, i64)> = {
        let mut q = conn.prepare(
            "SELECT id, seq FROM sweeps WHERE seq < ?1 AND (?3 = '' OR instr(tags, ',' || ?3 || ',') > 0)
             ORDER BY seq DESC LIMIT ?2",
        )?;
        q.query_map(params![before, size as i64 + 1, tag], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    let more = rows.len() > size;
    let rows = &rows[..rows.len().min(size)];
    let next = if more { rows.last().map(|(_, seq)| format!("s{seq}")).unwrap_or_default() } else { String::new() };
    let items = rows.iter().map(|(id, _)| sweep_summary(conn, id)).collect::<Result<_>>()?;
    Ok(Page { items, next })
}

fn read_leaderboard(conn: &Connection, sweep_id: &str, now: i64) -> Result<Leaderboard> {
    let sweep_id = &resolve_sweep(conn, sweep_id)?;
    let sweep = sweep_summary(conn, sweep_id)?;
    let trials = trial_summaries(conn, sweep_id, None)?;
    let metrics = all_metrics(conn, sweep_id)?;
    let mut extra: HashMap<u32, TrialExtras> = {
        let mut q = conn.prepare(&format!("SELECT idx, {TRIAL_EXTRAS} FROM trials WHERE sweep_id = ?1"))?;
        q.query_map([sweep_id], |r| Ok((r.get::<_, i64>(0)? as u32, trial_extras(r, 1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut rows: Vec<(leaderboard::Score, TrialSummary)> = trials
        .into_iter()
        .map(|t| {
            let m = metrics.get(&t.index).map(Vec::as_slice).unwrap_or(&[]);
            (leaderboard::score(t.fe_epochs, m), t)
        })
        .collect();
    fn ranked((score, t): &(leaderboard::Score, TrialSummary)) -> leaderboard::Ranked<'_> {
        leaderboard::Ranked { score, stopped: t.state == TrialState::Stopped, index: t.index as usize }
    }
    rows.sort_by(|a, b| leaderboard::rank(ranked(a), ranked(b)));
    let entries = rows
        .into_iter()
        .enumerate()
        .map(|(i, (score, trial))| {
            let x = extra.remove(&trial.index).unwrap_or_default();
            let mut wall_seconds = x.wall_seconds;
            if trial.state == TrialState::Running {
                // Still running: wall-clock so far.
                wall_seconds = (now - trial.started_at_ms.unwrap_or(now)).max(0) as f64 / 1000.0;
            }
            LeaderboardEntry {
                rank: i as u32 + 1,
                trial,
                score,
                parameters: x.parameters,
                wall_seconds,
                best_checkpoint: x.best_checkpoint,
                last_checkpoint: x.last_checkpoint,
                skipped_images: x.skipped_images,
            }
        })
        .collect();
    Ok(Leaderboard { sweep_id: sweep.id, sweep_state: sweep.state, entries })
}

fn read_trial(conn: &Connection, sweep_id: &str, trial_id: &str) -> Result<TrialDetail> {
    let sweep_id = &resolve_sweep(conn, sweep_id)?;
    let idx = grid::trial_index(trial_id)
        .ok_or_else(|| StoreError::Invalid(format!("`{trial_id}` is not a trial id (they look like t003)")))?;
    let trial = trial_summaries(conn, sweep_id, Some(idx as i64))?
        .pop()
        .ok_or_else(|| StoreError::NotFound(format!("sweep {sweep_id} has no trial {trial_id}")))?;
    let by_epoch: HashMap<u32, u64> = {
        let mut q = conn.prepare("SELECT epoch, attempt_id FROM metrics WHERE sweep_id = ?1 AND idx = ?2")?;
        q.query_map(params![sweep_id, idx as i64], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect::<rusqlite::Result<_>>()?
    };
    // The other trials whose row of the same epoch the same attempt wrote: one computation,
    // stored for each of them.
    let mut shared: HashMap<u32, Vec<String>> = HashMap::new();
    {
        let mut q = conn.prepare(
            "SELECT o.epoch, t.trial_id FROM metrics m
             JOIN metrics o ON o.sweep_id = m.sweep_id AND o.epoch = m.epoch AND o.attempt_id = m.attempt_id
                               AND o.idx != m.idx
             JOIN trials t ON t.sweep_id = o.sweep_id AND t.idx = o.idx
             WHERE m.sweep_id = ?1 AND m.idx = ?2 ORDER BY o.epoch, o.idx",
        )?;
        let rows = q.query_map(params![sweep_id, idx as i64], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (epoch, other) = row?;
            shared.entry(epoch).or_default().push(other);
        }
    }
    // Epochs another sweep computed: the trial of the attempt that wrote the row.
    let reused: HashMap<u32, String> = {
        let mut q = conn.prepare(
            "SELECT m.epoch, a.sweep_id, t.trial_id FROM metrics m
             JOIN attempts a ON a.id = m.attempt_id
             JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx
             WHERE m.sweep_id = ?1 AND m.idx = ?2 AND a.sweep_id != m.sweep_id",
        )?;
        q.query_map(params![sweep_id, idx as i64], |r| {
            Ok((r.get::<_, u32>(0)?, format!("{}/{}", r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
        })?
        .collect::<rusqlite::Result<_>>()?
    };
    let metrics = metrics_of(conn, sweep_id, Some(idx as i64))?
        .remove(&trial.index)
        .unwrap_or_default()
        .into_iter()
        .map(|m| EpochRecord {
            attempt_id: by_epoch.get(&m.epoch).copied().unwrap_or(0),
            shared_with: shared.remove(&m.epoch).unwrap_or_default(),
            reused_from: reused.get(&m.epoch).cloned().unwrap_or_default(),
            metrics: m,
        })
        .collect();
    let mut q = conn.prepare(
        "SELECT id, worker_id, state, started_at_ms, ended_at_ms, error, note, resumed_from_epoch
         FROM attempts WHERE sweep_id = ?1 AND idx = ?2 ORDER BY id",
    )?;
    let rows: Vec<(AttemptInfo, String)> = q
        .query_map(params![sweep_id, idx as i64], |r| {
            let info = AttemptInfo {
                attempt_id: r.get::<_, i64>(0)? as u64,
                worker_id: r.get(1)?,
                state: AttemptState::Running,
                started_at_ms: r.get(3)?,
                ended_at_ms: r.get(4)?,
                error: r.get(5)?,
                note: r.get(6)?,
                resumed_from_epoch: r.get(7)?,
            };
            Ok((info, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let attempts = rows
        .into_iter()
        .map(|(mut a, state)| {
            a.state = AttemptState::parse(&state).ok_or_else(|| {
                StoreError::Corrupt(format!("attempt {} of {sweep_id}/{trial_id}: state `{state}`", a.attempt_id))
            })?;
            Ok(a)
        })
        .collect::<Result<_>>()?;
    let x = conn.query_row(
        &format!("SELECT {TRIAL_EXTRAS} FROM trials WHERE sweep_id = ?1 AND idx = ?2"),
        params![sweep_id, idx as i64],
        |r| trial_extras(r, 0),
    )?;
    Ok(TrialDetail {
        trial,
        metrics,
        attempts,
        parameters: x.parameters,
        best_checkpoint: x.best_checkpoint,
        last_checkpoint: x.last_checkpoint,
        skipped_images: x.skipped_images,
    })
}

fn read_events_after(conn: &Connection, sweep_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    read_events(conn, sweep_id, "seq > ?2 ORDER BY seq", after, limit)
}

/// At most `limit` events of a sweep older than `before`, newest first.
fn read_events_before(conn: &Connection, sweep_id: &str, before: u64, limit: usize) -> Result<Vec<Event>> {
    let before = i64::try_from(before).unwrap_or(i64::MAX);
    read_events(conn, sweep_id, "seq < ?2 ORDER BY seq DESC", before, limit)
}

/// A sweep's events where `order` (a fixed condition on `seq` against `?2`, and an order)
/// says, each checked against its checksum.
fn read_events(conn: &Connection, sweep_id: &str, order: &'static str, seq: i64, limit: usize) -> Result<Vec<Event>> {
    let sweep_id = &resolve_sweep(conn, sweep_id)?;
    let mut q = conn.prepare_cached(&format!(
        "SELECT seq, payload, checksum FROM events WHERE sweep_id = ?1 AND {order} LIMIT ?3"
    ))?;
    let rows: Vec<(i64, Vec<u8>, Option<i64>)> = q
        .query_map(params![sweep_id, seq, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(seq, payload, checksum)| {
            if checksum != Some(event_checksum(sweep_id, &payload)) {
                return Err(StoreError::Corrupt(format!(
                    "event {seq} of sweep {sweep_id} does not match its checksum (damaged state database; \
                     `sweep check-state` lists what else is)"
                )));
            }
            let mut e = decode_event(&payload).map_err(|e| StoreError::Corrupt(format!("event {seq}: {e}")))?;
            e.sequence = seq as u64;
            Ok(e)
        })
        .collect()
}

fn read_last_sequence(conn: &Connection) -> Result<u64> {
    Ok(conn.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events")?.query_row([], |r| r.get::<_, i64>(0))? as u64)
}

fn read_workers_page(conn: &Connection, page_size: usize, token: &str) -> Result<Page<WorkerInfo>> {
    let after = parse_page_token(token, 'w')?.unwrap_or(0);
    let size = page_size.max(1);
    let mut q = conn.prepare(
        "SELECT id, name, incarnation, devices, state, registered_at_ms, last_seen_ms, note, rowid FROM workers
         WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
    )?;
    let mut last_row = 0i64;
    type Row = (String, String, i64, Vec<u8>, String, i64, i64, String, i64);
    // Blobs and states stay raw until the rows are read, so a bad one can be a StoreError.
    let rows: Vec<Row> = q
        .query_map(params![after, size.saturating_add(1).min(i64::MAX as usize) as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut more = rows.len() > size;
    let mut running = conn.prepare(
        "SELECT a.sweep_id, t.trial_id, a.id, a.devices FROM attempts a JOIN trials t ON t.sweep_id = a.sweep_id AND t.idx = a.idx
         WHERE a.worker_id = ?1 AND a.state = ?2 ORDER BY a.id",
    )?;
    let mut items = Vec::new();
    let mut bytes = 0usize;
    for (i, (worker_id, name, incarnation, devices, state, registered_at_ms, last_seen_ms, note, row)) in
        rows.into_iter().take(size).enumerate()
    {
        // A page also ends before it grows past MAX_PAGE_BYTES (a worker may announce a
        // thousand devices); it always holds at least one worker.
        if i > 0 && bytes + devices.len() + 1024 > MAX_PAGE_BYTES {
            more = true;
            break;
        }
        bytes += devices.len() + 1024;
        last_row = row;
        let devices = decode_devices(&devices, &worker_id)?;
        let state = WorkerState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("worker {worker_id}: state `{state}`")))?;
        let mut info = WorkerInfo {
            worker_id,
            name,
            incarnation: incarnation as u64,
            devices,
            state,
            registered_at_ms,
            last_seen_ms,
            running: Vec::new(),
            busy: Vec::new(),
            note,
        };
        let attempts: Vec<(String, String, i64, String)> = running
            .query_map(params![info.worker_id, AttemptState::Running.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (sweep_id, trial_id, attempt, devices) in attempts {
            for device in devices.split(',').filter(|d| !d.is_empty()) {
                info.busy.push(DeviceUse {
                    device: device.to_string(),
                    sweep_id: sweep_id.clone(),
                    trial_id: trial_id.clone(),
                    attempt_id: attempt as u64,
                });
            }
            info.running.push((sweep_id, trial_id));
        }
        items.push(info);
    }
    Ok(Page { items, next: if more { format!("w{last_row}") } else { String::new() } })
}

// ---------------------------------------------------------------------------------------------
// Reading without writing: the history checker, the lost-report check, backups
// ---------------------------------------------------------------------------------------------

impl StateReader for SqliteStore {
    fn history(&self) -> Result<history::Snapshot> {
        read_snapshot(&self.conn)
    }

    fn stored_metrics(&self) -> Result<StoredMetrics> {
        read_metrics(&self.conn)
    }
}

/// A state database opened read-only, without its lock: a coordinator may be serving it (each
/// read is one consistent snapshot), or it is what one left after a crash. Nothing is created,
/// upgraded or changed.
pub struct ReadOnly {
    conn: Connection,
}

impl ReadOnly {
    /// Opens the database file `path` (`<state dir>/sweep.db`); a missing file is an error, not
    /// an empty state.
    pub fn open(path: &Path) -> Result<ReadOnly> {
        if !path.is_file() {
            return Err(StoreError::Damaged(format!(
                "state database {}: no such file (not a state directory?)",
                path.display()
            )));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| open_error(path, e))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(|e| open_error(path, e))?;
        Ok(ReadOnly { conn })
    }

    // The reads the dashboard makes, as the store answers them, on this connection: they never
    // wait for (or hold up) the store's thread.

    /// Every sweep, newest first.
    pub fn list_sweeps(&self) -> Result<Vec<SweepSummary>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = read_list_sweeps_page(&self.conn, crate::store::MAX_PAGE, &token, "")?;
            all.extend(page.items);
            if page.next.is_empty() {
                return Ok(all);
            }
            token = page.next;
        }
    }

    pub fn get_sweep(&self, sweep_id: &str) -> Result<SweepStatus> {
        read_get_sweep(&self.conn, sweep_id)
    }

    /// The leaderboard; running trials' wall time counts up to `now`.
    pub fn leaderboard(&self, sweep_id: &str, now: i64) -> Result<Leaderboard> {
        read_leaderboard(&self.conn, sweep_id, now)
    }

    pub fn trial(&self, sweep_id: &str, trial_id: &str) -> Result<TrialDetail> {
        read_trial(&self.conn, sweep_id, trial_id)
    }

    pub fn events_after(&self, sweep_id: &str, after: u64, limit: usize) -> Result<Vec<Event>> {
        read_events_after(&self.conn, sweep_id, after, limit)
    }

    /// At most `limit` events of a sweep older than `before`, newest first.
    pub fn events_before(&self, sweep_id: &str, before: u64, limit: usize) -> Result<Vec<Event>> {
        read_events_before(&self.conn, sweep_id, before, limit)
    }

    pub fn last_sequence(&self) -> Result<u64> {
        read_last_sequence(&self.conn)
    }

    /// Every worker.
    pub fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = read_workers_page(&self.conn, crate::store::MAX_PAGE, &token)?;
            all.extend(page.items);
            if page.next.is_empty() {
                return Ok(all);
            }
            token = page.next;
        }
    }
}

impl StateReader for ReadOnly {
    fn history(&self) -> Result<history::Snapshot> {
        read_snapshot(&self.conn)
    }

    fn stored_metrics(&self) -> Result<StoredMetrics> {
        read_metrics(&self.conn)
    }
}

/// Runs `f` in one read transaction (one consistent snapshot, even while another connection
/// writes).
fn in_read_transaction<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("BEGIN")?;
    let result = f(conn);
    let ended = conn.execute_batch("COMMIT");
    let value = result?;
    ended?;
    Ok(value)
}

fn read_metrics(conn: &Connection) -> Result<StoredMetrics> {
    in_read_transaction(conn, |conn| {
        let mut q = conn.prepare(
            "SELECT m.sweep_id, t.trial_id, m.epoch, m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, m.seconds
             FROM metrics m JOIN trials t ON t.sweep_id = m.sweep_id AND t.idx = m.idx",
        )?;
        let rows = q.query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, u32>(2)?),
                [r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?],
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    })
}

/// Everything stored, for the history checker; reads every schema version this build knows
/// (an old state is checked as it is, not upgraded).
fn read_snapshot(conn: &Connection) -> Result<history::Snapshot> {
    in_read_transaction(conn, read_snapshot_now)
}

fn read_snapshot_now(conn: &Connection) -> Result<history::Snapshot> {
    use history::{AttemptRow, MetricRow, Snapshot, TrialRow};
    let version: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
        .optional()
        .map_err(|e| StoreError::Corrupt(format!("not a coordinator state database: {e}")))?;
    let version = version.ok_or_else(|| StoreError::Corrupt("no schema version".into()))?;
    let sweeps: i64 = conn.query_row("SELECT COUNT(*) FROM sweeps", [], |r| r.get(0))?;
    // Checkpoint references exist from schema version 2 on, resume points from 5 on.
    let (best, last, resume) = match version {
        v if v >= 5 => ("best_checkpoint", "last_checkpoint", "resume_checkpoint"),
        v if v >= 2 => ("best_checkpoint", "last_checkpoint", "NULL"),
        _ => ("NULL", "NULL", "NULL"),
    };
    let trials = {
        let mut q = conn.prepare(&format!(
            "SELECT sweep_id, idx, trial_id, fe_epochs, ft_epochs, state, current_attempt, backbone, lr_decay,
                    {best}, {last}, {resume}
             FROM trials ORDER BY sweep_id, idx"
        ))?;
        q.query_map([], |r| {
            let mut checkpoints = Vec::new();
            for (i, kind) in [(9, CheckpointKind::Best), (10, CheckpointKind::Last), (11, CheckpointKind::Resume)] {
                if let Some(blob) = r.get::<_, Option<Vec<u8>>>(i)? {
                    checkpoints.push((kind, decode_checkpoint(&blob)));
                }
            }
            let lr_decay: Vec<u8> = r.get(8)?;
            Ok((
                (r.get(0)?, r.get(1)?),
                TrialRow {
                    trial_id: r.get(2)?,
                    fe_epochs: r.get(3)?,
                    ft_epochs: r.get(4)?,
                    state: r.get(5)?,
                    current_attempt: r.get(6)?,
                    backbone: r.get(7)?,
                    lr_decay: decode_lr_decay(&lr_decay),
                    checkpoints,
                },
            ))
        })?
        .collect::<rusqlite::Result<BTreeMap<_, _>>>()?
    };
    let specs = {
        let mut q = conn.prepare("SELECT id, spec_yaml FROM sweeps")?;
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<BTreeMap<_, _>>>()?
    };
    // Sweeps that run shared epochs once exist from schema version 9 on.
    let sharing: BTreeSet<String> = if version >= 9 {
        let mut q = conn.prepare("SELECT id FROM sweeps WHERE sharing != 0")?;
        q.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
    } else {
        BTreeSet::new()
    };
    // Devices per attempt exist from schema version 3 on.
    let devices = if version >= 3 { "devices" } else { "''" };
    let attempts = {
        let mut q = conn.prepare(&format!(
            "SELECT id, sweep_id, idx, worker_id, state, started_at_ms, ended_at_ms, {devices} FROM attempts ORDER BY id"
        ))?;
        q.query_map([], |r| {
            let devices: String = r.get(7)?;
            Ok(AttemptRow {
                id: r.get(0)?,
                trial: (r.get(1)?, r.get(2)?),
                worker_id: r.get(3)?,
                state: r.get(4)?,
                started_at_ms: r.get(5)?,
                ended_at_ms: r.get(6)?,
                devices: devices.split(',').filter(|d| !d.is_empty()).map(str::to_string).collect(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    let metrics = {
        let mut q = conn.prepare(
            "SELECT sweep_id, idx, epoch, phase, attempt_id, recorded_at_ms,
                    train_loss, train_accuracy, val_loss, val_accuracy, seconds
             FROM metrics ORDER BY sweep_id, idx, epoch",
        )?;
        q.query_map([], |r| {
            Ok(MetricRow {
                trial: (r.get(0)?, r.get(1)?),
                epoch: r.get(2)?,
                phase: r.get(3)?,
                attempt_id: r.get(4)?,
                recorded_at_ms: r.get(5)?,
                values: [r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?],
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    // Events carry a checksum from schema version 7 on.
    let checksum = if version >= 7 { "checksum" } else { "NULL" };
    let events = {
        let mut q = conn.prepare(&format!("SELECT seq, sweep_id, payload, {checksum} FROM events ORDER BY seq"))?;
        q.query_map([], |r| {
            let (seq, sweep): (i64, String) = (r.get(0)?, r.get(1)?);
            let payload: Vec<u8> = r.get(2)?;
            let stored: Option<i64> = r.get(3)?;
            let decoded = match stored {
                Some(sum) if sum != event_checksum(&sweep, &payload) => {
                    Err("its bytes do not match the checksum stored with it (damaged)".to_string())
                }
                None if version >= 7 => Err("it has no checksum".to_string()),
                _ => decode_event(&payload).map_err(|e| format!("cannot be decoded: {e}")),
            };
            Ok((seq, sweep, decoded))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    let workers = {
        let mut q = conn.prepare("SELECT id, devices FROM workers")?;
        let rows: Vec<(String, Vec<u8>)> =
            q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        rows.into_iter()
            .map(|(id, blob)| {
                let devices = decode_devices(&blob, &id).ok().map(|l| l.into_iter().map(|d| d.id).collect());
                (id, devices)
            })
            .collect()
    };
    Ok(Snapshot { sweeps: sweeps as usize, trials, attempts, metrics, events, specs, sharing, workers })
}

/// A path as the path of a `file:` URI: every byte but unreserved ones and `/` percent-encoded.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str()
        .as_bytes()
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Writes a consistent copy of a state directory's database to `out` (a new file) while a
/// coordinator may be writing to it: SQLite's `VACUUM INTO` reads one snapshot, the write-ahead
/// log included, through a read-only connection. The copy is written under a temporary name,
/// checked with `check` (which must accept it), then linked to `out`; returns what `check` said.
pub fn backup<T>(dir: &Path, out: &Path, check: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let path = dir.join(DB_FILE);
    if out.exists() {
        return Err(StoreError::Damaged(format!("{} already exists; a backup never overwrites a file", out.display())));
    }
    // A name of this process's own beside the target (never someone else's file).
    let mut partial = out.as_os_str().to_owned();
    partial.push(format!(".partial-{}-{}", std::process::id(), now_ms()));
    let partial = PathBuf::from(partial);
    if !path.is_file() {
        return Err(StoreError::Damaged(format!("{} does not exist (not a state directory?)", path.display())));
    }
    // With no write-ahead log to read (no coordinator on it, or one that stopped cleanly), the
    // file is opened immutable: SQLite then creates no `-wal`/`-shm` files beside it, so a
    // directory the reader may not (or should not) write is read as it is.
    let wal = dir.join(format!("{DB_FILE}-wal"));
    let quiet = std::fs::metadata(&wal).map(|m| m.len() == 0).unwrap_or(true);
    let conn = if quiet {
        let uri = format!("file:{}?immutable=1", uri_path(&std::path::absolute(&path).unwrap_or(path.clone())));
        Connection::open_with_flags(
            &uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
    } else {
        Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
    }
    .map_err(|e| open_error(&path, e))?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(|e| open_error(&path, e))?;
    let target = partial
        .to_str()
        .ok_or_else(|| StoreError::Damaged(format!("{}: the backup's path must be valid UTF-8", out.display())))?;
    let copied = conn.execute("VACUUM INTO ?1", [target]).map(|_| ()).map_err(StoreError::from).and_then(|()| {
        std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(|e| StoreError::Backend {
            what: format!("cannot sync the backup {}", partial.display()),
            source: Box::new(e),
        })
    });
    match copied.and_then(|()| check(&partial)) {
        Ok(report) => {
            // A hard link never replaces a file that appeared meanwhile (a rename would).
            let linked = std::fs::hard_link(&partial, out);
            let _ = std::fs::remove_file(&partial);
            linked.map_err(|e| StoreError::Damaged(format!("cannot write the backup {}: {e}", out.display())))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}
