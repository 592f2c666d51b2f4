//! The durable store, through the [`Store`] trait in domain terms: what is committed survives
//! reopening the state; the trial lifecycle, fencing of stale attempts, retries and `retry`,
//! cancellation, device placement, quarantine, paging and the leaderboard are computed from what
//! is stored; and the stored history passes the history checker.
//!
//! The behavioural suite is backend-independent: each test is a function generic over
//! `S: Store` that opens its store through an `open(dir, clock)` closure (called twice on one
//! directory by the reopen test, after the first store is dropped), and [`store_suite!`] turns
//! every one of them into a `#[test]` for a backend. A new backend joins with one line:
//!
//! ```ignore
//! store_suite!(mybackend, |dir, clock| MyStore::open_with_clock(dir, clock).unwrap());
//! ```
//!
//! A new suite test is a generic function here plus its name in [`store_suite!`]'s list (one that
//! is not listed is dead code, which clippy refuses). Tests about SQLite's file format or the
//! state directory itself stay outside the macro, at the end of this file.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sweep_coordinator::clock::{Clock, ManualClock, SystemClock};
use sweep_coordinator::history;
use sweep_coordinator::store::{Caller, ReportExtras, SqliteStore, Store, StoreError};
use sweep_core::Backbone;
use sweep_core::leaderboard::{EpochMetrics, Phase};
use sweep_core::records::{Assignment, CheckpointRef, Device, DeviceUse, Outcome, StopReason, SweepEvent, WorkerInfo};
use sweep_core::spec;
use sweep_core::state::{AttemptState, SweepState, TrialState, WorkerState};

/// Instantiates the backend-independent suite for one backend: `mod $backend` with one
/// `#[test]` per suite test. `$open` is a closure `|dir: &Path, clock: Arc<dyn Clock>|` returning
/// the backend's store (`impl Store`) on that state directory.
macro_rules! store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            // What `$open` names, as written where the macro is called.
            use super::*;

            store_suite!(@tests $open;
                committed_state_survives_reopening,
                a_sweep_runs_to_completion_and_ranks_by_best_fine_tuning_accuracy,
                stale_attempts_are_fenced,
                pretraining_progress_is_logged_for_the_current_attempt_before_its_first_epoch,
                retryable_failures_are_retried_until_max_attempts_and_permanent_ones_fail_at_once,
                bad_reports_are_refused_and_change_nothing,
                a_resumed_epoch_supersedes_and_never_duplicates,
                cancelling_stops_pending_trials_and_asks_running_ones_to_stop,
                sweep_ids_accept_unique_prefixes,
                gpus_per_trial_beyond_a_worker_is_not_handed_to_it,
                checkpoints_and_skipped_images_are_stored_and_ranked_with_their_trial,
                a_worker_runs_several_trials_at_once_on_disjoint_devices,
                one_device_trials_fill_every_device,
                a_trial_no_worker_can_hold_is_unschedulable_until_one_can,
                bad_device_lists_are_refused,
                a_worker_failing_attempts_in_a_row_is_quarantined_and_gets_no_more_trials,
                retry_requeues_failed_trials_with_a_fresh_budget,
                lists_come_in_bounded_pages_and_workers_gone_for_long_are_forgotten,
                tags_and_notes_are_kept_listed_by_tag_and_bad_ones_change_nothing,
                a_trial_whose_every_epoch_is_stored_completes_whatever_ends_its_attempt,
                permanent_failures_count_toward_quarantine_only_where_other_workers_ran_the_sweep,
                asha_pauses_trials_at_rungs_promotes_the_top_and_stops_the_rest_when_a_rung_closes,
                a_cancelled_sweep_cancels_trials_stopped_early_and_decides_nothing_more,
                a_trial_that_failed_at_a_rung_is_judged_there_after_retry,
                a_shared_stage_runs_once_and_its_epochs_belong_to_every_trial_through_it,
                when_a_stages_runner_ends_another_trial_of_the_stage_takes_over,
                with_sharing_off_every_trial_runs_alone,
                a_shared_sweep_reopened_by_retry_hands_out_only_what_waits,
                a_later_sweep_starts_each_trial_from_the_stored_stages_it_contains,
                reused_epochs_bring_early_stopping_decisions_and_damaged_points_are_passed_over,
            );
        }
    };
    (@tests $open:expr; $($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                super::$test(&super::opener($open));
            }
        )+
    };
}

store_suite!(sqlite, |dir, clock| SqliteStore::open_with_clock(dir, clock).unwrap());

/// How a suite test opens its backend's store: on a state directory, with a clock.
type Open<'a, S> = &'a dyn Fn(&Path, Arc<dyn Clock>) -> S;

/// Gives a backend's `open` closure its signature (its arguments need no type annotations).
fn opener<S: Store>(open: impl Fn(&Path, Arc<dyn Clock>) -> S) -> impl Fn(&Path, Arc<dyn Clock>) -> S {
    open
}

/// The system's wall clock, for tests that do not move time by hand.
fn wall() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

const SPEC: &str = "\
name: Store Test
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 1]]
retries: { max_attempts: 2 }
";

fn cpu() -> Vec<Device> {
    vec![Device { id: "cpu:0".into(), kind: "cpu".into(), name: "test cpu".into(), memory_bytes: 0 }]
}

fn metrics(epoch: u32, fe: u32, val: f64) -> EpochMetrics {
    EpochMetrics {
        epoch,
        phase: Phase::of_epoch(epoch, fe),
        train_loss: 1.0 / epoch as f64,
        train_accuracy: val,
        val_loss: 1.0,
        val_accuracy: val,
        seconds: 0.5,
    }
}

/// Registers a worker without a token (as on a coordinator without `--tokens`): the caller
/// its later calls name, and its incarnation.
fn register(store: &mut impl Store, name: &str, devices: &[Device]) -> (Caller, u64) {
    let r = store.register(name, devices, "test", "").unwrap();
    (Caller { worker_id: r.worker_id, session: r.session, owner: String::new() }, r.incarnation)
}

fn extras(parameters: u64) -> ReportExtras {
    ReportExtras { parameters, ..Default::default() }
}

fn submit(store: &mut impl Store) -> String {
    let parsed = spec::parse(SPEC).unwrap();
    let submitted = store.submit(SPEC, "test.yaml", &parsed).unwrap();
    let (id, n) = (submitted.sweep_id, submitted.trial_count);
    assert_eq!(n, 2);
    id
}

/// Runs a whole attempt: acquire, report every epoch with the given accuracies, succeed.
fn complete(store: &mut impl Store, worker: &Caller, inc: u64, accs: [f64; 2]) -> Assignment {
    let a = store.acquire(worker, inc).unwrap().expect("a trial is pending");
    for (i, acc) in accs.iter().enumerate() {
        store.report_epoch(worker, a.attempt_id, &metrics(i as u32 + 1, a.fe_epochs, *acc), &extras(1234)).unwrap();
    }
    store.finish_attempt(worker, a.attempt_id, Outcome::Succeeded, "", 2.0).unwrap();
    a
}

fn devices(kind: &str, n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| Device {
            id: format!("{kind}:{i}"),
            kind: kind.into(),
            name: format!("fake {kind} {i}"),
            memory_bytes: 0,
        })
        .collect()
}

fn spec_with(gpus: u32, splits: usize) -> String {
    let list: Vec<String> = (1..=splits).map(|i| format!("[{i}, 1]")).collect();
    format!(
        "name: placement\ndataset: {{ kind: synthetic }}\ngrid:\n  backbone: [resnet18]\n  lr_decay: [{{ strategy: linear }}]\n  epoch_split: [{}]\nresources: {{ gpus_per_trial: {gpus} }}\nsharing: off\n",
        list.join(", ")
    )
}

fn submit_text(store: &mut impl Store, text: &str) -> String {
    store.submit(text, "t", &spec::parse(text).unwrap()).unwrap().sweep_id
}

/// Acquires a trial and fails its attempt, permanently or retryably.
fn fail(store: &mut impl Store, worker: &Caller, inc: u64, permanent: bool) -> Assignment {
    let a = store.acquire(worker, inc).unwrap().expect("a trial is pending");
    store.finish_attempt(worker, a.attempt_id, Outcome::Failed { permanent }, "no such file /data/x", 1.0).unwrap();
    a
}

/// A deadline that expires `worker` but not the others (seen later).
fn now_before(store: &impl Store, worker: &str) -> i64 {
    let w = store.workers().unwrap().into_iter().find(|w| w.worker_id == worker).unwrap();
    w.last_seen_ms + 1
}

/// An upper bound on the bytes `w` takes on the wire (protobuf): every string with 4 bytes of
/// tag and length, every number 11 bytes, every nested message 5 bytes of tag and length.
fn wire_bytes_at_most(w: &WorkerInfo) -> usize {
    let s = |s: &str| s.len() + 4;
    let device = |d: &Device| 5 + s(&d.id) + s(&d.kind) + s(&d.name) + 11;
    let busy = |u: &DeviceUse| 5 + s(&u.device) + s(&u.sweep_id) + s(&u.trial_id) + 11;
    s(&w.worker_id)
        + s(&w.name)
        + 11
        + w.devices.iter().map(device).sum::<usize>()
        + s(w.state.as_str())
        + 2 * 11
        + w.running.iter().map(|(sweep, trial)| s(sweep) + 1 + s(trial)).sum::<usize>()
        + w.busy.iter().map(busy).sum::<usize>()
        + s(&w.note)
}

// ---- the backend-independent suite ----

fn committed_state_survives_reopening<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let (sweep, attempt) = {
        let mut store = open(dir.path(), wall());
        let sweep = submit(&mut store);
        assert!(sweep.starts_with("store-test-"), "{sweep}");
        let (w, inc) = register(&mut store, "w", &cpu());
        let a = store.acquire(&w, inc).unwrap().unwrap();
        store.report_epoch(&w, a.attempt_id, &metrics(1, 1, 0.4), &extras(99)).unwrap();
        (sweep, a.attempt_id)
        // dropped: the store closes like a process that ends
    };
    let store = open(dir.path(), wall());
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.spec_yaml, SPEC);
    assert_eq!(status.sweep.state, SweepState::Running);
    assert_eq!(status.trials.len(), 2);
    assert_eq!(status.trials[0].state, TrialState::Running);
    assert_eq!(status.trials[0].epochs_done, 1);
    let detail = store.trial(&sweep, "t000").unwrap();
    assert_eq!(detail.metrics.len(), 1);
    assert_eq!(detail.metrics[0].metrics.val_accuracy, 0.4);
    assert_eq!(detail.parameters, 99);
    assert_eq!(detail.attempts[0].attempt_id, attempt);
    assert_eq!(store.workers().unwrap().len(), 1);
    assert!(store.last_sequence().unwrap() > 0);
}

fn a_sweep_runs_to_completion_and_ranks_by_best_fine_tuning_accuracy<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    let a = complete(&mut store, &w, inc, [0.5, 0.6]);
    assert_eq!(a.trial_id, "t000");
    assert_eq!(a.backbone, Backbone::Resnet18);
    assert_eq!(a.spec_yaml, SPEC);
    let b = complete(&mut store, &w, inc, [0.3, 0.9]);
    assert_eq!(b.trial_id, "t001");
    assert!(store.acquire(&w, inc).unwrap().is_none());

    let summary = store.get_sweep(&sweep).unwrap().sweep;
    assert_eq!(summary.state, SweepState::Completed);
    assert_eq!(summary.counts.get(TrialState::Completed), 2);
    assert!(summary.finished_at_ms.is_some());

    let board = store.leaderboard(&sweep).unwrap();
    let order: Vec<_> = board.entries.iter().map(|e| (e.rank, e.trial.trial_id.as_str())).collect();
    assert_eq!(order, vec![(1, "t001"), (2, "t000")]);
    let top = &board.entries[0];
    assert_eq!(
        (top.score.fe_val_accuracy, top.score.best_val_accuracy, top.score.best_epoch),
        (Some(0.3), Some(0.9), Some(2))
    );
    assert_eq!(top.parameters, 1234);
    assert_eq!(top.wall_seconds, 2.0);

    // The event log ends with the sweep's end.
    let events = store.events_after(&sweep, 0, 1000).unwrap();
    assert!(matches!(events.last().unwrap().event, SweepEvent::Ended(_)));
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
}

fn stale_attempts_are_fenced<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    submit(&mut store);
    let (w1, i1) = register(&mut store, "w1", &cpu());
    let a = store.acquire(&w1, i1).unwrap().unwrap();
    // The attempt ends (here: the worker's lease ends) and the trial goes to another worker.
    store.expire_workers(i64::MAX).unwrap();
    let (w2, i2) = register(&mut store, "w2", &cpu());
    let b = store.acquire(&w2, i2).unwrap().unwrap();
    assert_eq!(a.trial_id, b.trial_id);
    assert_eq!(b.attempt_number, 2);

    let err = store.report_epoch(&w1, a.attempt_id, &metrics(1, 1, 0.1), &extras(1)).unwrap_err();
    assert!(matches!(err, StoreError::WrongState(_)), "{err}");
    let err = store.finish_attempt(&w1, a.attempt_id, Outcome::Succeeded, "", 1.0).unwrap_err();
    assert!(matches!(err, StoreError::WrongState(_)), "{err}");
    // The lost worker's incarnation is refused too.
    assert!(matches!(store.acquire(&w1, i1).unwrap_err(), StoreError::WrongState(_)));
    assert!(matches!(store.heartbeat(&w1, i1, &[]).unwrap_err(), StoreError::WrongState(_)));
    // Nothing the stale attempt sent was stored.
    let sweep = store.list_sweeps().unwrap()[0].id.clone();
    assert!(store.trial(&sweep, &a.trial_id).unwrap().metrics.is_empty());
    // A heartbeat from the new owner asks it to stop the old attempt if it claims to run it.
    assert_eq!(store.heartbeat(&w2, i2, &[a.attempt_id, b.attempt_id]).unwrap(), vec![a.attempt_id]);
}

fn pretraining_progress_is_logged_for_the_current_attempt_before_its_first_epoch<S: Store>(open: Open<S>) {
    use sweep_core::records::PretrainProgress;
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    let a = store.acquire(&w, inc).unwrap().unwrap();
    let p = PretrainProgress { backbone: a.backbone, epoch: 1, epochs: 3, seconds: 12.5, waiting: false };
    assert!(!store.report_progress(&w, a.attempt_id, &p).unwrap());
    let notes: Vec<String> = store
        .events_after(&sweep, 0, 100)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            SweepEvent::Trial { trial, metrics: None, note } if trial.trial_id == a.trial_id => Some(note),
            _ => None,
        })
        .collect();
    assert!(notes.contains(&p.note()), "{notes:?}");
    // Another backbone than the attempt's, another worker, or an attempt past its first
    // epoch: refused, nothing logged.
    let pretraining_notes = |store: &S| {
        store
            .events_after(&sweep, 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| matches!(&e.event, SweepEvent::Trial { note, .. } if note.starts_with("pretraining")))
            .count()
    };
    assert_eq!(pretraining_notes(&store), 1);
    let other = if a.backbone == Backbone::Resnet50 { Backbone::Resnet18 } else { Backbone::Resnet50 };
    let e = store.report_progress(&w, a.attempt_id, &PretrainProgress { backbone: other, ..p.clone() }).unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    let (x, _) = register(&mut store, "x", &cpu());
    assert!(store.report_progress(&x, a.attempt_id, &p).is_err());
    store.report_epoch(&w, a.attempt_id, &metrics(1, a.fe_epochs, 0.5), &extras(1)).unwrap();
    let e = store.report_progress(&w, a.attempt_id, &p).unwrap_err();
    assert!(matches!(e, StoreError::WrongState(_)), "{e}");
    assert_eq!(pretraining_notes(&store), 1, "nothing refused was logged");
}

fn retryable_failures_are_retried_until_max_attempts_and_permanent_ones_fail_at_once<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());

    let a = store.acquire(&w, inc).unwrap().unwrap();
    store.finish_attempt(&w, a.attempt_id, Outcome::Failed { permanent: false }, "disk hiccup", 1.0).unwrap();
    let t = &store.get_sweep(&sweep).unwrap().trials[0];
    assert_eq!((t.state, t.attempts, t.error.as_str()), (TrialState::Pending, 1, "disk hiccup"));

    let a = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!((a.trial_id.as_str(), a.attempt_number), ("t000", 2));
    store.finish_attempt(&w, a.attempt_id, Outcome::Failed { permanent: false }, "disk hiccup", 1.0).unwrap();
    let t = &store.get_sweep(&sweep).unwrap().trials[0];
    assert_eq!(t.state, TrialState::Failed);
    assert!(t.error.contains("no attempts left"), "{}", t.error);

    let b = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(b.trial_id, "t001");
    store
        .finish_attempt(&w, b.attempt_id, Outcome::Failed { permanent: true }, "dataset root /x does not exist", 1.0)
        .unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.trials[1].state, TrialState::Failed);
    assert_eq!(status.trials[1].attempts, 1);
    assert_eq!(status.sweep.state, SweepState::Failed);
}

fn bad_reports_are_refused_and_change_nothing<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    let a = store.acquire(&w, inc).unwrap().unwrap();
    // Past the end, wrong phase, out of order, unknown attempt.
    for (m, id) in [
        (metrics(3, 1, 0.5), a.attempt_id),
        (EpochMetrics { phase: Phase::FineTuning, ..metrics(1, 1, 0.5) }, a.attempt_id),
        (metrics(2, 1, 0.5), a.attempt_id),
        (metrics(1, 1, 0.5), 999_999),
    ] {
        assert!(store.report_epoch(&w, id, &m, &extras(1)).is_err());
    }
    // Success without every epoch's metrics.
    assert!(matches!(
        store.finish_attempt(&w, a.attempt_id, Outcome::Succeeded, "", 1.0),
        Err(StoreError::WrongState(_))
    ));
    assert!(store.trial(&sweep, "t000").unwrap().metrics.is_empty());
    assert_eq!(store.get_sweep(&sweep).unwrap().trials[0].state, TrialState::Running);
    // Unknown ids.
    assert!(matches!(store.get_sweep("nope"), Err(StoreError::NotFound(_))));
    assert!(matches!(store.trial(&sweep, "t999"), Err(StoreError::NotFound(_))));
    assert!(matches!(store.trial(&sweep, "zzz"), Err(StoreError::Invalid(_))));
    let stranger = Caller { worker_id: "w404".into(), session: "0".repeat(64), owner: String::new() };
    assert!(matches!(store.acquire(&stranger, 1), Err(StoreError::NotFound(_))));
    assert!(matches!(store.register("x", &[], "t", ""), Err(StoreError::Invalid(_))));
}

fn a_resumed_epoch_supersedes_and_never_duplicates<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    let a = store.acquire(&w, inc).unwrap().unwrap();
    store.report_epoch(&w, a.attempt_id, &metrics(1, 1, 0.2), &extras(1)).unwrap();
    store.finish_attempt(&w, a.attempt_id, Outcome::Failed { permanent: false }, "oom", 1.0).unwrap();
    let b = store.acquire(&w, inc).unwrap().unwrap();
    store.report_epoch(&w, b.attempt_id, &metrics(1, 1, 0.25), &extras(1)).unwrap();
    let detail = store.trial(&sweep, "t000").unwrap();
    assert_eq!(detail.metrics.len(), 1);
    assert_eq!(detail.metrics[0].metrics.val_accuracy, 0.25);
}

fn cancelling_stops_pending_trials_and_asks_running_ones_to_stop<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    let a = store.acquire(&w, inc).unwrap().unwrap();
    let r = store.cancel_sweep(&sweep[..8]).unwrap();
    assert_eq!((r.pending, r.stopping), (1, 1));
    assert_eq!(store.heartbeat(&w, inc, &[a.attempt_id]).unwrap(), vec![a.attempt_id]);
    let reply = store.report_epoch(&w, a.attempt_id, &metrics(1, 1, 0.3), &extras(1)).unwrap();
    assert_eq!(reply.stop, Some(StopReason::SweepCancelled), "report says: stop");
    let (w2, inc2) = register(&mut store, "w2", &cpu());
    assert!(store.acquire(&w2, inc2).unwrap().is_none(), "nothing of a cancelled sweep is handed out");
    store.finish_attempt(&w, a.attempt_id, Outcome::Cancelled, "stopped", 1.0).unwrap();
    let s = store.get_sweep(&sweep).unwrap().sweep;
    assert_eq!(s.state, SweepState::Cancelled);
    assert!(s.finished_at_ms.is_some());
}

fn sweep_ids_accept_unique_prefixes<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let a = submit(&mut store);
    let b = submit(&mut store);
    assert_ne!(a, b);
    assert_eq!(store.get_sweep(&a).unwrap().sweep.id, a);
    assert!(matches!(store.get_sweep("store-test"), Err(StoreError::Invalid(_))));
    let listed: Vec<_> = store.list_sweeps().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(listed, vec![b, a], "newest first");
}

fn gpus_per_trial_beyond_a_worker_is_not_handed_to_it<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let text = SPEC.replace("retries: { max_attempts: 2 }", "resources: { gpus_per_trial: 2 }");
    store.submit(&text, "t", &spec::parse(&text).unwrap()).unwrap();
    let (w, inc) = register(&mut store, "w", &cpu());
    assert!(store.acquire(&w, inc).unwrap().is_none());
    let two = vec![cpu()[0].clone(), Device { id: "cpu:1".into(), ..cpu()[0].clone() }];
    let (w2, inc2) = register(&mut store, "w2", &two);
    assert!(store.acquire(&w2, inc2).unwrap().is_some());
}

fn checkpoints_and_skipped_images_are_stored_and_ranked_with_their_trial<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    let a = store.acquire(&w, inc).unwrap().unwrap();
    let own = format!("/a/{sweep}/t000");
    let ckpt = |name: &str, epoch| CheckpointRef {
        uri: format!("{own}/{name}.safetensors"),
        sha256: "ab".repeat(32),
        bytes: 7,
        epoch,
    };
    let first = ReportExtras {
        parameters: 5,
        last_checkpoint: Some(ckpt("last", 1)),
        best_checkpoint: Some(ckpt("best", 1)),
        skipped_images: 2,
        ..Default::default()
    };
    store.report_epoch(&w, a.attempt_id, &metrics(1, 1, 0.6), &first).unwrap();
    // Epoch 2 is worse: only the last checkpoint moves.
    let second = ReportExtras { last_checkpoint: Some(ckpt("last", 2)), best_checkpoint: None, ..first.clone() };
    store.report_epoch(&w, a.attempt_id, &metrics(2, 1, 0.5), &second).unwrap();
    // A checkpoint that claims another epoch is refused, and the whole report with it.
    let bad = ReportExtras { last_checkpoint: Some(ckpt("last", 1)), ..second.clone() };
    assert!(matches!(store.report_epoch(&w, a.attempt_id, &metrics(2, 1, 0.9), &bad), Err(StoreError::Invalid(_))));
    // References that are not this trial's own, or unverifiable, are refused with the report.
    let foreign = |uri: String, sha256: String| ReportExtras {
        resume_checkpoint: Some(CheckpointRef { uri, sha256, bytes: 7, epoch: 2 }),
        ..second.clone()
    };
    for (extras, fragment) in [
        (foreign("/a/other-sweep-0001/t000/state-e0002.safetensors".into(), "ab".repeat(32)), "not this trial's own"),
        (foreign(format!("{own}/../../other-0001/t000/state-e0002.safetensors"), "ab".repeat(32)), "`..` segment"),
        (foreign(format!("{own}/state-e0001.safetensors"), "ab".repeat(32)), "must end in"),
        (foreign(format!("{own}/state-e0002.safetensors"), String::new()), "sha256 must be 64"),
        (foreign(format!("{own}/state-e0002.safetensors"), "AB".repeat(32)), "sha256 must be 64"),
        (foreign(format!("{own}/state-e0002.safetensors\u{1b}[2J"), "ab".repeat(32)), "control characters"),
        (ReportExtras { best_checkpoint: Some(ckpt("last", 2)), ..second.clone() }, "best.safetensors"),
    ] {
        let e = store.report_epoch(&w, a.attempt_id, &metrics(2, 1, 0.9), &extras).unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)) && e.to_string().contains(fragment), "{fragment}: {e}");
    }
    assert_eq!(store.trial(&sweep, "t000").unwrap().metrics[1].metrics.val_accuracy, 0.5);

    let board = store.leaderboard(&sweep).unwrap();
    let e = board.entries.iter().find(|e| e.trial.trial_id == "t000").unwrap();
    assert_eq!(
        e.best_checkpoint.as_ref().map(|c| (c.uri.as_str(), c.epoch)),
        Some((format!("{own}/best.safetensors").as_str(), 1))
    );
    assert_eq!(
        e.last_checkpoint.as_ref().map(|c| (c.uri.as_str(), c.epoch)),
        Some((format!("{own}/last.safetensors").as_str(), 2))
    );
    assert_eq!(e.skipped_images, 2);
    let d = store.trial(&sweep, "t000").unwrap();
    assert_eq!(d.best_checkpoint.unwrap().sha256, "ab".repeat(32));
    assert_eq!(d.skipped_images, 2);
}

fn a_worker_runs_several_trials_at_once_on_disjoint_devices<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, &spec_with(2, 3));
    let (w, inc) = register(&mut store, "eight", &devices("cuda", 4));
    let a = store.acquire(&w, inc).unwrap().unwrap();
    let b = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(a.devices, vec!["cuda:0", "cuda:1"]);
    assert_eq!(b.devices, vec!["cuda:2", "cuda:3"]);
    assert!(store.acquire(&w, inc).unwrap().is_none(), "every device is busy");
    // `sweep workers` shows which devices are busy with what.
    let info = store.workers().unwrap().remove(0);
    let busy: Vec<_> = info.busy.iter().map(|u| (u.device.as_str(), u.trial_id.as_str())).collect();
    assert_eq!(busy, vec![("cuda:0", "t000"), ("cuda:1", "t000"), ("cuda:2", "t001"), ("cuda:3", "t001")]);
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.trials[1].devices, vec!["cuda:2", "cuda:3"]);
    // Finishing one frees its devices for the next trial.
    store.finish_attempt(&w, a.attempt_id, Outcome::Failed { permanent: true }, "x", 1.0).unwrap();
    let c = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!((c.trial_id.as_str(), c.devices.clone()), ("t002", vec!["cuda:0".to_string(), "cuda:1".to_string()]));
}

fn one_device_trials_fill_every_device<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    submit_text(&mut store, &spec_with(1, 10));
    let (w, inc) = register(&mut store, "eight", &devices("cuda", 8));
    let got: Vec<String> = (0..8).map(|_| store.acquire(&w, inc).unwrap().unwrap().devices.join(",")).collect();
    assert_eq!(got, (0..8).map(|i| format!("cuda:{i}")).collect::<Vec<_>>());
    assert!(store.acquire(&w, inc).unwrap().is_none());
}

fn a_trial_no_worker_can_hold_is_unschedulable_until_one_can<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut store = open(dir.path(), clock.clone());
    let sweep = submit_text(&mut store, &spec_with(4, 2));
    // No worker yet: the trials wait for one; that is not infeasible.
    assert_eq!(store.get_sweep(&sweep).unwrap().trials[0].state, TrialState::Pending);

    let (small, small_inc) = register(&mut store, "small", &devices("cuda", 2));
    let status = store.get_sweep(&sweep).unwrap();
    let t = &status.trials[0];
    assert_eq!(t.state, TrialState::Unschedulable);
    assert!(
        t.error.contains("needs 4 devices") && t.error.contains(&format!("{}, has 2", small.worker_id)),
        "{}",
        t.error
    );
    assert_eq!(status.sweep.counts.get(TrialState::Unschedulable), 2);
    assert!(store.acquire(&small, small_inc).unwrap().is_none());

    let (big, big_inc) = register(&mut store, "big", &devices("cuda", 4));
    let t = &store.get_sweep(&sweep).unwrap().trials[0];
    assert_eq!((t.state, t.error.as_str()), (TrialState::Pending, ""));
    let a = store.acquire(&big, big_inc).unwrap().unwrap();
    assert_eq!(a.devices.len(), 4);

    // The big worker goes away: what is left waiting becomes unschedulable again.
    clock.advance(Duration::from_millis(5));
    store.heartbeat(&small, small_inc, &[]).unwrap();
    store.expire_workers(now_before(&store, &big.worker_id)).unwrap();
    assert_eq!(store.workers().unwrap().iter().filter(|w| w.state == WorkerState::Active).count(), 1);
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.trials[1].state, TrialState::Unschedulable);
    // Its running attempt was lost; with attempts left the trial waits, unschedulable too.
    assert_eq!(status.trials[0].state, TrialState::Unschedulable);
    // Cancelling the sweep cancels unschedulable trials.
    let r = store.cancel_sweep(&sweep).unwrap();
    assert_eq!(r.pending, 2);
}

fn bad_device_lists_are_refused<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let mut twice = devices("cpu", 2);
    twice[1].id = "cpu:0".into();
    assert!(matches!(store.register("w", &twice, "t", ""), Err(StoreError::Invalid(_))));
    let mut comma = devices("cpu", 1);
    comma[0].id = "cpu:0,cpu:1".into();
    assert!(matches!(store.register("w", &comma, "t", ""), Err(StoreError::Invalid(_))));
}

fn a_worker_failing_attempts_in_a_row_is_quarantined_and_gets_no_more_trials<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    store.set_quarantine_after(2).unwrap();
    let sweep = submit_text(&mut store, &spec_with(1, 4).replace("max_attempts: 2", "max_attempts: 5"));
    let (bad, bad_inc) = register(&mut store, "bad", &cpu());
    let (good, good_inc) = register(&mut store, "good", &cpu());
    // A success resets the count: fail, succeed, fail — still active. Permanent failures (a bad
    // spec: nothing about the worker) never count, however many.
    fail(&mut store, &bad, bad_inc, false);
    let a = store.acquire(&bad, bad_inc).unwrap().unwrap();
    for e in 1..=a.fe_epochs + a.ft_epochs {
        store.report_epoch(&bad, a.attempt_id, &metrics(e, a.fe_epochs, 0.5), &extras(1)).unwrap();
    }
    store.finish_attempt(&bad, a.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    fail(&mut store, &bad, bad_inc, false);
    fail(&mut store, &bad, bad_inc, true);
    fail(&mut store, &bad, bad_inc, true);
    let state = |store: &S, id: &str| {
        store.workers().unwrap().into_iter().find(|w| w.worker_id == id).map(|w| (w.state, w.note)).unwrap()
    };
    assert_eq!(state(&store, &bad.worker_id).0, WorkerState::Active);
    // A second failure in a row: quarantined, with the reason.
    fail(&mut store, &bad, bad_inc, false);
    let (s, note) = state(&store, &bad.worker_id);
    assert_eq!(s, WorkerState::Quarantined);
    assert!(note.contains("2 attempts failed in a row") && note.contains("no such file /data/x"), "{note}");
    // It keeps its lease but gets nothing; the healthy worker takes the work.
    assert!(store.heartbeat(&bad, bad_inc, &[]).is_ok());
    assert!(store.acquire(&bad, bad_inc).unwrap().is_none());
    assert!(store.acquire(&good, good_inc).unwrap().is_some());
    assert_eq!(state(&store, &good.worker_id).0, WorkerState::Active);
    // Registering again (a restarted daemon) is a new, active worker.
    let (again, _) = register(&mut store, "bad", &cpu());
    assert_eq!(state(&store, &again.worker_id).0, WorkerState::Active);
    let _ = sweep;
}

fn retry_requeues_failed_trials_with_a_fresh_budget<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    store.set_quarantine_after(0).unwrap();
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    // t000 fails for good (permanent); t001 uses up its 2 attempts.
    fail(&mut store, &w, inc, true);
    fail(&mut store, &w, inc, false);
    fail(&mut store, &w, inc, false);
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.sweep.state, SweepState::Failed);
    assert!(status.trials.iter().all(|t| t.state == TrialState::Failed));

    // Bad requests change nothing.
    assert!(matches!(store.retry_sweep(&sweep, &["t009".into()]), Err(StoreError::NotFound(_))));
    assert!(matches!(store.retry_sweep("nope", &[]), Err(StoreError::NotFound(_))));
    assert_eq!(store.retry_sweep(&sweep, &["t001".into()]).unwrap(), ["t001"]);
    let e = store.retry_sweep(&sweep, &["t001".into()]).unwrap_err();
    assert!(e.to_string().contains("t001") && e.to_string().contains("pending"), "{e}");
    assert_eq!(store.retry_sweep(&sweep, &[]).unwrap(), ["t000"]);
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!((status.sweep.state, status.sweep.finished_at_ms), (SweepState::Pending, None));
    assert!(status.trials.iter().all(|t| t.state == TrialState::Pending && t.error.is_empty()));
    // A fresh budget: each may fail once more and still be retried, then completes.
    fail(&mut store, &w, inc, false);
    assert!(store.get_sweep(&sweep).unwrap().trials.iter().any(|t| t.state == TrialState::Pending));
    complete(&mut store, &w, inc, [0.5, 0.6]);
    complete(&mut store, &w, inc, [0.5, 0.7]);
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.sweep.state, SweepState::Completed);
    assert_eq!(store.retry_sweep(&sweep, &[]).unwrap(), Vec::<String>::new());

    // A cancelled sweep is not retried.
    let other = submit(&mut store);
    store.cancel_sweep(&other).unwrap();
    let e = store.retry_sweep(&other, &[]).unwrap_err();
    assert!(matches!(e, StoreError::WrongState(_)), "{e}");
}

fn tags_and_notes_are_kept_listed_by_tag_and_bad_ones_change_nothing<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let a = submit(&mut store);
    let b = submit(&mut store);
    let tags = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let s = store.update_sweep(&a, &tags(&["resnet", "baseline", "resnet"]), &[], Some("first try\nImageNet")).unwrap();
    assert_eq!((s.tags.clone(), s.note.as_str()), (tags(&["baseline", "resnet"]), "first try\nImageNet"));
    store.update_sweep(&b, &tags(&["resnet"]), &[], None).unwrap();
    let listed = |store: &S, tag: &str| {
        store.list_sweeps_page(100, "", tag).unwrap().items.into_iter().map(|s| s.id).collect::<Vec<_>>()
    };
    assert_eq!(listed(&store, "resnet"), [b.clone(), a.clone()]);
    assert_eq!(listed(&store, "baseline"), std::slice::from_ref(&a));
    assert_eq!(listed(&store, "base"), Vec::<String>::new(), "a tag matches whole");
    assert_eq!(listed(&store, "").len(), 2);
    // Removing, and a note left as it is when none is given; an empty note removes it.
    let s = store.update_sweep(&a, &[], &tags(&["resnet", "absent"]), None).unwrap();
    assert_eq!((s.tags.clone(), s.note.as_str()), (tags(&["baseline"]), "first try\nImageNet"));
    assert_eq!(store.update_sweep(&a, &[], &[], Some("")).unwrap().note, "");
    // Bad tags, notes, too many tags, unknown sweeps: refused, nothing changed.
    for bad in ["", "has space", "semi;colon", "ünï", "x\u{1b}[31m", &"t".repeat(41)] {
        let e = store.update_sweep(&a, &tags(&[bad]), &[], None).unwrap_err();
        assert!(matches!(e, StoreError::Invalid(_)), "{bad:?}: {e}");
        assert!(matches!(store.list_sweeps_page(10, "", bad), Err(StoreError::Invalid(_))) || bad.is_empty());
    }
    let many: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let e = store.update_sweep(&a, &many, &[], None).unwrap_err();
    assert!(e.to_string().contains("at most 20 tags"), "{e}");
    for note in ["bell\u{7}".to_string(), "n".repeat(2001)] {
        assert!(matches!(store.update_sweep(&a, &tags(&["new"]), &[], Some(&note)), Err(StoreError::Invalid(_))));
    }
    assert!(matches!(store.update_sweep("nope", &tags(&["x"]), &[], None), Err(StoreError::NotFound(_))));
    let s = store.get_sweep(&a).unwrap().sweep;
    assert_eq!((s.tags, s.note), (tags(&["baseline"]), String::new()));
    // Kept across reopening.
    drop(store);
    let store = open(dir.path(), wall());
    assert_eq!(listed(&store, "baseline"), [a]);
}

fn lists_come_in_bounded_pages_and_workers_gone_for_long_are_forgotten<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let mut ids = Vec::new();
    for _ in 0..250 {
        ids.push(submit(&mut store));
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = store.list_sweeps_page(100, &token, "").unwrap();
        assert!(page.items.len() <= 100);
        seen.extend(page.items.into_iter().map(|s| s.id));
        pages += 1;
        if page.next.is_empty() {
            break;
        }
        token = page.next;
    }
    assert_eq!((pages, &seen), (3, &ids), "every sweep once, newest first");
    for bad in ["x", "s-1", "w5", "s1; DROP TABLE sweeps"] {
        assert!(matches!(store.list_sweeps_page(10, bad, ""), Err(StoreError::Invalid(_))), "{bad}");
    }

    // Workers with a thousand devices of long names: a page stays near 2 MiB on the wire,
    // whatever was asked.
    let big: Vec<Device> = (0..1024)
        .map(|i| Device { id: format!("cuda:{i}"), kind: "cuda".into(), name: "n".repeat(200), memory_bytes: 1 })
        .collect();
    let mut workers = Vec::new();
    for i in 0..30 {
        workers.push(register(&mut store, &format!("big-{i}"), &big).0);
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = store.workers_page(1000, &token).unwrap();
        let bytes: usize = page.items.iter().map(wire_bytes_at_most).sum();
        assert!(!page.items.is_empty() && bytes < 3 << 20, "a page of {} workers is {bytes} bytes", page.items.len());
        listed.extend(page.items.into_iter().map(|w| w.worker_id));
        if page.next.is_empty() {
            break;
        }
        token = page.next;
    }
    assert_eq!(listed.len(), 30);
    // Gone workers are forgotten after a while; active ones are kept.
    store.expire_workers(i64::MAX).unwrap();
    let (running, inc) = register(&mut store, "busy", &cpu());
    store.acquire(&running, inc).unwrap().unwrap();
    assert_eq!(store.forget_workers(0).unwrap(), 0, "not gone for long yet");
    assert_eq!(store.forget_workers(i64::MAX).unwrap(), 30);
    let left: Vec<String> = store.workers().unwrap().into_iter().map(|w| w.worker_id).collect();
    assert_eq!(left, vec![running.worker_id.clone()]);
    // Its attempts keep its id.
    let sweep = store.list_sweeps().unwrap().pop().unwrap().id;
    let _ = store.trial(&sweep, "t000").unwrap();
}

fn a_trial_whose_every_epoch_is_stored_completes_whatever_ends_its_attempt<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut store = open(dir.path(), clock.clone());
    let sweep = submit(&mut store);
    let (w, inc) = register(&mut store, "w", &cpu());
    // t000: both epochs reported, then the sweep is cancelled before the worker says it
    // succeeded; the stop comes back with its last report and it finishes as cancelled.
    let a = store.acquire(&w, inc).unwrap().unwrap();
    store.report_epoch(&w, a.attempt_id, &metrics(1, 1, 0.5), &extras(1)).unwrap();
    // t001 runs on a second worker, which will be lost after its last report.
    let (w2, inc2) = register(&mut store, "w2", &cpu());
    let b = store.acquire(&w2, inc2).unwrap().unwrap();
    store.report_epoch(&w2, b.attempt_id, &metrics(1, 1, 0.4), &extras(1)).unwrap();
    store.report_epoch(&w2, b.attempt_id, &metrics(2, 1, 0.7), &extras(1)).unwrap();
    store.cancel_sweep(&sweep).unwrap();
    let reply = store.report_epoch(&w, a.attempt_id, &metrics(2, 1, 0.6), &extras(1)).unwrap();
    assert_eq!(reply.stop, Some(StopReason::SweepCancelled), "says: stop");
    store.finish_attempt(&w, a.attempt_id, Outcome::Cancelled, "stopped", 1.0).unwrap();
    clock.advance(Duration::from_millis(5));
    store.heartbeat(&w, inc, &[]).unwrap();
    store.expire_workers(now_before(&store, &w2.worker_id)).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    let states: Vec<TrialState> = status.trials.iter().map(|t| t.state).collect();
    assert_eq!(states, [TrialState::Completed, TrialState::Completed], "a finished result is kept");
    let board = store.leaderboard(&sweep).unwrap();
    assert!(board.entries.iter().all(|e| e.score.best_val_accuracy.is_some()));
    let d = store.trial(&sweep, "t000").unwrap();
    assert_eq!(d.attempts[0].state, AttemptState::Succeeded);
    assert!(d.attempts[0].error.contains("cancelled after every epoch was reported"), "{}", d.attempts[0].error);
    assert!(store.trial(&sweep, "t001").unwrap().attempts[0].error.contains("lost after every epoch"));
    // A trial stopped before its last epoch is still cancelled.
    let other = submit(&mut store);
    let c = store.acquire(&w, inc).unwrap().unwrap();
    store.report_epoch(&w, c.attempt_id, &metrics(1, 1, 0.5), &extras(1)).unwrap();
    store.cancel_sweep(&other).unwrap();
    store.finish_attempt(&w, c.attempt_id, Outcome::Cancelled, "stopped", 1.0).unwrap();
    assert!(store.get_sweep(&other).unwrap().trials.iter().all(|t| t.state == TrialState::Cancelled));
    // The stored history passes the checker (through the trait: whatever the backend keeps).
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

fn permanent_failures_count_toward_quarantine_only_where_other_workers_ran_the_sweep<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    store.set_quarantine_after(2).unwrap();
    let state = |store: &S, id: &str| store.workers().unwrap().into_iter().find(|w| w.worker_id == id).unwrap().state;
    // A spec nobody can run (a typo in its dataset root): its permanent failures never count.
    let typo = submit_text(&mut store, &spec_with(1, 3));
    let (a, a_inc) = register(&mut store, "a", &cpu());
    for _ in 0..3 {
        fail(&mut store, &a, a_inc, true);
    }
    assert_eq!(store.get_sweep(&typo).unwrap().sweep.state, SweepState::Failed);
    assert_eq!(state(&store, &a.worker_id), WorkerState::Active);
    // A sweep that another worker runs fine: failing it permanently on this one (its node lacks
    // the dataset's mount) is this worker's problem, and it counts.
    let good = submit_text(&mut store, &spec_with(1, 4));
    let (b, b_inc) = register(&mut store, "b", &cpu());
    let ran = store.acquire(&b, b_inc).unwrap().unwrap();
    store.report_epoch(&b, ran.attempt_id, &metrics(1, ran.fe_epochs, 0.5), &extras(1)).unwrap();
    fail(&mut store, &a, a_inc, true);
    assert_eq!(state(&store, &a.worker_id), WorkerState::Active);
    fail(&mut store, &a, a_inc, true);
    assert_eq!(state(&store, &a.worker_id), WorkerState::Quarantined);
    let _ = good;
}

// ---- SQLite-specific ----
//
// These are about the SQLite backend's own file (`sweep.db`: its schema version, upgrading an
// old schema in place, edited here with rusqlite directly) and how `SqliteStore` opens a state
// directory, not about the store's behaviour, so they are not part of the suite: another backend
// has its own format and its own tests of it.

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let conn = rusqlite::Connection::open(dir.path().join("sweep.db")).unwrap();
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'", []).unwrap();
    drop(conn);
    let err = SqliteStore::open(dir.path()).err().expect("refused");
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[test]
fn an_unusable_state_dir_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = SqliteStore::open(&file).err().expect("refused");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[test]
fn a_version_1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = {
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let sweep = submit(&mut store);
        // An attempt, so that there are events.
        let (w, inc) = register(&mut store, "w", &cpu());
        store.acquire(&w, inc).unwrap().unwrap();
        sweep
    };
    // Turn it back into a version-1 database: the columns and indexes later versions added, gone.
    let conn = rusqlite::Connection::open(dir.path().join("sweep.db")).unwrap();
    conn.execute_batch(
        "ALTER TABLE trials DROP COLUMN best_checkpoint; ALTER TABLE trials DROP COLUMN last_checkpoint;
         ALTER TABLE trials DROP COLUMN skipped_images; ALTER TABLE attempts DROP COLUMN devices;
         DROP INDEX attempts_by_trial;
         ALTER TABLE trials DROP COLUMN resume_checkpoint; ALTER TABLE attempts DROP COLUMN resumed_from_epoch;
         ALTER TABLE attempts DROP COLUMN note; ALTER TABLE trials DROP COLUMN retry_base;
         ALTER TABLE workers DROP COLUMN consecutive_failures; ALTER TABLE workers DROP COLUMN note;
         ALTER TABLE workers DROP COLUMN session_hash; ALTER TABLE workers DROP COLUMN owner;
         ALTER TABLE events DROP COLUMN checksum;
         ALTER TABLE sweeps DROP COLUMN early_stopping; ALTER TABLE trials DROP COLUMN stop_reason;
         DROP TRIGGER trials_progress_log; DROP TABLE progress_log;
         ALTER TABLE sweeps DROP COLUMN sharing; DROP INDEX trials_progress; ALTER TABLE trials DROP COLUMN stored;
         ALTER TABLE sweeps DROP COLUMN dropped_at_ms; DROP TABLE stage_points;
         DROP INDEX trials_paused; ALTER TABLE trials DROP COLUMN paused_at;
         ALTER TABLE sweeps DROP COLUMN tags; ALTER TABLE sweeps DROP COLUMN note;
         UPDATE meta SET value = 1 WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(dir.path()).unwrap();
    let board = store.leaderboard(&sweep).unwrap();
    assert_eq!(board.entries.len(), 2);
    assert!(board.entries[0].best_checkpoint.is_none());
    // The events written before checksums existed got theirs, and are served.
    assert!(!store.events_after(&sweep, 0, 100).unwrap().is_empty());
    drop(store);
    let report = history::check_state_dir(dir.path()).unwrap();
    assert!(report.is_clean(), "{report}");
    let conn = rusqlite::Connection::open(dir.path().join("sweep.db")).unwrap();
    let v: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 12);
}

/// ASHA's promotion form with scripted metrics: every pause, promotion and stop at every rung,
/// as reports arrive.
fn asha_pauses_trials_at_rungs_promotes_the_top_and_stops_the_rest_when_a_rung_closes<S: Store>(open: Open<S>) {
    let spec = "\
name: ASHA
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }, { strategy: exponential }]
  epoch_split: [[1, 4], [2, 4]]
early_stopping: { strategy: asha, eta: 2, min_epochs: 1 }
sharing: off
";
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, spec);
    let (w, inc) = register(&mut store, "w", &devices("cpu", 4));
    let attempts: Vec<Assignment> = (0..4).map(|_| store.acquire(&w, inc).unwrap().unwrap()).collect();
    let by_trial = |id: &str| attempts.iter().find(|a| a.trial_id == id).unwrap().clone();
    // t000 linear 1+4, t001 linear 2+4, t002 exponential 1+4, t003 exponential 2+4.
    let (t0, t1, t2, t3) = (by_trial("t000"), by_trial("t001"), by_trial("t002"), by_trial("t003"));
    let report = |store: &mut S, a: &Assignment, epoch: u32, val: f64| {
        store.report_epoch(&w, a.attempt_id, &metrics(epoch, a.fe_epochs, val), &extras(1)).unwrap().stop
    };
    let state = |store: &S, i: usize| store.get_sweep(&sweep).unwrap().trials[i].state;
    // Feature extraction is never a decision point.
    for a in [&t0, &t1, &t2, &t3] {
        for e in 1..=a.fe_epochs {
            assert_eq!(report(&mut store, a, e, 0.01), None);
        }
    }
    // Rung 1 (fine-tuning epoch 1), eta 2. The first trial there waits: ⌊1/2⌋ = 0 go on.
    let stop = report(&mut store, &t0, 2, 0.50).expect("the first at a rung pauses");
    assert!(
        matches!(&stop, StopReason::Paused(why) if why.contains("paused by ASHA at fine-tuning epoch 1")),
        "{stop:?}"
    );
    // The second (0.40): the top 1 of 2 is t000, promoted now; t002 waits.
    assert!(matches!(report(&mut store, &t2, 2, 0.40), Some(StopReason::Paused(_))));
    // A paused trial's worker may not go past the rung.
    let refused = store.report_epoch(&w, t2.attempt_id, &metrics(3, 1, 0.9), &extras(1)).unwrap_err();
    assert!(matches!(&refused, StoreError::WrongState(m) if m.contains("paused at epoch 2")), "{refused}");
    // The workers stop as told: t000 (promoted meanwhile) waits for a worker, t002 stays paused.
    store.finish_attempt(&w, t0.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    store.finish_attempt(&w, t2.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    assert_eq!((state(&store, 0), state(&store, 2)), (TrialState::Pending, TrialState::Paused));
    // The third (0.60) is the top 1 of 3: promoted at once, it goes on in the same attempt.
    assert_eq!(report(&mut store, &t1, 3, 0.60), None);
    // The fourth (0.45) closes the rung: the top 2 of 4 (t001, t000) have gone on; t003 and
    // the paused t002 stop.
    let stop = report(&mut store, &t3, 3, 0.45).expect("stopped at the close");
    assert!(matches!(&stop, StopReason::EarlyStopped(why) if why.contains("3rd of the 4 trials")), "{stop:?}");
    assert_eq!(state(&store, 2), TrialState::Stopped, "a paused trial ends at the close");
    // A stopped trial's worker is told through heartbeats too.
    let stop = store.heartbeat(&w, inc, &[t1.attempt_id, t3.attempt_id]).unwrap();
    assert_eq!(stop, vec![t3.attempt_id]);
    store.finish_attempt(&w, t3.attempt_id, Outcome::Failed { permanent: false }, "oom", 1.0).unwrap();
    // t000 is handed out again, from its resume point at the rung; pausing used no attempt.
    let again = store.acquire(&w, inc).unwrap().expect("the promoted trial runs again");
    assert_eq!(again.trial_id, "t000");
    assert_ne!(again.attempt_id, t0.attempt_id);
    // Rung 2: t000 first (0.55) waits; t001 (0.70) is the top 1 of 2, and with every trial
    // there or stopped the rung is closed: t000 stops.
    assert!(matches!(report(&mut store, &again, 3, 0.55), Some(StopReason::Paused(_))));
    assert_eq!(report(&mut store, &t1, 4, 0.70), None);
    assert_eq!(store.heartbeat(&w, inc, &[again.attempt_id, t1.attempt_id]).unwrap(), vec![again.attempt_id]);
    store.finish_attempt(&w, again.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    // Fine-tuning epochs 3 and 4 are no rungs (4 is the last): t001 runs to its end.
    for e in 5..=6 {
        assert_eq!(report(&mut store, &t1, e, 0.7), None);
    }
    store.finish_attempt(&w, t1.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    let states: Vec<TrialState> = status.trials.iter().map(|t| t.state).collect();
    assert_eq!(states, vec![TrialState::Stopped, TrialState::Completed, TrialState::Stopped, TrialState::Stopped]);
    assert!(status.trials[0].error.contains("stopped by ASHA at fine-tuning epoch 2"), "{}", status.trials[0].error);
    assert_eq!(status.trials[0].attempts, 2);
    // Like any ended trial, it keeps where it ran and what it cost.
    assert_eq!(status.trials[2].worker_id.as_deref(), Some(w.worker_id.as_str()));
    assert_eq!(status.trials[2].devices.len(), 1);
    assert_eq!(status.sweep.state, SweepState::Completed, "stopped trials count as done");
    assert_eq!(status.sweep.counts.get(TrialState::Stopped), 3);
    assert!(status.sweep.finished_at_ms.is_some());
    // Stopped trials rank after the completed one, by their best value.
    let board = store.leaderboard(&sweep).unwrap();
    let order: Vec<&str> = board.entries.iter().map(|e| e.trial.trial_id.as_str()).collect();
    assert_eq!(order, vec!["t001", "t000", "t003", "t002"]);
    // Every decision is in the event log, and the history is clean.
    let events = store.events_after(&sweep, 0, 10_000).unwrap();
    let noted = |what: &str| {
        events.iter().filter(|e| matches!(&e.event, SweepEvent::Trial { note, .. } if note.contains(what))).count()
    };
    // (t001 was promoted at once at both rungs: it never waited, and no event says it paused.)
    assert_eq!((noted("paused by ASHA"), noted("promoted by ASHA"), noted("stopped by ASHA")), (3, 3, 3));
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

/// A trial that fails for good while it waits at a rung does not hold the rung open, and
/// `sweep retry` puts it back at that rung (never past it): the closed rung then stops it. The
/// attempts that ended in a pause cost nothing of the budget.
fn a_trial_that_failed_at_a_rung_is_judged_there_after_retry<S: Store>(open: Open<S>) {
    let spec = "\
name: ASHA retry
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }, { strategy: exponential }]
  epoch_split: [[1, 2]]
early_stopping: { strategy: asha, eta: 2 }
sharing: off
retries: { max_attempts: 1 }
";
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, spec);
    let (w, inc) = register(&mut store, "w", &devices("cpu", 2));
    let a: Vec<Assignment> = (0..2).map(|_| store.acquire(&w, inc).unwrap().unwrap()).collect();
    let report = |store: &mut S, i: usize, epoch: u32, val: f64| {
        store.report_epoch(&w, a[i].attempt_id, &metrics(epoch, 1, val), &extras(1)).unwrap().stop
    };
    assert_eq!(report(&mut store, 0, 1, 0.1), None);
    assert!(matches!(report(&mut store, 0, 2, 0.5), Some(StopReason::Paused(_))));
    store.finish_attempt(&w, a[0].attempt_id, Outcome::Failed { permanent: true }, "dataset gone", 1.0).unwrap();
    // t001 arrives: with t000 failed the rung is closed, and t001 (the best of 2) goes on.
    assert_eq!(report(&mut store, 1, 1, 0.1), None);
    assert_eq!(report(&mut store, 1, 2, 0.9), None);
    assert_eq!(report(&mut store, 1, 3, 0.9), None);
    store.finish_attempt(&w, a[1].attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!((status.trials[0].state, status.sweep.state), (TrialState::Failed, SweepState::Failed));
    // Retried, it is judged at its rung at once: 2nd of 2, where only the top 1 goes on.
    assert_eq!(store.retry_sweep(&sweep, &[]).unwrap(), vec!["t000".to_string()]);
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.trials[0].state, TrialState::Stopped, "{}", status.trials[0].error);
    assert!(status.trials[0].error.contains("2nd of the 2 trials"), "{}", status.trials[0].error);
    assert_eq!(status.sweep.state, SweepState::Completed);
    assert!(store.acquire(&w, inc).unwrap().is_none(), "it never runs past the rung");
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");

    // Two attempts allowed: the one that ended in a pause does not count, so after a promotion
    // one retryable failure still leaves t000 an attempt.
    let spec = spec.replace("max_attempts: 1", "max_attempts: 2");
    let sweep = submit_text(&mut store, &spec);
    let t0 = store.acquire(&w, inc).unwrap().unwrap();
    let t1 = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!((t0.trial_id.as_str(), t1.trial_id.as_str()), ("t000", "t001"));
    store.report_epoch(&w, t0.attempt_id, &metrics(1, 1, 0.1), &extras(1)).unwrap();
    assert!(store.report_epoch(&w, t0.attempt_id, &metrics(2, 1, 0.9), &extras(1)).unwrap().stop.is_some());
    store.finish_attempt(&w, t0.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    store.report_epoch(&w, t1.attempt_id, &metrics(1, 1, 0.1), &extras(1)).unwrap();
    let stop = store.report_epoch(&w, t1.attempt_id, &metrics(2, 1, 0.2), &extras(1)).unwrap().stop;
    assert!(matches!(stop, Some(StopReason::EarlyStopped(_))), "{stop:?}");
    store.finish_attempt(&w, t1.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    let again = store.acquire(&w, inc).unwrap().expect("t000, promoted");
    store.finish_attempt(&w, again.attempt_id, Outcome::Failed { permanent: false }, "oom", 1.0).unwrap();
    let t000 = &store.get_sweep(&sweep).unwrap().trials[0];
    assert_eq!((t000.state, t000.attempts), (TrialState::Pending, 2), "{}", t000.error);
    let last = store.acquire(&w, inc).unwrap().expect("t000 again");
    store.report_epoch(&w, last.attempt_id, &metrics(3, 1, 0.9), &extras(1)).unwrap();
    store.finish_attempt(&w, last.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!((status.trials[0].state, status.trials[1].state), (TrialState::Completed, TrialState::Stopped));
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

/// A cancel overrides early stopping: a trial paused or stopped early but still running ends
/// cancelled, and reports after the cancel decide nothing.
fn a_cancelled_sweep_cancels_trials_stopped_early_and_decides_nothing_more<S: Store>(open: Open<S>) {
    let spec = "\
name: ASHA cancel
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 3], [2, 3], [3, 3], [4, 3]]
early_stopping: { strategy: asha, eta: 2 }
sharing: off
";
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, spec);
    let (w, inc) = register(&mut store, "w", &devices("cpu", 4));
    let a: Vec<Assignment> = (0..4).map(|_| store.acquire(&w, inc).unwrap().unwrap()).collect();
    let report = |store: &mut S, i: usize, epoch: u32, val: f64| {
        store.report_epoch(&w, a[i].attempt_id, &metrics(epoch, a[i].fe_epochs, val), &extras(1)).unwrap().stop
    };
    for (i, fe) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
        for e in 1..=fe {
            assert_eq!(report(&mut store, i, e, 0.01), None);
        }
    }
    // t000 waits, then is promoted when t001 arrives below it; t001 waits; t002 pauses and its
    // worker stops: it is paused with no attempt.
    assert!(matches!(report(&mut store, 0, 2, 0.5), Some(StopReason::Paused(_))));
    assert!(matches!(report(&mut store, 1, 3, 0.4), Some(StopReason::Paused(_))));
    assert!(matches!(report(&mut store, 2, 4, 0.3), Some(StopReason::Paused(_))));
    store.finish_attempt(&w, a[2].attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    store.cancel_sweep(&sweep).unwrap();
    // The sweep is cancelled: that is the reason, and no decision.
    assert_eq!(report(&mut store, 3, 5, 0.9), Some(StopReason::SweepCancelled));
    for x in [&a[0], &a[1], &a[3]] {
        store.finish_attempt(&w, x.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    }
    let status = store.get_sweep(&sweep).unwrap();
    assert!(status.trials.iter().all(|t| t.state == TrialState::Cancelled), "{:?}", status.trials);
    assert_eq!(status.sweep.state, SweepState::Cancelled);
    assert!(status.sweep.finished_at_ms.is_some());
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

/// Three trials of one backbone and strategy: t000 [2, 1], t001 [2, 2], t002 [3, 1]. Epochs
/// 1–2 (feature extraction) are shared by all three, fine-tuning epoch 3 by t000 and t001.
const SHARED: &str = "\
name: shared
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[2, 1], [2, 2], [3, 1]]
";

/// A report's checkpoint references as a worker writes them for `trial`'s epoch `epoch`: in a
/// shared epoch, `last-e<epoch>-a<attempt>` (both last and best); the resume point
/// `state-e<epoch>`.
fn refs(sweep: &str, trial: &str, epoch: u32, shared: bool) -> ReportExtras {
    let r = |file: String| CheckpointRef {
        uri: format!("/a/{sweep}/{trial}/{file}"),
        sha256: format!("{epoch:02}").repeat(32),
        bytes: 7,
        epoch,
    };
    let (last, best) = if shared {
        (r(format!("last-e{epoch:04}-a7.safetensors")), r(format!("last-e{epoch:04}-a7.safetensors")))
    } else {
        (r("last.safetensors".into()), r("best.safetensors".into()))
    };
    ReportExtras {
        parameters: 11,
        best_checkpoint: Some(best),
        last_checkpoint: Some(last),
        resume_checkpoint: Some(r(format!("state-e{epoch:04}.safetensors"))),
        ..Default::default()
    }
}

fn a_shared_stage_runs_once_and_its_epochs_belong_to_every_trial_through_it<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, SHARED);
    let (w, inc) = register(&mut store, "w", &devices("cpu", 3));
    // One trial runs the shared epochs: the one with the longest chain (t001 and t002 have 4
    // epochs), then the most feature-extraction epochs (t002: 3, which it runs on into in the
    // same attempt). Nobody else may start them, though devices are free.
    let runner = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(runner.trial_id, "t002");
    assert!(store.acquire(&w, inc).unwrap().is_none(), "the others wait for the shared epochs");
    let report = |store: &mut S, a: &Assignment, epoch: u32, val: f64, shared: bool| {
        store.report_epoch(
            &w,
            a.attempt_id,
            &metrics(epoch, a.fe_epochs, val),
            &refs(&sweep, &a.trial_id, epoch, shared),
        )
    };
    let r1 = report(&mut store, &runner, 1, 0.4, true).unwrap();
    assert!(!r1.unblocked, "mid-stage: nothing new may start");
    assert!(store.acquire(&w, inc).unwrap().is_none());
    // The end of the shared stage: fine-tuning epoch 3, which t000 and t001 share, may start
    // from it (t001 runs it: the longer chain); t000 waits for t001.
    let r2 = report(&mut store, &runner, 2, 0.5, true).unwrap();
    assert!(r2.unblocked && r2.stop.is_none());
    let branch = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(branch.trial_id, "t001");
    let resume = branch.resume.clone().expect("the branch starts from the shared stage's end");
    assert_eq!((resume.epoch, resume.uri.as_str()), (2, format!("/a/{sweep}/t002/state-e0002.safetensors").as_str()));
    assert!(store.acquire(&w, inc).unwrap().is_none(), "t000's next epoch is t001's to compute");
    // The runner goes on with its own feature extraction.
    report(&mut store, &runner, 3, 0.6, false).unwrap();
    report(&mut store, &runner, 4, 0.65, false).unwrap();
    store.finish_attempt(&w, runner.attempt_id, Outcome::Succeeded, "", 4.0).unwrap();
    // Epoch 3 is t000's last: it completes without an attempt of its own.
    report(&mut store, &branch, 3, 0.7, true).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    let state = |id: &str| status.trials.iter().find(|t| t.trial_id == id).unwrap().state;
    assert_eq!(state("t000"), TrialState::Completed);
    assert_eq!(state("t001"), TrialState::Running);
    report(&mut store, &branch, 4, 0.8, false).unwrap();
    store.finish_attempt(&w, branch.attempt_id, Outcome::Succeeded, "", 2.0).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    assert_eq!(status.sweep.state, SweepState::Completed);
    // Each trial has its whole history; shared epochs were written by the runner's attempt.
    let t000 = store.trial(&sweep, "t000").unwrap();
    let epochs: Vec<(u32, u64, f64)> =
        t000.metrics.iter().map(|m| (m.metrics.epoch, m.attempt_id, m.metrics.val_accuracy)).collect();
    let (a, b) = (runner.attempt_id, branch.attempt_id);
    assert_eq!(epochs, vec![(1, a, 0.4), (2, a, 0.5), (3, b, 0.7)]);
    assert!(t000.attempts.is_empty(), "t000 never ran");
    assert_eq!(t000.best_checkpoint.unwrap().uri, format!("/a/{sweep}/t001/last-e0003-a7.safetensors"));
    let t001 = store.trial(&sweep, "t001").unwrap();
    let epochs: Vec<(u32, u64)> = t001.metrics.iter().map(|m| (m.metrics.epoch, m.attempt_id)).collect();
    assert_eq!(epochs, vec![(1, a), (2, a), (3, b), (4, b)]);
    assert_eq!(t001.best_checkpoint.unwrap().epoch, 4);
    // The leaderboard ranks every trial on its own history.
    let board = store.leaderboard(&sweep).unwrap();
    let ranked: Vec<&str> = board.entries.iter().map(|e| e.trial.trial_id.as_str()).collect();
    assert_eq!(ranked, ["t001", "t000", "t002"]);
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

fn when_a_stages_runner_ends_another_trial_of_the_stage_takes_over<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, SHARED);
    let (w, inc) = register(&mut store, "w", &devices("cpu", 3));
    let runner = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(runner.trial_id, "t002");
    store.report_epoch(&w, runner.attempt_id, &metrics(1, 3, 0.4), &refs(&sweep, "t002", 1, true)).unwrap();
    // A retryable failure: t002 is still the stage's runner, and resumes from its own point.
    store.finish_attempt(&w, runner.attempt_id, Outcome::Failed { permanent: false }, "oom", 1.0).unwrap();
    let again = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!((again.trial_id.as_str(), again.resume.as_ref().map(|r| r.epoch)), ("t002", Some(1)));
    assert!(store.acquire(&w, inc).unwrap().is_none());
    // A permanent one: the next trial of the stage (t001, 4 epochs) takes over from the newest
    // shared epoch, with the failed runner's resume point; t000 waits for it.
    store.finish_attempt(&w, again.attempt_id, Outcome::Failed { permanent: true }, "bad", 1.0).unwrap();
    let next = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(next.trial_id, "t001");
    let resume = next.resume.clone().unwrap();
    assert_eq!((resume.epoch, resume.uri), (1, format!("/a/{sweep}/t002/state-e0001.safetensors")));
    assert!(store.acquire(&w, inc).unwrap().is_none());
    store.report_epoch(&w, next.attempt_id, &metrics(2, 2, 0.5), &refs(&sweep, "t001", 2, true)).unwrap();
    // t001 fails for good after the shared stage: t000 got epoch 2 from it and now runs
    // fine-tuning epoch 3 itself (its sharer failed), from t001's point.
    store.finish_attempt(&w, next.attempt_id, Outcome::Failed { permanent: true }, "bad", 3.0).unwrap();
    let last = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!((last.trial_id.as_str(), last.resume.as_ref().map(|r| r.epoch)), ("t000", Some(2)));
    let resume = last.resume.clone().unwrap();
    assert_eq!(resume.uri, format!("/a/{sweep}/t001/state-e0002.safetensors"));
    store.report_epoch(&w, last.attempt_id, &metrics(3, 2, 0.6), &refs(&sweep, "t000", 3, false)).unwrap();
    store.finish_attempt(&w, last.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    let status = store.get_sweep(&sweep).unwrap();
    let states: Vec<TrialState> = status.trials.iter().map(|t| t.state).collect();
    assert_eq!(states, [TrialState::Completed, TrialState::Failed, TrialState::Failed]);
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

fn with_sharing_off_every_trial_runs_alone<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, &format!("{SHARED}sharing: off\n"));
    let (w, inc) = register(&mut store, "w", &devices("cpu", 3));
    let got: Vec<String> = (0..3).map(|_| store.acquire(&w, inc).unwrap().unwrap().trial_id).collect();
    assert_eq!(got, ["t000", "t001", "t002"], "grid order, each from its first epoch");
    let a = store.acquire(&w, inc).unwrap();
    assert!(a.is_none());
    let status = store.get_sweep(&sweep).unwrap();
    assert!(status.trials.iter().all(|t| t.state == TrialState::Running));
}

/// The scheduler's memory of a shared sweep stays true across the sweep's end and a retry
/// that reopens it, with no hand-out in between.
fn a_shared_sweep_reopened_by_retry_hands_out_only_what_waits<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let sweep = submit_text(&mut store, SHARED);
    let (w, inc) = register(&mut store, "w", &devices("cpu", 2));
    let runner = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(runner.trial_id, "t002");
    for epoch in 1..=2 {
        store.report_epoch(&w, runner.attempt_id, &metrics(epoch, 3, 0.5), &refs(&sweep, "t002", epoch, true)).unwrap();
    }
    let branch = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(branch.trial_id, "t001");
    // No hand-out from here on until the retry: t000 completes by sharing t001's epoch 3,
    // t002 succeeds, t001 fails for good, and the sweep ends.
    store.report_epoch(&w, branch.attempt_id, &metrics(3, 2, 0.5), &refs(&sweep, "t001", 3, true)).unwrap();
    for epoch in 3..=4 {
        store
            .report_epoch(&w, runner.attempt_id, &metrics(epoch, 3, 0.5), &refs(&sweep, "t002", epoch, false))
            .unwrap();
    }
    store.finish_attempt(&w, runner.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    store.finish_attempt(&w, branch.attempt_id, Outcome::Failed { permanent: true }, "bad", 1.0).unwrap();
    assert!(store.get_sweep(&sweep).unwrap().sweep.finished_at_ms.is_some());
    assert_eq!(store.retry_sweep(&sweep, &[]).unwrap(), ["t001"]);
    let again = store.acquire(&w, inc).unwrap().unwrap();
    assert_eq!(again.trial_id, "t001", "only the retried trial waits");
    assert!(store.acquire(&w, inc).unwrap().is_none());
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

/// Runs every trial a worker is handed, one at a time, to its end: each epoch from the one after
/// its resume point, with the references a worker writes (a shared epoch's weights a file of
/// their own). Validation accuracy is a function of the epoch's content key, as a real
/// computation's would be.
fn run_to_end<S: Store>(store: &mut S, sweep: &str, text: &str, w: &Caller, inc: u64) -> Vec<Assignment> {
    let spec = spec::parse(text).unwrap();
    let tree = sweep_core::stages::StageTree::build(&spec, spec.sharing);
    let mut handed = Vec::new();
    while let Some(a) = store.acquire(w, inc).unwrap() {
        let trial = &tree.trials[a.trial_index as usize];
        let keys = sweep_core::stages::epoch_keys(&spec, trial);
        let from = a.resume.as_ref().map_or(0, |r| r.epoch);
        for e in from + 1..=trial.epochs() {
            let val = f64::from(u8::from_str_radix(&keys[e as usize - 1].0[..2], 16).unwrap()) / 256.0;
            let mut extras = refs(sweep, &a.trial_id, e, tree.is_shared(trial.index, e));
            for c in [&mut extras.last_checkpoint, &mut extras.best_checkpoint].into_iter().flatten() {
                c.uri = c.uri.replace("-a7", &format!("-a{}", a.attempt_id));
            }
            store.report_epoch(w, a.attempt_id, &metrics(e, a.fe_epochs, val), &extras).unwrap();
        }
        store.finish_attempt(w, a.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
        handed.push(a);
    }
    handed
}

fn a_later_sweep_starts_each_trial_from_the_stored_stages_it_contains<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let (w, inc) = register(&mut store, "w", &devices("cpu", 1));
    let first = submit_text(&mut store, SHARED);
    let ran: Vec<String> = run_to_end(&mut store, &first, SHARED, &w, inc).into_iter().map(|a| a.trial_id).collect();
    assert_eq!(ran, ["t002", "t001"], "t000 is computed by t002 (epochs 1–2) and t001 (epoch 3)");
    let before = store.get_sweep(&first).unwrap();
    assert_eq!(before.sweep.state, SweepState::Completed);

    // The same spec again: every stage is stored; nothing runs, every trial is complete at once
    // with the rows the first sweep computed (same values, same writer) and its weights.
    let again = store.submit(SHARED, "again.yaml", &spec::parse(SHARED).unwrap()).unwrap();
    assert_eq!(
        (again.trial_count, again.reused_epochs, again.reused_trials, again.reused_from.clone()),
        (3, 3 + 4 + 4, 3, vec![first.clone()])
    );
    assert!(store.acquire(&w, inc).unwrap().is_none(), "nothing to compute");
    let status = store.get_sweep(&again.sweep_id).unwrap();
    assert_eq!(status.sweep.state, SweepState::Completed);
    assert!(status.sweep.finished_at_ms.is_some());
    for t in ["t000", "t001", "t002"] {
        let (old, new) = (store.trial(&first, t).unwrap(), store.trial(&again.sweep_id, t).unwrap());
        let rows = |d: &sweep_core::records::TrialDetail| -> Vec<(EpochMetrics, u64)> {
            d.metrics.iter().map(|m| (m.metrics, m.attempt_id)).collect()
        };
        assert_eq!(rows(&new), rows(&old), "{t}");
        assert_eq!((&new.best_checkpoint, &new.last_checkpoint), (&old.best_checkpoint, &old.last_checkpoint), "{t}");
        assert!(new.attempts.is_empty(), "{t} never ran");
        // Each epoch names the trial that computed it.
        let computed_by = if t == "t002" && new.metrics.len() == 4 { "t002" } else { "t001" };
        assert_eq!(new.metrics.last().unwrap().reused_from, format!("{first}/{computed_by}"), "{t}");
    }
    // With `sharing: off`, every trial computes every epoch itself.
    let off = format!("{SHARED}sharing: off\n");
    let alone = store.submit(&off, "off.yaml", &spec::parse(&off).unwrap()).unwrap();
    assert_eq!((alone.reused_epochs, alone.reused_trials), (0, 0));
    store.cancel_sweep(&alone.sweep_id).unwrap();
    let board = store.leaderboard(&again.sweep_id).unwrap();
    let ranked = |b: &sweep_core::records::Leaderboard| -> Vec<String> {
        b.entries.iter().map(|e| e.trial.trial_id.clone()).collect()
    };
    assert_eq!(ranked(&board), ranked(&store.leaderboard(&first).unwrap()), "the same answer");

    // Two more splits: [3, 2] holds t002's whole run (epochs 1–4) and runs epoch 5 from its
    // resume point; [4, 1] holds the shared feature extraction (epochs 1–2) and runs on from
    // the point of t002, which computed it.
    let wider = SHARED.replace("[[2, 1], [2, 2], [3, 1]]", "[[2, 1], [2, 2], [3, 1], [3, 2], [4, 1]]");
    let third = store.submit(&wider, "wider.yaml", &spec::parse(&wider).unwrap()).unwrap();
    assert_eq!((third.reused_epochs, third.reused_trials), (3 + 4 + 4 + 4 + 2, 3));
    let handed = run_to_end(&mut store, &third.sweep_id, &wider, &w, inc);
    let starts: Vec<(String, String)> =
        handed.iter().map(|a| (a.trial_id.clone(), a.resume.clone().map(|r| r.uri).unwrap_or_default())).collect();
    assert_eq!(
        starts,
        [
            ("t004".to_string(), format!("/a/{first}/t002/state-e0002.safetensors")),
            ("t003".to_string(), format!("/a/{first}/t002/state-e0004.safetensors")),
        ],
        "the longest remaining chain first, each from the stored point it contains"
    );
    assert_eq!(store.get_sweep(&third.sweep_id).unwrap().sweep.state, SweepState::Completed);
    let t003 = store.trial(&third.sweep_id, "t003").unwrap();
    let from: Vec<&str> = t003.metrics.iter().map(|m| m.reused_from.as_str()).collect();
    let b = format!("{first}/t002");
    assert_eq!(from, [b.as_str(), b.as_str(), b.as_str(), b.as_str(), ""]);

    // What `sweep gc` keeps in the first sweep's folders: what kept sweeps reference, its own
    // trials' checkpoints and the points later sweeps started from.
    let refs = store.references(&first).unwrap();
    assert!(refs.collectable, "{refs:?}");
    let kept = |r: &sweep_core::records::References, key: &str| r.keys.iter().any(|k| k == key);
    for key in ["t002/state-e0002.safetensors", "t002/state-e0004.safetensors", "t001/last.safetensors"] {
        assert!(kept(&refs, &format!("{first}/{key}")), "{key} in {refs:?}");
    }
    assert!(refs.keys.iter().all(|k| k.starts_with(&format!("{first}/"))));
    // Dropped: its points are no longer offered, but the sweeps that reused them hold them (a
    // resubmission starts from the second sweep's), and what they reference stays referenced.
    let (id, points) = store.drop_sweep(&first).unwrap();
    assert!(id == first && points > 0, "{points}");
    assert!(store.get_sweep(&first).unwrap().sweep.dropped_at_ms.is_some());
    let after = store.references(&first).unwrap();
    assert!(kept(&after, &format!("{first}/t001/last.safetensors")), "the second sweep's t001 holds it");
    assert!(!kept(&after, &format!("{first}/t002/state-e0001.safetensors")));
    let fourth = store.submit(SHARED, "fourth.yaml", &spec::parse(SHARED).unwrap()).unwrap();
    assert_eq!((fourth.reused_trials, fourth.reused_from.clone()), (3, vec![again.sweep_id.clone()]));
    assert_eq!(
        store.trial(&fourth.sweep_id, "t001").unwrap().last_checkpoint,
        store.trial(&first, "t001").unwrap().last_checkpoint,
        "the same weights, wherever the point came from"
    );
    let err = store.retry_sweep(&first, &[]).unwrap_err();
    assert!(matches!(err, StoreError::WrongState(_)) && err.to_string().contains("dropped"), "{err}");
    let running = submit_text(&mut store, &SHARED.replace("[[2, 1], [2, 2], [3, 1]]", "[[5, 5]]"));
    let err = store.drop_sweep(&running).unwrap_err();
    assert!(err.to_string().contains("1 trial(s) waiting or running"), "{err}");
    assert!(!store.references(&running).unwrap().collectable);
    store.cancel_sweep(&running).unwrap();
    let report = history::check(store.history().unwrap());
    assert!(report.is_clean(), "{report}");
}

fn reused_epochs_bring_early_stopping_decisions_and_damaged_points_are_passed_over<S: Store>(open: Open<S>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), wall());
    let (w, inc) = register(&mut store, "w", &devices("cpu", 1));
    // Two strategies × [1, 2], run to the end without early stopping: t000 at 90%, t001 at 10%.
    let text = SHARED
        .replace("[{ strategy: linear }]", "[{ strategy: linear }, { strategy: exponential }]")
        .replace("[[2, 1], [2, 2], [3, 1]]", "[[1, 2]]");
    let first = submit_text(&mut store, &text);
    let spec = spec::parse(&text).unwrap();
    let tree = sweep_core::stages::StageTree::build(&spec, true);
    while let Some(a) = store.acquire(&w, inc).unwrap() {
        let from = a.resume.as_ref().map_or(0, |r| r.epoch);
        let val = if a.trial_id == "t000" { 0.9 } else { 0.1 };
        for e in from + 1..=3 {
            let shared = tree.is_shared(a.trial_index as usize, e);
            store.report_epoch(&w, a.attempt_id, &metrics(e, 1, val), &refs(&first, &a.trial_id, e, shared)).unwrap();
        }
        store.finish_attempt(&w, a.attempt_id, Outcome::Succeeded, "", 1.0).unwrap();
    }
    assert_eq!(store.get_sweep(&first).unwrap().sweep.state, SweepState::Completed);

    // The same grid with ASHA (eta 2): the reused epochs decide as reported epochs would. Both
    // trials take their rows up to rung 1 (epoch 2) and pause there; with both there the rung
    // is closed: t000 (90%) is promoted and takes epoch 3, t001 (10%) is stopped, with the
    // epochs up to it and the references of the longest stored point up to it (the shared
    // epoch 1).
    let asha = format!("{text}early_stopping: {{ strategy: asha, metric: val_accuracy, eta: 2, min_epochs: 1 }}\n");
    let second = store.submit(&asha, "asha.yaml", &spec::parse(&asha).unwrap()).unwrap();
    assert_eq!((second.reused_trials, second.reused_epochs), (2, 3 + 2));
    let status = store.get_sweep(&second.sweep_id).unwrap();
    let state = |id: &str| status.trials.iter().find(|t| t.trial_id == id).unwrap().state;
    assert_eq!((state("t000"), state("t001")), (TrialState::Completed, TrialState::Stopped));
    let t001 = store.trial(&second.sweep_id, "t001").unwrap();
    assert_eq!(t001.metrics.len(), 2);
    assert_eq!(t001.last_checkpoint.as_ref().map(|c| c.epoch), Some(1), "{t001:?}");
    assert!(t001.trial.error.contains("ASHA"), "{}", t001.trial.error);
    assert!(history::check(store.history().unwrap()).is_clean());

    // A third strategy: its trial has only the shared epoch 1 stored, so rung 1 is not closed
    // at submit. Of the 2 trials there, t000 is the top ⌊2/2⌋ = 1: promoted, it takes epoch 3
    // and is complete; t001 waits, paused with no attempt, until the new trial's value closes
    // the rung.
    let three =
        asha.replace("{ strategy: exponential }]", "{ strategy: exponential }, { strategy: exponential, factor: 5 }]");
    let wider = store.submit(&three, "three.yaml", &spec::parse(&three).unwrap()).unwrap();
    assert_eq!((wider.reused_trials, wider.reused_epochs), (1, 3 + 2 + 1));
    let states = |store: &S| -> Vec<TrialState> {
        store.get_sweep(&wider.sweep_id).unwrap().trials.iter().map(|t| t.state).collect()
    };
    assert_eq!(states(&store), vec![TrialState::Completed, TrialState::Paused, TrialState::Pending]);
    let a = store.acquire(&w, inc).unwrap().expect("the new trial runs; the paused one is not handed out");
    assert_eq!((a.trial_id.as_str(), a.resume.as_ref().map(|r| r.epoch)), ("t002", Some(1)));
    let reply = store.report_epoch(&w, a.attempt_id, &metrics(2, 1, 0.5), &refs(&wider.sweep_id, "t002", 2, false));
    // 3 at the rung, all of them: closed, and only the top max(1, ⌊3/2⌋) = 1 (t000) goes on.
    assert!(matches!(reply.unwrap().stop, Some(StopReason::EarlyStopped(_))));
    store.finish_attempt(&w, a.attempt_id, Outcome::Cancelled, "stopped on request", 1.0).unwrap();
    assert_eq!(states(&store), vec![TrialState::Completed, TrialState::Stopped, TrialState::Stopped]);
    assert_eq!(store.get_sweep(&wider.sweep_id).unwrap().sweep.state, SweepState::Completed);
    assert!(store.acquire(&w, inc).unwrap().is_none());
    assert!(history::check(store.history().unwrap()).is_clean());

    // A damaged entry (a reference that does not decode) is passed over, never handed out.
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("sweep.db")).unwrap();
    let damaged = conn.execute("UPDATE stage_points SET resume_checkpoint = x'ffff' WHERE epoch = 3", []).unwrap();
    assert!(damaged > 0);
    drop(conn);
    let mut store = open(dir.path(), wall());
    let third = store.submit(&text, "again.yaml", &spec::parse(&text).unwrap()).unwrap();
    assert_eq!(third.reused_trials, 0, "no whole trial: their last points are damaged");
    assert_eq!(third.reused_epochs, 2, "each from the shared epoch 1");
    let (w, inc) = register(&mut store, "w2", &devices("cpu", 1));
    let a = store.acquire(&w, inc).unwrap().expect("a trial to run");
    assert_eq!(a.resume.map(|r| r.epoch), Some(1));
    assert!(!store.references(&first).unwrap().collectable, "a damaged reference: nothing is collected");
}
