//! Trial checkpoints: the model's `state_dict` as `.safetensors` (torchvision names, loadable
//! by `safetensors.torch.load_file` + `model.load_state_dict`), with a JSON metadata file beside
//! it (same stem, `.json`): the spec, the trial, the epoch and its metrics, the class names and
//! the image size — everything `sweep-worker predict` needs to use the weights.
//!
//! Layout in the artifact store ([`crate::artifacts`]): `<sweep>/<trial>/last.safetensors`
//! (after every epoch) and `<sweep>/<trial>/best.safetensors` (at the best validation accuracy
//! so far). The weights are written to a local scratch file, uploaded, then the JSON; the store
//! makes an object visible only whole, so a reader never sees half a checkpoint.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sweep_core::leaderboard::EpochMetrics;

use crate::artifacts::{ArtifactError, ArtifactStore, ScratchDir};
use crate::model::Model;

/// Format tag of the metadata file.
pub const FORMAT: &str = "sweep-checkpoint/1";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {message}")]
    Torch { path: PathBuf, message: String },
    #[error("checkpoint metadata {path}: {message}")]
    Metadata { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] ArtifactError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The metrics of the epoch a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsJson {
    pub phase: String,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub seconds: f64,
}

/// The JSON file beside a checkpoint's weights: where it comes from (flattened [`Identity`]
/// fields), the epoch and its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: String,
    #[serde(flatten)]
    pub id: Identity,
    pub epoch: u32,
    pub metrics: MetricsJson,
    /// SHA-256 of the weights file, lower-case hex.
    pub sha256: String,
    pub bytes: u64,
    pub created_at_ms: i64,
}

/// A checkpoint in the artifact store.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// Its reference ([`ArtifactStore::uri`]).
    pub uri: String,
    pub sha256: String,
    pub bytes: u64,
    pub epoch: u32,
}

/// SHA-256 of a file, lower-case hex, and its size.
pub fn sha256_file(path: &Path) -> Result<(String, u64), CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((crate::artifacts::hex(&hasher.finalize()), bytes))
}

/// Where a checkpoint's metadata lives: `x.safetensors` → `x.json`.
pub fn metadata_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// Reads the metadata beside `weights`, if there is any.
pub fn read_metadata(weights: &Path) -> Result<Option<Metadata>, CheckpointError> {
    let path = metadata_path(weights);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::Io { path, source: e }),
    };
    let meta: Metadata = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Metadata { path: path.clone(), message: e.to_string() })?;
    if meta.format != FORMAT {
        return Err(CheckpointError::Metadata { path, message: format!("format `{}` is not `{FORMAT}`", meta.format) });
    }
    Ok(Some(meta))
}

/// What every checkpoint of one attempt says about where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub sweep: String,
    pub trial: String,
    pub attempt: u64,
    pub backbone: String,
    /// Class names; output `i` of the head is `classes[i]`.
    pub classes: Vec<String>,
    /// Side of the square validation crop the model was trained on.
    pub image_size: u32,
    /// The sweep spec, as submitted.
    pub spec_yaml: String,
}

/// The checkpoints of one trial attempt.
pub struct TrialCheckpoints {
    store: ArtifactStore,
    /// `<sweep>/<trial>`: the folder of the trial in the store.
    prefix: String,
    scratch: ScratchDir,
    base: Metadata,
    best_val: Option<f64>,
}

impl TrialCheckpoints {
    /// Checkpoints of `id.trial` of `id.sweep` under `<sweep>/<trial>/` in `store`; local
    /// copies go to a scratch folder of this attempt, removed when this value is dropped.
    pub fn new(store: &ArtifactStore, id: Identity) -> Result<TrialCheckpoints, CheckpointError> {
        let prefix = format!("{}/{}", id.sweep, id.trial);
        let scratch = store.scratch_dir(&format!("{}-{}-a{}", id.sweep, id.trial, id.attempt))?;
        let base = Metadata {
            format: FORMAT.into(),
            id,
            epoch: 0,
            metrics: MetricsJson {
                phase: String::new(),
                train_loss: 0.0,
                train_accuracy: 0.0,
                val_loss: 0.0,
                val_accuracy: 0.0,
                seconds: 0.0,
            },
            sha256: String::new(),
            bytes: 0,
            created_at_ms: 0,
        };
        Ok(TrialCheckpoints { store: store.clone(), prefix, scratch, base, best_val: None })
    }

    /// The best validation accuracy of earlier attempts (from a resume point): `best` is
    /// written only when an epoch beats it.
    pub fn set_best(&mut self, accuracy: f64) {
        self.best_val = Some(accuracy);
    }

    /// The trial's folder in the store (`<sweep>/<trial>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// This attempt's local scratch folder.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// Writes `last` after an epoch, and `best` when the epoch's validation accuracy beats every
    /// earlier epoch of this attempt (a copy inside the store).
    pub fn after_epoch(&mut self, model: &Model, m: &EpochMetrics) -> Result<(Saved, Option<Saved>), CheckpointError> {
        self.after_epoch_of(model, m, false)
    }

    /// [`TrialCheckpoints::after_epoch`]; for an epoch other trials share (`shared`), the
    /// weights go to a file of their own, `last-e<epoch>-a<attempt>.safetensors`, which both
    /// `last` and (when better) `best` name: the trials the epoch is credited to hold
    /// references to it, and nothing overwrites it (not a later epoch, not another attempt
    /// computing the epoch again).
    pub fn after_epoch_of(
        &mut self,
        model: &Model,
        m: &EpochMetrics,
        shared: bool,
    ) -> Result<(Saved, Option<Saved>), CheckpointError> {
        let local = self.scratch.path().join("last.safetensors");
        model
            .save_weights(&local)
            .map_err(|e| CheckpointError::Torch { path: local.clone(), message: e.to_string() })?;
        let (sha256, bytes) = sha256_file(&local)?;
        let last_key = if shared {
            format!("{}/last-e{:04}-a{}.safetensors", self.prefix, m.epoch, self.base.id.attempt)
        } else {
            format!("{}/last.safetensors", self.prefix)
        };
        self.store.put_file_blocking(&last_key, &local)?;
        let _ = std::fs::remove_file(&local);
        let meta = Metadata {
            epoch: m.epoch,
            metrics: MetricsJson {
                phase: m.phase.as_str().into(),
                train_loss: m.train_loss,
                train_accuracy: m.train_accuracy,
                val_loss: m.val_loss,
                val_accuracy: m.val_accuracy,
                seconds: m.seconds,
            },
            sha256: sha256.clone(),
            bytes,
            created_at_ms: now_ms(),
            ..self.base.clone()
        };
        self.put_metadata(&last_key, &meta)?;
        let last = Saved { uri: self.store.uri(&last_key), sha256: sha256.clone(), bytes, epoch: m.epoch };

        let better = self.best_val.is_none_or(|b| m.val_accuracy > b);
        if !better {
            return Ok((last, None));
        }
        self.best_val = Some(m.val_accuracy);
        if shared {
            return Ok((last.clone(), Some(last)));
        }
        let best_key = format!("{}/best.safetensors", self.prefix);
        self.store.copy_blocking(&last_key, &best_key)?;
        self.put_metadata(&best_key, &meta)?;
        Ok((last, Some(Saved { uri: self.store.uri(&best_key), sha256, bytes, epoch: m.epoch })))
    }

    fn put_metadata(&self, weights_key: &str, meta: &Metadata) -> Result<(), CheckpointError> {
        let key = json_key(weights_key);
        let text = serde_json::to_vec_pretty(meta).map_err(|e| CheckpointError::Metadata {
            path: PathBuf::from(self.store.uri(&key)),
            message: e.to_string(),
        })?;
        Ok(self.store.put_bytes_blocking(&key, text)?)
    }
}

pub use sweep_artifacts::json_key;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sweep_core::Backbone;
    use sweep_core::leaderboard::Phase;

    fn metrics(epoch: u32, val: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            phase: Phase::FeatureExtraction,
            train_loss: 1.0,
            train_accuracy: 0.5,
            val_loss: 1.0,
            val_accuracy: val,
            seconds: 0.1,
        }
    }

    #[test]
    fn last_after_every_epoch_best_only_when_better() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        let store =
            ArtifactStore::open(root.to_str().unwrap(), &dir.path().join("scratch"), rt.handle().clone()).unwrap();
        let model = Model::build_seeded(Backbone::Resnet18, 3, tch::Device::Cpu, 1).unwrap();
        let classes = vec!["a".to_string(), "b".into(), "c".into()];
        let id = Identity {
            sweep: "s-1".into(),
            trial: "t000".into(),
            attempt: 7,
            backbone: "resnet18".into(),
            classes: classes.clone(),
            image_size: 32,
            spec_yaml: "name: x\n".into(),
        };
        let mut c = TrialCheckpoints::new(&store, id).unwrap();
        let scratch = c.scratch().to_path_buf();
        assert!(scratch.is_dir());
        let (last, best) = c.after_epoch(&model, &metrics(1, 0.5)).unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(PathBuf::from(&last.uri), root.join("s-1/t000/last.safetensors"));
        let best = best.expect("the first epoch is the best so far");
        assert_eq!((best.epoch, best.sha256.as_str()), (1, last.sha256.as_str()));
        let (_, best2) = c.after_epoch(&model, &metrics(2, 0.4)).unwrap();
        assert!(best2.is_none());
        let (last3, best3) = c.after_epoch(&model, &metrics(3, 0.6)).unwrap();
        let best3 = best3.unwrap();
        assert_eq!(best3.epoch, 3);

        let last3_path = PathBuf::from(&last3.uri);
        let meta = read_metadata(&last3_path).unwrap().unwrap();
        assert_eq!((meta.id.trial.as_str(), meta.epoch, meta.id.attempt), ("t000", 3, 7));
        assert_eq!(meta.id.classes, classes);
        assert_eq!(meta.sha256, sha256_file(&last3_path).unwrap().0);
        assert_eq!(meta.sha256, sha256_file(Path::new(&best3.uri)).unwrap().0);
        assert_eq!(meta.id.spec_yaml, "name: x\n");
        // The weights load back into the same architecture, head included.
        let other = Model::build_seeded(Backbone::Resnet18, 3, tch::Device::Cpu, 2).unwrap();
        other.load_state(&last3_path, true).unwrap();
        // No temporary files are left behind, and the scratch folder goes with the attempt.
        let names: Vec<_> = std::fs::read_dir(root.join("s-1/t000")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        drop(c);
        assert!(!scratch.exists());
    }

    #[test]
    fn metadata_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("m.safetensors");
        assert!(read_metadata(&w).unwrap().is_none());
        std::fs::write(dir.path().join("m.json"), "{not json").unwrap();
        let e = read_metadata(&w).unwrap_err();
        assert!(e.to_string().contains("m.json"), "{e}");
    }
}
