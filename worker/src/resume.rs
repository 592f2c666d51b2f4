//! Resume points: everything a trial needs to continue after epoch `e` exactly as if it had
//! never stopped.
//!
//! Every source of randomness of an epoch derives from `training.seed` and the epoch number
//! (data order, augmentation, dropout: see [`crate::train`]), so the state of a trial between
//! epochs is: the model's `state_dict` (parameters and BatchNorm buffers), the optimizer's
//! per-parameter state (step count and both moments) of the current phase, and the number of
//! epochs done. A resume point holds exactly that, in one `.safetensors` file:
//!
//! * `model/<name>`: every tensor of the state dict, torchvision names;
//! * `adam/<name>/exp_avg`, `adam/<name>/exp_avg_sq` (float) and `adam/<name>/step` (int64,
//!   one element), for each parameter the optimizer has stepped;
//! * `trainer/epochs_done` (int64, one element).
//!
//! Beside it a JSON file (same stem, `.json`) records the format, the epoch, the file's SHA-256
//! and size, and the best validation accuracy so far (for the `best` checkpoint), so that a
//! truncated or altered file is detected before it is trusted. Both go to the trial's folder of
//! the artifact store ([`crate::artifacts`]: written locally, uploaded, visible only whole);
//! the folder keeps the two newest resume points (`state-e<epoch>.safetensors`), so a corrupt
//! newest one still leaves the previous epoch. A resume point is read by downloading it to a
//! local scratch folder and checking it there.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::artifacts::ArtifactStore;
use crate::checkpoint::{CheckpointError, json_key, now_ms, sha256_file};

/// Format tag of the JSON file beside a resume point.
pub const STATE_FORMAT: &str = "sweep-state/1";

/// How many resume points a trial folder keeps.
pub const KEEP: usize = 2;

/// The optimizer state of one parameter.
#[derive(Debug)]
pub struct OptimizerEntry {
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The pieces of one parameter's optimizer state found so far while reading a file: step,
/// first and second moments.
type PartialEntry = (Option<u64>, Option<Tensor>, Option<Tensor>);

/// A trial's state after `epochs_done` epochs (tensors on the CPU).
#[derive(Debug)]
pub struct TrainingState {
    pub epochs_done: u32,
    /// The model's state dict (parameters and buffers; after [`TrainingState::load`] in no
    /// particular order: restoring goes by name).
    pub model: Vec<(String, Tensor)>,
    /// The optimizer's state by parameter name (parameters never stepped are absent).
    pub optimizer: HashMap<String, OptimizerEntry>,
}

/// The JSON file beside a resume point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateMetadata {
    pub format: String,
    pub sweep: String,
    pub trial: String,
    pub backbone: String,
    /// Epochs done when the state was taken (= the `<epoch>` of its file name).
    pub epoch: u32,
    /// Best validation accuracy of the trial up to this epoch, and its epoch.
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<u32>,
    pub sha256: String,
    pub bytes: u64,
    pub created_at_ms: i64,
    /// The content key of epochs `1..=epoch` (`sweep_core::stages::epoch_keys`): a trial of
    /// another sweep with the same key at that epoch computes the same epochs, so it may start
    /// from this point. Absent from points written before keys (never reused across sweeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A resume point in the artifact store.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    /// Its reference ([`ArtifactStore::uri`]).
    pub uri: String,
    pub meta: StateMetadata,
}

/// File name of the resume point after `epoch`.
pub fn file_name(epoch: u32) -> String {
    format!("state-e{epoch:04}.safetensors")
}

fn torch_err(path: &Path) -> impl Fn(tch::TchError) -> CheckpointError + '_ {
    move |e| CheckpointError::Torch { path: path.to_path_buf(), message: e.to_string() }
}

fn scalar(v: i64) -> Tensor {
    Tensor::from_slice(&[v])
}

impl TrainingState {
    /// Writes the state as `<prefix>/state-e<epoch>.safetensors` with its JSON in `store`
    /// (through a local file in `scratch`), then removes all but the [`KEEP`] newest resume
    /// points of `prefix`.
    pub fn save(
        &self,
        store: &ArtifactStore,
        prefix: &str,
        scratch: &Path,
        meta: StateMetadata,
    ) -> Result<SavedState, CheckpointError> {
        self.save_keeping(store, prefix, scratch, meta, &[])
    }

    /// [`TrainingState::save`], never removing the points of the epochs in `keep` (the ends of
    /// stages other trials share, and ASHA's rungs: trials start again from them, maybe much later).
    pub fn save_keeping(
        &self,
        store: &ArtifactStore,
        prefix: &str,
        scratch: &Path,
        mut meta: StateMetadata,
        keep: &[u32],
    ) -> Result<SavedState, CheckpointError> {
        let name = file_name(self.epochs_done);
        let local = scratch.join(&name);
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(self.model.len() + 3 * self.optimizer.len() + 1);
        for (n, t) in &self.model {
            named.push((format!("model/{n}"), t.shallow_clone()));
        }
        let mut names: Vec<&String> = self.optimizer.keys().collect();
        names.sort();
        for n in names {
            let e = &self.optimizer[n];
            named.push((format!("adam/{n}/exp_avg"), e.exp_avg.shallow_clone()));
            named.push((format!("adam/{n}/exp_avg_sq"), e.exp_avg_sq.shallow_clone()));
            named.push((format!("adam/{n}/step"), scalar(e.step as i64)));
        }
        named.push(("trainer/epochs_done".into(), scalar(self.epochs_done as i64)));
        Tensor::write_safetensors(&named, &local).map_err(torch_err(&local))?;
        let (sha256, bytes) = sha256_file(&local)?;
        let key = format!("{prefix}/{name}");
        let uploaded = store.put_file_blocking(&key, &local);
        let _ = std::fs::remove_file(&local);
        uploaded?;
        meta.format = STATE_FORMAT.into();
        meta.epoch = self.epochs_done;
        meta.sha256 = sha256;
        meta.bytes = bytes;
        meta.created_at_ms = now_ms();
        let json = json_key(&key);
        let text = serde_json::to_vec_pretty(&meta)
            .map_err(|e| CheckpointError::Metadata { path: store.uri(&json).into(), message: e.to_string() })?;
        store.put_bytes_blocking(&json, text)?;
        prune(store, prefix, keep);
        Ok(SavedState { uri: store.uri(&key), meta })
    }

    /// Downloads the resume point `key` of `store` (and its JSON) into `scratch` and reads it
    /// as [`TrainingState::load`] does; the local copies are removed.
    pub fn fetch(
        store: &ArtifactStore,
        key: &str,
        scratch: &Path,
        expected_sha256: Option<&str>,
    ) -> Result<(TrainingState, StateMetadata), CheckpointError> {
        let name = key.rsplit('/').next().unwrap_or(key);
        let local = scratch.join(name);
        let json = local.with_extension("json");
        let result = (|| {
            store.get_file_blocking(&json_key(key), &json)?;
            store.get_file_blocking(key, &local)?;
            TrainingState::load(&local, expected_sha256)
        })();
        let _ = std::fs::remove_file(&local);
        let _ = std::fs::remove_file(&json);
        // Errors name the object, not the local copy.
        result.map_err(|e| match e {
            CheckpointError::Metadata { message, .. } => {
                CheckpointError::Metadata { path: store.uri(key).into(), message }
            }
            CheckpointError::Torch { message, .. } => CheckpointError::Torch { path: store.uri(key).into(), message },
            e => e,
        })
    }

    /// Reads a resume point after checking it against `expected_sha256` (when given) and against
    /// the SHA-256 its JSON records: a missing, truncated or altered file is an error that says
    /// which.
    pub fn load(path: &Path, expected_sha256: Option<&str>) -> Result<(TrainingState, StateMetadata), CheckpointError> {
        let meta = read_state_metadata(path)?;
        let (sha256, bytes) = sha256_file(path)?;
        let bad = |message: String| CheckpointError::Metadata { path: path.to_path_buf(), message };
        if bytes != meta.bytes {
            return Err(bad(format!("{bytes} bytes on disk, {} recorded: truncated or replaced", meta.bytes)));
        }
        if sha256 != meta.sha256 {
            return Err(bad(format!("SHA-256 {sha256} does not match the recorded {}", meta.sha256)));
        }
        if let Some(want) = expected_sha256
            && want != sha256
        {
            if want.is_empty() {
                return Err(bad("no SHA-256 was recorded for it; an unverifiable point is not trusted".into()));
            }
            return Err(bad(format!("SHA-256 {sha256} is not the {want} the coordinator recorded")));
        }
        let tensors = Tensor::read_safetensors(path).map_err(torch_err(path))?;
        let mut state = TrainingState { epochs_done: 0, model: Vec::new(), optimizer: HashMap::new() };
        let mut epochs = None;
        let mut parts: HashMap<String, PartialEntry> = HashMap::new();
        let int = |t: &Tensor, name: &str| -> Result<i64, CheckpointError> {
            if t.numel() != 1 || t.kind() != Kind::Int64 {
                return Err(bad(format!("`{name}` is not one int64")));
            }
            Ok(t.int64_value(&[0]))
        };
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix("model/") {
                state.model.push((n.to_string(), t));
            } else if let Some(rest) = name.strip_prefix("adam/") {
                let (param, field) = rest.rsplit_once('/').ok_or_else(|| bad(format!("unexpected tensor `{name}`")))?;
                let entry = parts.entry(param.to_string()).or_default();
                match field {
                    "step" => entry.0 = Some(int(&t, &name)? as u64),
                    "exp_avg" => entry.1 = Some(t),
                    "exp_avg_sq" => entry.2 = Some(t),
                    _ => return Err(bad(format!("unexpected tensor `{name}`"))),
                }
            } else if name == "trainer/epochs_done" {
                epochs = Some(int(&t, &name)?);
            } else {
                return Err(bad(format!("unexpected tensor `{name}`")));
            }
        }
        state.epochs_done =
            epochs.and_then(|e| u32::try_from(e).ok()).ok_or_else(|| bad("no valid `trainer/epochs_done`".into()))?;
        if state.epochs_done != meta.epoch {
            return Err(bad(format!("holds epoch {} but its metadata says {}", state.epochs_done, meta.epoch)));
        }
        for (param, (step, m, v)) in parts {
            match (step, m, v) {
                (Some(step), Some(exp_avg), Some(exp_avg_sq)) => {
                    state.optimizer.insert(param, OptimizerEntry { step, exp_avg, exp_avg_sq });
                }
                _ => return Err(bad(format!("incomplete optimizer state of `{param}`"))),
            }
        }
        Ok((state, meta))
    }

    /// The tensors moved to `device` (a copy per call: each replica gets its own).
    pub fn model_on(&self, device: Device) -> Vec<(String, Tensor)> {
        self.model.iter().map(|(n, t)| (n.clone(), t.to_device(device))).collect()
    }
}

/// Reads the JSON beside the resume point `path`.
pub fn read_state_metadata(path: &Path) -> Result<StateMetadata, CheckpointError> {
    let json = path.with_extension("json");
    let text = std::fs::read_to_string(&json).map_err(|source| CheckpointError::Io { path: json.clone(), source })?;
    let meta: StateMetadata = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Metadata { path: json.clone(), message: e.to_string() })?;
    if meta.format != STATE_FORMAT {
        return Err(CheckpointError::Metadata {
            path: json,
            message: format!("format `{}` is not `{STATE_FORMAT}`", meta.format),
        });
    }
    Ok(meta)
}

/// The resume points in the trial folder `prefix` of `store`, newest epoch first, by key (a
/// folder the store cannot list has none).
pub fn list(store: &ArtifactStore, prefix: &str) -> Vec<(u32, String)> {
    let listed = store.list_blocking(prefix).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list resume points");
        Vec::new()
    });
    let mut found: Vec<(u32, String)> = listed
        .into_iter()
        .filter_map(|l| {
            let name = l.key.rsplit('/').next()?;
            let epoch = name.strip_prefix("state-e")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((epoch, l.key))
        })
        .collect();
    found.sort_by_key(|(epoch, _)| std::cmp::Reverse(*epoch));
    found
}

fn prune(store: &ArtifactStore, prefix: &str, keep: &[u32]) {
    for (_, key) in list(store, prefix).into_iter().skip(KEEP).filter(|(epoch, _)| !keep.contains(epoch)) {
        for k in [json_key(&key), key] {
            if let Err(e) = store.delete_blocking(&k) {
                tracing::warn!(error = %e, "cannot remove an old resume point");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epochs: u32) -> TrainingState {
        let mut optimizer = HashMap::new();
        optimizer.insert(
            "fc.weight".to_string(),
            OptimizerEntry {
                step: 7,
                exp_avg: Tensor::from_slice(&[0.5f32, 1.5]),
                exp_avg_sq: Tensor::from_slice(&[2f32, 3.]),
            },
        );
        TrainingState {
            epochs_done: epochs,
            model: vec![
                ("fc.weight".into(), Tensor::from_slice(&[1f32, 2.])),
                ("bn.num_batches_tracked".into(), Tensor::from_slice(&[4i64])),
            ],
            optimizer,
        }
    }

    fn meta() -> StateMetadata {
        StateMetadata {
            format: String::new(),
            sweep: "s".into(),
            trial: "t000".into(),
            backbone: "resnet18".into(),
            epoch: 0,
            best_val_accuracy: Some(0.5),
            best_epoch: Some(1),
            sha256: String::new(),
            bytes: 0,
            created_at_ms: 0,
            key: None,
        }
    }

    fn store(dir: &Path, rt: &tokio::runtime::Runtime) -> ArtifactStore {
        ArtifactStore::open(dir.join("store").to_str().unwrap(), &dir.join("scratch"), rt.handle().clone()).unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn a_state_round_trips_and_only_the_newest_two_are_kept() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), &rt);
        let scratch = tempfile::tempdir().unwrap();
        for e in 1..=3 {
            let saved = state(e).save(&store, "s/t000", scratch.path(), meta()).unwrap();
            assert_eq!(saved.uri, store.uri(&format!("s/t000/{}", file_name(e))));
        }
        let kept: Vec<u32> = list(&store, "s/t000").into_iter().map(|(e, _)| e).collect();
        assert_eq!(kept, [3, 2]);
        // Only the resume points and their JSON are in the store; nothing stays in scratch.
        assert_eq!(store.list_blocking("s/t000").unwrap().len(), 4);
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
        let key = format!("s/t000/{}", file_name(3));
        let (s, m) = TrainingState::fetch(&store, &key, scratch.path(), None).unwrap();
        assert_eq!((s.epochs_done, m.epoch, m.best_epoch), (3, 3, Some(1)));
        assert_eq!(s.model.len(), 2);
        // (The file does not keep the order of the tensors: look them up by name.)
        let fc = s.model.iter().find(|(n, _)| n == "fc.weight").unwrap();
        assert!(fc.1.equal(&Tensor::from_slice(&[1f32, 2.])));
        let bn = s.model.iter().find(|(n, _)| n == "bn.num_batches_tracked").unwrap();
        assert!(bn.1.equal(&Tensor::from_slice(&[4i64])));
        let o = &s.optimizer["fc.weight"];
        assert_eq!(o.step, 7);
        assert!(o.exp_avg_sq.equal(&Tensor::from_slice(&[2f32, 3.])));
        TrainingState::fetch(&store, &key, scratch.path(), Some(&m.sha256)).unwrap();
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    }

    #[test]
    fn truncated_altered_missing_or_unexpected_points_are_refused_with_the_reason() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), &rt);
        let scratch = tempfile::tempdir().unwrap();
        let saved = state(2).save(&store, "s/t000", scratch.path(), meta()).unwrap();
        let key = store.key_of(&saved.uri).unwrap();
        let err = |sha: Option<&str>| TrainingState::fetch(&store, &key, scratch.path(), sha).unwrap_err().to_string();
        let e = err(Some("00ff"));
        assert!(e.contains("not the 00ff the coordinator recorded"), "{e}");
        // The error names the object in the store, not the local copy.
        assert!(e.contains(&saved.uri), "{e}");
        let path = Path::new(&saved.uri);
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
        let e = err(None);
        assert!(e.contains("truncated or replaced") && e.contains("state-e0002"), "{e}");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        std::fs::write(path, &flipped).unwrap();
        assert!(err(None).contains("does not match the recorded"));
        std::fs::remove_file(path.with_extension("json")).unwrap();
        let e = err(None);
        assert!(e.contains("state-e0002.json") && e.contains("not found"), "{e}");
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    }
}
