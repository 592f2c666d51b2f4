//! Data-parallel training on CPU replicas (the in-process all-reduce backend).
//!
//! The proof: with BatchNorm frozen (evaluation-mode BatchNorm in every phase, through
//! `Trainer::set_forward_mode_override(TRAIN_FROZEN_BN)`) and a backbone without dropout
//! (resnet18), N replicas on a global batch split N ways end every epoch with the parameters of
//! one replica trained on the whole global batch — up to floating-point summation order — for
//! N = 2 and 3, through the trainer's own code path (sharding, per-sample augmentation of the
//! global batch, loss normalisation, bucketed gradient sums, one Adam per replica). Also:
//! validation shared between replicas, short and empty shards, failures and cancellation that
//! stop every replica without hanging, deterministic runs.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use sweep_core::leaderboard::EpochMetrics;
use sweep_core::spec::{self, SweepSpec};
use sweep_core::{Backbone, Trial, grid};
use sweep_worker::model::{ForwardMode, Model};
use sweep_worker::train::{Control, Fault, TrainError, TrainOptions, Trainer, run_trial};
use tch::{Device, Kind, Tensor};

/// resnet18 on a synthetic set of `classes × per_class` training and `classes × val` validation
/// images (32 px), `batch` images per replica, augmentation on.
fn spec(classes: u32, per_class: u32, val: u32, batch: u32, split: (u32, u32)) -> (SweepSpec, Trial) {
    let yaml = format!(
        "name: dp
dataset: {{ kind: synthetic, classes: {classes}, train_per_class: {per_class}, val_per_class: {val}, image_size: 32, seed: 11 }}
model: {{ weights: none }}
training:
  batch_size: {batch}
  seed: 4
  augment: {{ hflip: true, rotation_deg: 10, shear_deg: 5, color_jitter: 0.2 }}
grid:
  backbone: [resnet18]
  lr_decay: [{{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }}]
  epoch_split: [[{}, {}]]
",
        split.0, split.1
    );
    let spec = spec::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let trial = grid::expand(&spec.grid).remove(0);
    (spec, trial)
}

fn cpus(n: usize) -> TrainOptions {
    TrainOptions::data_parallel(vec![Device::Cpu; n])
}

/// Runs `f` on a thread and fails the test if it takes longer than `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).expect("data-parallel training hung")
}

fn parameters(m: &Model) -> Vec<(String, Tensor)> {
    m.named_parameters().iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect()
}

/// Trains every epoch of `trial` with `world` CPU replicas of `global / world` images each
/// and BatchNorm frozen; returns each epoch's metrics and rank 0's parameters after it.
fn train_frozen(
    spec: &SweepSpec,
    trial: &Trial,
    global: u32,
    world: usize,
) -> (Vec<EpochMetrics>, Vec<Vec<(String, Tensor)>>) {
    let mut s = spec.clone();
    s.training.batch_size = global / world as u32;
    let mut tr = Trainer::new(&s, trial, &cpus(world)).unwrap();
    assert_eq!(tr.world_size(), world);
    tr.set_forward_mode_override(Some(ForwardMode::TRAIN_FROZEN_BN));
    let (mut metrics, mut params) = (Vec::new(), Vec::new());
    while tr.epochs_done() < tr.total_epochs() {
        metrics.push(tr.run_epoch().unwrap());
        params.push(parameters(tr.model()));
    }
    (metrics, params)
}

/// Relative difference of two parameter sets taken as one vector, `‖a − b‖ / ‖b‖`.
fn rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for ((_, x), (_, y)) in a.iter().zip(b) {
        num += (x - y).square().sum(Kind::Double).double_value(&[]);
        den += y.square().sum(Kind::Double).double_value(&[]);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Largest relative difference over the tensors, each measured against its own scale:
/// `max |a - b| / max |b|`; and the tensor where it is reached.
fn max_rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let scale = y.abs().max().double_value(&[]).max(1e-30);
        let d = (x - y).abs().max().double_value(&[]) / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

fn assert_equivalent(label: &str, spec: &SweepSpec, trial: &Trial, global: u32, n_train: usize, n_val: usize) {
    let (m1, p1) = train_frozen(spec, trial, global, 1);
    // Training moved the weights by far more than the tolerance (by 0.6 % to 1 %, against
    // differences of about 1e-7 between N replicas and one).
    let initial = Model::build_seeded(trial.backbone, p1[0][p1[0].len() - 1].1.size()[0], Device::Cpu, 4).unwrap();
    let moved = rel_diff(&p1[p1.len() - 1], &parameters(&initial));
    assert!(moved > 1e-3, "{label}: training barely moved the weights ({moved})");
    for world in [2, 3] {
        let (mn, pn) = train_frozen(spec, trial, global, world);
        for (epoch, (a, b)) in pn.iter().zip(&p1).enumerate() {
            // The criterion: the parameters as one vector. Single elements are not compared:
            // Adam divides each gradient by its own running scale, so an element whose gradient
            // is mostly cancellation (a bias late in the network) turns float32 summation-order
            // noise into steps of the full learning rate, for 1 replica as much as for N.
            let d = rel_diff(a, b);
            let (worst, name) = max_rel_diff(a, b);
            eprintln!(
                "{label}: {world} replicas vs 1, epoch {}: relative parameter difference {d:.2e} \
                 (training moved them by {moved:.2e}; largest in one tensor {worst:.2e}, {name})",
                epoch + 1
            );
            assert!(d <= 1e-5, "{label}: {world} replicas differ from one by {d:e} after epoch {}", epoch + 1);
        }
        for (a, b) in mn.iter().zip(&m1) {
            assert!(rel(a.train_loss, b.train_loss) < 1e-5, "{label} {world}: {a:?} vs {b:?}");
            assert!(rel(a.val_loss, b.val_loss) < 1e-5, "{label} {world}: {a:?} vs {b:?}");
            assert!(
                (a.train_accuracy - b.train_accuracy).abs() <= 1.01 / n_train as f64,
                "{label} {world}: {a:?} vs {b:?}"
            );
            assert!((a.val_accuracy - b.val_accuracy).abs() <= 1.01 / n_val as f64, "{label} {world}: {a:?} vs {b:?}");
        }
    }
}

#[test]
fn replicas_on_a_split_batch_train_like_one_replica_on_the_whole_batch() {
    let _bound = sweep_tests::bound(600);
    // 25 images in global batches of 6: 6, 6, 6 and a last batch of 7 (a single trailing image
    // is merged), split 4+3 over two replicas and 3+2+2 over three; 3 epochs = 12 steps, the
    // last 8 training every parameter.
    let (s, t) = spec(5, 5, 4, 6, (1, 2));
    assert_equivalent("25 images", &s, &t, 6, 25, 20);
}

#[test]
fn short_and_empty_shards_keep_the_equivalence() {
    let _bound = sweep_tests::bound(600);
    // 20 images: the last global batch holds 2, which only rank 0 trains on (a shard is never
    // a single image); the others take part with empty shards.
    let (s, t) = spec(4, 5, 2, 6, (1, 1));
    assert_equivalent("20 images", &s, &t, 6, 20, 8);
    // 2 images: one global batch, always on rank 0 alone; ranks 1 and 2 contribute zero
    // gradients from the very first step of each phase.
    let (s, t) = spec(2, 1, 2, 6, (1, 1));
    assert_equivalent("2 images", &s, &t, 6, 2, 4);
}

#[test]
fn validation_is_shared_and_counts_every_sample_once() {
    let _bound = sweep_tests::bound(600);
    // 20 validation images: 10+10 and 7+7+6; 5 over 4 replicas: 2+1+1+1.
    for (classes, val) in [(5, 4), (5, 1)] {
        let (s, t) = spec(classes, 2, val, 4, (1, 1));
        let mut tr = Trainer::new(&s, &t, &cpus(1)).unwrap();
        let (loss, acc) = tr.validate().unwrap();
        for world in [2, 3, 4] {
            let mut trn = Trainer::new(&s, &t, &cpus(world)).unwrap();
            let (l, a) = trn.validate().unwrap();
            assert!(rel(l, loss) < 1e-6, "{world} replicas: loss {l} vs {loss}");
            assert_eq!(a, acc, "{world} replicas");
            assert!(tr.model().named_parameters()[0].1.equal(&trn.model().named_parameters()[0].1));
        }
    }
}

#[test]
fn data_parallel_runs_are_deterministic_with_batchnorm_training() {
    let _bound = sweep_tests::bound(600);
    // The recipe's modes (BatchNorm statistics updating, synchronised from rank 0 before every
    // step): not equivalent to one replica, but the same from run to run.
    let (s, t) = spec(3, 5, 2, 3, (1, 1));
    let run = || {
        let mut tr = Trainer::new(&s, &t, &cpus(2)).unwrap();
        let m: Vec<EpochMetrics> = (0..2).map(|_| EpochMetrics { seconds: 0.0, ..tr.run_epoch().unwrap() }).collect();
        (m, parameters(tr.model()), tr.model().named_buffers()[0].1.copy())
    };
    let (ma, pa, ba) = run();
    let (mb, pb, bb) = run();
    assert_eq!(ma, mb);
    assert_eq!(rel_diff(&pa, &pb), 0.0);
    assert!(ba.equal(&bb));
    // The running statistics did move.
    assert!(!ba.equal(&Tensor::zeros_like(&ba)));
}

#[test]
fn a_failing_replica_stops_every_replica() {
    let _bound = sweep_tests::bound(600);
    within(300, || {
        let (s, t) = spec(4, 5, 2, 2, (1, 1));
        // An error in replica 1 before its second step.
        let mut tr = Trainer::new(&s, &t, &cpus(3)).unwrap();
        tr.inject_fault(Fault { rank: 1, step: 1, panic: false });
        let e = tr.run_epoch().unwrap_err();
        assert!(matches!(e, TrainError::Retryable(_)), "{e:?}");
        assert!(e.to_string().contains("replica 1 on cpu: injected fault in replica 1 before step 1"), "{e}");
        // The replicas may no longer agree: the trainer refuses to go on.
        assert_eq!(tr.run_epoch().unwrap_err(), e);
        drop(tr);

        // A panic in replica 2.
        let mut tr = Trainer::new(&s, &t, &cpus(3)).unwrap();
        tr.inject_fault(Fault { rank: 2, step: 0, panic: true });
        let e = tr.run_epoch().unwrap_err();
        assert!(e.to_string().contains("replica 2 panicked: injected panic"), "{e}");
        drop(tr);

        // An error in rank 0 (on the caller's thread), in the second epoch.
        let mut tr = Trainer::new(&s, &t, &cpus(2)).unwrap();
        tr.run_epoch().unwrap();
        tr.inject_fault(Fault { rank: 0, step: 2, panic: false });
        let e = tr.run_epoch().unwrap_err();
        assert_eq!(e, TrainError::retryable("injected fault in replica 0 before step 2"));
    });
}

#[test]
fn cancellation_and_stop_end_every_replica() {
    let _bound = sweep_tests::bound(600);
    within(300, || {
        let (s, t) = spec(2, 4, 2, 2, (2, 1));
        let mut calls = 0;
        let e = run_trial(&s, &t, &cpus(2), &mut |_| {
            calls += 1;
            Control::Stop
        })
        .unwrap_err();
        assert_eq!((e, calls), (TrainError::Cancelled, 1));
        let opts = TrainOptions { cancel: Some(Arc::new(AtomicBool::new(true))), ..cpus(3) };
        assert_eq!(run_trial(&s, &t, &opts, &mut |_| Control::Continue).unwrap_err(), TrainError::Cancelled);
    });
}

#[test]
fn a_bad_weights_file_on_rank_0_releases_the_replicas_waiting_for_it() {
    let _bound = sweep_tests::bound(600);
    within(300, || {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("r34.safetensors");
        Model::build(Backbone::Resnet34, 10, Device::Cpu).unwrap().save_weights(&other).unwrap();
        let (mut s, t) = spec(2, 2, 2, 2, (1, 1));
        s.model.weights = sweep_core::spec::Weights::File(other.display().to_string());
        let e = Trainer::new(&s, &t, &cpus(3)).unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
        assert!(e.to_string().contains("r34.safetensors"), "{e}");
    });
}

#[test]
fn device_lists_that_cannot_form_a_group_are_refused() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = spec(2, 2, 2, 2, (1, 1));
    for (devices, says) in [
        (vec![], "at least one device"),
        (vec![Device::Cpu, Device::Cuda(0)], "all on CPU or all on CUDA"),
        (vec![Device::Cuda(0), Device::Cuda(0)], "cuda:0 appears twice"),
    ] {
        let e = Trainer::new(&s, &t, &TrainOptions::data_parallel(devices)).unwrap_err();
        assert!(matches!(e, TrainError::Retryable(_)), "{e:?}");
        assert!(e.to_string().contains(says), "{e}");
    }
    let present = tch::Cuda::device_count();
    if present < 2 {
        let e = Trainer::new(&s, &t, &TrainOptions::data_parallel(vec![Device::Cuda(0), Device::Cuda(1)])).unwrap_err();
        assert!(matches!(e, TrainError::Retryable(_)), "{e:?}");
        let says = format!("cuda:{present} is not on this machine, which has {present} CUDA device(s)");
        assert!(e.to_string().contains(&says), "{e}");
    }
}
