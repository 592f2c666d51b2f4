//! Pretraining on one's own data: cached by content, done once, and the trials start from it.

use crate::common;

use std::path::Path;

use sweep_core::Backbone;
use sweep_core::spec;
use sweep_worker::daemon::train_attempt;
use sweep_worker::pretrain;
use sweep_worker::train::{Control, TrainOptions};
use tch::Tensor;

const SPEC: &str = "\
name: pre
dataset: { kind: synthetic, classes: 3, train_per_class: 4, val_per_class: 2, image_size: 32, seed: 3 }
training: { batch_size: 6, augment: { hflip: false, rotation_deg: 0, shear_deg: 0, color_jitter: 0 } }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-5 }]
  epoch_split: [[1, 1]]
pretrain:
  dataset: { kind: synthetic, classes: 4, train_per_class: 4, val_per_class: 2, image_size: 32, seed: 11 }
  epochs: 1
";

fn cpu() -> TrainOptions {
    TrainOptions::new(tch::Device::Cpu)
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap()
}

fn tensor(path: &Path, name: &str) -> Tensor {
    tensors(path).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} in {}", path.display())).1
}

#[test]
fn pretrained_weights_are_made_once_and_reused() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let s = spec::parse(SPEC).unwrap();
    // Told as it goes: started (0 of 1 epochs), then each epoch.
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    type Told = std::sync::Arc<std::sync::Mutex<Vec<(u32, u32, bool)>>>;
    let recording = |told: &Told, stop: bool| {
        let told = std::sync::Arc::clone(told);
        TrainOptions {
            progress: Some(sweep_worker::train::Progress(std::sync::Arc::new(
                move |p: &sweep_core::records::PretrainProgress| {
                    told.lock().unwrap().push((p.epoch, p.epochs, p.waiting));
                    stop
                },
            ))),
            ..cpu()
        }
    };
    // Told to stop: it stops (cancelled), and nothing is cached.
    let stopped = pretrain::ensure(&s, Backbone::Resnet18, dir.path(), &recording(&told, true));
    assert!(matches!(stopped, Err(sweep_worker::train::TrainError::Cancelled)), "{stopped:?}");
    assert_eq!(std::mem::take(&mut *told.lock().unwrap()), [(0, 1, false)]);
    let first = pretrain::ensure(&s, Backbone::Resnet18, dir.path(), &recording(&told, false)).unwrap();
    assert_eq!(std::mem::take(&mut *told.lock().unwrap()), [(0, 1, false), (1, 1, false)]);
    assert!(first.starts_with(dir.path().join("pretrain")));
    let record = pretrain::read_record(&first).unwrap();
    assert_eq!((record.backbone.as_str(), record.epochs), ("resnet18", 1));
    assert_eq!(record.key, pretrain::cache_key(s.pretrain.as_ref().unwrap(), Backbone::Resnet18, &s.training.augment));
    // The head has the pretraining dataset's 4 classes.
    assert_eq!(tensor(&first, "fc.weight").size(), vec![4, 512]);
    let written = std::fs::metadata(&first).unwrap().modified().unwrap();
    let again = pretrain::ensure(&s, Backbone::Resnet18, dir.path(), &recording(&told, false)).unwrap();
    assert_eq!(again, first);
    assert!(told.lock().unwrap().is_empty(), "cached weights: nothing to tell");
    assert_eq!(std::fs::metadata(&again).unwrap().modified().unwrap(), written, "reused, not retrained");
    // No temporary file is left; the lock file stays, unlocked (unlinking it could let two
    // processes lock different files of the same name).
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("pretrain"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names[0].ends_with(".json") && names[1].ends_with(".lock") && names[2].ends_with(".safetensors"),
        "{names:?}"
    );
}

#[test]
fn the_cache_key_follows_every_setting_that_changes_the_weights() {
    let _bound = sweep_tests::bound(600);
    let s = spec::parse(SPEC).unwrap();
    let p = s.pretrain.clone().unwrap();
    let key = pretrain::cache_key(&p, Backbone::Resnet18, &s.training.augment);
    assert_eq!(key, pretrain::cache_key(&p.clone(), Backbone::Resnet18, &s.training.augment));
    assert_ne!(key, pretrain::cache_key(&p, Backbone::Resnet50, &s.training.augment));
    assert_ne!(
        key,
        pretrain::cache_key(
            &sweep_core::spec::PretrainSpec { epochs: 2, ..p.clone() },
            Backbone::Resnet18,
            &s.training.augment
        )
    );
    assert_ne!(
        key,
        pretrain::cache_key(
            &sweep_core::spec::PretrainSpec { lr: 2e-3, ..p.clone() },
            Backbone::Resnet18,
            &s.training.augment
        )
    );
    let mut aug = s.training.augment;
    aug.hflip = true;
    assert_ne!(key, pretrain::cache_key(&p, Backbone::Resnet18, &aug));
}

#[test]
fn a_live_lock_is_waited_for_and_a_dead_one_taken_over() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let s = spec::parse(SPEC).unwrap();
    let key = pretrain::cache_key(s.pretrain.as_ref().unwrap(), Backbone::Resnet18, &s.training.augment);
    let cache = dir.path().join("pretrain");
    std::fs::create_dir_all(&cache).unwrap();
    let weights = cache.join(format!("resnet18-{}.safetensors", &key[..16]));
    let lock = weights.with_extension("lock");

    // Another worker holds the lock (an flock on the file); its weights arrive a moment later.
    let held = std::fs::File::create(&lock).unwrap();
    // SAFETY: flock(2) on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) }, 0);
    let (w, l) = (weights.clone(), lock.clone());
    let other = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        std::fs::write(&w, b"weights of the other worker").unwrap();
        std::fs::remove_file(&l).unwrap();
        drop(held);
    });
    let got = pretrain::ensure(&s, Backbone::Resnet18, dir.path(), &cpu()).unwrap();
    other.join().unwrap();
    assert_eq!(got, weights);
    assert_eq!(std::fs::read(&got).unwrap(), b"weights of the other worker", "waited instead of pretraining");

    // A lock file its holder left behind when it died (the kernel released its lock; in a
    // container a restarted worker has the same process id, 1, as the dead one) is taken over.
    std::fs::remove_file(&weights).unwrap();
    std::fs::write(&lock, "1\n").unwrap();
    let got = pretrain::ensure(&s, Backbone::Resnet18, dir.path(), &cpu()).unwrap();
    assert!(pretrain::read_record(&got).is_some());
    // Not held any more: anyone can take it.
    let f = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    // SAFETY: flock(2) on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) }, 0);
}

#[test]
fn trials_start_from_the_pretrained_backbone() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let s = spec::parse(SPEC).unwrap();
    let a = common::assignment(SPEC, "pre-0001", 1);
    let cache = dir.path().join("cache");
    // `last` is rewritten every epoch: keep a copy of the one after feature extraction.
    let after_fe = dir.path().join("after-fe.safetensors");
    train_attempt(&a, &cpu(), &common::local_store(&dir.path().join("artifacts")), &cache, &mut |r| {
        if r.metrics.unwrap().epoch == 1 {
            std::fs::copy(r.last_checkpoint.unwrap().uri, &after_fe).unwrap();
        }
        Control::Continue
    })
    .unwrap();
    let pretrained = pretrain::ensure(&s, Backbone::Resnet18, &cache, &cpu()).unwrap();
    // After feature extraction (epoch 1) every backbone tensor is the pretrained one; the head
    // is new (3 classes, not the pretraining's 4).
    let after_fe = after_fe.as_path();
    for name in ["conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.weight"] {
        assert!(tensor(after_fe, name).equal(&tensor(&pretrained, name)), "{name}");
    }
    assert_eq!(tensor(after_fe, "fc.weight").size(), vec![3, 512]);
}
