//! One attempt as the daemon runs it: training, checkpoints after every epoch, reports.

use crate::common;

use sweep_proto::v1;
use sweep_worker::checkpoint;
use sweep_worker::daemon::train_attempt;
use sweep_worker::train::{Control, TrainError, TrainOptions};

const SPEC: &str = "\
name: attempt
dataset: { kind: synthetic, classes: 3, train_per_class: 4, val_per_class: 2, image_size: 32, seed: 3 }
training: { batch_size: 6, augment: { hflip: false, rotation_deg: 0, shear_deg: 0, color_jitter: 0 } }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-5 }]
  epoch_split: [[1, 2]]
";

fn assignment(spec_yaml: &str) -> v1::Assignment {
    common::assignment(spec_yaml, "attempt-0001", 41)
}

#[test]
fn every_epoch_is_reported_with_its_checkpoints() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let a = assignment(SPEC);
    let mut reports = Vec::new();
    train_attempt(
        &a,
        &TrainOptions::new(tch::Device::Cpu),
        &common::local_store(dir.path()),
        &dir.path().join("cache"),
        &mut |r| {
            reports.push(r);
            Control::Continue
        },
    )
    .unwrap();
    assert_eq!(reports.len(), 3);
    let mut best_val = f64::MIN;
    for (i, r) in reports.iter().enumerate() {
        let m = r.metrics.as_ref().unwrap();
        assert_eq!((r.attempt_id, m.epoch), (41, i as u32 + 1));
        let last = r.last_checkpoint.as_ref().unwrap();
        assert_eq!(last.epoch, m.epoch);
        assert!(last.uri.ends_with("attempt-0001/t000/last.safetensors"), "{}", last.uri);
        // `best` comes exactly when the validation accuracy beats every earlier epoch.
        assert_eq!(r.best_checkpoint.is_some(), m.val_accuracy > best_val, "epoch {}", m.epoch);
        best_val = best_val.max(m.val_accuracy);
        assert!(r.parameters > 11_000_000);
        assert_eq!(r.skipped_images, 0);
    }
    let last = std::path::PathBuf::from(&reports[2].last_checkpoint.as_ref().unwrap().uri);
    let meta = checkpoint::read_metadata(&last).unwrap().unwrap();
    assert_eq!((meta.epoch, meta.id.backbone.as_str(), meta.id.classes.len()), (3, "resnet18", 3));
    assert_eq!(meta.sha256, reports[2].last_checkpoint.as_ref().unwrap().sha256);
    assert_eq!(meta.metrics.phase, "fine_tuning");
}

#[test]
fn a_stop_from_the_coordinator_cancels_after_the_current_epoch() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    let e = train_attempt(
        &assignment(SPEC),
        &TrainOptions::new(tch::Device::Cpu),
        &common::local_store(dir.path()),
        &dir.path().join("cache"),
        &mut |_| {
            n += 1;
            Control::Stop
        },
    )
    .unwrap_err();
    assert_eq!((e, n), (TrainError::Cancelled, 1));
}

#[test]
fn an_assignment_that_disagrees_with_its_spec_is_a_permanent_error() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let mut a = assignment(SPEC);
    a.backbone = "resnet50".into();
    let e = train_attempt(
        &a,
        &TrainOptions::new(tch::Device::Cpu),
        &common::local_store(dir.path()),
        &dir.path().join("cache"),
        &mut |_| Control::Continue,
    )
    .unwrap_err();
    assert!(e.is_permanent() && e.to_string().contains("does not match"), "{e}");
    let mut a = assignment(SPEC);
    a.spec_yaml = "name: [".into();
    let e = train_attempt(
        &a,
        &TrainOptions::new(tch::Device::Cpu),
        &common::local_store(dir.path()),
        &dir.path().join("cache"),
        &mut |_| Control::Continue,
    )
    .unwrap_err();
    assert!(e.is_permanent() && e.to_string().contains("does not parse"), "{e}");
}

#[test]
fn a_stop_that_comes_with_the_last_epochs_report_keeps_the_finished_trial() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    // The sweep is cancelled while the last epoch trains: its report says "stop", but every
    // epoch is done and reported, so the attempt succeeds (its result must not be thrown away).
    train_attempt(
        &assignment(SPEC),
        &TrainOptions::new(tch::Device::Cpu),
        &common::local_store(dir.path()),
        &dir.path().join("cache"),
        &mut |_| {
            n += 1;
            if n == 3 { Control::Stop } else { Control::Continue }
        },
    )
    .unwrap();
    assert_eq!(n, 3);
}
