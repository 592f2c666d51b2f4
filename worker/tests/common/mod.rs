//! Helpers shared by the worker's integration tests.

#![allow(dead_code)]

use sweep_core::leaderboard::EpochMetrics;
use sweep_core::{grid, spec};
use sweep_proto::v1;
use sweep_worker::resume::StateMetadata;
use sweep_worker::train::Trainer;

/// The assignment of trial 0 of `spec_yaml`, as a coordinator would hand it out, on `cpu:0`.
pub fn assignment(spec_yaml: &str, sweep_id: &str, attempt_id: u64) -> v1::Assignment {
    let parsed = spec::parse(spec_yaml).expect("test spec parses");
    let t = grid::expand(&parsed.grid).remove(0);
    v1::Assignment {
        attempt_id,
        sweep_id: sweep_id.into(),
        trial_id: t.id.clone(),
        trial_index: 0,
        spec_yaml: spec_yaml.into(),
        backbone: t.backbone.name().into(),
        lr_decay: Some(v1::LrDecay::from(&t.lr_decay)),
        fe_epochs: t.fe_epochs,
        ft_epochs: t.ft_epochs,
        attempt_number: 1,
        devices: vec!["cpu:0".into()],
        resume: None,
        sharing: true,
    }
}

/// A local artifact store rooted at a directory, with the runtime its calls run on.
pub struct TestStore {
    pub store: sweep_worker::artifacts::ArtifactStore,
    _rt: tokio::runtime::Runtime,
}

impl std::ops::Deref for TestStore {
    type Target = sweep_worker::artifacts::ArtifactStore;
    fn deref(&self) -> &Self::Target {
        &self.store
    }
}

/// The artifact store a worker started with `--artifacts DIR` would use (scratch copies under
/// `DIR/.scratch`).
pub fn local_store(dir: &std::path::Path) -> TestStore {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let store = sweep_worker::artifacts::ArtifactStore::open(
        dir.to_str().expect("utf-8 path"),
        &dir.join(".scratch"),
        rt.handle().clone(),
    )
    .expect("local artifact store");
    TestStore { store, _rt: rt }
}

/// An epoch's metrics without its wall time (the one value that differs between runs).
pub fn zero_time(m: EpochMetrics) -> EpochMetrics {
    EpochMetrics { seconds: 0.0, ..m }
}

/// A copy of a trainer's model weights and buffers, by name.
pub fn weights(tr: &Trainer) -> Vec<(String, tch::Tensor)> {
    tr.model().state_dict().into_iter().map(|(n, t)| (n, t.detach().copy())).collect()
}

/// Metadata of a resume point of `trial` of `sweep` after `epoch` (resnet18).
pub fn state_meta(sweep: &str, trial: &str, epoch: u32) -> StateMetadata {
    StateMetadata {
        format: String::new(),
        sweep: sweep.into(),
        trial: trial.into(),
        backbone: "resnet18".into(),
        epoch,
        best_val_accuracy: None,
        best_epoch: None,
        sha256: String::new(),
        bytes: 0,
        created_at_ms: 0,
        key: None,
    }
}
