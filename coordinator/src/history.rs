//! The history checker: reads a coordinator's state database (read-only, so it can look at the
//! state of a running coordinator, or at what one left after a crash) and checks the invariants
//! its history must keep. `sweep check-state` prints what it finds; the end-to-end tests run it
//! on every state directory they leave.
//!
//! The rules, each a [`Violation::rule`]:
//! * `completed-twice`: a trial completes at most once: at most one succeeded attempt, one
//!   move into `completed` in the event log, and a completed trial has exactly that attempt.
//! * `metrics-writer`: every metric row was written by an attempt of its own trial while that
//!   attempt ran (its `recorded_at_ms` lies within the attempt's start and end; with at most one
//!   attempt of a trial running at any time, that attempt was the current one).
//! * `epochs`: the epochs of a trial are `1..=n` with no gap, within the trial's total, each in
//!   its phase.
//! * `completed-epochs`: a completed trial has metrics for all its epochs.
//! * `running-attempts`: at most one running attempt per trial, now and at any time (attempt
//!   intervals do not overlap); a running trial's current attempt is that running attempt, and
//!   an attempt that is not running has ended.
//! * `device-overlap`: the attempts of one worker never hold the same device at the same time,
//!   and hold only devices the worker announced.
//! * `events`: every event decodes and matches the checksum stored with it (a flipped byte in
//!   a stored blob is seen, not served).
//! * `checkpoints`: every checkpoint reference a trial holds (best, last, resume point) decodes,
//!   holds an epoch the trial has metrics for, carries a SHA-256, and names the trial's own
//!   file (`…/<sweep>/<trial>/<file>`): a resume point of another sweep is seen.
//! * `grid`: every trial row is the grid cell its sweep's spec gives that index (backbone,
//!   strategy, epoch split), and a sweep has as many trials as its grid.
//! * `metric-values`: every stored metric is finite and within what a report may carry.
//!
//! Times are the coordinator's wall clock in milliseconds: a clock stepped backwards while it
//! ran can show up as an overlap.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use prost::Message;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use sweep_core::leaderboard::Phase;
use sweep_proto::v1;

use crate::store::StoreError;

pub use crate::store::DB_FILE;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `completed-twice`, `metrics-writer`, `epochs`, `completed-epochs`, `running-attempts`,
    /// `device-overlap`, or `events` (an event the checker cannot read).
    pub rule: &'static str,
    /// What it is about: `<sweep>/<trial>`, `worker <id>`, or `event <seq>`.
    pub subject: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.rule, self.subject, self.message)
    }
}

/// What a check read and what it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub sweeps: usize,
    pub trials: usize,
    pub attempts: usize,
    pub metrics: usize,
    pub events: usize,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violation{} in {} sweeps, {} trials, {} attempts, {} metric rows, {} events",
            self.violations.len(),
            if self.violations.len() == 1 { "" } else { "s" },
            self.sweeps,
            self.trials,
            self.attempts,
            self.metrics,
            self.events
        )?;
        for v in &self.violations {
            write!(f, "\n  {v}")?;
        }
        Ok(())
    }
}

/// Checks the state database of a state directory (`<dir>/sweep.db`), read-only.
pub fn check_state_dir(dir: &Path) -> Result<Report, StoreError> {
    check_db(&dir.join(DB_FILE))
}

/// Checks a state database file, read-only: nothing is created or changed, and a coordinator may
/// be running on it (the check reads one consistent snapshot).
pub fn check_db(path: &Path) -> Result<Report, StoreError> {
    let open_err = |source| StoreError::Open { path: path.to_path_buf(), source };
    if !path.is_file() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (not a state directory?)");
        return Err(open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(missing))));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(open_err)?;
    check(&conn)
}

/// Writes a consistent copy of a state directory's database to `out` (a new file) while a
/// coordinator may be writing to it: SQLite's `VACUUM INTO` reads one snapshot, the write-ahead
/// log included, through a read-only connection. The copy is written under a temporary name,
/// checked with [`check_db`], then renamed to `out`; returns the copy's report.
pub fn backup(dir: &Path, out: &Path) -> Result<Report, StoreError> {
    let path = dir.join(DB_FILE);
    if out.exists() {
        return Err(StoreError::Damaged(format!("{} already exists; a backup never overwrites a file", out.display())));
    }
    // A name of this process's own beside the target (never someone else's file).
    let mut partial = out.as_os_str().to_owned();
    partial.push(format!(".partial-{}-{}", std::process::id(), crate::store::now_ms()));
    let partial = std::path::PathBuf::from(partial);
    let open_err = |source| StoreError::Open { path: path.clone(), source };
    if !path.is_file() {
        return Err(StoreError::Damaged(format!("{} does not exist (not a state directory?)", path.display())));
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(open_err)?;
    let target = partial
        .to_str()
        .ok_or_else(|| StoreError::Damaged(format!("{}: the backup's path must be valid UTF-8", out.display())))?;
    let copied = conn.execute("VACUUM INTO ?1", [target]).map(|_| ()).and_then(|()| {
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    });
    let checked = copied.map_err(StoreError::from).and_then(|()| check_db(&partial));
    match checked {
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

/// Checks the state on an open connection, in one read transaction.
pub fn check(conn: &Connection) -> Result<Report, StoreError> {
    conn.execute_batch("BEGIN")?;
    let result = read(conn).map(|state| state.check());
    conn.execute_batch("COMMIT")?;
    result
}

/// `(sweep, trial id, epoch)` → train loss, train accuracy, validation loss, validation accuracy,
/// seconds.
pub type StoredMetrics = HashMap<(String, String, u32), [f64; 5]>;

/// Every stored metric of a state database, read-only: `(sweep, trial id, epoch)` → train loss,
/// train accuracy, validation loss, validation accuracy, seconds (the simulator's check that no
/// acknowledged report was lost).
pub fn stored_metrics(db: &Path) -> Result<StoredMetrics, StoreError> {
    let open_err = |source| StoreError::Open { path: db.to_path_buf(), source };
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(open_err)?;
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
}

// ---------------------------------------------------------------------------------------------
// What is read
// ---------------------------------------------------------------------------------------------

type TrialKey = (String, i64);

struct Trial {
    trial_id: String,
    fe_epochs: u32,
    ft_epochs: u32,
    state: String,
    current_attempt: Option<i64>,
    backbone: String,
    lr_decay: Vec<u8>,
    /// `(column, blob)` of each checkpoint reference held.
    checkpoints: Vec<(&'static str, Vec<u8>)>,
}

struct Attempt {
    id: i64,
    trial: TrialKey,
    worker_id: String,
    state: String,
    started_at_ms: i64,
    ended_at_ms: Option<i64>,
    devices: Vec<String>,
}

struct Metric {
    trial: TrialKey,
    epoch: i64,
    phase: String,
    attempt_id: i64,
    recorded_at_ms: i64,
    /// train loss, train accuracy, validation loss, validation accuracy, seconds.
    values: [f64; 5],
}

struct State {
    sweeps: usize,
    trials: BTreeMap<TrialKey, Trial>,
    attempts: Vec<Attempt>,
    metrics: Vec<Metric>,
    /// `(seq, sweep, decoded event or why not)`.
    events: Vec<(i64, String, Result<v1::SweepEvent, String>)>,
    /// Each sweep's spec.
    specs: BTreeMap<String, String>,
    /// Announced devices per worker.
    workers: HashMap<String, Option<HashSet<String>>>,
}

fn read(conn: &Connection) -> Result<State, StoreError> {
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
            for (i, column) in [(9, "best_checkpoint"), (10, "last_checkpoint"), (11, "resume_checkpoint")] {
                if let Some(blob) = r.get::<_, Option<Vec<u8>>>(i)? {
                    checkpoints.push((column, blob));
                }
            }
            Ok((
                (r.get(0)?, r.get(1)?),
                Trial {
                    trial_id: r.get(2)?,
                    fe_epochs: r.get(3)?,
                    ft_epochs: r.get(4)?,
                    state: r.get(5)?,
                    current_attempt: r.get(6)?,
                    backbone: r.get(7)?,
                    lr_decay: r.get(8)?,
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
    // Devices per attempt exist from schema version 3 on.
    let devices = if version >= 3 { "devices" } else { "''" };
    let attempts = {
        let mut q = conn.prepare(&format!(
            "SELECT id, sweep_id, idx, worker_id, state, started_at_ms, ended_at_ms, {devices} FROM attempts ORDER BY id"
        ))?;
        q.query_map([], |r| {
            let devices: String = r.get(7)?;
            Ok(Attempt {
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
            Ok(Metric {
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
                Some(sum) if sum != crate::store::event_checksum(&sweep, &payload) => {
                    Err("its bytes do not match the checksum stored with it (damaged)".to_string())
                }
                None if version >= 7 => Err("it has no checksum".to_string()),
                _ => v1::SweepEvent::decode(payload.as_slice()).map_err(|e| format!("cannot be decoded: {e}")),
            };
            Ok((seq, sweep, decoded))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    let workers = {
        let mut q = conn.prepare("SELECT id, devices FROM workers")?;
        q.query_map([], |r| {
            let blob: Vec<u8> = r.get(1)?;
            let devices =
                v1::DeviceList::decode(blob.as_slice()).ok().map(|l| l.devices.into_iter().map(|d| d.id).collect());
            Ok((r.get(0)?, devices))
        })?
        .collect::<rusqlite::Result<HashMap<_, _>>>()?
    };
    Ok(State { sweeps: sweeps as usize, trials, attempts, metrics, events, specs, workers })
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// An attempt's interval `[start, end)`; a running attempt has not ended.
fn end_of(a: &Attempt) -> i64 {
    a.ended_at_ms.unwrap_or(i64::MAX)
}

fn span(a: &Attempt) -> String {
    match a.ended_at_ms {
        Some(end) => format!("{}..{end}", a.started_at_ms),
        None => format!("{}..(running)", a.started_at_ms),
    }
}

impl State {
    fn check(self) -> Report {
        let mut out = Vec::new();
        let subject = |key: &TrialKey| -> String {
            match self.trials.get(key) {
                Some(t) => format!("{}/{}", key.0, t.trial_id),
                None => format!("{}/#{}", key.0, key.1),
            }
        };
        let mut violation = |rule: &'static str, subject: String, message: String| {
            out.push(Violation { rule, subject, message });
        };
        let mut by_trial: BTreeMap<&TrialKey, Vec<&Attempt>> = BTreeMap::new();
        for a in &self.attempts {
            by_trial.entry(&a.trial).or_default().push(a);
        }
        let attempts: HashMap<i64, &Attempt> = self.attempts.iter().map(|a| (a.id, a)).collect();

        // completed-twice, running-attempts: per trial, from the attempts.
        for (key, t) in &self.trials {
            let list = by_trial.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let succeeded: Vec<i64> = list.iter().filter(|a| a.state == "succeeded").map(|a| a.id).collect();
            if succeeded.len() > 1 {
                violation("completed-twice", subject(key), format!("attempts {succeeded:?} all succeeded"));
            }
            if t.state == "completed" && succeeded.is_empty() {
                violation("completed-twice", subject(key), "completed, but none of its attempts succeeded".into());
            }
            if t.state != "completed" && !succeeded.is_empty() {
                violation(
                    "completed-twice",
                    subject(key),
                    format!("attempt {} succeeded, but the trial is {}", succeeded[0], t.state),
                );
            }
            let running: Vec<i64> = list.iter().filter(|a| a.state == "running").map(|a| a.id).collect();
            if running.len() > 1 {
                violation("running-attempts", subject(key), format!("attempts {running:?} are all running"));
            }
            match (t.state.as_str(), running.as_slice(), t.current_attempt) {
                ("running", [only], Some(current)) if *only == current => {}
                (state, [], None) if state != "running" => {}
                (state, _, current) => violation(
                    "running-attempts",
                    subject(key),
                    format!("{state} with current attempt {current:?} and running attempts {running:?}"),
                ),
            }
            // Attempts follow each other: each starts once the one before has ended.
            for pair in list.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                if b.started_at_ms < end_of(a) {
                    violation(
                        "running-attempts",
                        subject(key),
                        format!("attempts {} ({}) and {} ({}) ran at the same time", a.id, span(a), b.id, span(b)),
                    );
                }
            }
        }
        for a in &self.attempts {
            if (a.state == "running") != a.ended_at_ms.is_none() {
                violation(
                    "running-attempts",
                    subject(&a.trial),
                    format!("attempt {} is {} with end time {:?}", a.id, a.state, a.ended_at_ms),
                );
            }
        }

        // completed-twice, from the event log: moves into `completed` per trial.
        let mut last_state: HashMap<(String, String), String> = HashMap::new();
        let mut completions: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        for (seq, sweep, event) in &self.events {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    violation("events", format!("event {seq} of {sweep}"), e.clone());
                    continue;
                }
            };
            let Some(v1::sweep_event::Event::Trial(v1::TrialEvent { trial: Some(t), .. })) = &event.event else {
                continue;
            };
            let key = (sweep.clone(), t.trial_id.clone());
            let before = last_state.insert(key.clone(), t.state.clone());
            if t.state == "completed" && before.as_deref() != Some("completed") {
                completions.entry(key).or_default().push(*seq);
            }
        }
        for ((sweep, trial), seqs) in completions {
            if seqs.len() > 1 {
                violation(
                    "completed-twice",
                    format!("{sweep}/{trial}"),
                    format!("the event log has it completing {} times (events {seqs:?})", seqs.len()),
                );
            }
        }

        // metrics-writer, epochs, completed-epochs.
        let mut epochs: BTreeMap<&TrialKey, Vec<&Metric>> = BTreeMap::new();
        for m in &self.metrics {
            epochs.entry(&m.trial).or_default().push(m);
            // metric-values: what a report may carry (a state written before reports were
            // checked may hold infinite or absurd values).
            let names = ["train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"];
            let limits = [sweep_proto::MAX_LOSS, 1.0, sweep_proto::MAX_LOSS, 1.0, sweep_proto::MAX_EPOCH_SECONDS];
            for ((name, v), max) in names.iter().zip(m.values).zip(limits) {
                if !v.is_finite() || !(0.0..=max).contains(&v) {
                    violation(
                        "metric-values",
                        subject(&m.trial),
                        format!(
                            "epoch {} has {name} {}, outside 0 to {max:e}",
                            m.epoch,
                            if v.is_finite() && v.abs() >= 1e6 { format!("{v:e}") } else { v.to_string() }
                        ),
                    );
                }
            }
            let at = format!("epoch {} (recorded at {})", m.epoch, m.recorded_at_ms);
            match attempts.get(&m.attempt_id) {
                None => violation(
                    "metrics-writer",
                    subject(&m.trial),
                    format!("{at} was written by attempt {}, which does not exist", m.attempt_id),
                ),
                Some(a) if a.trial != m.trial => violation(
                    "metrics-writer",
                    subject(&m.trial),
                    format!("{at} was written by attempt {}, an attempt of {}", a.id, subject(&a.trial)),
                ),
                Some(a) if m.recorded_at_ms < a.started_at_ms || m.recorded_at_ms > end_of(a) => violation(
                    "metrics-writer",
                    subject(&m.trial),
                    format!("{at} was written by attempt {} outside its running time {}", a.id, span(a)),
                ),
                Some(_) => {}
            }
        }
        for (key, t) in &self.trials {
            let total = i64::from(t.fe_epochs + t.ft_epochs);
            let rows = epochs.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let have: Vec<i64> = rows.iter().map(|m| m.epoch).collect();
            let contiguous = have.iter().enumerate().all(|(i, e)| *e == i as i64 + 1);
            if !contiguous {
                violation("epochs", subject(key), format!("epochs {have:?} are not 1, 2, … without a gap"));
            }
            if let Some(&past) = have.iter().find(|e| **e > total || **e < 1) {
                violation("epochs", subject(key), format!("epoch {past} is outside the trial's {total} epochs"));
            }
            for m in rows {
                let want = if m.epoch >= 1 && m.epoch <= total {
                    Some(Phase::of_epoch(m.epoch as u32, t.fe_epochs).as_str())
                } else {
                    None
                };
                if want.is_some_and(|w| w != m.phase) {
                    violation(
                        "epochs",
                        subject(key),
                        format!("epoch {} is stored as {}, but it is {}", m.epoch, m.phase, want.unwrap_or("")),
                    );
                }
            }
            if t.state == "completed" && (have.len() as i64 != total || !contiguous) {
                violation(
                    "completed-epochs",
                    subject(key),
                    format!("completed with metrics for epochs {have:?} of its {total}"),
                );
            }
        }

        // checkpoints: each reference is the trial's own, of an epoch it has metrics for.
        for (key, t) in &self.trials {
            let stored = epochs.get(key).map_or(0, |rows| rows.len() as u32);
            for (column, blob) in &t.checkpoints {
                let c = match v1::CheckpointRef::decode(blob.as_slice()) {
                    Ok(c) => c,
                    Err(e) => {
                        violation("checkpoints", subject(key), format!("{column} cannot be decoded: {e}"));
                        continue;
                    }
                };
                let file = match *column {
                    "best_checkpoint" => "best.safetensors".to_string(),
                    "last_checkpoint" => "last.safetensors".to_string(),
                    _ => format!("state-e{:04}.safetensors", c.epoch),
                };
                if let Err(why) = crate::store::check_checkpoint_ref(&c, &key.0, &t.trial_id, &file) {
                    violation("checkpoints", subject(key), format!("{column}: {why}"));
                }
                if c.epoch == 0 || c.epoch > stored {
                    violation(
                        "checkpoints",
                        subject(key),
                        format!("{column} holds epoch {}, but the trial has metrics for {stored} epochs", c.epoch),
                    );
                }
            }
        }

        // grid: the trial rows are the grid of the sweep's spec.
        let mut per_sweep: BTreeMap<&str, usize> = BTreeMap::new();
        for key in self.trials.keys() {
            *per_sweep.entry(key.0.as_str()).or_default() += 1;
        }
        for (sweep, yaml) in &self.specs {
            let parsed = match sweep_core::spec::parse_with(yaml, sweep_core::spec::ParseOptions::stored()) {
                Ok(p) => p,
                Err(e) => {
                    violation("grid", format!("sweep {sweep}"), format!("its stored spec does not parse: {e}"));
                    continue;
                }
            };
            let cells = sweep_core::grid::expand(&parsed.grid);
            let have = per_sweep.get(sweep.as_str()).copied().unwrap_or(0);
            if have != cells.len() {
                violation("grid", format!("sweep {sweep}"), format!("{have} trial rows for a grid of {}", cells.len()));
            }
            for cell in cells {
                let key = (sweep.clone(), cell.index as i64);
                let Some(t) = self.trials.get(&key) else { continue };
                let decay = v1::LrDecay::decode(t.lr_decay.as_slice()).ok();
                let want = (cell.id.as_str(), cell.backbone.name(), cell.fe_epochs, cell.ft_epochs);
                let got = (t.trial_id.as_str(), t.backbone.as_str(), t.fe_epochs, t.ft_epochs);
                if want != got || decay != Some(v1::LrDecay::from(&cell.lr_decay)) {
                    violation(
                        "grid",
                        subject(&key),
                        format!(
                            "row {} {} {} {}+{} is not the spec's cell {} {} {} {}+{}",
                            got.0,
                            got.1,
                            decay.map(|d| d.label()).unwrap_or_else(|| "(undecodable strategy)".into()),
                            got.2,
                            got.3,
                            want.0,
                            want.1,
                            cell.lr_decay,
                            want.2,
                            want.3
                        ),
                    );
                }
            }
        }

        // device-overlap: per worker and device, the intervals of the attempts holding it.
        let mut holders: BTreeMap<(&str, &str), Vec<&Attempt>> = BTreeMap::new();
        for a in &self.attempts {
            let mut seen = HashSet::new();
            for d in &a.devices {
                if !seen.insert(d.as_str()) {
                    violation(
                        "device-overlap",
                        format!("worker {}", a.worker_id),
                        format!("attempt {} holds {d} twice", a.id),
                    );
                    continue;
                }
                if let Some(Some(announced)) = self.workers.get(&a.worker_id)
                    && !announced.contains(d)
                {
                    violation(
                        "device-overlap",
                        format!("worker {}", a.worker_id),
                        format!("attempt {} holds {d}, which the worker never announced", a.id),
                    );
                }
                holders.entry((a.worker_id.as_str(), d.as_str())).or_default().push(a);
            }
        }
        for ((worker, device), mut list) in holders {
            list.sort_by_key(|a| (a.started_at_ms, a.id));
            let mut latest: Option<&Attempt> = None;
            for a in list {
                if let Some(prev) = latest
                    && a.started_at_ms < end_of(prev)
                {
                    violation(
                        "device-overlap",
                        format!("worker {worker}"),
                        format!(
                            "attempts {} ({}) and {} ({}) held {device} at the same time",
                            prev.id,
                            span(prev),
                            a.id,
                            span(a)
                        ),
                    );
                }
                if latest.is_none_or(|p| end_of(a) > end_of(p)) {
                    latest = Some(a);
                }
            }
        }

        Report {
            sweeps: self.sweeps,
            trials: self.trials.len(),
            attempts: self.attempts.len(),
            metrics: self.metrics.len(),
            events: self.events.len(),
            violations: out,
        }
    }
}
