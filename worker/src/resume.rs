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
//! truncated or altered file is detected before it is trusted. Files are written under a
//! temporary name, synced and renamed; a trial directory keeps the two newest resume points
//! (`state-e<epoch>.safetensors`), so a corrupt newest one still leaves the previous epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{CheckpointError, sha256_file, write_atomically};

/// Format tag of the JSON file beside a resume point.
pub const STATE_FORMAT: &str = "sweep-state/1";

/// How many resume points a trial directory keeps.
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
}

/// A resume point on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    pub path: PathBuf,
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
    /// Writes the state as `<dir>/state-e<epoch>.safetensors` with its JSON, then removes all but
    /// the [`KEEP`] newest resume points of `dir`.
    pub fn save(&self, dir: &Path, mut meta: StateMetadata) -> Result<SavedState, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.to_path_buf(), source })?;
        let path = dir.join(file_name(self.epochs_done));
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
        write_atomically(&path, |tmp| Tensor::write_safetensors(&named, tmp).map_err(torch_err(tmp)))?;
        let (sha256, bytes) = sha256_file(&path)?;
        meta.format = STATE_FORMAT.into();
        meta.epoch = self.epochs_done;
        meta.sha256 = sha256;
        meta.bytes = bytes;
        meta.created_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let json_path = path.with_extension("json");
        let text = serde_json::to_string_pretty(&meta)
            .map_err(|e| CheckpointError::Metadata { path: json_path.clone(), message: e.to_string() })?;
        write_atomically(&json_path, |tmp| {
            std::fs::write(tmp, text.as_bytes())
                .map_err(|source| CheckpointError::Io { path: tmp.to_path_buf(), source })
        })?;
        prune(dir);
        Ok(SavedState { path, meta })
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
            && !want.is_empty()
            && want != sha256
        {
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

/// The resume points of a trial directory, newest epoch first.
pub fn list(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let epoch = name.strip_prefix("state-e")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((epoch, e.path()))
        })
        .collect();
    found.sort_by_key(|(epoch, _)| std::cmp::Reverse(*epoch));
    found
}

fn prune(dir: &Path) {
    for (_, path) in list(dir).into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(path.with_extension("json"));
        let _ = std::fs::remove_file(&path);
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
        }
    }

    #[test]
    fn a_state_round_trips_and_only_the_newest_two_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for e in 1..=3 {
            state(e).save(dir.path(), meta()).unwrap();
        }
        let kept: Vec<u32> = list(dir.path()).into_iter().map(|(e, _)| e).collect();
        assert_eq!(kept, [3, 2]);
        let saved = dir.path().join(file_name(3));
        let (s, m) = TrainingState::load(&saved, None).unwrap();
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
        TrainingState::load(&saved, Some(&m.sha256)).unwrap();
    }

    #[test]
    fn truncated_altered_or_unexpected_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let saved = state(2).save(dir.path(), meta()).unwrap();
        let err = |p: &Path, sha: Option<&str>| TrainingState::load(p, sha).unwrap_err().to_string();
        let e = err(&saved.path, Some("00ff"));
        assert!(e.contains("not the 00ff the coordinator recorded"), "{e}");
        let bytes = std::fs::read(&saved.path).unwrap();
        std::fs::write(&saved.path, &bytes[..bytes.len() / 2]).unwrap();
        let e = err(&saved.path, None);
        assert!(e.contains("truncated or replaced") && e.contains("state-e0002"), "{e}");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        std::fs::write(&saved.path, &flipped).unwrap();
        assert!(err(&saved.path, None).contains("does not match the recorded"));
        std::fs::remove_file(saved.path.with_extension("json")).unwrap();
        assert!(err(&saved.path, None).contains("state-e0002.json"));
    }
}
