//! The trial loop end to end on tiny synthetic datasets (CPU).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use sweep_core::leaderboard::{EpochMetrics, Phase};
use sweep_core::spec::{self, SweepSpec};
use sweep_core::{Backbone, LrDecay, Trial, grid};
use sweep_worker::model::{ForwardMode, Model};
use sweep_worker::train::{self, Control, FeatureCacheStats, TrainError, TrainOptions, Trainer, run_trial};
use tch::{Device, Tensor};

/// A spec with one trial; `extra_training` is spliced into `training:`.
fn spec(
    backbone: &str,
    classes: u32,
    per_class: u32,
    batch: u32,
    split: (u32, u32),
    extra_training: &str,
) -> (SweepSpec, Trial) {
    let yaml = format!(
        "name: t
dataset: {{ kind: synthetic, classes: {classes}, train_per_class: {per_class}, val_per_class: 4, image_size: 32, seed: 5 }}
model: {{ weights: none }}
training:
  batch_size: {batch}
  seed: 0
  augment: {{ hflip: true, rotation_deg: 10, shear_deg: 5, color_jitter: 0.2 }}
{extra_training}
grid:
  backbone: [{backbone}]
  lr_decay: [{{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }}]
  epoch_split: [[{}, {}]]
",
        split.0, split.1
    );
    let spec = spec::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let trial = grid::expand(&spec.grid).remove(0);
    (spec, trial)
}

fn snapshot(m: &Model) -> HashMap<String, Tensor> {
    m.state_dict().into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
}

fn without_time(m: &[EpochMetrics]) -> Vec<EpochMetrics> {
    m.iter().map(|e| EpochMetrics { seconds: 0.0, ..*e }).collect()
}

fn cpu() -> TrainOptions {
    TrainOptions::new(Device::Cpu)
}

#[test]
fn run_trial_is_bit_identical_across_runs() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = spec("resnet18", 4, 8, 8, (1, 1), "");
    let mut reports = Vec::new();
    let a = run_trial(&s, &t, &cpu(), &mut |r| {
        reports.push(*r);
        Control::Continue
    })
    .unwrap();
    let b = run_trial(&s, &t, &cpu(), &mut |_| Control::Continue).unwrap();
    assert_eq!(a.metrics.len(), 2);
    assert_eq!(without_time(&a.metrics), without_time(&b.metrics), "two runs of one trial differ");
    for e in &a.metrics {
        for v in [e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy] {
            assert!(v.is_finite(), "{e:?}");
        }
        assert!((0.0..=1.0).contains(&e.train_accuracy) && (0.0..=1.0).contains(&e.val_accuracy));
    }
    assert_eq!((a.metrics[0].epoch, a.metrics[0].phase), (1, Phase::FeatureExtraction));
    assert_eq!((a.metrics[1].epoch, a.metrics[1].phase), (2, Phase::FineTuning));
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[1].metrics, a.metrics[1]);
    assert_eq!(reports[0].parameters, a.parameters);
    assert_eq!(a.parameters, Backbone::Resnet18.imagenet_parameters() - 996 * 513);

    // Another seed is another run.
    let (s2, t2) = spec("resnet18", 4, 8, 8, (1, 1), "");
    let mut s2 = s2;
    s2.training.seed = 1;
    let c = run_trial(&s2, &t2, &cpu(), &mut |_| Control::Continue).unwrap();
    assert_ne!(without_time(&a.metrics), without_time(&c.metrics));
}

#[test]
fn feature_extraction_trains_only_the_head_then_fine_tuning_trains_everything() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = spec("resnet18", 3, 6, 8, (1, 1), "");
    let mut tr = Trainer::new(&s, &t, &cpu()).unwrap();
    let before = snapshot(tr.model());
    assert_eq!(tr.phase(), Phase::FeatureExtraction);
    let names: Vec<&str> = tr.optimizer().params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fc.weight", "fc.bias"]);
    assert!(tr.optimizer().params().iter().all(|p| p.lr == s.training.feature_extraction_lr));

    let m1 = tr.run_epoch().unwrap();
    assert_eq!(m1.phase, Phase::FeatureExtraction);
    let after_fe = snapshot(tr.model());
    for (name, t) in tr.model().named_parameters() {
        let same = before[name].equal(&after_fe[name]);
        if tr.model().is_head(name) {
            assert!(!same, "head parameter {name} did not train");
        } else {
            assert!(same, "frozen parameter {name} changed during feature extraction");
            assert!(!t.requires_grad(), "{name} still requires grad");
        }
    }
    // Train mode: BatchNorm running statistics moved.
    assert!(!before["bn1.running_mean"].equal(&after_fe["bn1.running_mean"]));
    assert_eq!(after_fe["bn1.num_batches_tracked"].int64_value(&[]), 3, "18 images in batches of 8 (last merged)");

    let m2 = tr.run_epoch().unwrap();
    assert_eq!(m2.phase, Phase::FineTuning);
    let after_ft = snapshot(tr.model());
    for name in ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.bias", "fc.weight"] {
        assert!(!after_fe[name].equal(&after_ft[name]), "{name} did not change during fine-tuning");
    }
    // The fine-tuning optimizer covers every parameter with the strategy's rates.
    let opt = tr.optimizer();
    assert_eq!(opt.params().len(), tr.model().named_parameters().len());
    let want = train::fine_tuning_lrs(tr.model(), &t.lr_decay, s.training.fine_tuning_default_lr);
    let got: Vec<f64> = opt.params().iter().map(|p| p.lr).collect();
    assert_eq!(got, want);
    let lr = |n: &str| opt.params().iter().find(|p| p.name == n).unwrap().lr;
    assert_eq!(lr("fc.bias"), 1e-3);
    assert!((lr("conv1.weight") - 1e-3 / 729.0).abs() < 1e-18);
    assert!(tr.run_epoch().is_err(), "a 1+1 trial has no third epoch");
}

#[test]
fn fine_tuning_rates_follow_the_recipe_for_resnet50() {
    let _bound = sweep_tests::bound(600);
    let m = Model::build(Backbone::Resnet50, 102, Device::Cpu).unwrap();
    let lrs = train::fine_tuning_lrs(&m, &LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 }, 1e-8);
    let by_name: HashMap<&str, f64> = m.named_parameters().iter().map(|(n, _)| n.as_str()).zip(lrs).collect();
    let want = [
        ("fc.weight", 1e-4),
        ("fc.bias", 1e-4),
        ("layer4.2.conv3.weight", 3.333_333_3e-5),
        ("layer3.0.downsample.1.weight", 1.111_111_1e-5),
        ("layer2.3.bn2.bias", 3.703_703_7e-6),
        ("layer1.0.conv1.weight", 1.234_567_9e-6),
        ("bn1.weight", 4.115_226_3e-7),
        ("conv1.weight", 1.371_742_1e-7),
    ];
    for (name, lr) in want {
        assert!((by_name[name] - lr).abs() / lr < 1e-7, "{name}: {} vs {lr}", by_name[name]);
    }
    // vgg16_bn, linear: the classifier at head_lr, features.0 at final_lr.
    let v = Model::build(Backbone::Vgg16Bn, 102, Device::Cpu).unwrap();
    let lrs = train::fine_tuning_lrs(&v, &LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 }, 1e-8);
    let by_name: HashMap<&str, f64> = v.named_parameters().iter().map(|(n, _)| n.as_str()).zip(lrs).collect();
    assert_eq!(by_name["classifier.0.weight"], 1e-4);
    assert_eq!(by_name["classifier.6.bias"], 1e-4);
    assert!((by_name["features.0.weight"] - 1e-7).abs() < 1e-18);
    assert!((by_name["features.41.bias"] - (1e-4 + (1e-7 - 1e-4) / 44.0 * 3.0)).abs() < 1e-15);
}

#[test]
fn freeze_bn_stats_keeps_running_statistics_during_feature_extraction() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = spec("resnet18", 3, 4, 8, (1, 1), "  freeze_bn_stats: true");
    assert!(s.training.freeze_bn_stats);
    let mut tr = Trainer::new(&s, &t, &cpu()).unwrap();
    let before = snapshot(tr.model());
    tr.run_epoch().unwrap();
    let after = snapshot(tr.model());
    for (name, _) in tr.model().named_buffers() {
        assert!(before[name].equal(&after[name]), "{name} changed with freeze_bn_stats");
    }
    assert!(!before["fc.weight"].equal(&after["fc.weight"]));
    tr.run_epoch().unwrap();
    assert!(!after["bn1.running_var"].equal(&snapshot(tr.model())["bn1.running_var"]), "fine-tuning updates them");
}

#[test]
fn a_trailing_batch_of_one_is_merged() {
    let _bound = sweep_tests::bound(600);
    // 9 images in batches of 8: the last batch would hold one image (BatchNorm cannot train on
    // it at 32 px, where layer4's output is 1×1).
    let (s, t) = spec("resnet18", 3, 3, 8, (1, 1), "");
    let r = run_trial(&s, &t, &cpu(), &mut |_| Control::Continue).unwrap();
    assert_eq!(r.metrics.len(), 2);
    // batch_size 1 everywhere is an error, not a panic.
    let (s, t) = spec("resnet18", 2, 2, 1, (1, 1), "");
    let e = run_trial(&s, &t, &cpu(), &mut |_| Control::Continue).unwrap_err();
    assert!(e.is_permanent(), "{e}");
    assert!(e.to_string().contains("training epoch 1"), "{e}");
}

#[test]
fn stop_and_cancel_end_the_trial() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = spec("resnet18", 2, 4, 8, (2, 1), "");
    let mut calls = 0;
    let e = run_trial(&s, &t, &cpu(), &mut |_| {
        calls += 1;
        Control::Stop
    })
    .unwrap_err();
    assert_eq!(e, TrainError::Cancelled);
    assert_eq!(calls, 1);
    let flag = Arc::new(AtomicBool::new(true));
    let opts = TrainOptions { cancel: Some(flag), ..cpu() };
    let e = run_trial(&s, &t, &opts, &mut |_| Control::Continue).unwrap_err();
    assert_eq!(e, TrainError::Cancelled);
}

#[test]
fn bad_settings_are_permanent_errors_that_say_what_is_wrong() {
    let _bound = sweep_tests::bound(600);
    let (mut s, t) = spec("resnet18", 2, 4, 8, (1, 1), "");
    s.model.weights = sweep_core::spec::Weights::ImageNet;
    let dir = tempfile::tempdir().unwrap();
    let opts = TrainOptions { weights_dir: Some(dir.path().to_path_buf()), ..cpu() };
    let e = run_trial(&s, &t, &opts, &mut |_| Control::Continue).unwrap_err();
    assert!(e.is_permanent());
    let text = e.to_string();
    assert!(text.contains(&dir.path().join("resnet18.safetensors").display().to_string()), "{text}");
    assert!(text.contains("export_torchvision_weights.py") && text.contains("non-commercial"), "{text}");

    // A weights file of another backbone.
    let other = dir.path().join("r34.safetensors");
    Model::build(Backbone::Resnet34, 10, Device::Cpu).unwrap().save_weights(&other).unwrap();
    s.model.weights = sweep_core::spec::Weights::File(other.display().to_string());
    let e = run_trial(&s, &t, &cpu(), &mut |_| Control::Continue).unwrap_err();
    assert!(e.is_permanent(), "{e}");
    assert!(e.to_string().contains("r34.safetensors") && e.to_string().contains("`layer1.2."), "{e}");

    let (mut s, t) = spec("resnet18", 2, 4, 8, (1, 1), "");
    s.dataset = sweep_core::spec::DatasetSpec::ImageFolder {
        root: "/no/such/dataset".into(),
        image_size: 32,
        skip_corrupt: false,
    };
    let e = run_trial(&s, &t, &cpu(), &mut |_| Control::Continue).unwrap_err();
    assert!(e.is_permanent());
    assert!(e.to_string().contains("/no/such/dataset") && e.to_string().contains("train/<class>"), "{e}");

    s.dataset = sweep_core::spec::DatasetSpec::Flowers102 {
        root: "/no/such/flowers".into(),
        train_split: vec![sweep_core::spec::FlowersSplit::Test],
        val_split: vec![sweep_core::spec::FlowersSplit::Train],
        image_size: 32,
        skip_corrupt: false,
    };
    let e = run_trial(&s, &t, &cpu(), &mut |_| Control::Continue).unwrap_err();
    assert!(e.is_permanent(), "{e}");
    assert!(e.to_string().contains("/no/such/flowers") && e.to_string().contains("imagelabels.mat"), "{e}");
}

#[test]
fn weights_are_loaded_except_the_head() {
    let _bound = sweep_tests::bound(600);
    // A resnet18 "pretrained" on another task: its weights (but not its head) become the
    // trial's starting point.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pre.safetensors");
    let pre = Model::build_seeded(Backbone::Resnet18, 1000, Device::Cpu, 42).unwrap();
    pre.save_weights(&file).unwrap();
    let (mut s, t) = spec("resnet18", 3, 4, 8, (1, 1), "");
    s.model.weights = sweep_core::spec::Weights::File(file.display().to_string());
    let tr = Trainer::new(&s, &t, &cpu()).unwrap();
    let loaded = snapshot(tr.model());
    let pre = snapshot(&pre);
    assert!(loaded["layer3.1.conv2.weight"].equal(&pre["layer3.1.conv2.weight"]));
    assert_eq!(loaded["fc.weight"].size(), vec![3, 512]);
}

#[test]
fn vgg16_bn_feature_extraction_epoch() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = spec("vgg16_bn", 2, 3, 4, (1, 1), "");
    let mut tr = Trainer::new(&s, &t, &cpu()).unwrap();
    let before = snapshot(tr.model());
    let m = tr.run_epoch().unwrap();
    assert!(m.train_loss.is_finite() && m.val_loss.is_finite());
    let after = snapshot(tr.model());
    assert!(before["classifier.3.weight"].equal(&after["classifier.3.weight"]), "old classifier layers are frozen");
    assert!(!before["classifier.6.weight"].equal(&after["classifier.6.weight"]));
}

/// A trial with BatchNorm frozen and no augmentation in feature extraction (the spec's
/// augmentation stays on for fine-tuning).
fn pure_spec(backbone: &str, classes: u32, per_class: u32, batch: u32, split: (u32, u32)) -> (SweepSpec, Trial) {
    let (mut s, t) = spec(backbone, classes, per_class, batch, split, "  freeze_bn_stats: true");
    s.training.feature_extraction_augment = false;
    (s, t)
}

fn with_cache(cache: bool) -> TrainOptions {
    TrainOptions { feature_cache: cache, ..cpu() }
}

/// What a run gives: metrics, final weights, the cache's rows after each epoch, its stats.
struct CachedRun {
    metrics: Vec<EpochMetrics>,
    state: HashMap<String, Tensor>,
    held: Vec<Option<(i64, i64)>>,
    /// Rank 0's.
    stats: FeatureCacheStats,
    /// Every replica's, in rank order.
    replicas: Vec<FeatureCacheStats>,
}

/// Trains every epoch of the trial with or without the feature cache.
fn cached_run(s: &SweepSpec, t: &Trial, cache: bool) -> CachedRun {
    run_with(Trainer::new(s, t, &with_cache(cache)).unwrap())
}

/// Trains every epoch of `tr`'s trial.
fn run_with(mut tr: Trainer) -> CachedRun {
    let (mut metrics, mut held) = (Vec::new(), Vec::new());
    while tr.epochs_done() < tr.total_epochs() {
        metrics.push(tr.run_epoch().unwrap());
        held.push(tr.cached_features());
    }
    let replicas = tr.feature_cache_stats_per_replica().unwrap();
    assert_eq!(replicas[0], tr.feature_cache_stats());
    CachedRun {
        metrics: without_time(&metrics),
        state: snapshot(tr.model()),
        held,
        stats: tr.feature_cache_stats(),
        replicas,
    }
}

fn assert_same_state(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len());
    for (name, t) in a {
        assert!(t.equal(&b[name]), "{what}: {name} differs between the cached and the uncached run");
    }
}

#[test]
fn the_feature_cache_is_bit_identical_to_running_the_backbone() {
    let _bound = sweep_tests::bound(900);
    // 4 classes: 20 training images in batches of 6 (6, 6, 6 from the cache, then 2 computed
    // afresh) or of 5 (all from the cache); 16 validation images in batches of 6 (3) or 5 (4).
    // mobilenet_v2 and vgg16_bn have dropout after the cached part (vgg16_bn also its frozen
    // classifier layers, whose matrix products depend on a row's place in the batch).
    for (backbone, batch, read, computed, val) in [
        ("resnet18", 6, 3, 1, 3),
        ("resnet18", 5, 4, 0, 4),
        ("mobilenet_v2", 6, 3, 1, 3),
        ("vgg16_bn", 6, 3, 1, 3),
        ("densenet121", 6, 3, 1, 3),
    ] {
        let (s, t) = pure_spec(backbone, 4, 5, batch, (2, 1));
        let off = cached_run(&s, &t, false);
        let on = cached_run(&s, &t, true);
        assert_eq!(off.held, [None, None, None]);
        assert_eq!(off.stats, FeatureCacheStats::default());
        assert_eq!(on.held, [Some((20, 16)), Some((20, 16)), None], "{backbone}: the cache was not kept");
        let want = FeatureCacheStats {
            builds: 1,
            train_batches_read: 2 * read,
            train_batches_computed: 2 * computed,
            val_batches_read: 2 * val,
            abandoned: 0,
        };
        assert_eq!(on.stats, want, "{backbone} batch {batch}: the cache was not read as planned");
        assert_eq!(on.metrics, off.metrics, "{backbone} batch {batch}: metrics differ");
        assert_same_state(&on.state, &off.state, backbone);
    }
    // A trailing single image merged into the last batch (15 = 7 + 8), and validation alone.
    let (s, t) = pure_spec("resnet18", 3, 5, 7, (2, 1));
    let run = |cache: bool| {
        let mut tr = Trainer::new(&s, &t, &with_cache(cache)).unwrap();
        let m = vec![tr.run_epoch().unwrap(), tr.run_epoch().unwrap()];
        assert_eq!(tr.cached_features(), cache.then_some((15, 12)));
        let v = tr.validate().unwrap();
        (without_time(&m), v, snapshot(tr.model()), tr.feature_cache_stats())
    };
    let (m_off, v_off, s_off, _) = run(false);
    let (m_on, v_on, s_on, stats) = run(true);
    assert_eq!((m_on, v_on), (m_off, v_off));
    assert_same_state(&s_on, &s_off, "15 images");
    let want = FeatureCacheStats {
        builds: 1,
        train_batches_read: 2,
        train_batches_computed: 2,
        val_batches_read: 6,
        abandoned: 0,
    };
    assert_eq!(stats, want);
}

#[test]
fn the_feature_cache_follows_mode_changes_and_resume_points() {
    let _bound = sweep_tests::bound(900);
    let (s, t) = pure_spec("resnet18", 4, 5, 6, (4, 1));
    // BatchNorm trains in epoch 2 (the features change as they are computed): the cache is
    // dropped, and built again for epoch 3.
    let run = |cache: bool| {
        let mut tr = Trainer::new(&s, &t, &with_cache(cache)).unwrap();
        let mut m = Vec::new();
        for e in 1..=5 {
            tr.set_forward_mode_override((e == 2).then_some(ForwardMode::TRAIN));
            m.push(tr.run_epoch().unwrap());
        }
        (without_time(&m), snapshot(tr.model()), tr.feature_cache_stats())
    };
    let (m_off, s_off, _) = run(false);
    let (m_on, s_on, stats) = run(true);
    assert_eq!(m_on, m_off);
    assert_same_state(&s_on, &s_off, "a mode change");
    assert_eq!((stats.builds, stats.train_batches_read), (2, 3 * 3), "epochs 1, 3, 4 from two caches");

    // Stopped after epoch 1 and resumed: the new trainer builds its own cache (epochs 2–4).
    let whole = cached_run(&s, &t, false);
    let mut first = Trainer::new(&s, &t, &with_cache(true)).unwrap();
    let mut m = vec![first.run_epoch().unwrap()];
    let state = first.training_state().unwrap();
    drop(first);
    let resumed = TrainOptions { resume: Some(Arc::new(Mutex::new(state))), ..with_cache(true) };
    let mut second = Trainer::new(&s, &t, &resumed).unwrap();
    while second.epochs_done() < second.total_epochs() {
        m.push(second.run_epoch().unwrap());
    }
    assert_eq!(without_time(&m), whole.metrics);
    assert_same_state(&snapshot(second.model()), &whole.state, "resumed");
    assert_eq!(second.feature_cache_stats().builds, 1);
}

#[test]
fn a_feature_cache_that_fails_its_check_or_its_build_is_given_up_and_the_run_is_unchanged() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = pure_spec("resnet18", 4, 5, 6, (3, 1));
    let off = cached_run(&s, &t, false);
    // (fault, builds counted): a spoilt cache was built, then failed its check; a build that
    // fails leaves nothing built.
    for (spoil, builds) in [(true, 1), (false, 0)] {
        let mut tr = Trainer::new(&s, &t, &with_cache(true)).unwrap();
        if spoil {
            tr.spoil_next_feature_cache(0);
        } else {
            tr.fail_next_feature_cache_build(0);
        }
        let mut m = Vec::new();
        while tr.epochs_done() < tr.total_epochs() {
            m.push(tr.run_epoch().unwrap());
            assert_eq!(tr.cached_features(), None, "a cache that was given up is not kept");
        }
        let stats = tr.feature_cache_stats();
        assert_eq!((stats.builds, stats.abandoned), (builds, 1), "given up once, not tried again this phase");
        assert_eq!((stats.train_batches_read, stats.val_batches_read), (0, 0));
        assert_eq!(without_time(&m), off.metrics);
        assert_same_state(&snapshot(tr.model()), &off.state, "after the cache was given up");
    }
}

#[test]
fn the_feature_cache_serves_only_a_pure_frozen_backbone() {
    let _bound = sweep_tests::bound(600);
    // Each case also checks what `sweep plan` assumes (`stages::feature_cache_applies`).
    let first_epoch = |s: SweepSpec, t: Trial| {
        let mut tr = Trainer::new(&s, &t, &with_cache(true)).unwrap();
        tr.run_epoch().unwrap();
        let held = tr.cached_features();
        if t.fe_epochs >= 2 {
            assert_eq!(sweep_core::stages::feature_cache_applies(&s, t.backbone), held.is_some(), "{:?}", s.training);
        }
        held
    };
    let (s, t) = pure_spec("resnet18", 2, 3, 4, (2, 1));
    assert!(first_epoch(s.clone(), t.clone()).is_some());
    // BatchNorm trains: the features change as they are computed.
    let mut bn = s.clone();
    bn.training.freeze_bn_stats = false;
    assert_eq!(first_epoch(bn, t.clone()), None);
    // Augmented images differ every epoch; a flip alone is augmentation.
    let mut augmented = s.clone();
    augmented.training.feature_extraction_augment = true;
    assert_eq!(first_epoch(augmented.clone(), t.clone()), None);
    augmented.training.augment = spec::Augment { hflip: true, ..spec::Augment::NONE };
    assert_eq!(first_epoch(augmented, t.clone()), None);
    // Nothing augmented at all is as good as no augmentation in feature extraction.
    let mut none = s.clone();
    none.training.feature_extraction_augment = true;
    none.training.augment = spec::Augment::NONE;
    assert!(first_epoch(none, t.clone()).is_some());
    // One feature-extraction epoch: building the cache would buy nothing.
    let (s1, t1) = pure_spec("resnet18", 2, 3, 4, (1, 1));
    assert_eq!(first_epoch(s1, t1), None);
    // Turned off.
    let mut tr = Trainer::new(&s, &t, &with_cache(false)).unwrap();
    tr.run_epoch().unwrap();
    assert_eq!(tr.cached_features(), None);
    // Data parallel: built, the replicas sharing out its pass (see the test below).
    let mut dp = s.clone();
    dp.resources.gpus_per_trial = 2;
    let mut tr = Trainer::new(&dp, &t, &replicas(2, true)).unwrap();
    tr.run_epoch().unwrap();
    assert_eq!(tr.cached_features(), Some((6, 4)), "every training row, half of validation");
    assert!(sweep_core::stages::feature_cache_applies(&dp, t.backbone));
    // Stochastic depth draws inside efficientnet_b0's backbone.
    let (e, et) = pure_spec("efficientnet_b0", 2, 3, 4, (2, 1));
    assert_eq!(first_epoch(e, et), None);
}

fn replicas(world: usize, cache: bool) -> TrainOptions {
    TrainOptions { feature_cache: cache, ..TrainOptions::data_parallel(vec![Device::Cpu; world]) }
}

/// One replica's training parts read from the cache, computed afresh, and validation batches
/// read, in an epoch.
type PerEpoch = (u64, u64, u64);

/// Trains `t` with `world` CPU replicas with the feature cache and without: the same metrics
/// and weights, rank 0 holds `held` rows (training, its part of validation) while feature
/// extraction lasts, and each replica read and computed per epoch what `per_replica` says.
fn assert_cache_shared(s: &SweepSpec, t: &Trial, world: usize, per_replica: &[PerEpoch], held: (i64, i64)) {
    let off = run_with(Trainer::new(s, t, &replicas(world, false)).unwrap());
    let counters = sweep_worker::metrics::global();
    let (built, read) = (counters.feature_caches_built.get(), counters.feature_cache_batches_read.get());
    let on = run_with(Trainer::new(s, t, &replicas(world, true)).unwrap());
    let what = format!("{world} replicas, batch {}, {} images", s.training.batch_size, held.0);
    // The worker's /metrics counts them too (other tests may add to these counters meanwhile).
    assert!(counters.feature_caches_built.get() > built, "{what}: sweep_worker_feature_caches_built");
    let all_read: u64 = per_replica.iter().map(|p| p.0 * u64::from(t.fe_epochs)).sum();
    assert!(counters.feature_cache_batches_read.get() >= read + all_read, "{what}: every replica's reads counted");
    assert_eq!(on.held, [Some(held), Some(held), None], "{what}: rank 0 holds every training row");
    let epochs = u64::from(t.fe_epochs);
    let want: Vec<FeatureCacheStats> = per_replica
        .iter()
        .map(|&(read, computed, val)| FeatureCacheStats {
            builds: 1,
            train_batches_read: epochs * read,
            train_batches_computed: epochs * computed,
            val_batches_read: epochs * val,
            abandoned: 0,
        })
        .collect();
    assert_eq!(on.replicas, want, "{what}: the replicas did not read the cache as planned");
    assert_eq!(off.replicas, vec![FeatureCacheStats::default(); world], "{what}");
    assert_eq!(on.metrics, off.metrics, "{what}: metrics differ");
    assert_same_state(&on.state, &off.state, &what);
}

#[test]
fn data_parallel_replicas_share_one_feature_cache_bit_identical_to_running_the_backbone() {
    let _bound = sweep_tests::bound(1200);
    // 20 training images, 16 for validation, 2 epochs of feature extraction. Global batches
    // (batch × world) and each replica's parts:
    // - world 2, batch 4: 8, 8, 4 → parts of 4, 4, 2 (2 computed afresh);
    // - world 3, batch 3: 9, 9, 2 → parts of 3, 3 and 2, 0, 0 (replicas 1 and 2 idle, rank 0
    //   computes afresh);
    // - world 2, batch 16: one global batch of 20 → parts of 10, all cached.
    // Each replica computes 10, 7 or 6 rows of the training features and receives the rest.
    // Per replica and epoch: (training parts read, computed afresh, validation batches read).
    let cases: [(usize, u32, &[PerEpoch]); 3] =
        [(2, 4, &[(2, 1, 2), (2, 1, 2)]), (3, 3, &[(2, 1, 2), (2, 0, 2), (2, 0, 2)]), (2, 16, &[(1, 0, 1), (1, 0, 1)])];
    for (world, batch, per_replica) in cases {
        let (s, t) = pure_spec("resnet18", 4, 5, batch, (2, 1));
        assert_cache_shared(&s, &t, world, per_replica, (20, 16_usize.div_ceil(world) as i64));
    }
    // Two training images on three replicas: one part of 2 (rank 0's); replica 2 has no rows
    // of its own to compute (it learns the features' width from a batch it throws away).
    let (s, t) = pure_spec("resnet18", 2, 1, 4, (2, 1));
    assert_cache_shared(&s, &t, 3, &[(1, 0, 1), (0, 0, 1), (0, 0, 1)], (2, 3));
    // A replica that cannot build its part, or whose check fails: every replica gives the
    // cache up (rank 0 counts it even when the fault was replica 1's), and the run is the
    // uncached one.
    let (s, t) = pure_spec("resnet18", 4, 5, 4, (3, 1));
    let off = run_with(Trainer::new(&s, &t, &replicas(2, false)).unwrap());
    for rank in [0, 1] {
        for (spoil, builds) in [(true, 1), (false, 0)] {
            let abandoned = sweep_worker::metrics::global().feature_caches_abandoned.get();
            let mut tr = Trainer::new(&s, &t, &replicas(2, true)).unwrap();
            if spoil {
                tr.spoil_next_feature_cache(rank);
            } else {
                tr.fail_next_feature_cache_build(rank);
            }
            let run = run_with(tr);
            let what = format!("replica {rank}, spoilt {spoil}");
            assert_eq!(run.held, [None, None, None, None], "{what}");
            assert!(sweep_worker::metrics::global().feature_caches_abandoned.get() > abandoned, "{what}: counted");
            for (r, stats) in run.replicas.iter().enumerate() {
                assert_eq!((stats.builds, stats.abandoned), (builds, 1), "{what}: replica {r} gave it up once");
                assert_eq!((stats.train_batches_read, stats.val_batches_read), (0, 0), "{what}: replica {r}");
            }
            assert_eq!(run.metrics, off.metrics, "{what}");
            assert_same_state(&run.state, &off.state, &what);
        }
    }
}

#[test]
fn a_replica_cancelled_while_building_its_part_of_the_cache_stops_every_replica() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = pure_spec("resnet18", 4, 5, 4, (2, 1));
    for rank in [0, 1, 2] {
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, t) = (s.clone(), t.clone());
        std::thread::spawn(move || {
            let mut tr = Trainer::new(&s, &t, &replicas(3, true)).unwrap();
            tr.cancel_next_feature_cache_build(rank);
            let first = tr.run_epoch().map(|_| ());
            let _ = tx.send((first, tr.run_epoch().map(|_| ())));
        });
        let (first, next) = rx.recv_timeout(std::time::Duration::from_secs(300)).expect("the replicas hung");
        assert_eq!(first, Err(TrainError::Cancelled), "replica {rank}");
        assert_eq!(next, Err(TrainError::Cancelled), "a stopped trainer trains no further");
    }
}

#[test]
fn the_frozen_backbone_gets_no_gradients_or_optimizer_state() {
    let _bound = sweep_tests::bound(600);
    // Augmented, BatchNorm training: the backbone runs every step (under no_grad); only the
    // head has gradients, optimizer state, and a place in the resume point.
    let (s, t) = spec("resnet18", 2, 4, 4, (1, 1), "");
    let mut tr = Trainer::new(&s, &t, &cpu()).unwrap();
    tr.run_epoch().unwrap();
    for (name, p) in tr.model().named_parameters() {
        if tr.model().is_head(name) {
            assert!(p.grad().defined(), "{name} has no gradient");
        } else {
            assert!(!p.requires_grad() && !p.grad().defined(), "frozen {name} has a gradient");
        }
    }
    let stated: Vec<&str> =
        tr.optimizer().params().iter().filter(|p| p.state.is_some()).map(|p| p.name.as_str()).collect();
    assert_eq!(stated, ["fc.weight", "fc.bias"]);
    let state = tr.training_state().unwrap();
    assert_eq!(state.optimizer.len(), 2, "the resume point holds the head's optimizer state only");
    tr.run_epoch().unwrap();
    assert!(tr.model().named_parameters().iter().all(|(_, p)| p.grad().defined()), "fine-tuning trains everything");
}

#[test]
fn unaugmented_feature_extraction_is_cached_and_fine_tuning_still_augmented() {
    let _bound = sweep_tests::bound(600);
    let (s, t) = pure_spec("resnet18", 4, 5, 6, (2, 1));
    assert!(!s.training.augment.is_identity());
    let off = cached_run(&s, &t, false);
    let on = cached_run(&s, &t, true);
    assert_eq!(on.held, [Some((20, 16)), Some((20, 16)), None]);
    assert_eq!(on.metrics, off.metrics);
    assert_same_state(&on.state, &off.state, "feature extraction without augmentation");
    // Fine-tuning is augmented: the same trial with augmentation off everywhere differs there.
    let mut plain = s.clone();
    plain.training.augment = spec::Augment::NONE;
    let all_plain = cached_run(&plain, &t, true);
    assert_eq!(all_plain.metrics[..2], on.metrics[..2], "feature extraction is the same");
    assert_ne!(all_plain.metrics[2], on.metrics[2], "fine-tuning is augmented");
}
