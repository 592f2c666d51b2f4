//! Pretraining on one's own data (the guide's way around ImageNet's licence): a backbone is
//! trained from random weights on the spec's `pretrain.dataset`, every layer at `pretrain.lr`,
//! and the sweep's trials then start from those weights (their head replaced as usual).
//!
//! The result is cached by content: the file name carries a SHA-256 of everything that
//! determines the weights (the pretraining section, the backbone, the augmentation and a format
//! version), so a second trial, sweep or run reuses it. Several workers sharing the cache
//! directory pretrain a backbone once: the first takes an advisory lock (`flock`) on a lock
//! file, the others wait for the weights. The kernel releases the lock when its holder dies
//! (SIGKILL, the OOM killer), so a lock is never left held: no process id to check, which
//! would fail in containers (every worker is PID 1 there, so a restarted one would wait for its
//! dead predecessor forever) and on a cache volume several hosts share.
//!
//! Pretraining reuses the trial loop: it is a "trial" with no feature-extraction epoch whose
//! fine-tuning gives every layer group the same learning rate (exponential decay with factor 1).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sweep_core::Backbone;
use sweep_core::grid::Trial;
use sweep_core::lr::LrDecay;
use sweep_core::records::PretrainProgress;
use sweep_core::spec::{Augment, PretrainSpec, SweepSpec, Weights};

use crate::train::{TrainError, TrainOptions, Trainer};

/// Bumped whenever the pretraining procedure itself changes what it produces. A change to
/// what a training epoch computes raises `stages::TRAINING_VERSION`, which the key also holds.
const VERSION: &str = "sweep-pretrain/1";

/// The cache key of pretraining `backbone` per `p` with augmentation `augment`.
pub fn cache_key(p: &PretrainSpec, backbone: Backbone, augment: &Augment) -> String {
    let description = format!(
        "{VERSION}\ntraining v{}\n{}\n{p:?}\n{augment:?}",
        sweep_core::stages::TRAINING_VERSION,
        backbone.name()
    );
    Sha256::digest(description.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The JSON written beside cached pretrained weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainRecord {
    pub key: String,
    pub backbone: String,
    pub description: String,
    pub epochs: u32,
    pub final_train_accuracy: f64,
    pub final_val_accuracy: f64,
    pub seconds: f64,
}

/// The spec and trial that train `backbone` from scratch per `p`.
fn pretraining_run(spec: &SweepSpec, p: &PretrainSpec, backbone: Backbone) -> (SweepSpec, Trial) {
    let mut s = spec.clone();
    s.dataset = p.dataset.clone();
    s.model.weights = Weights::None;
    s.pretrain = None;
    s.training.batch_size = p.batch_size;
    s.training.seed = p.seed;
    s.training.fine_tuning_default_lr = p.lr;
    s.training.freeze_bn_stats = false;
    let trial = Trial {
        index: 0,
        id: "pretrain".into(),
        backbone,
        lr_decay: LrDecay::Exponential { head_lr: p.lr, factor: 1.0 },
        fe_epochs: 0,
        ft_epochs: p.epochs,
    };
    (s, trial)
}

/// Takes the lock on `lock` if no other process holds it (`None` if one does).
fn try_lock(lock: &Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(lock)?;
    // SAFETY: flock(2) on a descriptor we own; the lock goes with the descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(e) }
}

/// Makes sure the pretrained weights of `backbone` exist in `cache_dir` and returns their path,
/// pretraining them if no one has (or waiting for whoever is).
pub fn ensure(
    spec: &SweepSpec,
    backbone: Backbone,
    cache_dir: &Path,
    options: &TrainOptions,
) -> Result<PathBuf, TrainError> {
    let Some(p) = &spec.pretrain else {
        return Err(TrainError::permanent("the spec has no pretrain section"));
    };
    let key = cache_key(p, backbone, &spec.training.augment);
    let dir = cache_dir.join("pretrain");
    std::fs::create_dir_all(&dir)
        .map_err(|e| TrainError::retryable_from(format!("cannot create the cache directory {}", dir.display()), e))?;
    let weights = dir.join(format!("{}-{}.safetensors", backbone.name(), &key[..16]));
    let lock = weights.with_extension("lock");
    let mut told_waiting = false;
    loop {
        if weights.is_file() {
            tracing::info!(file = %weights.display(), "reusing pretrained weights");
            return Ok(weights);
        }
        match try_lock(&lock) {
            Ok(Some(held)) => {
                // Whoever held the lock before may have finished meanwhile.
                if weights.is_file() {
                    continue;
                }
                let result = pretrain(spec, p, backbone, &key, &weights, options);
                // The lock file stays: unlinking it while another process waits on it would let
                // a third lock a new file at the same path, and both pretrain if this one failed.
                drop(held);
                return result.map(|_| weights);
            }
            Ok(None) => {
                if options.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                    return Err(TrainError::Cancelled);
                }
                if !told_waiting {
                    told_waiting = true;
                    let waiting =
                        PretrainProgress { backbone, epoch: 0, epochs: p.epochs, seconds: 0.0, waiting: true };
                    if options.tell(&waiting) {
                        return Err(TrainError::Cancelled);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(TrainError::retryable_from(format!("cannot lock {}", lock.display()), e));
            }
        }
    }
}

fn pretrain(
    spec: &SweepSpec,
    p: &PretrainSpec,
    backbone: Backbone,
    key: &str,
    weights: &Path,
    options: &TrainOptions,
) -> Result<(), TrainError> {
    let started = std::time::Instant::now();
    let (s, trial) = pretraining_run(spec, p, backbone);
    tracing::info!(backbone = backbone.name(), epochs = p.epochs, "pretraining from random weights");
    let mut trainer = Trainer::new(&s, &trial, options)?;
    let mut last = None;
    let tell = |epoch: u32| {
        let progress = PretrainProgress {
            backbone,
            epoch,
            epochs: p.epochs,
            seconds: started.elapsed().as_secs_f64(),
            waiting: false,
        };
        options.tell(&progress)
    };
    if tell(0) {
        return Err(TrainError::Cancelled);
    }
    while trainer.epochs_done() < trainer.total_epochs() {
        let m = trainer.run_epoch()?;
        if tell(m.epoch) {
            return Err(TrainError::Cancelled);
        }
        tracing::info!(
            backbone = backbone.name(),
            epoch = m.epoch,
            of = p.epochs,
            train_accuracy = m.train_accuracy,
            val_accuracy = m.val_accuracy,
            "pretraining epoch"
        );
        last = Some(m);
    }
    // Unique per process and moment: in containers every worker may be PID 1.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = weights.with_extension(format!("safetensors.tmp-{}-{nanos}", std::process::id()));
    trainer
        .model()
        .save_weights(&tmp)
        .map_err(|e| TrainError::retryable_from(format!("writing pretrained weights {}", tmp.display()), e))?;
    let record = PretrainRecord {
        key: key.into(),
        backbone: backbone.name().into(),
        description: format!("{p:?}"),
        epochs: p.epochs,
        final_train_accuracy: last.map(|m| m.train_accuracy).unwrap_or(0.0),
        final_val_accuracy: last.map(|m| m.val_accuracy).unwrap_or(0.0),
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&record).unwrap_or_default();
    std::fs::write(weights.with_extension("json"), json)
        .map_err(|e| TrainError::retryable_from(format!("writing {}", weights.with_extension("json").display()), e))?;
    // The weights appear last and at once: their presence means the pretraining is complete.
    std::fs::rename(&tmp, weights)
        .map_err(|e| TrainError::retryable_from(format!("moving pretrained weights to {}", weights.display()), e))?;
    tracing::info!(file = %weights.display(), val_accuracy = record.final_val_accuracy, seconds = record.seconds, "pretrained");
    Ok(())
}

/// The pretraining record beside cached weights.
pub fn read_record(weights: &Path) -> Option<PretrainRecord> {
    serde_json::from_str(&std::fs::read_to_string(weights.with_extension("json")).ok()?).ok()
}
