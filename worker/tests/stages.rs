//! The stage tree's premise on the real trainer (CPU): running each stage of
//! `sweep_core::stages` once — a child stage continuing from its parent's end state through a
//! saved resume point, as whichever of its trials the stage is run for — gives every trial the
//! per-epoch metrics and final weights it gets running alone, bit for bit: for 2 strategies × 3
//! splits (feature extraction shared across strategies and splits, fine-tuning shared by trials
//! with the same feature extraction and strategy), with one replica and with 2 data-parallel
//! replicas.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sweep_core::leaderboard::EpochMetrics;
use sweep_core::spec::{self, SweepSpec};
use sweep_core::stages::StageTree;
use sweep_worker::resume::TrainingState;
use sweep_worker::train::{TrainOptions, Trainer};
use tch::{Device, Tensor};

const SPEC: &str = "name: stages
dataset: { kind: synthetic, classes: 3, train_per_class: 6, val_per_class: 3, image_size: 32, seed: 4 }
model: { weights: none }
training:
  batch_size: 4
  seed: 11
  augment: { hflip: true, rotation_deg: 10, shear_deg: 5, color_jitter: 0.2 }
grid:
  backbone: [resnet18]
  lr_decay:
    - { strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-6 }
    - { strategy: exponential, head_lr: 1.0e-3, factor: 3 }
  epoch_split: [[1, 2], [1, 3], [2, 1]]
";

type Weights = Vec<(String, Tensor)>;

fn assert_same(got: &Weights, want: &Weights, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for ((name, a), (_, b)) in got.iter().zip(want) {
        assert!(a.equal(b), "{name} differs: {what}");
    }
}

fn check(devices: Vec<Device>) {
    let s: SweepSpec = spec::parse(SPEC).unwrap();
    let tree = StageTree::build(&s, true);
    let opts = TrainOptions::data_parallel(devices);
    assert!(tree.stage_epochs().total() < tree.naive_epochs().total(), "the grid shares epochs");

    // Every trial alone.
    let mut alone: HashMap<usize, (Vec<EpochMetrics>, Weights)> = HashMap::new();
    for t in &tree.trials {
        let mut tr = Trainer::new(&s, t, &opts).unwrap();
        let mut metrics = Vec::new();
        while tr.epochs_done() < tr.total_epochs() {
            metrics.push(common::zero_time(tr.run_epoch().unwrap()));
        }
        alone.insert(t.index, (metrics, common::weights(&tr)));
    }

    // Every stage once, parents first: run for the stage's first trial, from the parent's saved
    // end state; the epochs belong to every trial through the stage.
    let dir = tempfile::tempdir().unwrap();
    let store = common::local_store(dir.path());
    let mut ends: HashMap<usize, String> = HashMap::new();
    let mut shared: HashMap<usize, Vec<EpochMetrics>> = HashMap::new();
    for stage in &tree.stages {
        let trial = &tree.trials[stage.trials[0]];
        let resume = stage.parent.map(|p| {
            let key = store.key_of(&ends[&p]).unwrap();
            let (state, m) = TrainingState::fetch(&store, &key, dir.path(), None).unwrap();
            assert_eq!(m.epoch, stage.first_epoch - 1);
            Arc::new(Mutex::new(state))
        });
        let mut tr = Trainer::new(&s, trial, &TrainOptions { resume, ..opts.clone() }).unwrap();
        assert_eq!(tr.epochs_done(), stage.first_epoch - 1, "{}", stage.id());
        while tr.epochs_done() < stage.last_epoch {
            let m = common::zero_time(tr.run_epoch().unwrap());
            for &t in &stage.trials {
                shared.entry(t).or_default().push(m);
            }
        }
        for &t in &stage.ends {
            assert_same(
                &common::weights(&tr),
                &alone[&t].1,
                &format!("final weights of t{t:03} through {}", stage.id()),
            );
        }
        if !stage.children.is_empty() {
            let key = format!("stages/{}", stage.key);
            let saved = tr
                .training_state()
                .unwrap()
                .save(&store, &key, dir.path(), common::state_meta("stages", "stage", stage.last_epoch))
                .unwrap();
            ends.insert(stage.index, saved.uri);
        }
    }
    for t in &tree.trials {
        assert_eq!(shared[&t.index], alone[&t.index].0, "metrics of {} ({})", t.id, tree.shared_label(t.index));
    }
}

#[test]
fn running_each_stage_once_gives_every_trial_its_own_results_bit_for_bit() {
    let _bound = sweep_tests::bound(600);
    check(vec![Device::Cpu]);
}

#[test]
fn shared_stages_are_exact_data_parallel_too() {
    let _bound = sweep_tests::bound(600);
    check(vec![Device::Cpu, Device::Cpu]);
}
