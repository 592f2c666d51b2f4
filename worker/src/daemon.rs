//! The worker daemon: the worker protocol of [`sweep_session`] (register, heartbeat, long poll,
//! fenced reports and finishes) with an executor that trains with [`crate::train`].
//!
//! Threads: the gRPC client runs on tokio; training runs on a blocking thread and reports each
//! epoch synchronously through the runtime handle, so the next epoch starts only after the
//! coordinator has committed the previous one. The session's heartbeat task raises the
//! attempt's cancel flag when the coordinator asks (sweep cancelled, attempt no longer
//! current) or when the coordinator has been unreachable for a whole heartbeat TTL.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sweep_core::spec::{self, ParseOptions};
use sweep_core::stages::{StageKey, StageTree};
use sweep_proto::v1;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use sweep_session::Outcome;
use sweep_session::connect::ClientSecurity;

use crate::artifacts::ArtifactStore;
use crate::checkpoint::{self, TrialCheckpoints};
use crate::data;
use crate::pretrain;
use crate::resume::{self, StateMetadata, TrainingState};
use crate::train::{Control, TrainError, TrainOptions, Trainer};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub coordinator: String,
    pub name: String,
    /// Where to train when the coordinator names no devices (one older than placement).
    pub device: tch::Device,
    /// Devices announced to the coordinator.
    pub devices: Vec<v1::Device>,
    pub weights_dir: Option<PathBuf>,
    /// Where checkpoints and resume points are written: `<sweep>/<trial>/…` in this store.
    pub artifacts: ArtifactStore,
    /// Where pretrained weights are cached (shared by the workers of a machine or a volume).
    pub cache_dir: PathBuf,
    /// How long one `AcquireTrial` long poll may wait.
    pub poll_wait: Duration,
    /// TLS settings and the bearer token for the coordinator.
    pub security: ClientSecurity,
}

/// The devices this worker announces to the coordinator: those of `selected` (a parsed
/// `--devices` list), or by default every CUDA device libtorch can use, or one CPU slot.
/// CUDA devices are named, with their memory, as the CUDA driver reports them (`CUDA device N`
/// and 0 bytes when the driver cannot be asked); `k` CPU slots share the machine's cores and
/// memory, each announced with `1/k` of the memory.
pub fn inventory(selected: Option<&[(String, tch::Device)]>) -> Vec<v1::Device> {
    let default: Vec<(String, tch::Device)>;
    let selected = match selected {
        Some(s) => s,
        None => {
            let cuda = tch::Cuda::device_count().max(0) as usize;
            default = if cuda > 0 {
                (0..cuda).map(|i| (format!("cuda:{i}"), tch::Device::Cuda(i))).collect()
            } else {
                vec![("cpu:0".to_string(), tch::Device::Cpu)]
            };
            &default
        }
    };
    let driver = if selected.iter().any(|(_, d)| d.is_cuda()) {
        crate::devices::cuda_devices().unwrap_or_else(|why| {
            tracing::warn!(%why, "cannot ask the CUDA driver for device names and memory");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let slots = selected.iter().filter(|(_, d)| *d == tch::Device::Cpu).count().max(1) as u64;
    let (cpu_name, cpu_memory) = cpu_description();
    selected
        .iter()
        .map(|(id, d)| match d {
            tch::Device::Cuda(i) => {
                let info = driver.iter().find(|x| x.index == *i);
                v1::Device {
                    id: id.clone(),
                    kind: "cuda".into(),
                    name: info.map_or_else(|| format!("CUDA device {i}"), |x| x.name.clone()),
                    memory_bytes: info.map_or(0, |x| x.memory_bytes),
                }
            }
            _ => v1::Device {
                id: id.clone(),
                kind: "cpu".into(),
                name: if slots > 1 { format!("{cpu_name}, 1 of {slots} slots") } else { cpu_name.clone() },
                memory_bytes: cpu_memory / slots,
            },
        })
        .collect()
}

/// `<model name> (<N> cores)` and total memory in bytes, from /proc.
fn cpu_description() -> (String, u64) {
    let model = crate::devices::cpu_model_name().unwrap_or_else(|| "CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    (format!("{model} ({cores} cores)"), memory)
}

/// The training device: `cuda:0` when CUDA is usable, else the CPU.
pub fn default_device() -> tch::Device {
    if tch::Cuda::is_available() { tch::Device::Cuda(0) } else { tch::Device::Cpu }
}

/// Runs until `shutdown` resolves (then stops the running attempts, hands them back as
/// retryable, and returns). The protocol — registration, heartbeats, the long poll, fenced
/// reports and finishes — is [`sweep_session`]'s; this worker brings the training.
pub async fn run(options: DaemonOptions, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let channel =
        sweep_session::connect::with_keepalive(options.security.endpoint(&options.coordinator)?).connect_lazy();
    let client = WorkerServiceClient::with_interceptor(channel, options.security.interceptor());
    let worker = sweep_session::Worker {
        name: options.name.clone(),
        devices: options.devices.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        poll_wait: options.poll_wait,
    };
    let executor = Arc::new(TchExecutor { options: Arc::new(options) });
    let ended = sweep_session::run(client, worker, executor, Arc::new(sweep_session::Unobserved), shutdown).await;
    crate::metrics::global().up.store(false, Ordering::Relaxed);
    Ok(ended?)
}

/// Trains attempts with libtorch, on a blocking thread each, reporting every epoch through the
/// session's reporter (the next epoch starts only after the coordinator has committed the
/// previous one).
struct TchExecutor {
    options: Arc<DaemonOptions>,
}

impl sweep_session::Executor for TchExecutor {
    fn run(
        &self,
        attempt: sweep_session::Attempt,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>> {
        let options = self.options.clone();
        Box::pin(async move {
            let sweep_session::Attempt { assignment: a, reporter, cancel } = attempt;
            tracing::info!(
                sweep = %a.sweep_id,
                trial = %a.trial_id,
                attempt = a.attempt_id,
                backbone = %a.backbone,
                devices = %a.devices.join(","),
                "attempt started"
            );
            crate::metrics::global().running.fetch_add(1, Ordering::Relaxed);
            // The devices the coordinator gave this attempt (an old coordinator gives none: use ours).
            let devices = if a.devices.is_empty() { Ok(vec![options.device]) } else { training_devices(&a.devices) };
            let train_options = devices.map(|d| TrainOptions {
                weights_dir: options.weights_dir.clone(),
                cancel: Some(cancel.flag()),
                ..TrainOptions::data_parallel(d)
            });
            let handle = tokio::runtime::Handle::current();
            // Pretraining, told to the coordinator as it goes (best effort).
            let progress = {
                let (reporter, handle) = (reporter.clone(), handle.clone());
                crate::train::Progress(Arc::new(move |p: &sweep_core::records::PretrainProgress| {
                    let wire = v1::Pretraining {
                        backbone: p.backbone.name().into(),
                        epoch: p.epoch,
                        epochs: p.epochs,
                        seconds: p.seconds,
                        waiting: p.waiting,
                    };
                    reporter.progress_blocking(&handle, wire)
                }))
            };
            let train_options = train_options.map(|o| TrainOptions { progress: Some(progress), ..o });
            let (artifacts, cache_dir) = (options.artifacts.clone(), options.cache_dir.clone());
            let result = tokio::task::spawn_blocking(move || {
                let mut report = |request: v1::ReportEpochRequest| -> Control {
                    match reporter.report_blocking(&handle, request) {
                        Ok(false) => Control::Continue,
                        // Stopped by the coordinator, or the report did not go through (the
                        // session decides how the attempt ends).
                        Ok(true) | Err(_) => Control::Stop,
                    }
                };
                // A device id this worker cannot use: another worker may (retryable).
                let train_options = train_options.map_err(TrainError::retryable)?;
                train_attempt(&a, &train_options, &artifacts, &cache_dir, &mut report)
            })
            .await;
            crate::metrics::global().running.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(Ok(())) => Outcome::Succeeded,
                Ok(Err(TrainError::Cancelled)) => Outcome::Stopped,
                Ok(Err(TrainError::Permanent(f))) => Outcome::Failed { permanent: true, message: f.to_string() },
                Ok(Err(TrainError::Retryable(f))) => Outcome::Failed { permanent: false, message: f.to_string() },
                Ok(Err(e @ TrainError::ResumePoint(_))) => Outcome::Failed { permanent: false, message: e.to_string() },
                Err(join) => {
                    Outcome::Failed { permanent: false, message: format!("the training thread crashed: {join}") }
                }
            }
        })
    }
}

/// The libtorch devices of an assignment's device ids (`cuda:N`, `cpu:N`).
pub fn training_devices(ids: &[String]) -> Result<Vec<tch::Device>, String> {
    ids.iter()
        .map(|id| match id.split_once(':') {
            Some(("cuda", n)) => {
                n.parse().map(tch::Device::Cuda).map_err(|_| format!("device id `{id}` is not cuda:N"))
            }
            Some(("cpu", n)) if n.parse::<usize>().is_ok() => Ok(tch::Device::Cpu),
            _ if id == "cpu" => Ok(tch::Device::Cpu),
            _ => Err(format!("device id `{id}` is neither cpu:N nor cuda:N")),
        })
        .collect()
}

/// Trains the trial of an assignment: after every epoch, writes the checkpoints (`last`, and
/// `best` when the validation accuracy improved) and the resume point to `artifacts`, and
/// hands `report` the epoch's report, which says whether to go on. Returns when the trial is
/// done, stopped, or failed.
///
/// A spec with `pretrain` first gets the backbone's pretrained weights from `cache_dir`
/// (pretraining them there if no worker has yet) and starts the trial from them.
pub fn train_attempt(
    a: &v1::Assignment,
    options: &TrainOptions,
    artifacts: &ArtifactStore,
    cache_dir: &Path,
    report: &mut dyn FnMut(v1::ReportEpochRequest) -> Control,
) -> Result<(), TrainError> {
    let (mut spec, trial) = resolve(a).map_err(TrainError::permanent)?;
    // The stage tree (before pretraining changes the spec's weights): which of this trial's
    // epochs other trials share, and whose resume points this trial may start from — when the
    // coordinator runs the sweep's shared epochs once (it says so; an older one does not).
    let tree = StageTree::build(&spec, a.sharing);
    // Resume points kept past later epochs: the ends of shared stages (branches start there),
    // and ASHA's rungs (a trial paused there, or credited there by the stage's runner, is
    // handed out again from that point once promoted).
    let mut keep = tree.shared_stage_ends(trial.index);
    if let Some(rule) = spec.early_stopping.filter(|r| r.pauses()) {
        keep.extend((1..trial.ft_epochs).filter(|&f| rule.decides_at(f, trial.ft_epochs)).map(|f| trial.fe_epochs + f));
    }
    // The content key of each prefix of the trial's epochs, from the spec as stored (as the
    // coordinator computes them): written beside each resume point, and what a point of
    // another sweep must name to be started from.
    let keys = sweep_core::stages::epoch_keys(&spec, &trial);
    if spec.pretrain.is_some() {
        let weights = pretrain::ensure(&spec, trial.backbone, cache_dir, options)?;
        spec.model.weights = sweep_core::spec::Weights::File(weights.display().to_string());
    }
    // Already decoded by the trainer below (the process cache); needed for the checkpoints'
    // class names, and its scratch folder for the resume point's download.
    let dataset = data::load(&spec.dataset)?;
    let identity = checkpoint::Identity {
        sweep: a.sweep_id.clone(),
        trial: a.trial_id.clone(),
        attempt: a.attempt_id,
        backbone: trial.backbone.name().into(),
        classes: dataset.classes.clone(),
        image_size: dataset.image_size,
        spec_yaml: a.spec_yaml.clone(),
    };
    let mut checkpoints =
        TrialCheckpoints::new(artifacts, identity).map_err(|e| TrainError::retryable_from("checkpoints", e))?;
    let (resumed, mut note) = resume_point(a, &tree, &keys, artifacts, checkpoints.prefix(), checkpoints.scratch());
    let (mut trainer, resumed) = match resumed {
        Some((state, meta)) => {
            let epoch = state.epochs_done;
            let opts = TrainOptions { resume: Some(Arc::new(Mutex::new(state))), ..options.clone() };
            match Trainer::new(&spec, &trial, &opts) {
                Ok(t) => {
                    tracing::info!(trial = %a.trial_id, epoch, "resuming after epoch {epoch}");
                    (t, Some(meta))
                }
                // The point does not fit this trial's model: start over rather than fail forever.
                Err(e @ TrainError::ResumePoint(_)) => {
                    note = join_note(note, format!("{e}; started from the beginning"));
                    (Trainer::new(&spec, &trial, options)?, None)
                }
                Err(e) => return Err(e),
            }
        }
        None => (Trainer::new(&spec, &trial, options)?, None),
    };
    if !note.is_empty() {
        tracing::warn!(trial = %a.trial_id, %note, "resume");
    }
    let mut best = resumed.as_ref().and_then(|m| m.best_val_accuracy.zip(m.best_epoch));
    if let Some((accuracy, _)) = best {
        checkpoints.set_best(accuracy);
    }
    let resumed_from_epoch = trainer.epochs_done();
    let parameters = trainer.model().parameter_count();
    let mut first = true;
    while trainer.epochs_done() < trainer.total_epochs() {
        let metrics = trainer.run_epoch()?;
        // A diverged training has nothing to report: say so, once, instead of a report the
        // coordinator must refuse. It fails the same way anywhere (a learning rate too high).
        for (what, v) in [("train loss", metrics.train_loss), ("validation loss", metrics.val_loss)] {
            if !v.is_finite() || v > sweep_proto::MAX_LOSS {
                return Err(TrainError::permanent(format!(
                    "training diverged: the {what} of epoch {} is {v} (a lower learning rate may help)",
                    metrics.epoch
                )));
            }
        }
        crate::metrics::global().epoch(dataset.train.len(), metrics.seconds);
        let (last, new_best) = checkpoints
            .after_epoch_of(trainer.model(), &metrics, tree.is_shared(trial.index, metrics.epoch))
            .map_err(|e| TrainError::retryable_from("checkpoint", e))?;
        if new_best.is_some() {
            best = Some((metrics.val_accuracy, metrics.epoch));
        }
        let state = trainer
            .training_state()?
            .save_keeping(
                artifacts,
                checkpoints.prefix(),
                checkpoints.scratch(),
                StateMetadata {
                    format: String::new(),
                    sweep: a.sweep_id.clone(),
                    trial: a.trial_id.clone(),
                    backbone: trial.backbone.name().into(),
                    epoch: metrics.epoch,
                    best_val_accuracy: best.map(|b| b.0),
                    best_epoch: best.map(|b| b.1),
                    sha256: String::new(),
                    bytes: 0,
                    created_at_ms: 0,
                    key: keys.get(metrics.epoch as usize - 1).map(|k| k.0.clone()),
                },
                &keep,
            )
            .map_err(|e| TrainError::retryable_from("saving the resume point", e))?;
        let reference =
            |s: checkpoint::Saved| v1::CheckpointRef { uri: s.uri, sha256: s.sha256, bytes: s.bytes, epoch: s.epoch };
        let request = v1::ReportEpochRequest {
            attempt_id: a.attempt_id,
            metrics: Some(v1::EpochMetrics::from(&metrics)),
            parameters,
            last_checkpoint: Some(reference(last)),
            best_checkpoint: new_best.map(reference),
            skipped_images: dataset.skipped.len() as u32,
            resume_checkpoint: Some(v1::CheckpointRef {
                uri: state.uri,
                sha256: state.meta.sha256,
                bytes: state.meta.bytes,
                epoch: state.meta.epoch,
            }),
            resumed_from_epoch: if first { resumed_from_epoch } else { 0 },
            note: if first { std::mem::take(&mut note) } else { String::new() },
            // Filled in by `report` (the daemon knows who it is).
            worker_id: String::new(),
            session: String::new(),
        };
        first = false;
        // A stop after the last epoch's report changes nothing: the trial is done (its result
        // must not be thrown away as cancelled).
        if report(request) == Control::Stop && trainer.epochs_done() < trainer.total_epochs() {
            return Err(TrainError::Cancelled);
        }
    }
    Ok(())
}

fn join_note(note: String, more: String) -> String {
    if note.is_empty() { more } else { format!("{note}; {more}") }
}

/// The resume point to continue `a` from: the coordinator's newest one when it verifies, else
/// the newest older one in the trial's folder `prefix` of the store that verifies (never a
/// newer one: its metrics were not acknowledged), else none. The note says what was wrong
/// with those passed over.
///
/// A point verifies when it is this trial's own — its key is `<prefix>/state-e<epoch>` of
/// this store, and the sweep, trial, backbone and epoch its JSON records are the
/// assignment's — or, from the coordinator, the point of a trial of the same sweep whose
/// epochs up to that one are this trial's (`tree`: a shared stage's end state, computed once
/// by that trial), and its file has the SHA-256 recorded for it (by the coordinator, which
/// must give one, and by its JSON). A reference to anywhere else (another sweep's weights, a
/// path outside the store) is never loaded.
fn resume_point(
    a: &v1::Assignment,
    tree: &StageTree,
    keys: &[StageKey],
    store: &ArtifactStore,
    prefix: &str,
    scratch: &Path,
) -> (Option<(TrainingState, StateMetadata)>, String) {
    let Some(r) = a.resume.as_ref().filter(|r| r.epoch > 0 && !r.uri.is_empty()) else {
        return (None, String::new());
    };
    let mut note = String::new();
    let found = coordinator_point(a, tree, keys, r, store, prefix, scratch);
    match found {
        Ok(found) => return (Some(found), note),
        Err(e) => note = format!("resume point of epoch {} unusable: {e}", r.epoch),
    }
    for (epoch, key) in resume::list(store, prefix).into_iter().filter(|(e, _)| *e < r.epoch) {
        let found = TrainingState::fetch(store, &key, scratch, None)
            .map_err(|e| e.to_string())
            .and_then(|(state, meta)| owned_by(a, &a.trial_id, &meta, epoch).map(|()| (state, meta)));
        match found {
            Ok(found) => {
                note = format!("{note}; resumed from the older point of epoch {epoch}");
                return (Some(found), note);
            }
            Err(e) => note = format!("{note}; resume point of epoch {epoch} unusable: {e}"),
        }
    }
    (None, format!("{note}; started from the beginning"))
}

/// The resume point the coordinator handed over, once it is shown to be the trial's own or
/// that of a trial it shares its epochs up to that point with.
fn coordinator_point(
    a: &v1::Assignment,
    tree: &StageTree,
    keys: &[StageKey],
    r: &v1::CheckpointRef,
    store: &ArtifactStore,
    prefix: &str,
    scratch: &Path,
) -> Result<(TrainingState, StateMetadata), String> {
    if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the coordinator's record of it has no SHA-256; an unverifiable point is not trusted".into());
    }
    let key = store.key_of(&r.uri)?;
    let file = resume::file_name(r.epoch);
    let own = format!("{prefix}/{file}");
    // Whose point it is: this trial's, or one of the sweep's trials that computed the same
    // epochs `1..=r.epoch` (its folder is `<sweep>/<trial>`, a sibling of this one).
    let sharers = tree.sharers(a.trial_index as usize, r.epoch);
    let owner = if key == own {
        a.trial_id.clone()
    } else if let Some((sweep, trial)) = other_sweeps_point(&key, &a.sweep_id, &file) {
        // Another sweep's: started from only when its JSON names the content key of this
        // trial's epochs `1..=r.epoch` (the same computation, exactly).
        let want = keys.get(r.epoch as usize - 1).ok_or_else(|| format!("this trial has no epoch {}", r.epoch))?;
        let (state, meta) = TrainingState::fetch(store, &key, scratch, Some(&r.sha256)).map_err(|e| e.to_string())?;
        let got = (meta.sweep.as_str(), meta.trial.as_str(), meta.backbone.as_str(), meta.epoch);
        if got != (sweep.as_str(), trial.as_str(), a.backbone.as_str(), r.epoch) {
            return Err(format!(
                "{} holds {}/{} ({}) after epoch {}, not what its name says",
                r.uri, got.0, got.1, got.2, got.3
            ));
        }
        if meta.key.as_deref() != Some(want.0.as_str()) {
            return Err(format!(
                "{} is a point of {sweep}/{trial} whose epochs 1–{} are not this trial's (content key {}, this \
                 trial's is {want})",
                r.uri,
                r.epoch,
                meta.key.as_deref().unwrap_or("absent")
            ));
        }
        return Ok((state, meta));
    } else {
        sharers
            .iter()
            .map(|&i| sweep_core::grid::trial_id(i))
            .find(|t| key == format!("{}/{t}/{file}", a.sweep_id))
            .ok_or_else(|| {
                format!(
                    "{} is neither this trial's own resume point ({}) nor one of a trial it shares epochs 1–{} with",
                    r.uri,
                    store.uri(&own),
                    r.epoch
                )
            })?
    };
    let (state, meta) = TrainingState::fetch(store, &key, scratch, Some(&r.sha256)).map_err(|e| e.to_string())?;
    owned_by(a, &owner, &meta, r.epoch)?;
    Ok((state, meta))
}

/// The sweep and trial of a resume point `<sweep>/<trial>/<file>` of a sweep other than
/// `this_sweep` (ids as ids: nothing else is read).
fn other_sweeps_point(key: &str, this_sweep: &str, file: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (sweep, trial, name) = (parts.next()?, parts.next()?, parts.next()?);
    let ids = sweep_core::grid::is_sweep_id(sweep) && sweep_core::grid::trial_index(trial).is_some();
    (parts.next().is_none() && ids && sweep != this_sweep && name == file).then(|| (sweep.into(), trial.into()))
}

/// Whether a resume point's metadata is of the assignment's sweep and backbone and of trial
/// `trial`, after `epoch`.
fn owned_by(a: &v1::Assignment, trial: &str, meta: &StateMetadata, epoch: u32) -> Result<(), String> {
    let want = (a.sweep_id.as_str(), trial, a.backbone.as_str(), epoch);
    let got = (meta.sweep.as_str(), meta.trial.as_str(), meta.backbone.as_str(), meta.epoch);
    if want != got {
        return Err(format!(
            "it holds {}/{} ({}) after epoch {}, not {}/{} ({}) after epoch {epoch}",
            got.0, got.1, got.2, got.3, want.0, want.1, want.2
        ));
    }
    Ok(())
}

/// The spec and trial an assignment names, checked against each other. The sweep and trial ids
/// become parts of paths and object keys here, so ids that are not ids (`../..`, a `/`) are
/// refused before anything is built from them, whoever sent them.
fn resolve(a: &v1::Assignment) -> Result<(spec::SweepSpec, sweep_core::Trial), String> {
    if !sweep_core::grid::is_sweep_id(&a.sweep_id) || sweep_core::grid::trial_index(&a.trial_id).is_none() {
        return Err(format!(
            "the assignment names sweep `{}` and trial `{}`, which are not ids (the coordinator, or whoever \
             answers in its name, sent something no coordinator makes); nothing was written",
            a.sweep_id.escape_debug(),
            a.trial_id.escape_debug()
        ));
    }
    let spec = spec::parse_with(&a.spec_yaml, ParseOptions::stored())
        .map_err(|e| format!("the sweep spec does not parse on this worker: {e}"))?;
    let trial = sweep_core::grid::cell(&spec.grid, a.trial_index as usize)
        .ok_or_else(|| format!("the spec has no trial {}", a.trial_index))?;
    if trial.id != a.trial_id
        || trial.backbone.name() != a.backbone
        || trial.fe_epochs != a.fe_epochs
        || trial.ft_epochs != a.ft_epochs
    {
        return Err(format!(
            "assignment {} ({} {} {}+{}) does not match trial {} of its spec; coordinator and worker disagree on the grid",
            a.trial_id, a.backbone, a.trial_index, a.fe_epochs, a.ft_epochs, trial.id
        ));
    }
    Ok((spec, trial))
}

/// One line describing the daemon, for its start-up log.
pub fn describe(options: &DaemonOptions) -> String {
    let devices: Vec<&str> = options.devices.iter().map(|d| d.id.as_str()).collect();
    format!(
        "worker `{}` for {}: trains on {:?}, announces {}, artifacts in {}",
        options.name,
        options.coordinator,
        options.device,
        devices.join(","),
        options.artifacts.location()
    )
}
