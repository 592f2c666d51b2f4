//! What the coordinator's store keeps and answers, in domain terms: sweeps, trials, attempts,
//! workers and the event log. The store speaks these records (never the wire's messages); the
//! server converts them to `sweep.v1` in one place (`sweep-proto`), and a second store backend
//! implements the same records.
//!
//! Times are milliseconds since the Unix epoch on the coordinator's clock; `None` where a thing
//! has not happened (yet).

use crate::backbone::Backbone;
use crate::leaderboard::{EpochMetrics, Score};
use crate::lr::LrDecay;
use crate::state::{AttemptState, SweepState, TrialState, WorkerState};

/// A device a worker announces: `cpu:0`, `cuda:1`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    /// Unique within its worker; 1-64 characters without commas.
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    pub name: String,
    pub memory_bytes: u64,
}

/// A file a worker wrote to the artifact store: where, its SHA-256, its size, and the epoch it
/// holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointRef {
    pub uri: String,
    pub sha256: String,
    pub bytes: u64,
    pub epoch: u32,
}

/// Trials by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrialCounts([u32; TrialState::ALL.len()]);

impl TrialCounts {
    /// The number of trials in `state`.
    pub fn get(&self, state: TrialState) -> u32 {
        self.0[state as usize]
    }

    /// Adds `n` trials in `state`.
    pub fn add(&mut self, state: TrialState, n: u32) {
        let c = &mut self.0[state as usize];
        *c = c.saturating_add(n);
    }

    /// Every state with its count, in [`TrialState::ALL`]'s order.
    pub fn by_state(&self) -> impl Iterator<Item = (TrialState, u32)> + '_ {
        TrialState::ALL.iter().map(|s| (*s, self.get(*s)))
    }

    /// The state of a sweep with these trials.
    pub fn sweep_state(&self) -> SweepState {
        SweepState::of_counts(self.0.map(u64::from))
    }
}

/// A sweep at a glance.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSummary {
    pub id: String,
    pub name: String,
    pub state: SweepState,
    pub trial_count: u32,
    pub counts: TrialCounts,
    pub created_at_ms: i64,
    /// When its last trial ended (it may reopen: `retry`).
    pub finished_at_ms: Option<i64>,
    /// Where the spec came from (a file name), as the client said.
    pub source: String,
    /// When `sweep drop` marked it as no longer kept (its files may be collected).
    pub dropped_at_ms: Option<i64>,
    /// Its tags, sorted (`sweep submit --tag`, `sweep tag`).
    pub tags: Vec<String>,
    /// A free-text note (`sweep submit --note`, `sweep note`); empty when none.
    pub note: String,
}

/// Where an attempt stands in pretraining its backbone (`pretrain:` in the spec), before its
/// first epoch: what the worker reports, the event note the coordinator logs, and what `watch`
/// reads back from that note (the same text both ways: [`PretrainProgress::note`],
/// [`PretrainProgress::parse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainProgress {
    pub backbone: Backbone,
    /// Pretraining epochs done.
    pub epoch: u32,
    /// Of this many.
    pub epochs: u32,
    /// Seconds the pretraining has taken so far.
    pub seconds: f64,
    /// Another worker is pretraining these weights; this attempt waits for them.
    pub waiting: bool,
}

const PRETRAINING: &str = "pretraining ";
const WAITING: &str = "waiting for another worker's pretraining of ";

impl PretrainProgress {
    /// The event's note: `pretraining resnet18: 2/3 epochs, 41.2 s`, or `waiting for another
    /// worker's pretraining of resnet18`.
    pub fn note(&self) -> String {
        if self.waiting {
            format!("{WAITING}{}", self.backbone.name())
        } else {
            format!(
                "{PRETRAINING}{}: {}/{} epochs, {:.1} s",
                self.backbone.name(),
                self.epoch,
                self.epochs,
                self.seconds
            )
        }
    }

    /// A note written by [`PretrainProgress::note`], read back; `None` for any other note.
    pub fn parse(note: &str) -> Option<PretrainProgress> {
        if let Some(name) = note.strip_prefix(WAITING) {
            let backbone = Backbone::from_name(name)?;
            return Some(PretrainProgress { backbone, epoch: 0, epochs: 0, seconds: 0.0, waiting: true });
        }
        let (name, rest) = note.strip_prefix(PRETRAINING)?.split_once(": ")?;
        let (counts, seconds) = rest.split_once(" epochs, ")?;
        let (epoch, epochs) = counts.split_once('/')?;
        let seconds: f64 = seconds.strip_suffix(" s")?.parse().ok()?;
        Some(PretrainProgress {
            backbone: Backbone::from_name(name)?,
            epoch: epoch.parse().ok()?,
            epochs: epochs.parse().ok()?,
            seconds: if seconds.is_finite() && seconds >= 0.0 { seconds } else { return None },
            waiting: false,
        })
    }

    /// Seconds still to go at the pace so far (unknown before the first epoch, or waiting).
    pub fn remaining_seconds(&self) -> Option<f64> {
        (!self.waiting && self.epoch > 0 && self.epoch <= self.epochs)
            .then(|| self.seconds / f64::from(self.epoch) * f64::from(self.epochs - self.epoch))
    }

    /// Whether the worker's values hold together: a known number of epochs (at most
    /// `MAX_PRETRAIN_EPOCHS`), no more done than that, a finite time.
    pub fn check(&self) -> Result<(), String> {
        if self.waiting {
            return Ok(());
        }
        if self.epochs == 0 || self.epochs > MAX_PRETRAIN_EPOCHS || self.epoch > self.epochs {
            return Err(format!("pretraining epoch {} of {} makes no sense", self.epoch, self.epochs));
        }
        if !self.seconds.is_finite() || self.seconds < 0.0 {
            return Err(format!("pretraining seconds {} is not a time", self.seconds));
        }
        Ok(())
    }
}

/// Most pretraining epochs a progress report may name.
pub const MAX_PRETRAIN_EPOCHS: u32 = 100_000;

/// Most tags one sweep may have.
pub const MAX_TAGS: usize = 20;
/// Longest tag, in characters.
pub const MAX_TAG_LEN: usize = 40;
/// Longest note, in characters.
pub const MAX_NOTE_LEN: usize = 2000;

/// Checks a tag: 1 to [`MAX_TAG_LEN`] letters, digits, `.`, `_`, `-`, `:` or `/` (nothing a
/// terminal, a shell or a URL query would read otherwise). The error says what is wrong.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let shown: String = crate::text::escape(&tag.chars().take(MAX_TAG_LEN + 10).collect::<String>());
    if tag.is_empty() {
        return Err("a tag may not be empty".into());
    }
    if tag.chars().count() > MAX_TAG_LEN {
        return Err(format!("tag `{shown}…` is longer than {MAX_TAG_LEN} characters"));
    }
    if !tag.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("tag `{shown}` must start with a letter or a digit"));
    }
    if let Some(c) = tag.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))) {
        return Err(format!(
            "tag `{shown}` holds `{}`; tags are letters, digits and . _ - : /",
            crate::text::escape(&c.to_string())
        ));
    }
    Ok(())
}

/// Checks a note: at most [`MAX_NOTE_LEN`] characters, no control characters but newlines and
/// tabs (it is shown on terminals and web pages, escaped either way).
pub fn check_note(note: &str) -> Result<(), String> {
    if note.chars().count() > MAX_NOTE_LEN {
        return Err(format!("the note is longer than {MAX_NOTE_LEN} characters"));
    }
    if let Some(c) = note.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
        return Err(format!("the note holds a control character (U+{:04X})", c as u32));
    }
    Ok(())
}

/// A sweep's tags after adding `add` and removing `remove` (sorted, each once), or why not.
pub fn retag(tags: &[String], add: &[String], remove: &[String]) -> Result<Vec<String>, String> {
    // Bounded before anything else: a request may carry any number of values.
    for (what, list) in [("add", add), ("remove", remove)] {
        if list.len() > MAX_TAGS {
            return Err(format!("at most {MAX_TAGS} tags to {what} at once ({} given)", list.len()));
        }
    }
    for t in add.iter().chain(remove) {
        check_tag(t)?;
    }
    let remove: std::collections::BTreeSet<&String> = remove.iter().collect();
    let out: std::collections::BTreeSet<&String> = tags.iter().chain(add).filter(|t| !remove.contains(t)).collect();
    if out.len() > MAX_TAGS {
        return Err(format!("a sweep may have at most {MAX_TAGS} tags ({} asked for)", out.len()));
    }
    Ok(out.into_iter().cloned().collect())
}

/// What `sweep gc` may remove from one sweep's folders of the artifact store.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct References {
    pub sweep_id: String,
    /// No trial of it waits or runs.
    pub collectable: bool,
    /// Why not, when not.
    pub reason: String,
    /// `<sweep>/<trial>/<file>` keys in its folders that kept sweeps reference, sorted.
    pub keys: Vec<String>,
}

/// One trial (grid cell) and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialSummary {
    pub trial_id: String,
    pub index: u32,
    pub backbone: Backbone,
    pub lr_decay: LrDecay,
    pub fe_epochs: u32,
    pub ft_epochs: u32,
    pub state: TrialState,
    /// Attempts made, over the whole life of the trial.
    pub attempts: u32,
    /// The worker of the running attempt, or of the last attempt of an ended trial.
    pub worker_id: Option<String>,
    /// Epochs with stored metrics.
    pub epochs_done: u32,
    /// The validation accuracy of its newest stored epoch.
    pub latest_val_accuracy: Option<f64>,
    /// Its best validation accuracy during fine-tuning (what the leaderboard ranks by; none
    /// before its first fine-tuning epoch).
    pub best_val_accuracy: Option<f64>,
    /// Why it failed, was cancelled or is unschedulable (empty otherwise).
    pub error: String,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// The devices its running (or last) attempt holds.
    pub devices: Vec<String>,
}

/// A sweep with all its trials and its spec as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepStatus {
    pub sweep: SweepSummary,
    pub trials: Vec<TrialSummary>,
    pub spec_yaml: String,
}

/// What cancelling a sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// Waiting trials cancelled at once.
    pub pending: u32,
    /// Running trials told to stop (they end as cancelled when they do).
    pub stopping: u32,
}

/// One row of a leaderboard.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderboardEntry {
    /// 1-based.
    pub rank: u32,
    pub trial: TrialSummary,
    pub score: Score,
    /// Parameters of the trained model (0 before the first report).
    pub parameters: u64,
    /// Of the completed attempt; wall-clock so far while running.
    pub wall_seconds: f64,
    pub best_checkpoint: Option<CheckpointRef>,
    pub last_checkpoint: Option<CheckpointRef>,
    pub skipped_images: u32,
}

/// A sweep's trials, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaderboard {
    pub sweep_id: String,
    pub sweep_state: SweepState,
    pub entries: Vec<LeaderboardEntry>,
}

/// One try at running a trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptInfo {
    pub attempt_id: u64,
    pub worker_id: String,
    pub state: AttemptState,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub error: String,
    /// How it started (a resume point restored, or why none was).
    pub note: String,
    /// The last epoch restored from a resume point (0: from the start).
    pub resumed_from_epoch: u32,
}

/// A sweep as stored by `submit`, and what it took from earlier sweeps.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Submitted {
    pub sweep_id: String,
    pub trial_count: u32,
    /// Epochs stored at once from earlier sweeps' identical computations (same content key).
    pub reused_epochs: u64,
    /// Trials whose every epoch was reused: complete (or stopped early) before any worker ran.
    pub reused_trials: u32,
    /// The sweeps they came from, oldest first.
    pub reused_from: Vec<String>,
}

/// An epoch's stored metrics and the attempt that reported them.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    pub metrics: EpochMetrics,
    pub attempt_id: u64,
    /// The other trials this stored epoch belongs to: it was computed once, by `attempt_id`,
    /// for all of them (their epochs up to it are the same). Grid order.
    pub shared_with: Vec<String>,
    /// `<sweep>/<trial>` when the epoch was computed in another sweep (its stage key is this
    /// trial's) and reused here; empty otherwise.
    pub reused_from: String,
}

/// Everything about one trial.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialDetail {
    pub trial: TrialSummary,
    /// In epoch order.
    pub metrics: Vec<EpochRecord>,
    /// In the order they were made.
    pub attempts: Vec<AttemptInfo>,
    pub parameters: u64,
    pub best_checkpoint: Option<CheckpointRef>,
    pub last_checkpoint: Option<CheckpointRef>,
    pub skipped_images: u32,
}

/// A device held by a running attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUse {
    pub device: String,
    pub sweep_id: String,
    pub trial_id: String,
    pub attempt_id: u64,
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub name: String,
    pub incarnation: u64,
    pub devices: Vec<Device>,
    pub state: WorkerState,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
    /// `(sweep id, trial id)` of each running attempt.
    pub running: Vec<(String, String)>,
    pub busy: Vec<DeviceUse>,
    /// Why it is quarantined (empty otherwise).
    pub note: String,
}

/// One entry of a sweep's ordered change log.
#[derive(Debug, Clone, PartialEq)]
pub enum SweepEvent {
    /// A trial changed: its summary after the change, the epoch's metrics when the change was a
    /// report, and a note (how an attempt resumed, why a trial was re-queued).
    Trial { trial: TrialSummary, metrics: Option<EpochMetrics>, note: String },
    /// Every trial of the sweep has ended.
    Ended(SweepSummary),
}

/// An event with its place in the log (sequence numbers grow over all sweeps).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub sequence: u64,
    pub event: SweepEvent,
}

/// A trial handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub attempt_id: u64,
    pub sweep_id: String,
    pub trial_id: String,
    pub trial_index: u32,
    pub spec_yaml: String,
    pub backbone: Backbone,
    pub lr_decay: LrDecay,
    pub fe_epochs: u32,
    pub ft_epochs: u32,
    /// 1 for the trial's first attempt.
    pub attempt_number: u32,
    /// The worker's devices this attempt holds.
    pub devices: Vec<String>,
    /// Where to continue from (the trial's last resume point), if it has one.
    pub resume: Option<CheckpointRef>,
    /// The sweep's shared epochs run once (and are stored for every trial through them).
    pub sharing: bool,
}

/// How a worker says an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every epoch was reported.
    Succeeded,
    /// It failed; a permanent failure cannot succeed anywhere (the trial fails at once), a
    /// retryable one may elsewhere (the trial is retried while it has attempts left).
    Failed { permanent: bool },
    /// It stopped because it was told to (its sweep was cancelled, the worker shut down).
    Cancelled,
}

/// Why a running attempt should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Its sweep was cancelled.
    SweepCancelled,
    /// Its trial was stopped early by the sweep's `early_stopping` (the decision, explained);
    /// it ends as `stopped`.
    EarlyStopped(String),
    /// Its trial waits at an ASHA rung (the decision, explained); it ends as `paused` and is
    /// handed out again from its resume point if it is promoted.
    Paused(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::SweepCancelled => f.write_str("sweep cancelled"),
            StopReason::EarlyStopped(why) | StopReason::Paused(why) => f.write_str(why),
        }
    }
}

/// What the store answers a report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReportReply {
    /// Stop the attempt after this epoch, and why.
    pub stop: Option<StopReason>,
    /// The epoch ended a stage shared with trials waiting for it: they, or the branches after
    /// it, may be handed out now (idle workers should look again).
    pub unblocked: bool,
}

#[cfg(test)]
mod tests {

    #[test]
    fn pretraining_progress_reads_back_from_its_note() {
        let p = PretrainProgress { backbone: Backbone::Resnet50, epoch: 2, epochs: 3, seconds: 41.25, waiting: false };
        assert_eq!(p.note(), "pretraining resnet50: 2/3 epochs, 41.2 s");
        let back = PretrainProgress::parse(&p.note()).unwrap();
        assert_eq!((back.epoch, back.epochs, back.backbone, back.waiting), (2, 3, Backbone::Resnet50, false));
        assert!((back.remaining_seconds().unwrap() - 41.2 / 2.0).abs() < 1e-9);
        let w = PretrainProgress { waiting: true, ..p.clone() };
        assert_eq!(PretrainProgress::parse(&w.note()).map(|x| x.waiting), Some(true));
        assert_eq!(PretrainProgress::parse(&w.note()).unwrap().remaining_seconds(), None);
        for other in ["resumed from epoch 3", "pretraining nope: 1/2 epochs, 1.0 s", "pretraining resnet50: x", ""] {
            assert_eq!(PretrainProgress::parse(other), None, "{other}");
        }
        assert!(p.check().is_ok());
        for bad in [
            PretrainProgress { epoch: 4, ..p.clone() },
            PretrainProgress { epochs: 0, epoch: 0, ..p.clone() },
            PretrainProgress { seconds: f64::NAN, ..p.clone() },
            PretrainProgress { epochs: MAX_PRETRAIN_EPOCHS + 1, ..p.clone() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags_are_short_plain_words_and_retagging_keeps_them_sorted_and_once() {
        for good in ["baseline", "v1.2", "team/vision", "lr:1e-4", "A_b-C"] {
            assert_eq!(check_tag(good), Ok(()), "{good}");
        }
        for bad in ["", "two words", "a,b", "x\u{1b}", "é", "a'b", "a\nb", "-flag", ".hidden"] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
        assert!(check_tag(&"x".repeat(MAX_TAG_LEN)).is_ok());
        assert!(check_tag(&"x".repeat(MAX_TAG_LEN + 1)).unwrap_err().contains("longer than"));
        // The error shows the tag escaped.
        assert!(!check_tag("a\u{1b}[31m").unwrap_err().contains('\u{1b}'));
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(retag(&s(&["b", "a"]), &s(&["c", "a"]), &s(&["b"])), Ok(s(&["a", "c"])));
        assert_eq!(retag(&[], &s(&["x"]), &s(&["x"])), Ok(vec![]), "added and removed: removed");
        assert!(retag(&[], &(0..=MAX_TAGS).map(|i| format!("t{i}")).collect::<Vec<_>>(), &[]).is_err());
        // Huge requests are refused by their length, before any work on them.
        let flood: Vec<String> = (0..700_000).map(|i| format!("t{i}")).collect();
        assert!(retag(&[], &flood, &[]).unwrap_err().contains("at once"));
        assert!(retag(&[], &[], &flood).unwrap_err().contains("at once"));
        let twice: Vec<String> = vec!["a".into(); MAX_TAGS];
        assert_eq!(retag(&[], &twice, &[]), Ok(s(&["a"])), "the same tag many times is one tag");
        assert_eq!(check_note("two\nlines\twith a tab"), Ok(()));
        assert!(check_note("bell\u{7}").is_err());
        assert!(check_note(&"n".repeat(MAX_NOTE_LEN + 1)).is_err());
    }

    use super::*;

    #[test]
    fn counts_add_up_and_give_the_sweep_state() {
        let mut c = TrialCounts::default();
        assert_eq!(c.sweep_state(), SweepState::Completed, "no trials: nothing left to do");
        c.add(TrialState::Pending, 2);
        assert_eq!(c.sweep_state(), SweepState::Pending);
        c.add(TrialState::Completed, 1);
        assert_eq!(c.sweep_state(), SweepState::Running);
        c.add(TrialState::Pending, u32::MAX);
        assert_eq!(c.get(TrialState::Pending), u32::MAX, "saturates");
        assert_eq!(c.by_state().map(|(_, n)| u64::from(n)).sum::<u64>(), u64::from(u32::MAX) + 1);
        assert_eq!(c.sweep_state(), SweepState::Running);
    }
}
