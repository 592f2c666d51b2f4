//! Conversions between the store's records ([`sweep_core::records`]) and the `sweep.v1`
//! messages: domain → wire for everything the server answers, wire → domain for what the
//! coordinator's store keeps as encoded messages (summaries, devices, checkpoints, events).
//!
//! The wire has no "unset" for times and worker ids: `None` goes out as `0` (times) or `""`
//! (worker ids) and comes back as `None`. The store never holds `Some(0)` or `Some("")`, so a
//! stored record round-trips exactly.

use sweep_core::backbone::Backbone;
use sweep_core::lr::LrDecay;
use sweep_core::records;
use sweep_core::state::{SweepState, TrialState};

use crate::v1;
use crate::v1::sweep_event::Event as WireEvent;

/// A time as the wire carries it: 0 where it has not happened.
fn wire_time(ms: Option<i64>) -> i64 {
    ms.unwrap_or(0)
}

/// A time from the wire: `None` for 0.
fn domain_time(ms: i64) -> Option<i64> {
    (ms != 0).then_some(ms)
}

// ---------------------------------------------------------------------------------------------
// Domain → wire
// ---------------------------------------------------------------------------------------------

impl From<&records::Device> for v1::Device {
    fn from(d: &records::Device) -> Self {
        v1::Device { id: d.id.clone(), kind: d.kind.clone(), name: d.name.clone(), memory_bytes: d.memory_bytes }
    }
}

impl From<&records::CheckpointRef> for v1::CheckpointRef {
    fn from(c: &records::CheckpointRef) -> Self {
        v1::CheckpointRef { uri: c.uri.clone(), sha256: c.sha256.clone(), bytes: c.bytes, epoch: c.epoch }
    }
}

impl From<&records::TrialCounts> for v1::TrialCounts {
    fn from(c: &records::TrialCounts) -> Self {
        let mut w = v1::TrialCounts::default();
        for (state, n) in c.by_state() {
            w.add(state, n);
        }
        w
    }
}

impl From<&records::SweepSummary> for v1::SweepSummary {
    fn from(s: &records::SweepSummary) -> Self {
        v1::SweepSummary {
            id: s.id.clone(),
            name: s.name.clone(),
            state: s.state.as_str().into(),
            trial_count: s.trial_count,
            counts: Some((&s.counts).into()),
            created_at_ms: s.created_at_ms,
            finished_at_ms: wire_time(s.finished_at_ms),
            source: s.source.clone(),
            dropped_at_ms: wire_time(s.dropped_at_ms),
            tags: s.tags.clone(),
            note: s.note.clone(),
        }
    }
}

impl From<&records::TrialSummary> for v1::TrialSummary {
    fn from(t: &records::TrialSummary) -> Self {
        v1::TrialSummary {
            trial_id: t.trial_id.clone(),
            index: t.index,
            backbone: t.backbone.name().into(),
            lr_decay: Some(v1::LrDecay::from(&t.lr_decay)),
            fe_epochs: t.fe_epochs,
            ft_epochs: t.ft_epochs,
            state: t.state.as_str().into(),
            attempts: t.attempts,
            worker_id: t.worker_id.clone().unwrap_or_default(),
            epochs_done: t.epochs_done,
            latest_val_accuracy: t.latest_val_accuracy,
            best_val_accuracy: t.best_val_accuracy,
            error: t.error.clone(),
            started_at_ms: wire_time(t.started_at_ms),
            finished_at_ms: wire_time(t.finished_at_ms),
            devices: t.devices.clone(),
        }
    }
}

impl From<&records::SweepStatus> for v1::SweepStatus {
    fn from(s: &records::SweepStatus) -> Self {
        v1::SweepStatus {
            sweep: Some((&s.sweep).into()),
            trials: s.trials.iter().map(v1::TrialSummary::from).collect(),
            spec_yaml: s.spec_yaml.clone(),
        }
    }
}

impl From<&records::Cancelled> for v1::CancelSweepResponse {
    fn from(c: &records::Cancelled) -> Self {
        v1::CancelSweepResponse { cancelled_pending: c.pending, stopping_running: c.stopping }
    }
}

impl From<&records::LeaderboardEntry> for v1::LeaderboardEntry {
    fn from(e: &records::LeaderboardEntry) -> Self {
        let t = &e.trial;
        v1::LeaderboardEntry {
            rank: e.rank,
            trial_id: t.trial_id.clone(),
            backbone: t.backbone.name().into(),
            lr_decay: Some(v1::LrDecay::from(&t.lr_decay)),
            fe_epochs: t.fe_epochs,
            ft_epochs: t.ft_epochs,
            state: t.state.as_str().into(),
            fe_val_accuracy: e.score.fe_val_accuracy,
            best_val_accuracy: e.score.best_val_accuracy,
            best_epoch: e.score.best_epoch,
            parameters: e.parameters,
            wall_seconds: e.wall_seconds,
            best_checkpoint: e.best_checkpoint.as_ref().map(v1::CheckpointRef::from),
            last_checkpoint: e.last_checkpoint.as_ref().map(v1::CheckpointRef::from),
            skipped_images: e.skipped_images,
            // The entry alone does not know its sweep; the leaderboard's conversion sets it.
            sweep_id: String::new(),
        }
    }
}

impl From<&records::Leaderboard> for v1::Leaderboard {
    fn from(l: &records::Leaderboard) -> Self {
        v1::Leaderboard {
            sweep_id: l.sweep_id.clone(),
            sweep_state: l.sweep_state.as_str().into(),
            entries: l
                .entries
                .iter()
                .map(|e| v1::LeaderboardEntry { sweep_id: l.sweep_id.clone(), ..v1::LeaderboardEntry::from(e) })
                .collect(),
        }
    }
}

impl From<&records::AttemptInfo> for v1::AttemptInfo {
    fn from(a: &records::AttemptInfo) -> Self {
        v1::AttemptInfo {
            attempt_id: a.attempt_id,
            worker_id: a.worker_id.clone(),
            state: a.state.as_str().into(),
            started_at_ms: a.started_at_ms,
            ended_at_ms: wire_time(a.ended_at_ms),
            error: a.error.clone(),
            note: a.note.clone(),
            resumed_from_epoch: a.resumed_from_epoch,
        }
    }
}

impl From<&records::EpochRecord> for v1::EpochMetrics {
    fn from(r: &records::EpochRecord) -> Self {
        v1::EpochMetrics {
            attempt_id: r.attempt_id,
            shared_with: r.shared_with.clone(),
            reused_from: r.reused_from.clone(),
            ..v1::EpochMetrics::from(&r.metrics)
        }
    }
}

impl From<&records::Submitted> for v1::SubmitSweepResponse {
    fn from(s: &records::Submitted) -> Self {
        v1::SubmitSweepResponse {
            sweep_id: s.sweep_id.clone(),
            trial_count: s.trial_count,
            reused_epochs: s.reused_epochs,
            reused_trials: s.reused_trials,
            reused_from: s.reused_from.clone(),
        }
    }
}

impl From<&records::References> for v1::ListReferencesResponse {
    fn from(r: &records::References) -> Self {
        v1::ListReferencesResponse {
            sweep_id: r.sweep_id.clone(),
            collectable: r.collectable,
            reason: r.reason.clone(),
            keys: r.keys.clone(),
        }
    }
}

impl From<&records::TrialDetail> for v1::TrialDetail {
    fn from(d: &records::TrialDetail) -> Self {
        v1::TrialDetail {
            trial: Some((&d.trial).into()),
            metrics: d.metrics.iter().map(v1::EpochMetrics::from).collect(),
            attempts: d.attempts.iter().map(v1::AttemptInfo::from).collect(),
            parameters: d.parameters,
            best_checkpoint: d.best_checkpoint.as_ref().map(v1::CheckpointRef::from),
            last_checkpoint: d.last_checkpoint.as_ref().map(v1::CheckpointRef::from),
            skipped_images: d.skipped_images,
        }
    }
}

impl From<&records::DeviceUse> for v1::DeviceUse {
    fn from(u: &records::DeviceUse) -> Self {
        v1::DeviceUse {
            device: u.device.clone(),
            sweep_id: u.sweep_id.clone(),
            trial_id: u.trial_id.clone(),
            attempt_id: u.attempt_id,
        }
    }
}

impl From<&records::WorkerInfo> for v1::WorkerInfo {
    fn from(w: &records::WorkerInfo) -> Self {
        v1::WorkerInfo {
            worker_id: w.worker_id.clone(),
            name: w.name.clone(),
            incarnation: w.incarnation,
            devices: w.devices.iter().map(v1::Device::from).collect(),
            state: w.state.as_str().into(),
            registered_at_ms: w.registered_at_ms,
            last_seen_ms: w.last_seen_ms,
            running: w.running.iter().map(|(sweep, trial)| format!("{sweep}/{trial}")).collect(),
            busy: w.busy.iter().map(v1::DeviceUse::from).collect(),
            note: w.note.clone(),
        }
    }
}

impl From<&records::Event> for v1::SweepEvent {
    fn from(e: &records::Event) -> Self {
        let event = match &e.event {
            records::SweepEvent::Trial { trial, metrics, note } => WireEvent::Trial(v1::TrialEvent {
                trial: Some(trial.into()),
                metrics: metrics.as_ref().map(v1::EpochMetrics::from),
                note: note.clone(),
            }),
            records::SweepEvent::Ended(summary) => WireEvent::Ended(summary.into()),
        };
        v1::SweepEvent { sequence: e.sequence, event: Some(event) }
    }
}

impl From<&records::Assignment> for v1::Assignment {
    fn from(a: &records::Assignment) -> Self {
        v1::Assignment {
            attempt_id: a.attempt_id,
            sweep_id: a.sweep_id.clone(),
            trial_id: a.trial_id.clone(),
            trial_index: a.trial_index,
            spec_yaml: a.spec_yaml.clone(),
            backbone: a.backbone.name().into(),
            lr_decay: Some(v1::LrDecay::from(&a.lr_decay)),
            fe_epochs: a.fe_epochs,
            ft_epochs: a.ft_epochs,
            attempt_number: a.attempt_number,
            devices: a.devices.clone(),
            resume: a.resume.as_ref().map(v1::CheckpointRef::from),
            sharing: a.sharing,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire → domain (the store's encoded blobs)
// ---------------------------------------------------------------------------------------------

/// Every field is carried as it is (the store checked devices when the worker registered).
impl TryFrom<&v1::Device> for records::Device {
    type Error = String;

    fn try_from(d: &v1::Device) -> Result<Self, String> {
        Ok(records::Device {
            id: d.id.clone(),
            kind: d.kind.clone(),
            name: d.name.clone(),
            memory_bytes: d.memory_bytes,
        })
    }
}

/// Every field is carried as it is (the store checked the reference when the worker reported
/// it).
impl TryFrom<&v1::CheckpointRef> for records::CheckpointRef {
    type Error = String;

    fn try_from(c: &v1::CheckpointRef) -> Result<Self, String> {
        Ok(records::CheckpointRef { uri: c.uri.clone(), sha256: c.sha256.clone(), bytes: c.bytes, epoch: c.epoch })
    }
}

impl From<&v1::TrialCounts> for records::TrialCounts {
    fn from(w: &v1::TrialCounts) -> Self {
        let mut c = records::TrialCounts::default();
        for (state, n) in w.by_state() {
            c.add(state, n);
        }
        c
    }
}

/// Refuses an unknown state; missing counts are all zero.
impl TryFrom<&v1::SweepSummary> for records::SweepSummary {
    type Error = String;

    fn try_from(s: &v1::SweepSummary) -> Result<Self, String> {
        let state =
            SweepState::parse(&s.state).ok_or_else(|| format!("sweep {}: unknown state `{}`", s.id, s.state))?;
        Ok(records::SweepSummary {
            id: s.id.clone(),
            name: s.name.clone(),
            state,
            trial_count: s.trial_count,
            counts: s.counts.as_ref().map(records::TrialCounts::from).unwrap_or_default(),
            created_at_ms: s.created_at_ms,
            finished_at_ms: domain_time(s.finished_at_ms),
            source: s.source.clone(),
            dropped_at_ms: domain_time(s.dropped_at_ms),
            tags: s.tags.clone(),
            note: s.note.clone(),
        })
    }
}

/// Refuses an unknown backbone, learning-rate strategy or state, and a missing `lr_decay`.
impl TryFrom<&v1::TrialSummary> for records::TrialSummary {
    type Error = String;

    fn try_from(t: &v1::TrialSummary) -> Result<Self, String> {
        let id = &t.trial_id;
        let backbone =
            Backbone::from_name(&t.backbone).ok_or_else(|| format!("trial {id}: unknown backbone `{}`", t.backbone))?;
        let lr_decay = t.lr_decay.as_ref().ok_or_else(|| format!("trial {id}: missing lr_decay"))?;
        let lr_decay = LrDecay::try_from(lr_decay).map_err(|e| format!("trial {id}: lr_decay: {e}"))?;
        let state = TrialState::parse(&t.state).ok_or_else(|| format!("trial {id}: unknown state `{}`", t.state))?;
        Ok(records::TrialSummary {
            trial_id: id.clone(),
            index: t.index,
            backbone,
            lr_decay,
            fe_epochs: t.fe_epochs,
            ft_epochs: t.ft_epochs,
            state,
            attempts: t.attempts,
            worker_id: (!t.worker_id.is_empty()).then(|| t.worker_id.clone()),
            epochs_done: t.epochs_done,
            latest_val_accuracy: t.latest_val_accuracy,
            best_val_accuracy: t.best_val_accuracy,
            error: t.error.clone(),
            started_at_ms: domain_time(t.started_at_ms),
            finished_at_ms: domain_time(t.finished_at_ms),
            devices: t.devices.clone(),
        })
    }
}

/// Refuses a snapshot (never stored: the server makes one for each watcher), an event with no
/// oneof set, a trial event without its trial summary, and whatever the summaries and metrics
/// refuse.
impl TryFrom<&v1::SweepEvent> for records::Event {
    type Error = String;

    fn try_from(e: &v1::SweepEvent) -> Result<Self, String> {
        let seq = e.sequence;
        let event = match &e.event {
            Some(WireEvent::Trial(t)) => {
                let trial = t.trial.as_ref().ok_or_else(|| format!("event {seq}: trial event without its trial"))?;
                let trial = records::TrialSummary::try_from(trial).map_err(|err| format!("event {seq}: {err}"))?;
                let metrics = t
                    .metrics
                    .as_ref()
                    .map(crate::stored_metrics)
                    .transpose()
                    .map_err(|err| format!("event {seq}: trial {}: metrics: {err}", trial.trial_id))?;
                records::SweepEvent::Trial { trial, metrics, note: t.note.clone() }
            }
            Some(WireEvent::Ended(s)) => {
                records::SweepEvent::Ended(s.try_into().map_err(|err| format!("event {seq}: {err}"))?)
            }
            Some(WireEvent::Snapshot(_)) => return Err(format!("event {seq}: a snapshot is not a stored event")),
            None => return Err(format!("event {seq}: no event set (trial or ended)")),
        };
        Ok(records::Event { sequence: seq, event })
    }
}

/// How an attempt ended, from a `FinishAttempt` request's outcome and error class: a failure
/// is permanent only with [`v1::ErrorClass::Permanent`].
pub fn outcome_of(outcome: v1::Outcome, class: v1::ErrorClass) -> Result<records::Outcome, String> {
    match outcome {
        v1::Outcome::Unspecified => Err("outcome must be succeeded, failed or cancelled".into()),
        v1::Outcome::Succeeded => Ok(records::Outcome::Succeeded),
        v1::Outcome::Failed => Ok(records::Outcome::Failed { permanent: class == v1::ErrorClass::Permanent }),
        v1::Outcome::Cancelled => Ok(records::Outcome::Cancelled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use sweep_core::leaderboard::{EpochMetrics, Phase};

    fn trial() -> records::TrialSummary {
        records::TrialSummary {
            trial_id: "t003".into(),
            index: 3,
            backbone: Backbone::Vgg16Bn,
            lr_decay: LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 },
            fe_epochs: 2,
            ft_epochs: 5,
            state: TrialState::Running,
            attempts: 2,
            worker_id: Some("w7".into()),
            epochs_done: 4,
            latest_val_accuracy: Some(0.8125),
            best_val_accuracy: Some(0.84375),
            error: "lost worker w6".into(),
            started_at_ms: Some(1_700_000_000_123),
            finished_at_ms: None,
            devices: vec!["cuda:0".into(), "cuda:1".into()],
        }
    }

    fn waiting_trial() -> records::TrialSummary {
        records::TrialSummary {
            trial_id: "t000".into(),
            index: 0,
            backbone: Backbone::Resnet50,
            lr_decay: LrDecay::Exponential { head_lr: 1e-3, factor: 3.0 },
            state: TrialState::Unschedulable,
            attempts: 0,
            worker_id: None,
            epochs_done: 0,
            latest_val_accuracy: None,
            best_val_accuracy: None,
            error: String::new(),
            started_at_ms: None,
            finished_at_ms: None,
            devices: vec![],
            ..trial()
        }
    }

    fn sweep(finished_at_ms: Option<i64>) -> records::SweepSummary {
        let mut counts = records::TrialCounts::default();
        counts.add(TrialState::Completed, 3);
        counts.add(TrialState::Failed, 1);
        counts.add(TrialState::Unschedulable, 2);
        records::SweepSummary {
            id: "s-42".into(),
            name: "flowers".into(),
            state: SweepState::Failed,
            trial_count: 6,
            counts,
            created_at_ms: 1_700_000_000_000,
            finished_at_ms,
            source: "sweeps/flowers.yaml".into(),
            dropped_at_ms: None,
            tags: vec!["baseline".into(), "flowers".into()],
            note: "first try\nwith ImageNet weights".into(),
        }
    }

    fn metrics() -> EpochMetrics {
        EpochMetrics {
            epoch: 4,
            phase: Phase::FineTuning,
            train_loss: 0.25,
            train_accuracy: 0.9,
            val_loss: 0.375,
            val_accuracy: 0.8125,
            seconds: 61.5,
        }
    }

    /// Domain → wire → bytes → wire → domain, as the store writes and reads its blobs.
    fn through_blob<D, W>(d: &D) -> Result<D, String>
    where
        W: Message + Default + for<'a> From<&'a D>,
        D: for<'a> TryFrom<&'a W, Error = String>,
    {
        let blob = W::from(d).encode_to_vec();
        D::try_from(&W::decode(blob.as_slice()).map_err(|e| e.to_string())?)
    }

    #[test]
    fn trial_summaries_round_trip() {
        for t in [trial(), waiting_trial()] {
            assert_eq!(records::TrialSummary::try_from(&v1::TrialSummary::from(&t)), Ok(t.clone()));
            assert_eq!(through_blob::<_, v1::TrialSummary>(&t), Ok(t));
        }
        let w = v1::TrialSummary::from(&waiting_trial());
        assert_eq!((w.worker_id.as_str(), w.started_at_ms, w.finished_at_ms), ("", 0, 0));
    }

    #[test]
    fn sweep_summaries_round_trip() {
        for s in [sweep(None), sweep(Some(1_700_000_360_000))] {
            assert_eq!(records::SweepSummary::try_from(&v1::SweepSummary::from(&s)), Ok(s.clone()));
            assert_eq!(through_blob::<_, v1::SweepSummary>(&s), Ok(s));
        }
        let w = v1::SweepSummary::from(&sweep(None));
        assert_eq!((w.state.as_str(), w.finished_at_ms), ("failed", 0));
        let c = w.counts.unwrap();
        assert_eq!((c.completed, c.failed, c.unschedulable, c.pending), (3, 1, 2, 0));
        let bare = v1::SweepSummary { counts: None, ..v1::SweepSummary::from(&sweep(None)) };
        assert_eq!(records::SweepSummary::try_from(&bare).unwrap().counts, records::TrialCounts::default());
    }

    #[test]
    fn events_round_trip() {
        let events = [
            records::Event {
                sequence: 17,
                event: records::SweepEvent::Trial { trial: trial(), metrics: Some(metrics()), note: String::new() },
            },
            records::Event {
                sequence: 18,
                event: records::SweepEvent::Trial {
                    trial: waiting_trial(),
                    metrics: None,
                    note: "re-queued: worker w6 was lost".into(),
                },
            },
            records::Event { sequence: 19, event: records::SweepEvent::Ended(sweep(Some(1_700_000_360_000))) },
        ];
        for e in events {
            assert_eq!(records::Event::try_from(&v1::SweepEvent::from(&e)), Ok(e.clone()));
            assert_eq!(through_blob::<_, v1::SweepEvent>(&e), Ok(e));
        }
    }

    #[test]
    fn checkpoints_and_devices_round_trip() {
        let c = records::CheckpointRef {
            uri: "s3://bucket/s-42/t003/best.safetensors".into(),
            sha256: "ab".repeat(32),
            bytes: 1 << 33,
            epoch: 4,
        };
        assert_eq!(records::CheckpointRef::try_from(&v1::CheckpointRef::from(&c)), Ok(c.clone()));
        assert_eq!(through_blob::<_, v1::CheckpointRef>(&c), Ok(c));
        let d = records::Device {
            id: "cuda:1".into(),
            kind: "cuda".into(),
            name: "NVIDIA H100".into(),
            memory_bytes: 80 << 30,
        };
        assert_eq!(records::Device::try_from(&v1::Device::from(&d)), Ok(d.clone()));
        assert_eq!(through_blob::<_, v1::Device>(&d), Ok(d));
    }

    #[test]
    fn garbage_is_refused_naming_the_field() {
        let mut w = v1::TrialSummary::from(&trial());
        w.state = "bogus".into();
        assert_eq!(records::TrialSummary::try_from(&w).unwrap_err(), "trial t003: unknown state `bogus`");

        let w = v1::TrialSummary { backbone: "resnet".into(), ..v1::TrialSummary::from(&trial()) };
        assert_eq!(records::TrialSummary::try_from(&w).unwrap_err(), "trial t003: unknown backbone `resnet`");

        let w = v1::TrialSummary { lr_decay: None, ..v1::TrialSummary::from(&trial()) };
        assert_eq!(records::TrialSummary::try_from(&w).unwrap_err(), "trial t003: missing lr_decay");

        let mut w = v1::TrialSummary::from(&trial());
        w.lr_decay.as_mut().unwrap().strategy = "cosine".into();
        let e = records::TrialSummary::try_from(&w).unwrap_err();
        assert!(e.starts_with("trial t003: lr_decay: ") && e.contains("`cosine`"), "{e}");

        let w = v1::SweepSummary { state: "done".into(), ..v1::SweepSummary::from(&sweep(None)) };
        assert_eq!(records::SweepSummary::try_from(&w).unwrap_err(), "sweep s-42: unknown state `done`");

        let snapshot = v1::SweepEvent {
            sequence: 5,
            event: Some(WireEvent::Snapshot(v1::SweepStatus {
                sweep: Some(v1::SweepSummary::from(&sweep(None))),
                trials: vec![v1::TrialSummary::from(&trial())],
                spec_yaml: String::new(),
            })),
        };
        let e = records::Event::try_from(&snapshot).unwrap_err();
        assert!(e.starts_with("event 5: ") && e.contains("snapshot"), "{e}");

        let e = records::Event::try_from(&v1::SweepEvent { sequence: 6, event: None }).unwrap_err();
        assert!(e.starts_with("event 6: ") && e.contains("no event"), "{e}");

        let no_trial = v1::SweepEvent { sequence: 7, event: Some(WireEvent::Trial(v1::TrialEvent::default())) };
        let e = records::Event::try_from(&no_trial).unwrap_err();
        assert!(e.starts_with("event 7: ") && e.contains("trial"), "{e}");

        let mut bad_state = v1::SweepEvent::from(&records::Event {
            sequence: 8,
            event: records::SweepEvent::Trial { trial: trial(), metrics: None, note: String::new() },
        });
        if let Some(WireEvent::Trial(t)) = &mut bad_state.event {
            t.trial.as_mut().unwrap().state = "bogus".into();
        }
        assert_eq!(records::Event::try_from(&bad_state).unwrap_err(), "event 8: trial t003: unknown state `bogus`");

        let mut bad_metrics = v1::SweepEvent::from(&records::Event {
            sequence: 9,
            event: records::SweepEvent::Trial { trial: trial(), metrics: Some(metrics()), note: String::new() },
        });
        if let Some(WireEvent::Trial(t)) = &mut bad_metrics.event {
            t.metrics.as_mut().unwrap().phase = "warmup".into();
        }
        let e = records::Event::try_from(&bad_metrics).unwrap_err();
        assert!(e.starts_with("event 9: trial t003: metrics: ") && e.contains("`warmup`"), "{e}");
        // Values past a report's limits, as a state written before reports were checked holds:
        // still readable.
        if let Some(WireEvent::Trial(t)) = &mut bad_metrics.event {
            let m = t.metrics.as_mut().unwrap();
            (m.phase, m.val_loss, m.seconds) = ("fine_tuning".into(), f64::INFINITY, 1e300);
        }
        let old = records::Event::try_from(&bad_metrics).unwrap();
        let records::SweepEvent::Trial { metrics: Some(m), .. } = old.event else { panic!("{old:?}") };
        assert_eq!((m.val_loss, m.seconds), (f64::INFINITY, 1e300));

        let ended = v1::SweepEvent {
            sequence: 10,
            event: Some(WireEvent::Ended(v1::SweepSummary { state: "".into(), ..Default::default() })),
        };
        let e = records::Event::try_from(&ended).unwrap_err();
        assert!(e.starts_with("event 10: sweep ") && e.contains("unknown state"), "{e}");
    }

    #[test]
    fn outcomes() {
        use v1::{ErrorClass, Outcome};
        assert_eq!(
            outcome_of(Outcome::Unspecified, ErrorClass::Permanent),
            Err("outcome must be succeeded, failed or cancelled".to_string())
        );
        assert_eq!(outcome_of(Outcome::Succeeded, ErrorClass::Unspecified), Ok(records::Outcome::Succeeded));
        assert_eq!(outcome_of(Outcome::Cancelled, ErrorClass::Unspecified), Ok(records::Outcome::Cancelled));
        assert_eq!(
            outcome_of(Outcome::Failed, ErrorClass::Permanent),
            Ok(records::Outcome::Failed { permanent: true })
        );
        for class in [ErrorClass::Retryable, ErrorClass::Unspecified] {
            assert_eq!(outcome_of(Outcome::Failed, class), Ok(records::Outcome::Failed { permanent: false }));
        }
    }

    #[test]
    fn wire_forms_of_the_answers() {
        let t = trial();
        let entry = records::LeaderboardEntry {
            rank: 1,
            trial: t.clone(),
            score: sweep_core::leaderboard::Score {
                fe_val_accuracy: Some(0.5),
                best_val_accuracy: Some(0.8125),
                best_epoch: Some(4),
            },
            parameters: 134_285_000,
            wall_seconds: 300.5,
            best_checkpoint: Some(records::CheckpointRef { epoch: 4, ..Default::default() }),
            last_checkpoint: None,
            skipped_images: 2,
        };
        let w = v1::LeaderboardEntry::from(&entry);
        assert_eq!(
            (w.trial_id.as_str(), w.backbone.as_str(), w.state.as_str(), w.best_epoch, w.fe_val_accuracy),
            ("t003", "vgg16_bn", "running", Some(4), Some(0.5))
        );
        assert_eq!(w.lr_decay.unwrap().strategy, "linear");
        assert_eq!((w.best_checkpoint.map(|c| c.epoch), w.last_checkpoint), (Some(4), None));

        let board =
            records::Leaderboard { sweep_id: "s-42".into(), sweep_state: SweepState::Running, entries: vec![entry] };
        let w = v1::Leaderboard::from(&board);
        assert_eq!((w.sweep_state.as_str(), w.entries.len()), ("running", 1));
        assert_eq!(w.entries[0].sweep_id, "s-42");

        let detail = records::TrialDetail {
            trial: t.clone(),
            metrics: vec![records::EpochRecord {
                metrics: metrics(),
                attempt_id: 9,
                shared_with: vec!["t004".into()],
                reused_from: "s-old/t002".into(),
            }],
            attempts: vec![records::AttemptInfo {
                attempt_id: 9,
                worker_id: "w7".into(),
                state: sweep_core::state::AttemptState::Running,
                started_at_ms: 1_700_000_000_123,
                ended_at_ms: None,
                error: String::new(),
                note: "resumed from epoch 3".into(),
                resumed_from_epoch: 3,
            }],
            parameters: 1,
            best_checkpoint: None,
            last_checkpoint: None,
            skipped_images: 0,
        };
        let w = v1::TrialDetail::from(&detail);
        assert_eq!((w.metrics[0].attempt_id, w.metrics[0].epoch, w.metrics[0].phase.as_str()), (9, 4, "fine_tuning"));
        assert_eq!((w.attempts[0].state.as_str(), w.attempts[0].ended_at_ms), ("running", 0));
        assert_eq!(w.trial.unwrap().trial_id, "t003");

        let worker = records::WorkerInfo {
            worker_id: "w7".into(),
            name: "host-1".into(),
            incarnation: 2,
            devices: vec![records::Device { id: "cuda:0".into(), ..Default::default() }],
            state: sweep_core::state::WorkerState::Quarantined,
            registered_at_ms: 1,
            last_seen_ms: 2,
            running: vec![("s-42".into(), "t003".into())],
            busy: vec![records::DeviceUse {
                device: "cuda:0".into(),
                sweep_id: "s-42".into(),
                trial_id: "t003".into(),
                attempt_id: 9,
            }],
            note: "3 failures in a row".into(),
        };
        let w = v1::WorkerInfo::from(&worker);
        assert_eq!((w.state.as_str(), w.running, w.busy[0].attempt_id), ("quarantined", vec!["s-42/t003".into()], 9));

        let status = records::SweepStatus { sweep: sweep(None), trials: vec![t.clone()], spec_yaml: "name: x".into() };
        let w = v1::SweepStatus::from(&status);
        assert_eq!((w.sweep.unwrap().id.as_str(), w.trials.len()), ("s-42", 1));

        let w = v1::CancelSweepResponse::from(&records::Cancelled { pending: 3, stopping: 2 });
        assert_eq!((w.cancelled_pending, w.stopping_running), (3, 2));

        let a = records::Assignment {
            attempt_id: 9,
            sweep_id: "s-42".into(),
            trial_id: "t003".into(),
            trial_index: 3,
            spec_yaml: "name: x".into(),
            backbone: Backbone::Densenet121,
            lr_decay: LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 },
            fe_epochs: 2,
            ft_epochs: 5,
            attempt_number: 2,
            devices: vec!["cuda:0".into()],
            resume: Some(records::CheckpointRef { epoch: 3, ..Default::default() }),
            sharing: true,
        };
        let w = v1::Assignment::from(&a);
        assert_eq!((w.backbone.as_str(), w.resume.map(|c| c.epoch)), ("densenet121", Some(3)));
        assert!(w.sharing);
        assert_eq!(w.lr_decay.unwrap().factor, 3.0);
    }
}
