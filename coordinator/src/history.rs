//! The history checker: reads a coordinator's state database (read-only, so it can look at the
//! state of a running coordinator, or at what one left after a crash) and checks the invariants
//! its history must keep. `sweep check-state` prints what it finds; the end-to-end tests run it
//! on every state directory they leave.
//!
//! The rules, each a [`Violation::rule`]:
//! * `completed-twice`: a trial completes at most once: at most one succeeded attempt, one
//!   move into `completed` in the event log, and a completed trial has exactly that attempt —
//!   or, in a sweep that shares epochs, none when its last epoch was computed by a trial that
//!   shares it.
//! * `metrics-writer`: every metric row was written by an attempt of its own trial, or (in a
//!   sweep that shares epochs) of a trial whose epochs up to that one are the same as its own,
//!   while that attempt ran (its `recorded_at_ms` lies within the attempt's start and end; with
//!   at most one attempt of a trial running at any time, that attempt was the current one).
//! * `epochs`: the epochs of a trial are `1..=n` with no gap, within the trial's total, each in
//!   its phase.
//! * `completed-epochs`: a completed trial has metrics for all its epochs.
//! * `stopped`: a trial stopped early has metrics for fewer than all its epochs (a decision is
//!   never taken at a trial's last epoch).
//! * `running-attempts`: at most one running attempt per trial, now and at any time (attempt
//!   intervals do not overlap); a running trial's current attempt is that running attempt, and
//!   an attempt that is not running has ended.
//! * `device-overlap`: the attempts of one worker never hold the same device at the same time,
//!   and hold only devices the worker announced.
//! * `events`: every event decodes and matches the checksum stored with it (a flipped byte in
//!   a stored blob is seen, not served).
//! * `checkpoints`: every checkpoint reference a trial holds (best, last, resume point) decodes,
//!   holds an epoch the trial has metrics for, carries a SHA-256, and names the trial's own
//!   file (`…/<sweep>/<trial>/<file>`) or, in a sweep that shares epochs, the file of the trial
//!   that computed that epoch for it: a resume point of another sweep is seen.
//! * `grid`: every trial row is the grid cell its sweep's spec gives that index (backbone,
//!   strategy, epoch split), and a sweep has as many trials as its grid.
//! * `metric-values`: every stored metric is finite and within what a report may carry.
//!
//! Times are the coordinator's wall clock in milliseconds: a clock stepped backwards while it
//! ran can show up as an overlap.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use sweep_core::leaderboard::Phase;
use sweep_core::lr::LrDecay;
use sweep_core::records::{CheckpointRef, Event, SweepEvent};
use sweep_core::state::{AttemptState, TrialState};

use crate::store::sqlite::ReadOnly;
use crate::store::{CheckpointKind, StateReader, StoreError};

pub use crate::store::DB_FILE;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `completed-twice`, `metrics-writer`, `epochs`, `completed-epochs`, `stopped`,
    /// `running-attempts`, `device-overlap`, `events` (an event the checker cannot read),
    /// `checkpoints`, `grid` or `metric-values`.
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
    Ok(check(ReadOnly::open(path)?.history()?))
}

/// Writes a consistent copy of a state directory's database to `out` (a new file) while a
/// coordinator may be writing to it, checks the copy, and returns the copy's report
/// ([`crate::store::sqlite::backup`]).
pub fn backup(dir: &Path, out: &Path) -> Result<Report, StoreError> {
    crate::store::sqlite::backup(dir, out, check_db)
}

/// Every stored metric of a state database, read-only (the simulator's check that no
/// acknowledged report was lost).
pub fn stored_metrics(db: &Path) -> Result<crate::store::StoredMetrics, StoreError> {
    ReadOnly::open(db)?.stored_metrics()
}

// ---------------------------------------------------------------------------------------------
// What is read: one consistent snapshot of a state, as a backend reads it ([`StateReader`]).
// Damaged records are kept with what is wrong with them, so the checker can report them.
// ---------------------------------------------------------------------------------------------

/// A trial: its sweep and its index in the grid.
pub type TrialKey = (String, i64);

/// A trial as stored.
#[derive(Debug, Clone)]
pub struct TrialRow {
    pub trial_id: String,
    pub fe_epochs: u32,
    pub ft_epochs: u32,
    /// As stored (a damaged state may hold a string that is no state).
    pub state: String,
    pub current_attempt: Option<i64>,
    pub backbone: String,
    /// The strategy, or why it cannot be read.
    pub lr_decay: Result<LrDecay, String>,
    /// Each checkpoint reference held, or why it cannot be read.
    pub checkpoints: Vec<(CheckpointKind, Result<CheckpointRef, String>)>,
}

/// An attempt as stored.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub id: i64,
    pub trial: TrialKey,
    pub worker_id: String,
    pub state: String,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub devices: Vec<String>,
}

/// A metric row as stored.
#[derive(Debug, Clone)]
pub struct MetricRow {
    pub trial: TrialKey,
    pub epoch: i64,
    pub phase: String,
    pub attempt_id: i64,
    pub recorded_at_ms: i64,
    /// train loss, train accuracy, validation loss, validation accuracy, seconds.
    pub values: [f64; 5],
}

/// Everything the checker reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub sweeps: usize,
    pub trials: BTreeMap<TrialKey, TrialRow>,
    pub attempts: Vec<AttemptRow>,
    pub metrics: Vec<MetricRow>,
    /// `(seq, sweep, the event or why it cannot be read)`.
    pub events: Vec<(i64, String, Result<Event, String>)>,
    /// Each sweep's spec.
    pub specs: BTreeMap<String, String>,
    /// The sweeps that run shared epochs once (`sharing: on`).
    pub sharing: BTreeSet<String>,
    /// Announced devices per worker (`None`: unreadable).
    pub workers: HashMap<String, Option<HashSet<String>>>,
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

// States as stored.
const COMPLETED: &str = TrialState::Completed.as_str();
const RUNNING: &str = TrialState::Running.as_str();
const STOPPED: &str = TrialState::Stopped.as_str();
const ATTEMPT_RUNNING: &str = AttemptState::Running.as_str();

/// An attempt's interval `[start, end)`; a running attempt has not ended.
fn end_of(a: &AttemptRow) -> i64 {
    a.ended_at_ms.unwrap_or(i64::MAX)
}

fn span(a: &AttemptRow) -> String {
    match a.ended_at_ms {
        Some(end) => format!("{}..{end}", a.started_at_ms),
        None => format!("{}..(running)", a.started_at_ms),
    }
}

/// Checks a snapshot against every rule.
pub fn check(snapshot: Snapshot) -> Report {
    snapshot.check()
}

impl Snapshot {
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
        let mut by_trial: BTreeMap<&TrialKey, Vec<&AttemptRow>> = BTreeMap::new();
        for a in &self.attempts {
            by_trial.entry(&a.trial).or_default().push(a);
        }
        let attempts: HashMap<i64, &AttemptRow> = self.attempts.iter().map(|a| (a.id, a)).collect();
        // The stage trees of the sweeps that share epochs (a spec that does not parse is the
        // `grid` rule's to report; its sweep then shares nothing here).
        let trees: HashMap<&str, sweep_core::stages::StageTree> = self
            .sharing
            .iter()
            .filter_map(|sweep| {
                let spec =
                    sweep_core::spec::parse_with(self.specs.get(sweep)?, sweep_core::spec::ParseOptions::stored())
                        .ok()?;
                Some((sweep.as_str(), sweep_core::stages::StageTree::build(&spec, true)))
            })
            .collect();
        // Whether trial `b`'s epoch `epoch` is trial `a`'s (same sweep, same epochs up to it).
        let shares = |sweep: &str, a: i64, b: i64, epoch: i64| -> bool {
            let (Some(tree), Ok(a), Ok(epoch)) = (trees.get(sweep), usize::try_from(a), u32::try_from(epoch)) else {
                return false;
            };
            tree.sharers(a, epoch).iter().any(|&u| u as i64 == b)
        };
        // The attempt that wrote each trial's metric row of each epoch.
        let writer: HashMap<(&TrialKey, i64), i64> =
            self.metrics.iter().map(|m| ((&m.trial, m.epoch), m.attempt_id)).collect();
        let values: HashMap<(&TrialKey, i64), [f64; 5]> =
            self.metrics.iter().map(|m| ((&m.trial, m.epoch), m.values)).collect();
        // Each trial's content keys by epoch (`stages::epoch_keys`), read when first asked.
        let specs: HashMap<&str, sweep_core::spec::SweepSpec> = self
            .specs
            .iter()
            .filter_map(|(sweep, yaml)| {
                let spec = sweep_core::spec::parse_with(yaml, sweep_core::spec::ParseOptions::stored()).ok()?;
                Some((sweep.as_str(), spec))
            })
            .collect();
        let keys: RefCell<HashMap<TrialKey, Vec<sweep_core::stages::StageKey>>> = RefCell::default();
        let key_at = |t: &TrialKey, epoch: i64| -> Option<sweep_core::stages::StageKey> {
            let mut keys = keys.borrow_mut();
            if !keys.contains_key(t) {
                let spec = specs.get(t.0.as_str())?;
                let cell = sweep_core::grid::cell(&spec.grid, usize::try_from(t.1).ok()?)?;
                keys.insert(t.clone(), sweep_core::stages::epoch_keys(spec, &cell));
            }
            keys.get(t)?.get(usize::try_from(epoch).ok()?.checked_sub(1)?).cloned()
        };
        // Whether `m`'s row is another sweep's computation reused: trial `by` (of another sweep)
        // has the same epochs up to it (content key) and stored the same values for it.
        let reused = |by: &TrialKey, m: &TrialKey, epoch: i64| -> bool {
            by.0 != m.0
                && key_at(by, epoch).is_some_and(|k| key_at(m, epoch) == Some(k))
                && values.get(&(by, epoch)).is_some_and(|v| values.get(&(m, epoch)).is_some_and(|w| v == w))
        };

        // completed-twice, running-attempts: per trial, from the attempts.
        for (key, t) in &self.trials {
            let list = by_trial.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let succeeded: Vec<i64> =
                list.iter().filter(|a| a.state == AttemptState::Succeeded.as_str()).map(|a| a.id).collect();
            if succeeded.len() > 1 {
                violation("completed-twice", subject(key), format!("attempts {succeeded:?} all succeeded"));
            }
            // Completed without an attempt of its own: every epoch was computed for it by trials
            // it shares them with (its last one too).
            let total = i64::from(t.fe_epochs + t.ft_epochs);
            let credited = writer.get(&(key, total)).and_then(|w| attempts.get(w)).is_some_and(|w| {
                w.trial != *key && (shares(&key.0, w.trial.1, key.1, total) || reused(&w.trial, key, total))
            });
            if t.state == COMPLETED && succeeded.is_empty() && !credited {
                violation("completed-twice", subject(key), "completed, but none of its attempts succeeded".into());
            }
            if t.state != COMPLETED && !succeeded.is_empty() {
                violation(
                    "completed-twice",
                    subject(key),
                    format!("attempt {} succeeded, but the trial is {}", succeeded[0], t.state),
                );
            }
            let running: Vec<i64> = list.iter().filter(|a| a.state == ATTEMPT_RUNNING).map(|a| a.id).collect();
            if running.len() > 1 {
                violation("running-attempts", subject(key), format!("attempts {running:?} are all running"));
            }
            match (t.state.as_str(), running.as_slice(), t.current_attempt) {
                (RUNNING, [only], Some(current)) if *only == current => {}
                (state, [], None) if state != RUNNING => {}
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
            if (a.state == ATTEMPT_RUNNING) != a.ended_at_ms.is_none() {
                violation(
                    "running-attempts",
                    subject(&a.trial),
                    format!("attempt {} is {} with end time {:?}", a.id, a.state, a.ended_at_ms),
                );
            }
        }

        // completed-twice, from the event log: moves into `completed` per trial.
        let mut last_state: HashMap<(String, String), TrialState> = HashMap::new();
        let mut completions: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        for (seq, sweep, event) in &self.events {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    violation("events", format!("event {seq} of {sweep}"), e.clone());
                    continue;
                }
            };
            let SweepEvent::Trial { trial: t, .. } = &event.event else {
                continue;
            };
            let key = (sweep.clone(), t.trial_id.clone());
            let before = last_state.insert(key.clone(), t.state);
            if t.state == TrialState::Completed && before != Some(TrialState::Completed) {
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
        let mut epochs: BTreeMap<&TrialKey, Vec<&MetricRow>> = BTreeMap::new();
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
                Some(a)
                    if a.trial != m.trial
                        && !(a.trial.0 == m.trial.0 && shares(&a.trial.0, a.trial.1, m.trial.1, m.epoch))
                        && !reused(&a.trial, &m.trial, m.epoch) =>
                {
                    violation(
                        "metrics-writer",
                        subject(&m.trial),
                        format!("{at} was written by attempt {}, an attempt of {}", a.id, subject(&a.trial)),
                    )
                }
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
            if t.state == STOPPED && have.len() as i64 >= total {
                violation(
                    "stopped",
                    subject(key),
                    format!("stopped early, but it has metrics for all {total} of its epochs"),
                );
            }
            if t.state == COMPLETED && (have.len() as i64 != total || !contiguous) {
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
            for (kind, c) in &t.checkpoints {
                let column = kind.field();
                let c = match c {
                    Ok(c) => c,
                    Err(e) => {
                        violation("checkpoints", subject(key), format!("{column} cannot be decoded: {e}"));
                        continue;
                    }
                };
                // A shared epoch's reference names the file of the trial whose attempt computed it.
                let owner = writer
                    .get(&(key, i64::from(c.epoch)))
                    .and_then(|w| attempts.get(w))
                    .filter(|w| {
                        let e = i64::from(c.epoch);
                        w.trial != *key
                            && ((w.trial.0 == key.0 && shares(&key.0, w.trial.1, key.1, e)) || reused(&w.trial, key, e))
                    })
                    .and_then(|w| Some((&w.trial.0, self.trials.get(&w.trial)?)));
                let own = crate::store::check_checkpoint_ref(c, &key.0, &t.trial_id, *kind);
                let theirs = owner.map(|(sweep, o)| crate::store::check_checkpoint_ref(c, sweep, &o.trial_id, *kind));
                if let (Err(why), None | Some(Err(_))) = (own, theirs) {
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
                let decay = t.lr_decay.as_ref().ok();
                let want = (cell.id.as_str(), cell.backbone.name(), cell.fe_epochs, cell.ft_epochs);
                let got = (t.trial_id.as_str(), t.backbone.as_str(), t.fe_epochs, t.ft_epochs);
                if want != got || decay != Some(&cell.lr_decay) {
                    violation(
                        "grid",
                        subject(&key),
                        format!(
                            "row {} {} {} {}+{} is not the spec's cell {} {} {} {}+{}",
                            got.0,
                            got.1,
                            decay.map(|d| d.to_string()).unwrap_or_else(|| "(undecodable strategy)".into()),
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
        let mut holders: BTreeMap<(&str, &str), Vec<&AttemptRow>> = BTreeMap::new();
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
            let mut latest: Option<&AttemptRow> = None;
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
