//! Resume points: a trial stopped after any epoch and continued from its resume point ends
//! bit-identical to one that never stopped (CPU), alone and data-parallel; an attempt handed a
//! resume point continues after it, and one handed a corrupt point falls back to the previous
//! good one, or to the start, and says so.

use crate::common;

use std::sync::{Arc, Mutex};

use sweep_core::spec::{self, SweepSpec};
use sweep_core::{Trial, grid};
use sweep_proto::v1;
use sweep_worker::daemon::train_attempt;
use sweep_worker::resume::{self, TrainingState};
use sweep_worker::train::{Control, TrainOptions, Trainer};
use tch::Device;

const SPEC: &str = "name: resume
dataset: { kind: synthetic, classes: 3, train_per_class: 6, val_per_class: 3, image_size: 32, seed: 2 }
model: { weights: none }
training:
  batch_size: 4
  seed: 9
  augment: { hflip: true, rotation_deg: 10, shear_deg: 5, color_jitter: 0.2 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }]
  epoch_split: [[2, 2]]
";

fn spec() -> (SweepSpec, Trial) {
    let s = spec::parse(SPEC).unwrap();
    let t = grid::expand(&s.grid).remove(0);
    (s, t)
}

/// Every epoch without a stop, then for each stop point: train to it, save, load from the file,
/// continue in a new trainer; metrics and final weights must be identical bit for bit.
fn check_every_stop_point(devices: Vec<Device>) {
    let (s, t) = spec();
    let opts = TrainOptions::data_parallel(devices);
    let mut whole = Trainer::new(&s, &t, &opts).unwrap();
    let mut expected = Vec::new();
    while whole.epochs_done() < whole.total_epochs() {
        expected.push(common::zero_time(whole.run_epoch().unwrap()));
    }
    let final_weights = common::weights(&whole);
    drop(whole);

    for stop in 1..t.fe_epochs + t.ft_epochs {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(&s, &t, &opts).unwrap();
        for _ in 0..stop {
            first.run_epoch().unwrap();
        }
        let store = common::local_store(dir.path());
        let saved = first
            .training_state()
            .unwrap()
            .save(&store, "s/t000", dir.path(), common::state_meta("s", "t000", stop))
            .unwrap();
        drop(first);
        let key = store.key_of(&saved.uri).unwrap();
        let (state, m) = TrainingState::fetch(&store, &key, dir.path(), Some(&saved.meta.sha256)).unwrap();
        assert_eq!((state.epochs_done, m.epoch), (stop, stop));
        let resumed_opts = TrainOptions { resume: Some(Arc::new(Mutex::new(state))), ..opts.clone() };
        let mut second = Trainer::new(&s, &t, &resumed_opts).unwrap();
        assert_eq!(second.epochs_done(), stop);
        let mut got = Vec::new();
        while second.epochs_done() < second.total_epochs() {
            got.push(common::zero_time(second.run_epoch().unwrap()));
        }
        assert_eq!(got, expected[stop as usize..], "metrics after resuming at epoch {stop}");
        for ((name, a), (_, b)) in common::weights(&second).iter().zip(&final_weights) {
            assert!(a.equal(b), "{name} differs after resuming at epoch {stop}");
        }
    }
}

#[test]
fn resuming_after_any_epoch_is_bit_identical_to_never_stopping() {
    let _bound = sweep_tests::bound(600);
    check_every_stop_point(vec![Device::Cpu]);
}

#[test]
fn data_parallel_resume_is_bit_identical_too() {
    let _bound = sweep_tests::bound(600);
    check_every_stop_point(vec![Device::Cpu, Device::Cpu]);
}

fn run(a: &v1::Assignment, artifacts: &std::path::Path) -> Vec<v1::ReportEpochRequest> {
    let mut reports = Vec::new();
    let store = common::local_store(artifacts);
    train_attempt(a, &TrainOptions::new(Device::Cpu), &store, &artifacts.join("cache"), &mut |r| {
        reports.push(r);
        Control::Continue
    })
    .unwrap();
    reports
}

#[test]
fn an_attempt_continues_from_its_resume_point_or_the_previous_good_one() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let first = common::assignment(SPEC, "resume-0001", 1);
    let reports = run(&first, dir.path());
    assert_eq!(reports.len(), 4);
    assert!(reports.iter().all(|r| r.resumed_from_epoch == 0 && r.note.is_empty()));
    let points: Vec<v1::CheckpointRef> = reports.iter().map(|r| r.resume_checkpoint.clone().unwrap()).collect();
    assert_eq!(points.iter().map(|p| p.epoch).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Only the two newest stay on disk.
    let store = common::local_store(dir.path());
    let kept: Vec<u32> = resume::list(&store, "resume-0001/t000").into_iter().map(|(e, _)| e).collect();
    assert_eq!(kept, [4, 3]);
    let val = |r: &[v1::ReportEpochRequest]| -> Vec<f64> {
        r.iter().map(|x| x.metrics.as_ref().unwrap().val_accuracy).collect()
    };

    // A second attempt handed the point after epoch 3 trains epoch 4 only, with the same result.
    let second = v1::Assignment { attempt_id: 2, resume: Some(points[2].clone()), ..first.clone() };
    let again = run(&second, dir.path());
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].metrics.as_ref().unwrap().epoch, again[0].resumed_from_epoch), (4, 3));
    assert!(again[0].note.is_empty(), "{}", again[0].note);
    assert_eq!(val(&again), val(&reports[3..]));
    let m = |r: &v1::ReportEpochRequest| {
        let x = r.metrics.clone().unwrap();
        (x.train_loss, x.val_loss)
    };
    assert_eq!(m(&again[0]), m(&reports[3]));

    // The newest point (epoch 4 now) is truncated: the attempt falls back to epoch 3's and says so.
    let newest = again[0].resume_checkpoint.clone().unwrap();
    let bytes = std::fs::read(&newest.uri).unwrap();
    std::fs::write(&newest.uri, &bytes[..bytes.len() / 3]).unwrap();
    let third = v1::Assignment { attempt_id: 3, resume: Some(newest.clone()), ..first.clone() };
    let fallback = run(&third, dir.path());
    assert_eq!(fallback.len(), 1);
    assert_eq!(fallback[0].resumed_from_epoch, 3);
    let note = &fallback[0].note;
    assert!(note.contains("resume point of epoch 4 unusable") && note.contains("truncated"), "{note}");
    assert!(note.contains("resumed from the older point of epoch 3"), "{note}");
    assert_eq!(val(&fallback), val(&reports[3..]));

    // Every point altered: from the start, said so, and all four epochs reported again.
    for (_, key) in resume::list(&store, "resume-0001/t000") {
        let path = store.uri(&key);
        let mut b = std::fs::read(&path).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0xff;
        std::fs::write(&path, b).unwrap();
    }
    let newest = fallback[0].resume_checkpoint.clone().unwrap();
    let fourth = v1::Assignment { attempt_id: 4, resume: Some(newest), ..first.clone() };
    let fresh = run(&fourth, dir.path());
    assert_eq!(fresh.len(), 4);
    assert_eq!(fresh[0].resumed_from_epoch, 0);
    assert!(fresh[0].note.contains("started from the beginning"), "{}", fresh[0].note);
    assert_eq!(val(&fresh), val(&reports));
}

/// Runs `a`, stopping after `epochs` reports.
fn run_until(a: &v1::Assignment, artifacts: &std::path::Path, epochs: usize) -> Vec<v1::ReportEpochRequest> {
    let mut reports = Vec::new();
    let store = common::local_store(artifacts);
    let _ = train_attempt(a, &TrainOptions::new(Device::Cpu), &store, &artifacts.join("cache"), &mut |r| {
        reports.push(r);
        if reports.len() >= epochs { Control::Stop } else { Control::Continue }
    });
    reports
}

#[test]
fn a_resume_point_of_another_computation_is_never_loaded_and_one_of_the_same_is() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    // Another sweep's trial of another computation (another seed), finished: its newest point
    // is after epoch 4.
    let other = SPEC.replace("seed: 9", "seed: 10");
    let theirs = run(&common::assignment(&other, "theirs-0001", 1), dir.path());
    let foreign = theirs[3].resume_checkpoint.clone().unwrap();
    // Our trial stopped after epoch 2.
    let first = common::assignment(SPEC, "mine-0001", 7);
    let mine = run_until(&first, dir.path(), 2);
    assert_eq!(mine.len(), 2);

    // Handed the other sweep's point (with its true hash): its epochs are not ours (its JSON's
    // content key says so): refused, ours of epoch 2 used.
    let a = v1::Assignment { attempt_id: 8, resume: Some(foreign.clone()), ..first.clone() };
    let r = run_until(&a, dir.path(), 1);
    assert_eq!(r[0].resumed_from_epoch, 2, "{}", r[0].note);
    assert!(r[0].note.contains("whose epochs 1–4 are not this trial's (content key"), "{}", r[0].note);
    assert!(r[0].note.contains("resumed from the older point of epoch 2"), "{}", r[0].note);

    // A point of another sweep's trial that is the same computation (same spec, same trial):
    // started from, and the epoch after it is bit-identical to that trial's.
    let same = run(&common::assignment(SPEC, "same-0001", 2), dir.path());
    let point = same[2].resume_checkpoint.clone().unwrap();
    let a = v1::Assignment { attempt_id: 12, resume: Some(point), ..first.clone() };
    let r = run_until(&a, dir.path(), 1);
    assert_eq!(r[0].resumed_from_epoch, 3, "{}", r[0].note);
    let bits = |r: &[v1::ReportEpochRequest]| -> Vec<[u64; 4]> {
        r.iter()
            .map(|x| x.metrics.as_ref().unwrap())
            .map(|m| [m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy].map(f64::to_bits))
            .collect()
    };
    assert_eq!(bits(&r), bits(&same[3..]));

    // The other sweep's file planted in our folder under our name (its hash matching): its JSON
    // says whose it is.
    let store = common::local_store(dir.path());
    let planted_key = format!("mine-0001/t000/{}", resume::file_name(4));
    let (from, to) = (foreign.uri.clone(), store.uri(&planted_key));
    std::fs::copy(&from, &to).unwrap();
    let json = |p: &str| std::path::Path::new(p).with_extension("json");
    std::fs::copy(json(&from), json(&to)).unwrap();
    let planted = v1::CheckpointRef { uri: store.uri(&planted_key), ..foreign.clone() };
    let a = v1::Assignment { attempt_id: 9, resume: Some(planted.clone()), ..first.clone() };
    let r = run_until(&a, dir.path(), 1);
    assert!(r[0].resumed_from_epoch < 4, "{}", r[0].note);
    assert!(r[0].note.contains("holds theirs-0001/t000 (resnet18) after epoch 4"), "{}", r[0].note);

    // A reference without a SHA-256, or outside the store, is not trusted either.
    let unhashed = v1::CheckpointRef { sha256: String::new(), ..planted };
    let a = v1::Assignment { attempt_id: 10, resume: Some(unhashed), ..first.clone() };
    let r = run_until(&a, dir.path(), 1);
    assert!(r[0].note.contains("no SHA-256"), "{}", r[0].note);
    let outside = v1::CheckpointRef { uri: "/etc/passwd".into(), ..foreign };
    let a = v1::Assignment { attempt_id: 11, resume: Some(outside), ..first };
    let r = run_until(&a, dir.path(), 1);
    assert!(r[0].note.contains("is not in this worker's artifact store"), "{}", r[0].note);
}

#[test]
fn a_resume_point_that_does_not_fit_the_trial_is_its_own_error_class() {
    let _bound = sweep_tests::bound(600);
    use sweep_worker::train::TrainError;
    let (s, t) = spec();
    let opts = |state: TrainingState| TrainOptions {
        resume: Some(Arc::new(Mutex::new(state))),
        ..TrainOptions::new(Device::Cpu)
    };
    let empty = |epochs_done| TrainingState { epochs_done, model: Vec::new(), optimizer: Default::default() };
    // More epochs than the trial has, or a model with none of the trial's tensors: the daemon
    // starts over on this class (it matched a message prefix before).
    for (state, fragment) in [(empty(99), "99 epochs done, the trial has 4"), (empty(1), "0 tensors, the model has")] {
        match Trainer::new(&s, &t, &opts(state)) {
            Err(e @ TrainError::ResumePoint(_)) => {
                assert!(!e.is_permanent());
                assert!(e.to_string().starts_with("resume point: ") && e.to_string().contains(fragment), "{e}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a resume point that does not fit was taken"),
        }
    }
}
