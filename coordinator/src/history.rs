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

/// The name of the state database inside a state directory.
pub const DB_FILE: &str = "sweep.db";

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

/// Checks the state on an open connection, in one read transaction.
pub fn check(conn: &Connection) -> Result<Report, StoreError> {
    conn.execute_batch("BEGIN")?;
    let result = read(conn).map(|state| state.check());
    conn.execute_batch("COMMIT")?;
    result
}

/// `sweep check-state`: prints the report (a table of violations, or JSON) and exits 0 when the
/// history is clean, 1 when it is not, 2 when the state cannot be read.
pub fn command(state_dir: &Path, format: crate::output::Format) -> std::process::ExitCode {
    let report = match check_state_dir(state_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot check {}: {e}", state_dir.display());
            return std::process::ExitCode::from(2);
        }
    };
    match format {
        crate::output::Format::Table => println!("{report}"),
        crate::output::Format::Json => {
            let violations: Vec<_> = report
                .violations
                .iter()
                .map(|v| serde_json::json!({ "rule": v.rule, "subject": v.subject, "message": v.message }))
                .collect();
            let json = serde_json::json!({
                "state_dir": state_dir.display().to_string(),
                "sweeps": report.sweeps,
                "trials": report.trials,
                "attempts": report.attempts,
                "metrics": report.metrics,
                "events": report.events,
                "violations": violations,
            });
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
        }
    }
    if report.is_clean() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) }
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
}

struct State {
    sweeps: usize,
    trials: BTreeMap<TrialKey, Trial>,
    attempts: Vec<Attempt>,
    metrics: Vec<Metric>,
    /// `(seq, sweep, decoded event or why not)`.
    events: Vec<(i64, String, Result<v1::SweepEvent, String>)>,
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
    let trials = {
        let mut q = conn.prepare(
            "SELECT sweep_id, idx, trial_id, fe_epochs, ft_epochs, state, current_attempt FROM trials ORDER BY sweep_id, idx",
        )?;
        q.query_map([], |r| {
            Ok((
                (r.get(0)?, r.get(1)?),
                Trial {
                    trial_id: r.get(2)?,
                    fe_epochs: r.get(3)?,
                    ft_epochs: r.get(4)?,
                    state: r.get(5)?,
                    current_attempt: r.get(6)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<BTreeMap<_, _>>>()?
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
            "SELECT sweep_id, idx, epoch, phase, attempt_id, recorded_at_ms FROM metrics ORDER BY sweep_id, idx, epoch",
        )?;
        q.query_map([], |r| {
            Ok(Metric {
                trial: (r.get(0)?, r.get(1)?),
                epoch: r.get(2)?,
                phase: r.get(3)?,
                attempt_id: r.get(4)?,
                recorded_at_ms: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
    };
    let events = {
        let mut q = conn.prepare("SELECT seq, sweep_id, payload FROM events ORDER BY seq")?;
        q.query_map([], |r| {
            let payload: Vec<u8> = r.get(2)?;
            Ok((r.get(0)?, r.get(1)?, v1::SweepEvent::decode(payload.as_slice()).map_err(|e| e.to_string())))
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
    Ok(State { sweeps: sweeps as usize, trials, attempts, metrics, events, workers })
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
                    violation("events", format!("event {seq}"), format!("cannot be decoded: {e}"));
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
